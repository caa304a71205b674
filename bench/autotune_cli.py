"""Autotune CLI: choose a method's settings for a PSNR or speedup target, by measuring.

    python scripts/autotune.py --model unet --method deepcache --target-psnr 30
    python scripts/autotune.py --model dit --method fora --target-speedup 2
    python scripts/autotune.py --pipeline ./my-local-pipeline --prompt "a cat" --method adaptive --target-psnr 30

--model tunes a bundled tiny model (DDIM, CFG 3, one image per class). --pipeline tunes a
diffusers pipeline saved on disk (never downloads); --prompt for text-to-image pipelines,
--class-labels for class-conditional ones (DiT). Prints the report; --json writes it all.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from ..core.autotune import METHODS
from ..core.diffusers_autotune import autotune_diffusers
from ..tinymodels.bundled import load
from ..tinymodels.sampling import make_scheduler, sample
from ..tinymodels.shapes import NUM_CLASSES


def _bundled(kind: str, steps: int, images: int, seed: int):
    denoiser = load(kind)
    scheduler = make_scheduler(steps)
    labels = torch.arange(images) % NUM_CLASSES
    return denoiser.network, scheduler, (lambda: sample(denoiser, labels, steps=steps, cfg=3.0, seed=seed,
                                                         scheduler=scheduler)), 2.0


def _pipeline(path: str, prompt: str | None, class_labels: list[int] | None, steps: int, seed: int):
    from diffusers import DiffusionPipeline
    if not Path(path).is_dir():
        raise SystemExit(f"--pipeline must be a folder with a saved diffusers pipeline (save_pretrained); got {path}")
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt": prompt} if prompt is not None else {"class_labels": class_labels or [0]}

    def run():
        return pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                    output_type="pt").images
    return pipe, None, run, 1.0          # images in [0, 1]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Choose caching settings for a quality or speed target.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=("unet", "dit"), help="a bundled tiny model")
    source.add_argument("--pipeline", help="a diffusers pipeline folder (local only)")
    parser.add_argument("--method", choices=METHODS, required=True)
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-psnr", type=float, help="minimum PSNR vs. uncached (dB)")
    goal.add_argument("--target-speedup", type=float, help="minimum measured speedup")
    parser.add_argument("--prompt")
    parser.add_argument("--class-labels", type=int, nargs="+")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=6, help="bundled models: images per calibration run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="timings per candidate (the best counts)")
    parser.add_argument("--max-trials", type=int, default=24)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.model:
        target, scheduler, run, data_range = _bundled(args.model, args.steps, args.images, args.seed)
    else:
        target, scheduler, run, data_range = _pipeline(args.pipeline, args.prompt, args.class_labels, args.steps, args.seed)
    kind, value = ("psnr", args.target_psnr) if args.target_psnr is not None else ("speedup", args.target_speedup)
    bar = tqdm(total=1, desc=f"autotune {args.method}", unit="run")

    def progress(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()
    result = autotune_diffusers(target, run, method=args.method, target_kind=kind, value=value, scheduler=scheduler,
                                num_inference_steps=None if scheduler is not None else args.steps,
                                data_range=data_range, repeats=args.repeats, max_trials=args.max_trials,
                                progress=progress)
    bar.close()
    print(result.report())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.as_dict(), indent=1))
    return result


if __name__ == "__main__":
    main()
