"""The diffusers API: exactness at interval 1, the exact units executed at interval N, removal."""
import pytest
import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

import tiny_diffusers as td
from cachekit import apply_deepcache, apply_fora, remove_cache
from cachekit.diffusers_host.units import unet_units


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _count_calls(monkeypatch, classes):
    counts = {c.__name__: 0 for c in classes}
    for cls in classes:
        original = cls.forward

        def counted(self, *args, __orig=original, __name=cls.__name__, **kwargs):
            counts[__name] += 1
            return __orig(self, *args, **kwargs)
        monkeypatch.setattr(cls, "forward", counted)
    return counts


def _clock_kwargs(kind, steps):
    # Flux is driven with sigma-like timesteps that are not the scheduler's: use step counting.
    return {"num_inference_steps": steps} if kind == "flux" else {"scheduler": td.scheduler(steps)}


@pytest.mark.parametrize("kind", ["unet", "dit", "pixart", "sd3", "flux"])
def test_interval_1_is_bit_identical_and_remove_restores(kind):
    model = td.BUILDERS[kind]()
    sched = td.scheduler(6)
    reference = td.sample(kind, model, sched)
    apply = apply_deepcache if kind == "unet" else apply_fora
    params = {"cache_interval": 1} if kind == "unet" else {"interval": 1}
    handle = apply(model, **params, **_clock_kwargs(kind, 6))
    assert _equal(td.sample(kind, model, sched), reference)
    assert handle.telemetry.hit_rate == 0.0
    handle.remove()
    assert _equal(td.sample(kind, model, sched), reference)
    assert not any(type(m).__name__.startswith("CacheKit") for m in model.modules())


def test_deepcache_executes_exactly_the_scheduled_layers(monkeypatch):
    model = td.unet()
    sched = td.scheduler(7)
    counts = _count_calls(monkeypatch, [ResnetBlock2D, Transformer2DModel, Downsample2D, Upsample2D])
    handle = apply_deepcache(model, cache_interval=3, cache_branch=0, scheduler=sched)
    outs = td.sample("unet", model, sched)
    # Per full U-Net call: 4+6 resnets, 2+3 transformers (+1 mid each), 1 down-, 1 upsampler.
    full = {"ResnetBlock2D": 12, "Transformer2DModel": 6, "Downsample2D": 1, "Upsample2D": 1}
    # Branch 0 on cache steps: only up block 0's last layer (resnet + attention) runs.
    cached = {"ResnetBlock2D": 1, "Transformer2DModel": 1, "Downsample2D": 0, "Upsample2D": 0}
    full_steps, cache_steps = 3, 4      # steps 0, 3, 6 full
    for name in full:
        assert counts[name] == full_steps * full[name] + cache_steps * cached[name], name
    t = handle.telemetry
    # 18 units (12 resnets, 5 attentions... as unit slots); on cache steps all but 2 are reused.
    assert len(t.unit_names) == 18
    assert t.step_hit_rates() == [0.0, 16 / 18, 16 / 18, 0.0, 16 / 18, 16 / 18, 0.0]
    handle.remove()
    assert not _equal(outs, td.sample("unet", model, sched))   # caching changed something


def test_deepcache_cache_steps_match_a_manual_feature_reuse(monkeypatch):
    """On a cache step the output equals running the shallow path on the stored deep features."""
    model = td.unet()
    sched = td.scheduler(6)       # more than 4 steps: a few-step schedule reuses only from its middle
    inputs = td.inputs("unet", model)
    t0, t1 = sched.timesteps[:2]
    with torch.no_grad():
        handle = apply_deepcache(model, cache_interval=2, scheduler=sched)
        model(**inputs, timestep=t0)
        cached_out = model(**inputs, timestep=t1).sample
        handle.remove()
        # Manual: record the deep features at t0, then at t1 recompute only the live layers.
        live = {"up.0.resnets.0", "up.0.attentions.0"}
        units, slots, _ = unet_units(model)
        stored = {}
        hooks = []
        for unit, slot in zip(units.units, slots):
            module = slot.get()
            hooks.append(module.register_forward_hook(lambda m, a, o, n=unit.name: stored.__setitem__(n, o)))
        model(**inputs, timestep=t0)
        for h in hooks:
            h.remove()
        hooks = [slot.get().register_forward_hook(lambda m, a, o, n=unit.name: None if n in live else stored[n])
                 for unit, slot in zip(units.units, slots)]
        manual = model(**inputs, timestep=t1).sample
        for h in hooks:
            h.remove()
    assert torch.allclose(cached_out, manual, atol=1e-6)


@pytest.mark.parametrize("kind", ["dit", "pixart", "sd3", "flux"])
def test_fora_reuses_attention_and_mlp_between_refreshes(kind, monkeypatch):
    model = td.BUILDERS[kind]()
    steps = 8
    reference = td.sample(kind, model, td.scheduler(steps))
    counts = _count_calls(monkeypatch, [Attention, FeedForward])
    per_call = {"Attention": 0, "FeedForward": 0}
    td.sample(kind, model, td.scheduler(1))
    per_call = dict(counts)
    counts.update({k: 0 for k in counts})
    handle = apply_fora(model, interval=3, **_clock_kwargs(kind, steps))
    outs = td.sample(kind, model, td.scheduler(steps))
    refreshes = sorted({0, 1, 4, 7})   # countdown rule for 8 steps, interval 3
    assert counts == {k: v * len(refreshes) for k, v in per_call.items()}
    t = handle.telemetry
    assert [i for i, r in enumerate(t.step_hit_rates()) if r == 0.0] == refreshes
    assert all(r == 1.0 for i, r in enumerate(t.step_hit_rates()) if i not in refreshes)
    for i in refreshes[:2]:
        assert torch.equal(outs[i], reference[i])      # identical until the first reuse
    assert not torch.equal(outs[2], reference[2])
    handle.remove()


def test_fora_gates_use_the_current_conditioning():
    """Reused steps still apply the current timestep's adaLN gates: outputs differ by timestep."""
    model = td.dit()
    sched = td.scheduler(6)
    handle = apply_fora(model, interval=10, scheduler=sched)
    x = td.inputs("dit", model)
    with torch.no_grad():
        a = model(**x, timestep=sched.timesteps[0].expand(2)).sample
        b = model(**x, timestep=sched.timesteps[1].expand(2)).sample
    assert handle.telemetry.step_hit_rates()[1] == 1.0
    assert not torch.equal(a, b)
    handle.remove()


def test_new_run_starts_clean_and_telemetry_is_kept():
    model = td.dit()
    sched = td.scheduler(6)
    handle = apply_fora(model, interval=2, scheduler=sched)
    first = td.sample("dit", model, sched)
    second = td.sample("dit", model, sched)
    assert _equal(first, second)                  # the second run did not reuse the first's cache
    handle.finish_run()
    assert len(handle.runs) == 2 and handle.runs[0].hit_rate == handle.runs[1].hit_rate > 0
    assert handle.runs[1].executed_fraction() < 1.0
    remove_cache(model)
    assert handle.session is None


def test_errors_are_clear():
    with pytest.raises(ValueError, match="DeepCache needs a U-Net"):
        apply_deepcache(td.dit(), num_inference_steps=4)
    with pytest.raises(ValueError, match="FORA does not know the diffusers model UNet2DConditionModel"):
        apply_fora(td.unet(), num_inference_steps=4)
    with pytest.raises(ValueError, match="num_inference_steps"):
        apply_fora(td.dit())
    model = td.dit()
    apply_fora(model, num_inference_steps=4)
    with pytest.raises(ValueError, match="already has a CacheKit method"):
        apply_fora(model, num_inference_steps=4)
    with pytest.raises(ValueError, match="cache_branch 40 is deeper"):
        apply_deepcache(td.unet(), cache_branch=40, num_inference_steps=4)
