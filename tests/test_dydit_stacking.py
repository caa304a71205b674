"""DyDiT stacked with FORA (unit reuse) and AdaptiveDiffusion (step skipping), in either order.

A unit FORA reuses runs nothing, so DyDiT counts nothing for it; a unit FORA computes runs
sliced, exactly as with DyDiT alone. A step that step skipping skips runs no block.
"""
import pytest
import torch

import dydit_reference as ref
import tiny_diffusers as td
from cachekit import apply_adaptive_skip, apply_dydit, apply_fora, dit_from_official, remove_cache
from cachekit.core.dydit.official import convert
from cachekit.core.methods.fora import refresh_steps

STEPS = 8


def _model():
    return dit_from_official(convert(ref.random_official_state(heads=4, token_bias=1.0), "tiny"))


def _sample(model, sched, feed_back):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 10])
    outs = []
    with torch.no_grad():
        for t in sched.timesteps:
            out = model(x, timestep=t.expand(2), class_labels=y, return_dict=False)[0]
            outs.append(out)
            if feed_back:
                x = x - 0.05 * out[:, :4]
    return outs


@pytest.mark.parametrize("dydit_first", [True, False])
def test_fora_reused_units_run_nothing_and_computed_units_run_sliced(dydit_first):
    model, routers = _model()
    sched = td.scheduler(STEPS)
    alone = apply_dydit(model, routers, scheduler=sched)
    expected = _sample(model, sched, feed_back=False)      # same input every step: outputs comparable per step
    alone.remove()
    if dydit_first:
        dydit = apply_dydit(model, routers, scheduler=sched)
        fora = apply_fora(model, interval=3, scheduler=sched)
    else:
        fora = apply_fora(model, interval=3, scheduler=sched)
        dydit = apply_dydit(model, routers, scheduler=sched)
    outs = _sample(model, sched, feed_back=False)
    refresh = refresh_steps(STEPS, 3)
    d, f = dydit.telemetry, fora.telemetry
    assert 0 < len(refresh) < STEPS
    for step in range(STEPS):
        if step in refresh:
            assert torch.equal(outs[step], expected[step])
            assert d.computed[step] == alone.telemetry.computed[step]
            assert d.head_sum[step] == alone.telemetry.head_sum[step]
            assert d.tokens_kept[step] == alone.telemetry.tokens_kept[step]
        else:
            assert sum(f.reused[step]) == 2 * 2 * len(model.transformer_blocks)     # attn + ff, batch 2
            assert sum(d.computed[step]) == 0 and sum(d.attn_samples[step]) == 0 and sum(d.mlp_samples[step]) == 0
            assert not torch.equal(outs[step], expected[step])
    assert d.executed_fraction() < 1.0
    if dydit_first:
        fora.remove()
        dydit.remove()
    else:
        dydit.remove()
        fora.remove()
    plain = _sample(model, sched, feed_back=False)
    model_alone = apply_dydit(model, routers, scheduler=sched)
    assert all(torch.equal(a, b) for a, b in zip(_sample(model, sched, feed_back=False), expected))
    model_alone.remove()
    assert all(torch.equal(a, b) for a, b in zip(_sample(model, sched, feed_back=False), plain))
    for module in model.modules():
        assert "forward" not in module.__dict__ and not type(module).__name__.startswith("CacheKit")


def test_a_skipped_step_runs_no_block():
    model, routers = _model()
    sched = td.scheduler(12)
    dydit = apply_dydit(model, routers, scheduler=sched)
    skip = apply_adaptive_skip(model, delta=10.0, max_skip_steps=2, scheduler=sched)
    _sample(model, sched, feed_back=True)
    skipped = skip.telemetry.skipped_steps
    assert skipped
    d = dydit.telemetry
    assert sorted(d.skipped_steps) == sorted(skipped)
    for step in range(12):
        ran = sum(d.attn_samples[step])
        assert (ran == 0) == (step in skipped)
    remove_cache(model)          # the step skip and DyDiT
    assert "forward" not in model.__dict__ and not hasattr(model, "_cachekit_dydit")
    assert all(type(b.attn1.processor).__name__ == "AttnProcessor2_0" for b in model.transformer_blocks)
