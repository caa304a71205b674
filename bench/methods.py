"""Every method the benchmark compares, CacheKit's and its peers', as one interface.

A method is installed on a fresh copy of a bundled model and returns a Setup: the denoiser to
sample with, a per-step callback (peers that need the current timestep), and CacheKit's
telemetry where there is one. Copies keep peers' hooks from ever touching the shared model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

from ..core.methods import registry
from ..diffusers_host import registry as host
from ..tinymodels.architectures import Denoiser


@dataclass
class Setup:
    denoiser: Denoiser
    on_step: Callable[[int, Any], None] | None = None
    finish: Callable[[], Any] = lambda: None        # returns CacheKit telemetry, or None
    wrap_call: Callable | None = None               # context around each model call (diffusers FBC)
    scheduler: Any = None                           # set by the harness


@dataclass(frozen=True)
class Method:
    name: str
    setting: str
    origin: str                                  # "CacheKit" or the peer's package
    models: tuple[str, ...]
    install: Callable[[Denoiser, Any, int], Setup] = field(compare=False)
    key: str = ""                                # CacheKit: the method's registry key


def _copy(denoiser: Denoiser) -> Denoiser:
    return Denoiser(denoiser.kind, copy.deepcopy(denoiser.model))


# -- CacheKit ------------------------------------------------------------------------------
def _models(spec: registry.MethodSpec) -> tuple[str, ...]:
    return tuple(kind for kind in ("dit", "unet") if spec.fits_model(kind))


def cachekit_method(key: str, **settings) -> Method:
    """Any registered CacheKit method with keyword settings (checked now, before any run)."""
    spec = registry.get(key)
    spec.make_config(settings)

    def install(denoiser, scheduler, steps):
        d = _copy(denoiser)
        handle = host.apply(d.network, key, scheduler=scheduler, **settings)
        return Setup(d, finish=handle.finish_run)
    return Method(spec.name, spec.label(settings), "CacheKit", _models(spec), install, key)


def cachekit_deepcache(interval: int, branch: int) -> Method:
    return cachekit_method("deepcache", cache_interval=interval, cache_branch=branch)


def cachekit_fora(interval: int) -> Method:
    return cachekit_method("fora", interval=interval)


def cachekit_adaptive(delta: float, max_skip_steps: int = 4) -> Method:
    return cachekit_method("adaptive", delta=delta, max_skip_steps=max_skip_steps)


def cachekit_methods() -> list[Method]:
    """The benchmark's rows of every registered method, at the settings its declaration lists
    (routers need a router file: the harness adds them from --router)."""
    return [cachekit_method(spec.key, **settings) for spec in registry.methods() for settings in spec.bench]


def cachekit_router(router, threshold: float | None = None, label: str | None = None) -> Method:
    """A learned router (a Router, or a file trained with scripts/train_router.py) on the DiT.
    The file is read and the threshold checked now, before any benchmark run."""
    from ..core.methods.router import NAMES, check_threshold
    from ..core.routers import Router, load_any
    check_threshold(threshold)
    router = router if isinstance(router, Router) else load_any(router)

    def install(denoiser, scheduler, steps):
        d = _copy(denoiser)
        handle = host.apply(d.network, "router", router=router, threshold=threshold, scheduler=scheduler)
        return Setup(d, finish=handle.finish_run)
    return Method(NAMES[router.method], label or (f"threshold={threshold}" if threshold else "router"), "CacheKit",
                  _models(registry.get("router")), install, "router")


# -- peers -----------------------------------------------------------------------------------
def official_deepcache(interval: int, branch: int) -> Method:
    """The official `DeepCache` package's DeepCacheSDHelper (uniform schedule)."""
    def install(denoiser, scheduler, steps):
        from DeepCache import DeepCacheSDHelper
        d = _copy(denoiser)
        pipe = type("Pipe", (), {"unet": d.network, "scheduler": scheduler})()
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        return Setup(_ScalarTimestep(d), finish=lambda: helper.disable())
    return Method("DeepCache", f"N={interval} branch={branch}", "deepcache (official)", ("unet",), install)


class _ScalarTimestep(Denoiser):
    """Passes the timestep as a 0-d tensor, as diffusers pipelines do (the official helper
    looks it up with `.item()`)."""

    def __init__(self, inner: Denoiser):
        super().__init__(inner.kind, inner.model)

    def __call__(self, x, t, labels):
        return super().__call__(x, t.flatten()[0], labels)


class _Timestep:
    """The current timestep, for diffusers hooks that ask for it through a callback."""

    def __init__(self):
        self.value = 999

    def __call__(self) -> int:
        return self.value

    def update(self, i, t):
        self.value = int(t)


def _diffusers_hook(name: str, setting: str, models: tuple[str, ...], build: Callable[[Any, _Timestep, int], None],
                    needs_context: bool = False) -> Method:
    def install(denoiser, scheduler, steps):
        d = _copy(denoiser)
        clock = _Timestep()
        build(d.network, clock, steps)
        wrap = None
        if needs_context:
            from diffusers.hooks.hooks import CacheContext, _set_cache_context
            net = d.network

            def wrap(call):
                # What CacheMixin.cache_context does (our tiny models are not CacheMixin).
                _set_cache_context(net, CacheContext("cond_uncond"))
                try:
                    return call()
                finally:
                    _set_cache_context(net, None)
        return Setup(d, on_step=clock.update, wrap_call=wrap)
    return Method(name, setting, "diffusers", models, install)


def diffusers_fbc(threshold: float) -> Method:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    return _diffusers_hook("FirstBlockCache", f"threshold={threshold}", ("dit",),
                           lambda net, clock, steps: apply_first_block_cache(net, FirstBlockCacheConfig(threshold=threshold)),
                           needs_context=True)


def diffusers_pab(skip: int) -> Method:
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    def build(net, clock, steps):
        apply_pyramid_attention_broadcast(net, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip, spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=clock))
    return _diffusers_hook("PyramidAttentionBroadcast", f"skip={skip}", ("dit", "unet"), build)


def diffusers_fastercache(skip: int) -> Method:
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache

    def build(net, clock, steps):
        apply_faster_cache(net, FasterCacheConfig(
            spatial_attention_block_skip_range=skip, spatial_attention_timestep_skip_range=(-1, 681),
            current_timestep_callback=clock, tensor_format="BCHW", attention_weight_callback=lambda _: 0.5,
            is_guidance_distilled=True))
    return _diffusers_hook("FasterCache", f"skip={skip}", ("dit",), build)


def diffusers_taylorseer(interval: int) -> Method:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
    return _diffusers_hook("TaylorSeer", f"N={interval}", ("dit",), lambda net, clock, steps: apply_taylorseer_cache(
        # Its default patterns end in "attn" and miss the DiT's "attn1": name the same
        # sub-layers FORA caches.
        net, TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=1, taylor_factors_dtype=None,
                                   cache_identifiers=[r"^transformer_blocks\.\d+\.(attn1|ff)$"])),
        needs_context=True)


def diffusers_magcache(threshold: float, ratios: dict) -> Method:
    """MagCache needs per-step magnitude ratios: the runner calibrates them on the uncached run."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache
    return _diffusers_hook("MagCache", f"threshold={threshold}", ("dit",), lambda net, clock, steps: apply_mag_cache(
        net, MagCacheConfig(threshold=threshold, num_inference_steps=steps, mag_ratios=ratios[steps])),
        needs_context=True)


def calibrate_magcache(denoiser: Denoiser, steps: int, run) -> list[float]:
    """MagCache's own calibration run: its hook prints the per-step magnitude ratios at the end."""
    import contextlib
    import io
    import json
    import re
    from diffusers.hooks import MagCacheConfig, apply_mag_cache
    method = _diffusers_hook("MagCache", "calibration", ("dit",), lambda net, clock, n: apply_mag_cache(
        net, MagCacheConfig(calibrate=True, num_inference_steps=n)), needs_context=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run(method)
    found = re.search(r"Calibration Complete.*?\n(\[.*?\])", printed.getvalue(), re.S)
    if not found:
        raise RuntimeError("MagCache calibration printed no ratios")
    return json.loads(found.group(1))


def all_methods(magcache_ratios: dict | None = None) -> list[Method]:
    methods = cachekit_methods()
    methods += [official_deepcache(n, 0) for n in (2, 3, 5)]
    methods += [diffusers_fbc(t) for t in (0.05, 0.1, 0.2)]
    methods += [diffusers_pab(s) for s in (2, 3)]
    methods += [diffusers_fastercache(2)]
    methods += [diffusers_taylorseer(n) for n in (3, 5)]
    if magcache_ratios is not None:
        methods += [diffusers_magcache(t, magcache_ratios) for t in (0.06, 0.12)]
    return methods
