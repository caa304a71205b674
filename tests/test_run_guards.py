"""Split schedules (two samplers, one schedule) and the few-step / noise-injection guards, host-free.

The same behaviour in real ComfyUI: tests/integration/test_comfy_wan22_experts.py and
tests/integration/test_comfy_run_guards.py.
"""
from __future__ import annotations

import torch

from cachekit.core.clock import StepClock, locate_run
from cachekit.core.guards import FEW_STEPS, guard_window, run_notes
from cachekit.core.methods.adaptive import AdaptiveConfig, AdaptivePolicy
from cachekit.core.methods.change import ChangeConfig, ChangePolicy
from cachekit.core.methods.fora import ForaConfig, ForaPolicy, refresh_steps
from cachekit.core.session import CacheSession, active_call
from cachekit.core.streams import SINGLE_STREAM
from cachekit.core.units import Unit, UnitMap, call_unit_map

FULL = [float(12 - i) for i in range(12)] + [0.0]      # 12 steps
UNITS = UnitMap("toy", (Unit("u0", "g", "block"), Unit("u1", "g", "block")))


# -- locating a run in its schedule ---------------------------------------------------------
def test_a_runs_sigmas_are_found_as_a_slice_of_their_schedule():
    other = [float(24 - 2 * i) for i in range(12)] + [0.0]
    assert locate_run(FULL[:7], [other, FULL]) == (FULL, 0)          # first part: leftover noise at 6
    assert locate_run(FULL[6:], [other, FULL]) == (FULL, 6)          # second part continues at 6
    assert locate_run(FULL[6:], [FULL], allow_offset=False) is None  # fresh noise: never a continuation
    assert locate_run([5.5, 2.0], [other, FULL]) is None
    # unique: schedules that hold the run but disagree on its length or place give no answer.
    longer = FULL[:8] + [0.5, 0.0]
    assert locate_run(FULL[:7], [FULL, longer], allow_offset=False, unique=True) is None
    assert locate_run(FULL[:7], [FULL, other], allow_offset=False, unique=True) == (FULL, 0)
    # Sigmas that went through float32 still match.
    assert locate_run(torch.tensor(FULL[3:9]).tolist(), [FULL]) == (FULL, 3)


# -- sessions of a split run ------------------------------------------------------------------
def _run(session, steps, owner):
    for step in steps:
        x = torch.zeros(1, 1)

        def model(step=step, x=x):
            call = active_call(owner)
            for u in range(2):
                call.session.run_unit(call, u, lambda: x + step, x)
        session.model_call(model, sigma=FULL[step], layout=SINGLE_STREAM, samples=1, call_input=x)
    return session.close()


def test_the_second_part_of_a_split_schedule_counts_steps_in_the_whole_schedule_and_computes_its_first():
    policy = ForaPolicy(ForaConfig(interval=3))
    refresh = refresh_steps(12, 3)
    assert refresh == {0, 2, 5, 8, 11} and 6 not in refresh     # one sampler would reuse at 6 (from 5)
    first = _run(CacheSession("p1", UNITS, policy, StepClock(FULL), range(12), run_steps=range(0, 6)), range(6), "p1")
    second = _run(CacheSession("p2", UNITS, policy, StepClock(FULL), range(12), run_steps=range(6, 12)),
                  range(6, 12), "p2")
    assert first.num_steps == second.num_steps == 12
    assert first.run_steps == [0, 6] and second.run_steps == [6, 12]
    reused = lambda t: [s for s in range(12) if sum(t.reused[s])]
    ran = lambda t: [s for s in range(12) if sum(t.reused[s]) + sum(t.computed[s])]
    assert ran(first) == list(range(6)) and ran(second) == list(range(6, 12))
    # The countdown of the whole schedule, except the second run's first step: computed.
    assert reused(first) == [s for s in range(6) if s not in refresh]
    assert reused(second) == [s for s in range(7, 12) if s not in refresh]
    assert second.computed[6] == [1, 1]
    assert "steps 6-11 of 12" in second.summary()


def test_a_call_at_the_sigma_where_a_run_stops_belongs_to_its_last_step():
    """heun's corrector of the first part's last step runs at the sigma the second part starts at."""
    session = CacheSession("h", UNITS, ForaPolicy(ForaConfig(interval=3)), StepClock(FULL), range(12),
                           run_steps=range(0, 6))
    telemetry = _run(session, [5, 6], "h")
    assert [s for s in range(12) if sum(telemetry.computed[s]) + sum(telemetry.reused[s])] == [5]


def test_online_policies_see_the_window_cut_to_their_run():
    policy = ChangePolicy(ChangeConfig(threshold=0.5, warmup_steps=2))
    session = CacheSession("c", UNITS, policy, StepClock(FULL), range(12), run_steps=range(6, 12))
    assert session.window == range(6, 12) and session._state.window == range(6, 12)


# -- guards -----------------------------------------------------------------------------------
def test_few_steps_move_the_window_to_the_middle_and_the_note_says_what_is_left():
    fora = ForaPolicy(ForaConfig(interval=2))
    assert guard_window(fora, 4, range(4)) == range(2, 4)
    assert guard_window(fora, 3, range(3)) == range(2, 3)
    assert guard_window(fora, FEW_STEPS + 1, range(5)) == range(5)     # 5..8 steps: a note only
    clock = StepClock(FULL[-5:])                                         # 4 steps
    session = CacheSession("f", UNITS, fora, clock, guard_window(fora, 4, range(4)))
    assert not any(map(any, session.plan))                               # FORA: first and last fresh
    notes = run_notes(session)
    assert len(notes) == 1 and "4-step schedule" in notes[0] and "computes every step" in notes[0]
    eight = CacheSession("f8", UNITS, fora, StepClock(FULL[-9:]), range(8))
    assert "8-step schedule" in run_notes(eight)[0] and "reuses at steps" in run_notes(eight)[0]
    assert run_notes(CacheSession("f12", UNITS, fora, StepClock(FULL), range(12))) == []


def test_a_noise_injecting_sampler_stops_adaptive_skipping_and_only_notes_feature_caches():
    adaptive = AdaptivePolicy(AdaptiveConfig(delta=1.0, max_skip_steps=2))
    fora = ForaPolicy(ForaConfig(interval=3))
    assert guard_window(adaptive, 12, range(12), injects_noise=True) == range(0)
    assert guard_window(fora, 12, range(12), injects_noise=True) == range(12)
    session = CacheSession("a", call_unit_map("toy"), adaptive, StepClock(FULL), range(0))
    note = run_notes(session, sampler="euler_ancestral", injects_noise=True)
    assert len(note) == 1 and note[0].startswith("euler_ancestral adds fresh noise") and "skips no step" in note[0]
    # Outside its window an online call-level policy computes, whatever it decides: latents that
    # change linearly skip as often as the cap allows with the full window, never with none.
    unguarded = CacheSession("a2", call_unit_map("toy"), adaptive, StepClock(FULL), range(12))
    for s in (session, unguarded):
        for step in range(12):
            with s.call_scope(sigma=FULL[step], layout=SINGLE_STREAM, samples=1) as call:
                s.run_call(call, lambda: torch.ones(1), probe=torch.full((1,), float(step)))
    assert unguarded.telemetry.skipped_steps
    assert session.telemetry.skipped_steps == [] and sum(r[0] for r in session.telemetry.computed) == 12
    fora_notes = run_notes(CacheSession("n", UNITS, fora, StepClock(FULL), range(12)), sampler="dpmpp_sde",
                           injects_noise=True)
    assert len(fora_notes) == 1 and "reused features predate that noise" in fora_notes[0]
