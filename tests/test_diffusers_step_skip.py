"""apply_adaptive_skip on diffusers models: the official pipeline's decisions, exactness, stacking.

tests/data/adaptive_official.json records, for two runs of the bundled U-Net (DDIM, CFG 3),
which steps the official AdaptiveDiffusion loop computed, driven by the official
`estimate_skipping`; the final latents are in adaptive_trajectories.safetensors. (Regenerate
both if the bundled U-Net's weights change.)
"""
import json
from pathlib import Path

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from safetensors.torch import load_file

import tiny_diffusers as td
from cachekit import apply_adaptive_skip, apply_deepcache, remove_cache
from cachekit.tinymodels.bundled import load
from cachekit.tinymodels.sampling import make_scheduler, sample

DATA = Path(__file__).parent / "data"


def _computed_steps(monkeypatch, model):
    """Record, per model call, whether the network really ran."""
    ran = []
    original = type(model).forward

    def counted(self, *args, **kwargs):
        ran.append(True)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(type(model), "forward", counted)
    return ran


@pytest.mark.parametrize("name", ["ddim50_delta0.01", "ddim25_delta0.05"])
def test_bundled_unet_takes_the_official_pipelines_decisions(name, monkeypatch):
    info = json.loads((DATA / "adaptive_official.json").read_text())["trajectories"][name]
    setting = info["recorded_with"]
    official_final = load_file(str(DATA / "adaptive_trajectories.safetensors"))[name + ".final"]
    denoiser = load("unet")
    ran = _computed_steps(monkeypatch, denoiser.network)
    scheduler = make_scheduler(setting["steps"])
    handle = apply_adaptive_skip(denoiser.network, delta=setting["delta"], max_skip_steps=setting["max_skip_steps"],
                                 scheduler=scheduler, official_cap=True)
    out = sample(denoiser, torch.tensor([setting["class"]]), steps=setting["steps"], cfg=setting["cfg"],
                 seed=setting["seed"], scheduler=scheduler)
    run = handle.finish_run()
    expected = info["computed_closed_loop"]
    assert not all(expected)
    assert [sum(row) == 0 for row in run.reused] == expected
    assert len(ran) == sum(expected)
    assert run.skipped_steps == [i for i, c in enumerate(expected) if not c]
    torch.testing.assert_close(out, official_final.clamp(-1, 1), rtol=0, atol=1e-4)
    assert run.executed_fraction() == pytest.approx(sum(expected) / len(expected))


def test_delta_0_is_bit_identical_and_remove_restores():
    model = td.unet()
    sched = td.scheduler(8)
    reference = td.sample("unet", model, sched)
    handle = apply_adaptive_skip(model, delta=0.0, scheduler=sched)
    assert all(torch.equal(a, b) for a, b in zip(td.sample("unet", model, sched), reference))
    assert handle.telemetry.hit_rate == 0.0
    handle.remove()
    assert "forward" not in model.__dict__
    assert all(torch.equal(a, b) for a, b in zip(td.sample("unet", model, sched), reference))


def test_split_cfg_calls_reuse_their_own_outputs():
    """A pipeline calling the model once per CFG branch: a skipped step returns each branch's own."""
    model = td.dit()
    sched = td.scheduler(12)
    handle = apply_adaptive_skip(model, delta=10.0, max_skip_steps=2, scheduler=sched)
    x = torch.randn(1, 4, 8, 8)
    last = {}
    for t in sched.timesteps:
        outs = {}
        for label in (1, 2):
            outs[label] = model(x, timestep=t.expand(1), class_labels=torch.tensor([label]), return_dict=False)[0]
        step = len(last.get("steps", []))
        if handle.telemetry.reused[step][0]:
            assert torch.equal(outs[1], last[1]) and torch.equal(outs[2], last[2])
            assert not torch.equal(outs[1], outs[2])
        last.update(outs)
        last.setdefault("steps", []).append(t)
        x = sched.step(outs[2][:, :4], t, x).prev_sample
    assert handle.telemetry.skipped_steps, "the test needs skips"
    handle.remove()


def test_stacks_with_deepcache_and_a_skipped_step_runs_no_unit(monkeypatch):
    model = td.unet()
    sched = td.scheduler(12)
    counts = {"resnets": 0}
    original = ResnetBlock2D.forward

    def counted(self, *a, **k):
        counts["resnets"] += 1
        return original(self, *a, **k)
    monkeypatch.setattr(ResnetBlock2D, "forward", counted)
    deep = apply_deepcache(model, cache_interval=1, scheduler=sched)
    skip = apply_adaptive_skip(model, delta=10.0, max_skip_steps=2, scheduler=sched)
    td.sample("unet", model, sched)
    skipped = skip.telemetry.skipped_steps
    assert skipped
    per_call = 12
    assert counts["resnets"] == per_call * (12 - len(skipped))
    assert all(sum(deep.telemetry.computed[s]) == 0 for s in skipped)
    remove_cache(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "_cachekit_handle")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="delta"):
        apply_adaptive_skip(td.unet(), delta=-1.0, scheduler=td.scheduler(4))
    with pytest.raises(ValueError, match="num_inference_steps"):
        apply_adaptive_skip(td.unet(), delta=0.01)


class _LinearInStep(torch.nn.Module):
    """A 'denoiser' whose output is linear in the timestep: forecast1 predicts it exactly."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.01))

    def forward(self, sample, timestep, **kwargs):
        t = torch.as_tensor(timestep, dtype=sample.dtype).reshape(-1)[0]
        return (torch.ones_like(sample) * self.scale * t,)


def test_forecast_reuse_extrapolates_a_skipped_steps_prediction():
    steps = 14
    outputs = {}
    for reuse in ("hold", "forecast1"):
        model = _LinearInStep()
        sched = td.scheduler(steps)
        handle = apply_adaptive_skip(model, delta=0.5, max_skip_steps=2, scheduler=sched, reuse=reuse)
        x, outs = torch.zeros(1, 4, 8, 8), []
        with torch.no_grad():
            for k, t in enumerate(sched.timesteps):
                outs.append(model(x, t)[0])
                x = x + (k + 1) ** 0.5 * 0.01 * torch.ones_like(x)    # smooth latents: the rule skips
        run = handle.finish_run()
        handle.remove()
        outputs[reuse] = (outs, run)
    (hold, hold_run), (forecast, forecast_run) = outputs["hold"], outputs["forecast1"]
    skipped = forecast_run.skipped_steps
    assert skipped and skipped == hold_run.skipped_steps        # reuse never changes the decisions here
    exact = [model_out for model_out in (_LinearInStep()(torch.zeros(1, 4, 8, 8), t)[0] for t in td.scheduler(steps).timesteps)]
    for k in range(steps):
        if k in skipped and k - 1 not in skipped:
            # two computed steps before it: the extrapolation is exact, the held value is not
            with torch.no_grad():
                assert torch.allclose(forecast[k], exact[k].detach(), atol=1e-6)
                assert not torch.allclose(hold[k], exact[k].detach(), atol=1e-6)
    with pytest.raises(ValueError, match="reuse must be one of"):
        apply_adaptive_skip(td.unet(), reuse="taylor", num_inference_steps=4)


class _QuadraticInStep(_LinearInStep):
    """Output quadratic in the timestep."""

    def forward(self, sample, timestep, **kwargs):
        t = torch.as_tensor(timestep, dtype=sample.dtype).reshape(-1)[0]
        return (torch.ones_like(sample) * self.scale * (t / 100) ** 2,)


def test_max_skip_1_at_delta_1_skips_every_other_step_and_forecasts_it():
    # The >= 1.5x setting of the benchmark (bench/results/quality_check.md): after the warm-up,
    # skips alternate, so every skipped step lies one step past a computed one.
    steps = 13
    sched = td.scheduler(steps)
    exact = [_QuadraticInStep()(torch.zeros(1, 4, 8, 8), t)[0].detach() for t in sched.timesteps]
    outputs = {}
    for reuse in ("forecast1", "forecast2"):
        model = _QuadraticInStep()
        handle = apply_adaptive_skip(model, delta=1.0, max_skip_steps=1, scheduler=td.scheduler(steps), reuse=reuse)
        x, outs = torch.zeros(1, 4, 8, 8), []
        with torch.no_grad():
            for k, t in enumerate(sched.timesteps):
                outs.append(model(x, t)[0])
                x = x + (k + 1) ** 0.5 * 0.01 * torch.ones_like(x)
        run = handle.finish_run()
        handle.remove()
        assert run.skipped_steps == [4, 6, 8, 10, 12]
        outputs[reuse] = outs
    for k in [4, 6, 8, 10, 12]:
        # TaylorSeer's finite differences lag half a gap, so neither order is exact on a parabola,
        # but order 2 removes the curvature term order 1 misses: its error is the smaller
        errors = {r: float((outputs[r][k] - exact[k]).abs().max()) for r in outputs}
        assert 0 < errors["forecast2"] < 0.8 * errors["forecast1"], (k, errors)
    for k in set(range(steps)) - {4, 6, 8, 10, 12}:
        assert torch.equal(outputs["forecast2"][k], exact[k])
