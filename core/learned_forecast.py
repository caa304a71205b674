"""A learned forecast for skipped steps: TaylorSeer order 2 plus corrections trained for one model.

On a step the schedule skips, the prediction is the Taylor forecast (core/reuse.py `Forecast(2)`)
plus, per channel c,

    sum_j W[s, j, c] * computed_j  +  W[s, history, c] * latent_s

(computed_j: the last `history` computed predictions, most recent first, a short history repeating
its oldest; latent_s: the step's input latent, free to read). W starts at zero, which is exactly the
Taylor rule, and is trained end to end on the final images' error (bench/learned_forecast.py).

The corrections belong to the model, sampler, step count and the schedule they were trained on:
they apply on a skipped step only when the steps computed before it are the schedule's, and give
the plain Taylor forecast elsewhere (a policy that computed an extra step). A run with another step
count is refused (`check_steps`).

File: safetensors, one tensor `corrections` [skipped steps, history + latent, channels] and text
metadata (format, version, schedule, history, uses_latent, model, source); no pickle.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from .reuse import Forecast
from .routers.sniff import read_sidecar
from .streams import Tree, tree_map

FORMAT, VERSION = "cachekit-learned-forecast", "1"
_MAKE_ONE = "make one with scripts/scan_learned_forecast.py --save-dir"
_TAYLOR = Forecast(2)


@dataclass(frozen=True, eq=False)
class LearnedForecast:
    schedule: str                  # one letter per step: F computed, S skipped (what it was trained on)
    corrections: torch.Tensor      # [schedule.count("S"), history + uses_latent, channels]
    history: int = 3
    uses_latent: bool = True
    model: str = ""
    source: str = ""
    name: ClassVar[str] = "learned"

    def __post_init__(self) -> None:
        if not self.schedule or set(self.schedule) - {"F", "S"} or self.schedule[0] != "F":
            raise ValueError(f"schedule must be a string of F (computed) and S (skipped) steps starting with F, "
                             f"got {self.schedule!r}")
        want = (self.schedule.count("S"), self.history + int(self.uses_latent))
        if self.corrections.ndim != 3 or tuple(self.corrections.shape[:2]) != want:
            raise ValueError(f"corrections must be shaped [skipped steps, regressors, channels] = [{want[0]}, "
                             f"{want[1]}, C] for this schedule, got {list(self.corrections.shape)}")
        skipped = [s for s, c in enumerate(self.schedule) if c == "S"]
        object.__setattr__(self, "_slot", {s: i for i, s in enumerate(skipped)})
        object.__setattr__(self, "_computed_before", {
            s: tuple(i for i, c in enumerate(self.schedule[:s]) if c == "F") for s in skipped})

    @property
    def needs_latent(self) -> bool:
        return self.uses_latent

    @property
    def num_steps(self) -> int:
        return len(self.schedule)

    def check_steps(self, num_steps: int) -> None:
        if num_steps != self.num_steps:
            raise ValueError(f"this learned forecast{' for ' + self.model if self.model else ''} was trained for "
                             f"{self.num_steps} steps; the run has {num_steps}. Sample with {self.num_steps} steps "
                             "or train corrections for this step count (scripts/scan_learned_forecast.py).")

    # -- the reuse-strategy interface (core/reuse.py) --
    def refresh(self, entry: Any, value: Tree, step: int) -> Any:
        taylor, recent, computed = entry if entry is not None else (None, (), ())
        if computed and computed[-1] == step:       # a second call in the same step: replace its value
            recent, computed = recent[:-1], computed[:-1]
        return _TAYLOR.refresh(taylor, value, step), (recent + (value,))[-self.history:], computed + (step,)

    def output(self, entry: Any, step: int, latent: torch.Tensor | None = None) -> Tree:
        taylor, recent, computed = entry
        forecast = _TAYLOR.output(taylor, step)
        if self._computed_before.get(step) != computed:
            return forecast                         # not the trained schedule here: the Taylor rule
        weights = self.corrections[self._slot[step]]
        newest_first = list(recent[::-1])
        newest_first += [newest_first[-1]] * (self.history - len(newest_first))
        if self.uses_latent and latent is None:
            raise ValueError("this learned forecast reads the step's latent; the host must pass it")

        def corrected(f: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
            if f.ndim < 2 or f.shape[1] != weights.shape[-1]:
                raise ValueError(f"the learned forecast has {weights.shape[-1]} channels; the model's output is "
                                 f"shaped {list(f.shape)}. Train corrections for this model.")
            regressors = list(values) + ([latent] if self.uses_latent else [])
            if self.uses_latent and latent.shape != f.shape:
                raise ValueError(f"the learned forecast reads the latent, which must be shaped like the output: "
                                 f"latent {list(latent.shape)}, output {list(f.shape)}")
            view = (1, -1) + (1,) * (f.ndim - 2)
            return f + sum(w.to(f.dtype).view(view) * r for w, r in zip(weights, regressors))
        return tree_map(corrected, forecast, *newest_first)

    def tensors_per_entry(self) -> int:
        return _TAYLOR.tensors_per_entry() + self.history


def save_learned_forecast(forecast: LearnedForecast, path: str | Path) -> Path:
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": VERSION, "schedule": forecast.schedule, "history": str(forecast.history),
            "uses_latent": str(forecast.uses_latent).lower(), "model": forecast.model, "source": forecast.source}
    save_file({"corrections": forecast.corrections.detach().float().contiguous().cpu()}, str(path), metadata=meta)
    return path


def load_learned_forecast(path: str | Path) -> LearnedForecast:
    """Load our safetensors format; anything else is refused with a ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"learned forecast file not found: {path}")
    meta, tensors = read_sidecar(path, ValueError, "CacheKit learned forecast", _MAKE_ONE)
    if meta.get("format") != FORMAT or set(tensors) != {"corrections"}:
        raise ValueError(f"{path.name} is not a CacheKit learned forecast (metadata format={meta.get('format')!r}, "
                         f"tensors {sorted(tensors)}); {_MAKE_ONE}")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path.name}: learned forecast version {meta.get('version')!r} is not supported "
                         f"(need {VERSION})")
    try:
        return LearnedForecast(meta["schedule"], tensors["corrections"], int(meta["history"]),
                               meta["uses_latent"] == "true", meta.get("model", ""), meta.get("source", ""))
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path.name}: learned forecast metadata is incomplete or malformed ({error})") from error


@dataclass(frozen=True, eq=False)
class LearnedSchedule:
    """A call-level policy: skip exactly the steps the learned forecast's schedule skips (as trained)
    and forecast them with its corrections. The schedule is fixed, the same on every batch."""
    forecast: LearnedForecast
    name: str = "Learned forecast"
    level: str = "call"
    online: bool = True
    probe_label: str = ""
    # The corrections were trained on a deterministic sampler's trajectories; a sampler that injects
    # noise every step stops the skipping (core/guards.py), as for AdaptiveDiffusion.
    needs_deterministic_sampler: ClassVar[bool] = True

    @property
    def reuse(self) -> LearnedForecast:
        return self.forecast

    def start(self, units, num_steps: int, window: range) -> None:
        self.forecast.check_steps(num_steps)

    def measure(self, state, step: int, probe: torch.Tensor) -> None:
        return None

    def decide(self, state, step: int, agreed) -> bool:
        return self.forecast.schedule[step] == "F"

    def score(self, state, step: int) -> None:
        return None
