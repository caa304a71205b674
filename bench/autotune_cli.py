"""Autotune CLI: choose a method's settings for a PSNR or speedup target, by measuring.

    python scripts/autotune.py --model unet --method deepcache --target-psnr 30
    python scripts/autotune.py --model dit --method fora --target-speedup 2
    python scripts/autotune.py --pipeline ./my-local-pipeline --prompt "a cat" --method adaptive --target-psnr 30

--model tunes a bundled tiny model (DDIM, CFG 3, one image per class). --pipeline tunes a
diffusers pipeline saved on disk (never downloads); --prompt for text-to-image pipelines,
--class-labels for class-conditional ones (DiT). Prints the report; --json writes it all.
--quick: fewer steps, images and candidates, a first answer in minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from ..core.autotune import METHODS, check_target
from ..diffusers_host.autotune import autotune_diffusers
from .cli import fill_defaults, int_at_least, output_file, pipeline_dir, run_cli


def _bundled(kind: str, steps: int, images: int, seed: int):
    # Imported here, after the arguments are checked: the models import all of diffusers (seconds).
    from ..tinymodels.bundled import load
    from ..tinymodels.sampling import make_scheduler, sample
    from ..tinymodels.shapes import NUM_CLASSES
    denoiser = load(kind)
    scheduler = make_scheduler(steps)
    labels = torch.arange(images) % NUM_CLASSES
    return denoiser.network, scheduler, (lambda: sample(denoiser, labels, steps=steps, cfg=3.0, seed=seed,
                                                         scheduler=scheduler)), 2.0


def _pipeline(path: Path, prompt: str | None, class_labels: list[int] | None, steps: int, seed: int):
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt": prompt} if prompt is not None else {"class_labels": class_labels or [0]}

    def run():
        return pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                    output_type="pt").images
    return pipe, None, run, 1.0          # images in [0, 1]


# What --quick and a full run sample (a full calibration run of the bundled U-Net is 50 DDIM
# steps of 6 images with CFG; --quick cuts every run about 7x and tries fewer candidates).
FULL = {"steps": 50, "images": 6, "max_trials": 24}
QUICK = {"steps": 20, "images": 2, "max_trials": 6}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Choose caching settings for a quality or speed target.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=("unet", "dit"), help="a bundled tiny model")
    source.add_argument("--pipeline", type=pipeline_dir, help="a diffusers pipeline folder (local only)")
    parser.add_argument("--method", choices=METHODS, required=True)
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-psnr", type=float, help="minimum PSNR vs. uncached (dB)")
    goal.add_argument("--target-speedup", type=float, help="minimum measured speedup")
    parser.add_argument("--prompt")
    parser.add_argument("--class-labels", type=int_at_least(0), nargs="+")
    parser.add_argument("--quick", action="store_true",
                        help=f"a first answer in minutes: {QUICK['steps']} steps, {QUICK['images']} images, at most "
                             f"{QUICK['max_trials']} candidates (default {FULL['steps']}, {FULL['images']}, "
                             f"{FULL['max_trials']})")
    parser.add_argument("--steps", type=int_at_least(1), help=f"sampling steps (default {FULL['steps']})")
    parser.add_argument("--images", type=int_at_least(1),
                        help=f"bundled models: images per calibration run (default {FULL['images']})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int_at_least(1), default=1, help="timings per candidate (the best counts)")
    parser.add_argument("--max-trials", type=int_at_least(1), help=f"default {FULL['max_trials']}")
    parser.add_argument("--json", type=output_file(".json"))
    args = parser.parse_args(argv)
    fill_defaults(args, FULL, QUICK)
    args.target = ("psnr", args.target_psnr) if args.target_psnr is not None else ("speedup", args.target_speedup)
    check_target(*args.target)
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.model:
        target, scheduler, run, data_range = _bundled(args.model, args.steps, args.images, args.seed)
    else:
        target, scheduler, run, data_range = _pipeline(args.pipeline, args.prompt, args.class_labels, args.steps, args.seed)
    kind, value = args.target
    bar = None          # made at the first calibration run: an error before it prints no bar

    def progress(done, total):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=f"autotune {args.method}", unit="run")
        bar.n = done
        bar.refresh()
    result = autotune_diffusers(target, run, method=args.method, target_kind=kind, value=value, scheduler=scheduler,
                                num_inference_steps=None if scheduler is not None else args.steps,
                                data_range=data_range, repeats=args.repeats, max_trials=args.max_trials,
                                progress=progress)
    if bar is not None:
        bar.close()
    print(result.report())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.as_dict(), indent=1))
    return result


if __name__ == "__main__":
    run_cli(main)
