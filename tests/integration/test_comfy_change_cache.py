"""ChangeCache (online, change-driven) in real ComfyUI on tiny models built from ComfyUI's classes."""
from __future__ import annotations

import pytest
import torch

from .comfy_graph import Graph
from .comfy_models import UnknownModelPatcher
from .test_comfy_methods import STEPS, _count, _last_run, _sample, _unit_classes

NODE = "CacheKitChangeCache"
FAMILIES = ("sd15", "sdxl", "mmdit", "flux", "pixart", "wan")


def _settings(threshold, **kw):
    return {"threshold": threshold, "warmup_steps": 1, "max_reuse": 0, "cache_branch": 0, "start_percent": 0.0,
            "end_percent": 1.0, **kw}


@pytest.mark.parametrize("family", FAMILIES)
def test_threshold_zero_is_exact_and_a_high_one_reuses_the_skip_units(comfy, family, monkeypatch):
    ref = _sample(comfy, family, f"ch-{family}-ref", cfg=2.5)
    off = _sample(comfy, family, f"ch-{family}-off", (NODE, _settings(0.0)), cfg=2.5)
    assert torch.equal(off, ref)
    run = _last_run(comfy)
    assert run.hit_rate == 0 and run.probe_values[0] is None and all(v is not None for v in run.probe_values[1:])

    layout, classes, instances = _unit_classes(comfy, family)
    if family in ("sd15", "sdxl"):
        # U-Net units are containers the U-Net loops over: count the ResBlocks inside them instead
        res_block = __import__("comfy.ldm.modules.diffusionmodules.openaimodel", fromlist=["ResBlock"]).ResBlock
        per_unit = [sum(isinstance(m, res_block) for m in unit.modules()) for unit in instances]
        counts = _count(monkeypatch, [res_block])
    else:
        per_unit = [1] * len(instances)
        counts = _count(monkeypatch, classes, instances)
    cached = _sample(comfy, family, f"ch-{family}-on", (NODE, _settings(10.0)), cfg=2.5)
    run = _last_run(comfy)
    assert torch.isfinite(cached).all() and not torch.equal(cached, ref)
    # step 0 computes (no reference yet, and it is the warm-up); later steps reuse the skip row while
    # the change since the last full step (as recorded) stays below the threshold
    policy = comfy.pack("core.methods.change").ChangePolicy(comfy.pack("core.methods.change").ChangeConfig())
    skip = policy.skip_row(layout.units)
    reused = [k >= 1 and v is not None and v < 10.0 for k, v in enumerate(run.probe_values)]
    assert [sum(r) > 0 for r in run.reused] == reused and sum(reused) >= 2, run.probe_values
    for k, row in enumerate(run.reused):
        assert [n > 0 for n in row] == (skip if reused[k] else [False] * len(skip))
    # real forward calls of the unit modules (one joint cond+uncond call per step)
    live = sum(n for n, skipped in zip(per_unit, skip) if not skipped)
    expected = sum(live if r else sum(per_unit) for r in reused)
    assert sum(counts.values()) == expected, (counts, expected)


@pytest.mark.parametrize("family", ("sd15", "flux"))
def test_joint_and_split_cond_calls_take_the_same_decisions(comfy, family, monkeypatch):
    # a threshold in the middle of this model's changes, so some steps reuse and some not
    _sample(comfy, family, f"ch-{family}-cal", (NODE, _settings(0.0)), cfg=2.5)
    changes = sorted(v for v in _last_run(comfy).probe_values if v is not None)
    settings = _settings(changes[len(changes) // 2] * 1.5)
    _sample(comfy, family, f"ch-{family}-joint", (NODE, settings), cfg=2.5)
    joint = _last_run(comfy)
    import comfy.model_management as mm
    monkeypatch.setattr(mm, "get_free_memory",   # no room for a joint batch: one call per cond
                        lambda dev=None, torch_free_too=False: (0, 0) if torch_free_too else 0)
    _sample(comfy, family, f"ch-{family}-split", (NODE, settings), cfg=2.5)
    split = _last_run(comfy)
    assert split.model_calls == 2 * STEPS and joint.model_calls == STEPS
    assert [sum(r) > 0 for r in split.reused] == [sum(r) > 0 for r in joint.reused]
    assert any(sum(r) > 0 for r in joint.reused)


def test_the_run_json_has_the_probe_values_and_the_node_refuses_unknown_models(comfy):
    _sample(comfy, "pixart", "ch-json", (NODE, _settings(0.3)), cfg=2.5)
    record = comfy.pack("nodes.history").recent_json(1)[-1]
    telemetry = record["telemetry"]
    assert telemetry["method"] == "ChangeCache" and telemetry["probe_label"]
    assert len(telemetry["probe_values"]) == STEPS and telemetry["probe_values"][1] > 0
    apply_method = comfy.pack("nodes.method_nodes").apply_method
    with pytest.raises(ValueError, match="ChangeCache does not support Elsewhere"):
        apply_method("change", UnknownModelPatcher(), _settings(0.1))
