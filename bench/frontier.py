"""The peer benchmark's Pareto frontier and speed-band summary (from bench/harness.py's rows).

Speed of a row for the frontier and the bands: the LOWER of its passes' speedups for CacheKit
rows and the HIGHER for every alternative (fewer steps, the official DeepCache, cache-dit,
diffusers' hooks), so measurement noise never favours CacheKit.

* Pareto: a row is on the frontier when no other row of its model is at least as fast and at
  least as good, and better in one of the two (PSNR; separately, class accuracy). Rows with the
  same speed and quality do not dominate each other: both stay on the frontier.
* Bands (>= 1.5x, 2x, 2.5x): per model, CacheKit's best setting (highest PSNR among its rows at
  or above the band) vs. the best alternative, the margin in dB and both class accuracies;
  "none" where no row reaches the band.
* Forecast: CacheKit's forecast-reuse settings (reuse=forecast1/2, e.g. FORA on the DiT,
  DeepCache on the U-Net) vs. the fewer-steps baseline at the same speed (its PSNR interpolated
  linearly in speed between the two fewer-steps rows around it).

    write(build(rows, meta), out_dir)      # bench/harness.py does this after measuring
    python scripts/bench_peers.py --frontier-from bench/results/peers.json --out bench/results   # rebuild only
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .methods import CACHEKIT, FEWER_STEPS, NOT_APPLICABLE

BANDS = (1.5, 2.0, 2.5)
UNCACHED = "uncached"


def is_cachekit(row: dict) -> bool:
    return row.get("origin") == CACHEKIT


def is_alternative(row: dict) -> bool:
    return row.get("origin") not in (CACHEKIT, "-", None) and row.get("method") != UNCACHED


def ok(row: dict) -> bool:
    return row.get("status", "ok") == "ok" and row.get("speedup") is not None


def band_speed(row: dict) -> float | None:
    """The conservative speed: min of the passes for CacheKit, max for alternatives."""
    passes = [s for s in (row.get("speedup_passes") or []) if s is not None] or \
        ([row["speedup"]] if row.get("speedup") is not None else [])
    if not passes:
        return None
    return min(passes) if is_cachekit(row) else max(passes)


def pareto(rows: list[dict], quality: str = "psnr_db", speed=band_speed) -> list[bool]:
    """For each row: is it Pareto-optimal in (speed, quality) among `rows`? Rows without a speed
    or quality are not."""
    points = []
    for r in rows:
        x, y = (speed(r), r.get(quality)) if ok(r) else (None, None)
        points.append(None if x is None or y is None or (isinstance(y, float) and math.isnan(y)) else (x, y))
    marks = []
    for i, p in enumerate(points):
        if p is None:
            marks.append(False)
            continue
        dominated = any(q is not None and j != i and q[0] >= p[0] and q[1] >= p[1] and (q[0] > p[0] or q[1] > p[1])
                        for j, q in enumerate(points))
        marks.append(not dominated)
    return marks


def _best(rows: list[dict], band: float) -> dict | None:
    fast = [r for r in rows if ok(r) and (band_speed(r) or 0) >= band and r.get("psnr_db") is not None]
    # Highest PSNR; among equals, the faster.
    return max(fast, key=lambda r: (r["psnr_db"], band_speed(r)), default=None)


def _brief(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {"origin": row["origin"], "method": row["method"], "setting": row["setting"],
            "speed": band_speed(row), "speedup_passes": row.get("speedup_passes"), "psnr_db": row["psnr_db"],
            "ssim": row.get("ssim"), "accuracy": row.get("accuracy")}


def band_summary(rows: list[dict], bands=BANDS) -> list[dict]:
    """Per model and band: CacheKit's best row vs. the best alternative (None: no row reaches it)."""
    out = []
    for model in _models(rows):
        mine = [r for r in rows if r["model"] == model and is_cachekit(r)]
        theirs = [r for r in rows if r["model"] == model and is_alternative(r)]
        for band in bands:
            ck, alt = _best(mine, band), _best(theirs, band)
            margin = round(ck["psnr_db"] - alt["psnr_db"], 2) if ck and alt else None
            by_origin = {origin: _brief(_best([r for r in theirs if r["origin"] == origin], band))
                         for origin in dict.fromkeys(r["origin"] for r in theirs)}
            out.append({"model": model, "band": band, "cachekit": _brief(ck), "alternative": _brief(alt),
                        "margin_db": margin, "best_by_origin": by_origin})
    return out


def fewer_steps_psnr_at(rows: list[dict], model: str, speed: float) -> float | None:
    """The fewer-steps baseline's PSNR at `speed`, interpolated linearly between the fewer-steps
    rows of `model` around it (None outside their speed range)."""
    return interpolate([(band_speed(r), r["psnr_db"]) for r in rows if r["model"] == model
                        and r.get("origin") == FEWER_STEPS and ok(r) and r.get("psnr_db") is not None], speed)


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at `x`, linear between the two (x, y) points around it; None outside their range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if len(points) == 1 and points[0][0] == x:
        return points[0][1]
    return None


def forecast_summary(rows: list[dict]) -> list[dict]:
    """Per model and CacheKit method with forecast-reuse settings: every such setting against the
    fewer-steps baseline at its own speed, and the best (largest margin; highest PSNR when none
    falls inside the fewer-steps range)."""
    out = []
    for model in _models(rows):
        forecast = [r for r in rows if r["model"] == model and is_cachekit(r) and ok(r)
                    and str((r.get("settings") or {}).get("reuse", "")).startswith("forecast")]
        for method in sorted({r["method"] for r in forecast}):
            entries = []
            for r in (r for r in forecast if r["method"] == method):
                baseline = fewer_steps_psnr_at(rows, model, band_speed(r))
                entries.append({**_brief(r), "fewer_steps_psnr_db": None if baseline is None else round(baseline, 2),
                                "margin_db": None if baseline is None else round(r["psnr_db"] - baseline, 2)})
            with_margin = [e for e in entries if e["margin_db"] is not None]
            best = (max(with_margin, key=lambda e: e["margin_db"]) if with_margin
                    else max(entries, key=lambda e: e["psnr_db"]))
            out.append({"model": model, "method": method, "best": best, "settings": entries})
    return out


def _models(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in rows))


def build(rows: list[dict], meta: dict | None = None) -> dict:
    """The frontier of every model: rows sorted by speed with Pareto marks, bands, forecast."""
    models = {}
    for model in _models(rows):
        mine = [dict(r) for r in rows if r["model"] == model]
        for r, on_psnr, on_acc in zip(mine, pareto(mine, "psnr_db"), pareto(mine, "accuracy")):
            r["speed"], r["pareto_psnr"], r["pareto_accuracy"] = band_speed(r) if ok(r) else None, on_psnr, on_acc
        mine.sort(key=lambda r: (not ok(r), r["speed"] or 0, -(r.get("psnr_db") or 0)))
        models[model] = mine
    unstable = [{"model": r["model"], "origin": r["origin"], "method": r["method"], "setting": r["setting"],
                 "speedup_passes": r.get("speedup_passes")} for r in rows if r.get("passes_agree") is False]
    return {"meta": meta or {}, "speed_rule": "CacheKit rows: the lower of the passes' speedups; alternatives: the "
                                              "higher",
            "models": models, "bands": band_summary(rows), "forecast": forecast_summary(rows),
            "passes_disagree": unstable, "not_applicable": NOT_APPLICABLE}


# -- output --------------------------------------------------------------------------------------
def _f(value, digits=2, unit="") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}{unit}"


def _who(brief: dict | None) -> str:
    if brief is None:
        return "none"
    return f"{brief['method']} {brief['setting']} ({brief['origin']})" if brief["origin"] != CACHEKIT \
        else f"{brief['method']} {brief['setting']}"


def _timing(meta: dict) -> str:
    by_model = meta.get("timing_by_model")
    if by_model and len(set(by_model.values())) > 1:
        return "; ".join(f"{model}: {how}" for model, how in sorted(by_model.items()))
    return (next(iter(by_model.values())) if by_model else meta.get("timing")) or "process CPU time"


def _images(meta: dict) -> str:
    by_model = meta.get("images_by_model")
    if by_model and len(set(by_model.values())) > 1:
        return ", ".join(f"{model}: {n}" for model, n in sorted(by_model.items()))
    return str(meta.get("images", "?"))


def to_markdown(result: dict) -> str:
    meta = result.get("meta") or {}
    lines = ["# Pareto frontier: CacheKit vs. alternatives on the bundled models", ""]
    if meta:
        lines += [f"Command: `{meta.get('command', '?')}` ({meta.get('date', '?')}, "
                  f"{meta.get('runtime_min', '?')} min; "
                  f"{_images(meta)} images, {meta.get('steps', '?')} DDIM steps, CFG {meta.get('cfg', '?')}; "
                  f"{meta.get('rounds', '?')} round(s) x {meta.get('passes', '?')} passes, one thread; speed: "
                  f"{_timing(meta)}).", ""]
    lines += ["**Speed used for the frontier and the bands: the lower (more conservative) of the two passes' "
              "speedups for CacheKit rows, the higher for every alternative.** PSNR, SSIM and class accuracy are "
              "against the full-step uncached images (same seeds, same labels). P = Pareto-optimal in speed vs. "
              "PSNR, A = in speed vs. class accuracy.", ""]
    lines += ["## Band summary", "", "| model | band | CacheKit best | speed | PSNR | acc | best alternative | speed "
              "| PSNR | acc | margin (dB) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in result["bands"]:
        ck, alt = b["cachekit"], b["alternative"]
        lines.append(f"| {b['model']} | >= {b['band']}x | {_who(ck)} | {_f(ck and ck['speed'])} | "
                     f"{_f(ck and ck['psnr_db'])} | {_f(ck and ck['accuracy'], 3)} | {_who(alt)} | "
                     f"{_f(alt and alt['speed'])} | {_f(alt and alt['psnr_db'])} | {_f(alt and alt['accuracy'], 3)} | "
                     f"{_f(b['margin_db'])} |")
    origins = list(dict.fromkeys(o for b in result["bands"] for o in b.get("best_by_origin", {})))
    if origins:
        lines += ["", "Best PSNR of each alternative in each band (setting, speed, PSNR):", "",
                  "| model | band | " + " | ".join(origins) + " |", "|---|---|" + "---|" * len(origins)]
        for b in result["bands"]:
            cells = []
            for o in origins:
                present = o in b.get("best_by_origin", {})
                best = b["best_by_origin"][o] if present else None
                cells.append("n/a" if not present else "none" if best is None else
                             f"{best['method']} {best['setting']}: {_f(best['speed'])}x, {_f(best['psnr_db'])} dB")
            lines.append(f"| {b['model']} | >= {b['band']}x | " + " | ".join(cells) + " |")
    lines += ["", "## Forecast reuse vs. fewer steps at the same speed", "",
              "Fewer-steps PSNR interpolated at the forecast setting's speed; '-' where that speed is outside the "
              "fewer-steps rows' range.", "",
              "| model | method | setting | speed | PSNR | acc | fewer steps PSNR there | margin (dB) | best |",
              "|---|---|---|---|---|---|---|---|---|"]
    for f in result["forecast"]:
        for e in sorted(f["settings"], key=lambda e: e["speed"]):
            lines.append(f"| {f['model']} | {f['method']} | {e['setting']} | {_f(e['speed'])} | {_f(e['psnr_db'])} | "
                         f"{_f(e['accuracy'], 3)} | {_f(e['fewer_steps_psnr_db'])} | {_f(e['margin_db'])} | "
                         f"{'**best**' if e['setting'] == f['best']['setting'] else ''} |")
    if not result["forecast"]:
        lines.append("| - | no forecast-reuse rows | | | | | | | |")
    for model, rows in result["models"].items():
        lines += ["", f"## {model}: every row, sorted by speed", "",
                  "| P | A | origin | method | setting | speed | pass 1 / pass 2 | agree | wall | FLOPs | PSNR | SSIM "
                  "| acc |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if not ok(r):
                lines.append(f"| | | {r['origin']} | {r['method']} | {r['setting']} | {r['status']} | | | | | | | |")
                continue
            passes = " / ".join(_f(s) for s in r.get("speedup_passes") or [])
            agree = {True: "yes", False: "**NO**", None: "-"}[r.get("passes_agree")]
            marks = f"{'P' if r['pareto_psnr'] else ''} | {'A' if r['pareto_accuracy'] else ''}"
            lines.append(f"| {marks} | {r['origin']} | {r['method']} | {r['setting']} | {_f(r['speed'])} | {passes} | "
                         f"{agree} | {_f(r.get('speedup_wall'))} | {_f(r.get('flops_executed'), 3)} | {_f(r['psnr_db'])} | "
                         f"{_f(r.get('ssim'), 3)} | {_f(r.get('accuracy'), 3)} |")
    unstable = result["passes_disagree"]
    lines += ["", f"## Repeatability: {len(unstable)} row(s) whose passes disagree by more than "
                  f"+-{(meta.get('tolerance') or 0.05):.0%}", ""]
    lines += [f"- {u['model']} {u['origin']} {u['method']} {u['setting']}: "
              f"{' / '.join(_f(s) for s in u['speedup_passes'])}" for u in unstable] or ["- none"]
    lines += ["", "## diffusers hooks not run", ""]
    lines += [f"- {name}: {why}" for name, why in result["not_applicable"].items()]
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> None:
    from .plot import frontier_plot
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.json").write_text(json.dumps(result, indent=1))
    (out / "frontier.md").write_text(to_markdown(result))
    for model, rows in result["models"].items():
        frontier_plot(rows, out / f"frontier_{model}.png", f"{model}: PSNR vs. speed "
                      "(CacheKit: lower pass; alternatives: higher pass)")


def load_rows(path: Path) -> tuple[list[dict], dict]:
    data = json.loads(Path(path).read_text())
    return (data["rows"], data.get("meta", {})) if isinstance(data, dict) else (data, {})
