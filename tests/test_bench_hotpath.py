"""The hot-path benchmark (bench/hotpath.py) in a tiny configuration: the report's structure,
CacheKit's DeepCache bit-identical to the official helper, interval 1 equal to the unpatched
model. No timing is asserted (timings on a shared CI machine mean nothing at this size)."""
from __future__ import annotations

import json

import pytest
import torch

from cachekit.bench import hotpath

pytest.importorskip("DeepCache", reason="the official DeepCache package is not installed (scripts/setup.sh)")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def report():
    return {"meta": hotpath._meta(["--test"]),
            "A": hotpath.part_a(steps=5, rounds=1, batches=[1], progress=False),   # > 4: no few-step guard
            "B": hotpath.part_b(steps=3, rounds=1, batch=1, progress=False),
            "C": {"skipped": "COMFYUI_DIR is not set"}}


def test_deepcache_rows_cover_both_settings_and_are_bit_identical_to_the_official_helper(report):
    rows = report["A"]
    assert [(r["batch"], r["interval"], r["branch"]) for r in rows] == [(1, 3, 0), (1, 2, 1)]
    for r in rows:
        assert r["bit_identical"] is True and r["max_abs_diff"] == 0.0
        assert r["ours_cpu_s"] > 0 and r["official_cpu_s"] > 0 and r["ratio"] > 0 and len(r["ratios"]) == 1
        assert r["first_run_ratio"] > 0 and r["min_ratio"] > 0 and isinstance(r["pass_time"], bool)
        assert r["full_call_ratio"] > 0 and r["cache_call_ratio"] > 0          # both kinds of step were timed
        # Bytes: ours from the telemetry (or the stores' fallback), the official helper's dict, and
        # the pre-lean store model; every count is of real tensors, so positive.
        assert r["ours_bytes"] is not None and r["ours_bytes"] > 0 and r["ours_bytes_source"]
        assert r["official_bytes"] > 0 and r["today_bytes"] > 0 and r["today_units"] > 0
        assert isinstance(r["pass_bytes_vs_official"], bool)
    assert isinstance(rows[0]["pass_branch0_tenth"], bool) and rows[1]["pass_branch0_tenth"] is None
    # Branch 1 keeps a shallower branch live: fewer units are reused, today's store is smaller.
    assert rows[1]["today_units"] < rows[0]["today_units"] and rows[1]["today_bytes"] < rows[0]["today_bytes"]


def test_interval_1_equals_the_unpatched_model_exactly(report):
    rows = report["B"]
    assert [r["model"] for r in rows] == ["dit", "unet"]
    for r in rows:
        assert r["outputs_equal"] is True and r["hit_rate"] == 0.0
        assert r["ratio"] > 0 and r["control_ratio"] > 0 and isinstance(r["pass_time"], bool) and r["steps"] == 3
        assert r["call_ratio"] > 0 and r["control_call_ratio"] > 0 and r["min_ratio"] > 0


def test_report_renders_every_part_and_serialises(report):
    text = hotpath.render_markdown(report)
    for heading in ("## A.", "## B.", "## C.", "## Targets"):
        assert heading in text
    assert "Skipped: COMFYUI_DIR is not set" in text
    assert len(hotpath.summary_lines(report)) == len(report["A"]) + len(report["B"]) + 1
    json.dumps(report)                                       # the JSON file holds the same report


def test_tensor_bytes_counts_a_shared_tensor_once():
    t = torch.zeros(4, 8)
    counted = hotpath.tensor_bytes({"a": t, "b": (t, [t[:2]]), "c": None})
    assert counted["bytes"] == 4 * 8 * 4 + 2 * 8 * 4 and counted["held"] == 4 * 8 * 4 and counted["tensors"] == 2


def test_quick_settings_and_user_values():
    args = hotpath.parse_args(["--quick", "--steps", "5", "--no-write"])
    assert args.steps == 5 and args.rounds == hotpath.QUICK["rounds"] and args.batches == hotpath.QUICK["batches"]
    args = hotpath.parse_args([])
    assert args.steps == hotpath.FULL["steps"] and args.parts == ["A", "B", "P", "C"]


def test_comfy_part_with_no_write_leaves_the_results_alone(monkeypatch, tmp_path):
    """--comfy --no-write prints only; only a full run's subprocess (--no-write with an explicit
    --json) hands its result back in that file."""
    monkeypatch.setattr(hotpath, "run_comfy", lambda args: {"skipped": "stand-in"})
    results = hotpath.RESULTS / "hotpath.json"
    before = results.read_bytes() if results.is_file() else None
    hotpath.main(["--comfy", "--no-write"])
    assert (results.read_bytes() if results.is_file() else None) == before
    handed = tmp_path / "c.json"
    hotpath.main(["--comfy", "--no-write", "--json", str(handed)])
    assert json.loads(handed.read_text())["skipped"] == "stand-in"
