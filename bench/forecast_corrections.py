"""FORA's forecast reuse with FoCa-style corrections, on the bundled DiT (quality only).

    python scripts/scan_forecast_corrections.py [--images 12] [--intervals 2 3] [--out bench/results]

TaylorSeer extrapolates a unit's output with f + dt f' + dt^2/2 f''. FoCa ("Forecast then
Calibrate", 2025) treats the features as an ODE and corrects the forecast (a BDF2 predictor, a
Heun-style calibration); with no model evaluation between refreshes, such corrections amount to
weighting the Taylor terms, f + a dt f' + b dt^2/2 f'' (a = b = 1 is TaylorSeer order 2,
a < 1 damps the extrapolation as averaging the old and new slopes does). This scan measures
PSNR and class accuracy of FORA with hold, TaylorSeer orders 1-2 and a grid of (a, b) against
the full-step images, next to the same sampler with fewer steps at FORA's speed. Every variant
runs exactly FORA's units (its FLOPs, so its speed), so no timing is needed.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.methods.fora import ForaConfig, ForaPolicy
from ..core.quality import psnr
from ..core.reuse import HOLD, Forecast, tree_map
from ..diffusers_host.api import CacheHandle
from ..diffusers_host.units import dit_units
from ..tinymodels.bundled import load, load_classifier
from ..tinymodels.sampling import make_scheduler, sample
from ..tinymodels.shapes import NUM_CLASSES
from .cli import int_at_least
from .methods import _copy

STEPS, CFG = 25, 3.0


@dataclass(frozen=True)
class WeightedForecast(Forecast):
    """Taylor extrapolation with weights on the first- and second-order terms."""
    a: float = 1.0
    b: float = 1.0

    def output(self, entry, step):
        last, derivs = entry
        dt = step - last
        if len(derivs) == 1 or dt == 0:
            return derivs[0]
        weights = (1.0, self.a * dt, self.b * dt * dt / 2)[:len(derivs)]
        return tree_map(lambda *terms: sum(t * w for t, w in zip(terms, weights)), *derivs)


@dataclass(frozen=True)
class _ForaWith(ForaPolicy):
    strategy: object = HOLD

    @property
    def reuse(self):
        return self.strategy


def variants() -> list[tuple[str, object]]:
    grid = [(f"a={a} b={b}", WeightedForecast(2, a=a, b=b)) for a in (0.25, 0.5, 0.75) for b in (0.0, 0.5)]
    return [("hold", HOLD), ("TaylorSeer order 1", Forecast(1)), ("TaylorSeer order 2", Forecast(2))] + grid


def scan(images: int, intervals: list[int], fewer: list[int]) -> list[dict]:
    base, classifier = load("dit"), load_classifier()
    labels = torch.arange(images) % NUM_CLASSES
    reference = sample(base, labels, steps=STEPS, cfg=CFG, seed=0, scheduler=make_scheduler(STEPS))

    @torch.no_grad()
    def row(what: str, setting: str, out: torch.Tensor, work: float) -> dict:
        accuracy = (classifier(out).argmax(1) == labels).float().mean().item()
        return {"what": what, "setting": setting, "work": round(work, 3), "psnr_db": round(psnr(reference, out), 2),
                "accuracy": round(accuracy, 3)}

    rows = []
    for k in fewer:
        out = sample(base, labels, steps=k, cfg=CFG, seed=0, scheduler=make_scheduler(k))
        rows.append(row("fewer steps", f"DDIM {k}", out, k / STEPS))
    for interval in intervals:
        for name, strategy in variants():
            d = _copy(base)
            units, slots = dit_units(d.network)
            scheduler = make_scheduler(STEPS)
            handle = CacheHandle(d.network, units, slots, _ForaWith(ForaConfig(interval), strategy=strategy),
                                 0.0, 1.0, scheduler, None)
            out = sample(d, labels, steps=STEPS, cfg=CFG, seed=0, scheduler=scheduler)
            telemetry = handle.finish_run()
            handle.remove()
            rows.append(row(f"FORA N={interval}", name, out, 1 - telemetry.hit_rate))
            print(rows[-1], flush=True)
    return rows


def to_markdown(rows: list[dict], command: str) -> str:
    lines = ["# FORA forecast corrections on the bundled DiT (quality only)", "", f"Command: `{command}`", "",
             "`work`: share of unit computations done (FORA's speed follows it; fewer steps: k / 25).", "",
             "| what | setting | work | PSNR (dB) | class accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['setting']} | {r['work']} | {r['psnr_db']} | {r['accuracy']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description="FORA forecast corrections (FoCa-style) vs fewer steps, quality only")
    parser.add_argument("--images", type=int_at_least(1), default=12)
    parser.add_argument("--intervals", nargs="+", type=int_at_least(2), default=[2, 3])
    parser.add_argument("--fewer-steps", nargs="+", type=int_at_least(1), default=[13, 17])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if any(k >= STEPS for k in args.fewer_steps):
        parser.error(f"--fewer-steps must be below {STEPS}")
    torch.set_num_threads(1)
    rows = scan(args.images, args.intervals, args.fewer_steps)
    command = "python scripts/scan_forecast_corrections.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "forecast_corrections.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    (args.out / "forecast_corrections.md").write_text(to_markdown(rows, command))
    print(to_markdown(rows, command))
