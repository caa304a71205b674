"""Every method the benchmark compares, CacheKit's and its peers', as one interface.

A method is installed on a bundled model and returns a Setup: the denoiser to sample with, its
scheduler (the fewer-steps baseline brings its own), a per-step callback (peers that need the
current timestep), and CacheKit's telemetry where there is one. Hooks go on a copy of the
model's modules that shares every parameter and buffer with the original (the same weight
tensors, so cached and uncached runs time the same memory), which keeps peers' hooks from ever
touching the model the uncached runs use.

Origins (the `origin` of a row): "CacheKit" (every registered method at its `bench` settings),
and the alternatives "fewer steps" (the same DDIM sampler with fewer steps), "deepcache
(official)" (the `DeepCache` package), "cache-dit" (PyPI `cache-dit`, installed only for the
bench: bench/requirements-bench.txt) and "diffusers" (the cache hooks of `diffusers.hooks`).
A peer that cannot run here is still listed, with `unavailable` saying why.
"""
from __future__ import annotations

import copy
import importlib.util
import itertools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..core.methods import registry
from ..diffusers_host import registry as host
from ..tinymodels.architectures import Denoiser
from ..tinymodels.bundled import DIT_FORECAST

ROOT = Path(__file__).resolve().parents[1]
CACHEKIT = "CacheKit"
FEWER_STEPS = "fewer steps"
OFFICIAL_DEEPCACHE = "deepcache (official)"
CACHE_DIT = "cache-dit"
DIFFUSERS = "diffusers"
# Where `pip install --no-deps --target` put the bench-only packages (cache-dit); never on the
# path of the pack itself.
BENCH_DEPS = Path(os.environ.get("CACHEKIT_BENCH_DEPS", ROOT / ".venv" / "bench-deps"))
BENCH_DEPS_INSTALL = "pip install --no-deps --target .venv/bench-deps -r bench/requirements-bench.txt"

# diffusers.hooks (0.42) entries the bench does not run, and why.
NOT_APPLICABLE = {
    "TextKVCache": "caches text K/V projections (add_k_proj) of NucleusMoE image transformers; "
                   "the bundled models have no such layers",
    "FirstBlockCache / MagCache / SeaCache on the U-Net": "they hook a top-level list of transformer blocks; "
                                                          "a U-Net has none",
    "FasterCache / TaylorSeer on the U-Net": "their hooks target attention layers, a small share of this U-Net's "
                                             "compute (its convolutions dominate); not run",
    "TaylorSeer lite on the U-Net": "its skip mode stands in zeros for each tensor a skipped module returned, and "
                                    "fails on the U-Net's down blocks, whose output nests a tuple (AttributeError: "
                                    "'tuple' object has no attribute 'dtype'); the computation it would do (the whole "
                                    "prediction forecast every other step) is CacheKit's AdaptiveDiffusion "
                                    "max_skip=1 forecast rows, which the U-Net's bands already rank",
    "LayerSkip, SmoothedEnergyGuidance": "guidance techniques, not caches",
    "group offloading, layerwise casting, context/tensor parallel": "memory and parallelism, not caches",
}


@dataclass
class Setup:
    denoiser: Denoiser
    on_step: Callable[[int, Any], None] | None = None
    finish: Callable[[], Any] = lambda: None        # returns CacheKit telemetry, or None
    wrap_call: Callable | None = None               # context around each model call (diffusers hooks)
    scheduler: Any = None                           # the harness's, unless the method brings its own


@dataclass(frozen=True)
class Method:
    name: str
    setting: str
    origin: str                                  # CACHEKIT or an alternative's origin (above)
    models: tuple[str, ...]
    install: Callable[[Denoiser, Any, int], Setup] = field(compare=False)
    key: str = ""                                # CacheKit: the method's registry key
    settings: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    unavailable: str = ""                        # why this peer cannot run here ("" when it can)


def _copy(denoiser: Denoiser) -> Denoiser:
    """New module objects over the same parameter and buffer tensors."""
    model = denoiser.model
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return Denoiser(denoiser.kind, copy.deepcopy(model, memo))


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
    return Method(spec.name, spec.label(settings), CACHEKIT, _models(spec), install, key, dict(settings))


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
    return Method(NAMES[router.method], label or (f"threshold={threshold}" if threshold else "router"), CACHEKIT,
                  _models(registry.get("router")), install, "router", {"threshold": threshold})


# -- DyDiT: the bundled tiny DyDiT (its own fine-tuned weights), alone and stacked ------------
_DYDIT: dict = {}


def _bundled_dydit():
    """The bundled DyDiT, loaded once; each install hooks a copy over the same tensors."""
    if "model" not in _DYDIT:
        from ..tinymodels.bundled import load_dydit
        _DYDIT["model"], _DYDIT["routers"] = load_dydit()
    return _DYDIT["model"], _DYDIT["routers"]


def _dydit_missing() -> str:
    from ..tinymodels.bundled import dydit_paths
    missing = [p.name for p in dydit_paths() if not p.is_file()]
    return f"the bundled DyDiT ({', '.join(missing)}) is missing: scripts/train_dydit.py" if missing else ""


def cachekit_dydit(partner: str | None = None, width_start: float = 0.0, **settings) -> Method:
    """The bundled DyDiT (tinymodels/train_dydit.py) under apply_dydit, alone or stacked with a
    registered method (`partner`: "fora", "adaptive"; its settings as keywords). It samples with
    its own fine-tuned weights, so its speedup and image quality are against the dense bundled
    DiT, fine-tuning included. width_start: apply_dydit's width_start_percent. Telemetry: the
    partner's (its hit rate) when stacked."""
    label = "+".join(["DyDiT"] + ([registry.get(partner).name] if partner else []))
    if partner:
        registry.get(partner).make_config(settings)

    def install(denoiser, scheduler, steps):
        from ..diffusers_host.dydit import apply_dydit
        model, routers = _bundled_dydit()
        d = _copy(model)
        handles = [apply_dydit(d.network, routers, scheduler=scheduler, width_start_percent=width_start)]
        if partner:
            handles.append(host.apply(d.network, partner, scheduler=scheduler, **settings))

        def finish():
            return [h.finish_run() for h in handles][-1]
        return Setup(d, finish=finish)
    from ..tinymodels.bundled import DYDIT
    setting = f"lambda={int(DYDIT.rsplit('_', 1)[-1]) / 100:g}" + (f" width_start={width_start:g}" if width_start else "")
    if partner:
        setting += f" {registry.get(partner).label(settings)}"
    return Method(label, setting, CACHEKIT, ("dit",), install, partner or "", dict(settings),
                  unavailable=_dydit_missing())


def cachekit_learned_forecast(forecast, name: str) -> Method:
    """AdaptiveDiffusion every other step (delta 1.0, max_skip 1) with corrections trained for the
    bundled DiT on top of forecast2 (core/learned_forecast.py; made by scripts/scan_learned_forecast.py
    --save-dir); `name`: the file's stem, for the row's setting."""
    from ..diffusers_host.step_skip import apply_adaptive_skip
    warmup = forecast.schedule.index("S")

    def install(denoiser, scheduler, steps):
        d = _copy(denoiser)
        handle = apply_adaptive_skip(d.network, delta=1.0, max_skip_steps=1, reuse="forecast2", warmup_steps=warmup,
                                     scheduler=scheduler, learned_forecast=forecast)
        return Setup(d, finish=handle.finish_run)
    return Method("AdaptiveDiffusion", f"delta=1.0 max_skip=1 reuse=forecast2 learned={name}", CACHEKIT,
                  ("dit",), install, "adaptive", {"delta": 1.0, "max_skip_steps": 1, "reuse": "forecast2"})


def cachekit_learned_schedule(forecast, name: str) -> Method:
    """A learned forecast's own fixed schedule (cachekit.apply_learned_forecast), e.g. TaylorSeer
    lite's one step in 3 after the warm-up, which AdaptiveDiffusion's decisions do not reproduce."""
    from ..diffusers_host.step_skip import apply_learned_forecast

    def install(denoiser, scheduler, steps):
        d = _copy(denoiser)
        return Setup(d, finish=apply_learned_forecast(d.network, forecast, scheduler=scheduler).finish_run)
    return Method("Learned forecast", f"file={name}", CACHEKIT, ("dit",), install, "learned_forecast",
                  {"file": name + ".safetensors"})


def learned_forecast_methods(steps: int) -> list[Method]:
    """Rows of the bundled learned forecasts trained for `steps` steps (not registry settings: they
    need their files; each file is read once, here, so a bad one fails before any run): every other
    step through AdaptiveDiffusion, other schedules as trained."""
    from ..core.learned_forecast import load_learned_forecast
    rows = []
    for path in sorted(DIT_FORECAST.parent.glob(f"dit_forecast_n*_{steps}.safetensors")):
        forecast = load_learned_forecast(path)
        if forecast.num_steps != steps:
            continue
        make = cachekit_learned_forecast if path == DIT_FORECAST else cachekit_learned_schedule
        rows.append(make(forecast, path.stem))
    return rows


def dydit_methods() -> list[Method]:
    """The bundled DyDiT's rows (scripts/bench_peers.py adds them to all_methods' rows: they are not
    registered methods, so the registry's row checks do not cover them)."""
    return [cachekit_dydit(), cachekit_dydit(width_start=0.08), cachekit_dydit("fora", interval=2),
            cachekit_dydit("adaptive", delta=0.02, max_skip_steps=2)]


# -- the trivial baseline: the same sampler with fewer steps ---------------------------------
def fewer_steps(k: int) -> Method:
    """DDIM with k steps (same seeds, same labels), timed and scored against the full-step run."""
    def install(denoiser, scheduler, steps):
        from ..tinymodels.sampling import make_scheduler
        if k >= steps:
            raise ValueError(f"fewer steps: {k} is not fewer than the reference's {steps} steps")
        return Setup(denoiser, scheduler=make_scheduler(k))        # the model itself: nothing is hooked
    return Method("DDIM", f"steps={k}", FEWER_STEPS, ("dit", "unet"), install, settings={"steps": k})


def default_fewer_steps(steps: int) -> list[int]:
    """About a third to four fifths of the reference's steps: 8, 10, ..., 20 for 25."""
    return sorted({k for k in (round(steps * f) for f in (0.32, 0.4, 0.48, 0.56, 0.64, 0.72, 0.8)) if 2 <= k < steps})


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
    unavailable = "" if importlib.util.find_spec("DeepCache") else "the DeepCache package is not installed"
    return Method("DeepCache", f"N={interval} branch={branch}", OFFICIAL_DEEPCACHE, ("unet",), install,
                  settings={"cache_interval": interval, "cache_branch": branch}, unavailable=unavailable)


class _ScalarTimestep(Denoiser):
    """Passes the timestep as a 0-d tensor, as diffusers pipelines do (the official helper
    looks it up with `.item()`)."""

    def __init__(self, inner: Denoiser):
        super().__init__(inner.kind, inner.model)

    def __call__(self, x, t, labels):
        return super().__call__(x, t.flatten()[0], labels)


class _Timestep:
    """The current step, timestep and flow-matching sigma, for hooks that ask for them."""

    def __init__(self, scheduler=None):
        self.value, self.index, self.sigma = 999, 0, 1.0
        self._alphas = getattr(scheduler, "alphas_cumprod", None)

    def __call__(self) -> int:
        return self.value

    def update(self, i, t):
        self.value, self.index = int(t), i
        if self._alphas is not None:
            # x_t = a x0 + s eps equals (a + s) * ((1 - sigma) x0 + sigma eps) with sigma = s / (a + s):
            # the flow-matching sigma of a DDPM timestep.
            alpha = float(self._alphas[int(t)])
            a, s = alpha ** 0.5, (1 - alpha) ** 0.5
            self.sigma = s / (a + s)


def _diffusers_hook(name: str, setting: str, models: tuple[str, ...], build: Callable[[Any, _Timestep, int], None],
                    needs_context: bool = False, unavailable: str = "") -> Method:
    def install(denoiser, scheduler, steps):
        d = _copy(denoiser)
        clock = _Timestep(scheduler)
        build(d.network, clock, steps)
        wrap = None
        if needs_context:
            wrap = _cache_context(d.network, clock, steps)
        return Setup(d, on_step=clock.update, wrap_call=wrap)
    return Method(name, setting, DIFFUSERS, models, install, unavailable=unavailable)


def _cache_context(net, clock: _Timestep, steps: int) -> Callable:
    """What CacheMixin.cache_context does around each model call (our tiny models are not
    CacheMixin): diffusers 0.42+ with the scheduler coordinates a pipeline passes (SeaCache needs
    them); before 0.42 the registry's named context (the ComfyUI test environment has 0.39)."""
    try:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context
    except ImportError:
        from diffusers.hooks import HookRegistry
        registry = HookRegistry.check_if_exists_or_initialize(net)

        def wrap(call):
            registry._set_context("cond_uncond")
            try:
                return call()
            finally:
                registry._set_context(None)
        return wrap

    def wrap(call):
        _set_cache_context(net, CacheContext("cond_uncond", step_index=clock.index, num_inference_steps=steps,
                                             timestep=clock.value, sigma=clock.sigma))
        try:
            return call()
        finally:
            _set_cache_context(net, None)
    return wrap


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


def diffusers_taylorseer_lite(interval: int, order: int, warmup: int) -> Method:
    """TaylorSeer's lite mode: every block skipped on a cached step and the model's output
    projection forecast, i.e. the whole noise prediction extrapolated (what CacheKit's
    AdaptiveDiffusion with a forecast reuse does on its skipped steps). Its built-in patterns
    (`proj_out`) miss the DiT's `proj_out_2`, so they are named here. `warmup`: diffusers'
    disable_cache_before_step (3 by default)."""
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
    return _diffusers_hook(
        "TaylorSeer lite", f"N={interval} order={order} warmup={warmup}", ("dit",),
        lambda net, clock, steps: apply_taylorseer_cache(net, TaylorSeerCacheConfig(
            cache_interval=interval, disable_cache_before_step=warmup, max_order=order, taylor_factors_dtype=None,
            skip_predict_identifiers=[r"^transformer_blocks\.\d+$"], cache_identifiers=[r"^proj_out_2$"])),
        needs_context=True)


def diffusers_magcache(threshold: float, ratios: dict) -> Method:
    """MagCache needs per-step magnitude ratios: the runner calibrates them on the uncached run."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache
    return _diffusers_hook("MagCache", f"threshold={threshold}", ("dit",), lambda net, clock, steps: apply_mag_cache(
        net, MagCacheConfig(threshold=threshold, num_inference_steps=steps, mag_ratios=ratios[steps])),
        needs_context=True)


def diffusers_seacache(threshold: float) -> Method:
    """SeaCache (diffusers 0.42) through its generic path: the DiT's input latents as the
    "raw vision" (one frame per image) and the DDPM timestep's flow-matching sigma."""
    def build(net, clock, steps):
        from diffusers.hooks import SeaCacheConfig, apply_sea_cache

        def raw_vision(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            return [latent.unsqueeze(1) for latent in x]      # [C, T=1, H, W] per image
        # power_exp 2: images, not video (the paper's 3 is for spatio-temporal spectra).
        apply_sea_cache(net, SeaCacheConfig(threshold=threshold, power_exp=2.0, raw_vision_callback=raw_vision))
    import diffusers.hooks
    unavailable = "" if hasattr(diffusers.hooks, "apply_sea_cache") else "this diffusers has no SeaCache (0.42+)"
    return _diffusers_hook("SeaCache", f"threshold={threshold}", ("dit",), build, needs_context=True,
                           unavailable=unavailable)


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


# -- cache-dit (bench-only dependency) ---------------------------------------------------------
def _cache_dit_missing() -> str:
    """'' when cache-dit can be imported (from the environment or BENCH_DEPS), else why not."""
    if importlib.util.find_spec("cache_dit") is None and BENCH_DEPS.is_dir() and str(BENCH_DEPS) not in sys.path:
        sys.path.append(str(BENCH_DEPS))      # appended: it never shadows the environment's packages
    if importlib.util.find_spec("cache_dit") is None:
        return f"cache-dit is not installed (install it for the bench only: {BENCH_DEPS_INSTALL})"
    return ""


def cachedit_dbcache(threshold: float, taylorseer_order: int = 0, warmup: int = 8) -> Method:
    """cache-dit's DBCache (F1B0: the first block always computes; the others are reused while its
    residual changes less than the threshold), optionally with its TaylorSeer calibrator, through
    the adapter cache-dit registers for diffusers' DiTTransformer2DModel."""
    def install(denoiser, scheduler, steps):
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
        missing = _cache_dit_missing()
        if missing:
            raise ImportError(missing)
        import cache_dit
        d = _copy(denoiser)
        calibrator = (cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=taylorseer_order) if taylorseer_order
                      else None)
        cache_dit.enable_cache(d.model, cache_config=cache_dit.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold, max_warmup_steps=warmup,
            num_inference_steps=steps), calibrator_config=calibrator)
        return Setup(d)
    name = "DBCache+TaylorSeer" if taylorseer_order else "DBCache"
    setting = f"F1B0 t={threshold} warmup={warmup}" + (f" order={taylorseer_order}" if taylorseer_order else "")
    return Method(name, setting, CACHE_DIT, ("dit",), install,
                  settings={"threshold": threshold, "taylorseer_order": taylorseer_order, "warmup": warmup},
                  unavailable=_cache_dit_missing())


def cachedit_methods() -> list[Method]:
    grid = [(t, order, 8) for order in (0, 1) for t in (0.1, 0.2, 0.3, 0.45)]
    grid += [(0.2, 1, 4), (0.45, 1, 4)]
    return [cachedit_dbcache(t, order, warmup) for t, order, warmup in grid]


def peer_methods(magcache_ratios: dict | None = None) -> list[Method]:
    methods = [official_deepcache(n, b) for n in (2, 3, 5) for b in (0, 1)]
    methods += [diffusers_fbc(t) for t in (0.05, 0.1, 0.2)]
    methods += [diffusers_pab(s) for s in (2, 3)]
    methods += [diffusers_fastercache(2)]
    methods += [diffusers_taylorseer(n) for n in (3, 5)]
    methods += [diffusers_taylorseer_lite(n, order, warmup) for n, order, warmup in
                ((2, 1, 3), (2, 2, 3), (2, 1, 4), (2, 2, 4), (2, 2, 6), (2, 2, 8), (3, 2, 4), (3, 2, 6))]
    if magcache_ratios is not None:
        methods += [diffusers_magcache(t, magcache_ratios) for t in (0.06, 0.12)]
    methods += [diffusers_seacache(t) for t in (0.15, 0.25, 0.35, 0.5, 1.0)]
    methods += cachedit_methods()
    return methods


def all_methods(magcache_ratios: dict | None = None, fewer: list[int] | None = None) -> list[Method]:
    """CacheKit's rows, the fewer-steps baseline at `fewer` step counts, and every peer."""
    return cachekit_methods() + [fewer_steps(k) for k in fewer or ()] + peer_methods(magcache_ratios)
