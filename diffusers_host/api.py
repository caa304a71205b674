"""One-call API for diffusers models.

    import cachekit
    handle = cachekit.apply_deepcache(pipe, cache_interval=3)   # a pipeline, or pipe.unet + scheduler=
    image = pipe(prompt, num_inference_steps=50).images[0]
    print(handle.telemetry.summary())
    handle.remove()                                               # the model is as before

The step of each model call comes from the scheduler, as the official DeepCache helper
(`DeepCacheSDHelper`) counts it: the first index of the call's timestep in
`scheduler.timesteps`. Schedulers that repeat timesteps (Heun) thus give both calls of a step
one index, and a run is anchored at its first call's index: img2img pipelines start part-way
into `scheduler.timesteps`, and a method's schedule (DeepCache's full steps, FORA's countdown,
the start/end window) counts from there, so DeepCache's full steps are where
`(index - first index) % N == 0`, bit-identical to the official helper. (ComfyUI's host keeps
its own, sigma-based step: see core/clock.py.) Without a scheduler, pass `num_inference_steps`:
a new step starts when the timestep changes, a new run when it goes up again or the steps are
used up. A run's state is dropped when the next run starts and when the handle is removed.
"""
from __future__ import annotations

import itertools
from typing import Any

import torch

from ..core.clock import StepClock, window_from_percent
from ..core.flops import FlopProfiler, lazy_profile
from ..core.guards import open_guarded_session
from ..core.lifecycle import RunLifecycle
from ..core.methods import DeepCacheConfig, DeepCachePolicy, ForaConfig, ForaPolicy
from ..core.methods.base import Policy
from ..core.proxy import make_proxy, restore_module
from ..core.session import CacheSession
from ..core.streams import SINGLE_STREAM, empty_from_specs, first_tensor, input_signature, tensor_specs
from ..core.telemetry import RunTelemetry
from ..core.units import UnitMap
from . import attach
from .units import DIT_LAYOUTS, UnitSlot, dit_units, is_unet, unet_units

_OWNER_IDS = itertools.count()
_HANDLE_ATTR = "_cachekit_handle"
STEP_SKIP_ATTR = "_cachekit_step_skip"   # a step-skip handle may sit on top of a unit cache


class RunRecorder:
    """A handle's runs, kept by its RunLifecycle: the run in progress and the last finished runs."""

    lifecycle: RunLifecycle

    @property
    def session(self) -> CacheSession | None:
        return self.lifecycle.session

    @property
    def runs(self) -> list[RunTelemetry]:
        return self.lifecycle.runs

    @property
    def telemetry(self) -> RunTelemetry | None:
        """The current run's telemetry, or the last finished run's."""
        return self.lifecycle.telemetry

    def finish_run(self) -> RunTelemetry | None:
        """End the current run now (it also ends when the next run starts)."""
        return self.lifecycle.close()


def call_timestep(args: tuple, kwargs: dict) -> float | None:
    """The timestep of a diffusers model call (keyword `timestep` or the second positional)."""
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    return float(torch.as_tensor(t).flatten()[0]) if t is not None else None


def _freeu_enabled(model: torch.nn.Module) -> bool:
    """diffusers' FreeU scales up-block features in place: stored values must then be copies."""
    return any(getattr(block, "b1", None) and getattr(block, "s1", None) for block in getattr(model, "up_blocks", ()))


class CacheHandle(RunRecorder):
    """A method applied to one diffusers model. `remove()` restores the model exactly."""

    def __init__(self, model: torch.nn.Module, units: UnitMap, slots: list[UnitSlot], policy: Policy,
                 start_percent: float, end_percent: float, scheduler: Any = None,
                 num_inference_steps: int | None = None, region_slots: list[UnitSlot] | None = None):
        self.model = model
        self.units = units
        self.policy = policy
        self.scheduler = scheduler
        self.num_inference_steps = num_inference_steps
        self.start_percent, self.end_percent = start_percent, end_percent
        self.owner = f"cachekit-diffusers-{next(_OWNER_IDS)}"
        self.lifecycle = RunLifecycle(self.owner, self._new_session)
        self._tracker = StepTracker(scheduler, num_inference_steps)
        # Units first, then regions around them: a region proxy shares the block's (patched) children.
        self._slots = list(slots) + list(region_slots or [])
        self._originals = [slot.get() for slot in self._slots]
        attach.check_model(model, self._originals)     # other caches' hooks: refused (diffusers_host/attach.py)
        proxies = [make_proxy(module, self.owner, index) for index, module in enumerate(self._originals[:len(slots)])]
        proxies += [make_proxy(module, self.owner, index, region=True)
                    for index, module in enumerate(self._originals[len(slots):])]
        for slot, proxy in zip(self._slots, proxies):
            slot.set(proxy)
        self._proxies = proxies
        self._hooks = [
            model.register_forward_pre_hook(attach.compile_safe(self._before_call), with_kwargs=True),
            model.register_forward_hook(attach.compile_safe(self._after_call), with_kwargs=True, always_call=True),
        ]
        self._scopes: list[Any] = []
        setattr(model, _HANDLE_ATTR, self)
        # A copy (deepcopy, pickle, torch.save) of the model is plain: no handle, no hooks.
        self._copy_token = attach.exclude_from_copies(model, attrs=(_HANDLE_ATTR,), hooks=self._hooks)

    def remove(self) -> None:
        self.finish_run()
        for telemetry in self.runs:       # profile while the units are still in place (not timed)
            telemetry.resolve_flops()
        for hook in self._hooks:
            hook.remove()
        for slot, original, proxy in reversed(list(zip(self._slots, self._originals, self._proxies))):
            restored = restore_module(original, proxy)
            if slot.get() is proxy:          # a module the user put there while patched stays
                slot.set(restored)
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)
        attach.include_again(self.model, self._copy_token)

    # -- per call --
    def _before_call(self, module, args, kwargs):
        session, sigma, new_run = self._session_for(call_timestep(args, kwargs))
        x = first_tensor(args) if args else first_tensor(kwargs)
        samples = x.shape[0] if x is not None else 1
        if new_run and x is not None:
            self._prepare_profile(session, args, kwargs, x)
        # The forward runs between the two hooks: the pre-hook opens the call's scope and the
        # forward hook (always_call, so also on an exception) closes it.
        scope = session.call_scope(sigma=sigma, layout=SINGLE_STREAM, samples=samples, call_input=x,
                                   protect=_freeu_enabled(self.model))
        scope.__enter__()
        self._scopes.append(scope)
        return None

    def _after_call(self, module, args, kwargs, output):
        if self._scopes:     # empty when the pre-hook failed (a router refused the steps)
            self._scopes.pop().__exit__(None, None, None)
        return None

    def _session_for(self, t: float | None) -> tuple[CacheSession, float | None, bool]:
        new_run, step, sigma = self._tracker.locate(t, self.session is not None)
        if new_run:
            self.lifecycle.open()
        return self.session, sigma, new_run

    def _new_session(self) -> CacheSession:
        window = self._tracker.window(self.start_percent, self.end_percent)
        return self._tracker.open_session(self.owner, self.units, self.policy, window)

    def _prepare_profile(self, session: CacheSession, args: tuple, kwargs: dict, x: torch.Tensor) -> None:
        """Known FLOP profile: use it. Unknown: record the call's input shapes, so a report can
        replay the call on fake tensors after the run (core/flops.py)."""
        key = (self.model, input_signature(x, SINGLE_STREAM))
        known = FlopProfiler.lookup(key)
        if known is not None:
            session.telemetry.unit_flops, session.telemetry.call_flops = known
            return
        specs = tensor_specs((args, kwargs))

        def replay():
            # The class's forward: neither this handle's hooks nor a step skip's wrapper take part.
            fake_args, fake_kwargs = empty_from_specs(specs)
            with torch.no_grad():
                type(self.model).forward(self.model, *fake_args, **fake_kwargs)

        session.telemetry.flop_source = lazy_profile(session, key, x.shape[0], replay)


class StepTracker:
    """Which run and step a model call belongs to, from its timestep.

    With a scheduler: the first index of the timestep in scheduler.timesteps (as the official
    DeepCache helper); a new run starts when the index goes back or the schedule's length
    changes, and `first_step` is the index of its first call. Without: a new step starts when
    the timestep changes, a new run when it goes up or num_inference_steps are used up.
    The run's clock is a stand-in schedule n, n-1, ..., 0 whose step i is at "sigma" n - i:
    timesteps may repeat (Heun) and a clock needs strictly decreasing values.
    """

    def __init__(self, scheduler: Any = None, num_inference_steps: int | None = None):
        if scheduler is None and num_inference_steps is None:
            raise ValueError("Pass the pipeline (or scheduler=pipe.scheduler), or num_inference_steps, "
                             "so CacheKit knows the step of each model call.")
        self.scheduler = scheduler
        self.num_inference_steps = num_inference_steps
        self.clock: StepClock | None = None
        self._last_t: float | None = None
        self._step = -1
        self.first_step = 0

    @property
    def num_steps(self) -> int:
        return self.clock.num_steps

    def window(self, start_percent: float, end_percent: float) -> range:
        """The current run's steps in [start_percent, end_percent), counted from the run's first
        call (img2img starts part-way down the schedule)."""
        first = self.first_step
        rest = window_from_percent(self.num_steps - first, start_percent, end_percent)
        return range(first + rest.start, first + rest.stop)

    def open_session(self, owner: str, units: UnitMap, policy: Policy, window: range) -> CacheSession:
        """The run's session, with the few-step and noisy-sampler guards (core/guards.py)."""
        sampler = type(self.scheduler).__name__ if self.scheduler is not None else None
        return open_guarded_session(owner, units, policy, self.clock, window, sampler=sampler,
                                    injects_noise=scheduler_injects_noise(self.scheduler))

    def locate(self, t: float | None, in_run: bool) -> tuple[bool, int, float | None]:
        """(new run?, step, the sigma-like value the run's clock maps to that step)."""
        if self.scheduler is not None:
            timesteps = [float(v) for v in torch.as_tensor(self.scheduler.timesteps).flatten()]
            step = _index_of(timesteps, t)
            new_run = not in_run or step < self._step or self.clock is None or len(timesteps) != self.clock.num_steps
            num_steps = len(timesteps)
        else:
            changed = t != self._last_t
            step = self._step + 1 if changed else self._step
            new_run = (not in_run or (t is not None and self._last_t is not None and t > self._last_t)
                       or step >= self.num_inference_steps)
            if new_run:
                step = 0
            num_steps = self.num_inference_steps
        if new_run:
            self.clock = StepClock([float(num_steps - i) for i in range(num_steps + 1)])
            self.first_step = step
        self._step, self._last_t = step, t
        return new_run, step, float(num_steps - step)


# diffusers schedulers that add fresh noise at every step (besides every *Ancestral* one); DDIM
# with eta > 0 does too, but eta is an argument of each pipeline call, which a hook never sees.
_NOISY_SCHEDULERS = frozenset({"DDPMScheduler", "DDPMParallelScheduler", "DDPMWuerstchenScheduler", "LCMScheduler",
                               "TCDScheduler", "DPMSolverSDEScheduler", "CMStochasticIterativeScheduler",
                               "ScoreSdeVeScheduler"})


def scheduler_injects_noise(scheduler: Any) -> bool:
    """Whether this scheduler adds fresh noise at every step (an SDE / ancestral sampler)."""
    if scheduler is None:
        return False
    name = type(scheduler).__name__
    algorithm = str(getattr(getattr(scheduler, "config", None), "algorithm_type", None) or "")
    return "Ancestral" in name or name in _NOISY_SCHEDULERS or algorithm.startswith("sde-")


def _index_of(timesteps: list[float], t: float | None) -> int:
    if t is None:
        raise ValueError("CacheKit could not read the timestep of a model call.")
    # The nearest timestep, and of equal ones the first (as list.index): a repeated timestep
    # (Heun) is one step.
    best = min(range(len(timesteps)), key=lambda i: (abs(timesteps[i] - t), i))
    if abs(timesteps[best] - t) > 1e-3 * max(1.0, abs(t)):
        raise ValueError(f"Timestep {t} is not in the scheduler's timesteps; call scheduler.set_timesteps "
                         "before sampling, or pass num_inference_steps instead of the scheduler.")
    return best


def _resolve(target: Any, scheduler: Any) -> tuple[torch.nn.Module, Any]:
    """Accept a pipeline (take its unet / transformer and scheduler) or a bare model."""
    if isinstance(target, torch.nn.Module):
        return target, scheduler
    model = getattr(target, "unet", None) or getattr(target, "transformer", None)
    if model is None:
        raise ValueError("Pass a diffusers pipeline with a unet or transformer, or the model itself.")
    return model, scheduler if scheduler is not None else getattr(target, "scheduler", None)


def _check_free(model: torch.nn.Module) -> None:
    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise ValueError("This model already has a CacheKit method applied; call remove() on its handle first.")


def apply_deepcache(target: Any, *, cache_interval: int = 3, cache_branch: int = 0, schedule: str = "uniform",
                    center: int = 15, power: float = 1.4, start_percent: float = 0.0, end_percent: float = 1.0,
                    reuse: str = "hold", scheduler: Any = None,
                    num_inference_steps: int | None = None) -> CacheHandle:
    """DeepCache on a diffusers U-Net (UNet2DConditionModel and relatives).

    `reuse`: "hold" (default, the published method) reuses the deep features of the last full
    step; "forecast1" / "forecast2" extrapolate them instead (TaylorSeer: a Taylor expansion of
    order 1 or 2 whose derivatives are divided differences over the steps between the last
    refreshes). Forecast keeps order + 1 tensors per stored unit (2 or 3 times hold's cache
    memory), reported in `telemetry.cache_bytes`."""
    model, scheduler = _resolve(target, scheduler)
    if not is_unet(model):
        raise ValueError(f"DeepCache needs a U-Net (down_blocks / mid_block / up_blocks); got {type(model).__name__}. "
                         "For transformers use apply_fora.")
    _check_free(model)
    config = DeepCacheConfig(cache_interval, cache_branch, schedule, center, power, start_percent, end_percent, reuse)
    units, slots, region_slots = unet_units(model)
    policy = DeepCachePolicy(config)
    policy.validate(units)
    return CacheHandle(model, units, slots, policy, start_percent, end_percent, scheduler, num_inference_steps,
                       region_slots)


def apply_fora(target: Any, *, interval: int = 3, start_percent: float = 0.0, end_percent: float = 1.0,
               reuse: str = "hold", scheduler: Any = None, num_inference_steps: int | None = None) -> CacheHandle:
    """FORA on a diffusers DiT, PixArt, SD3 or Flux transformer.

    `reuse`: "hold" (default, the published method) reuses each unit's output from the last
    refresh; "forecast1" / "forecast2" extrapolate it instead (TaylorSeer: a Taylor expansion of
    order 1 or 2 whose derivatives are divided differences over the steps between the last
    refreshes; residual units forecast their residual). Forecast keeps order + 1 tensors per
    stored unit (2 or 3 times hold's cache memory), reported in `telemetry.cache_bytes`."""
    model, scheduler = _resolve(target, scheduler)
    _check_free(model)
    config = ForaConfig(interval, start_percent, end_percent, reuse)
    units, slots = dit_units(model)
    return CacheHandle(model, units, slots, ForaPolicy(config), start_percent, end_percent, scheduler, num_inference_steps)


def apply_router(target: Any, router: Any, *, threshold: float | None = None, scheduler: Any = None,
                 num_inference_steps: int | None = None, reuse: str | None = None) -> CacheHandle:
    """A learned L2C / HarmoniCa router (our .safetensors, an official L2C .pt, or a Router) on a
    diffusers DiT or PixArt transformer. Depth and layout are checked now, the step count when
    sampling starts.

    reuse: how a reused sub-layer output is produced (core/reuse.py): "hold" (the last computed
    value, as published) or "forecast1"/"forecast2" (Taylor extrapolation from that sub-layer's
    last refreshes). None (default): the router's own, the reuse it was trained for (hold for
    official and older routers)."""
    from ..core.methods.deepcache import check_reuse
    from ..core.methods.router import RouterPolicy, check_threshold, not_a_dit
    from ..core.routers import Router, load_any
    check_threshold(threshold)
    if reuse is not None:
        check_reuse(reuse)
    model, scheduler = _resolve(target, scheduler)
    if type(model).__name__ not in DIT_LAYOUTS:
        raise not_a_dit(type(model).__name__, "diffusers " + ", ".join(sorted(DIT_LAYOUTS)), is_unet(model),
                        "DeepCache (apply_deepcache)")
    _check_free(model)
    if not isinstance(router, Router):
        router = load_any(router)
    policy = RouterPolicy(router, threshold, reuse)
    units, slots = dit_units(model)
    policy.check_units(units)
    if scheduler is None and num_inference_steps is not None:
        policy.check_steps(num_inference_steps)
    return CacheHandle(model, units, slots, policy, 0.0, 1.0, scheduler, num_inference_steps)


def remove_cache(target: Any) -> None:
    """Remove every CacheKit method applied to the model (no-op if none)."""
    from .dydit import DYDIT_ATTR          # dydit imports this module
    model, _ = _resolve(target, None)
    for attr in (STEP_SKIP_ATTR, _HANDLE_ATTR, DYDIT_ATTR):
        handle = getattr(model, attr, None)
        if handle is not None:
            handle.remove()
