"""DyDiT routers: the official gate semantics, the side-car file and its validation."""
import pytest
import torch
from safetensors.torch import save_file

import dydit_reference as ref
from cachekit.core.dydit import DyDiTFileError, DyDiTRouters, RouterShape, load_routers, save_routers
from cachekit.core.dydit.routers import shape_from_state

SHAPE = RouterShape(depth=2, heads=4, mlp_groups=4, hidden=64, token_hidden=4)


def _routers():
    routers = DyDiTRouters(SHAPE)
    state = {k: v for k, v in ref.random_official_state(heads=4).items()
             if ".attn_rate." in k or ".mlp_rate." in k or ".token_selection." in k}
    routers.load_state_dict(state)
    return routers, state


def test_key_names_are_the_official_ones():
    routers, official = _routers()
    assert set(routers.state_dict()) == set(official)
    assert shape_from_state(official) == SHAPE
    assert SHAPE.token_hidden == SHAPE.hidden // 16          # TokenSelect: Linear(dim, dim // 16), ReLU, Linear(., 1)


def test_gates_follow_the_official_threshold_and_keep_group_0():
    routers = DyDiTRouters(SHAPE)
    with torch.no_grad():
        for b in routers.blocks:
            b.attn_rate.router.weight.zero_()
            b.mlp_rate.router.weight.zero_()
            # sigmoid(0) = 0.5 is not > 0.5; sigmoid(1e-9) rounds to 0.5 in fp32: off as well.
            b.attn_rate.router.bias.copy_(torch.tensor([0.0, 1e-9, 1e-3]))
            b.mlp_rate.router.bias.copy_(torch.tensor([-5.0, -5.0, -5.0]))
    heads, groups = routers.width_gates(torch.randn(3, SHAPE.hidden))
    assert heads.shape == (2, 3, 4) and groups.shape == (2, 3, 4)
    assert heads[0, 0].tolist() == [True, False, False, True]
    assert groups[0, 0].tolist() == [True, False, False, False]
    x = torch.randn(2, 5, SHAPE.hidden)
    keep = routers.token_keep(0, x)
    head = routers.blocks[0].token_selection.mlp_head
    assert torch.equal(keep, torch.sigmoid(head(x)).squeeze(-1) > 0.5)


def test_side_car_round_trip(tmp_path):
    routers, _ = _routers()
    routers.embedding = "diffusers"
    path = save_routers(routers, tmp_path / "r.safetensors", source="test")
    loaded = load_routers(path)
    assert loaded.shape == SHAPE and loaded.embedding == "diffusers" and loaded.threshold == 0.5
    assert all(torch.equal(a, b) for a, b in zip(routers.state_dict().values(), loaded.state_dict().values()))


def _write(path, state, metadata):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def test_side_car_errors_name_the_problem_and_the_fix(tmp_path):
    routers, state = _routers()
    good = save_routers(routers, tmp_path / "good.safetensors")
    from safetensors import safe_open
    with safe_open(str(good), "pt") as f:
        metadata = f.metadata()
    cases = [
        (_write(tmp_path / "other.safetensors", state, {"format": "something"}), "not a DyDiT router side-car"),
        (_write(tmp_path / "v9.safetensors", state, {**metadata, "version": "9"}), "version '9'"),
        (_write(tmp_path / "nodepth.safetensors", state, {k: v for k, v in metadata.items() if k != "depth"}),
         "incomplete or malformed"),
        (_write(tmp_path / "missing.safetensors", {k: v for k, v in state.items() if "blocks.1.mlp_rate" not in k},
                metadata), "missing blocks.1.mlp_rate.router.bias"),
        (_write(tmp_path / "shape.safetensors", {**state, "blocks.0.attn_rate.router.weight": torch.zeros(5, 64)},
                metadata), r"blocks.0.attn_rate.router.weight: expected \(3, 64\), found \(5, 64\)"),
    ]
    for path, message in cases:
        with pytest.raises(DyDiTFileError, match=message) as info:
            load_routers(path)
        assert "convert_dydit.py" in str(info.value) or "update CacheKit" in str(info.value)
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(DyDiTFileError, match="PyTorch checkpoint"):
        load_routers(tmp_path / "ckpt.pt")
    (tmp_path / "notes.safetensors").write_text("hello")
    with pytest.raises(DyDiTFileError, match="text file"):
        load_routers(tmp_path / "notes.safetensors")
    with pytest.raises(DyDiTFileError, match="not found"):
        load_routers(tmp_path / "absent.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:200])
    with pytest.raises(DyDiTFileError, match="damaged"):
        load_routers(tmp_path / "cut.safetensors")
