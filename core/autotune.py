"""Autotune: pick a method's settings for a stated quality or speed target, by measuring.

The host supplies `sample(settings) -> (output, seconds)`: one calibration sampling of the
user's model, uncached when settings is None. Autotune samples the uncached reference, then
walks "ladders" of candidate settings, each ordered from gentle to aggressive (for example
DeepCache branch 0 with interval 2, 3, 4, ...), and measures every candidate's PSNR against
the reference and its speedup. A ladder stops early once it has passed the target (quality
only falls, speed only rises along it), so a tune costs a handful of samplings.

Target "psnr": the fastest candidate with PSNR >= the target. Target "speedup": the best PSNR
among candidates at least that fast. The speed compared is the measured wall-clock speedup
(best of `repeats` timings each, which is robust on a busy machine); the FLOP-weighted
estimate is reported next to it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .methods import registry
from .quality import psnr
from .units import UnitMap

TARGETS = ("psnr", "speedup")
# The tunable methods and their off settings, read from the method registry on every use (a
# method registered later is tunable without a change here).
METHODS = registry.LiveNames(registry.tunable_keys)
# The settings that turn each method off (what autotune returns when nothing meets the target).
NO_CACHING = registry.LiveMapping(lambda: {s.key: dict(s.off) for s in registry.methods() if s.tunable})


def ladders(method: str, units: UnitMap | None = None) -> list[list[dict]]:
    """Candidate settings, as keyword arguments of the method's node / apply_* function. `units`:
    the model's unit map where the host has it (DeepCache tries the branches the U-Net has)."""
    return registry.get(method).ladders(units)


@dataclass
class Trial:
    settings: dict
    psnr: float
    speedup: float
    seconds: float
    ideal_speedup: float | None = None

    def as_dict(self) -> dict:
        return {"settings": self.settings, "psnr": self.psnr, "speedup": self.speedup, "seconds": self.seconds,
                "ideal_speedup": self.ideal_speedup}


@dataclass
class TuneResult:
    method: str
    target: str
    target_value: float
    reference_seconds: float
    trials: list[Trial] = field(default_factory=list)
    chosen: Trial | None = None       # None: nothing useful found; settings are NO_CACHING
    met: bool = False                 # the chosen trial meets the target

    @property
    def settings(self) -> dict:
        return dict(self.chosen.settings) if self.chosen else dict(registry.get(self.method).off)

    def frontier(self) -> list[Trial]:
        """Trials no other trial beats on both speed and PSNR, fastest first."""
        ranked = sorted(self.trials, key=lambda t: (-t.speedup, -t.psnr))
        front, best_psnr = [], -math.inf
        for trial in ranked:
            if trial.psnr > best_psnr:
                front.append(trial)
                best_psnr = trial.psnr
        return front

    def report(self) -> str:
        goal = f"PSNR >= {self.target_value:g} dB" if self.target == "psnr" else f"speedup >= {self.target_value:g}x"
        lines = [f"Autotune {self.method} for {goal} ({len(self.trials)} calibration runs, "
                 f"uncached {self.reference_seconds:.2f} s)"]
        if self.chosen:
            note = "" if self.met else " (target not reached: the fastest setting found)"
            lines.append(f"chosen: {_fmt(self.chosen.settings)}: {self.chosen.speedup:.2f}x, "
                         f"{self.chosen.psnr:.1f} dB{note}")
        else:
            lines.append(f"nothing met the target; caching off ({_fmt(self.settings)})")
        lines.append("frontier: " + "; ".join(f"{_fmt(t.settings)} {t.speedup:.2f}x {t.psnr:.1f} dB"
                                              for t in self.frontier()))
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"method": self.method, "target": self.target, "target_value": self.target_value,
                "reference_seconds": self.reference_seconds, "settings": self.settings,
                "chosen": self.chosen.as_dict() if self.chosen else None, "met": self.met,
                "trials": [t.as_dict() for t in self.trials], "frontier": [t.as_dict() for t in self.frontier()]}


def _fmt(settings: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())


def check_method(method: str) -> None:
    """Refuse a method the registry does not know, or one without an autotune ladder."""
    if not registry.get(method).tunable:
        raise ValueError(f"{registry.get(method).name} cannot be tuned; choose one of {tuple(METHODS)}.")


def check_target(target: str, value: float) -> None:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}.")
    if target == "psnr" and not value > 0:
        raise ValueError(f"A PSNR target must be > 0 dB, got {value!r}; 30 is a good start.")
    if target == "speedup" and not value > 1:
        raise ValueError(f"A speedup target must be > 1, got {value!r}; try 1.5.")


def autotune(sample: Callable[[dict | None], tuple[torch.Tensor, float]], method: str, target: str,
             target_value: float, *, data_range: float | None = None, repeats: int = 1, max_trials: int = 24,
             candidate_ladders: list[list[dict]] | None = None,
             ideal_speedup: Callable[[], float | None] | None = None,
             progress: Callable[[int, int], None] | None = None) -> TuneResult:
    """Measure candidates and choose. `data_range`: PSNR's peak-to-peak range (None: the
    reference's own range, for latents); `ideal_speedup()` reads the last run's FLOP estimate."""
    check_method(method)
    check_target(target, target_value)
    candidate_ladders = candidate_ladders if candidate_ladders is not None else ladders(method)
    total = 3 + min(max_trials, sum(map(len, candidate_ladders)))
    done = 0

    def timed(settings):
        nonlocal done
        outputs, best = None, math.inf
        for _ in range(repeats):
            outputs, seconds = sample(settings)
            best = min(best, seconds)
        done += 1
        if progress is not None:
            progress(done, total)
        return outputs, best

    timed(None)        # warm-up: first runs pay one-time allocation and dispatch costs
    reference, reference_seconds = timed(None)
    if data_range is None:
        data_range = float(reference.max() - reference.min()) or 1.0
    result = TuneResult(method, target, float(target_value), reference_seconds)
    for ladder in candidate_ladders:
        for settings in ladder:
            if len(result.trials) >= max_trials:
                break
            out, seconds = timed(settings)
            trial = Trial(dict(settings), psnr(reference, out, data_range), reference_seconds / seconds, seconds,
                          ideal_speedup() if ideal_speedup else None)
            result.trials.append(trial)
            if target == "psnr" and trial.psnr < target_value:
                break          # more aggressive settings on this ladder only lose quality
            if target == "speedup" and trial.speedup >= target_value:
                break          # the gentlest setting fast enough is this ladder's best quality
    # Time the reference again: the machine's load may have changed while the candidates ran.
    _, again = timed(None)
    result.reference_seconds = min(reference_seconds, again)
    for trial in result.trials:
        trial.speedup = result.reference_seconds / trial.seconds
    result.chosen, result.met = choose(result.trials, target, target_value)
    return result


def choose(trials: list[Trial], target: str, value: float) -> tuple[Trial | None, bool]:
    """(chosen trial, whether it meets the target). Only trials that skipped work count."""
    useful = [t for t in trials if t.speedup > 1.0 and (t.ideal_speedup is None or t.ideal_speedup > 1.001)]
    if target == "psnr":
        ok = [t for t in useful if t.psnr >= value]
        return (max(ok, key=lambda t: (t.speedup, t.psnr)), True) if ok else (None, False)
    ok = [t for t in useful if t.speedup >= value]
    if ok:
        return max(ok, key=lambda t: (t.psnr, t.speedup)), True
    return (max(useful, key=lambda t: (t.speedup, t.psnr)), False) if useful else (None, False)
