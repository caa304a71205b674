"""ChangeCache (core/methods/change.py): online, change-driven caching on U-Nets and DiTs."""
import pytest
import torch

import tiny_diffusers as td
from cachekit import apply, apply_change_cache
from cachekit.core.methods import registry
from cachekit.core.methods.change import ChangeConfig, ChangePolicy, ChangeState
from cachekit.core.methods.deepcache import deep_row
from cachekit.diffusers_host.units import dit_units, unet_units

STEPS = 12
KINDS = ("unet", "dit", "pixart", "sd3", "flux")


def _run(kind, record=False, **settings):
    """Sample a tiny diffusers model with ChangeCache. With `record`,
    the probe unit's value at every call, read by a hook on its module (independent of CacheKit)."""
    torch.manual_seed(0)
    model = td.BUILDERS[kind]()
    sched = td.scheduler(STEPS)
    handle = apply_change_cache(model, num_inference_steps=STEPS, **settings)
    probes, hooks = [], []
    if record:
        units, slots = (unet_units(model)[:2] if kind == "unet" else dit_units(model))
        probe_module = slots[0].get()
        hooks.append(probe_module.register_forward_hook(
            lambda m, a, out: probes.append((out[0] if isinstance(out, tuple) else out).detach().clone())))
    outs = td.sample(kind, model, sched)
    for hook in hooks:
        hook.remove()
    telemetry = handle.finish_run()
    handle.remove()
    return torch.stack(outs), telemetry, probes


@pytest.mark.parametrize("kind", KINDS)
def test_threshold_zero_equals_the_unpatched_model_exactly(kind):
    plain, _, _ = _run_plain(kind)
    cached, telemetry, _ = _run(kind, threshold=0.0, warmup_steps=0, max_reuse=0)
    assert torch.equal(plain, cached)
    assert telemetry.hit_rate == 0.0
    # every step past the first measured a change (the first has no reference yet)
    assert telemetry.probe_values[0] is None and all(v is not None for v in telemetry.probe_values[1:])


def _run_plain(kind):
    torch.manual_seed(0)
    model = td.BUILDERS[kind]()
    return torch.stack(td.sample(kind, model, td.scheduler(STEPS))), None, []


def _reference_decisions(probes, threshold, warmup, max_reuse):
    """FirstBlockCache's rule, written from diffusers' hooks/first_block_cache.py: compare the
    probe with its value at the last full step; plus CacheKit's warm-up and cap."""
    reference, streak, decisions, changes = None, 0, [], []
    for step, probe in enumerate(probes):
        change = None if reference is None else float((probe - reference).abs().mean() / reference.abs().mean())
        changes.append(change)
        reuse = (change is not None and step >= warmup and (max_reuse == 0 or streak < max_reuse)
                 and change < threshold)
        streak = streak + 1 if reuse else 0
        decisions.append(reuse)
        if not reuse:
            reference = probe
    return decisions, changes


@pytest.mark.parametrize("kind", KINDS)
def test_decisions_reproduce_the_first_block_cache_rule_and_only_the_probe_group_runs(kind):
    # A threshold in the middle of this model's step-to-step changes, so some steps reuse and some not.
    changes = sorted(v for v in _run(kind, threshold=0.0)[1].probe_values if v is not None)
    settings = dict(threshold=changes[len(changes) // 2] * 1.5, warmup_steps=1, max_reuse=2)
    _, telemetry, probes = _run(kind, record=True, **settings)
    assert len(probes) == STEPS                      # the probe unit ran at every step
    expected, changes = _reference_decisions(probes, settings["threshold"], settings["warmup_steps"],
                                             settings["max_reuse"])
    reused_steps = [sum(row) > 0 for row in telemetry.reused]
    assert reused_steps == expected
    assert any(expected) and not all(expected)      # the test can fail both ways
    for got, want in zip(telemetry.probe_values, changes):
        assert (got is None) == (want is None) and (got is None or abs(got - want) < 1e-5)
    # On a reused step exactly the skip row is reused; the probe always computes.
    model = td.BUILDERS[kind]()
    units = unet_units(model)[0] if kind == "unet" else dit_units(model)[0]
    skip = ChangePolicy(ChangeConfig()).skip_row(units)
    for step, reused in enumerate(expected):
        row = telemetry.reused[step]
        assert [n > 0 for n in row] == (skip if reused else [False] * len(skip))
        assert telemetry.computed[step][0] > 0


def test_the_skip_row_is_deepcache_deep_part_on_unets_and_the_other_blocks_on_dits():
    unet = unet_units(td.unet())[0]
    for branch in (0, 1):
        row = ChangePolicy(ChangeConfig(cache_branch=branch)).skip_row(unet)
        deep = deep_row(unet, branch)
        assert row == [d and u != 0 for u, d in enumerate(deep)] and not row[0]
    dit = dit_units(td.pixart())[0]
    row = ChangePolicy(ChangeConfig()).skip_row(dit)
    first_group = dit.units[0].group
    assert row == [u.group != first_group for u in dit.units] and any(row)
    with pytest.raises(ValueError, match="cache_branch 99 is deeper"):
        apply_change_cache(td.unet(), cache_branch=99, num_inference_steps=4)


def test_warmup_cap_and_window_bound_the_reuse():
    policy = ChangePolicy(ChangeConfig(threshold=1e9, warmup_steps=2, max_reuse=3, start_percent=0.0))
    state = ChangeState(range(0, 12))
    decisions = [policy.decide(state, k, None if k == 0 else torch.tensor(0.01)) for k in range(12)]
    # compute = True: steps 0, 1 warm up; then 3 reuses and one compute, twice; then reuses again
    assert decisions == [True, True, False, False, False, True, False, False, False, True, False, False]
    no_cap = ChangePolicy(ChangeConfig(threshold=1e9, warmup_steps=0, max_reuse=0))
    state = ChangeState(range(3, 8))      # the window: steps 3-7
    decisions = [no_cap.decide(state, k, torch.tensor(0.01)) for k in range(12)]
    assert decisions == [True] * 3 + [False] * 5 + [True] * 4
    # through the host: start/end percent become the window
    _, telemetry, _ = _run("dit", threshold=1e9, warmup_steps=0, max_reuse=0, start_percent=0.5)
    reused = [sum(row) > 0 for row in telemetry.reused]
    assert not any(reused[:STEPS // 2]) and all(reused[STEPS // 2:])


def test_bad_settings_name_the_problem_and_the_fix():
    for settings, match in (({"threshold": -0.1}, "threshold must be a number >= 0"),
                            ({"max_reuse": -1}, "max_reuse must be an integer >= 0"),
                            ({"reuse": "taylor"}, "reuse must be one of"),
                            ({"start_percent": 0.6, "end_percent": 0.5}, "must be below end_percent")):
        with pytest.raises(ValueError, match=match):
            apply_change_cache(td.dit(), num_inference_steps=4, **settings)


def test_forecast_reuse_extrapolates_on_reused_steps():
    hold, t_hold, _ = _run("dit", threshold=0.5, warmup_steps=1, max_reuse=2)
    forecast, t_forecast, _ = _run("dit", threshold=0.5, warmup_steps=1, max_reuse=2, reuse="forecast1")
    assert t_hold.reused == t_forecast.reused or t_forecast.hit_rate > 0
    assert torch.isfinite(forecast).all() and not torch.equal(hold, forecast)


def test_registry_host_and_cache_memory():
    spec = registry.get("change")
    assert spec.fits == "any" and spec.level == "unit" and spec.off == {"threshold": 0.0}
    model = td.dit()
    handle = apply(model, "change", threshold=0.5, num_inference_steps=STEPS)
    td.sample("dit", model, td.scheduler(STEPS))
    telemetry = handle.finish_run()
    handle.remove()
    assert telemetry.hit_rate > 0 and telemetry.cache_bytes > 0
    assert telemetry.probe_label and telemetry.as_dict()["probe_values"][1] is not None
