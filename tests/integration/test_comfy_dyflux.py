"""DyFLUX token routing in real ComfyUI, on a tiny Flux built from ComfyUI's own classes.

The reference is written here from the official semantics (alibaba-damo-academy/DyDiT,
DyFLUX/flux_models/): every block computes everything and the router's mask is applied
afterwards (double blocks: image FF output x mask; single blocks: unselected image tokens keep
their input). It replaces ComfyUI's blocks through test-only patches_replace entries, so
embedders and the final layer are ComfyUI's for both sides.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from .comfy_graph import Graph, tiny
from .comfy_models import CONTEXT_DIM, POOLED_DIM, TOKENS

STEPS = 6


# -- routers in the official layout ------------------------------------------------------------
def _official_state(double: int, single: int, width: int, seed: int = 0, bias: float = 0.0) -> dict:
    """Random token_selection tensors under the official diffusers key names."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, n in (("transformer_blocks", double), ("single_transformer_blocks", single)):
        for i in range(n):
            key = f"{prefix}.{i}.token_selection"
            state[f"{key}.linear_t.weight"] = torch.randn(4 * width, width, generator=gen) / math.sqrt(width)
            state[f"{key}.linear_t.bias"] = 0.1 * torch.randn(4 * width, generator=gen)
            state[f"{key}.norm.weight"] = 1 + 0.1 * torch.randn(width, generator=gen)
            state[f"{key}.norm.bias"] = 0.1 * torch.randn(width, generator=gen)
            state[f"{key}.router.weight"] = torch.randn(1, width, generator=gen) / math.sqrt(width)
            state[f"{key}.router.bias"] = torch.full((1,), float(bias))
    return state


def _flux_shape():
    dm = tiny("flux").patcher.get_model_object("diffusion_model")
    return len(dm.double_blocks), len(dm.single_blocks), dm.params.hidden_size


def _routers(comfy, tmp_path, name="dyflux_tiny.safetensors", **kw):
    """Official-style checkpoint (DeepSpeed "module" dict with other weights) -> side-car -> loaded."""
    dyflux = comfy.pack("core.dydit.dyflux")
    double, single, width = _flux_shape()
    state = _official_state(double, single, width, **kw)
    official = tmp_path / "transformer_tiny.pt"
    torch.save({"module": {**state, "x_embedder.weight": torch.zeros(3, 3)}, "step": 7}, official)
    dyflux.convert_official(official, tmp_path / name)
    return dyflux.load_routers(tmp_path / name), state


# -- the masked reference ------------------------------------------------------------------------
def _ref_keep(state, prefix, i, img, txt, vec, threshold=0.5):
    """Official TokenSelect (eval): bool [B, N]."""
    p = lambda part: state[f"{prefix}.{i}.token_selection.{part}"]       # noqa: E731
    shift, scale, shift_t, scale_t = F.linear(F.silu(vec), p("linear_t.weight"), p("linear_t.bias")).chunk(4, dim=1)
    norm = lambda x: F.layer_norm(x, (x.shape[-1],), p("norm.weight"), p("norm.bias"), 1e-5)  # noqa: E731
    x = norm(img) * (1 + scale)[:, None, :] + shift[:, None, :]
    t = (norm(txt) * (1 + scale_t)[:, None, :] + shift_t[:, None, :]).mean(dim=1).unsqueeze(1)
    return (torch.sigmoid(F.linear(x + t, p("router.weight"), p("router.bias"))) > threshold)[..., 0]


def _mod(modulation, vec):
    out = F.linear(F.silu(vec), modulation.lin.weight, modulation.lin.bias)[:, None, :]
    return out.chunk(modulation.multiplier, -1)


def _qkv(x, linear_w, linear_b, norm, heads):
    b, n, _ = x.shape
    q, k, v = F.linear(x, linear_w, linear_b).view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    rms = lambda t, s: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * s     # noqa: E731
    return rms(q, norm.query_norm.scale), rms(k, norm.key_norm.scale), v


def _attend(q, k, v, pe):
    def rope(t):
        t2 = t.reshape(*t.shape[:-1], -1, 1, 2)
        return (pe[..., 0] * t2[..., 0] + pe[..., 1] * t2[..., 1]).reshape(*t.shape)
    out = F.scaled_dot_product_attention(rope(q), rope(k), v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _mlp(seq, x):
    return F.linear(F.gelu(F.linear(x, seq[0].weight, seq[0].bias), approximate="tanh"), seq[2].weight, seq[2].bias)


def _ln(x):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def _ref_double(block, state, i, masks):
    def replace(args, extra):
        img, txt, vec, pe = args["img"], args["txt"], args["vec"], args["pe"]
        i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = _mod(block.img_mod, vec)
        t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = _mod(block.txt_mod, vec)
        heads = block.num_heads
        iq, ik, iv = _qkv(_ln(img) * (1 + i_sc1) + i_sh1, block.img_attn.qkv.weight, block.img_attn.qkv.bias,
                          block.img_attn.norm, heads)
        tq, tk, tv = _qkv(_ln(txt) * (1 + t_sc1) + t_sh1, block.txt_attn.qkv.weight, block.txt_attn.qkv.bias,
                          block.txt_attn.norm, heads)
        attn = _attend(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe)
        t_attn, i_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + i_g1 * F.linear(i_attn, block.img_attn.proj.weight, block.img_attn.proj.bias)
        txt = txt + t_g1 * F.linear(t_attn, block.txt_attn.proj.weight, block.txt_attn.proj.bias)
        keep = _ref_keep(state, "transformer_blocks", i, img, txt, vec)
        masks.append(("double", i, keep))
        ff = _mlp(block.img_mlp, _ln(img) * (1 + i_sc2) + i_sh2)               # every token, then masked
        img = img + i_g2 * (ff * keep[..., None].to(ff.dtype))
        txt = txt + t_g2 * _mlp(block.txt_mlp, _ln(txt) * (1 + t_sc2) + t_sh2)
        return {"img": img, "txt": txt}
    return replace


def _ref_single(block, state, i, masks, txt_len):
    def replace(args, extra):
        x, vec, pe = args["img"], args["vec"], args["pe"]
        shift, scale, gate = _mod(block.modulation, vec)
        c = block.hidden_size
        h = F.linear(_ln(x) * (1 + scale) + shift, block.linear1.weight, block.linear1.bias)
        qkv, mlp = h[..., :3 * c], h[..., 3 * c:]
        q, k, v = _qkv_split(qkv, block)
        attn = _attend(q, k, v, pe)
        out = x + gate * F.linear(torch.cat((attn, F.gelu(mlp, approximate="tanh")), 2), block.linear2.weight,
                                  block.linear2.bias)
        keep = _ref_keep(state, "single_transformer_blocks", i, x[:, txt_len:], x[:, :txt_len], vec)
        masks.append(("single", i, keep))
        keep_all = torch.cat([torch.ones_like(keep[:, :txt_len]), keep], 1)
        return {"img": torch.where(keep_all[..., None], out, x)}                 # unselected: unchanged
    return replace


def _qkv_split(qkv, block):
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
    rms = lambda t, s: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * s     # noqa: E731
    return rms(q, block.norm.query_norm.scale), rms(k, block.norm.key_norm.scale), v


def _reference(state, masks, txt_len=TOKENS):
    patcher = tiny("flux").patcher.clone()
    dm = patcher.get_model_object("diffusion_model")
    for i, block in enumerate(dm.double_blocks):
        patcher.set_model_patch_replace(_ref_double(block, state, i, masks), "dit", "double_block", i)
    for i, block in enumerate(dm.single_blocks):
        patcher.set_model_patch_replace(_ref_single(block, state, i, masks, txt_len), "dit", "single_block", i)
    return patcher


# -- direct model calls -----------------------------------------------------------------------
def _inputs(batch, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, 16, 8, 8, generator=gen), timesteps=torch.rand(batch, generator=gen),
                context=torch.randn(batch, TOKENS, CONTEXT_DIM, generator=gen),
                y=torch.randn(batch, POOLED_DIM, generator=gen), guidance=torch.full((batch,), 3.5))


@torch.no_grad()
def _call(patcher, inputs):
    """One call of the Flux diffusion model with this patcher's object patches and block patches."""
    import comfy.model_management
    comfy.model_management.load_models_gpu([patcher])
    dm = patcher.model.diffusion_model
    options = {**patcher.model_options.get("transformer_options", {})}
    return dm(inputs["x"], inputs["timesteps"], inputs["context"], y=inputs["y"], guidance=inputs["guidance"],
              transformer_options=options)


def _dyflux(comfy, routers, threshold=0.0):
    return comfy.pack("nodes.dyflux_node").apply_dyflux(tiny("flux").patcher, routers, threshold)


@pytest.fixture
def router_dir(comfy, tmp_path, monkeypatch):
    import folder_paths
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "cachekit_routers",
                        ([str(tmp_path)], {".safetensors", ".pt", ".pth"}))
    return tmp_path


def test_patched_flux_equals_the_masked_reference_and_rows_keep_different_tokens(comfy, tmp_path):
    routers, state = _routers(comfy, tmp_path)
    inputs = _inputs(3)
    masks = []
    reference = _call(_reference(state, masks), inputs)
    patched = _call(_dyflux(comfy, routers), inputs)
    assert torch.allclose(patched, reference, atol=1e-5, rtol=0), (patched - reference).abs().max()
    unpatched = _call(tiny("flux").patcher, inputs)
    assert (patched - unpatched).abs().max() > 1e-3            # routing changed something
    counts = {(kind, i): keep.sum(1).tolist() for kind, i, keep in masks}
    # both kinds of block skip some tokens and keep some, and rows keep different numbers of tokens
    for kind in ("double", "single"):
        kept = [n for (k, _), row in counts.items() if k == kind for n in row]
        assert 0 < sum(kept) < len(kept) * 16, (kind, counts)
    assert any(len(set(row)) > 1 for row in counts.values()), counts


def test_skipped_tokens_are_not_computed(comfy, tmp_path, monkeypatch):
    """Double blocks: the image FF sees only the kept image tokens. Single blocks: linear1's MLP
    part, linear2 and the attention queries see only text and kept image tokens; qkv, keys and
    values every token."""
    routers, state = _routers(comfy, tmp_path)
    inputs = _inputs(2)
    masks = []
    _call(_reference(state, masks), inputs)
    kept = {(kind, i): int(keep.sum()) for kind, i, keep in masks}
    patched = _dyflux(comfy, routers)
    dm = patched.get_model_object("diffusion_model")
    c = dm.params.hidden_size
    weights = {}
    for i, block in enumerate(dm.double_blocks):
        weights[(block.img_mlp[0].weight.data_ptr(), 4 * c)] = ("double", i, "ff")
    for i, block in enumerate(dm.single_blocks):
        w = block.linear1.weight
        weights[(w.data_ptr(), 7 * c)] = ("single", i, "linear1")                 # unsplit (all tokens)
        weights[(w[:3 * c].data_ptr(), 3 * c)] = ("single", i, "qkv")
        weights[(w[3 * c:].data_ptr(), 4 * c)] = ("single", i, "mlp_in")
        weights[(block.linear2.weight.data_ptr(), c)] = ("single", i, "linear2")
    rows: dict = {}
    linear = F.linear

    def counted(x, weight, bias=None):
        name = weights.get((weight.data_ptr(), weight.shape[0]))
        if name is not None:
            rows[name] = rows.get(name, 0) + x.shape[:-1].numel()
        return linear(x, weight, bias)
    monkeypatch.setattr(torch.nn.functional, "linear", counted)
    queries = []

    def user_override(func, q, k, v, *args, **kwargs):     # another tool's override: DyFLUX chains it
        queries.append((q.shape[0] * q.shape[2], k.shape[2]))
        return func(q, k, v, *args, **kwargs)
    patched.model_options["transformer_options"]["optimized_attention_override"] = user_override
    _call(patched, inputs)
    monkeypatch.undo()
    every, text = 2 * (TOKENS + 16), 2 * TOKENS
    for (kind, i), n in kept.items():
        if kind == "double":
            assert rows[("double", i, "ff")] == n, (i, rows, kept)
        elif n == 2 * 16:                                  # all kept: the plain block
            assert rows[("single", i, "linear1")] == every and rows[("single", i, "linear2")] == every
        else:
            assert rows[("single", i, "qkv")] == every and ("single", i, "linear1") not in rows, rows
            assert rows[("single", i, "mlp_in")] == n + text and rows[("single", i, "linear2")] == n + text, rows
    # double blocks: every query; single blocks: text and kept image queries, always against every key
    n_double = len(dm.double_blocks)
    assert queries[:n_double] == [(every, TOKENS + 16)] * n_double
    assert all(k == TOKENS + 16 for _, k in queries[n_double:])
    single_kept = sum(n for (kind, _), n in kept.items() if kind == "single")
    assert sum(q for q, _ in queries[n_double:]) == single_kept + text * len(dm.single_blocks), (queries, kept)


def test_every_token_kept_equals_the_unpatched_model_exactly(comfy, tmp_path, router_dir):
    routers, _ = _routers(comfy, tmp_path, bias=60.0)
    inputs = _inputs(2)
    assert torch.equal(_call(_dyflux(comfy, routers), inputs), _call(tiny("flux").patcher, inputs))
    # and through a real graph: loader -> DyFLUX node -> KSampler with CFG
    routers_file = "dyflux_all.safetensors"
    comfy.pack("core.dydit.dyflux").save_routers(routers, router_dir / routers_file)
    plain = _sample(comfy, "dyflux-plain")
    routed = _sample(comfy, "dyflux-all", routers_file)
    assert torch.equal(plain, routed)
    run = comfy.pack("nodes.history").last()
    assert run.method == "DyFLUX" and run.hit_rate == 0.0
    assert all(c == 2 * 16 for row in run.computed for c in row)           # cond + uncond rows, 16 image tokens


def _sample(comfy, key, router_name=None, threshold=0.0, cfg=2.5):
    g = Graph("flux")
    if router_name is not None:
        g.patch("CacheKitDyFLUX", router_name=router_name, threshold=threshold)
    g.sample(key, steps=STEPS, cfg=cfg)
    comfy.run(g.prompt, comfy.fresh_executor())
    from .comfy_graph import RESULTS
    return RESULTS[key]


def test_sampling_with_cfg_matches_the_reference_joint_and_split(comfy, tmp_path, router_dir, monkeypatch):
    routers, state = _routers(comfy, tmp_path)
    comfy.pack("core.dydit.dyflux").save_routers(routers, router_dir / "dyflux_tiny.safetensors")
    joint = _sample(comfy, "dyflux-joint", "dyflux_tiny.safetensors")
    joint_run = comfy.pack("nodes.history").last()
    assert joint_run.model_calls == STEPS and joint_run.num_steps == STEPS
    assert 0 < joint_run.hit_rate < 1
    for row_c, row_r in zip(joint_run.computed, joint_run.reused):
        assert [c + r for c, r in zip(row_c, row_r)] == [2 * 16] * len(row_c)   # every image token of both rows

    import nodes
    t = tiny("flux")
    masks = []
    reference = nodes.common_ksampler(_reference(state, masks), 7, STEPS, 2.5, "euler", "normal", t.positive,
                                      t.negative, t.latent, denoise=1.0)[0]["samples"]
    # six sampler steps on latents of magnitude ~10: 1e-5 relative (one model call is held to 1e-5 absolute above)
    assert torch.allclose(joint, reference, atol=1e-5, rtol=1e-5), (joint - reference).abs().max()
    # the reference's masks per step and block are the run's record
    kept = [int(m.sum()) for _, _, m in masks]
    blocks = len(joint_run.unit_names)
    assert [kept[s * blocks:(s + 1) * blocks] for s in range(STEPS)] == joint_run.computed

    import comfy.model_management as mm
    monkeypatch.setattr(mm, "get_free_memory",      # no room for a joint batch: one call per cond
                        lambda dev=None, torch_free_too=False: (0, 0) if torch_free_too else 0)
    split = _sample(comfy, "dyflux-split", "dyflux_tiny.safetensors")
    split_run = comfy.pack("nodes.history").last()
    assert split_run.model_calls == 2 * STEPS
    assert split_run.computed == joint_run.computed
    assert torch.allclose(split, joint, atol=1e-5, rtol=1e-5), (split - joint).abs().max()


def test_threshold_input_overrides_the_routers_own(comfy, tmp_path, router_dir):
    routers, _ = _routers(comfy, tmp_path)
    comfy.pack("core.dydit.dyflux").save_routers(routers, router_dir / "dyflux_tiny.safetensors")
    _sample(comfy, "dyflux-t05", "dyflux_tiny.safetensors", threshold=0.0)
    default = comfy.pack("nodes.history").last().hit_rate
    _sample(comfy, "dyflux-t09", "dyflux_tiny.safetensors", threshold=0.9)
    assert comfy.pack("nodes.history").last().hit_rate > default


def test_clear_errors(comfy, tmp_path, router_dir):
    dyflux = comfy.pack("core.dydit.dyflux")
    node = comfy.pack("nodes.dyflux_node")
    double, single, width = _flux_shape()
    # a router for another FLUX: block counts, then width
    other = dyflux.routers_from_state(_official_state(double + 1, single, width))
    with pytest.raises(dyflux.DyFluxError, match=rf"{double + 1} double and {single} single.*this FLUX model has "
                                                 rf"{double} double and {single} single.*flux.1-lite-8B"):
        node.apply_dyflux(tiny("flux").patcher, other)
    narrow = dyflux.routers_from_state(_official_state(double, single, width // 2))
    with pytest.raises(dyflux.DyFluxError, match=rf"width {width // 2}; this FLUX model has width {width}"):
        node.apply_dyflux(tiny("flux").patcher, narrow)
    routers = dyflux.routers_from_state(_official_state(double, single, width))
    # not a Flux model
    with pytest.raises(dyflux.DyFluxError, match="this model is UNetModel.*diffusers API"):
        node.apply_dyflux(tiny("sd15").patcher, routers)
    # blocks already patched by a cache (DyFLUX must come first)
    fora = comfy.pack("nodes.method_nodes").apply_method("fora", tiny("flux").patcher,
                                                         {"interval": 2, "start_percent": 0.0, "end_percent": 1.0})
    with pytest.raises(dyflux.DyFluxError, match="already patched.*first"):
        node.apply_dyflux(fora, routers)
    with pytest.raises(dyflux.DyFluxError, match="threshold"):
        node.apply_dyflux(tiny("flux").patcher, routers, float("nan"))
    # through the graph: a missing file, and an official .pt in the folder instead of its side-car
    torch.save({"module": _official_state(double, single, width)}, router_dir / "transformer_1.pt")
    (router_dir / "transformer_1.safetensors").write_bytes((router_dir / "transformer_1.pt").read_bytes())
    with pytest.raises(AssertionError, match="PyTorch checkpoint, not a CacheKit DyFLUX side-car.*convert_dyflux"):
        _sample(comfy, "dyflux-bad", "transformer_1.safetensors")
    with pytest.raises(dyflux.DyFluxError, match="not in models/cachekit_routers"):
        node.load_router_file("missing.safetensors")
    # an L2C router is not a DyFLUX router
    routers_mod = comfy.pack("core.routers")
    l2c = routers_mod.Router(torch.zeros(4, 2 * 2), "l2c", "dit", 2)
    routers_mod.save_router(l2c, router_dir / "l2c.safetensors")
    with pytest.raises(dyflux.DyFluxError, match="Learning-to-Cache.*Learned Router"):
        node.load_router_file("l2c.safetensors")


def test_the_node_and_its_copies(comfy, tmp_path):
    """A patched model's swapped modules keep the original's weight names; copies are plain modules."""
    import copy
    routers, _ = _routers(comfy, tmp_path)
    patched = _dyflux(comfy, routers)
    view = patched.object_patches["diffusion_model.double_blocks.0.img_mlp"]
    original = tiny("flux").patcher.get_model_object("diffusion_model.double_blocks.0.img_mlp")
    assert isinstance(view, type(original)) and view[0] is original[0]
    assert [n for n, _ in view.named_parameters()] == [n for n, _ in original.named_parameters()]
    clone = copy.deepcopy(view)
    assert type(clone) is type(original) and torch.equal(clone[0].weight, original[0].weight)
    assert clone[0] is not original[0]


def test_a_cache_applied_after_dyflux_reuses_whole_routed_blocks(comfy, tmp_path, router_dir):
    """FORA after DyFLUX: FORA's block patch chains DyFLUX's, so computed blocks are routed and
    reused blocks run nothing (DyFLUX records no tokens for them)."""
    routers, _ = _routers(comfy, tmp_path)
    dyflux_model = _dyflux(comfy, routers)
    apply_method = comfy.pack("nodes.method_nodes").apply_method
    stacked = apply_method("fora", dyflux_model, {"interval": 3, "start_percent": 0.0, "end_percent": 1.0})
    import nodes
    t = tiny("flux")
    out = nodes.common_ksampler(stacked, 7, STEPS, 2.5, "euler", "normal", t.positive, t.negative, t.latent,
                                denoise=1.0)[0]["samples"]
    history = comfy.pack("nodes.history")
    runs = {r["telemetry"].method: r["telemetry"] for r in history.recent()[-2:]}
    fora, routed = runs["FORA"], runs["DyFLUX"]
    assert torch.isfinite(out).all()
    for step in range(STEPS):
        reused_by_fora = [r > 0 for r in fora.reused[step]]
        ran = [c + r > 0 for c, r in zip(routed.computed[step], routed.reused[step])]
        assert ran == [not r for r in reused_by_fora], (step, fora.reused, routed.computed)
    assert any(any(row) for row in fora.reused) and 0 < routed.hit_rate < 1
