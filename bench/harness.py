"""Benchmark harness: CacheKit and its peers on the bundled tiny models, same seeds.

    python scripts/bench_peers.py [--models dit unet] [--steps 25] [--images 12] [--repeats 3] [--out bench_out]

Per method and setting: measured wall speedup (cached and uncached runs alternate, median of
the per-round ratios), FLOPs executed vs. uncached (torch FlopCounterMode over the whole
sampling, the same measure for every method), PSNR and SSIM of the images vs. uncached,
class accuracy by the bundled classifier, and peak memory above the idle process. Writes
`peers.md`, `peers.json` and `peers.png` (speedup vs. PSNR).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
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
from .cli import float_in, int_at_least, run_cli
from .methods import Method, Setup, all_methods, cachekit_router, calibrate_magcache, diffusers_magcache
from .plot import scatter


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
    return sample(denoiser, labels, steps=steps, cfg=cfg, seed=seed, scheduler=setup.scheduler, on_step=setup.on_step)


def _install(method: Method, base: Denoiser, steps: int) -> Setup:
    scheduler = make_scheduler(steps)
    setup = method.install(base, scheduler, steps)
    setup.scheduler = scheduler
    return setup


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_memory(run) -> float:
    """Peak resident memory of `run()` above the resident memory before it (MiB; Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")    # resets the peak (VmHWM)
    except OSError:
        return float("nan")
    before = _rss_mib("VmRSS")
    run()
    return _rss_mib("VmHWM") - before


def _flops(run) -> float:
    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def bench_model(kind: str, methods: list[Method], *, steps: int, images: int, cfg: float, repeats: int,
                seed: int = 0) -> list[dict]:
    base, classifier = load(kind), load_classifier()
    labels = torch.arange(images) % NUM_CLASSES
    run_plain = lambda: _run(None, base, labels, steps, cfg, seed)
    run_plain()                                              # warm-up
    reference = run_plain()
    with torch.no_grad():
        reference_accuracy = (classifier(reference).argmax(1) == labels).float().mean().item()
    plain_flops = _flops(run_plain)
    plain_memory = _peak_memory(run_plain)
    if kind == "dit" and any(m.name == "MagCache" for m in methods):
        def calibration_run(method):
            setup = _install(method, base, steps)
            _run(setup, base, labels, steps, cfg, seed)
        ratios = {steps: calibrate_magcache(base, steps, calibration_run)}
        methods = [m for m in methods if m.name != "MagCache"] + [diffusers_magcache(t, ratios) for t in (0.06, 0.12)]
    rows = [{"model": kind, "method": "uncached", "setting": "-", "origin": "-", "speedup": 1.0, "flops_executed": 1.0,
             "psnr_db": float("inf"), "ssim": 1.0, "accuracy": round(reference_accuracy, 3),
             "peak_mem_mib": round(plain_memory, 1), "hit_rate": None}]
    for method in tqdm([m for m in methods if kind in m.models], desc=f"methods on {kind}", unit="method"):
        ratios, output, telemetry = [], None, None
        for r in range(repeats):
            setup = _install(method, base, steps)
            order = ("plain", "cached") if r % 2 == 0 else ("cached", "plain")
            times = {}
            for which in order:
                start = time.perf_counter()
                out = run_plain() if which == "plain" else _run(setup, base, labels, steps, cfg, seed)
                times[which] = time.perf_counter() - start
                if which == "cached":
                    output = out
            telemetry = setup.finish()
            ratios.append(times["plain"] / times["cached"])
        setup = _install(method, base, steps)
        flops = _flops(lambda: _run(setup, base, labels, steps, cfg, seed))
        setup.finish()
        setup = _install(method, base, steps)
        memory = _peak_memory(lambda: _run(setup, base, labels, steps, cfg, seed))
        setup.finish()
        with torch.no_grad():
            accuracy = (classifier(output).argmax(1) == labels).float().mean().item()
        rows.append({
            "model": kind, "method": method.name, "setting": method.setting, "origin": method.origin,
            "speedup": round(statistics.median(ratios), 3), "flops_executed": round(flops / plain_flops, 3),
            "psnr_db": round(psnr(reference, output), 2), "ssim": round(ssim(reference, output), 4),
            "accuracy": round(accuracy, 3), "peak_mem_mib": round(memory, 1),
            "hit_rate": round(telemetry.hit_rate, 3) if telemetry is not None and hasattr(telemetry, "hit_rate") else None,
        })
    return rows


def to_markdown(rows: list[dict]) -> str:
    cols = ["model", "origin", "method", "setting", "speedup", "flops_executed", "psnr_db", "ssim", "accuracy",
            "peak_mem_mib", "hit_rate"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |")
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
    parser = argparse.ArgumentParser(description="Benchmark CacheKit and peers on the bundled tiny models.")
    parser.add_argument("--models", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--steps", type=int_at_least(2), default=25)
    parser.add_argument("--images", type=int_at_least(1), default=12)
    parser.add_argument("--cfg", type=float_in(0), default=3.0)
    parser.add_argument("--repeats", type=int_at_least(1), default=3)
    parser.add_argument("--only", nargs="+", help="method names to run (default: all)")
    parser.add_argument("--router", nargs="*", default=[], type=_router_spec, metavar="FILE[:THRESHOLD]",
                        help="learned router files for the DiT (scripts/train_router.py), optionally with a threshold")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    args = parser.parse_args(argv)
    routers = [(load_any(path), threshold) for path, threshold in args.router]
    router_methods = [cachekit_router(router, threshold) for router, threshold in routers]
    everything = all_methods(magcache_ratios={}) + router_methods
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


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for kind in args.models:
        rows += bench_model(kind, args.methods, steps=args.steps, images=args.images, cfg=args.cfg,
                            repeats=args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(rows, indent=1))
    table = to_markdown(rows)
    (args.out / "peers.md").write_text(table + "\n")
    scatter([r for r in rows if r["method"] != "uncached"], args.out / "peers.png")
    print(table)


if __name__ == "__main__":
    run_cli(main)
