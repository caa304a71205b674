"""Learned routers with forecast reuse (TaylorSeer): applied per unit from each unit's own refresh
history, and trained so that a gate blends with what the runtime would reuse."""
import copy

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

from cachekit import apply_router
from cachekit.core.methods.router import RouterPolicy
from cachekit.core.reuse import HOLD, Forecast
from cachekit.core.routers import Router, RouterError, load_router, save_router
from cachekit.core.routers.train import SoftUnits, TrainConfig, load_checkpoint, rollout
from cachekit.diffusers_host.train import diffusers_sampler, train_router
from cachekit.diffusers_host.units import dit_units

BUNDLED_ROUTER = "dit_router_harmonica_25.safetensors"


def _tiny_dit():
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=3,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def _router(recompute: torch.Tensor, method="harmonica") -> Router:
    """A router taking exactly these decisions ([steps, units] bool, True = recompute)."""
    logits = torch.where(recompute, torch.tensor(5.0), torch.tensor(-5.0))
    return Router(logits, method, "dit", recompute.shape[1] // 2, ("attn", "mlp"), "ddim", [], 0.5, "test")


def _scheduler(steps):
    s = DDIMScheduler()
    s.set_timesteps(steps)
    return s


# -- apply -------------------------------------------------------------------------------------------
def _bundled_run(reuse, images=2, steps=25):
    from cachekit.tinymodels.bundled import WEIGHTS, load
    from cachekit.tinymodels.sampling import make_scheduler, sample
    denoiser = load("dit")
    scheduler = make_scheduler(steps)
    kwargs = {} if reuse is None else {"reuse": reuse}
    handle = apply_router(denoiser.network, WEIGHTS / BUNDLED_ROUTER, scheduler=scheduler, **kwargs)
    out = sample(denoiser, torch.arange(images) % 4, steps=steps, scheduler=scheduler)
    telemetry = handle.finish_run()
    policy = handle.policy
    handle.remove()
    return out, telemetry, policy


def test_bundled_router_with_forecast_differs_from_hold_and_stays_finite():
    default, default_t, default_policy = _bundled_run(None)
    hold, hold_t, hold_policy = _bundled_run("hold")
    assert default_policy.reuse is HOLD and hold_policy.reuse is HOLD      # an older router file: hold
    assert torch.equal(default, hold)
    for reuse, strategy in (("forecast1", Forecast(1)), ("forecast2", Forecast(2))):
        out, t, policy = _bundled_run(reuse)
        assert policy.reuse == strategy
        assert torch.isfinite(out).all() and not torch.equal(out, hold)
        assert t.reused == hold_t.reused and t.hit_rate > 0               # same decisions, other values


class _LinearInStep(torch.nn.Module):
    """Stands in for an attention: output a + k * b at sampling step k (a unit linear in the step)."""

    def __init__(self, step: list, dim: int):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.step = step
        self.a, self.b = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g,
                                                                                           dtype=torch.float64)

    def forward(self, hidden_states, *args, **kwargs):
        value = (self.a + self.step[0] * self.b).to(hidden_states.dtype)
        return value.expand_as(hidden_states).clone()


STEPS = 8
COMPUTED_AT = (0, 2, 5)           # block 0's attention computes at these steps, is reused at the others


def _linear_unit_run(reuse):
    model = _tiny_dit()
    step = [-1]
    model.transformer_blocks[0].attn1 = _LinearInStep(step, 16)
    recompute = torch.ones(STEPS, 6, dtype=torch.bool)
    recompute[:, 0] = torch.tensor([k in COMPUTED_AT for k in range(STEPS)])
    scheduler = _scheduler(STEPS)
    handle = apply_router(model, _router(recompute), scheduler=scheduler, reuse=reuse)
    seen = {}
    hooks = [model.register_forward_pre_hook(lambda *_: step.__setitem__(0, step[0] + 1)),
             model.transformer_blocks[0].attn1.register_forward_hook(
                 lambda m, a, out: seen.__setitem__(step[0], out[0, 0].double().clone()))]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in scheduler.timesteps:
            model(x, timestep=t.expand(1), class_labels=torch.tensor([1]))
    run = handle.finish_run()
    for hook in hooks:
        hook.remove()
    handle.remove()
    assert [row[0] > 0 for row in run.reused] == [k not in COMPUTED_AT for k in range(STEPS)]
    unit = model.transformer_blocks[0].attn1
    exact = {k: (unit.a + k * unit.b).float().double() for k in range(STEPS)}
    return seen, exact


def test_a_unit_linear_in_the_step_is_extrapolated_exactly_by_forecast_and_held_by_hold():
    hold, exact = _linear_unit_run("hold")
    for s, last in ((1, 0), (3, 2), (4, 2), (6, 5), (7, 5)):
        assert torch.equal(hold[s], exact[last])                        # the last computed value, as before
    for reuse in ("forecast1", "forecast2"):
        seen, exact = _linear_unit_run(reuse)
        assert torch.equal(seen[1], exact[0])                            # one refresh so far: held
        for s in (3, 4, 6, 7):                                           # from two (or three) refreshes
            torch.testing.assert_close(seen[s], exact[s], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(seen[s], hold[s])


def test_reuse_is_validated_and_an_override_beats_the_routers_own():
    router = _router(torch.ones(STEPS, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"reuse must be one of \('hold', 'forecast1', 'forecast2'\)"):
        apply_router(_tiny_dit(), router, reuse="taylor", num_inference_steps=STEPS)
    with pytest.raises(RouterError, match="router reuse must be one of"):
        Router(router.logits, "harmonica", "dit", 3, ("attn", "mlp"), reuse="forecast3")
    forecast_router = copy.deepcopy(router)
    forecast_router.reuse = "forecast2"
    assert RouterPolicy(forecast_router).reuse == Forecast(2)            # the router's own by default
    assert RouterPolicy(forecast_router, reuse_name="hold").reuse is HOLD
    assert RouterPolicy(router).reuse is HOLD and RouterPolicy(router, None, "forecast1").reuse == Forecast(1)


def test_router_files_record_their_reuse_and_older_files_load_as_hold(tmp_path):
    from safetensors.torch import save_file
    router = _router(torch.rand(STEPS, 6, generator=torch.Generator().manual_seed(1)) > 0.5)
    router.reuse = "forecast1"
    loaded = load_router(save_router(router, tmp_path / "f.safetensors"))
    assert loaded.reuse == "forecast1" and torch.equal(loaded.logits, router.logits)
    old = {k: v for k, v in router.metadata().items() if k != "reuse"}   # written before reuse was recorded
    save_file({"logits": router.logits}, str(tmp_path / "old.safetensors"), metadata=old)
    assert load_router(tmp_path / "old.safetensors").reuse == "hold"
    handle = apply_router(_tiny_dit(), tmp_path / "f.safetensors", num_inference_steps=STEPS)
    assert handle.policy.reuse == Forecast(1)
    handle.remove()
    save_file({"logits": router.logits}, str(tmp_path / "bad.safetensors"), metadata={**old, "reuse": "taylor"})
    with pytest.raises(RouterError, match="reuse"):
        load_router(tmp_path / "bad.safetensors")


# -- train -------------------------------------------------------------------------------------------
def _make_batch(g, batch):
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)


def _call(m, x, t, labels):
    return m(x, timestep=t.expand(x.shape[0]), class_labels=labels, return_dict=False)[0][:, :4]


@pytest.mark.parametrize("reuse", ["hold", "forecast1", "forecast2"])
def test_soft_rollout_with_hard_decisions_is_the_runtimes_sampling(reuse):
    """The value a training gate blends with is the runtime's reused value: with 0/1 weights the
    training rollout takes the router's decisions, and its samples equal apply_router's."""
    steps = 7
    recompute = torch.rand(steps, 6, generator=torch.Generator().manual_seed(3)) > 0.6
    router = _router(recompute)
    base = _tiny_dit()
    x, labels = _make_batch(torch.Generator().manual_seed(4), 2)

    trainee = copy.deepcopy(base)
    _, slots = dit_units(trainee)
    soft = SoftUnits([slot.get() for slot in slots], 0.5, reuse)
    sampler = diffusers_sampler(trainee, DDIMScheduler(), steps, _make_batch, _call)
    routing = [None] + [recompute[k].float() for k in range(1, steps)]
    trained = rollout(soft, sampler, x, labels, routing)
    soft.remove()

    model = copy.deepcopy(base)
    scheduler = _scheduler(steps)
    handle = apply_router(model, router, scheduler=scheduler, reuse=reuse)
    y = x
    with torch.no_grad():
        for t in scheduler.timesteps:
            y = scheduler.step(_call(model, y, t, labels), t, y).prev_sample
    run = handle.finish_run()
    handle.remove()
    assert sum(map(sum, run.reused)) > 0
    torch.testing.assert_close(trained, y, rtol=1e-6, atol=1e-6)
    if reuse != "hold":                                              # and forecasting changed something
        held = _hold_runtime(base, router, x, labels, steps)
        assert not torch.allclose(y, held)


def _hold_runtime(base, router, x, labels, steps):
    model = copy.deepcopy(base)
    scheduler = _scheduler(steps)
    handle = apply_router(model, router, scheduler=scheduler, reuse="hold")
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(_call(model, x, t, labels), t, x).prev_sample
    handle.remove()
    return x


class _Constant(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.value = None

    def forward(self, x):
        return self.value


def test_soft_units_reuse_what_the_strategy_makes_of_the_same_refresh_history():
    unit = _Constant()
    soft = SoftUnits([unit], 0.5, "forecast1")
    values = {k: torch.randn(3, generator=torch.Generator().manual_seed(k)) for k in range(6)}

    def call(mode, k, **state):
        soft.mode, soft.step = mode, k
        for name, v in state.items():
            setattr(soft, name, v)
        unit.value = values[k]
        return unit(None)
    call("full", 0)                                        # refresh at 0
    call("teacher", 1, refresh=[False])                    # computed, not a refresh (a reused step at runtime)
    call("teacher", 2, refresh=[True])                     # refresh at 2
    call("soft", 3, weights=torch.tensor([0.2]))           # reused (w < threshold): no refresh
    out = call("soft", 4, weights=torch.tensor([0.0]))     # pure reuse at 4
    strategy = Forecast(1)
    entry = strategy.refresh(strategy.refresh(None, values[0], 0), values[2], 2)
    assert torch.equal(out, strategy.output(entry, 4))
    torch.testing.assert_close(out, values[2] + 2 * (values[2] - values[0]) / 2)
    w = torch.tensor([0.7])
    mixed = call("soft", 5, weights=w)                     # w > threshold: blended, and a refresh
    assert torch.equal(mixed, w * values[5] + (1 - w) * strategy.output(entry, 5))
    assert soft.cache[0][0] == 5
    soft.remove()


def _train(method, reuse, tmp_path, iterations=3, resume=False, seed=0):
    from cachekit.bench.train_router_cli import bundled_dit
    model, scheduler, make_batch, call = bundled_dit()
    config = TrainConfig(method, num_steps=6, iterations=iterations, batch=1, lr=0.05, l1=1e-3, lambda_every=2,
                         seed=seed, reuse=reuse)
    losses = []
    router = train_router(model, scheduler, make_batch, call, config, family="dit",
                          checkpoint=tmp_path / f"{method}-{reuse}.ckpt.pt", resume=resume,
                          progress=lambda i, n, loss: losses.append(loss))
    return model, router, losses


@pytest.mark.parametrize("method", ["harmonica", "l2c"])
def test_training_for_forecast_learns_saves_its_reuse_and_applies_with_it(method, tmp_path):
    model, router, losses = _train(method, "forecast1", tmp_path)
    assert len(losses) == 3 and all(l == l and l > 0 for l in losses)
    initial = torch.randn(6, 12, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(router.logits, initial)                       # it learned something
    assert router.reuse == "forecast1" and "reuse forecast1" in router.source
    _, held, _ = _train(method, "hold", tmp_path)
    assert not torch.allclose(router.logits, held.logits)                   # the forecast reached the logits
    loaded = load_router(save_router(router, tmp_path / "r.safetensors"))
    assert loaded.reuse == "forecast1" and torch.equal(loaded.logits, router.logits)
    handle = apply_router(model, loaded, scheduler=_scheduler(6))
    assert handle.policy.reuse == Forecast(1)
    handle.remove()
    assert not any(m._forward_hooks for m in model.modules())


def test_resuming_a_checkpoint_for_another_reuse_is_refused(tmp_path):
    _train("l2c", "forecast1", tmp_path, iterations=1)
    checkpoint = tmp_path / "l2c-forecast1.ckpt.pt"
    assert load_checkpoint(checkpoint, 6, 12, "forecast1").reuse == "forecast1"
    with pytest.raises(ValueError, match="trained for reuse forecast1, this training is for hold"):
        load_checkpoint(checkpoint, 6, 12, "hold")
    saved = torch.load(checkpoint, weights_only=True)
    del saved["reuse"]                                                       # written before reuse was recorded
    torch.save(saved, checkpoint)
    assert load_checkpoint(checkpoint, 6, 12, "hold").reuse == "hold"
    with pytest.raises(ValueError, match="Router training: reuse must be one of"):
        TrainConfig(reuse="taylor")


def test_l2c_teacher_forcing_refreshes_at_the_runtimes_refresh_steps(tmp_path, monkeypatch):
    """Before routed step k: every unit refreshes at the full steps, and at earlier routed steps
    only the units the router computes there."""
    refreshes = []
    original = SoftUnits._keep

    def keep(self, index, value, unit_input):
        refreshes.append((self.step, index, self.mode))
        return original(self, index, value, unit_input)
    monkeypatch.setattr(SoftUnits, "_keep", keep)
    from cachekit.core.methods.router import routed_steps
    from cachekit.core.routers import train as train_module
    seen = {}
    original_update = train_module._update

    def update(loss, logits, optimizer, distributed):           # the first update: before any change
        seen.setdefault("logits", logits.detach().clone())
        seen.setdefault("refreshes", [(j, u) for j, u, mode in refreshes if mode in ("full", "teacher")])
        return original_update(loss, logits, optimizer, distributed)
    monkeypatch.setattr(train_module, "_update", update)
    routed = routed_steps("l2c", 6)
    later = 0
    for seed in range(6):                   # a few draws of the routed step k
        refreshes.clear()
        seen.clear()
        _train("l2c", "forecast1", tmp_path / str(seed), iterations=1, seed=seed)
        logits, log = seen["logits"], seen["refreshes"]
        k = max(step for step, _ in log) + 1
        assert routed[k]
        decide = torch.sigmoid(logits) > 0.5
        expected = {(j, u) for j in range(k) for u in range(12) if not routed[j] or decide[j, u]}
        assert set(log) == expected and len(log) == len(expected)
        later += any(routed[j] for j in range(k))
    assert later                            # some draw had an earlier routed step (a partial refresh)
