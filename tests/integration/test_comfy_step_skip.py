"""Adaptive step skipping (AdaptiveDiffusion) in real ComfyUI, on tiny models from ComfyUI's classes.

The decisions are checked against the rule (itself checked against the official code in
tests/test_method_schedules.py) fed with the latents recorded outside CacheKit's wrapper, and
skipped calls are counted where CFG runs (comfy.samplers.sampling_function): a skipped step
must not reach it.
"""
from __future__ import annotations

import pytest
import torch

from .comfy_graph import RESULTS, Graph
from .test_comfy_methods import DEEPCACHE, _sample

SKIPPY = {"delta": 1.0, "max_skip_steps": 2}    # skips often, even on random weights
STEPS = 12


def _record_sampler_calls(monkeypatch):
    """Every sampler call as (x, sigma, denoised), recorded outside every model wrapper."""
    import comfy.samplers as samplers
    calls, cfg_calls = [], []
    original_call = samplers.KSamplerX0Inpaint.__call__
    original_cfg = samplers.sampling_function

    def recorded(self, x, sigma, denoise_mask, model_options={}, seed=None):
        out = original_call(self, x, sigma, denoise_mask, model_options, seed)
        calls.append((x.clone(), sigma.clone(), out.clone(), self.inner_model.inner_model.model_sampling))
        return out

    def counted_cfg(model, x, timestep, *args, **kwargs):
        cfg_calls.append(float(timestep.flatten()[0]))
        return original_cfg(model, x, timestep, *args, **kwargs)
    monkeypatch.setattr(samplers.KSamplerX0Inpaint, "__call__", recorded)
    monkeypatch.setattr(samplers, "sampling_function", counted_cfg)
    return calls, cfg_calls


def _expected_decisions(comfy, calls, sigmas, config):
    """Per call: does the model run? One decision per step, on the step's first call."""
    rule = comfy.pack("core.methods.adaptive").AdaptiveSkipRule(config)
    clock = comfy.pack("core.clock").StepClock(sigmas)
    decisions, last_step, compute = [], None, True
    for x, sigma, _, model_sampling in calls:
        step = clock.step_of(float(sigma[0]))
        if step != last_step:
            last_step, compute = step, rule.decide(model_sampling.calculate_input(sigma, x))
        decisions.append(compute)
    return decisions


def _sigmas(comfy, steps, scheduler="normal"):
    from comfy.samplers import calculate_sigmas
    from .comfy_graph import tiny
    ms = tiny("sd15").patcher.get_model_object("model_sampling")
    return calculate_sigmas(ms, scheduler, steps).tolist()


def _last_runs(comfy, n):
    return [r["telemetry"] for r in comfy.pack("nodes.history").recent()[-n:]]


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_delta_0_equals_unpatched_exactly(comfy, family, cfg):
    reference = _sample(comfy, family, f"ad-{family}-ref-{cfg}", cfg=cfg, steps=STEPS)
    patched = _sample(comfy, family, f"ad-{family}-d0-{cfg}", ("CacheKitAdaptiveSkip", {"delta": 0.0, "max_skip_steps": 4}),
                      cfg=cfg, steps=STEPS)
    assert torch.equal(reference, patched)
    run = _last_runs(comfy, 1)[0]
    assert run.method == "AdaptiveDiffusion" and run.hit_rate == 0.0 and run.skipped_steps == []


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun"])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_skips_follow_the_rule_and_skip_the_whole_prediction(comfy, sampler, cfg, monkeypatch):
    config = comfy.pack("core.methods.adaptive").AdaptiveConfig(**SKIPPY)
    calls, cfg_calls = _record_sampler_calls(monkeypatch)
    out = _sample(comfy, "sd15", f"ad-{sampler}-{cfg}", ("CacheKitAdaptiveSkip", SKIPPY), cfg=cfg, steps=STEPS,
                  sampler=sampler)
    run = _last_runs(comfy, 1)[0]
    decisions = _expected_decisions(comfy, calls, _sigmas(comfy, STEPS), config)
    calls_per_step = 2 if sampler == "heun" else 1
    assert len(calls) == STEPS * calls_per_step - (1 if sampler == "heun" else 0)   # heun's last step is euler
    assert decisions[:calls_per_step * 4 - (calls_per_step - 1)] == [True] * (calls_per_step * 4 - (calls_per_step - 1))
    assert not all(decisions), "the test needs skips"
    # A skipped call never reaches CFG (so no branch, ControlNet or unit runs).
    assert len(cfg_calls) == sum(decisions)
    assert run.model_calls == len(calls)
    assert sum(map(sum, run.reused)) == sum(not d for d in decisions) * calls[0][0].shape[0]
    # A reused call returns x - sigma * eps of the last computed call.
    eps = None
    for (x, sigma, denoised, _), compute in zip(calls, decisions):
        s = sigma.view(-1, 1, 1, 1)
        if compute:
            eps = (x - denoised) / s
        else:
            torch.testing.assert_close(denoised, x - s * eps, rtol=0, atol=1e-5)
    assert run.skipped_steps and all(sum(run.reused[s]) > 0 for s in run.skipped_steps)
    assert torch.isfinite(out).all()


def test_stacked_with_deepcache_a_skipped_step_runs_no_unit(comfy):
    g = Graph("sd15").patch("CacheKitDeepCache", **DEEPCACHE).patch("CacheKitAdaptiveSkip", **SKIPPY)
    g.sample("ad-stack", steps=STEPS, cfg=2.5)
    comfy.run(g.prompt, comfy.fresh_executor())
    runs = {t.method: t for t in _last_runs(comfy, 2)}
    skip, deep = runs["AdaptiveDiffusion"], runs["DeepCache"]
    assert skip.skipped_steps, "the test needs skips"
    assert deep.skipped_steps == skip.skipped_steps           # shows in DeepCache's telemetry too
    for step in range(STEPS):
        units_ran = sum(deep.computed[step]) + sum(deep.reused[step])
        if step in skip.skipped_steps:
            assert units_ran == 0, step
        else:
            assert units_ran > 0, step
    assert deep.model_calls == STEPS - len(skip.skipped_steps)
    assert torch.isfinite(RESULTS["ad-stack"]).all()


def test_each_run_starts_a_fresh_rule(comfy):
    first = _sample(comfy, "sd15", "ad-fresh-1", ("CacheKitAdaptiveSkip", SKIPPY), steps=STEPS)
    first_run = _last_runs(comfy, 1)[0]
    second = _sample(comfy, "sd15", "ad-fresh-2", ("CacheKitAdaptiveSkip", SKIPPY), steps=STEPS)
    second_run = _last_runs(comfy, 1)[0]
    assert torch.equal(first, second)
    assert first_run.skipped_steps == second_run.skipped_steps and first_run is not second_run


def test_bad_settings_are_refused_when_the_node_runs(comfy):
    node = comfy.pack("nodes.method_nodes").CacheKitAdaptiveSkip
    from .comfy_graph import tiny
    with pytest.raises(ValueError, match="delta"):
        node.execute(tiny("sd15").patcher, -0.5, 4)


def _longest_run(steps: list[int]) -> int:
    longest = run = 0
    for i, step in enumerate(steps):
        run = run + 1 if i and step == steps[i - 1] + 1 else 1
        longest = max(longest, run)
    return longest


@pytest.mark.parametrize("cap", [1, 2, 4])
def test_never_more_than_max_skip_steps_skipped_in_a_row(comfy, cap):
    # Regression: on SD3 with 20 steps and a large delta, max_skip_steps 1 or 2 skipped five
    # steps in a row (the official cap only starts after more than 4 decisions).
    _sample(comfy, "mmdit", f"ad-cap-{cap}", ("CacheKitAdaptiveSkip", {"delta": 1.0, "max_skip_steps": cap}),
            steps=20, cfg=2.0)
    run = comfy.pack("nodes.history").last()
    assert run.method == "AdaptiveDiffusion" and run.skipped_steps, "the test needs skips"
    assert _longest_run(run.skipped_steps) == cap, run.skipped_steps


def test_a_longer_warm_up_then_every_other_step_skipped(comfy):
    # The bench's most accurate setting up to 1.8x: max_skip 1, forecast2, delta 1.0, 6 warm-up steps.
    settings = {"delta": 1.0, "max_skip_steps": 1, "reuse": "forecast2", "warmup_steps": 6}
    out = _sample(comfy, "sd15", "ad-warmup-6", ("CacheKitAdaptiveSkip", settings), steps=STEPS, cfg=2.0)
    run = comfy.pack("nodes.history").last()
    assert run.skipped_steps == [6, 8, 10] and torch.isfinite(out).all()
    node = comfy.pack("nodes.method_nodes").CacheKitAdaptiveSkip
    from .comfy_graph import tiny
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 4"):
        node.execute(tiny("sd15").patcher, 1.0, 1, reuse="forecast2", warmup_steps=3)


def test_forecast_reuse_extrapolates_the_noise_from_the_last_two_computed_steps(comfy, monkeypatch):
    settings = {**SKIPPY, "reuse": "forecast1"}
    config = comfy.pack("core.methods.adaptive").AdaptiveConfig(**settings)
    calls, _ = _record_sampler_calls(monkeypatch)
    out = _sample(comfy, "sd15", "ad-forecast", ("CacheKitAdaptiveSkip", settings), cfg=2.5, steps=STEPS)
    sigmas = _sigmas(comfy, STEPS)
    decisions = _expected_decisions(comfy, calls, sigmas, config)
    assert not all(decisions), "the test needs skips"
    clock = comfy.pack("core.clock").StepClock(sigmas)
    history = []        # (step, eps) of computed calls
    for (x, sigma, denoised, _), compute in zip(calls, decisions):
        s = sigma.view(-1, 1, 1, 1)
        step = clock.step_of(float(sigma[0]))
        if compute:
            history.append((step, (x - denoised) / s))
            continue
        (s0, e0), (s1, e1) = history[-2], history[-1]
        expected = e1 + (e1 - e0) / (s1 - s0) * (step - s1)      # Taylor order 1 over the step gap
        torch.testing.assert_close(denoised, x - s * expected, rtol=0, atol=1e-4)
        assert not torch.allclose(denoised, x - s * e1, atol=1e-4)    # not the held noise
    assert torch.isfinite(out).all()
