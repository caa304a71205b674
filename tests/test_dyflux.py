"""DyFLUX routers without ComfyUI: the official TokenSelect semantics, the side-car converter and
loader (no code from a file ever runs; every wrong file is named with its fix), the run record,
and the token-subset block parts (per-row query attention, split fused Linear).

The official module is re-stated here from alibaba-damo-academy/DyDiT,
DyFLUX/flux_models/dy_utils.py (`TokenSelect_baesd_on_x_t_text`, eval mode).
"""
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cachekit.core.clock import StepClock
from cachekit.core.dydit.dyflux import (FORMAT, THRESHOLD, DyFluxError, DyFluxRun, convert_official, load_routers,
                                        read_official, routers_from_state, save_routers)
from cachekit.core.dydit.token_blocks import attend_kept_queries, linear_kept_tail

WIDTH = 32


class OfficialTokenSelect(nn.Module):
    """The official router in eval mode (its gumbel path is training only)."""

    def __init__(self, dim):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear_t = nn.Linear(dim, dim * 4)
        self.norm = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=True)
        self.router = nn.Linear(dim, 1, bias=True)

    def forward(self, x, temb, text):
        shift, scale, shift_text, scale_text = self.linear_t(self.silu(temb)).chunk(4, dim=1)
        x = self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]
        text = self.norm(text) * (1 + scale_text)[:, None, :] + shift_text[:, None, :]
        text = text.mean(dim=1).unsqueeze(1)
        logits = self.router(x + text)
        y_soft = logits.sigmoid()
        y_hard = torch.zeros_like(logits).masked_fill(y_soft > 0.5, 1.0)
        return y_hard - y_soft.detach() + y_soft           # nonzero = selected


def _official_modules(double=2, single=3, width=WIDTH, seed=0):
    torch.manual_seed(seed)
    mods = {}
    for prefix, n in (("transformer_blocks", double), ("single_transformer_blocks", single)):
        for i in range(n):
            m = OfficialTokenSelect(width)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            mods[f"{prefix}.{i}.token_selection"] = m
    return mods


def _state(mods):
    return {f"{name}.{k}": v.detach().clone() for name, m in mods.items() for k, v in m.state_dict().items()}


def _checkpoint(tmp_path, mods, name="transformer_tiny.pt", **extra):
    """A DeepSpeed-style checkpoint: {"module": the whole transformer's state dict, ...}."""
    path = tmp_path / name
    module = {**_state(mods), "x_embedder.weight": torch.randn(4, 4),
              "transformer_blocks.0.ff.net.0.proj.weight": torch.randn(8, 4)}
    torch.save({"module": module, "step": 230000, **extra}, path)
    return path


def test_router_decisions_equal_the_official_module():
    mods = _official_modules()
    routers = routers_from_state(_state(mods))
    gen = torch.Generator().manual_seed(1)
    img, txt, temb = (torch.randn(3, 40, WIDTH, generator=gen), torch.randn(3, 7, WIDTH, generator=gen),
                      torch.randn(3, WIDTH, generator=gen))
    for kind, prefix in (("double", "transformer_blocks"), ("single", "single_transformer_blocks")):
        for i, router in enumerate(getattr(routers, kind)):
            official = mods[f"{prefix}.{i}.token_selection"].eval()
            with torch.no_grad():
                expected = official(img, temb, txt)[..., 0] != 0
            mod = router.modulation(temb)
            keep = router.keep(img, router.text_summary(txt, mod), mod)
            assert torch.equal(keep, expected), (kind, i)
            assert 0 < int(keep.sum()) < keep.numel()
            # rows decide alone: a row alone gets the same mask as in the batch
            mod1 = router.modulation(temb[1:2])
            assert torch.equal(router.keep(img[1:2], router.text_summary(txt[1:2], mod1), mod1), keep[1:2])


def test_convert_official_checkpoint_round_trip(tmp_path):
    mods = _official_modules()
    source = _checkpoint(tmp_path, mods)
    out = tmp_path / "dyflux.safetensors"
    routers = convert_official(source, out)
    assert (len(routers.double), len(routers.single), routers.hidden_size) == (2, 3, WIDTH)
    loaded = load_routers(out)
    assert loaded.threshold == THRESHOLD and loaded.source == source.name
    state = _state(mods)
    assert set(loaded.state_dict()) == set(state)            # only the routers, under the official names
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    from safetensors import safe_open
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT and meta["double_blocks"] == "2" and meta["single_blocks"] == "3"
    assert meta["hidden_size"] == str(WIDTH)


def test_a_plain_state_dict_and_module_prefixes_convert_too(tmp_path):
    mods = _official_modules(1, 1)
    torch.save({f"module.{k}": v for k, v in _state(mods).items()}, tmp_path / "plain.pt")
    routers = read_official(tmp_path / "plain.pt")
    assert (len(routers.double), len(routers.single)) == (1, 1)


def test_the_checkpoint_dtype_is_kept_and_the_routers_run_in_the_models_dtype(tmp_path):
    mods = _official_modules(1, 1)
    state = {k: v.to(torch.bfloat16) for k, v in _state(mods).items()}
    torch.save({"module": state}, tmp_path / "bf16.pt")
    convert_official(tmp_path / "bf16.pt", tmp_path / "bf16.safetensors")
    routers = load_routers(tmp_path / "bf16.safetensors")
    assert routers.double[0].linear_t_weight.dtype == torch.bfloat16
    router = routers.double[0]
    for dtype in (torch.float32, torch.bfloat16):              # cast to the hidden states' dtype
        x, txt, vec = torch.randn(2, 5, WIDTH, dtype=dtype), torch.randn(2, 3, WIDTH, dtype=dtype), torch.randn(2, WIDTH)
        mod = router.modulation(vec.to(dtype))
        assert mod[0].dtype == dtype and router.logits(x, router.text_summary(txt, mod), mod).dtype == dtype
    assert set(router._cast) == {(torch.device("cpu"), torch.float32), (torch.device("cpu"), torch.bfloat16)}
    routers.release()
    assert not routers.double[0]._cast


class _Payload:
    """A pickle that would run a shell command when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_with_code_are_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    mods = _official_modules(1, 1)
    path = _checkpoint(tmp_path, mods, "evil.pt", args=_Payload(marker))
    with pytest.raises(DyFluxError, match=r"refused: it asks to build (posix|os|nt)\.system.*never runs code"):
        read_official(path)
    assert not marker.exists(), "code from the file ran"


def test_wrong_checkpoints_say_what_they_are(tmp_path):
    # not a DyFLUX checkpoint at all
    torch.save({"module": {"x_embedder.weight": torch.zeros(2, 2)}}, tmp_path / "flux.pt")
    with pytest.raises(DyFluxError, match="no DyFLUX token routers.*not a DyFLUX checkpoint.*heisejiasuo/DyFLUX"):
        read_official(tmp_path / "flux.pt")
    # a DyDiT checkpoint: points to the diffusers API
    torch.save({"ema": {"blocks.0.token_selection.mlp_head.0.weight": torch.zeros(2, 2)}}, tmp_path / "dydit.pt")
    torch.save({"blocks.0.token_selection.mlp_head.0.weight": torch.zeros(2, 2)}, tmp_path / "dydit2.pt")
    for name in ("dydit.pt", "dydit2.pt"):
        with pytest.raises(DyFluxError, match="DyDiT.*no class-conditional DiT.*diffusers API"):
            read_official(tmp_path / name)
    # incomplete or misshapen
    state = _state(_official_modules(2, 2))
    del state["single_transformer_blocks.0.token_selection.norm.bias"]
    with pytest.raises(DyFluxError, match=r"single_transformer_blocks.0.token_selection lacks norm.bias"):
        routers_from_state(state)
    state = _state(_official_modules(3, 1))
    state = {k: v for k, v in state.items() if not k.startswith("transformer_blocks.1.")}
    with pytest.raises(DyFluxError, match=r"transformer_blocks routers \[1\] are missing"):
        routers_from_state(state)
    state = _state(_official_modules(1, 1))
    state["transformer_blocks.0.token_selection.linear_t.weight"] = torch.zeros(3 * WIDTH, WIDTH)
    with pytest.raises(DyFluxError, match=r"linear_t.weight has shape \(96, 32\).*expected \(128, 32\)"):
        routers_from_state(state)
    # damaged, empty, text, safetensors named .pt
    (tmp_path / "short.pt").write_bytes(_checkpoint(tmp_path, _official_modules(1, 1)).read_bytes()[:200])
    with pytest.raises(DyFluxError, match="not a readable PyTorch checkpoint"):
        read_official(tmp_path / "short.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(DyFluxError, match="empty"):
        read_official(tmp_path / "empty.pt")
    save_routers(routers_from_state(_state(_official_modules(1, 1))), tmp_path / "side.pt")
    with pytest.raises(DyFluxError, match="safetensors file.*already converted"):
        read_official(tmp_path / "side.pt")
    with pytest.raises(DyFluxError, match="not found"):
        read_official(tmp_path / "absent.pt")


def test_wrong_side_cars_say_what_they_are_and_the_fix(tmp_path):
    from safetensors.torch import save_file
    pt = _checkpoint(tmp_path, _official_modules(1, 1))
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes(pt.read_bytes())
    with pytest.raises(DyFluxError, match="PyTorch checkpoint, not a CacheKit DyFLUX side-car.*convert_dyflux.py"):
        load_routers(renamed)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "something"})
    with pytest.raises(DyFluxError, match="not a CacheKit DyFLUX side-car.*format='something'"):
        load_routers(tmp_path / "other.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "dydit.safetensors"), metadata={"format": "cachekit-dydit"})
    with pytest.raises(DyFluxError, match="DyDiT router side-car.*diffusers API"):
        load_routers(tmp_path / "dydit.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "l2c.safetensors"), metadata={"format": "cachekit-router"})
    with pytest.raises(DyFluxError, match="Learning-to-Cache.*Learned Router"):
        load_routers(tmp_path / "l2c.safetensors")
    good = tmp_path / "good.safetensors"
    routers = routers_from_state(_state(_official_modules(2, 1)))
    save_routers(routers, good)
    from safetensors import safe_open
    with safe_open(str(good), framework="pt") as f:
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(state, str(tmp_path / "lying.safetensors"), metadata={**meta, "double_blocks": "3"})
    with pytest.raises(DyFluxError, match="declares 3 double.*holds 2 double"):
        load_routers(tmp_path / "lying.safetensors")
    save_file(state, str(tmp_path / "v9.safetensors"), metadata={**meta, "version": "9"})
    with pytest.raises(DyFluxError, match="version '9'"):
        load_routers(tmp_path / "v9.safetensors")
    save_file(state, str(tmp_path / "t.safetensors"), metadata={**meta, "threshold": "1.5"})
    with pytest.raises(DyFluxError, match="threshold"):
        load_routers(tmp_path / "t.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01junkjunk" * 10)
    with pytest.raises(DyFluxError, match="not a readable safetensors"):
        load_routers(tmp_path / "junk.safetensors")


def test_model_mismatch_names_the_counts_and_the_fix():
    routers = routers_from_state(_state(_official_modules(8, 38, width=16)))
    routers.check_model(8, 38, 16)
    with pytest.raises(DyFluxError, match="8 double and 38 single.*has 19 double and 38 single.*flux.1-lite-8B"):
        routers.check_model(19, 38, 16)
    with pytest.raises(DyFluxError, match="width 16; this model has width 3072"):
        routers.check_model(8, 38, 3072)


def test_the_run_record_counts_kept_and_passed_tokens_per_step_and_block():
    run = DyFluxRun(StepClock([1.0, 0.5, 0.0]), 2, 1)
    keep = torch.tensor([[True, False, True], [False, False, True]])
    run.note_call(2)
    run.note_block(1.0, "double", 1, keep)
    run.note_block(0.5, "single", 0, keep)
    run.note_block(0.5, "single", 0, keep)           # a second call in the step (Heun, split CFG) adds up
    t = run.close()
    assert t.method == "DyFLUX" and t.unit_names == ["double_blocks.0", "double_blocks.1", "single_blocks.0"]
    assert t.computed == [[0, 3, 0], [0, 0, 6]] and t.reused == [[0, 3, 0], [0, 0, 6]]
    assert t.model_calls == 1 and t.hit_rate == 0.5 and t.wall_time_s is not None
    assert run.kept_share() == [[None, 0.5, None], [None, None, 0.5]]


# -- token-subset block parts --------------------------------------------------------------
def _sdpa(q, k, v):
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def test_attention_over_kept_queries_equals_full_attention_on_those_rows():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 10, 8, generator=gen) for _ in range(3))
    keep = torch.rand(3, 10, generator=gen) > 0.5
    keep[2] = False                                   # a row with no query: nothing runs for it
    keep[1] = True
    calls = []

    def attend(qq, kk, vv):
        calls.append((qq.shape[0], qq.shape[2], kk.shape[2]))
        return _sdpa(qq, kk, vv)
    out = attend_kept_queries(attend, q, k, v, keep)
    full = _sdpa(q, k, v)
    assert torch.allclose(out[keep], full[keep], atol=1e-6)
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))
    assert calls == [(1, int(keep[0].sum()), 10), (1, 10, 10)]          # per row, every key
    all_kept = torch.ones(3, 10, dtype=torch.bool)
    assert torch.equal(attend_kept_queries(_sdpa, q, k, v, all_kept), full)
    with pytest.raises(ValueError, match="bool of shape"):
        attend_kept_queries(_sdpa, q, k, v, all_kept[:, :5])


def test_split_linear_runs_the_tail_on_kept_tokens_only():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 8, generator=gen)
    w, b = torch.randn(12, 8, generator=gen), torch.randn(12, generator=gen)
    keep = torch.tensor([[True, False, True, True, False, False], [False] * 6])
    out = linear_kept_tail(x, w, b, 5, keep)
    full = F.linear(x, w, b)
    assert torch.allclose(out[..., :5], full[..., :5], atol=1e-6)
    assert torch.allclose(out[..., 5:][keep], full[..., 5:][keep], atol=1e-6)
    assert torch.equal(out[..., 5:][~keep], torch.zeros_like(out[..., 5:][~keep]))
    assert torch.equal(linear_kept_tail(x, w, b, 5, torch.ones(2, 6, dtype=torch.bool)), full)
    none = linear_kept_tail(x, w, None, 5, torch.zeros(2, 6, dtype=torch.bool))
    assert none.shape == full.shape and torch.equal(none[..., 5:], torch.zeros(2, 6, 7))
    assert math.isclose(float(none[0, 0, 0]), float(F.linear(x, w)[0, 0, 0]), rel_tol=1e-6)
