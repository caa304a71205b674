"""Hot-path benchmark: what CacheKit's runtime costs on top of the work it actually does.

    python scripts/bench_hotpath.py [--quick]     # parts A, B, P (+ C in a subprocess when COMFYUI_DIR is set)
    source scripts/comfy_env.sh && $PYTHON scripts/bench_hotpath.py --comfy [--quick]   # part C, merged into
                                                  # bench/results/hotpath.{json,md}
    python scripts/bench_hotpath.py --parts P --merge   # re-run some parts, keep the others

Writes bench/results/hotpath.md and .json (--json / --md / --no-write).

A. DeepCache through CacheKit's diffusers API vs the official `DeepCache.DeepCacheSDHelper`
   (pip package DeepCache 0.1.1) on the bundled tiny U-Net, (N=3, branch 0) and (N=2, branch 1),
   each batch size (images; the model sees twice as many with CFG), DDIM: CPU time of the whole
   sampling (ratio ours / official, target <= 1.05), bit-identical images, and the bytes each
   keeps cached: ours (`telemetry.cache_bytes`, or what the session's stores hold at the end of
   the run where that attribute does not exist yet), the official helper's `cached_output`, and
   "today's store" (the model of the store before the lean hot path: every unit a cache step
   reuses keeps a copy of its whole output). Targets: ours <= official; branch 0 <= 1/10 of
   today's store.
B. Interval 1 (caching off) through the runtime vs the unpatched model, diffusers host: FORA on
   the bundled DiT and DeepCache on the bundled U-Net; CPU time ratio (target <= 1.02) and exact
   output equality.
P. Python function calls (cProfile) in one model call: a cache step of ours vs the official
   helper, and an interval-1 step vs the unpatched model; where our calls go.
C. (`--comfy`, ComfyUI's Python, COMFYUI_DIR) the real ComfyUI host, in-process with
   comfy.sample: (1) interval-1 overhead vs the unpatched ModelPatcher for DeepCache (sd15) and
   FORA (pixart, flux); (2) a DeepCache cache step's measured model-call time vs the uncached
   cost of what still runs (the computed blocks' times and the non-block remainder, timed on
   the unpatched model's full steps).

Timing: one thread, `time.process_time()` around each sampling, methods interleaved round by
round (the order alternates), medians of the per-round ratios; also the ratio of the fastest
runs, the median CPU time per model call (full and cache steps apart), minor page faults, and a
control (the unpatched model timed again in the same rounds: 1.0 up to the machine's noise).
Every method of a comparison runs on the same model instance, installed before and removed
after each sampling (outside the timing): copies of identical weights differ by several percent
in speed. The first round is timed apart ("first run": one-off costs such as FLOP profiling land
there) and left out of the medians. Every ratio is reported pass or fail against its target;
nothing is tuned to pass.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import importlib.util
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from .cli import fill_defaults, int_at_least, output_file

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TARGETS = {"deepcache_vs_official": 1.05, "interval1_overhead": 1.02, "branch0_vs_today": 0.1}
# CacheKit's own code for the profiles: the package minus the benchmark, models, tests, scripts, venv.
NOT_RUNTIME = tuple(str(ROOT / d) + os.sep for d in (".venv", "bench", "tinymodels", "tests", "scripts"))
SETTINGS = ((3, 0), (2, 1))          # (cache_interval, cache_branch) of part A
COMFY_FAMILIES = {"sd15": "deepcache", "pixart": "fora", "flux": "fora"}
# Latent sizes of part C: the tiny SD1.5 U-Net has self-attention at full latent resolution (32
# latent px: 1 s per call on one core), ComfyUI's PixArt needs at least 33 px.
COMFY_SIZES = {"sd15": 16, "pixart": 40, "flux": 32}

FULL = {"steps": 12, "rounds": 3, "batches": [2, 8], "b_steps": 6, "b_rounds": 6, "b_batch": 2,
        "comfy_steps": 8, "comfy_rounds": 6, "comfy_families": list(COMFY_FAMILIES)}
QUICK = {"steps": 8, "rounds": 2, "batches": [2, 8], "b_steps": 6, "b_rounds": 3, "b_batch": 2,
         "comfy_steps": 6, "comfy_rounds": 5, "comfy_families": ["sd15", "pixart"]}
CFG = 3.0


# -- measuring ---------------------------------------------------------------------------------
def cpu_time(run: Callable[[], Any]) -> tuple[float, Any]:
    """(process CPU seconds, result) of run(); garbage is collected before, outside the timing."""
    gc.collect()
    start = time.process_time()
    out = run()
    return time.process_time() - start, out


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def tensors_in(obj: Any, depth: int = 0, seen: set | None = None) -> list[torch.Tensor]:
    """Every tensor reachable from obj through containers, dataclasses and slotted objects."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > 8 or id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type, torch.dtype,
                                                        torch.device, torch.nn.Module)) or obj is None:
        return []
    seen.add(id(obj))
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    else:
        children = list(getattr(obj, "__dict__", {}).values())
        for cls in type(obj).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if hasattr(obj, name):
                    children.append(getattr(obj, name))
    found = []
    for child in children:
        found += tensors_in(child, depth + 1, seen)
    return found


def tensor_bytes(obj: Any) -> dict[str, int]:
    """bytes: numel * element_size summed over distinct tensors (a tensor referenced twice, e.g. a
    layer's output that is also its block's output, counts once); held: bytes of the distinct
    storages behind them (what stays allocated)."""
    views, storages = {}, {}
    for t in tensors_in(obj):
        views[(t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)] = t.numel() * t.element_size()
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return {"bytes": sum(views.values()), "held": sum(storages.values()), "tensors": len(views)}


# -- the bundled models ------------------------------------------------------------------------
def _tiny():
    # Imported when needed: the models import all of diffusers (seconds).
    from ..tinymodels.architectures import Denoiser
    from ..tinymodels.bundled import load
    from ..tinymodels.sampling import make_scheduler, sample
    from ..tinymodels.shapes import NUM_CLASSES
    return Denoiser, load, make_scheduler, sample, NUM_CLASSES


class _TimedCalls:
    """CPU time of every model call (two clock reads per call, on both sides of a comparison)."""

    def __init__(self, inner):
        self.inner, self.times = inner, []

    def __call__(self, x, t, labels):
        start = time.process_time()
        out = self.inner(x, t, labels)
        self.times.append(time.process_time() - start)
        return out


class _Runner:
    """One way of sampling a shared bundled model: run() installs the method (not timed), samples
    once (timed), reads what it cached and uninstalls it (not timed).

    Every method of a comparison runs on the SAME model instance: two copies of identical weights
    can differ by up to 10 % in speed on a busy 2-core machine (memory placement), which would
    swamp the ratios measured here. install(scheduler) -> (denoiser, after, uninstall)."""

    def __init__(self, name: str, base, labels: torch.Tensor, steps: int, install: Callable | None = None):
        self.name, self.base, self.labels, self.steps = name, base, labels, steps
        self.install = install or (lambda scheduler: (base, lambda: {}, lambda: None))
        self.faults = 0

    def run(self) -> tuple[float, torch.Tensor, dict, list[float]]:
        """(CPU seconds of the sampling, images, after() (e.g. cache bytes; not timed), CPU seconds of
        each model call)."""
        _, _, make_scheduler, sample, _ = _tiny()
        scheduler = make_scheduler(self.steps)
        denoiser, after, uninstall = self.install(scheduler)
        try:
            timed = _TimedCalls(denoiser)
            faults = _minor_faults()
            seconds, image = cpu_time(lambda: sample(timed, self.labels, steps=self.steps, cfg=CFG, seed=0,
                                                     scheduler=scheduler))
            self.faults = _minor_faults() - faults
            extra = after()
        finally:
            uninstall()
        return seconds, image, extra, timed.times

    def profile(self, index: int) -> "pstats.Stats":
        """cProfile of the index-th model call of one sampling (install and after as in run())."""
        _, _, make_scheduler, sample, _ = _tiny()
        scheduler = make_scheduler(self.steps)
        denoiser, after, uninstall = self.install(scheduler)
        try:
            probe = _ProfileCall(denoiser, index)
            sample(probe, self.labels, steps=self.steps, cfg=CFG, seed=0, scheduler=scheduler)
            after()
        finally:
            uninstall()
        return probe.stats


def _minor_faults() -> int:
    """Minor page faults of this process so far (memory first touched after the allocator handed it
    back to the OS, or grew; the kernel's zeroing is CPU time too). 0 where unsupported."""
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return 0


def _ms(values: list[float]) -> float | None:
    return round(1000 * statistics.median(values), 3) if values else None


def _min_ratio(a: list[float], b: list[float]) -> float | None:
    return round(min(a) / min(b), 4) if a and b else None


def _scalar_timestep(denoiser):
    """The official helper reads the timestep with `.item()`: pass it as a 0-d tensor, as diffusers
    pipelines do (bench/methods.py drives it the same way)."""
    Denoiser = _tiny()[0]

    class ScalarTimestep(Denoiser):
        def __call__(self, x, t, labels):
            return super().__call__(x, t.flatten()[0], labels)
    return ScalarTimestep(denoiser.kind, denoiser.model)


def _ours_deepcache(base, labels, steps, interval, branch) -> _Runner:
    def install(scheduler):
        from .. import apply_deepcache          # the package's public diffusers API
        handle = apply_deepcache(base.network, cache_interval=interval, cache_branch=branch, scheduler=scheduler)
        return base, lambda: _finish_ours(handle), handle.remove
    return _Runner("CacheKit", base, labels, steps, install)


def _finish_ours(handle) -> dict:
    """Our cache bytes for the run that just ended, then end the run (drops the stores)."""
    session = handle.session
    fallback = (tensor_bytes([getattr(session, "_stores", None), getattr(session, "_region_stores", None)])
                if session is not None else None)
    telemetry = handle.finish_run()
    value = getattr(telemetry, "cache_bytes", None)
    if isinstance(value, int):
        return {"bytes": value, "source": "telemetry.cache_bytes (peak)", "hit_rate": telemetry.hit_rate}
    if fallback is None:
        return {"bytes": None, "source": "no session"}
    return {"bytes": fallback["bytes"], "held": fallback["held"], "tensors": fallback["tensors"],
            "hit_rate": telemetry.hit_rate,
            "source": "fallback: tensors reachable from handle.session._stores at the end of the run "
                      "(telemetry.cache_bytes does not exist yet)"}


def _official_deepcache(base, labels, steps, interval, branch) -> _Runner:
    def install(scheduler):
        from DeepCache import DeepCacheSDHelper
        pipe = type("Pipe", (), {"unet": base.network, "scheduler": scheduler})()
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        # The helper keeps every wrapped module's last computed output in `cached_output` until
        # disable() (its reset_states()).
        return (_scalar_timestep(base),
                lambda: {**tensor_bytes(helper.cached_output), "source": "DeepCacheSDHelper.cached_output"},
                helper.disable)
    return _Runner("official", base, labels, steps, install)


def official_units(unet) -> list[tuple[torch.nn.Module, str, int, int]]:
    """(module, kind, block, layer) of every unit the official helper wraps below the block level,
    in its numbering (counted from the shallow end on both paths)."""
    units = []
    for b, block in enumerate(unet.down_blocks):
        for layer, m in enumerate(getattr(block, "attentions", None) or []):
            units.append((m, "down", b, layer))
        for layer, m in enumerate(block.resnets):
            units.append((m, "down", b, layer))
        for m in block.downsamplers or []:
            units.append((m, "down", b, len(block.resnets)))
    units.append((unet.mid_block, "mid", 0, 0))
    n = len(unet.up_blocks)
    for i, block in enumerate(unet.up_blocks):
        layers = len(block.resnets)
        for j, m in enumerate(getattr(block, "attentions", None) or []):
            units.append((m, "up", n - i - 1, layers - j - 1))
        for j, m in enumerate(block.resnets):
            units.append((m, "up", n - i - 1, layers - j - 1))
        for m in block.upsamplers or []:
            units.append((m, "up", n - i - 1, 0))
    return units


def reused_on_cache_step(kind: str, block: int, layer: int, branch: int) -> bool:
    """The official helper's is_skip_step on a cache step (3 layers per block, hard-coded there)."""
    cache_block, cache_layer = divmod(branch, 3)
    if kind == "mid" or block > cache_block:
        return True
    if block < cache_block:
        return False
    return layer >= cache_layer if kind == "down" else layer > cache_layer


def todays_store_bytes(base, labels: torch.Tensor, branch: int) -> dict:
    """The store before the lean hot path: every unit that a cache step reuses keeps a copy of its
    whole output (measured with forward hooks on one uncached model call of this batch)."""
    unet = base.network
    outputs, hooks = [], []
    for module, kind, block, layer in official_units(unet):
        if reused_on_cache_step(kind, block, layer, branch):
            hooks.append(module.register_forward_hook(lambda m, a, out: outputs.append(out)))
    both = torch.cat([labels, labels])
    x = torch.zeros(both.shape[0], 3, 32, 32)
    try:
        with torch.no_grad():
            base(x, torch.full((both.shape[0],), 500), both)
    finally:
        for h in hooks:
            h.remove()
    counted = tensor_bytes(outputs)
    return {"bytes": counted["bytes"], "units": len(hooks)}


# -- part A ------------------------------------------------------------------------------------
def part_a(*, steps: int, rounds: int, batches: list[int], progress: bool = True) -> list[dict]:
    _, load, _, _, num_classes = _tiny()
    base = load("unet")                    # one instance: every method of every setting runs on it
    configs = []
    for batch in batches:
        labels = torch.arange(batch) % num_classes
        for interval, branch in SETTINGS:
            configs.append({"batch": batch, "interval": interval, "branch": branch, "labels": labels,
                            "runners": (_ours_deepcache(base, labels, steps, interval, branch),
                                        _official_deepcache(base, labels, steps, interval, branch)),
                            "times": {"CacheKit": [], "official": []}, "first": {}, "identical": True,
                            "max_abs_diff": 0.0, "bytes": {},
                            "calls": {(who, full): [] for who in ("CacheKit", "official") for full in (True, False)},
                            "faults": {"CacheKit": [], "official": []}})
    bar = tqdm(total=(rounds + 1) * len(configs) * 2, desc="A: DeepCache ours vs official", unit="run",
               disable=not progress)
    for r in range(rounds + 1):                 # round 0: first runs (timed, reported apart)
        for c in configs:
            runners = c["runners"] if r % 2 == 0 else c["runners"][::-1]
            images = {}
            for runner in runners:
                seconds, image, extra, calls = runner.run()
                images[runner.name] = image
                c["bytes"][runner.name] = extra
                if r == 0:
                    c["first"][runner.name] = seconds
                else:
                    c["times"][runner.name].append(seconds)
                    c["faults"][runner.name].append(runner.faults)
                    for i, call in enumerate(calls):       # one call per step; full steps: i % N == 0
                        c["calls"][(runner.name, i % c["interval"] == 0)].append(call)
                bar.update()
            diff = (images["CacheKit"] - images["official"]).abs().max().item()
            c["identical"] &= torch.equal(images["CacheKit"], images["official"])
            c["max_abs_diff"] = max(c["max_abs_diff"], diff)
    bar.close()
    rows = []
    for c in configs:
        ratios = [o / f for o, f in zip(c["times"]["CacheKit"], c["times"]["official"])]
        today = todays_store_bytes(base, c["labels"], c["branch"])
        ours_bytes, official_bytes = c["bytes"]["CacheKit"], c["bytes"]["official"]
        ratio = median(ratios)
        row = {
            "batch": c["batch"], "model_batch": 2 * c["batch"], "interval": c["interval"], "branch": c["branch"],
            "steps": steps, "rounds": rounds,
            "ours_cpu_s": median(c["times"]["CacheKit"]), "official_cpu_s": median(c["times"]["official"]),
            "ratio": ratio, "ratios": [round(x, 4) for x in ratios],
            "min_ratio": _min_ratio(c["times"]["CacheKit"], c["times"]["official"]),
            "first_run_ratio": round(c["first"]["CacheKit"] / c["first"]["official"], 4),
            "ours_page_faults": int(statistics.median(c["faults"]["CacheKit"])),
            "official_page_faults": int(statistics.median(c["faults"]["official"])),
            "ours_full_call_ms": _ms(c["calls"][("CacheKit", True)]),
            "official_full_call_ms": _ms(c["calls"][("official", True)]),
            "ours_cache_call_ms": _ms(c["calls"][("CacheKit", False)]),
            "official_cache_call_ms": _ms(c["calls"][("official", False)]),
            "bit_identical": c["identical"], "max_abs_diff": c["max_abs_diff"],
            "ours_hit_rate": ours_bytes.get("hit_rate"),
            "ours_bytes": ours_bytes.get("bytes"), "ours_bytes_source": ours_bytes.get("source"),
            "official_bytes": official_bytes["bytes"], "official_held_bytes": official_bytes["held"],
            "official_tensors": official_bytes["tensors"],
            "today_bytes": today["bytes"], "today_units": today["units"],
            "pass_time": ratio is not None and ratio <= TARGETS["deepcache_vs_official"],
        }
        for kind in ("full", "cache"):
            o, f = row[f"ours_{kind}_call_ms"], row[f"official_{kind}_call_ms"]
            row[f"{kind}_call_ratio"] = round(o / f, 4) if o and f else None
        if "tensors" in ours_bytes:
            row["ours_tensors"] = ours_bytes["tensors"]
        ob = row["ours_bytes"]
        row["pass_bytes_vs_official"] = ob is not None and ob <= row["official_bytes"]
        row["pass_branch0_tenth"] = (ob is not None and ob <= TARGETS["branch0_vs_today"] * today["bytes"]
                                     ) if c["branch"] == 0 else None
        rows.append(row)
    return rows


# -- part B ------------------------------------------------------------------------------------
def _interval1_runners(kind: str, base, labels, steps):
    """Unpatched, patched with caching off (interval 1), and a control (unpatched again), all on `base`."""
    from .. import apply_deepcache, apply_fora
    method = "FORA interval=1" if kind == "dit" else "DeepCache cache_interval=1"

    def install(scheduler):
        handle = (apply_fora(base.network, interval=1, scheduler=scheduler) if kind == "dit"
                  else apply_deepcache(base.network, cache_interval=1, scheduler=scheduler))
        return base, lambda: {"hit_rate": handle.finish_run().hit_rate}, handle.remove
    return method, (_Runner("unpatched", base, labels, steps), _Runner("patched", base, labels, steps, install),
                    _Runner("control", base, labels, steps))


def part_b(*, steps: int, rounds: int, batch: int, progress: bool = True) -> list[dict]:
    _, load, _, _, num_classes = _tiny()
    labels = torch.arange(batch) % num_classes
    setups = []
    for kind in ("dit", "unet"):
        # Control: the unpatched model timed again in the same rounds shows this machine's noise.
        method, runners = _interval1_runners(kind, load(kind), labels, steps)
        setups.append({"kind": kind, "method": method, "runners": runners,
                       "times": {"unpatched": [], "patched": [], "control": []}, "first": {}, "identical": True,
                       "hit_rate": 0.0, "calls": {"unpatched": [], "patched": [], "control": []},
                       "faults": {"unpatched": [], "patched": [], "control": []}})
    bar = tqdm(total=(rounds + 1) * len(setups) * 3, desc="B: interval 1 vs unpatched", unit="run",
               disable=not progress)
    for r in range(rounds + 1):
        for s in setups:
            runners = s["runners"] if r % 2 == 0 else s["runners"][::-1]
            images = {}
            for runner in runners:
                seconds, image, extra, calls = runner.run()
                images[runner.name] = image
                s["hit_rate"] = max(s["hit_rate"], extra.get("hit_rate", 0.0))
                if r == 0:
                    s["first"][runner.name] = seconds
                else:
                    s["times"][runner.name].append(seconds)
                    s["calls"][runner.name] += calls
                    s["faults"][runner.name].append(runner.faults)
                bar.update()
            s["identical"] &= torch.equal(images["patched"], images["unpatched"])
            s["identical"] &= torch.equal(images["control"], images["unpatched"])
    bar.close()
    rows = []
    for s in setups:
        ratios = [p / u for p, u in zip(s["times"]["patched"], s["times"]["unpatched"])]
        ratio = median(ratios)
        per_call = median([1000 * (p - u) / steps for p, u in zip(s["times"]["patched"], s["times"]["unpatched"])])
        control = [c / u for c, u in zip(s["times"]["control"], s["times"]["unpatched"])]
        rows.append({"model": s["kind"], "method": s["method"], "batch": batch, "model_batch": 2 * batch,
                     "steps": steps, "rounds": rounds, "unpatched_cpu_s": median(s["times"]["unpatched"]),
                     "patched_cpu_s": median(s["times"]["patched"]), "ratio": ratio,
                     "ratios": [round(x, 4) for x in ratios], "overhead_ms_per_call": per_call,
                     "min_ratio": _min_ratio(s["times"]["patched"], s["times"]["unpatched"]),
                     "unpatched_page_faults": int(statistics.median(s["faults"]["unpatched"])),
                     "patched_page_faults": int(statistics.median(s["faults"]["patched"])),
                     "unpatched_call_ms": _ms(s["calls"]["unpatched"]), "patched_call_ms": _ms(s["calls"]["patched"]),
                     "call_ratio": round(statistics.median(s["calls"]["patched"])
                                         / statistics.median(s["calls"]["unpatched"]), 4),
                     "control_ratio": median(control), "control_ratios": [round(x, 4) for x in control],
                     "control_call_ratio": round(statistics.median(s["calls"]["control"])
                                                 / statistics.median(s["calls"]["unpatched"]), 4),
                     "first_run_ratio": round(s["first"]["patched"] / s["first"]["unpatched"], 4),
                     "outputs_equal": s["identical"], "hit_rate": s["hit_rate"],
                     "pass_time": ratio is not None and ratio <= TARGETS["interval1_overhead"]})
    return rows


# -- part P: Python calls per model call -------------------------------------------------------
class _ProfileCall:
    """Profiles the `index`-th model call of a sampling run (cProfile: Python function calls)."""

    def __init__(self, denoiser, index: int):
        self.inner, self.index, self.calls, self.stats = denoiser, index, 0, None
        self.kind, self.model = denoiser.kind, denoiser.model

    def __call__(self, x, t, labels):
        self.calls += 1
        if self.calls - 1 != self.index:
            return self.inner(x, t, labels)
        profiler = cProfile.Profile()
        out = profiler.runcall(self.inner, x, t, labels)
        self.stats = pstats.Stats(profiler)
        return out


def _cachekit_rows(stats: "pstats.Stats") -> list:
    return [(func, row) for func, row in stats.stats.items()
            if func[0].startswith(str(ROOT) + os.sep) and not func[0].startswith(NOT_RUNTIME)]


def _call_profile(runner: _Runner, index: int, top: int = 8, repeats: int = 3) -> dict:
    # Call counts are deterministic; own times are not (a garbage-collector pass lands in whichever
    # function allocates at that moment): of `repeats` profiles, keep the one with the least time
    # in CacheKit's code.
    profiles = []
    for _ in range(repeats):
        gc.collect()
        profiles.append(runner.profile(index))
    stats = min(profiles, key=lambda st: sum(row[2] for _, row in _cachekit_rows(st)))
    ours = _cachekit_rows(stats)
    # pstats rows: (primitive calls, total calls, own time, cumulative time, callers)
    ours.sort(key=lambda item: -item[1][2])
    return {"function_calls": stats.total_calls, "primitive_calls": stats.prim_calls,
            "cachekit_calls": sum(row[1] for _, row in ours),
            "cachekit_own_ms": round(1000 * sum(row[2] for _, row in ours), 3),
            "top_cachekit": [{"function": _where(f), "calls": row[1], "own_ms": round(1000 * row[2], 3)}
                             for f, row in ours[:top]],
            "top_all": [{"function": _where(f), "calls": row[1], "own_ms": round(1000 * row[2], 3)}
                        for f, row in sorted(stats.stats.items(), key=lambda item: -item[1][2])[:top]]}


def _where(func: tuple) -> str:
    path, line, name = func
    if path.startswith(str(ROOT)):
        path = str(Path(path).relative_to(ROOT))
    elif "site-packages" in path:
        path = path.split("site-packages/", 1)[1]
    return f"{path}:{line}({name})" if path != "~" else name


def part_p(*, batch: int = 2, steps: int = 4) -> dict:
    """A cache step (call 1 of a N=3 run) of ours vs the official helper; a step at interval 1
    (call 1) of ours vs the unpatched model; FORA interval 1 vs the unpatched DiT."""
    _, load, _, _, num_classes = _tiny()
    labels = torch.arange(batch) % num_classes
    unet, dit = load("unet"), load("dit")
    out = {"batch": batch}
    ours, official = _ours_deepcache(unet, labels, steps, 3, 0), _official_deepcache(unet, labels, steps, 3, 0)
    ours.run(), official.run()              # warm (the first run may profile FLOPs)
    out["deepcache_cache_step"] = {"CacheKit": _call_profile(ours, 1), "official": _call_profile(official, 1)}
    for kind, base in (("unet", unet), ("dit", dit)):
        method, (plain, patched, _) = _interval1_runners(kind, base, labels, steps)
        patched.run()
        out[f"interval1_{kind}"] = {"method": method, "patched": _call_profile(patched, 1),
                                    "unpatched": _call_profile(plain, 1)}
    return out


# -- part C: real ComfyUI (run under ComfyUI's Python) -----------------------------------------
def _comfy_import(root: Path):
    if not (root / "comfy" / "model_patcher.py").is_file():
        raise ValueError(f"COMFYUI_DIR={root} is not a ComfyUI tree (no comfy/model_patcher.py); "
                         "run `source scripts/comfy_env.sh` first")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))           # only ComfyUI's own root, never the pack
    try:
        import comfy.options
        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import args
        args.cpu = True
        import utils.install_util  # noqa: F401  (as main.py: ComfyUI's `utils` package first)
        import comfy.model_management  # noqa: F401
        import comfy.sample  # noqa: F401
    except ImportError as error:
        raise ValueError(f"ComfyUI at {root} cannot be imported with {sys.executable}: {error}. Run part C with "
                         "the ComfyUI environment's Python: source scripts/comfy_env.sh && $PYTHON "
                         "scripts/bench_hotpath.py --comfy") from None
    spec = importlib.util.spec_from_file_location("cachekit_bench_comfy_models",
                                                  ROOT / "tests" / "integration" / "comfy_models.py")
    models = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = models             # dataclasses look their module up there
    spec.loader.exec_module(models)
    from ..nodes import history
    from ..nodes.method_nodes import apply_method
    return models, apply_method, history


def _comfy_size(family: str, size: int | None) -> int:
    if size is None:
        return COMFY_SIZES[family]
    return max(size, 40) if family == "pixart" else size


def _comfy_sampler(tiny, patcher, steps: int, size: int):
    import comfy.sample
    samples = tiny.latent["samples"]
    latent = torch.zeros(*samples.shape[:-2], size, size, dtype=samples.dtype)
    latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
    noise = comfy.sample.prepare_noise(latent, 0)

    def run():
        return comfy.sample.sample(patcher, noise, steps, 2.5, "euler", "normal", tiny.positive, tiny.negative, latent,
                                   disable_pbar=True, seed=0)
    return run


class _CallClock:
    """CPU time of every call of a diffusion model (forward pre- and post-hooks)."""

    def __init__(self, diffusion_model):
        self.calls: list[dict] = []
        self._start = 0.0
        self._hooks = [diffusion_model.register_forward_pre_hook(self._before),
                       diffusion_model.register_forward_hook(self._after)]

    def _before(self, module, args):
        self._start = time.process_time()

    def _after(self, module, args, output):
        self.calls.append({"total": time.process_time() - self._start})

    def remove(self):
        for h in self._hooks:
            h.remove()


def comfy_interval1(models, apply_method, *, families: list[str], steps: int, rounds: int, size: int | None,
                    progress: bool = True) -> list[dict]:
    setups = []
    names = ("unpatched", "patched", "control")
    for family in families:
        method = COMFY_FAMILIES[family]
        # One model: its ModelPatcher, the patched clone, and a plain clone as control (timed like
        # the patched one: this machine's noise). Switching patchers of one model costs ComfyUI
        # ~1 ms per sampling here (no weight patches); separate builds of identical weights differ
        # by several % in speed (memory placement).
        tiny = models.build(family, seed=0)
        settings = {"cache_interval": 1} if method == "deepcache" else {"interval": 1}
        patchers = {"unpatched": tiny.patcher, "patched": apply_method(method, tiny.patcher, settings),
                    "control": tiny.patcher.clone()}
        s = _comfy_size(family, size)
        label = "DeepCache cache_interval=1" if method == "deepcache" else "FORA interval=1"
        setups.append({"family": family, "method": label,
                       "size": s, "runs": {n: _comfy_sampler(tiny, patchers[n], steps, s) for n in names},
                       "clock": _CallClock(tiny.patcher.model.diffusion_model), "calls": {n: [] for n in names},
                       "times": {n: [] for n in names}, "first": {}, "identical": True})
    bar = tqdm(total=(rounds + 1) * len(setups) * len(names), desc="C1: ComfyUI interval 1 vs unpatched", unit="run",
               disable=not progress)
    for r in range(rounds + 1):
        for st in setups:
            images = {}
            for name in (names if r % 2 == 0 else names[::-1]):
                start = len(st["clock"].calls)
                seconds, images[name] = cpu_time(st["runs"][name])
                if r == 0:
                    st["first"][name] = seconds
                else:
                    st["times"][name].append(seconds)
                    st["calls"][name] += [c["total"] for c in st["clock"].calls[start:]]
                bar.update()
            st["identical"] &= torch.equal(images["patched"], images["unpatched"])
            st["identical"] &= torch.equal(images["control"], images["unpatched"])
    bar.close()
    rows = []
    for st in setups:
        times = st["times"]
        ratios = [p / u for p, u in zip(times["patched"], times["unpatched"])]
        control = [c / u for c, u in zip(times["control"], times["unpatched"])]
        ratio = median(ratios)
        per_call = median([1000 * (p - u) / steps for p, u in zip(times["patched"], times["unpatched"])])
        call = {n: statistics.median(st["calls"][n]) for n in names}
        st["clock"].remove()
        rows.append({"family": st["family"], "method": st["method"], "latent": st["size"], "steps": steps,
                     "rounds": rounds, "sampler": "euler, cfg 2.5 (one joint cond+uncond call per step)",
                     "unpatched_cpu_s": median(times["unpatched"]), "patched_cpu_s": median(times["patched"]),
                     "ratio": ratio, "ratios": [round(x, 4) for x in ratios], "overhead_ms_per_call": per_call,
                     "min_ratio": _min_ratio(times["patched"], times["unpatched"]),
                     "unpatched_call_ms": round(1000 * call["unpatched"], 3),
                     "patched_call_ms": round(1000 * call["patched"], 3),
                     "call_ratio": round(call["patched"] / call["unpatched"], 4),
                     "control_ratio": median(control), "control_ratios": [round(x, 4) for x in control],
                     "control_call_ratio": round(call["control"] / call["unpatched"], 4),
                     "first_run_ratio": round(st["first"]["patched"] / st["first"]["unpatched"], 4),
                     "outputs_equal": st["identical"],
                     "pass_time": ratio is not None and ratio <= TARGETS["interval1_overhead"]})
    return rows


class _BlockClock(_CallClock):
    """_CallClock plus the CPU time of every U-Net block (input_blocks[i], middle_block,
    output_blocks[i]) on ComfyUI's UNetModel. Blocks are timed where UNetModel._forward runs them
    (openaimodel.forward_timestep_embed, a module global); a CacheKit proxy shares its original's
    `_modules` dict, so both are recognised."""

    def __init__(self, diffusion_model):
        self.names = {id(m._modules): f"input.{i}" for i, m in enumerate(diffusion_model.input_blocks)}
        self.names[id(diffusion_model.middle_block._modules)] = "middle"
        self.names.update({id(m._modules): f"output.{i}" for i, m in enumerate(diffusion_model.output_blocks)})
        self._blocks: dict[str, float] = {}
        super().__init__(diffusion_model)

    def _before(self, module, args):
        self._blocks = defaultdict(float)
        super()._before(module, args)

    def _after(self, module, args, output):
        self.calls.append({"total": time.process_time() - self._start, "blocks": dict(self._blocks)})

    def timed(self, original):
        def forward_timestep_embed(ts, *args, **kwargs):
            name = self.names.get(id(ts.__dict__.get("_modules")))
            start = time.process_time()
            try:
                return original(ts, *args, **kwargs)
            finally:
                if name is not None:
                    self._blocks[name] += time.process_time() - start
        return forward_timestep_embed

    def remove(self):
        for h in self._hooks:
            h.remove()


def comfy_cache_step(models, apply_method, history, *, steps: int, rounds: int, size: int | None,
                     interval: int = 3, branch: int = 0, progress: bool = True) -> dict:
    """A cache step's model call vs the uncached cost of what still runs on it (sd15)."""
    from comfy.ldm.modules.diffusionmodules import openaimodel
    tiny = models.build("sd15", seed=0)               # one model, unpatched and patched (as in C1)
    patched = apply_method("deepcache", tiny.patcher, {"cache_interval": interval, "cache_branch": branch})
    s = _comfy_size("sd15", size)
    runs = {"unpatched": _comfy_sampler(tiny, tiny.patcher, steps, s), "patched": _comfy_sampler(tiny, patched, steps, s)}
    clock = _BlockClock(tiny.patcher.model.diffusion_model)
    calls = {"unpatched": [], "patched": []}
    original = openaimodel.forward_timestep_embed
    computed_units = None
    bar = tqdm(total=(rounds + 1) * 2, desc="C2: ComfyUI DeepCache cache step", unit="run", disable=not progress)
    try:
        for r in range(rounds + 1):
            for name in (("unpatched", "patched") if r % 2 == 0 else ("patched", "unpatched")):
                openaimodel.forward_timestep_embed = clock.timed(original)
                start = len(clock.calls)
                runs[name]()
                openaimodel.forward_timestep_embed = original
                if r > 0:                               # round 0 warms up: not counted
                    calls[name] += clock.calls[start:]
                if name == "patched":
                    run = history.last()
                    cache_steps = [i for i in range(run.num_steps) if sum(run.reused[i])]
                    computed_units = sorted({run.unit_names[u] for i in cache_steps
                                             for u, n in enumerate(run.computed[i]) if n})
                    reused_units = sorted({run.unit_names[u] for i in cache_steps
                                           for u, n in enumerate(run.reused[i]) if n})
                bar.update()
    finally:
        openaimodel.forward_timestep_embed = original
        clock.remove()
    bar.close()
    full_calls = calls["unpatched"]
    cache_calls = [c for i, c in enumerate(calls["patched"]) if (i % steps) % interval != 0]
    patched_full = [c for i, c in enumerate(calls["patched"]) if (i % steps) % interval == 0]
    blocks = sorted({b for c in full_calls for b in c["blocks"]}, key=_block_order)
    block_time = {b: statistics.median(c["blocks"].get(b, 0.0) for c in full_calls) for b in blocks}
    full_call = statistics.median(c["total"] for c in full_calls)
    remainder = full_call - sum(block_time.values())
    runs_on_cache_step = ["input.0"] + computed_units            # input_blocks[0]: not a unit, always runs
    estimate = remainder + sum(block_time[b] for b in runs_on_cache_step)
    measured = statistics.median(c["total"] for c in cache_calls)
    reused_cost = statistics.median(sum(c["blocks"].get(b, 0.0) for b in reused_units) for c in cache_calls)
    computed_cost = statistics.median(sum(c["blocks"].get(b, 0.0) for b in runs_on_cache_step) for c in cache_calls)
    cache_remainder = statistics.median(c["total"] - sum(c["blocks"].values()) for c in cache_calls)
    return {
        "family": "sd15", "interval": interval, "branch": branch, "latent": s, "steps": steps, "rounds": rounds,
        "model_batch": 2, "cache_calls_timed": len(cache_calls),
        "uncached_call_ms": round(1000 * full_call, 3),
        "patched_full_call_ms": round(1000 * statistics.median(c["total"] for c in patched_full), 3),
        "cache_step_call_ms": round(1000 * measured, 3),
        "estimate_ms": round(1000 * estimate, 3), "ratio": round(measured / estimate, 4),
        "remainder_ms": round(1000 * remainder, 3), "cache_step_remainder_ms": round(1000 * cache_remainder, 3),
        "computed_on_cache_step": runs_on_cache_step,
        "computed_blocks_on_cache_step_ms": round(1000 * computed_cost, 3),
        "reused_blocks_on_cache_step_ms": round(1000 * reused_cost, 3),
        "reused_units": len(reused_units),
        "block_ms": {b: round(1000 * v, 3) for b, v in block_time.items()},
    }


def _block_order(name: str) -> tuple[int, int]:
    kind, _, index = name.partition(".")
    return ({"input": 0, "middle": 1, "output": 2}[kind], int(index or 0))


def run_comfy(args) -> dict:
    root = os.environ.get("COMFYUI_DIR")
    if not root:
        raise ValueError("part C needs COMFYUI_DIR: source scripts/comfy_env.sh && $PYTHON scripts/bench_hotpath.py --comfy")
    torch.set_num_threads(1)
    models, apply_method, history = _comfy_import(Path(root))
    started = time.time()
    rows = comfy_interval1(models, apply_method, families=args.comfy_families, steps=args.comfy_steps,
                           rounds=args.comfy_rounds, size=args.comfy_size)
    cache_step = comfy_cache_step(models, apply_method, history, steps=args.comfy_steps, rounds=args.comfy_rounds,
                                  size=args.comfy_size)
    return {"interval1": rows, "cache_step": cache_step, "seconds": round(time.time() - started, 1),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "python": sys.executable, "comfyui_dir": root}


# -- report ------------------------------------------------------------------------------------
def _mb(value) -> str:
    return "-" if value is None else f"{value / 2**20:.3f}"


def _ok(flag) -> str:
    return "-" if flag is None else ("PASS" if flag else "FAIL")


def _range(ratios: list[float]) -> str:
    return f"{min(ratios):.3f}-{max(ratios):.3f}" if ratios else "-"


def _table(cols: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("-" if v is None else str(v) for v in row) + " |" for row in rows]
    return lines


def render_markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# Hot-path benchmark ({meta['date']})", "",
             f"`{meta['command']}`  ",
             *[f"`{m['command']}` ({m['date']}: parts {' '.join(m['parts'])} replaced)  " for m in meta.get("merged", [])],
             f"torch {meta['torch']}, {meta['threads']} thread, {meta['machine']}"
             + (f", {meta['seconds']} s" if meta.get("seconds") else "") + ". "
             "Process CPU time per sampling; the methods of a comparison run on one model instance (installed "
             "and removed around each sampling, untimed), interleaved round by round in alternating order; "
             "medians of per-round ratios. The first round is timed apart (first-run ratio) and left out of "
             "the medians. Control rows time the unpatched model against itself: their spread is this "
             "machine's noise.", ""]
    a = report.get("A")
    if a:
        r0 = a[0]
        lines += ["## A. DeepCache: CacheKit (diffusers API) vs official DeepCacheSDHelper 0.1.1",
                  f"Bundled tiny U-Net, DDIM {r0['steps']} steps, CFG {CFG} (model batch = 2 x images), "
                  f"{r0['rounds']} rounds. Targets: time ratio <= {TARGETS['deepcache_vs_official']}, "
                  f"images bit-identical, cache bytes ours <= official, branch 0: ours <= 1/10 of today's store.", ""]
        lines += ["### Whole sampling (CPU s)", ""]
        lines += _table(["images", "N", "branch", "ours s", "official s", "ratio", "round ratios", "ratio of minimums",
                         "first-run ratio", "time", "bit-identical", "max abs diff"],
                        [[r["batch"], r["interval"], r["branch"], r["ours_cpu_s"], r["official_cpu_s"], r["ratio"],
                          _range(r["ratios"]), r["min_ratio"], r["first_run_ratio"], _ok(r["pass_time"]),
                          r["bit_identical"], r["max_abs_diff"]] for r in a])
        lines += ["", "### Per model call (median CPU ms over every call of the timed rounds; one call per step)", ""]
        lines += _table(["images", "N", "branch", "ours full step", "official full step", "full-step ratio",
                         "ours cache step", "official cache step", "cache-step ratio",
                         "page faults / sampling: ours", "official"],
                        [[r["batch"], r["interval"], r["branch"], r["ours_full_call_ms"], r["official_full_call_ms"],
                          r["full_call_ratio"], r["ours_cache_call_ms"], r["official_cache_call_ms"],
                          r["cache_call_ratio"], r["ours_page_faults"], r["official_page_faults"]] for r in a])
        lines += ["", "Page faults: median minor page faults of one sampling (memory the allocator returned to the OS "
                  "and touched again; the kernel's page zeroing is CPU time). Holding fewer tensors can cost faults "
                  "when the allocator trims its heap between steps.", ""]
        lines += ["", "### Cache bytes", ""]
        lines += _table(["images", "N", "branch", "ours MiB", "official MiB", "today's store MiB", "ours / today",
                         "ours <= official", "branch 0: ours <= 1/10 today"],
                        [[r["batch"], r["interval"], r["branch"], _mb(r["ours_bytes"]), _mb(r["official_bytes"]),
                          _mb(r["today_bytes"]),
                          None if r["ours_bytes"] is None else round(r["ours_bytes"] / r["today_bytes"], 4),
                          _ok(r["pass_bytes_vs_official"]), _ok(r["pass_branch0_tenth"])] for r in a])
        sources = sorted({r["ours_bytes_source"] for r in a if r["ours_bytes_source"]})
        lines += ["", "Our bytes: " + "; ".join(sources) + ". Official: distinct tensors in "
                  "`DeepCacheSDHelper.cached_output` (it keeps every wrapped module's last output, shallow ones "
                  "too). Today's store: every unit reused on a cache step keeps a copy of its whole output.", ""]
    b = report.get("B")
    if b:
        lines += ["## B. Interval 1 (caching off) vs the unpatched model, diffusers host",
                  f"Target: ratio <= {TARGETS['interval1_overhead']}, outputs equal.", ""]
        lines += _table(["model", "method", "images", "steps", "rounds", "unpatched s", "patched s", "ratio",
                         "round ratios", "ratio of minimums", "per-call ratio", "control ratio (range)",
                         "control per-call", "overhead ms / call", "page faults: patched / unpatched",
                         "first-run ratio", "time", "outputs equal"],
                        [[r["model"], r["method"], r["batch"], r["steps"], r["rounds"], r["unpatched_cpu_s"],
                          r["patched_cpu_s"], r["ratio"], _range(r["ratios"]), r["min_ratio"], r["call_ratio"],
                          f"{r['control_ratio']} ({_range(r['control_ratios'])})", r["control_call_ratio"],
                          r["overhead_ms_per_call"], f"{r['patched_page_faults']} / {r['unpatched_page_faults']}",
                          r["first_run_ratio"], _ok(r["pass_time"]), r["outputs_equal"]] for r in b])
        lines += ["", "Control: the unpatched model timed again in the same rounds "
                  "(1.0 up to this machine's noise). Per-call ratio: median CPU time of a model call, patched over "
                  "unpatched, over every call of the timed rounds. Overhead ms / call: median per-round CPU-time "
                  "difference over the model calls of a sampling (one call per step).", ""]
        lines.append("")
    p = report.get("P")
    if p:
        lines += [f"## P. Python function calls in one model call (cProfile, {p['batch']} images)", ""]
        rows = []
        dc = p["deepcache_cache_step"]
        rows.append(["DeepCache N=3 b=0, cache step", dc["CacheKit"]["function_calls"], dc["official"]["function_calls"],
                     dc["CacheKit"]["cachekit_calls"], dc["CacheKit"]["cachekit_own_ms"]])
        for kind in ("unet", "dit"):
            e = p[f"interval1_{kind}"]
            rows.append([f"{e['method']} ({kind}) vs unpatched", e["patched"]["function_calls"],
                         e["unpatched"]["function_calls"], e["patched"]["cachekit_calls"], e["patched"]["cachekit_own_ms"]])
        lines += _table(["model call", "ours: calls", "reference: calls", "ours: calls in CacheKit code",
                         "ours: own ms in CacheKit code (profiled)"], rows)
        lines += ["", "Top CacheKit functions on our cache step (own time under the profiler):", ""]
        lines += _table(["function", "calls", "own ms"],
                        [[t["function"], t["calls"], t["own_ms"]] for t in dc["CacheKit"]["top_cachekit"]])
        for who in ("CacheKit", "official"):
            lines += ["", f"Top functions overall on the cache step, {who} (own time under the profiler):", ""]
            lines += _table(["function", "calls", "own ms"],
                            [[t["function"], t["calls"], t["own_ms"]] for t in dc[who]["top_all"]])
        lines.append("")
    c = report.get("C")
    lines += ["## C. Real ComfyUI host (0.3.64, in-process, comfy.sample)", ""]
    if not c or c.get("skipped"):
        lines += [f"Skipped: {c.get('skipped') if c else 'not run'}", ""]
    else:
        lines += [f"Run with `{c.get('command', '')}`" + (f" ({c['date']}, {c['seconds']} s)" if c.get("date") else "")
                  + ".", "",
                  f"### C1. Interval 1 vs the unpatched ModelPatcher (target <= {TARGETS['interval1_overhead']})", ""]
        lines += _table(["family", "method", "latent", "steps", "rounds", "unpatched s", "patched s", "ratio",
                         "round ratios", "ratio of minimums", "per-call ratio", "control ratio (range)",
                         "control per-call", "overhead ms / call", "first-run ratio", "time", "outputs equal"],
                        [[r["family"], r["method"], r["latent"], r["steps"], r["rounds"], r["unpatched_cpu_s"],
                          r["patched_cpu_s"], r["ratio"], _range(r["ratios"]), r["min_ratio"], r["call_ratio"],
                          f"{r['control_ratio']} ({_range(r['control_ratios'])})", r["control_call_ratio"],
                          r["overhead_ms_per_call"], r["first_run_ratio"], _ok(r["pass_time"]),
                          r["outputs_equal"]] for r in c["interval1"]])
        lines += ["", "Per-call ratio: median CPU time of a diffusion-model call (inside ComfyUI's apply_model, so "
                  "without CacheKit's APPLY_MODEL wrapper; the whole-sampling ratio includes it). Control: a plain clone of the "
                  "same ModelPatcher, timed like the patched one (1.0 up to this machine's noise).", ""]
        cs = c["cache_step"]
        lines += ["", f"### C2. DeepCache cache step vs the uncached cost of what still runs (sd15, N={cs['interval']}, "
                  f"branch {cs['branch']}, latent {cs['latent']}, {cs['cache_calls_timed']} cache-step calls)", "",
                  "Estimate = the unpatched model call's non-block remainder + the unpatched times of the blocks "
                  "that run on a cache step (input_blocks[0] and the units the plan computes), all timed on full steps.",
                  ""]
        lines += _table(["uncached call ms", "patched full call ms", "cache-step call ms", "estimate ms",
                         "measured / estimate", "computed blocks ms (cache step)", "reused blocks ms (lookups, copies)",
                         "remainder ms: full step", "cache step", "blocks that run"],
                        [[cs["uncached_call_ms"], cs["patched_full_call_ms"], cs["cache_step_call_ms"], cs["estimate_ms"],
                          cs["ratio"], cs["computed_blocks_on_cache_step_ms"], cs["reused_blocks_on_cache_step_ms"],
                          cs["remainder_ms"], cs["cache_step_remainder_ms"], ", ".join(cs["computed_on_cache_step"])]])
        lines += ["", "A cache step's measured time = its computed blocks + its reused blocks (CacheKit's lookups) + "
                  "its remainder (embedding, output layers, CacheKit's per-call work inside the model call).", ""]
        lines.append("")
    lines += ["## Targets", ""] + [f"- {line}" for line in summary_lines(report)]
    return "\n".join(lines) + "\n"


def summary_lines(report: dict) -> list[str]:
    out = []
    for r in report.get("A") or []:
        tag = f"A images={r['batch']} N={r['interval']} branch={r['branch']}"
        out.append(f"{tag}: time ratio {r['ratio']} (<= {TARGETS['deepcache_vs_official']}) {_ok(r['pass_time'])}; "
                   f"bit-identical {r['bit_identical']}; bytes ours {_mb(r['ours_bytes'])} MiB vs official "
                   f"{_mb(r['official_bytes'])} MiB {_ok(r['pass_bytes_vs_official'])}"
                   + (f"; vs 1/10 of today's {_mb(r['today_bytes'])} MiB {_ok(r['pass_branch0_tenth'])}"
                      if r["branch"] == 0 else ""))
    for r in report.get("B") or []:
        out.append(f"B {r['method']} ({r['model']}): ratio {r['ratio']} (<= {TARGETS['interval1_overhead']}) "
                   f"{_ok(r['pass_time'])}; outputs equal {r['outputs_equal']}")
    c = report.get("C")
    if c and not c.get("skipped"):
        for r in c["interval1"]:
            out.append(f"C1 {r['method']} ({r['family']}): ratio {r['ratio']} (<= {TARGETS['interval1_overhead']}) "
                       f"{_ok(r['pass_time'])}; outputs equal {r['outputs_equal']}")
        cs = c["cache_step"]
        out.append(f"C2 DeepCache cache step / uncached cost of what runs: {cs['ratio']}")
    elif c:
        out.append(f"C skipped: {c['skipped']}")
    return out


# -- command line ------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Hot-path benchmark: CacheKit's DeepCache vs the official helper, interval-1 overhead "
                    "(diffusers and, with --comfy or COMFYUI_DIR, real ComfyUI).")
    parser.add_argument("--quick", action="store_true",
                        help=f"small settings (A, B, P in about 1.5 min on 2 busy cores): {QUICK['steps']} steps, "
                             f"{QUICK['rounds']} rounds "
                             f"(default {FULL['steps']}, {FULL['rounds']})")
    parser.add_argument("--parts", nargs="+", choices=("A", "B", "P", "C"), default=["A", "B", "P", "C"],
                        help="which parts to run (C needs COMFYUI_DIR; it runs in a subprocess)")
    parser.add_argument("--steps", type=int_at_least(2), help=f"A: DDIM steps (default {FULL['steps']})")
    parser.add_argument("--rounds", type=int_at_least(1), help=f"A: timed rounds (default {FULL['rounds']})")
    parser.add_argument("--batches", type=int_at_least(1), nargs="+",
                        help=f"A: images per sampling (default {' '.join(map(str, FULL['batches']))})")
    parser.add_argument("--b-steps", type=int_at_least(2), help=f"B: steps (default {FULL['b_steps']})")
    parser.add_argument("--b-rounds", type=int_at_least(1), help=f"B: timed rounds (default {FULL['b_rounds']})")
    parser.add_argument("--b-batch", type=int_at_least(1), help=f"B: images (default {FULL['b_batch']})")
    parser.add_argument("--comfy", action="store_true",
                        help="run part C only, in this process (needs COMFYUI_DIR and ComfyUI's Python); merges it "
                             "into --json / --md when they exist")
    parser.add_argument("--comfy-python", help="Python for part C's subprocess (default $PYTHON, else this one)")
    parser.add_argument("--comfy-steps", type=int_at_least(3), help=f"C: steps (default {FULL['comfy_steps']})")
    parser.add_argument("--comfy-rounds", type=int_at_least(1), help=f"C: timed rounds (default {FULL['comfy_rounds']})")
    parser.add_argument("--comfy-families", nargs="+", choices=list(COMFY_FAMILIES),
                        help=f"C1 families (default {' '.join(FULL['comfy_families'])})")
    parser.add_argument("--comfy-size", type=int_at_least(8),
                        help="C: latent size (default: " + ", ".join(f"{k} {v}" for k, v in COMFY_SIZES.items())
                        + "; PixArt at least 40)")
    parser.add_argument("--json", type=output_file(".json"), default=RESULTS / "hotpath.json")
    parser.add_argument("--md", type=output_file(".md"), default=RESULTS / "hotpath.md")
    parser.add_argument("--no-write", action="store_true", help="print only; write no files")
    parser.add_argument("--merge", action="store_true",
                        help="replace only the parts run now in an existing --json report (and re-render --md)")
    args = parser.parse_args(argv)
    fill_defaults(args, FULL, QUICK)
    return args


def _meta(argv) -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "command": "python scripts/bench_hotpath.py " + " ".join(argv if argv is not None else sys.argv[1:])}


def _comfy_subprocess(args) -> dict:
    root = os.environ.get("COMFYUI_DIR")
    if not root:
        return {"skipped": "COMFYUI_DIR is not set. Run part C with: source scripts/comfy_env.sh && "
                           "$PYTHON scripts/bench_hotpath.py --comfy" + (" --quick" if args.quick else "")}
    python = args.comfy_python or os.environ.get("PYTHON") or sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "comfy.json"
        command = [python, str(ROOT / "scripts" / "bench_hotpath.py"), "--comfy", "--no-write", "--json", str(out),
                   *(["--quick"] if args.quick else []),
                   "--comfy-steps", str(args.comfy_steps), "--comfy-rounds", str(args.comfy_rounds),
                   "--comfy-families", *args.comfy_families]
        if args.comfy_size:
            command += ["--comfy-size", str(args.comfy_size)]
        done = subprocess.run(command, stdout=subprocess.DEVNULL)
        if done.returncode != 0 or not out.is_file():
            return {"skipped": f"part C failed (exit {done.returncode}): {' '.join(command)}"}
        return json.loads(out.read_text())


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.comfy:
        c = run_comfy(args)
        given = list(argv if argv is not None else sys.argv[1:])
        # A full run's subprocess gets --no-write with an explicit --json: a temporary file to
        # hand the result back in. --no-write alone (the default --json) writes nothing.
        handing_back = args.no_write and "--json" in given
        if handing_back:
            i = given.index("--json")
            del given[i:i + 2]
        c["command"] = "source scripts/comfy_env.sh && $PYTHON scripts/bench_hotpath.py " + " ".join(
            a for a in given if a != "--no-write")
        if handing_back:
            args.json.write_text(json.dumps(c, indent=1))
        report = json.loads(args.json.read_text()) if args.json.is_file() and not args.no_write else {"meta": _meta(argv)}
        report["C"] = c
        report.setdefault("settings", {}).update({k: getattr(args, k) for k in FULL if k.startswith("comfy_")})
        print(render_markdown({**report, "A": None, "B": None, "P": None}))
        if not args.no_write:
            _write(report, args)
        return report
    report = {"meta": _meta(argv), "settings": {k: getattr(args, k) for k in FULL}}
    if args.merge and args.json.is_file():
        # Keep the other parts of the existing report; note what this run replaced.
        previous = json.loads(args.json.read_text())
        merged = report["meta"]
        report = {**previous, "settings": {**previous.get("settings", {}), **report["settings"]}}
        earlier = [m for m in previous["meta"].get("merged", []) if not set(m["parts"]) <= set(args.parts)]
        report["meta"] = {**previous["meta"], "merged": earlier + [
            {"parts": args.parts, "command": merged["command"], "date": merged["date"]}]}
    started = time.time()
    if "A" in args.parts:
        report["A"] = part_a(steps=args.steps, rounds=args.rounds, batches=args.batches)
    if "B" in args.parts:
        report["B"] = part_b(steps=args.b_steps, rounds=args.b_rounds, batch=args.b_batch)
    if "P" in args.parts:
        report["P"] = part_p()
    if "C" in args.parts:
        report["C"] = _comfy_subprocess(args)
    if not args.merge:
        report["meta"]["seconds"] = round(time.time() - started, 1)
    print(render_markdown(report))
    if not args.no_write:
        _write(report, args)
    return report


def _write(report: dict, args) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(render_markdown(report))
