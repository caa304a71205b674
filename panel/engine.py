"""What the preview panel runs, without any gradio: sample a bundled model uncached and cached.

Kept separate from the UI so tests (and scripts) can call it directly and compare with what
the panel's API returns.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.learned_forecast import load_learned_forecast
from ..core.methods import registry
from ..diffusers_host import registry as host
from ..diffusers_host.step_skip import apply_adaptive_skip
from ..tinymodels.bundled import DIT_FORECAST, WEIGHTS, dydit_paths, load, load_dydit
from ..tinymodels.evaluate import to_uint8
from ..core.quality import psnr
from ..tinymodels.sampling import make_scheduler, sample
from ..tinymodels.shapes import CLASSES

MODELS = {"dit": "Tiny DiT (FORA)", "unet": "Tiny U-Net (DeepCache)"}
# The panel's method controls (Request fields, app.CONTROLS) and the method settings they set: a
# control drives the setting of that role ("interval", "branch") or, failing that, of its name.
CONTROLS = ("interval", "branch", "delta", "max_skip_steps", "threshold", "start_percent", "reuse")
MAX_ROUNDS = 5
# A HarmoniCa router trained on the bundled DiT (scripts/train_router.py) for the panel's 25 steps.
BUNDLED_ROUTER = WEIGHTS / "dit_router_harmonica_25.safetensors"
# Settings the panel supplies itself, for methods that need them (config fields without a default).
FIXED = {"router": {"router": BUNDLED_ROUTER}}


def _control_of(spec: registry.MethodSpec, name: str) -> str | None:
    setting = spec.setting(name)
    for control in (setting.role if setting else "", name):
        if control in CONTROLS:
            return control
    return None


def _controls(spec: registry.MethodSpec) -> tuple[str, ...]:
    """The controls the panel shows for a method: those of its main settings it has."""
    return tuple(c for c in (_control_of(spec, name) for name in spec.main_settings) if c)


def _panel_methods() -> list[registry.MethodSpec]:
    """Registered methods the panel can run: every setting they need it has."""
    return [spec for spec in registry.methods() if set(spec.required()) <= set(FIXED.get(spec.key, {}))]


# Everything below is read from the method registry on every use, so a registered method
# appears in the panel without a change here.
# Method names per bundled model, in registration order.
METHODS = registry.LiveMapping(lambda: {kind: tuple(s.name for s in _panel_methods() if s.fits_model(kind))
                                        for kind in MODELS})
# What each method does, in one line, and the Request fields it reads (the panel shows only those).
DESCRIPTIONS = registry.LiveMapping(lambda: {s.name: s.summary for s in _panel_methods()})
SETTINGS = registry.LiveMapping(lambda: {s.name: _controls(s) for s in _panel_methods()})


@dataclass(frozen=True)
class Request:
    model: str = "unet"
    method: str = "DeepCache"
    interval: int = 3
    branch: int = 0
    class_name: str = CLASSES[0]
    seed: int = 0
    steps: int = 25
    cfg: float = 3.0
    images: int = 4
    delta: float = 0.05             # AdaptiveDiffusion only
    max_skip_steps: int = 4         # AdaptiveDiffusion only: the official default
    threshold: float = 0.05         # ChangeCache only
    # FORA only: the share of steps computed in full before reuse starts. The bundled DiT's
    # features move fast early on (bench: 13 dB from step 0 vs 27 dB from 20 % at N=2).
    start_percent: float = 0.2
    # Times both passes this many times (interleaved) so the speedup comes with its spread: on a
    # busy CPU one timing can land anywhere (the same FORA run measured 0.64x, then 1.36x).
    rounds: int = 1
    # DeepCache / FORA: how reused features are produced (hold, forecast1, forecast2; core/reuse.py).
    reuse: str = "hold"
    # The cached pass samples the bundled DyDiT (the DiT fine-tuned with DyDiT routers: dynamic
    # heads, MLP groups and tokens) under apply_dydit, stacked with the chosen method; the
    # uncached pass stays the dense DiT. DyDiT alone: FORA with interval 1 (or AdaptiveDiffusion
    # with delta 0), which reuses nothing. DyDiT needs its own fine-tuned model, so it is a switch
    # on the DiT, not a registered method.
    dydit: bool = False
    # DyDiT only: the share of steps run at full width (every head and MLP group; tokens still
    # routed) before the width routers act. 0 is the official DyDiT; 0.08 keeps the bundled
    # DyDiT's class accuracy at the dense DiT's (bench/results/dydit.md).
    dydit_width_start: float = 0.08
    # AdaptiveDiffusion on the tiny DiT: corrections trained for it on top of forecast2
    # (core/learned_forecast.py; 25 steps, best at delta 1.0 and max_skip_steps 1, the schedule
    # they were trained on: bench/results/learned_forecast_dit.md).
    learned_forecast: bool = False

    def settings(self) -> dict:
        """The chosen method's own settings, for summaries and the run's JSON."""
        chosen = {name: getattr(self, name) for name in SETTINGS[self.method]}
        return {**chosen, "learned_forecast": True} if self.learned_forecast else chosen

    def check(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"Unknown model {self.model!r}; choose one of {list(MODELS)}.")
        if self.method not in METHODS[self.model]:
            raise ValueError(f"{self.method} does not apply to the {self.model} model; use {METHODS[self.model]}.")
        if self.class_name not in CLASSES:
            raise ValueError(f"Unknown class {self.class_name!r}; choose one of {list(CLASSES)}.")
        if not 1 <= self.images <= 16:
            raise ValueError("images must be between 1 and 16.")
        if not 2 <= self.steps <= 200:
            raise ValueError("steps must be between 2 and 200.")
        if not 0.0 <= self.start_percent < 1.0:
            raise ValueError("start_percent must be at least 0 and below 1 "
                             "(the share of steps computed in full before FORA reuses anything).")
        if isinstance(self.max_skip_steps, bool) or not isinstance(self.max_skip_steps, int) or \
                not 1 <= self.max_skip_steps <= 100:
            raise ValueError(f"max_skip_steps must be a whole number from 1 to 100, got {self.max_skip_steps!r} "
                             "(at most this many skipped steps in a row; 4 is the official default).")
        if not 1 <= self.rounds <= MAX_ROUNDS:
            raise ValueError(f"rounds must be between 1 and {MAX_ROUNDS}.")
        if not 0.0 <= self.dydit_width_start <= 1.0:
            raise ValueError("dydit_width_start must be between 0 and 1 (the share of steps DyDiT runs at full width "
                             "before its width routers act; 0 is the official DyDiT).")
        if self.dydit:
            check_dydit(self.model)
        if self.learned_forecast:
            self._check_learned_forecast()

    def _check_learned_forecast(self) -> None:
        if self.model != "dit" or self.method != "AdaptiveDiffusion" or self.dydit:
            raise ValueError("The learned forecast was trained for AdaptiveDiffusion on the tiny DiT (dense, not "
                             "DyDiT); choose those or turn the learned forecast off.")
        if self.reuse != "forecast2":
            raise ValueError(f"The learned forecast corrects reuse forecast2; set Reuse to forecast2 (it is "
                             f"{self.reuse}).")
        if not DIT_FORECAST.is_file():
            raise FileNotFoundError(f"The bundled learned forecast {DIT_FORECAST.name} is missing; make it with "
                                    "scripts/scan_learned_forecast.py --intervals 2 --save-dir tinymodels/weights.")
        load_learned_forecast(DIT_FORECAST).check_steps(self.steps)


@dataclass
class Result:
    uncached: np.ndarray            # [N, 32, 32, 3] uint8
    cached: np.ndarray
    uncached_rounds: list[float]    # seconds per pass, one entry per timing round
    cached_rounds: list[float]
    psnr_db: float
    telemetry: dict = field(default_factory=dict)        # the cached pass of the first round
    uncached_step_s: list[float] = field(default_factory=list)   # wall time per step, first round
    cached_step_s: list[float] = field(default_factory=list)

    @property
    def uncached_s(self) -> float:
        return float(np.median(self.uncached_rounds))

    @property
    def cached_s(self) -> float:
        return float(np.median(self.cached_rounds))

    @property
    def round_speedups(self) -> list[float]:
        return [u / c if c else float("nan") for u, c in zip(self.uncached_rounds, self.cached_rounds)]

    @property
    def speedup(self) -> float:
        """Median over the rounds of uncached time / cached time (each round times both passes)."""
        return float(np.median(self.round_speedups))


_MODELS: dict = {}


def model(kind: str):
    if kind not in _MODELS:
        denoiser = load(kind)
        # One short warm-up sampling: the first calls pay one-time costs that would otherwise
        # be charged to whichever run comes first and skew the measured speedup.
        sample(denoiser, torch.zeros(1, dtype=torch.long), steps=2)
        _MODELS[kind] = denoiser
    return _MODELS[kind]


def check_dydit(kind: str) -> None:
    if kind != "dit":
        raise ValueError("DyDiT runs on the tiny DiT only (it routes a transformer's heads, MLP groups and tokens); "
                         "switch the model to dit or turn DyDiT off.")
    missing = [p.name for p in dydit_paths() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"The bundled DyDiT ({', '.join(missing)}) is missing; train it with "
                                "scripts/train_dydit.py --lam 0.5.")


def dydit_model():
    """The bundled DyDiT's denoiser and routers, loaded and warmed up once."""
    if "dydit" not in _MODELS:
        denoiser, routers = load_dydit()
        sample(denoiser, torch.zeros(1, dtype=torch.long), steps=2)
        _MODELS["dydit"] = (denoiser, routers)
    return _MODELS["dydit"]


class _DyDiTStack:
    """apply_dydit on the bundled DyDiT, then the chosen method on the same model: one handle."""

    def __init__(self, network, routers, scheduler, apply_method, width_start: float = 0.0):
        from ..diffusers_host.dydit import apply_dydit
        self.dydit = apply_dydit(network, routers, scheduler=scheduler, width_start_percent=width_start)
        try:
            self.method = apply_method()
        except BaseException:
            self.dydit.remove()
            raise

    def finish_run(self):
        return _StackedTelemetry(self.method.finish_run(), self.dydit.finish_run())

    def remove(self) -> None:
        self.method.remove()
        self.dydit.remove()


@dataclass
class _StackedTelemetry:
    """The chosen method's telemetry (hit rates, heatmap), with DyDiT's under "dydit"."""
    method: object
    dydit: object

    def as_dict(self) -> dict:
        record = self.method.as_dict()
        record["dydit"] = {**self.dydit.as_dict()["dydit"], "summary": self.dydit.summary()}
        return record


def method_settings(request: Request) -> dict:
    """The chosen method's keyword settings: its main settings from the panel's controls, plus
    what the panel supplies itself (the bundled router)."""
    spec = registry.by_name(request.method)
    settings = {name: getattr(request, _control_of(spec, name)) for name in spec.main_settings
                if _control_of(spec, name)}
    return {**settings, **FIXED.get(spec.key, {})}


def _apply(request: Request, network, scheduler):
    spec = registry.by_name(request.method)
    if spec.key == "router" and not BUNDLED_ROUTER.exists():
        raise FileNotFoundError(f"The bundled router {BUNDLED_ROUTER.name} is missing; train it with "
                                "scripts/train_router.py --steps 25.")
    if request.dydit:
        _, routers = dydit_model()
        return _DyDiTStack(network, routers, scheduler,
                           lambda: host.apply(network, spec.key, scheduler=scheduler, **method_settings(request)),
                           width_start=request.dydit_width_start)
    if request.learned_forecast:
        return apply_adaptive_skip(network, scheduler=scheduler, learned_forecast=DIT_FORECAST,
                                   **method_settings(request))
    return host.apply(network, spec.key, scheduler=scheduler, **method_settings(request))


def run(request: Request, progress: bool = True, on_progress=None) -> Result:
    """Sample uncached, then cached, `request.rounds` times. on_progress(text, done, total) is called
    before every step with e.g. "cached pass: step 3/25" (the panel's progress bar)."""
    request.check()
    denoiser = model(request.model)
    cached_denoiser = dydit_model()[0] if request.dydit else denoiser
    labels = torch.full((request.images,), CLASSES.index(request.class_name))
    scheduler = make_scheduler(request.steps)
    total = 2 * request.steps * request.rounds

    def one_pass(name: str, round_index: int, handle=None):
        where = f"round {round_index + 1}/{request.rounds}, " if request.rounds > 1 else ""
        done = (2 * round_index + (handle is not None)) * request.steps
        starts: list[float] = []

        def on_step(i, _t):
            starts.append(time.perf_counter())
            if on_progress is not None:
                on_progress(f"{where}{name} pass: step {i + 1}/{request.steps}", done + i, total)
        start = time.perf_counter()
        images = sample(cached_denoiser if handle is not None else denoiser, labels, steps=request.steps,
                        cfg=request.cfg, seed=request.seed, scheduler=scheduler, progress=progress, on_step=on_step)
        seconds = time.perf_counter() - start
        step_s = list(np.diff(starts + [start + seconds]))
        telemetry = handle.finish_run().as_dict() if handle is not None else None
        return images, seconds, step_s, telemetry

    uncached_rounds, cached_rounds = [], []
    for r in range(request.rounds):
        reference, seconds, uncached_step_s, _ = one_pass("uncached", r)
        uncached_rounds.append(seconds)
        handle = _apply(request, cached_denoiser.network, scheduler)
        try:
            cached, seconds, cached_step_s, telemetry = one_pass("cached", r, handle)
        finally:
            handle.remove()
        cached_rounds.append(seconds)
        if r == 0:
            first = (reference, cached, uncached_step_s, cached_step_s, telemetry)
    reference, cached, uncached_step_s, cached_step_s, telemetry = first
    return Result(to_uint8(reference), to_uint8(cached), uncached_rounds, cached_rounds, psnr(reference, cached),
                  telemetry, [float(x) for x in uncached_step_s], [float(x) for x in cached_step_s])
