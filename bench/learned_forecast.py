"""Learned corrections to the skipped-step forecast, on the bundled models (quality only).

    python scripts/scan_learned_forecast.py [--model dit] [--intervals 2 3] [--calib-images 48]
        [--images 96] [--iters 80] [--out bench/results]

At 1.5-2.3x on the DiT the strongest rows skip whole steps on a fixed pattern (4 warm-up steps,
then one step in N computed) and extrapolate the noise prediction with TaylorSeer order 2:
CacheKit's AdaptiveDiffusion at delta 1.0 / max_skip 1 and diffusers' TaylorSeer lite compute the
same images. A fixed Taylor rule is one choice of linear extrapolation; this scan asks whether one
learned for the model does better at the same work. On each skipped step s the prediction is

    taylor(s) + sum_j D[s, j, c] * eps_j + D[s, K, c] * x_s

(eps_j: the last K computed predictions, x_s: the step's latent, free to read; c: channel). D
starts at zero (exactly the Taylor rule) and is trained end to end on the final image's error
against full-step sampling, on calibration seeds; the scan reports PSNR and class accuracy on the
bench's seeds (batch k of 12 with seed k), which training never sees. Every variant computes the
same steps, so the same FLOPs: no timing is needed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..core.quality import psnr
from ..core.learned_forecast import LearnedForecast, save_learned_forecast
from ..tinymodels.bundled import KINDS, load, load_classifier
from ..tinymodels.sampling import make_scheduler, sample
from ..tinymodels.shapes import NUM_CLASSES
from .cli import int_at_least

STEPS, CFG, WARMUP, BATCH = 25, 3.0, 4, 12
CALIBRATION_SEED = 1000        # calibration batches use seeds 1000, 1001, ...; the bench's are 0, 1, ...


def skip_pattern(interval: int, steps: int = STEPS, warmup: int = WARMUP) -> str:
    """'F' computes, 'S' skips: diffusers TaylorSeer's schedule (cache_interval N,
    disable_cache_before_step `warmup`): the warm-up, then step s computes when (s - warmup - 1) % N
    == 0. At N=2 it is also AdaptiveDiffusion's at max_skip 1 and delta 1.0; at N=3 it skips one step
    after the warm-up and the last, where AdaptiveDiffusion (max_skip 2) skips two and computes the last,
    which costs 4.7 dB on the bench's first 12 images (33.3 vs 38.1 dB)."""
    return "".join("F" if s < warmup or (s - warmup - 1) % interval == 0 else "S" for s in range(steps))


class ForecastSkipper:
    """Wraps a denoiser: computes on 'F' steps and forecasts on 'S' steps with a LearnedForecast whose
    corrections are a trainable tensor (the same code the diffusers API runs from a saved file)."""

    def __init__(self, denoiser, pattern: str, history: int = 3, use_latent: bool = True, channels: int = 3,
                 model: str = ""):
        self.denoiser, self.pattern = denoiser, pattern
        self.corrections = torch.zeros(pattern.count("S"), history + int(use_latent), channels, requires_grad=True)
        self.forecast = LearnedForecast(pattern, self.corrections, history, use_latent, model,
                                        source="bench/learned_forecast.py")
        self.reset()

    def reset(self) -> None:
        self._step, self._entry = 0, None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        step, self._step = self._step, self._step + 1
        if self.pattern[step] == "F":
            out = self.denoiser(x, t, labels)
            self._entry = self.forecast.refresh(self._entry, out, step)
            return out
        return self.forecast.output(self._entry, step, latent=x)


def _batches(images: int, first_seed: int) -> list[tuple[torch.Tensor, int]]:
    labels = torch.arange(images) % NUM_CLASSES
    return [(labels[i:i + BATCH], first_seed + k) for k, i in enumerate(range(0, images, BATCH))]


def _sample_all(denoiser, batches, *, grad: bool = False) -> torch.Tensor:
    outs = []
    for labels, seed in batches:
        if isinstance(denoiser, ForecastSkipper):
            denoiser.reset()
        outs.append(sample(denoiser, labels, steps=STEPS, cfg=CFG, seed=seed, scheduler=make_scheduler(STEPS),
                           grad=grad))
    return torch.cat(outs)


def train(skipper: ForecastSkipper, batches, references: list[torch.Tensor], iters: int, lr: float) -> list[float]:
    """Adam on the mean squared error of the final images; one calibration batch per iteration."""
    optimizer = torch.optim.Adam([skipper.corrections], lr=lr)
    losses = []
    for it in tqdm(range(iters), desc="training corrections", leave=False):
        k = it % len(batches)
        out = _sample_all(skipper, [batches[k]], grad=True)
        loss = torch.nn.functional.mse_loss(out, references[k])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def scan(kind: str, intervals: list[int], calib_images: int, images: int, iters: int, lr: float,
         history: int, use_latent: bool, save_dir: Path | None = None) -> list[dict]:
    base, classifier = load(kind), load_classifier()
    for p in base.model.parameters():
        p.requires_grad_(False)
    channels = base.network.config.in_channels
    calibration, evaluation = _batches(calib_images, CALIBRATION_SEED), _batches(images, 0)
    labels = torch.cat([lab for lab, _ in evaluation])
    with torch.no_grad():
        calib_refs = [_sample_all(base, [b]) for b in calibration]
        reference = _sample_all(base, evaluation)

    @torch.no_grad()
    def scored(out: torch.Tensor) -> dict:
        return {"psnr_db": round(psnr(reference, out), 2),
                "accuracy": round((classifier(out).argmax(1) == labels).float().mean().item(), 3)}

    rows = []
    for interval in intervals:
        pattern = skip_pattern(interval)
        skipper = ForecastSkipper(base, pattern, history, use_latent, channels, model=f"bundled {kind}")
        with torch.no_grad():
            taylor = scored(_sample_all(skipper, evaluation))
        started = time.time()
        losses = train(skipper, calibration, calib_refs, iters, lr)
        with torch.no_grad():
            learned = scored(_sample_all(skipper, evaluation))
        rows.append({"model": kind, "interval": interval, "pattern": pattern, "work": round(pattern.count("F") / STEPS, 3),
                     "taylor": taylor, "learned": learned, "margin_db": round(learned["psnr_db"] - taylor["psnr_db"], 2),
                     "reference_accuracy": scored(reference)["accuracy"],
                     "train_s": round(time.time() - started), "first_loss": losses[0], "last_loss": losses[-1],
                     "corrections": skipper.corrections.detach().tolist()})
        if save_dir is not None:
            file = save_dir / f"{kind}_forecast_n{interval}_{STEPS}.safetensors"
            rows[-1]["file"] = str(save_learned_forecast(skipper.forecast, file))
        print({k: v for k, v in rows[-1].items() if k != "corrections"}, flush=True)
    return rows


def to_markdown(rows: list[dict], command: str, setup: str) -> str:
    lines = ["# Learned corrections to the skipped-step forecast (quality only)", "", f"Command: `{command}`", "",
             setup, "",
             "Both columns compute the same steps (work = computed steps / 25). PSNR against full-step sampling on "
             "the bench's seeds; class accuracy of the bundled classifier.", "",
             "| model | N | pattern | work | Taylor order 2: PSNR | accuracy | learned: PSNR | accuracy | margin (dB) "
             "| full-step accuracy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['interval']} | `{r['pattern']}` | {r['work']} | {r['taylor']['psnr_db']} | "
                     f"{r['taylor']['accuracy']} | {r['learned']['psnr_db']} | {r['learned']['accuracy']} | "
                     f"{r['margin_db']:+.2f} | {r['reference_accuracy']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Learned corrections to the skipped-step forecast, quality only")
    parser.add_argument("--model", choices=KINDS, default="dit")
    parser.add_argument("--intervals", nargs="+", type=int_at_least(2), default=[2, 3],
                        help="compute one step in N after the warm-up")
    parser.add_argument("--calib-images", type=int_at_least(1), default=48, help="training images (other seeds)")
    parser.add_argument("--images", type=int_at_least(1), default=96, help="evaluation images (the bench's seeds)")
    parser.add_argument("--iters", type=int_at_least(1), default=80)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--history", type=int_at_least(1), default=3, help="computed predictions per correction")
    parser.add_argument("--no-latent", action="store_true", help="do not use the step's latent as a regressor")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--save-dir", type=Path, default=None,
                        help="also save each trained forecast as <model>_forecast_n<N>_<steps>.safetensors here "
                             "(the file cachekit.apply_adaptive_skip(..., learned_forecast=) loads)")
    args = parser.parse_args(argv)
    if not 0 < args.lr < 1:
        parser.error(f"--lr must be between 0 and 1, got {args.lr}")
    if max(args.intervals) > STEPS - WARMUP:
        parser.error(f"--intervals must be at most {STEPS - WARMUP} ({STEPS} steps, {WARMUP} warm-up)")
    started = time.time()
    rows = scan(args.model, args.intervals, args.calib_images, args.images, args.iters, args.lr, args.history,
                not args.no_latent, args.save_dir)
    command = "python scripts/scan_learned_forecast.py " + " ".join(argv if argv is not None else sys.argv[1:])
    setup = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {(time.time() - started) / 60:.1f} min; "
             f"DDIM {STEPS} steps, CFG {CFG}; corrections trained on {args.calib_images} images (seeds from "
             f"{CALIBRATION_SEED}), {args.iters} Adam steps, lr {args.lr}, {args.history} computed predictions"
             f"{'' if args.no_latent else ' and the latent'} per skipped step and channel; evaluated on "
             f"{args.images} images.")
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"learned_forecast_{args.model}"
    (args.out / f"{name}.json").write_text(json.dumps({"command": command, "setup": setup, "rows": rows}, indent=1))
    (args.out / f"{name}.md").write_text(to_markdown(rows, command, setup))
    print(to_markdown(rows, command, setup))
