"""What the panel says about a run, in words and as JSON (no gradio: tests read these directly)."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from . import engine

SETTING_NAMES = {"interval": "interval", "branch": "branch", "delta": "delta", "max_skip_steps": "max skip",
                 "threshold": "threshold", "start_percent": "start", "reuse": "reuse"}
FORMAT = "cachekit-panel-run/1"


def model_name(model: str) -> str:
    """'Tiny DiT', without the default method that engine.MODELS adds for the dropdown."""
    return engine.MODELS[model].split(" (")[0]


def _setting(name: str, value) -> str:
    if name == "start_percent":
        return f"start {value:.0%} of steps"
    if name in ("delta", "threshold"):
        return f"{name} {value:g}"
    return f"{SETTING_NAMES[name]} {value}"


def settings_text(request: engine.Request) -> str:
    own = [_setting(k, v) for k, v in request.settings().items()] or ["no settings (bundled router)"]
    return ", ".join(own)


def speedup_text(result: engine.Result, flop_estimate: float | None) -> str:
    """The measured speedup never stands alone: with one round it is flagged as a single timing and
    shown beside the FLOP-weighted estimate (timing-free); with more rounds it carries their range."""
    rounds = len(result.round_speedups)
    estimate = f" · {flop_estimate:.2f}x FLOP-weighted estimate" if flop_estimate else ""
    if rounds > 1:
        low, high = min(result.round_speedups), max(result.round_speedups)
        line = f"**Speedup** {result.speedup:.2f}x measured (median of {rounds} rounds, range {low:.2f}–{high:.2f}x)"
    else:
        line = f"**Speedup** {result.speedup:.2f}x measured (one timing)"
    notes = []
    # Skipping work cannot save more time than the work skipped: a measurement well above the
    # estimate means the uncached pass was slowed by something else (another process, the browser).
    if flop_estimate and result.speedup > 1.1 * flop_estimate:
        notes.append("above the FLOP-weighted estimate, so the uncached pass was slowed by something else")
    if rounds == 1:
        notes.append("one timing is noisy on a busy CPU: raise Timing rounds for a range")
    text = "; ".join(notes)
    note = f"  \n_{text[:1].upper()}{text[1:]}._" if notes else ""
    return f"{line}{estimate}{note}"


def _hit_lines(t: dict) -> list[str]:
    lines = [f"**Hit rate {t['hit_rate']:.0%}**" + (f" · work executed {t['executed_fraction']:.0%}"
                                                    if t.get("executed_fraction") is not None else "")]
    skipped = t.get("skipped_steps") or []
    if skipped:       # a list of 60 numbers says less than the per-step chart: count them instead
        listed = ", ".join(str(s + 1) for s in skipped) if len(skipped) <= 12 else "see the per-step chart"
        lines.append(f"**Skipped steps** {len(skipped)} of {t['num_steps']} ({listed})")
    return lines


def run_summary(request: engine.Request, result: engine.Result) -> str:
    t = result.telemetry
    timed = f" (median of {len(result.uncached_rounds)} rounds)" if len(result.uncached_rounds) > 1 else ""
    psnr = "identical" if math.isinf(result.psnr_db) else f"{result.psnr_db:.1f} dB"
    on = ""
    if request.dydit:
        on = " on the bundled DyDiT" + (f" (full width for the first {request.dydit_width_start:.0%} of steps)"
                                        if request.dydit_width_start else "")
    lines = [
        f"### {request.method}{on} on {model_name(request.model)}",
        f"**Settings** {settings_text(request)}",
        f"{request.steps} DDIM steps, CFG {request.cfg:g}, {request.images} × {request.class_name}, "
        f"seed {request.seed}",
        f"**Uncached** {result.uncached_s:.2f} s · **Cached** {result.cached_s:.2f} s{timed}",
        speedup_text(result, t.get("ideal_speedup")),
        *_hit_lines(t),
        f"**PSNR vs. uncached** {psnr}",
    ]
    if t.get("dydit"):      # DyDiT's own work: the heads, MLP groups and tokens that ran
        lines.append(f"**DyDiT** {t['dydit']['summary']} (against the dense DiT: the DyDiT's own weights)")
    return "  \n".join(lines)


def comfy_summary(run: dict) -> str:
    """A ComfyUI run has no uncached twin here: only its in-run estimate and the FLOP estimate."""
    t = run["telemetry"]
    speed = []
    if t.get("measured_speedup"):
        speed.append(f"{t['measured_speedup']:.2f}x in-run estimate (full-step times)")
    if t.get("ideal_speedup"):
        speed.append(f"{t['ideal_speedup']:.2f}x FLOP-weighted estimate")
    lines = [f"### {t['method']} in ComfyUI ({t['family']})",
             f"{t['num_steps']} steps" + (f", {t['wall_time_s']:.2f} s" if t.get("wall_time_s") else "")]
    if speed:
        lines.append("**Speedup** " + " · ".join(speed))
    return "  \n".join(lines + _hit_lines(t))


def _finite(value):
    """JSON has no Infinity or NaN (PSNR of identical images is infinite): write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def run_record(request: engine.Request, result: engine.Result) -> dict:
    """Everything about a panel run that is not pixels; steps are 0-based, as in the telemetry."""
    return _finite({
        "format": FORMAT,
        "model": request.model,
        "method": request.method,
        "dydit": request.dydit,
        "dydit_width_start": request.dydit_width_start if request.dydit else None,
        "settings": request.settings(),
        "sampling": {"sampler": "DDIM", "steps": request.steps, "cfg": request.cfg, "images": request.images,
                     "class": request.class_name, "seed": request.seed},
        "timing": {"rounds": request.rounds, "uncached_s": result.uncached_rounds, "cached_s": result.cached_rounds,
                   "speedup_measured": result.speedup, "speedup_per_round": result.round_speedups,
                   "speedup_flop_estimate": result.telemetry.get("ideal_speedup"),
                   "uncached_step_s": result.uncached_step_s, "cached_step_s": result.cached_step_s},
        "psnr_db": result.psnr_db,
        "telemetry": result.telemetry,
    })


def write_json(record: dict, name: str) -> Path:
    """A fresh file in the system temp folder (gradio serves files from there) for the download."""
    folder = Path(tempfile.mkdtemp(prefix="cachekit-panel-"))
    path = folder / name
    path.write_text(json.dumps(_finite(record), indent=1))
    return path


def file_name(request: engine.Request) -> str:
    dydit = "_DyDiT" if request.dydit else ""
    return f"cachekit_{request.model}{dydit}_{request.method}_{request.steps}steps_seed{request.seed}.json"


# -- autotune ----------------------------------------------------------------------------------
# speedup: measured (uncached time / cached time); FLOP-weighted: the work skipped, timing-free.
AUTOTUNE_HEADERS = ["#", "settings", "speedup", "FLOP-weighted", "PSNR (dB)", "frontier", "chosen"]
NO_AUTOTUNE = "No autotune yet: choose a method and a target above and press **Run autotune**."


def tuned_settings(settings: dict) -> str:
    """Keyword settings as a caller passes them: "cache_interval=3, cache_branch=0, reuse=hold"."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())


def target_text(target: str, value: float) -> str:
    return f"PSNR ≥ {value:g} dB" if target == "psnr" else f"speedup ≥ {value:g}x"


def _psnr(value) -> str:
    return "identical" if value is None else f"{value:.1f}"


def autotune_summary(rec: dict, saved: bool = False) -> str:
    """What the tune chose and whether it met the target. `saved`: the record was read back from
    disk (the panel just opened), so say when it ran."""
    s = rec["sampling"]
    lines = [f"### Autotune: {rec['method']} on {model_name(rec['model'])}, target "
             f"{target_text(rec['target'], rec['target_value'])}"]
    if saved:
        lines.append(f"_The last autotune, run {rec.get('saved', 'earlier')}._")
    chosen = rec["trials"][rec["chosen"]] if rec.get("chosen") is not None else None
    if chosen is None:
        goal = target_text(rec["target"], rec["target_value"])
        lines.append("**Target not met**: no candidate ran faster than uncached"
                     + (f" with {goal}" if rec["target"] == "psnr" else "")
                     + f", so caching stays off (`{tuned_settings(rec['settings'])}`).")
    else:
        flop = f", {chosen['ideal_speedup']:.2f}x FLOP-weighted" if chosen.get("ideal_speedup") else ""
        verdict = "**Target met**" if rec["met"] else "**Target not met**: the fastest setting found instead"
        lines += [f"{verdict}: trial #{rec['chosen'] + 1}, `{tuned_settings(chosen['settings'])}`",
                  f"**Chosen** {chosen['speedup']:.2f}x measured{flop}, PSNR {_psnr(chosen['psnr'])}"
                  + (" dB" if chosen["psnr"] is not None else "")]
    on_front = len(rec.get("frontier", []))
    lines.append(f"{len(rec['trials'])} candidates tried, {on_front} on the frontier · uncached "
                 f"{rec['reference_seconds']:.2f} s per calibration run ({s['steps']} DDIM steps, "
                 f"{s['images']} image{'s' if s['images'] != 1 else ''}, CFG {s['cfg']:g}, seed {s['seed']})")
    return "  \n".join(lines)


def autotune_rows(rec: dict) -> list[list]:
    """One table row per trial, in the order autotune ran them."""
    rows = []
    for i, t in enumerate(rec["trials"]):
        ideal = f"{t['ideal_speedup']:.2f}x" if t.get("ideal_speedup") else "–"
        rows.append([i + 1, tuned_settings(t["settings"]), f"{t['speedup']:.2f}x", ideal, _psnr(t["psnr"]),
                     "✓" if t["on_frontier"] else "", "✓" if t.get("chosen") else ""])
    return rows
