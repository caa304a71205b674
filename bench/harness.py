"""Benchmark harness: CacheKit and its peers on the bundled tiny models, same seeds.

    python scripts/bench_peers.py [--models dit unet] [--steps 25] [--images 12] [--rounds 1] [--passes 2]
                                  [--out bench/results] [--router FILE[:THRESHOLD]]

Rows: every registered CacheKit method at its `bench` settings (core/methods/registry.py), the
same DDIM sampler with fewer steps, the official DeepCache package (branches 0 and 1), cache-dit
(DBCache with and without TaylorSeer) and diffusers' cache hooks (bench/methods.py). Per row:

* speed: process CPU time (`time.process_time()`, one thread) of the whole sampling. In each
  round the uncached run (the full-step sampler on the model) and the method's run alternate in
  order; the round's ratio is uncached / method. A pass measures every method for `rounds`
  rounds; the whole measurement runs `passes` times (the second pass in reverse method order),
  and each pass's speedup (median of its rounds) is reported, with whether the passes agree
  within the tolerance (default +-5 %). `speedup` is the median over every round of every pass;
  wall-clock ratios are reported too. Every uncached run must reproduce the reference images bit
  for bit (a check that no peer's hook touched the model).
* FLOPs executed vs. uncached (torch FlopCounterMode over the whole sampling, the same measure
  for every method; this run also warms the method up), PSNR and SSIM of the images vs. the
  full-step uncached images, class accuracy by the bundled classifier, peak memory above the
  idle process, CacheKit's hit rate.

A peer that cannot run here (not installed, or its install fails) is a row with `status`
"unavailable: <why>", never silently left out. Writes `peers.md`, `peers.json`, `peers.png`
and the frontier (bench/frontier.py): `frontier.md`, `frontier.json`, `frontier_<model>.png`.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from ..tinymodels.architectures import Denoiser
from ..tinymodels.bundled import KINDS, load, load_classifier
from ..tinymodels.sampling import make_scheduler, sample
from ..diffusers_host.units import dit_units
from ..core.methods.router import RouterPolicy
from ..core.quality import psnr, ssim
from ..core.routers import Router, load_any
from ..tinymodels.shapes import NUM_CLASSES
from .cli import existing_file, float_in, int_at_least, run_cli
from .methods import (CACHEKIT, Method, Setup, all_methods, cachekit_router, calibrate_magcache, default_fewer_steps,
                      diffusers_magcache)
from .plot import scatter

TOLERANCE = 0.05           # passes agree when max / min - 1 <= this
UNCACHED = "uncached"


class _Wrapped(Denoiser):
    """A denoiser whose every call runs inside a setup's context (e.g. a diffusers cache context)."""

    def __init__(self, inner: Denoiser, wrap):
        super().__init__(inner.kind, inner.model)
        self._inner, self._wrap = inner, wrap

    def __call__(self, x, t, labels):
        return self._wrap(lambda: self._inner(x, t, labels))


def _run(setup: Setup | None, base: Denoiser, labels, steps, cfg, seed) -> torch.Tensor:
    if setup is None:
        return sample(base, labels, steps=steps, cfg=cfg, seed=seed, scheduler=make_scheduler(steps))
    denoiser = _Wrapped(setup.denoiser, setup.wrap_call) if setup.wrap_call else setup.denoiser
    return sample(denoiser, labels, steps=len(setup.scheduler.timesteps), cfg=cfg, seed=seed,
                  scheduler=setup.scheduler, on_step=setup.on_step)


def _install(method: Method, base: Denoiser, steps: int) -> Setup:
    scheduler = make_scheduler(steps)
    setup = method.install(base, scheduler, steps)
    if setup.scheduler is None:          # the fewer-steps baseline brings its own
        setup.scheduler = scheduler
    return setup


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")    # resets the peak (VmHWM)
        return True
    except OSError:
        return False


def _peak_memory(run) -> float:
    """Peak resident memory of `run()` above the resident memory before it (MiB; Linux)."""
    if not _reset_peak():
        return float("nan")
    before = _rss_mib("VmRSS")
    run()
    return _rss_mib("VmHWM") - before


def _flops(run) -> float:
    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def _timed(run):
    """(process CPU seconds, wall seconds, output) of one sampling."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    out = run()
    return time.process_time() - cpu, time.perf_counter() - wall, out


def passes_agree(speedups: list[float], tolerance: float = TOLERANCE) -> bool | None:
    """Whether the passes' speedups agree within +-tolerance (max / min - 1); None for one pass."""
    values = [s for s in speedups if s is not None]
    if len(values) < 2:
        return None
    return max(values) / min(values) - 1 <= tolerance


def _median(values):
    return statistics.median(values) if values else None


def _round(value, digits):
    return None if value is None else round(value, digits)


def _unavailable_row(kind: str, method: Method, why: str) -> dict:
    return {"model": kind, "origin": method.origin, "method": method.name, "setting": method.setting,
            "key": method.key, "settings": dict(method.settings), "status": f"unavailable: {why}",
            "speedup": None, "speedup_passes": [], "passes_agree": None, "speedup_wall": None, "cpu_s": None,
            "flops_executed": None, "psnr_db": None, "ssim": None, "accuracy": None, "peak_mem_mib": None,
            "hit_rate": None}


def bench_model(kind: str, methods: list[Method], *, steps: int, images: int, cfg: float, rounds: int | None = None,
                passes: int = 2, seed: int = 0, tolerance: float = TOLERANCE, repeats: int | None = None,
                progress: bool = True) -> list[dict]:
    """One row per method that fits `kind` (uncached first). `repeats` is the old name of `rounds`."""
    rounds = rounds or repeats or 1
    base, classifier = load(kind), load_classifier()
    labels = torch.arange(images) % NUM_CLASSES
    run_plain = lambda: _run(None, base, labels, steps, cfg, seed)
    run_plain()                                              # warm-up
    reference = run_plain()

    @torch.no_grad()
    def accuracy_of(images_: torch.Tensor) -> float:
        return (classifier(images_).argmax(1) == labels).float().mean().item()
    plain_flops = _flops(run_plain)
    plain_memory = _peak_memory(run_plain)
    methods = [m for m in methods if kind in m.models]
    if kind == "dit" and any(m.name == "MagCache" and not m.unavailable for m in methods):
        def calibration_run(method):
            setup = _install(method, base, steps)
            _run(setup, base, labels, steps, cfg, seed)
        ratios = {steps: calibrate_magcache(base, steps, calibration_run)}
        at = next(i for i, m in enumerate(methods) if m.name == "MagCache")
        others = [m for m in methods if m.name != "MagCache"]
        before = sum(1 for m in methods[:at] if m.name != "MagCache")
        methods = others[:before] + [diffusers_magcache(t, ratios) for t in (0.06, 0.12)] + others[before:]

    state: dict[int, dict] = {}
    unavailable: dict[int, str] = {i: m.unavailable for i, m in enumerate(methods) if m.unavailable}

    def failed(i: int, method: Method, error: Exception) -> None:
        if method.origin == CACHEKIT:
            raise error                                     # CacheKit failing is a bug, never a row
        unavailable[i] = f"failed here: {type(error).__name__}: {' '.join(str(error).split())[:300]}"

    # FLOPs first: this run also warms each method up (one-off costs stay out of the timed rounds).
    for i, method in enumerate(tqdm(methods, desc=f"{kind}: FLOPs", unit="method", disable=not progress)):
        if i in unavailable:
            continue
        try:
            setup = _install(method, base, steps)
            flops = _flops(lambda: _run(setup, base, labels, steps, cfg, seed))
            setup.finish()
        except Exception as error:      # noqa: BLE001 - a peer that cannot run here becomes a row saying why
            failed(i, method, error)
            continue
        state[i] = {"flops": flops, "cpu": [[] for _ in range(passes)], "wall": [[] for _ in range(passes)],
                    "cached_cpu": [], "plain_cpu": [], "output": None, "telemetry": None, "memory": float("nan")}

    runnable = [i for i in range(len(methods)) if i in state]
    bar = tqdm(total=passes * rounds * len(runnable), desc=f"{kind}: timing", unit="round", disable=not progress)
    for p in range(passes):
        for i in (runnable if p % 2 == 0 else runnable[::-1]):
            method, st = methods[i], state[i]
            for r in range(rounds):
                setup = _install(method, base, steps)
                order = ("plain", "cached") if (p + r) % 2 == 0 else ("cached", "plain")
                times = {}
                for which in order:
                    if which == "cached":
                        measure_memory = st["output"] is None and _reset_peak()
                        before = _rss_mib("VmRSS") if measure_memory else None
                        cpu, wall, out = _timed(lambda: _run(setup, base, labels, steps, cfg, seed))
                        if measure_memory:
                            st["memory"] = _rss_mib("VmHWM") - before
                        if st["output"] is None:
                            st["output"] = out
                    else:
                        cpu, wall, out = _timed(run_plain)
                        if not torch.equal(out, reference):
                            raise RuntimeError(f"the uncached run changed after {method.origin} {method.name} "
                                               f"{method.setting}: something touched the shared model")
                    times[which] = (cpu, wall)
                st["telemetry"] = setup.finish()
                st["cpu"][p].append(times["plain"][0] / times["cached"][0])
                st["wall"][p].append(times["plain"][1] / times["cached"][1])
                st["cached_cpu"].append(times["cached"][0])
                st["plain_cpu"].append(times["plain"][0])
                bar.update()
    bar.close()

    rows = [{"model": kind, "origin": "-", "method": UNCACHED, "setting": f"steps={steps}", "key": "",
             "settings": {"steps": steps}, "status": "ok", "speedup": 1.0, "speedup_passes": [1.0] * passes,
             "passes_agree": True, "speedup_wall": 1.0,
             "cpu_s": _round(_median([c for st in state.values() for c in st["plain_cpu"]]), 3),
             "flops_executed": 1.0, "psnr_db": float("inf"), "ssim": 1.0, "accuracy": round(accuracy_of(reference), 3),
             "peak_mem_mib": round(plain_memory, 1), "hit_rate": None}]
    for i, method in enumerate(methods):
        if i not in state:
            rows.append(_unavailable_row(kind, method, unavailable[i]))
            continue
        st = state[i]
        per_pass = [_median(ratios) for ratios in st["cpu"]]
        output, telemetry = st["output"], st["telemetry"]
        hit_rate = getattr(telemetry, "hit_rate", None) if telemetry is not None else None
        rows.append({
            "model": kind, "origin": method.origin, "method": method.name, "setting": method.setting,
            "key": method.key, "settings": dict(method.settings), "status": "ok",
            "speedup": round(_median([r for ratios in st["cpu"] for r in ratios]), 3),
            "speedup_passes": [_round(s, 3) for s in per_pass],
            "passes_agree": passes_agree(per_pass, tolerance),
            "speedup_wall": round(_median([r for ratios in st["wall"] for r in ratios]), 3),
            "cpu_s": round(_median(st["cached_cpu"]), 3),
            "flops_executed": round(st["flops"] / plain_flops, 3),
            "psnr_db": round(psnr(reference, output), 2), "ssim": round(ssim(reference, output), 4),
            "accuracy": round(accuracy_of(output), 3), "peak_mem_mib": round(st["memory"], 1),
            "hit_rate": _round(hit_rate, 3),
        })
    return rows


COLUMNS = ["model", "origin", "method", "setting", "speedup", "speedup_passes", "passes_agree", "speedup_wall",
           "flops_executed", "psnr_db", "ssim", "accuracy", "peak_mem_mib", "hit_rate", "status"]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return " / ".join(_cell(v) for v in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def to_markdown(rows: list[dict], cols: list[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _router_spec(text: str) -> tuple[Path, float | None]:
    """FILE[:THRESHOLD] -> (file, threshold); the file must exist."""
    path, sep, tail = text.rpartition(":")
    if not sep:
        path, tail = text, ""
    try:
        threshold = float(tail) if tail else None
    except ValueError:
        path, threshold = text, None          # a ':' that belongs to the file name
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"no such router file: {path}")
    return Path(path), threshold


def _check_router_fits(router: Router, steps: int) -> None:
    """A router for another model or step count fails now, before any benchmark run."""
    policy = RouterPolicy(router)
    policy.check_units(dit_units(load("dit").network)[0])
    policy.check_steps(steps)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark CacheKit and peers on the bundled tiny models; "
                                                 "writes peers.* and the Pareto frontier frontier.*.")
    parser.add_argument("--models", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--steps", type=int_at_least(2), default=25)
    parser.add_argument("--images", type=int_at_least(1), default=12)
    parser.add_argument("--cfg", type=float_in(0), default=3.0)
    parser.add_argument("--rounds", "--repeats", dest="rounds", type=int_at_least(1), default=1,
                        help="interleaved uncached/cached rounds per method in each pass (default 1)")
    parser.add_argument("--passes", type=int_at_least(1), default=2,
                        help="times the whole speed measurement runs (default 2: a repeatability check)")
    parser.add_argument("--tolerance", type=float_in(0, 1, low_open=True), default=TOLERANCE,
                        help="passes agree when their speedups differ by at most this fraction (default 0.05)")
    parser.add_argument("--fewer-steps", nargs="+", type=int_at_least(1), metavar="K",
                        help="step counts of the fewer-steps baseline (default: about 1/3 to 4/5 of --steps)")
    parser.add_argument("--only", nargs="+", help="method names to run (default: all)")
    parser.add_argument("--router", nargs="*", default=[], type=_router_spec, metavar="FILE[:THRESHOLD]",
                        help="learned router files for the DiT (scripts/train_router.py), optionally with a threshold")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--no-frontier", action="store_true", help="write peers.* only")
    parser.add_argument("--frontier-from", type=existing_file, metavar="PEERS_JSON",
                        help="measure nothing: rebuild frontier.* in --out from a peers.json of an earlier run")
    args = parser.parse_args(argv)
    if args.frontier_from:
        return args
    fewer = args.fewer_steps if args.fewer_steps is not None else default_fewer_steps(args.steps)
    too_many = [k for k in fewer if k >= args.steps]
    if too_many:
        parser.error(f"--fewer-steps: {too_many[0]} is not fewer than --steps ({args.steps})")
    routers = [(load_any(path), threshold) for path, threshold in args.router]
    router_methods = [cachekit_router(router, threshold) for router, threshold in routers]
    everything = all_methods(magcache_ratios={}, fewer=fewer) + router_methods
    known = sorted({m.name for m in everything})
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        parser.error(f"--only: unknown method {', '.join(unknown)}; choose from {', '.join(known)}")
    selected = lambda m: not args.only or m.name in args.only
    if "dit" in args.models:
        for (router, _), method in zip(routers, router_methods):
            if selected(method):
                _check_router_fits(router, args.steps)
    args.methods = [m for m in everything if selected(m)]
    return args


def write_results(rows: list[dict], meta: dict, out: Path, frontier: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "peers.md").write_text(_meta_lines(meta) + "\n" + to_markdown(rows) + "\n")
    scatter([r for r in rows if r["method"] != UNCACHED and r["status"] == "ok"], out / "peers.png")
    if frontier:
        from .frontier import build, write
        write(build(rows, meta), out)


def _meta_lines(meta: dict) -> str:
    return (f"Command: `{meta['command']}`  \n"
            f"Measured {meta['date']} on {meta['machine']}; took {meta['runtime_min']} min. Speed: process CPU time, "
            f"one thread, {meta['rounds']} interleaved round(s) per method in each of {meta['passes']} passes; "
            f"`speedup_passes` lists each pass, `passes_agree` whether they agree within +-{meta['tolerance']:.0%}. "
            f"Quality vs. the {meta['steps']}-step uncached images ({meta['images']} images, CFG {meta['cfg']}).\n")


def main(argv=None):
    args = parse_args(argv)
    if args.frontier_from:
        from .frontier import build, load_rows, write
        rows, meta = load_rows(args.frontier_from)
        write(build(rows, meta), args.out)
        print(f"wrote {args.out}/frontier.* from {args.frontier_from}")
        return
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = []
    for n, kind in enumerate(args.models):
        rows += bench_model(kind, args.methods, steps=args.steps, images=args.images, cfg=args.cfg,
                            rounds=args.rounds, passes=args.passes, tolerance=args.tolerance)
        meta = {"command": " ".join(["python", "scripts/bench_peers.py", *(sys.argv[1:] if argv is None else argv)]),
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": f"{platform.machine()} CPU, torch {torch.__version__}, 1 thread",
                "runtime_min": round((time.perf_counter() - started) / 60, 1), "steps": args.steps,
                "images": args.images, "cfg": args.cfg, "rounds": args.rounds, "passes": args.passes,
                "tolerance": args.tolerance, "models": args.models[:n + 1]}
        write_results(rows, meta, args.out, frontier=not args.no_frontier)     # after each model: a crash keeps it
    print(to_markdown(rows))
    print(f"\nwrote {args.out}/peers.* and frontier.* in {meta['runtime_min']} min")


if __name__ == "__main__":
    run_cli(main)
