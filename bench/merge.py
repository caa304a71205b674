"""Merge the rows of a partial benchmark run (`--only ...`) into a full one, then rebuild the
tables and the frontier:

    python scripts/merge_peers.py bench/results/peers.json /tmp/partial/peers.json --out bench/results

A partial row replaces the full run's row of the same model, origin, method and setting (a
re-measured setting) or is added (a new one). Each row was measured against its own interleaved
uncached runs, so rows of separate runs compare as ratios; the meta records every source.
A partial run of a model the base run lacks (`--models unet` merged into a `--models dit` run)
brings that model whole, uncached row included, and its image count (`images_by_model`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli import existing_file, run_cli
from .harness import UNCACHED, write_results


def _key(row: dict) -> tuple:
    return row["model"], row["origin"], row["method"], row["setting"]


OLD_TIMING = "process CPU time, whole samplings alternated"       # runs before the lockstep harness


def _covers(partial: dict, rows: list[dict], model: str) -> bool:
    """Whether the partial re-measured every row of `model` the merged rows have."""
    measured = {_key(r) for r in partial["rows"] if r["model"] == model}
    return all(_key(r) in measured for r in rows if r["model"] == model and r["method"] != UNCACHED)


def _models(rows: list[dict]) -> set[str]:
    return {r["model"] for r in rows}


def merge(base: dict, partials: list[dict]) -> dict:
    rows = list(base["rows"])
    index = {_key(r): i for i, r in enumerate(rows)}
    meta = dict(base.get("meta", {}))
    merged_from = list(meta.get("merged", []))
    images_by_model = dict(meta.get("images_by_model") or {m: meta.get("images") for m in _models(rows)})
    timing_by_model = dict(meta.get("timing_by_model") or {m: meta.get("timing", OLD_TIMING) for m in _models(rows)})
    for partial in partials:
        new_models = _models(partial["rows"]) - _models(rows)
        for model in _models(partial["rows"]):
            if model in new_models or _covers(partial, rows, model):
                timing_by_model[model] = partial.get("meta", {}).get("timing", OLD_TIMING)
        for model in new_models:
            images_by_model[model] = partial.get("meta", {}).get("images")
        for row in partial["rows"]:
            if row["method"] == UNCACHED and row["model"] not in new_models:
                continue
            if _key(row) in index:
                rows[index[_key(row)]] = row
            else:
                index[_key(row)] = len(rows)
                rows.append(row)
        merged_from.append(partial.get("meta", {}).get("command", "?") + f" ({partial.get('meta', {}).get('date', '?')})")
    meta["merged"] = merged_from
    meta["images_by_model"] = images_by_model
    meta["models"] = sorted(_models(rows))
    meta.setdefault("base_command", meta.get("command", "?"))
    meta["command"] = meta["base_command"] + "; merged: " + "; ".join(merged_from)
    meta["timing_by_model"] = timing_by_model
    return {"meta": meta, "rows": rows}


def _load(path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a benchmark peers.json ({error}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path} is not a benchmark peers.json (no 'rows' list); pass the peers.json a "
                         "scripts/bench_peers.py run wrote.")
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(description="Merge partial benchmark runs into a full one and rebuild frontier.*")
    parser.add_argument("base", type=existing_file, help="peers.json of the full run")
    parser.add_argument("partials", nargs="+", type=existing_file, help="peers.json of partial runs (--only ...)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    merged = merge(_load(args.base), [_load(p) for p in args.partials])
    write_results(merged["rows"], merged["meta"], args.out)
    print(f"wrote {args.out}/peers.* and frontier.* ({len(merged['rows'])} rows)")


if __name__ == "__main__":
    run_cli(main)
