"""CacheKit demo: sample a tiny model uncached and cached, print the speedup and hit rates.

    python scripts/demo.py [--steps 20] [--batch 8]

Runs DeepCache on a small diffusers U-Net and FORA on a small DiT (random weights, no
downloads), interleaving uncached and cached runs, then shows per-step and per-block hit rates.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import METHODS, Sampler, psnr  # noqa: E402

BAR = "█"


def bars(values, labels, width=30):
    lines = []
    for label, v in zip(labels, values):
        v = 0.0 if v is None else v
        lines.append(f"  {label:>14} {BAR * round(v * width):<{width}} {v:5.0%}")
    return "\n".join(lines)


def group_rates(telemetry):
    groups: dict[str, list[float]] = {}
    for name, rate in zip(telemetry.unit_groups, telemetry.unit_hit_rates()):
        groups.setdefault(name, []).append(0.0 if rate is None else rate)
    return list(groups), [sum(v) / len(v) for v in groups.values()]


def demo(method: str, args) -> None:
    build, apply = METHODS[method]
    model, x_key, extra, shape = build()
    sampler = Sampler(model, x_key, extra, shape, args.batch, args.steps)
    print(f"\n== {method} on {type(model).__name__} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, {args.steps} steps, batch {args.batch})")
    reference, _ = sampler.run()     # warm-up
    plain, cached, telemetry, out = [], [], None, None
    for _ in tqdm(range(args.repeats), desc=f"{method}: uncached vs cached", unit="round"):
        start = time.perf_counter()
        reference, _ = sampler.run()
        plain.append(time.perf_counter() - start)
        handle = apply(model, sampler.scheduler, args.interval)
        start = time.perf_counter()
        out, _ = sampler.run()
        cached.append(time.perf_counter() - start)
        handle.finish_run()
        telemetry = handle.runs[-1]
        handle.remove()
    speedup = statistics.median(p / c for p, c in zip(plain, cached))
    print(f"uncached {statistics.median(plain):.2f} s, cached {statistics.median(cached):.2f} s: "
          f"speedup {speedup:.2f}x (FLOP-weighted ideal {telemetry.ideal_speedup():.2f}x)")
    print(f"hit rate {telemetry.hit_rate:.0%}, work executed {telemetry.executed_fraction():.0%}, "
          f"PSNR vs uncached {psnr(reference, out):.1f} dB (random weights: see README)")
    print("per step:")
    print(bars(telemetry.step_hit_rates(), [f"step {i}" for i in range(telemetry.num_steps)]))
    labels, rates = group_rates(telemetry)
    print("per block:")
    print(bars(rates, labels))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for method in args.methods:
        demo(method, args)


if __name__ == "__main__":
    main()
