"""The panel's Autotune view, without any gradio: tune a method on a bundled tiny model, and keep
the last result on disk so a reopened panel shows it again.

The tune itself is diffusers_host.autotune.autotune_diffusers on the engine's loaded model (the
same calibration sampling as `scripts/autotune.py --model`); this module only checks the request,
runs it with progress, and turns the result into a plain-JSON record (every trial, its frontier
mark, the choice) that report.py and charts.py draw from. A record read back from disk draws the
same view as a fresh one.

The last record lives in $CACHEKIT_PANEL_CACHE (a folder) or ~/.cache/cachekit/panel
($XDG_CACHE_HOME respected), as last_autotune.json.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..core.autotune import TARGETS, TuneResult, check_target
from ..core.methods import registry
from ..diffusers_host.autotune import autotune_diffusers
from ..tinymodels.sampling import make_scheduler, sample
from ..tinymodels.shapes import NUM_CLASSES
from . import engine

FORMAT = "cachekit-panel-autotune/1"
CACHE_ENV = "CACHEKIT_PANEL_CACHE"
LAST_FILE = "last_autotune.json"
DATA_RANGE = 2.0                  # the tiny models sample images in [-1, 1]
# Upper bounds of a sensible target (the lower ones are core.autotune's: PSNR > 0, speedup > 1).
MAX_PSNR = 100.0
MAX_SPEEDUP = 20.0
MAX_TRIALS = 24
# Methods the panel tunes, per bundled model: the registry's tunable methods that fit the model
# (and need no setting the panel cannot supply), in registration order, read on every use.
TUNABLE = registry.LiveMapping(lambda: {kind: tuple(s.name for s in registry.methods()
                                                    if s.tunable and s.fits_model(kind) and not s.required())
                                        for kind in engine.MODELS})


@dataclass(frozen=True)
class TuneRequest:
    model: str = "unet"
    method: str = "DeepCache"      # the method's name as the panel shows it (its registry key works too)
    target: str = "psnr"
    value: float = 25.0
    steps: int = 10                # small defaults: a U-Net tune is about half a minute on 2 CPU cores
    images: int = 2
    max_trials: int = 8
    seed: int = 0
    cfg: float = 3.0

    def spec(self) -> registry.MethodSpec:
        for spec in registry.methods():
            if self.method in (spec.name, spec.key):
                return spec
        raise ValueError(f"Unknown method {self.method!r}; tune one of {', '.join(TUNABLE.get(self.model, ()))}.")

    def check(self) -> registry.MethodSpec:
        """Refuse what cannot run, before the model loads; returns the method's registry entry."""
        if self.model not in engine.MODELS:
            raise ValueError(f"Unknown model {self.model!r}; choose one of {list(engine.MODELS)}.")
        spec = self.spec()
        choices = ", ".join(TUNABLE[self.model])
        if not spec.tunable:
            raise ValueError(f"{spec.name} has no autotune ladder, so it cannot be tuned; on the {self.model} "
                             f"model tune {choices}.")
        if spec.name not in TUNABLE[self.model]:
            raise ValueError(f"{spec.name} cannot be tuned on the {self.model} model (it works on "
                             f"{registry.FITS_TEXT[spec.fits]}); tune {choices}.")
        if self.target not in TARGETS:
            raise ValueError(f"The target must be one of {TARGETS}, got {self.target!r}.")
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value)):
            raise ValueError(f"The target value must be a number, got {self.value!r}.")
        check_target(self.target, self.value)
        if self.target == "psnr" and self.value > MAX_PSNR:
            raise ValueError(f"A PSNR target must be at most {MAX_PSNR:g} dB, got {self.value:g}; 25 to 35 is "
                             "typical for the tiny models.")
        if self.target == "speedup" and self.value > MAX_SPEEDUP:
            raise ValueError(f"A speedup target must be at most {MAX_SPEEDUP:g}x, got {self.value:g}; try 1.5.")
        if not 2 <= self.steps <= 200:
            raise ValueError("steps must be between 2 and 200.")
        if not 1 <= self.images <= 16:
            raise ValueError("images must be between 1 and 16.")
        if not 1 <= self.max_trials <= MAX_TRIALS:
            raise ValueError(f"max trials must be between 1 and {MAX_TRIALS}.")
        return spec


def run(request: TuneRequest, on_progress: Callable[[str, float], None] | None = None) -> TuneResult:
    """Tune on the bundled model. on_progress(text, fraction) is called before every sampling step
    (e.g. "calibration run 3 of at most 11: step 4/10")."""
    spec = request.check()
    say = on_progress or (lambda text, fraction: None)
    say(f"loading the {engine.MODELS[request.model].split(' (')[0]}", 0.0)
    denoiser = engine.model(request.model)
    scheduler = make_scheduler(request.steps)
    labels = torch.arange(request.images) % NUM_CLASSES          # one image per class, as the CLI
    # The warm-up, the reference, the candidates and the re-timing of the reference: autotune
    # says the true total after the first run (ladders stop early, so it is an upper bound).
    state = {"done": 0, "total": 3 + request.max_trials}

    def on_step(i, _t):
        run_no = min(state["done"] + 1, state["total"])
        say(f"calibration run {run_no} of at most {state['total']}: step {i + 1}/{request.steps}",
            min(1.0, (state["done"] + i / request.steps) / state["total"]))

    def calibration():
        return sample(denoiser, labels, steps=request.steps, cfg=request.cfg, seed=request.seed,
                      scheduler=scheduler, on_step=on_step)

    def progress(done, total):
        state["done"], state["total"] = done, total

    return autotune_diffusers(denoiser.network, calibration, method=spec.key, target_kind=request.target,
                              value=float(request.value), scheduler=scheduler, data_range=DATA_RANGE,
                              max_trials=request.max_trials, progress=progress)


def _number(value):
    """JSON has no Infinity (the PSNR of identical images): null, as in the run records."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def record(request: TuneRequest, result: TuneResult) -> dict:
    """Everything about a tune as plain JSON. Trials keep autotune's order ("#" in the table is the
    index + 1); a trial's psnr is null where its images equal the uncached ones."""
    spec = request.spec()
    front = {id(t) for t in result.frontier()}
    chosen = next((i for i, t in enumerate(result.trials) if t is result.chosen), None)
    trials = [{**{k: _number(v) for k, v in t.as_dict().items()}, "on_frontier": id(t) in front,
               "chosen": i == chosen} for i, t in enumerate(result.trials)]
    return {
        "format": FORMAT,
        "saved": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": request.model,
        "method": spec.name,
        "method_key": spec.key,
        "target": result.target,
        "target_value": result.target_value,
        "met": result.met,
        "settings": result.settings,
        "chosen": chosen,
        "reference_seconds": result.reference_seconds,
        "sampling": {"sampler": "DDIM", "steps": request.steps, "cfg": request.cfg, "images": request.images,
                     "seed": request.seed, "max_trials": request.max_trials},
        "trials": trials,
        "frontier": [i for i, t in enumerate(trials) if t["on_frontier"]],
        "report": result.report(),
    }


# -- the last tune, on disk --------------------------------------------------------------------
def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cachekit" / "panel"


def last_path() -> Path:
    return cache_dir() / LAST_FILE


def save_last(rec: dict) -> Path:
    """Write the record as the last tune (atomically: a reader never sees half a file)."""
    path = last_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".last_autotune-", suffix=".json",
                                     delete=False) as f:
        json.dump(rec, f, indent=1, allow_nan=False)
    os.replace(f.name, path)
    return path


def load_last() -> dict | None:
    """The last tune's record, None when there is none. A file that is not one raises ValueError."""
    path = last_path()
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not readable JSON ({error}).") from None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT or not isinstance(rec.get("trials"), list):
        raise ValueError(f"{path} is not a panel autotune record ({FORMAT}).")
    return rec


def file_name(rec: dict) -> str:
    return f"cachekit_autotune_{rec['model']}_{rec['method']}_{rec['target']}{rec['target_value']:g}.json"


def control_values(rec: dict) -> tuple[dict, dict, dict]:
    """The chosen settings as the main controls' values (engine.Request fields), the panel-wide
    values to set with them (model, method, steps), and the settings the panel has no control for."""
    spec = registry.by_name(rec["method"])
    controls, left = {}, {}
    for name, value in rec["settings"].items():
        control = engine._control_of(spec, name) if name in spec.main_settings else None
        if control is None:
            left[name] = value
        else:
            controls[control] = value
    return controls, {"model": rec["model"], "method": rec["method"], "steps": rec["sampling"]["steps"]}, left
