"""The frontier's deciding rows re-scored on more images (quality only, nothing timed).

    python scripts/check_quality.py [--peers bench/results/peers.json] [--images 96] [--batch 12]
                                    [--extra "METHOD SETTING" ...] [--out bench/results]

The peer benchmark scores every row on 12 images, where one image moves class accuracy by 8
points: "CacheKit's best has class accuracy not below the best alternative" cannot be decided
there. This re-runs, on `--images` images (same seeds and labels scheme, same sampler, same CFG),
only the rows that decide a verdict: per model and speed band the three best CacheKit rows and
the three best alternatives by their 12-image PSNR (the band's verdict then takes each side's
best on the new images), and each unit method's best forecast setting
(FORA on the DiT, DeepCache on the U-Net) with the fewer-steps rows of its model. Speeds stay
the peer benchmark's (quality does not depend on timing).

Per row: PSNR and SSIM vs. the full-step uncached images, class accuracy with its 95 % Wilson
interval, agreement (the classifier gives the image the class it gives the uncached image), and
the work each row executed (FLOPs over the uncached run's, counted as the bench counts them) on the
first batch (the bench's own images) and over all: methods that decide per batch
(AdaptiveDiffusion, SeaCache, FirstBlockCache, ...) may compute more, so run slower, on other images.
`--extra "METHOD SETTING"` re-scores further rows and lists them apart; they decide nothing.
Writes `quality_check.md` and `quality_check.json`.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from ..core.quality import psnr, ssim
from ..tinymodels.bundled import load, load_classifier
from ..tinymodels.shapes import NUM_CLASSES
from . import frontier
from .cli import existing_file, int_at_least, run_cli
from .harness import _flops, _install, _round, _run, calibrated_magcache
from .methods import FEWER_STEPS, Method, all_methods, dydit_methods, fewer_steps, learned_forecast_methods

UNIT_METHODS = {"dit": "FORA", "unet": "DeepCache"}     # the "each unit method with forecasting"
CONTENDERS = 3             # rows per side and band re-scored


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sound at 0 and n, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _ident(row: dict) -> tuple[str, str, str]:
    return (row["origin"], row["method"], row["setting"])


def deciding_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """Per model, the peer rows whose quality decides a verdict (each once, in speed order)."""
    summary = frontier.build(rows)
    wanted: dict[str, dict[tuple, dict]] = {}
    by_ident = {(r["model"], *_ident(r)): r for r in rows if frontier.ok(r)}

    def want(model: str, brief: dict | None) -> None:
        if brief is not None:
            row = by_ident[(model, *_ident(brief))]
            wanted.setdefault(model, {})[_ident(row)] = row
    for band in summary["bands"]:
        for row in contenders(rows, band["model"], band["band"], frontier.is_cachekit) + \
                contenders(rows, band["model"], band["band"], frontier.is_alternative):
            want(band["model"], row)
    for entry in summary["forecast"]:
        if UNIT_METHODS.get(entry["model"]) == entry["method"]:
            want(entry["model"], entry["best"])
            for r in rows:
                if r["model"] == entry["model"] and r["origin"] == FEWER_STEPS and frontier.ok(r):
                    want(entry["model"], r)
    return {model: sorted(found.values(), key=frontier.band_speed) for model, found in wanted.items()}


def contenders(rows: list[dict], model: str, band: float, side, k: int = CONTENDERS) -> list[dict]:
    """One side's `k` best rows in a band by their 12-image PSNR: on more images the order of
    close rows may change, so the band is decided among these, not by the 12-image winner alone."""
    fast = [r for r in rows if r["model"] == model and side(r) and frontier.ok(r) and r.get("psnr_db") is not None
            and (frontier.band_speed(r) or 0) >= band]
    return sorted(fast, key=lambda r: (-r["psnr_db"], -frontier.band_speed(r)))[:k]


def _methods_for(kind: str, rows: list[dict], magcache_ratios: dict | None, steps: int) -> dict[tuple, Method]:
    fewer = sorted({r["settings"]["steps"] for r in rows if r["origin"] == FEWER_STEPS})
    known = all_methods(magcache_ratios=magcache_ratios or {}, fewer=[]) + dydit_methods()
    known += learned_forecast_methods(steps)
    known += [fewer_steps(k) for k in fewer]
    return {(m.origin, m.name, m.setting): m for m in known if kind in m.models}


def score(kind: str, rows: list[dict], *, steps: int, images: int, cfg: float, seed: int = 0, batch: int | None = None,
          progress: bool = True) -> list[dict]:
    """Quality of `rows` (peer rows of model `kind`) on `images` images; the uncached row first.

    Images are sampled `batch` at a time (batch k with seed + k), as the benchmark sampled its
    own: methods that decide once per step for the whole batch (AdaptiveDiffusion, SeaCache,
    FirstBlockCache, ...) then decide from batches like the ones whose speed the bench measured,
    and the first batch holds the bench's own images."""
    base, classifier = load(kind), load_classifier()
    labels = torch.arange(images) % NUM_CLASSES
    batch = batch or images
    chunks = [(labels[i:i + batch], seed + k) for k, i in enumerate(range(0, images, batch))]

    def sampled(method: Method | None) -> tuple[torch.Tensor, list[float]]:
        """The images, and the FLOPs of each batch (counted as the bench counts them)."""
        out, flops = [], []
        for chunk, chunk_seed in chunks:
            setup = None if method is None else _install(method, base, steps)
            flops.append(_flops(lambda: out.append(_run(setup, base, chunk, steps, cfg, chunk_seed))))
            if setup is not None:
                setup.finish()
        return torch.cat(out), flops
    reference, reference_flops = sampled(None)

    @torch.no_grad()
    def predicted(batch: torch.Tensor) -> torch.Tensor:
        return classifier(batch).argmax(1)
    reference_class = predicted(reference)
    ratios = None
    if any(r["method"] == "MagCache" for r in rows):
        bench_labels, bench_seed = chunks[0]          # calibrated on the bench's own images
        ratios = calibrated_magcache(base, bench_labels, steps, cfg, bench_seed)
    methods = _methods_for(kind, rows, ratios, steps)
    missing = [" ".join(_ident(r)) for r in rows if _ident(r) not in methods]
    if missing:
        raise ValueError(f"cannot rebuild {', '.join(missing)} on the {kind} (a learned router or a peer this "
                         f"install lacks); re-run the peer benchmark without them")

    def entry(row: dict | None, output: torch.Tensor, flops: list[float]) -> dict:
        classes = predicted(output)
        correct = int((classes == labels).sum())
        low, high = wilson(correct, images)
        brief = ({"origin": "-", "method": "uncached", "setting": f"steps={steps}", "speed": 1.0} if row is None
                 else {"origin": row["origin"], "method": row["method"], "setting": row["setting"],
                       "speed": frontier.band_speed(row), "accuracy_12": row.get("accuracy"),
                       "psnr_db_12": row.get("psnr_db")})
        executed = None if row is None else round(sum(flops) / sum(reference_flops), 3)
        return {**brief, "psnr_db": round(psnr(reference, output), 2), "ssim": round(ssim(reference, output), 4),
                "accuracy": round(correct / images, 4), "accuracy_ci95": [round(low, 4), round(high, 4)],
                "agreement": round(float((classes == reference_class).float().mean()), 4),
                "work": executed, "work_first": None if executed is None else round(flops[0] / reference_flops[0], 3),
                "extra": bool(row is not None and row.get("extra"))}
    out = [entry(None, reference, reference_flops)]
    for row in tqdm(rows, desc=f"{kind}: quality on {images} images", unit="row", disable=not progress):
        out.append(entry(row, *sampled(methods[_ident(row)])))
    return out


def verdicts(rows: list[dict], scored: dict[str, list[dict]]) -> dict:
    """The band and forecast verdicts of bench/frontier.py, with the re-scored quality."""
    summary = frontier.build(rows)
    find = lambda model, brief: next(s for s in scored[model] if brief is not None and
                                     (s["origin"], s["method"], s["setting"]) == _ident(brief))
    bands = []
    for band in summary["bands"]:
        if band["model"] not in scored or band["cachekit"] is None or band["alternative"] is None:
            continue
        # Each side's best on the re-scored images, among its contenders.
        best = lambda side: max((find(band["model"], r) for r in contenders(rows, band["model"], band["band"], side)),
                                key=lambda s: (s["psnr_db"], s["speed"]))
        ours, theirs = best(frontier.is_cachekit), best(frontier.is_alternative)
        bands.append({"model": band["model"], "band": band["band"], "cachekit": ours, "alternative": theirs,
                      "margin_db": round(ours["psnr_db"] - theirs["psnr_db"], 2),
                      "margin_met": ours["psnr_db"] - theirs["psnr_db"] >= 1.0,
                      "accuracy_not_below": ours["accuracy"] >= theirs["accuracy"]})
    forecast = []
    for model, method in UNIT_METHODS.items():
        if model not in scored:
            continue
        entry = next((e for e in summary["forecast"] if e["model"] == model and e["method"] == method), None)
        if entry is None:
            continue
        best = find(model, entry["best"])
        fewer = [s for s in scored[model] if s["origin"] == FEWER_STEPS]
        baseline = _interpolate(fewer, best["speed"], "psnr_db")
        forecast.append({"model": model, "method": method, "best": best,
                         "fewer_steps_psnr_db": None if baseline is None else round(baseline, 2),
                         "fewer_steps_accuracy": _round(_interpolate(fewer, best["speed"], "accuracy"), 4),
                         "margin_db": None if baseline is None else round(best["psnr_db"] - baseline, 2)})
    return {"bands": bands, "forecast": forecast}


def _interpolate(points: list[dict], speed: float, key: str) -> float | None:
    """`key` linearly interpolated in speed between the two fewer-steps rows around `speed`."""
    return frontier.interpolate([(p["speed"], p[key]) for p in points], speed)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ci(s: dict) -> str:
    low, high = s["accuracy_ci95"]
    return f"{_pct(s['accuracy'])} [{100 * low:.0f}-{100 * high:.0f}]"


def _work(s: dict) -> str:
    return "-" if s.get("work") is None else f"{_pct(s['work_first'])} / {_pct(s['work'])}"


def to_markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# The deciding rows on {meta['images']} images", "",
             f"Command: `{meta['command']}` ({meta['date']}, {meta['runtime_min']} min; rows and speeds from "
             f"{meta['peers']}, measured {meta['peers_date']} on {meta['peers_images']} images)."
             + (f" Sampled {meta['batch']} images at a time (batch k with seed k), as the bench sampled: methods that "
                "decide per batch decide as they did when timed." if meta.get("batch") else ""), "",
             "Quality only: PSNR / SSIM vs. the full-step uncached images, class accuracy with its 95 % Wilson "
             "interval, agreement = the classifier gives the image the uncached image's class. Speed: the peer "
             "benchmark's conservative speed (CacheKit: its slower pass; alternatives: their faster).", "",
             "## Speed bands", "",
             "| model | band | CacheKit best | speed | PSNR | accuracy [95 %] | agree | best alternative | speed | PSNR "
             "| accuracy [95 %] | agree | margin (dB) | accuracy not below |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in result["bands"]:
        o, t = b["cachekit"], b["alternative"]
        lines.append(f"| {b['model']} | >= {b['band']}x | {frontier._who(o)} | {o['speed']:.2f} | {o['psnr_db']:.2f} | {_ci(o)} "
                     f"| {_pct(o['agreement'])} | {frontier._who(t)} | {t['speed']:.2f} | {t['psnr_db']:.2f} | {_ci(t)} "
                     f"| {_pct(t['agreement'])} | {b['margin_db']:+.2f} | {'yes' if b['accuracy_not_below'] else '**no**'} |")
    lines += ["", "## Unit methods with forecasting vs. fewer steps at the same speed", "",
              "| model | method | setting | speed | PSNR | accuracy [95 %] | fewer steps there: PSNR | accuracy "
              "| margin (dB) |", "|---|---|---|---|---|---|---|---|---|"]
    for f in result["forecast"]:
        s = f["best"]
        margin = "-" if f["margin_db"] is None else f"{f['margin_db']:+.2f}"
        lines.append(f"| {f['model']} | {f['method']} | {s['setting']} | {s['speed']:.2f} | {s['psnr_db']:.2f} "
                     f"| {_ci(s)} | {f['fewer_steps_psnr_db']} | {_pct(f['fewer_steps_accuracy'])} | {margin} |")
    extra = [(model, s) for model, scored in result["rows"].items() for s in scored if s.get("extra")]
    if extra:
        lines += ["", "## Outside the rule (--extra: re-scored on request, deciding nothing)", "",
                  "| model | origin | method | setting | speed | PSNR (12 images) | PSNR | accuracy [95 %] | agree "
                  "| work: first batch / all |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {model} | {s['origin']} | {s['method']} | {s['setting']} | {s['speed']:.2f} "
                  f"| {s.get('psnr_db_12', '-')} | {s['psnr_db']} | {_ci(s)} | {_pct(s['agreement'])} | {_work(s)} |"
                  for model, s in extra]
    lines += ["", "## Every re-scored row", "",
              "Work: FLOPs executed over the uncached run's (torch FlopCounterMode, as the bench counts them) on "
              "the first batch (the bench's own images) / over all batches; a method that decides per batch runs "
              "slower where it executes more.", "",
              "| model | origin | method | setting | speed | PSNR (12 images) | PSNR | SSIM | accuracy (12 images) "
              "| accuracy [95 %] | agree | work |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, scored in result["rows"].items():
        for s in scored:
            lines.append(f"| {model} | {s['origin']} | {s['method']} | {s['setting']} | {s['speed']:.2f} "
                         f"| {s.get('psnr_db_12', '-')} | {s['psnr_db']} | {s['ssim']} "
                         f"| {_pct(s.get('accuracy_12'))} | {_ci(s)} | {_pct(s['agreement'])} | {_work(s)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="check_quality.py", description="Re-score the frontier's deciding rows "
                                     "(band winners, forecast vs. fewer steps) on more images; nothing is timed.")
    parser.add_argument("--peers", type=existing_file, default=Path("bench/results/peers.json"),
                        help="the peer benchmark's peers.json (default bench/results/peers.json)")
    parser.add_argument("--images", type=int_at_least(1), default=96)
    parser.add_argument("--models", nargs="+", choices=("dit", "unet"), default=["dit", "unet"])
    parser.add_argument("--batch", type=int_at_least(1),
                        help="images per sampling run (default: the bench's own image count, so methods that decide "
                             "per batch decide as they did when the bench timed them)")
    parser.add_argument("--extra", nargs="+", default=[], metavar="'METHOD SETTING'",
                        help="also re-score these peer rows (as the report names them, e.g. 'AdaptiveDiffusion "
                             "delta=0.01 max_skip=3 reuse=forecast1'); listed apart, they decide nothing")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    try:
        rows, meta = frontier.load_rows(args.peers)
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "model" in r for r in rows):
            raise ValueError
    except (ValueError, KeyError, UnicodeDecodeError):
        parser.error(f"--peers {args.peers} is not a peer benchmark's peers.json (scripts/bench_peers.py writes one)")
    torch.set_num_threads(1)
    started = time.perf_counter()
    chosen = {m: r for m, r in deciding_rows(rows).items() if m in args.models}
    if not chosen:
        parser.error(f"--peers {args.peers} has no speed-band rows for {', '.join(args.models)}")
    for text in args.extra:
        found = [r for r in rows if r["model"] in chosen and frontier.ok(r) and f"{r['method']} {r['setting']}" == text]
        if not found:
            parser.error(f"--extra {text!r} is no scored row of {', '.join(chosen)} in {args.peers}; give a row's "
                         "method and setting as the peer report names them, e.g. 'FORA N=2'")
        for r in found:
            if _ident(r) not in {_ident(c) for c in chosen[r["model"]]}:
                chosen[r["model"]].append({**r, "extra": True})
    batch = args.batch or meta.get("images") or args.images
    scored = {model: score(model, model_rows, steps=meta.get("steps", 25), images=args.images,
                           cfg=meta.get("cfg", 3.0), batch=batch) for model, model_rows in chosen.items()}
    result = {"meta": {"command": shlex.join(["python", "scripts/check_quality.py",
                                            *(sys.argv[1:] if argv is None else argv)]),
                       "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       "runtime_min": round((time.perf_counter() - started) / 60, 1), "images": args.images, "batch": batch,
                       "peers": str(args.peers), "peers_date": meta.get("date", "?"),
                       "peers_images": meta.get("images", "?")},
              "rows": scored, **verdicts(rows, scored)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality_check.json").write_text(json.dumps(result, indent=1))
    text = to_markdown(result)
    (args.out / "quality_check.md").write_text(text)
    print(text)


if __name__ == "__main__":
    run_cli(main)
