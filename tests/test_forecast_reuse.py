"""Forecast reuse (TaylorSeer) as an option of DeepCache and FORA, on tiny diffusers models."""
import pytest
import torch

import tiny_diffusers as td
from cachekit import apply_deepcache, apply_fora
from cachekit.core import autotune as core_autotune
from cachekit.core.methods import registry
from cachekit.core.methods.deepcache import DeepCacheConfig, DeepCachePolicy
from cachekit.core.methods.fora import ForaConfig, ForaPolicy, refresh_steps
from cachekit.core.reuse import HOLD, Forecast

STEPS = 10      # FORA interval 3 over 10 steps refreshes at 0, 3, 6, 9


def _fora_run(reuse, interval=3, record=False):
    """Sample the tiny DiT with FORA; with `record`, every output of the first block's attn1 unit
    (computed or reused) per step, read by a hook on the unit's module."""
    torch.manual_seed(0)
    model = td.dit()
    sched = td.scheduler(STEPS)
    kwargs = {} if reuse is None else {"reuse": reuse}          # None: the default
    handle = apply_fora(model, interval=interval, scheduler=sched, **kwargs)
    seen, hooks = [], []
    if record:
        step = [-1]
        hooks.append(model.register_forward_pre_hook(lambda *_: step.__setitem__(0, step[0] + 1)))
        hooks.append(model.transformer_blocks[0].attn1.register_forward_hook(
            lambda m, a, out: seen.append((step[0], out.detach().clone()))))
    outs = td.sample("dit", model, sched)
    for hook in hooks:
        hook.remove()
    telemetry = handle.telemetry
    handle.remove()
    return torch.stack(outs), telemetry, dict(seen)


def test_reuse_is_validated_with_the_choices_named():
    for make in (lambda: ForaConfig(reuse="taylor"), lambda: DeepCacheConfig(reuse="forecast3"),
                 lambda: apply_fora(td.dit(), reuse="Hold", num_inference_steps=4),
                 lambda: apply_deepcache(td.unet(), reuse="", num_inference_steps=4)):
        with pytest.raises(ValueError, match=r"reuse must be one of \('hold', 'forecast1', 'forecast2'\)"):
            make()


def test_policies_expose_the_strategy_and_hold_is_the_default():
    assert ForaPolicy(ForaConfig()).reuse is HOLD and DeepCachePolicy(DeepCacheConfig()).reuse is HOLD
    assert ForaPolicy(ForaConfig(reuse="forecast1")).reuse == Forecast(1)
    assert DeepCachePolicy(DeepCacheConfig(reuse="forecast2")).reuse == Forecast(2)


def test_registry_node_widgets_and_ladders_offer_reuse_last():
    for key in ("deepcache", "fora"):
        spec = registry.get(key)
        last = spec.settings[-1]
        assert last.name == "reuse" and last.type == "combo" and last.default == "hold"
        assert last.options == ("hold", "forecast1", "forecast2") and "TaylorSeer" in last.tooltip
        candidates = [c for ladder in core_autotune.ladders(key) for c in ladder]
        assert {c["reuse"] for c in candidates} == {"hold", "forecast1", "forecast2"}
        assert core_autotune.ladders(key)[0][0]["reuse"] == "hold"          # the cheapest first
        for c in candidates:
            spec.make_config(c)                                             # every candidate is valid


def test_fora_hold_default_is_unchanged_and_reused_outputs_are_the_last_refresh():
    default, _, seen = _fora_run(None, record=True)
    explicit, _, _ = _fora_run("hold")
    assert torch.equal(default, explicit)
    assert refresh_steps(STEPS, 3) == {0, 3, 6, 9}
    for s, last in ((1, 0), (2, 0), (4, 3), (5, 3), (7, 6), (8, 6)):
        assert torch.equal(seen[s], seen[last])


def test_fora_forecast1_extrapolates_each_unit_from_its_last_two_refreshes():
    hold, _, _ = _fora_run("hold")
    out, _, f = _fora_run("forecast1", record=True)
    assert len(f) == STEPS and torch.isfinite(out).all()
    assert not torch.equal(out, hold)
    # one refresh so far: hold
    assert torch.equal(f[1], f[0]) and torch.equal(f[2], f[0])
    # f(s) = f(r) + (s - r) * (f(r) - f(r')) / (r - r'), r' < r the last two refreshes
    for s, r, prev in ((4, 3, 0), (5, 3, 0), (7, 6, 3), (8, 6, 3)):
        expected = f[r] + (s - r) * (f[r] - f[prev]) / (r - prev)
        torch.testing.assert_close(f[s], expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(f[s], f[r])


def test_fora_forecast2_is_second_order_taylor():
    _, _, f = _fora_run("forecast2", record=True)
    d1 = lambda a, b: (f[a] - f[b]) / (a - b)
    for s in (7, 8):
        first, before = d1(6, 3), d1(3, 0)
        second = (first - before) / 3
        expected = f[6] + (s - 6) * first + (s - 6) ** 2 / 2 * second
        torch.testing.assert_close(f[s], expected, rtol=1e-5, atol=1e-6)
    # at 4 and 5 only two refreshes exist: first order
    torch.testing.assert_close(f[4], f[3] + d1(3, 0), rtol=1e-5, atol=1e-6)


def test_forecast_keeps_order_plus_one_tensors_per_unit():
    _, hold, _ = _fora_run("hold")
    _, one, _ = _fora_run("forecast1")
    _, two, _ = _fora_run("forecast2")
    assert hold.cache_bytes > 0
    assert one.cache_bytes / hold.cache_bytes == pytest.approx(2.0, rel=0.05)
    assert two.cache_bytes / hold.cache_bytes == pytest.approx(3.0, rel=0.05)
    assert two.cache_bytes / one.cache_bytes == pytest.approx(1.5, rel=0.05)
    assert hold.hit_rate == one.hit_rate == two.hit_rate > 0          # same schedule, only the values differ


def test_fora_forecast_at_interval_1_equals_unpatched():
    torch.manual_seed(0)
    reference = torch.stack(td.sample("dit", td.dit(), td.scheduler(STEPS)))
    out, _, _ = _fora_run("forecast2", interval=1)
    assert torch.equal(out, reference)


def _deepcache_run(reuse):
    torch.manual_seed(0)
    model = td.unet()
    sched = td.scheduler(STEPS)
    handle = apply_deepcache(model, cache_interval=3, reuse=reuse, scheduler=sched)
    out = torch.stack(td.sample("unet", model, sched))
    telemetry = handle.telemetry
    handle.remove()
    return out, telemetry


def test_deepcache_forecast_runs_differs_from_hold_and_stays_finite():
    hold, hold_t = _deepcache_run("hold")
    assert torch.equal(hold, _deepcache_run("hold")[0])
    for reuse, ratio in (("forecast1", 2.0), ("forecast2", 3.0)):
        out, t = _deepcache_run(reuse)
        assert torch.isfinite(out).all() and not torch.equal(out, hold)
        assert t.hit_rate == hold_t.hit_rate
        assert t.cache_bytes / hold_t.cache_bytes == pytest.approx(ratio, rel=0.05)
