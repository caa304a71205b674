"""The bundled tiny DyDiT (tinymodels/train_dydit.py): it loads, really routes, and apply_dydit's
sliced run equals the masked DyDiT computation on it.

The masked reference is written here from the state dict, as tests/dydit_reference.py writes the
official one: every head, group and token computed, multiplied by the gates (explicit softmax
attention, masks before the output projection / GELU, the token gate on the gated MLP output).
tests/dydit_reference.py itself reads the official layout (one timestep and class embedder); the
bundled DiT is a diffusers DiT with an embedder per block and diffusers' numerics (timestep
frequencies over 127, FF norm eps 1e-5), which that layout cannot hold, so the same semantics
are written for the diffusers layout below. Its gates use dydit_reference's official threshold.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import dydit_reference as ref
from cachekit import apply_dydit
from cachekit.tinymodels.bundled import DYDIT, dydit_paths, load_dydit
from cachekit.tinymodels.sampling import make_scheduler

pytestmark = pytest.mark.skipif(not all(p.is_file() for p in dydit_paths()),
                                reason=f"the bundled DyDiT {DYDIT} is not trained yet (scripts/train_dydit.py)")
TOL = 1e-5


@pytest.fixture(scope="module")
def bundled():
    denoiser, routers = load_dydit()
    return denoiser.model, routers


def _timestep_embedding(t, dim=256):
    """diffusers' Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - 1))
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def masked_reference(s, routers, x, t, y, heads, groups, eps_ff=1e-5):
    """The DyDiT forward on the diffusers DiT layout, masked. Returns (output, per-block masks)."""
    s = {**s, **routers.state_dict()}
    lin = lambda v, key: F.linear(v, s[key + ".weight"], s.get(key + ".bias"))

    def conditioning(i):
        e = f"transformer_blocks.{i}.norm1.emb."
        temb = lin(F.silu(lin(_timestep_embedding(t), e + "timestep_embedder.linear_1")), e + "timestep_embedder.linear_2")
        return temb, temb + s[e + "class_embedder.embedding_table.weight"][y]

    patch = s["pos_embed.proj.weight"].shape[-1]
    h = F.conv2d(x, s["pos_embed.proj.weight"], s["pos_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    batch, tokens, hidden = h.shape
    h = h + ref.sincos_2d(hidden, int(tokens ** 0.5))      # DiT's fixed table (diffusers does not save it)
    head_dim = hidden // heads
    router_input, _ = conditioning(0)              # the routers read block 0's timestep embedding
    masks = []
    for i in range(len(routers.blocks)):
        b, rb = f"transformer_blocks.{i}.", f"blocks.{i}."
        _, c = conditioning(i)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = lin(F.silu(c), b + "norm1.linear").chunk(6, 1)
        ones = torch.ones(batch, 1)
        head_gate = torch.cat([ones, ref._gate(lin(router_input, rb + "attn_rate.router"))], dim=1)
        group_gate = torch.cat([ones, ref._gate(lin(router_input, rb + "mlp_rate.router"))], dim=1)
        a_in = F.layer_norm(h, (hidden,), eps=1e-6) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        q, k, v = (lin(a_in, b + f"attn1.to_{n}").view(batch, tokens, heads, head_dim).transpose(1, 2) for n in "qkv")
        a = ((q * head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        a = a.transpose(1, 2).reshape(batch, tokens, hidden) * head_gate.repeat_interleave(head_dim, 1)[:, None]
        h = h + gate_msa[:, None] * lin(a, b + "attn1.to_out.0")
        token_gate = ref._gate(lin(F.relu(lin(h, rb + "token_selection.mlp_head.0")), rb + "token_selection.mlp_head.2"))
        m_in = F.layer_norm(h, (hidden,), eps=eps_ff) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        f1 = lin(m_in, b + "ff.net.0.proj")
        f1 = f1 * group_gate.repeat_interleave(f1.shape[-1] // groups, 1)[:, None]
        mlp = gate_mlp[:, None] * lin(F.gelu(f1, approximate="tanh"), b + "ff.net.2")
        h = h + token_gate * mlp
        masks.append({"heads": head_gate.bool(), "groups": group_gate.bool(), "tokens": token_gate.squeeze(-1).bool()})
    _, c = conditioning(0)
    shift, scale = lin(F.silu(c), "proj_out_1").chunk(2, dim=1)
    h = lin(F.layer_norm(h, (hidden,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None], "proj_out_2")
    channels, side = h.shape[-1] // (patch * patch), int(tokens ** 0.5)
    h = h.reshape(batch, side, side, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(batch, channels, side * patch, side * patch), masks


def _cfg_batch(seed=0, images=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(images, 3, 32, 32, generator=g)
    labels = torch.arange(images) % 6
    return torch.cat([x, x]), torch.cat([torch.full_like(labels, 6), labels])


def test_the_bundled_dydit_loads_with_its_side_car(bundled):
    model, routers = bundled
    shape = routers.shape
    assert (shape.depth, shape.heads, shape.hidden) == (6, 6, 192)
    assert shape.mlp_groups == 12 and shape.token_hidden == 12
    assert routers.embedding == "diffusers"           # trained on the diffusers DiT's embedding
    assert not model.training


@pytest.mark.parametrize("t", [981, 741, 501, 261, 21])
def test_sliced_equals_the_masked_reference(bundled, t):
    model, routers = bundled
    x, y = _cfg_batch()
    times = torch.full((x.shape[0],), t)
    with torch.no_grad():
        expected, masks = masked_reference(model.state_dict(), routers, x, times, y, heads=6, groups=12)
        plain = model(x, timestep=times, class_labels=y, return_dict=False)[0]
        handle = apply_dydit(model, routers, num_inference_steps=1)
        try:
            out = model(x, timestep=times, class_labels=y, return_dict=False)[0]
        finally:
            handle.remove()
    assert (out - expected).abs().max() <= TOL
    assert handle.telemetry.masked_calls == 0
    for block, m in enumerate(masks):
        assert handle.telemetry.head_sum[0][block] == int(m["heads"].sum())
        assert handle.telemetry.group_sum[0][block] == int(m["groups"].sum())
        assert handle.telemetry.tokens_kept[0][block] == int(m["tokens"].sum())
    if any(not m["tokens"].all() or not m["heads"].all() or not m["groups"].all() for m in masks):
        assert (out - plain).abs().max() > 1e-3              # routing changed something here


def test_the_trainers_masked_path_is_the_same_computation(bundled):
    from cachekit.tinymodels.train_dydit import MaskedDyDiT
    model, routers = bundled
    x, y = _cfg_batch(seed=1)
    times = torch.full((x.shape[0],), 501)
    masked = MaskedDyDiT(model, routers.eval())
    try:
        with torch.no_grad():
            out = model(x, timestep=times, class_labels=y, return_dict=False)[0]
    finally:
        masked.remove()
    expected, _ = masked_reference(model.state_dict(), routers, x, times, y, heads=6, groups=12)
    assert (out - expected).abs().max() <= TOL


def test_it_really_routes_over_a_sampling_schedule(bundled):
    """Not all on and not all off: some heads, groups and tokens are dropped at some steps, and
    every block keeps something."""
    model, routers = bundled
    x, y = _cfg_batch(seed=2)
    dropped_heads = dropped_groups = dropped_tokens = False
    kept_share = []
    with torch.no_grad():
        for t in make_scheduler(25).timesteps:
            times = t.expand(x.shape[0])
            _, masks = masked_reference(model.state_dict(), routers, x, times, y, heads=6, groups=12)
            for m in masks:
                dropped_heads |= not bool(m["heads"].all())
                dropped_groups |= not bool(m["groups"].all())
                dropped_tokens |= not bool(m["tokens"].all())
                kept_share.append(float(m["groups"].float().mean() * m["tokens"].float().mean()))
    assert dropped_heads or dropped_groups
    assert dropped_tokens or dropped_groups
    assert 0.05 < sum(kept_share) / len(kept_share) < 0.95


def test_the_bench_has_dydit_rows_alone_and_stacked():
    from cachekit.bench import harness
    from cachekit.bench.methods import dydit_methods
    methods = dydit_methods()
    names = ["DyDiT", "DyDiT", "DyDiT+FORA", "DyDiT+AdaptiveDiffusion"]
    assert [m.name for m in methods] == names
    assert methods[1].setting == "lambda=0.5 width_start=0.08" and "N=2" in methods[2].setting
    args = harness.parse_args(["--models", "dit", "--only", "DyDiT", "DyDiT+FORA", "DyDiT+AdaptiveDiffusion"])
    assert [m.name for m in args.methods] == names                     # scripts/bench_peers.py lists them
    rows = harness.bench_model("dit", methods, steps=5, images=2, cfg=3.0, rounds=1, passes=1, progress=False)
    assert [r["method"] for r in rows] == ["uncached"] + names
    assert all(r["status"] == "ok" and r["speedup"] > 0 and 0 < r["psnr_db"] for r in rows[1:])
    assert rows[2]["flops_executed"] > rows[1]["flops_executed"]      # the full-width first step ran more
    assert rows[3]["hit_rate"] > 0                     # FORA reused units on top of DyDiT


def test_the_panel_runs_the_bundled_dydit_alone_and_stacked():
    pytest.importorskip("gradio", reason="the panel needs gradio")
    from cachekit.panel import engine, report
    alone = engine.Request("dit", "FORA", interval=1, class_name="ring", steps=6, images=1, dydit=True)
    result = engine.run(alone, progress=False)
    t = result.telemetry
    assert t["hit_rate"] == 0 and 0 < t["dydit"]["block_flops_executed"] < 1
    assert 10 < result.psnr_db < float("inf")           # the DyDiT's own weights: close to dense, not equal
    summary = report.run_summary(alone, result)
    assert "on the bundled DyDiT" in summary and "**DyDiT** DyDiT on" in summary
    assert report.run_record(alone, result)["dydit"] is True and "_DyDiT_" in report.file_name(alone)
    stacked = engine.run(engine.Request("dit", "FORA", interval=2, steps=6, images=1, dydit=True), progress=False)
    assert stacked.telemetry["hit_rate"] > 0 and stacked.telemetry["dydit"]["block_flops_executed"] < 1
    skipping = engine.run(engine.Request("dit", "AdaptiveDiffusion", delta=0.5, steps=12, images=1, dydit=True),
                          progress=False)
    assert skipping.telemetry["skipped_steps"] and skipping.telemetry["dydit"]["block_flops_executed"] < 1
    # Full width for the first half of the steps, then the routers' widths.
    warm = engine.run(engine.Request("dit", "FORA", interval=1, steps=6, images=1, dydit=True, dydit_width_start=0.5),
                      progress=False)
    heads, groups = warm.telemetry["dydit"]["mean_heads"], warm.telemetry["dydit"]["mean_groups"]
    assert all(h == 6 for row in heads[:3] for h in row) and all(g == 12 for row in groups[:3] for g in row)
    assert any(g < 12 for row in groups[3:] for g in row)
    official = engine.Request("dit", "FORA", interval=1, steps=6, images=1, dydit=True, dydit_width_start=0.0)
    assert any(g < 12 for g in engine.run(official, progress=False).telemetry["dydit"]["mean_groups"][0])
    assert "full width for the first 50% of steps" in report.run_summary(
        engine.Request("dit", "FORA", dydit=True, dydit_width_start=0.5), warm)
    with pytest.raises(ValueError, match="dydit_width_start must be between 0 and 1"):
        engine.run(engine.Request("dit", "FORA", dydit=True, dydit_width_start=1.5))
    with pytest.raises(ValueError, match="DyDiT runs on the tiny DiT only"):
        engine.run(engine.Request("unet", "DeepCache", dydit=True))
    # The dense DiT is untouched afterwards: a plain FORA run is as before.
    plain = engine.run(engine.Request("dit", "FORA", interval=1, steps=6, images=1), progress=False)
    assert plain.psnr_db == float("inf")
