"""Benchmark harness: CacheKit and its peers on the bundled tiny models, same seeds.

    python scripts/bench_peers.py [--models dit unet] [--steps 25] [--images 12] [--rounds 1] [--passes 2]
                                  [--out bench/results] [--router FILE[:THRESHOLD]]

Rows: every registered CacheKit method at its `bench` settings (core/methods/registry.py), the
same DDIM sampler with fewer steps, the official DeepCache package (branches 0 and 1), cache-dit
(DBCache with and without TaylorSeer) and diffusers' cache hooks (bench/methods.py). Per row:

* speed: CPU time, one thread. In each round the uncached run (the full-step sampler on the
  model) and the method's run go in lockstep: two threads take turns, one model call (with the
  sampler's work after it) at a time, and each run's CPU time (`time.thread_time()`) and wall
  time are summed over its own turns. glibc's allocator is set so that every run is served the
  same way (`steady_malloc`: its defaults made a run's speed depend on which thread started
  first and on per-thread arenas, by up to 40 %). Whatever else the machine does then slows
  both runs alike, so their ratio (uncached / method) holds on a shared machine. A pass measures every method for `rounds` rounds; the whole
  measurement runs `passes` times (the second pass in reverse method order), and each pass's
  speedup (median of its rounds) is reported, with whether the passes agree within the
  tolerance (default +-5 %). `speedup` is the median over every round of every pass; wall-clock
  ratios are reported too. Every uncached run must reproduce the reference images bit for bit
  (a check that no peer's hook touched the model).
* FLOPs executed vs. uncached (torch FlopCounterMode over the whole sampling, the same measure
  for every method; this run also warms the method up), PSNR and SSIM of the images vs. the
  full-step uncached images, class accuracy by the bundled classifier, peak memory above the
  idle process (the images and the memory come from one untimed run of the method alone),
  CacheKit's hit rate.

A peer that cannot run here (not installed, or its install fails) is a row with `status`
"unavailable: <why>", never silently left out. Writes `peers.md`, `peers.json`, `peers.png`
and the frontier (bench/frontier.py): `frontier.md`, `frontier.json`, `frontier_<model>.png`.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import statistics
import sys
import threading
import time
from typing import Callable
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
                      diffusers_magcache, dydit_methods, learned_forecast_methods)
from .plot import scatter

TOLERANCE = 0.05           # passes agree when max / min - 1 <= this
TIMING = "CPU time of uncached and method in lockstep (turns per model call), steady allocator"
UNCACHED = "uncached"


class _Wrapped(Denoiser):
    """A denoiser whose every call runs inside a setup's context (e.g. a diffusers cache context)."""

    def __init__(self, inner: Denoiser, wrap):
        super().__init__(inner.kind, inner.model)
        self._inner, self._wrap = inner, wrap

    def __call__(self, x, t, labels):
        return self._wrap(lambda: self._inner(x, t, labels))


class Turns:
    """Runs in threads that take turns on the CPU, one model call at a time.

    A run's turn starts at its model call and lasts until its next one (the sampler's work in
    between included). Each run's CPU time (its thread's `time.thread_time`) and wall time are
    summed over its own turns; a waiting thread is blocked and costs nothing. A run that is
    alone (the other finished, e.g. fewer steps) keeps the turn."""

    def __init__(self, names: list[str]):
        self._cond = threading.Condition()
        self._active = list(names)
        self._holder = names[0]
        self._open: dict[str, tuple[float, float]] = {}
        self.turns: dict[str, list[tuple[float, float]]] = {n: [] for n in names}   # (cpu, wall) per turn

    def take(self, me: str) -> None:
        with self._cond:
            if me in self._open:                       # my turn is running: hand it on
                others = [n for n in self._active if n != me]
                if not others:
                    return
                self._close(me)
                self._holder = others[0]
                self._cond.notify_all()
            self._cond.wait_for(lambda: self._holder == me)
            self._open[me] = (time.thread_time(), time.perf_counter())

    def finish(self, me: str) -> None:
        with self._cond:
            if me in self._open:
                self._close(me)
            self._active.remove(me)
            if self._holder == me:
                self._holder = self._active[0] if self._active else None
                self._cond.notify_all()

    def _close(self, me: str) -> None:
        cpu, wall = self._open.pop(me)
        self.turns[me].append((time.thread_time() - cpu, time.perf_counter() - wall))

    @property
    def cpu(self) -> dict[str, float]:
        return {n: sum(c for c, _ in turns) for n, turns in self.turns.items()}

    @property
    def wall(self) -> dict[str, float]:
        return {n: sum(w for _, w in turns) for n, turns in self.turns.items()}


class _TakingTurns(Denoiser):
    """Each model call first waits for its run's turn."""

    def __init__(self, inner: Denoiser, turns: Turns, name: str):
        super().__init__(inner.kind, inner.model)
        self._inner, self._turns, self._name = inner, turns, name

    def __call__(self, x, t, labels):
        self._turns.take(self._name)
        return self._inner(x, t, labels)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def steady_malloc(timing: bool) -> bool:
    """Make glibc's allocator behave the same for every run (False where libc is not glibc).

    Measured here, a run's CPU time depended on how glibc served the sampler's buffers: with one
    arena per thread, two threads running the same sampling differed by up to 18 %; with one
    arena, whichever run of a lockstep pair started first was up to 40 % slower for the whole
    run, because glibc's dynamic mmap threshold left it with fresh mmapped (page-faulting)
    buffers on every call while the other reused heap memory. Timing (`timing=True`): one arena,
    buffers up to 32 MiB from the heap, freed memory kept (no page faults after the first
    round); pairs then agree within a few percent in either order. Otherwise (memory
    measurement): glibc's default 128 KiB thresholds, fixed, so big buffers are mmapped and the
    resident size follows what is live."""
    try:
        import ctypes
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    big = (32 << 20, 1 << 30) if timing else (128 << 10, 128 << 10)
    return all(mallopt(option, value) == 1 for option, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, big[0]), (_M_TRIM_THRESHOLD, big[1])))


def lockstep(runs: dict[str, Callable[[Callable[[Denoiser], Denoiser]], torch.Tensor]]):
    """Run each `runs[name](wrap)` in its own thread, taking turns per model call (the first
    name starts). `wrap` is applied to the run's outermost denoiser. Returns (outputs, Turns).
    The allocator is set for timing (`steady_malloc`); measure memory after `steady_malloc(False)`."""
    steady_malloc(timing=True)
    turns, outputs, errors = Turns(list(runs)), {}, {}

    def go(name, run):
        try:
            turns.take(name)
            outputs[name] = run(lambda d: _TakingTurns(d, turns, name))
        except BaseException as error:      # noqa: BLE001 - re-raised in the caller's thread
            errors[name] = error
        finally:
            turns.finish(name)

    gc.collect()
    threads = [threading.Thread(target=go, args=item, daemon=True) for item in runs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise next(iter(errors.values()))
    return outputs, turns


def _run(setup: Setup | None, base: Denoiser, labels, steps, cfg, seed, wrap=None) -> torch.Tensor:
    wrap = wrap or (lambda d: d)
    if setup is None:
        return sample(wrap(base), labels, steps=steps, cfg=cfg, seed=seed, scheduler=make_scheduler(steps))
    denoiser = _Wrapped(setup.denoiser, setup.wrap_call) if setup.wrap_call else setup.denoiser
    return sample(wrap(denoiser), labels, steps=len(setup.scheduler.timesteps), cfg=cfg, seed=seed,
                  scheduler=setup.scheduler, on_step=setup.on_step)


def _install(method: Method, base: Denoiser, steps: int) -> Setup:
    scheduler = make_scheduler(steps)
    setup = method.install(base, scheduler, steps)
    if setup.scheduler is None:          # the fewer-steps baseline brings its own
        setup.scheduler = scheduler
    return setup


def calibrated_magcache(base: Denoiser, labels, steps: int, cfg: float, seed: int) -> dict:
    """MagCache's magnitude ratios for `steps` steps, calibrated on this model, labels and seed."""
    def calibration_run(method):
        setup = _install(method, base, steps)
        _run(setup, base, labels, steps, cfg, seed)
    return {steps: calibrate_magcache(base, steps, calibration_run)}


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
    steady_malloc(timing=False)          # memory is measured with glibc's default thresholds, fixed
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
        ratios = calibrated_magcache(base, labels, steps, cfg, seed)
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
            setup = _install(method, base, steps)          # the images and memory: the method alone, untimed
            output = []
            memory = _peak_memory(lambda: output.append(_run(setup, base, labels, steps, cfg, seed)))
            telemetry = setup.finish()
        except Exception as error:      # noqa: BLE001 - a peer that cannot run here becomes a row saying why
            failed(i, method, error)
            continue
        state[i] = {"flops": flops, "cpu": [[] for _ in range(passes)], "wall": [[] for _ in range(passes)],
                    "cached_cpu": [], "plain_cpu": [], "output": output[0], "telemetry": telemetry,
                    "memory": memory}

    runnable = [i for i in range(len(methods)) if i in state]
    bar = tqdm(total=passes * rounds * len(runnable), desc=f"{kind}: timing", unit="round", disable=not progress)
    for p in range(passes):
        for i in (runnable if p % 2 == 0 else runnable[::-1]):
            method, st = methods[i], state[i]
            for r in range(rounds):
                setup = _install(method, base, steps)
                runs = {"plain": lambda wrap: _run(None, base, labels, steps, cfg, seed, wrap),
                        "cached": lambda wrap: _run(setup, base, labels, steps, cfg, seed, wrap)}
                if (p + r) % 2:
                    runs = dict(reversed(runs.items()))         # alternate which run starts
                outputs, turns = lockstep(runs)
                setup.finish()
                if not torch.equal(outputs["plain"], reference):
                    raise RuntimeError(f"the uncached run changed after {method.origin} {method.name} "
                                       f"{method.setting}: something touched the shared model")
                st["cpu"][p].append(turns.cpu["plain"] / turns.cpu["cached"])
                st["wall"][p].append(turns.wall["plain"] / turns.wall["cached"])
                st["cached_cpu"].append(turns.cpu["cached"])
                st["plain_cpu"].append(turns.cpu["plain"])
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
    parser.add_argument("--setting-contains", nargs="+", metavar="TEXT",
                        help="run only rows whose setting contains one of these (e.g. --only FORA "
                             "--setting-contains start=), to add rows to an earlier run with scripts/merge_peers.py")
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
    everything = (all_methods(magcache_ratios={}, fewer=fewer) + dydit_methods() + learned_forecast_methods(args.steps)
                  + router_methods)
    known = sorted({m.name for m in everything})
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        parser.error(f"--only: unknown method {', '.join(unknown)}; choose from {', '.join(known)}")
    wanted = args.setting_contains
    selected = lambda m: ((not args.only or m.name in args.only)
                          and (not wanted or any(text in m.setting for text in wanted)))
    if not any(selected(m) for m in everything):
        parser.error(f"no benchmark row matches --only {' '.join(args.only or ['(all)'])} with --setting-contains "
                     f"{' '.join(wanted)}; rows' settings read like 'N=3 start=0.12 reuse=forecast2'")
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
            f"Measured {meta['date']} on {meta['machine']}; took {meta['runtime_min']} min. Speed: CPU time, one "
            f"thread, uncached and method in lockstep (turns per model call), {meta['rounds']} round(s) per method "
            f"in each of {meta['passes']} passes; "
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
        meta = {"command": shlex.join(["python", "scripts/bench_peers.py", *(sys.argv[1:] if argv is None else argv)]),
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": f"{platform.machine()} CPU, torch {torch.__version__}, 1 thread",
                "runtime_min": round((time.perf_counter() - started) / 60, 1), "steps": args.steps,
                "images": args.images, "cfg": args.cfg, "rounds": args.rounds, "passes": args.passes,
                "tolerance": args.tolerance, "models": args.models[:n + 1], "timing": TIMING}
        write_results(rows, meta, args.out, frontier=not args.no_frontier)     # after each model: a crash keeps it
    print(to_markdown(rows))
    print(f"\nwrote {args.out}/peers.* and frontier.* in {meta['runtime_min']} min")


if __name__ == "__main__":
    run_cli(main)
