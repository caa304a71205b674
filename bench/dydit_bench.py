"""The bundled tiny DyDiT measured: FLOPs, CPU speed against the dense DiT, sliced vs masked, quality.

    python scripts/bench_dydit.py [--name dit_dydit_50] [--steps 25] [--images 24] [--rounds 3]
                                  [--batches 1 8] [--width-start 0.08] [--seed 0]
                                  [--out bench/results]

* FLOPs: the share of the transformer blocks' FLOPs that ran (apply_dydit's telemetry, closed
  form, token routers included) over the quality run, and the mean active heads, MLP groups and
  tokens kept.
* speed: CPU time, one thread. The dense bundled DiT and the DyDiT (sliced, apply_dydit) sample
  the same labels and seed in lockstep (bench/harness.lockstep: two threads take turns per model
  call, CPU time per thread, one malloc arena), `rounds` rounds per batch size with the starting
  run alternating; the speedup is the median of dense CPU / DyDiT CPU. Batch b is b images, so 2b
  rows per model call (CFG).
* sliced vs masked: the same DyDiT with the same decisions run masked (every head, group and
  token computed and multiplied by its gate: the official execution, tinymodels/train_dydit's
  MaskedDyDiT in eval) against apply_dydit's sliced run, in lockstep; also the largest pixel
  difference of their images (they must agree).
* quality: `images` images (labels cycling through the classes), DDIM `steps`, CFG 3, the same
  seed: PSNR / SSIM against the dense DiT's images and class accuracy by the bundled classifier,
  for the DyDiT and for its fine-tuned weights run dense (no routing), which separates what the
  fine-tuning changed from what the routing drops.
* width start (`--width-start`, default 0.08): the same DyDiT with full width for the first
  steps (apply_dydit's width_start_percent; the token routers still act), its quality and its
  speed against the dense DiT, beside the official DyDiT's.
* stacked: the peers bench's rows (bench/methods.py dydit_methods: DyDiT alone, + FORA N=2,
  + AdaptiveDiffusion) through bench/harness.bench_model, against the dense DiT.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..core.quality import psnr, ssim
from ..diffusers_host.dydit import apply_dydit
from ..tinymodels.bundled import DYDIT, load, load_classifier, load_dydit
from ..tinymodels.sampling import make_scheduler, sample
from ..tinymodels.shapes import NUM_CLASSES
from ..tinymodels.train_dydit import MaskedDyDiT
from .cli import int_at_least, run_cli
from .harness import bench_model, lockstep, to_markdown
from .methods import _copy, dydit_methods

SPEED_GOAL, SLICED_GOAL, ACCURACY_POINTS = 1.4, 1.3, 5.0


def _sampler(denoiser, labels, steps, cfg, seed):
    return lambda wrap: sample(wrap(denoiser), labels, steps=steps, cfg=cfg, seed=seed,
                               scheduler=make_scheduler(steps))


def paired_speed(first, second, labels, *, steps: int, cfg: float, rounds: int, seed: int = 0) -> dict:
    """CPU time of `first` / `second` (two (name, denoiser)) sampling in lockstep, per round."""
    (a, da), (b, db) = first, second
    ratios, cpu = [], {a: [], b: []}
    for r in range(rounds):
        runs = {a: _sampler(da, labels, steps, cfg, seed), b: _sampler(db, labels, steps, cfg, seed)}
        if r % 2:
            runs = dict(reversed(runs.items()))
        _, turns = lockstep(runs)
        ratios.append(turns.cpu[a] / turns.cpu[b])
        for name in (a, b):
            cpu[name].append(turns.cpu[name])
    return {"speedup": round(statistics.median(ratios), 3), "rounds": [round(x, 3) for x in ratios],
            f"{a}_cpu_s": round(statistics.median(cpu[a]), 3), f"{b}_cpu_s": round(statistics.median(cpu[b]), 3)}


def measure(name: str = DYDIT, *, steps: int = 25, images: int = 24, cfg: float = 3.0, rounds: int = 3,
            batches: tuple[int, ...] = (1, 8), stacked: bool = True, seed: int = 0, width_start: float = 0.0,
            progress: bool = True) -> dict:
    torch.set_num_threads(1)
    dense = load("dit")
    dydit, routers = load_dydit(name)
    sliced = _copy(dydit)
    handle = apply_dydit(sliced.network, routers, num_inference_steps=steps)
    warm, warm_handle = None, None            # full width for the first steps (apply_dydit's width_start_percent)
    if width_start > 0:
        warm = _copy(dydit)
        warm_handle = apply_dydit(warm.network, routers, num_inference_steps=steps, width_start_percent=width_start)
    masked = _copy(dydit)
    masking = MaskedDyDiT(masked.model, routers.eval())
    classifier = load_classifier()
    say = print if progress else (lambda *a, **k: None)

    labels = torch.arange(images) % NUM_CLASSES
    run = lambda d: sample(d, labels, steps=steps, cfg=cfg, seed=seed, scheduler=make_scheduler(steps))
    with torch.no_grad():
        accuracy = lambda x: round((classifier(x).argmax(1) == labels).float().mean().item(), 3)
        scores = lambda x: {"accuracy": accuracy(x), "psnr_db": round(psnr(reference, x), 2),
                            "ssim": round(ssim(reference, x), 4)}
        say("quality: dense, DyDiT sliced, masked, fine-tuned weights dense" + (", DyDiT width-start" if warm is not None else ""))
        reference = run(dense)
        handle.finish_run()
        out_sliced = run(sliced)
        telemetry = handle.finish_run()
        out_masked = run(masked)
        out_complete = run(dydit)
        quality = {"images": images, "steps": steps, "cfg": cfg, "seed": seed,
                   "dense": {"accuracy": accuracy(reference)}, "dydit": scores(out_sliced),
                   "finetuned_dense": scores(out_complete),
                   "sliced_vs_masked_max_abs": float((out_sliced - out_masked).abs().max())}
        flops = {"executed_fraction": round(telemetry.executed_fraction(), 4), "summary": telemetry.summary(),
                 "mean_heads_per_step": [_mean(row) for row in telemetry.mean_heads()],
                 "mean_groups_per_step": [_mean(row) for row in telemetry.mean_groups()],
                 "token_keep_per_step": [_mean(row) for row in telemetry.token_keep_rates()],
                 "heads": telemetry.geometry.heads, "mlp_groups": telemetry.geometry.mlp_groups,
                 "slice_builds": telemetry.slice_builds, "slice_cache_bytes": telemetry.cache_bytes}
        if warm is not None:
            warm_handle.finish_run()
            quality["width_start"] = {"percent": width_start, **scores(run(warm))}
            flops["width_start_executed_fraction"] = round(warm_handle.finish_run().executed_fraction(), 4)

    speed = {}
    for batch in batches:
        batch_labels = torch.arange(batch) % NUM_CLASSES
        say(f"speed at batch {batch}: dense vs DyDiT, then masked vs sliced"
            + (", then dense vs DyDiT width-start" if warm is not None else "") + f" ({rounds} rounds each)")
        for model in (sliced, masked) + ((warm,) if warm is not None else ()):       # warm-up: slices built
            sample(model, batch_labels, steps=steps, cfg=cfg, seed=seed)
        pair = lambda a, b: paired_speed(a, b, batch_labels, steps=steps, cfg=cfg, rounds=rounds, seed=seed)
        speed[str(batch)] = {"vs_dense": pair(("dense", dense), ("dydit", sliced)),
                             "sliced_vs_masked": pair(("masked", masked), ("sliced", sliced))}
        if warm is not None:
            speed[str(batch)]["width_start_vs_dense"] = pair(("dense", dense), ("dydit", warm))
    for h in (handle, warm_handle):
        if h is not None:
            h.finish_run()
            h.remove()
    masking.remove()

    rows = []
    if stacked:
        say(f"stacked rows (bench/methods.py) through the peers harness, {images} images")
        rows = bench_model("dit", dydit_methods(), steps=steps, images=images, cfg=cfg, rounds=1, passes=2,
                           progress=progress)
    record_file = Path(__file__).resolve().parents[1] / "tinymodels" / "weights" / f"{name}.train.json"
    training = json.loads(record_file.read_text()) if record_file.is_file() else {}
    return {"name": name, "flops": flops, "quality": quality, "speed": speed, "stacked_rows": rows,
            "training": {k: training.get(k) for k in ("lambda", "steps", "train_minutes", "settings", "eval")}}


def _mean(row):
    values = [v for v in row if v is not None]
    return round(sum(values) / len(values), 3) if values else None


def verdicts(result: dict) -> list[str]:
    """The goal's lines: for the official DyDiT and, when measured, with full width for the first steps."""
    q, at8 = result["quality"], result["speed"].get("8")
    variants = [("DyDiT", "dydit", "vs_dense")]
    if "width_start" in q:
        variants.append((f"DyDiT, full width for the first {q['width_start']['percent']:.0%} of steps", "width_start",
                         "width_start_vs_dense"))
    lines = []
    for label, key, speed_key in variants:
        if at8 and speed_key in at8:
            s = at8[speed_key]["speedup"]
            lines.append(f"{label}: CPU speed over the dense DiT at batch 8: {s:.2f}x (goal {SPEED_GOAL}x: "
                         f"{'met' if s >= SPEED_GOAL else 'NOT met'})")
        drop = 100 * (q["dense"]["accuracy"] - q[key]["accuracy"])
        lines.append(f"{label}: class accuracy {q[key]['accuracy']:.1%} vs dense {q['dense']['accuracy']:.1%} "
                     f"({abs(drop):.1f} points {'below' if drop > 0 else 'above'}; goal within "
                     f"{ACCURACY_POINTS:g} points: {'met' if drop <= ACCURACY_POINTS else 'NOT met'})")
    if at8:
        m = at8["sliced_vs_masked"]["speedup"]
        lines.append(f"sliced over masked, same decisions, batch 8: {m:.2f}x (goal {SLICED_GOAL}x: "
                     f"{'met' if m >= SLICED_GOAL else 'NOT met'})")
    return lines


def to_markdown_report(result: dict, meta: dict) -> str:
    q, f, t = result["quality"], result["flops"], result["training"]
    lines = [f"# DyDiT on the bundled tiny DiT ({result['name']})", "",
             f"Command: `{meta['command']}`  ", f"Measured {meta['date']} on {meta['machine']}; took "
             f"{meta['runtime_min']} min.", ""]
    if t.get("steps"):
        lines += [f"Training: lambda {t['lambda']}, {t['steps']} fine-tuning steps, {t['train_minutes']} CPU-minutes "
                  f"(tinymodels/weights/{result['name']}.train.json); eval-mode FLOPs ratio over DDIM {q['steps']} "
                  f"timesteps (masked, official form): {t['eval']['flops_ratio']}.", ""]
    lines += ["## Verdict", ""] + [f"- {v}" for v in verdicts(result)] + [""]
    lines += ["## FLOPs", "", f"- blocks' FLOPs executed (closed form, token routers included): "
              f"{f['executed_fraction']:.1%}", f"- {f['summary']}",
              f"- sliced weight sets built: {f['slice_builds']}, their peak memory {f['slice_cache_bytes'] / 1e6:.2f} MB",
              "", "| step | mean heads (of %d) | mean MLP groups (of %d) | tokens through the MLP |" % (f["heads"],
                                                                                                f["mlp_groups"]),
              "| --- | --- | --- | --- |"]
    for i, (h, g, k) in enumerate(zip(f["mean_heads_per_step"], f["mean_groups_per_step"], f["token_keep_per_step"])):
        lines.append(f"| {i} | {h} | {g} | {k} |")
    lines += ["", f"## Quality ({q['images']} images, DDIM {q['steps']}, CFG {q['cfg']}, seed {q['seed']})", "",
              "| run | class accuracy | PSNR vs dense (dB) | SSIM vs dense |", "| --- | --- | --- | --- |",
              f"| dense bundled DiT | {q['dense']['accuracy']:.3f} | - | - |",
              f"| DyDiT (sliced) | {q['dydit']['accuracy']:.3f} | {q['dydit']['psnr_db']} | {q['dydit']['ssim']} |",
              f"| fine-tuned weights, run dense | {q['finetuned_dense']['accuracy']:.3f} | "
              f"{q['finetuned_dense']['psnr_db']} | {q['finetuned_dense']['ssim']} |"]
    if "width_start" in q:
        w = q["width_start"]
        lines.append(f"| DyDiT, full width for the first {w['percent']:.0%} of steps (FLOPs executed "
                     f"{f['width_start_executed_fraction']:.1%}) | {w['accuracy']:.3f} | {w['psnr_db']} | {w['ssim']} |")
    lines += ["",
              f"Sliced vs masked images, largest difference: {q['sliced_vs_masked_max_abs']:.2e} (pixel range [-1, 1]).",
              "", "## CPU speed (one thread, lockstep, median of rounds)", "",
              "| batch (images) | DyDiT over dense | rounds | dense CPU s | DyDiT CPU s | sliced over masked | rounds |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for batch, s in result["speed"].items():
        d, m = s["vs_dense"], s["sliced_vs_masked"]
        lines.append(f"| {batch} | {d['speedup']:.2f}x | {d['rounds']} | {d['dense_cpu_s']} | {d['dydit_cpu_s']} | "
                     f"{m['speedup']:.2f}x | {m['rounds']} |")
    warm = {batch: s["width_start_vs_dense"] for batch, s in result["speed"].items() if "width_start_vs_dense" in s}
    if warm:
        lines += ["", f"Full width for the first {q['width_start']['percent']:.0%} of steps, against the dense DiT:", "",
                  "| batch (images) | over dense | rounds | dense CPU s | DyDiT CPU s |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {batch} | {d['speedup']:.2f}x | {d['rounds']} | {d['dense_cpu_s']} | {d['dydit_cpu_s']} |"
                  for batch, d in warm.items()]
    if result["stacked_rows"]:
        lines += ["", "## Stacked (the peers bench's rows, against the dense DiT)", "",
                  to_markdown(result["stacked_rows"])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench_dydit.py", description="Measure the bundled tiny DyDiT.")
    parser.add_argument("--name", default=DYDIT, help="weights in tinymodels/weights (default %(default)s)")
    parser.add_argument("--steps", type=int_at_least(2), default=25)
    parser.add_argument("--images", type=int_at_least(1), default=24)
    parser.add_argument("--rounds", type=int_at_least(1), default=3)
    parser.add_argument("--batches", type=int_at_least(1), nargs="+", default=[1, 8])
    parser.add_argument("--width-start", type=float, default=0.08,
                        help="also measure the DyDiT with full width for this fraction of the first steps "
                             "(apply_dydit's width_start_percent; 0: the official DyDiT only; default %(default)s)")
    parser.add_argument("--seed", type=int_at_least(0), default=0,
                        help="noise seed of every sampling (another seed: images the defaults were not chosen on)")
    parser.add_argument("--no-stacked", action="store_true", help="skip the stacked peers-bench rows")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder")
    if not 0.0 <= args.width_start < 1.0:
        parser.error(f"--width-start {args.width_start} is not a fraction of the steps in [0, 1)")
    load_dydit(args.name)                    # a missing file is reported before anything runs
    started = time.perf_counter()
    result = measure(args.name, steps=args.steps, images=args.images, rounds=args.rounds,
                     batches=tuple(args.batches), stacked=not args.no_stacked, width_start=args.width_start,
                     seed=args.seed)
    meta = {"command": shlex.join(["python", "scripts/bench_dydit.py", *(sys.argv[1:] if argv is None else argv)]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()} CPU, torch {torch.__version__}, 1 thread",
            "runtime_min": round((time.perf_counter() - started) / 60, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dydit.json").write_text(json.dumps({"meta": meta, **result}, indent=1, default=str))
    report = to_markdown_report(result, meta)
    (args.out / "dydit.md").write_text(report)
    print(report)


if __name__ == "__main__":
    run_cli(main)
