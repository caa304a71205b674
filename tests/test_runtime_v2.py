"""Runtime v2: what is stored, region skips, reuse strategies, FLOPs after the run, rank agreement."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.unets.unet_2d_blocks import DownBlock2D, UpBlock2D

import tiny_diffusers as td
from cachekit import apply_deepcache, apply_fora
from cachekit.core import agreement
from cachekit.core.clock import StepClock
from cachekit.core.methods.fora import ForaConfig, ForaPolicy
from cachekit.core.reuse import Forecast, Hold, blend, strategy_from_name
from cachekit.core.session import CacheSession, active_call
from cachekit.core.streams import SINGLE_STREAM, tree_bytes
from cachekit.core.units import Unit, UnitMap
from cachekit.diffusers_host.units import unet_units
from torch.utils.flop_counter import FlopCounterMode


# -- what is stored ---------------------------------------------------------------------------
def _deep_output_bytes(model, branch):
    """Bytes of every unit output DeepCache at this branch reuses: what a store of the whole deep
    region (the previous runtime's) keeps, and the bytes of each such unit's output."""
    units, slots, _ = unet_units(model)
    from cachekit.core.methods.deepcache import DeepCacheConfig, DeepCachePolicy
    plan = DeepCachePolicy(DeepCacheConfig(cache_interval=3, cache_branch=branch)).plan(units, 6, range(6))
    sizes = {}
    hooks = [slot.get().register_forward_hook(
        lambda m, a, out, name=u.name: sizes.__setitem__(name, tree_bytes(out, set())))
        for u, slot in zip(units.units, slots)]
    td.sample("unet", model, td.scheduler(1))
    for h in hooks:
        h.remove()
    return {u.name: sizes[u.name] for u, reuse in zip(units.units, plan[1]) if reuse}


def test_deepcache_branch_0_stores_the_one_tensor_a_cache_step_reads():
    model = td.unet()
    deep = _deep_output_bytes(model, 0)
    handle = apply_deepcache(model, cache_interval=3, cache_branch=0, scheduler=td.scheduler(6))
    td.sample("unet", model, td.scheduler(6))
    stored = handle.finish_run().cache_bytes
    handle.remove()
    # The last up layer reads the layer before it and the conv_in skip (computed): one tensor.
    assert stored == deep["up.0.attentions.1"]
    assert stored * 10 <= sum(deep.values())


def test_deepcache_skips_whole_blocks_with_one_lookup(monkeypatch):
    model = td.unet()
    calls = {"down": 0, "up": 0}
    for cls, key in ((DownBlock2D, "down"), (UpBlock2D, "up")):
        original = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, *a, __o=original, __k=key, **k:
                            (calls.__setitem__(__k, calls[__k] + 1), __o(self, *a, **k))[1])
    handle = apply_deepcache(model, cache_interval=3, cache_branch=0, scheduler=td.scheduler(6))
    td.sample("unet", model, td.scheduler(6))
    # Full steps 0 and 3 run both blocks; the four cache steps enter neither (deep at branch 0).
    assert calls == {"down": 2, "up": 2}
    handle.remove()


# -- reuse strategies -------------------------------------------------------------------------
def test_forecast_order_1_is_exact_on_lines():
    strategy, entry = Forecast(1), None
    for step in (0, 3, 5):                                 # refreshes with uneven gaps
        entry = strategy.refresh(entry, torch.tensor([3.0 + 2.0 * step]), step)
    for step in (5, 6, 9):
        assert torch.allclose(strategy.output(entry, step), torch.tensor([3.0 + 2.0 * step]))
    assert len(entry[1]) == 2 == strategy.tensors_per_entry()


def test_forecast_order_2_follows_taylorseer():
    # TaylorSeer: f' and f'' by divided differences between the last refreshes, then
    # f(t + d) = f + f' d + f'' d^2 / 2. Refreshes of f(s) = 1 - s + s^2 / 2 at 0, 2, 4:
    # f = 5, f' = (5 - 1) / 2 = 2, f'' = (2 - 0) / 2 = 1, so at step 6: 5 + 2 * 2 + 1 * 4 / 2 = 11.
    strategy, entry = Forecast(2), None
    for step in (0, 2, 4):
        entry = strategy.refresh(entry, torch.tensor([1.0 - step + 0.5 * step * step]), step)
    assert torch.equal(strategy.output(entry, 6), torch.tensor([11.0]))
    assert torch.equal(strategy.output(entry, 4), torch.tensor([5.0]))
    # With two refreshes it has f' only; with one it holds.
    two = strategy.refresh(strategy.refresh(None, torch.tensor([1.0]), 0), torch.tensor([1.0]), 2)
    assert len(two[1]) == 2 and torch.equal(strategy.output(two, 5), torch.tensor([1.0]))
    assert torch.equal(strategy.output(strategy.refresh(None, torch.tensor([7.0]), 0), 3), torch.tensor([7.0]))
    assert strategy.tensors_per_entry() == 3


def test_strategy_names_and_blend():
    assert strategy_from_name("hold") == Hold() and strategy_from_name("forecast2") == Forecast(2)
    with pytest.raises(ValueError, match="reuse must be one of"):
        strategy_from_name("taylor")
    assert torch.equal(blend(0.25, torch.ones(2), torch.zeros(2)), torch.full((2,), 0.25))


def test_a_session_with_forecast_reuse_extrapolates_the_units_output():
    units = UnitMap("toy", (Unit("u0", "g", "block"),))
    sigmas = [float(8 - i) for i in range(8)]

    class Forecasting(ForaPolicy):
        reuse = Forecast(1)
    session = CacheSession("owner-fc", units, Forecasting(ForaConfig(interval=3)), StepClock(sigmas), range(7))
    outs = []
    for step in range(7):
        x = torch.zeros(1, 1)

        def model(step=step, x=x):
            call = active_call("owner-fc")
            return call.session.run_unit(call, 0, lambda: x + 10.0 * step, x)
        outs.append(float(session.model_call(model, sigma=sigmas[step], layout=SINGLE_STREAM, samples=1,
                                             call_input=x)))
    # FORA refreshes at 0, 3, 6 (a countdown from the last step). One refresh: hold; two: the
    # linear output is forecast exactly.
    assert outs == [0.0, 0.0, 0.0, 30.0, 40.0, 50.0, 60.0]
    assert session.telemetry.reused[2] == [1] and session.telemetry.reused[4] == [1]


# -- FLOP profile after the run ----------------------------------------------------------------
def test_flop_profile_is_measured_after_the_run_not_inside_it(monkeypatch):
    entered = []
    original = FlopCounterMode.__enter__
    monkeypatch.setattr(FlopCounterMode, "__enter__", lambda self: (entered.append(1), original(self))[1])
    model = td.dit()
    with FlopCounterMode(display=False) as real:
        with torch.no_grad():
            model(**td.inputs("dit", model), timestep=torch.tensor([999, 999]))
    entered.clear()
    handle = apply_fora(model, interval=3, scheduler=td.scheduler(6))
    td.sample("dit", model, td.scheduler(6))
    assert entered == []                                   # sampling never profiled
    run = handle.finish_run()
    assert entered == [] and run.unit_flops is None
    fraction = run.executed_fraction()                     # the report asks: now it is measured
    assert entered and 0.0 < fraction < 1.0 and run.ideal_speedup() > 1.0
    # The replay counts the same FLOPs as a real call of the model (batch 2).
    assert run.call_flops * 2 == real.get_total_flops()
    # A second run of the same model and shape knows its profile from the start.
    td.sample("dit", model, td.scheduler(6))
    assert handle.session.telemetry.unit_flops == run.unit_flops
    handle.remove()


# -- the agreement point under torch.distributed ---------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
AGREE_SCRIPT = """
import json, os, sys
sys.path.insert(0, {scripts!r})
from pack import load_pack
load_pack()
import torch, torch.distributed as dist
from diffusers import DiTTransformer2DModel
from cachekit import apply_adaptive_skip, apply_change_cache, apply_fora

STEPS = 14

def run(rank, method):
    # The same model on every rank; each rank samples its own batch shard, and the shards change
    # differently: smoothly on rank 0 (AdaptiveDiffusion would skip), erratically but little on rank 1.
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    if method == "adaptive":
        handle = apply_adaptive_skip(model, delta=0.3, max_skip_steps=3, num_inference_steps=STEPS)
    elif method == "change":
        handle = apply_change_cache(model, threshold=0.05, warmup_steps=1, max_reuse=0, num_inference_steps=STEPS)
    else:
        handle = apply_fora(model, interval=3, num_inference_steps=STEPS)
    g = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([rank, rank + 2])
    with torch.no_grad():
        for k in range(STEPS):
            model(x, timestep=torch.full((2,), 900.0 - 60 * k), class_labels=y)
            scale = 1.0 / (k + 1) if rank == 0 else (0.02 if k % 2 else 0.002)
            x = x + scale * torch.randn(2, 4, 8, 8, generator=g)
    run = handle.finish_run()
    handle.remove()
    if method == "change":
        return [sum(row) > 0 for row in run.reused]
    return [sum(row) > 0 for row in run.computed] if method == "adaptive" else run.reused

out = os.environ["AGREE_OUT"]
if os.environ.get("ALONE"):
    json.dump({{m: [run(0, m), run(1, m)] for m in ("adaptive", "change")}}, open(out + "/alone.json", "w"))
else:
    dist.init_process_group("gloo")
    rank, reduces = dist.get_rank(), []
    real = dist.all_reduce
    dist.all_reduce = lambda *a, **k: (reduces.append(1), real(*a, **k))[1]
    decisions = run(rank, "adaptive")
    online = len(reduces)
    reduces.clear()
    change = run(rank, "change")
    change_reduces = len(reduces)
    reduces.clear()
    fora = run(rank, "fora")
    json.dump({{"decisions": decisions, "online_reduces": online, "static_reduces": len(reduces), "fora": fora,
               "change": change, "change_reduces": change_reduces}},
              open(out + f"/rank{{rank}}.json", "w"))
    dist.destroy_process_group()
"""


def test_online_decisions_agree_across_ranks_that_see_different_inputs(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE_SCRIPT.format(scripts=str(ROOT / "scripts")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AGREE_OUT": str(tmp_path)}
    alone = subprocess.run([sys.executable, str(script)], env={**env, "ALONE": "1"}, capture_output=True, text=True,
                           timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    alone = json.loads((tmp_path / "alone.json").read_text())
    alone0, alone1 = alone["adaptive"]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert alone0 != alone1                  # alone, the ranks would decide differently (and hang a real model)
    assert rank0["decisions"] == rank1["decisions"]          # agreed: the same decision at every step
    assert not all(rank0["decisions"])                        # and steps were skipped
    # One all-reduce per step with a measurement (a latent difference exists from the third
    # step on: 12 of 14); static policies: none.
    assert rank0["online_reduces"] == rank1["online_reduces"] == 12
    assert rank0["static_reduces"] == rank1["static_reduces"] == 0
    assert rank0["fora"] == rank1["fora"]
    # ChangeCache (online, unit level): alone the ranks differ; agreed they reuse at the same steps,
    # with one all-reduce per step that has a reference probe (13 of 14).
    assert alone["change"][0] != alone["change"][1]
    assert rank0["change"] == rank1["change"] and any(rank0["change"]) and not all(rank0["change"])
    assert rank0["change_reduces"] == rank1["change_reduces"] == 13


def test_agree_is_the_identity_without_a_process_group():
    probe = torch.tensor(0.123, dtype=torch.float16)
    assert agreement.agree(probe) is probe


def test_core_imports_no_host():
    """core/ is pure torch: hosts (ComfyUI, diffusers, gradio; our nodes/, diffusers_host/, panel/)
    are its peers, never its dependencies."""
    import ast
    forbidden = {"comfy", "comfy_api", "comfy_execution", "server", "folder_paths", "diffusers", "gradio",
                 "accelerate", "nodes", "diffusers_host", "panel", "bench"}
    found = []
    for path in sorted((ROOT / "core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    names = [node.module or ""]
                else:   # relative: resolve against the package path inside the repo
                    parts = list(path.relative_to(ROOT).parts[:-1])[: len(path.relative_to(ROOT).parts) - node.level]
                    names = [".".join(parts + ([node.module] if node.module else []))]
            else:
                continue
            found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert not found, found
