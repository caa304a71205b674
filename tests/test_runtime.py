"""The runtime: step clock, per-stream store, session lifecycle and telemetry."""
import pytest
import torch

from cachekit.core.clock import StepClock, window_from_percent, window_steps
from cachekit.core.methods.base import full_plan
from cachekit.core.session import CacheSession, active_call
from cachekit.core.streams import CallLayout, StreamStore, input_signature
from cachekit.core.units import StoreMode, Unit, UnitMap

SIGMAS = [14.6, 7.0, 3.0, 1.0, 0.3, 0.0]


def test_clock_maps_each_call_to_the_step_of_its_sigma():
    clock = StepClock(SIGMAS)
    # heun: a call at sigma_i, a corrector at sigma_{i+1}; the last step is a single euler call.
    calls = [SIGMAS[0]]
    for i in range(1, 5):
        calls += [SIGMAS[i], SIGMAS[i]]
    assert [clock.step_of(s) for s in calls] == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    # dpm_2's midpoints belong to the step they refine; dtype round-off stays in its step.
    assert [clock.step_of(s) for s in (10.0, 5.0, 2.0, 0.5)] == [0, 1, 2, 3]
    assert clock.step_of(7.0 * (1 + 1e-7)) == 1 and clock.step_of(7.0 * (1 - 1e-7)) == 1
    assert clock.step_of(100.0) == 0 and clock.step_of(0.0) == 4


def test_windows():
    assert window_steps(SIGMAS, start_sigma=1e9, end_sigma=0.0) == range(0, 5)
    assert window_steps(SIGMAS, start_sigma=7.0, end_sigma=0.5) == range(1, 4)
    assert window_steps(SIGMAS, start_sigma=0.1, end_sigma=0.0) == range(0)
    assert window_from_percent(10, 0.2, 0.8) == range(2, 8)


def test_store_reuses_across_joint_and_split_calls():
    store = StreamStore()
    joint = CallLayout((("uncond", 1), ("cond", 0)))
    x = torch.randn(4, 3, 2)
    sig = input_signature(x, joint)
    out = torch.randn(4, 5)
    store.put(joint, sig, out)
    assert store.get(joint, sig) is out                      # fast path: same layout
    cond_only = CallLayout((("cond", 0),))
    sig1 = input_signature(x[:2], cond_only)
    assert torch.equal(store.get(cond_only, sig1), out[2:])
    swapped = CallLayout((("cond", 0), ("uncond", 1)))
    assert torch.equal(store.get(swapped, sig), torch.cat([out[2:], out[:2]]))
    assert store.get(CallLayout((("other", 2),)), sig1) is None                  # unknown stream
    assert store.get(cond_only, input_signature(torch.randn(2, 3, 4), cond_only)) is None   # shape
    assert store.get(cond_only, input_signature(x[:2].double(), cond_only)) is None         # dtype


def _session(plan_rows, mode=StoreMode.OUTPUT):
    units = UnitMap("toy", (Unit("u0", "g", "block", mode=mode),))

    class Fixed:
        name = "fixed"

        def plan(self, units, num_steps, window):
            return [list(r) for r in plan_rows]
    return CacheSession("owner-test", units, Fixed(), StepClock(SIGMAS[:len(plan_rows) + 1]), range(len(plan_rows)))


def _run(session, step_sigma, x, fn, layout=CallLayout(("all",)), protect=False):
    def model():
        call = active_call("owner-test")
        return call.session.run_unit(call, 0, lambda: fn(x), x)
    return session.model_call(model, sigma=step_sigma, layout=layout, samples=x.shape[0], call_input=x,
                              protect=protect)


def test_session_reuses_on_planned_steps_and_counts():
    session = _session([[False], [True], [True]])
    calls = []

    def fn(x):
        calls.append(1)
        return x * 2

    x0, x1 = torch.ones(2, 3), torch.full((2, 3), 5.0)
    assert torch.equal(_run(session, SIGMAS[0], x0, fn), x0 * 2)
    assert torch.equal(_run(session, SIGMAS[1], x1, fn), x0 * 2)     # reused step-0 output
    # A different shape at a reuse step recomputes instead of returning a wrong tensor.
    x2 = torch.ones(2, 4)
    assert torch.equal(_run(session, SIGMAS[2], x2, fn), x2 * 2)
    assert len(calls) == 2
    t = session.close()
    assert t.computed == [[2], [0], [2]] and t.reused == [[0], [2], [0]]
    assert abs(t.hit_rate - 1 / 3) < 1e-9
    assert session._stores[0].joint is None                        # state dropped on close


def test_residual_mode_adds_stored_residual_to_current_input():
    session = _session([[False], [True]], mode=StoreMode.RESIDUAL)
    _run(session, SIGMAS[0], torch.ones(1, 2), lambda x: x + 3)
    out = _run(session, SIGMAS[1], torch.full((1, 2), 10.0), lambda x: x * 100)
    assert torch.equal(out, torch.full((1, 2), 13.0))


def test_calls_that_edit_outputs_in_place_copy_what_is_stored():
    session = _session([[False], [True], [True]])
    out0 = _run(session, SIGMAS[0], torch.ones(1, 2), lambda x: x * 1, protect=True)
    out0 += 100                                     # e.g. ComfyUI's ControlNet `h += ctrl`
    out1 = _run(session, SIGMAS[1], torch.ones(1, 2), lambda x: x * 7, protect=True)
    assert torch.equal(out1, torch.ones(1, 2))
    out1 += 100
    assert torch.equal(_run(session, SIGMAS[2], torch.ones(1, 2), lambda x: x * 7, protect=True), torch.ones(1, 2))


def test_calls_without_in_place_edits_store_without_copying():
    session = _session([[False], [True]])
    out0 = _run(session, SIGMAS[0], torch.ones(1, 2), lambda x: x * 3)
    assert _run(session, SIGMAS[1], torch.ones(1, 2), lambda x: x * 7) is out0


def test_units_outside_a_session_compute_normally():
    assert active_call("owner-test") is None
    session = _session([[False]])
    session.close()
    x = torch.ones(1, 2)
    # A closed session runs the model untouched.
    assert torch.equal(session.model_call(lambda: x + 1, sigma=SIGMAS[0], layout=CallLayout(("all",)), samples=1), x + 1)


def test_full_plan_shape():
    units = UnitMap("toy", tuple(Unit(f"u{i}", "g", "k") for i in range(3)))
    assert full_plan(units, 2) == [[False] * 3, [False] * 3]


def test_measured_speedup_compares_the_run_with_its_own_full_steps():
    from cachekit.core.telemetry import RunTelemetry
    t = RunTelemetry("X", "f", ["a", "b"], ["g", "g"], num_steps=4)
    t.computed = [[1, 1], [1, 0], [1, 1], [1, 0]]
    t.reused = [[0, 0], [0, 1], [0, 0], [0, 1]]
    t.step_seconds = [1.0, 0.5, 1.2, 0.4]
    # Full steps take 1.0 and 1.2 s (median 1.1): 4 uncached steps would take 4.4 s; 3.1 s were spent.
    assert t.measured_speedup() == pytest.approx(4.4 / 3.1)
    t.reused = [[0, 0]] * 4
    assert t.measured_speedup() is None                      # nothing reused: nothing to measure
    assert "measured_speedup" in t.as_dict()
