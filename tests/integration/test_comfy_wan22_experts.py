"""Wan 2.2 14B's two experts in real ComfyUI: one schedule, two models, two samplers.

The high-noise expert samples steps 0..k-1 and the low-noise one k..N-1 of the same N-step
schedule (two KSamplerAdvanced, or SplitSigmas + two SamplerCustomAdvanced), each model patched
by its own FORA node with its own interval. Two tiny Wan models from ComfyUI's classes stand
in for the experts. Checked: every model call's step is its step in the whole schedule; each
expert's session sees only its own steps; each expert follows the countdown of the whole
schedule (so the split changes nothing but the first step of the second expert, which computes:
a reuse there could only come from the other expert); interval 1 is exact; the run records
(what the sidebar shows) carry both experts' steps.
"""
from __future__ import annotations

import pytest
import torch

from .comfy_graph import RESULTS

STEPS, SPLIT = 12, 6
HIGH = {"interval": 3, "start_percent": 0.0, "end_percent": 1.0}
LOW = {"interval": 2, "start_percent": 0.0, "end_percent": 1.0}


class Prompt:
    def __init__(self):
        self.prompt = {}

    def add(self, class_type, **inputs):
        node_id = str(len(self.prompt) + 1)
        self.prompt[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id


def _experts(p, high, low):
    """(high model, low model, loader) with optional CacheKit FORA nodes; their ids."""
    hi = p.add("CKTestModel", family="wan", seed=0, size=0)
    lo = p.add("CKTestModel", family="wan", seed=1, size=0)
    models, fora = [], []
    for loader, settings in ((hi, high), (lo, low)):
        model = [loader, 0]
        if settings is not None:
            node = p.add("CacheKitFORA", model=model, **settings)
            fora.append(node)
            model = [node, 0]
        models.append(model)
    return models, hi, fora


def _ksampler_advanced(high, low, key, steps=STEPS, split=SPLIT, sampler="euler", scheduler="simple"):
    p = Prompt()
    (m_hi, m_lo), loader, fora = _experts(p, high, low)
    common = dict(noise_seed=7, steps=steps, cfg=2.0, sampler_name=sampler, scheduler=scheduler,
                  positive=[loader, 1], negative=[loader, 2])
    first = p.add("KSamplerAdvanced", model=m_hi, add_noise="enable", latent_image=[loader, 3], start_at_step=0,
                  end_at_step=split, return_with_leftover_noise="enable", **common)
    second = p.add("KSamplerAdvanced", model=m_lo, add_noise="disable", latent_image=[first, 0],
                   start_at_step=split, end_at_step=10000, return_with_leftover_noise="disable", **common)
    p.add("CKTestCapture", samples=[second, 0], key=key)
    return p.prompt, fora


def _split_sigmas(high, low, key, steps=STEPS, split=SPLIT, scheduler="simple"):
    """The same split with the custom-sampler nodes (BasicScheduler -> SplitSigmas)."""
    p = Prompt()
    (m_hi, m_lo), loader, fora = _experts(p, high, low)
    sigmas = p.add("BasicScheduler", model=m_hi, scheduler=scheduler, steps=steps, denoise=1.0)
    parts = p.add("SplitSigmas", sigmas=[sigmas, 0], step=split)
    sampler = p.add("KSamplerSelect", sampler_name="euler")
    out = [loader, 3]
    for model, noise, part in ((m_hi, p.add("RandomNoise", noise_seed=7), 0), (m_lo, p.add("DisableNoise"), 1)):
        guider = p.add("CFGGuider", model=model, positive=[loader, 1], negative=[loader, 2], cfg=2.0)
        out = [p.add("SamplerCustomAdvanced", noise=[noise, 0], guider=[guider, 0], sampler=[sampler, 0],
                     sigmas=[parts, part], latent_image=out), 0]
    p.add("CKTestCapture", samples=out, key=key)
    return p.prompt, fora


def _steps_seen(comfy, monkeypatch):
    """(owner, step) of every model call, as the session's clock places it."""
    session_cls = comfy.pack("core.session").CacheSession
    original = session_cls.call_scope
    seen = []

    def spy(self, **kw):
        seen.append((self.owner, self.clock.step_of(kw["sigma"])))
        return original(self, **kw)
    monkeypatch.setattr(session_cls, "call_scope", spy)
    return seen


def _runs_of(comfy, fora_ids, n=2):
    records = comfy.pack("nodes.history").recent_json(limit=n)
    assert [r["node_id"] for r in records] == fora_ids
    return records


def _expected_reuse(comfy, settings, run_steps):
    """The steps FORA at these settings reuses on: the whole schedule's countdown, in the run's steps,
    except a later run's first step."""
    fora = comfy.pack("core.methods.fora")
    refresh = fora.refresh_steps(STEPS, settings["interval"])
    return [s for s in run_steps if s not in refresh and s != (run_steps.start or None)]


@pytest.mark.parametrize("graph", [_ksampler_advanced, _split_sigmas], ids=["KSamplerAdvanced", "SplitSigmas"])
def test_each_expert_counts_steps_in_the_whole_schedule_and_caches_only_its_own(comfy, monkeypatch, graph):
    seen = _steps_seen(comfy, monkeypatch)
    prompt, fora = graph(HIGH, LOW, f"w22-{graph.__name__}")
    comfy.run(prompt, comfy.fresh_executor())
    high, low = _runs_of(comfy, fora)
    owners = [high["owner"], low["owner"]]
    assert owners[0] != owners[1]
    # Every model call's step, per expert: the first expert 0..5, the second 6..11 (not 0..5).
    by_owner = {o: sorted({step for owner, step in seen if owner == o}) for o in owners}
    assert by_owner == {owners[0]: list(range(SPLIT)), owners[1]: list(range(SPLIT, STEPS))}
    for record, own, settings in ((high, range(0, SPLIT), HIGH), (low, range(SPLIT, STEPS), LOW)):
        t = record["telemetry"]
        assert t["num_steps"] == STEPS and t["run_steps"] == [own.start, own.stop] and t["notes"] == []
        ran = [s for s, rate in enumerate(t["step_hit_rates"]) if rate is not None]
        assert ran == list(own), (record["node_id"], t["step_hit_rates"])
        reused = [s for s, rate in enumerate(t["step_hit_rates"]) if rate]
        assert reused == _expected_reuse(comfy, settings, own), (record["node_id"], t["step_hit_rates"])
    # The low expert's first step would reuse in its own countdown (interval 2: refreshes at odd
    # steps), from step 5 - the high expert's: it computes every unit instead.
    assert SPLIT not in comfy.pack("core.methods.fora").refresh_steps(STEPS, LOW["interval"])
    first = comfy.pack("nodes.history").recent()[-1]["telemetry"]
    assert all(first.computed[SPLIT]) and not any(first.reused[SPLIT])
    assert torch.isfinite(RESULTS[f"w22-{graph.__name__}"]).all()


def test_a_first_part_that_two_schedules_start_with_keeps_its_own_count(comfy):
    """ComfyUI's "normal" N-step schedule starts like "sgm_uniform" at N - 1 steps: the first expert's
    sigmas cannot say which it samples, so it counts its own steps (as without the split); the
    second expert's sigmas are unique to the 12-step schedule and count in it."""
    prompt, fora = _ksampler_advanced(HIGH, LOW, "w22-normal", scheduler="normal")
    comfy.run(prompt, comfy.fresh_executor())
    high, low = (r["telemetry"] for r in _runs_of(comfy, fora))
    assert (high["num_steps"], high["run_steps"]) == (SPLIT, [0, SPLIT])
    assert (low["num_steps"], low["run_steps"]) == (STEPS, [SPLIT, STEPS])
    reused = [s for s, rate in enumerate(low["step_hit_rates"]) if rate]
    assert reused == _expected_reuse(comfy, LOW, range(SPLIT, STEPS))


def test_interval_1_on_both_experts_equals_the_unpatched_pair_exactly(comfy):
    off = {**HIGH, "interval": 1}
    prompt, _ = _ksampler_advanced(None, None, "w22-ref")
    comfy.run(prompt, comfy.fresh_executor())
    prompt, _ = _ksampler_advanced(off, off, "w22-off")
    comfy.run(prompt, comfy.fresh_executor())
    assert torch.equal(RESULTS["w22-off"], RESULTS["w22-ref"])


def test_the_second_prompt_runs_both_experts_on_the_cached_patches_with_fresh_sessions(comfy):
    prompt, fora = _ksampler_advanced(HIGH, LOW, "w22-fresh", **{})
    for node in prompt.values():
        if node["class_type"] == "KSamplerAdvanced":
            node["inputs"]["noise_seed"] = 8
    comfy.run(prompt, comfy.fresh_executor())
    fresh = [r["telemetry"] for r in comfy.pack("nodes.history").recent()[-2:]]
    # Two prompts on one executor; the second changes only the seed, so ComfyUI serves both
    # patched models from its cache and only the samplers run again.
    prompt, fora = _ksampler_advanced(HIGH, LOW, "w22-again")
    executor = comfy.fresh_executor()
    comfy.run(prompt, executor)
    before = comfy.pack("nodes.history").recent()[-2:]
    for node in prompt.values():
        if node["class_type"] == "KSamplerAdvanced":
            node["inputs"]["noise_seed"] = 8
    comfy.run(prompt, executor)
    after = comfy.pack("nodes.history").recent()[-2:]
    assert torch.equal(RESULTS["w22-again"], RESULTS["w22-fresh"])
    for b, a, f in zip(before, after, fresh):
        assert b["owner"] == a["owner"] and b["telemetry"] is not a["telemetry"]
        assert a["telemetry"].reused == f.reused and a["telemetry"].computed == f.computed


def test_a_four_step_lightning_split_is_guarded_on_both_experts(comfy):
    """lightx2v-style: 4 steps, 2 per expert. The schedule is 4 steps long for both experts, so
    both get the few-step note, and FORA (reuse from the middle on) caches nothing."""
    prompt, fora = _ksampler_advanced({**HIGH, "interval": 2}, {**LOW, "interval": 2}, "w22-4", steps=4, split=2)
    comfy.run(prompt, comfy.fresh_executor())
    for record, own in zip(_runs_of(comfy, fora), ([0, 2], [2, 4])):
        t = record["telemetry"]
        assert t["num_steps"] == 4 and t["run_steps"] == own and t["hit_rate"] == 0
        assert len(t["notes"]) == 1 and t["notes"][0].startswith("4-step schedule")
