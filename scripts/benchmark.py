"""CacheKit benchmark: speed, work skipped, error and the runtime's own overhead.

    python scripts/benchmark.py [--repeats 7] [--steps 20] [--batch 8] [--out bench_out]

For each method on a diffusers model large enough that compute dominates (a U-Net for
DeepCache, a DiT for FORA), with one thread and the same seeds:

* speedup: wall time of a full sampling run, uncached vs. cached (interval 3), interleaved
  repeats in shuffled order, median of the per-round ratios;
* work executed: FLOP-weighted share of the model's work that ran (FlopCounterMode profile);
* PSNR of the final latent vs. uncached. Random weights: quality numbers here only show that
  the output stays sane; honest quality needs trained models;
* overhead (a): every unit through the runtime (interval 1) vs. the unpatched model;
* overhead (b): on cache steps, the time CacheKit itself adds (everything in the runtime and
  the host hooks outside the units' own compute, timed in a separate instrumented run) vs. the
  time of the work that still runs on those steps. The JSON also has "b_subtracted": the
  cache-step time vs. the uncached step time minus the reused units' separately measured
  times; it subtracts noisy numbers and swings by tens of percent on a shared CPU.

Ratios, not absolute times, are the result: two shared cores vary +-30 % run to run.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import load_pack  # noqa: E402

ck = load_pack()
from cachekit.bench.cli import int_at_least, run_cli  # noqa: E402
from cachekit.diffusers_host.api import CacheHandle  # noqa: E402
from cachekit.core.methods import registry  # noqa: E402
from cachekit.core.session import CacheSession  # noqa: E402
from cachekit.diffusers_host import registry as host  # noqa: E402
from cachekit.core.quality import psnr as image_psnr  # noqa: E402


def bench_unet():
    from diffusers import UNet2DConditionModel
    model = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, norm_num_groups=32, attention_head_dim=8).eval()
    return model, "sample", {"encoder_hidden_states": (8, 64)}, (4, 32, 32)


def bench_dit():
    from diffusers import DiTTransformer2DModel
    model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=4,
                                  num_layers=8, sample_size=32, patch_size=2, num_embeds_ada_norm=10).eval()
    return model, "hidden_states", {"class_labels": None}, (4, 32, 32)


BUILDERS = {"unet": bench_unet, "dit": bench_dit}


def _apply_with_interval(spec):
    """apply(model, scheduler, interval): the method with its "interval" setting (1 = off)."""
    interval = spec.with_role("interval").name
    return lambda m, s, i: host.apply(m, spec.key, scheduler=s, **{interval: i})


# Every registered unit-level method with an interval, on the model of its kind: what the
# runtime-overhead measures below need (units, a plan, interval 1 = every unit computed).
METHODS = {spec.name: (BUILDERS[spec.fits], _apply_with_interval(spec)) for spec in registry.methods()
           if spec.level == "unit" and spec.fits in BUILDERS and spec.with_role("interval") is not None}


class Sampler:
    """DDIM over the model, timing every model call."""

    def __init__(self, model, x_key, extra, shape, batch, steps, seed=0):
        from diffusers import DDIMScheduler
        self.model, self.x_key = model, x_key
        self.scheduler = DDIMScheduler()
        self.scheduler.set_timesteps(steps)
        g = torch.Generator().manual_seed(seed)
        self.x0 = torch.randn(batch, *shape, generator=g)
        self.kwargs = {}
        for name, spec in extra.items():
            self.kwargs[name] = (torch.arange(batch) % 10 if spec is None
                                 else torch.randn(batch, *spec, generator=g))

    def run(self, on_step=None):
        x = self.x0.clone()
        step_times = []
        with torch.no_grad():
            for i, t in enumerate(self.scheduler.timesteps):
                if on_step is not None:
                    on_step(i)
                start = time.perf_counter()
                out = self.model(**{self.x_key: x}, timestep=t.expand(x.shape[0]), **self.kwargs, return_dict=False)[0]
                step_times.append(time.perf_counter() - start)
                x = self.scheduler.step(out[:, : x.shape[1]], t, x).prev_sample
        return x, step_times


def psnr(ref: torch.Tensor, test: torch.Tensor) -> float:
    """PSNR of latents, with the reference's value range as the peak."""
    return image_psnr(ref, test, data_range=(ref.max() - ref.min()).item())


def unit_times(model, sampler, apply, units_holder):
    """Mean compute time of each unit over an interval-1 run (units timed one by one)."""
    sums: dict[int, list[float]] = {}
    original_init = CacheSession.__init__

    def timed_init(self, *a, **k):
        k["unit_timer"] = lambda i, dt: sums.setdefault(i, []).append(dt)
        original_init(self, *a, **k)

    CacheSession.__init__ = timed_init
    try:
        handle = apply(model, sampler.scheduler, 1)
        sampler.run()
        units_holder.append(handle.units)
        handle.remove()
    finally:
        CacheSession.__init__ = original_init
    return {i: statistics.median(v) for i, v in sums.items()}


def added_time_per_step(model, sampler, apply, interval):
    """Per step: seconds spent in CacheKit outside the units' compute, and the step times."""
    added = [0.0] * len(sampler.scheduler.timesteps)
    current = [0]
    computing = [0.0]
    originals = {}

    def instrument(cls, name, subtract_compute=False):
        original = getattr(cls, name)
        originals[(cls, name)] = original

        def timed(*a, **k):
            computing[0] = 0.0
            start = time.perf_counter()
            out = original(*a, **k)
            added[current[0]] += time.perf_counter() - start - (computing[0] if subtract_compute else 0.0)
            return out
        setattr(cls, name, timed)

    original_init = CacheSession.__init__

    def init(self, *a, **k):
        def timer(i, dt):
            computing[0] += dt
        k["unit_timer"] = timer
        original_init(self, *a, **k)

    CacheSession.__init__ = init
    instrument(CacheSession, "run_unit", subtract_compute=True)
    instrument(CacheHandle, "_before_call")
    instrument(CacheHandle, "_after_call")
    try:
        handle = apply(model, sampler.scheduler, interval)
        _, step_times = sampler.run(on_step=lambda i: current.__setitem__(0, i))
        handle.finish_run()
        plan = handle.runs[-1].reused
        handle.remove()
    finally:
        CacheSession.__init__ = original_init
        for (cls, name), original in originals.items():
            setattr(cls, name, original)
    return added, step_times, plan


def bench_method(name, args):
    build, apply = METHODS[name]
    model, x_key, extra, shape = build()
    sampler = Sampler(model, x_key, extra, shape, args.batch, args.steps)
    for p in model.parameters():
        p.requires_grad_(False)
    reference, _ = sampler.run()       # warm-up, and the uncached result

    variants = ["plain", "interval1", "cached"]
    times = {v: [] for v in variants}
    step_times = {v: [] for v in variants}
    results, telemetry = {}, None
    for r in range(args.repeats):
        order = variants[:]
        random.Random(r).shuffle(order)
        for v in order:
            handle = None if v == "plain" else apply(model, sampler.scheduler, 1 if v == "interval1" else args.interval)
            start = time.perf_counter()
            out, per_step = sampler.run()
            times[v].append(time.perf_counter() - start)
            step_times[v].append(per_step)
            if handle is not None:
                handle.finish_run()
                if v == "cached":
                    telemetry = handle.runs[-1]
                handle.remove()
            results[v] = out
    assert torch.equal(results["interval1"], reference), "interval 1 must equal the unpatched model exactly"

    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))
    speedup = ratio("plain", "cached")
    overhead_a = ratio("interval1", "plain") - 1

    # (b): cache steps vs. the time of the work that still runs on them.
    holder: list = []
    per_unit = unit_times(model, sampler, apply, holder)
    plan = telemetry.reused
    full_step = [statistics.median(run[s] for run in step_times["plain"]) for s in range(args.steps)]
    cached_step = [statistics.median(run[s] for run in step_times["cached"]) for s in range(args.steps)]
    cache_steps = [s for s in range(args.steps) if any(plan[s])]
    ideal = [full_step[s] - sum(per_unit.get(u, 0.0) for u, r in enumerate(plan[s]) if r) for s in cache_steps]
    b_subtracted = statistics.median(cached_step[s] / i for s, i in zip(cache_steps, ideal)) - 1
    added, instrumented_steps, _ = added_time_per_step(model, sampler, apply, args.interval)
    overhead_b = statistics.median(added[s] / (instrumented_steps[s] - added[s]) for s in cache_steps)
    return {
        "method": name, "model": type(model).__name__,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "steps": args.steps, "batch": args.batch, "interval": args.interval,
        "uncached_s": round(statistics.median(times["plain"]), 3),
        "speedup": round(speedup, 3),
        "ideal_speedup": round(telemetry.ideal_speedup(), 3),
        "work_executed": round(telemetry.executed_fraction(), 3),
        "hit_rate": round(telemetry.hit_rate, 3),
        "psnr_db": round(psnr(reference, results["cached"]), 2),
        "overhead_a_pct": round(100 * overhead_a, 2),
        "overhead_b_pct": round(100 * overhead_b, 2),
        "b_subtracted_pct": round(100 * b_subtracted, 2),
        "cache_step_s": round(statistics.median(cached_step[s] for s in cache_steps), 4),
        "ideal_cache_step_s": round(statistics.median(ideal), 4),
    }


def to_markdown(rows):
    cols = ["method", "model", "params_M", "speedup", "ideal_speedup", "work_executed", "hit_rate", "psnr_db",
            "overhead_a_pct", "overhead_b_pct", "uncached_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--repeats", type=int_at_least(1), default=7)
    parser.add_argument("--steps", type=int_at_least(2), default=20)
    parser.add_argument("--batch", type=int_at_least(1), default=8)
    parser.add_argument("--interval", type=int_at_least(2), default=3, help="cache interval (2 or more: 1 caches nothing)")
    parser.add_argument("--threads", type=int_at_least(1), default=1)
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)
    if args.steps <= args.interval:
        # Overhead (b) is measured on cache steps; with steps <= interval there are none.
        parser.error(f"--steps ({args.steps}) must be greater than --interval ({args.interval}), so that some "
                     "steps reuse the cache")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.methods:
        print(f"benchmarking {name} ...", flush=True)
        rows.append(bench_method(name, args))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(rows, indent=1))
    table = to_markdown(rows)
    (out / "benchmark.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    run_cli(main)
