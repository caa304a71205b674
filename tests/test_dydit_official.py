"""Official DyDiT checkpoints: read safely, converted, and run exactly like the official model.

A tiny random DyDiT in the official key layout is saved as a train.py-style .pt
({"model", "ema", "opt", "args": argparse.Namespace}); the converted diffusers DiT plus its
router side-car, run through apply_dydit, must equal the independent official forward
(tests/dydit_reference.py) on the EMA weights.
"""
import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

import dydit_reference as ref
from cachekit import apply_dydit, dit_from_official, load_dydit, save_dydit
from cachekit.core.dydit import DyDiTFileError
from cachekit.core.dydit.official import load_official

HEADS = 4
TOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(tmp_path, **extra):
    ema = ref.random_official_state(heads=HEADS, token_bias=1.0, seed=0)
    model = ref.random_official_state(heads=HEADS, token_bias=1.0, seed=1)      # the non-EMA weights differ
    path = tmp_path / "dydit.pt"
    torch.save({"model": model, "ema": ema, "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "args": argparse.Namespace(model="DiT-XL/2", lr=1e-4), **extra}, path)
    return path, ema


def _io(t):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 8, 8, generator=g)
    return torch.cat([x, x]), torch.full((2,), float(t)), torch.tensor([7, 10])


def test_converted_checkpoint_with_routers_equals_the_official_masked_forward(tmp_path):
    path, ema = _checkpoint(tmp_path)
    model, routers = dit_from_official(path)
    handle = apply_dydit(model, routers, num_inference_steps=1)
    try:
        for t in (999, 500, 120, 3):
            x, times, y = _io(t)
            with torch.no_grad():
                expected, _ = ref.forward(ema, x, times, y, heads=HEADS)
                handle.finish_run()
                out = model(x, timestep=times, class_labels=y, return_dict=False)[0]
            assert (out - expected).abs().max() <= TOL
    finally:
        handle.remove()


def test_the_official_numerics_are_needed_and_set(tmp_path):
    """diffusers' DiT embeds timesteps with downscale_freq_shift=1 and normalises the MLP input
    with eps 1e-5; the converted model computes the official embedding and eps 1e-6."""
    path, ema = _checkpoint(tmp_path)
    model, _ = dit_from_official(path)
    x, times, y = _io(400)
    with torch.no_grad():
        expected, _ = ref.forward(ema, x, times, y, heads=HEADS, complete=True)
        official = model(x, timestep=times, class_labels=y, return_dict=False)[0]
        for block in model.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 1
            block.norm3.eps = 1e-5
        diffusers = model(x, timestep=times, class_labels=y, return_dict=False)[0]
    assert (official - expected).abs().max() <= TOL
    assert (diffusers - expected).abs().max() > 100 * TOL


def test_save_and_load_a_converted_folder_and_the_cli(tmp_path):
    path, ema = _checkpoint(tmp_path)
    spec = importlib.util.spec_from_file_location("convert_dydit", ROOT / "scripts" / "convert_dydit.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out_dir = script.main([str(path), str(tmp_path / "converted")])
    model, routers = load_dydit(out_dir)
    x, times, y = _io(250)
    with torch.no_grad():
        expected, _ = ref.forward(ema, x, times, y, heads=HEADS)
    handle = apply_dydit(model, routers, num_inference_steps=1)
    with torch.no_grad():
        out = model(x, timestep=times, class_labels=y, return_dict=False)[0]
    handle.remove()
    assert (out - expected).abs().max() <= TOL
    with pytest.raises(ValueError, match="not empty"):
        script.main([str(path), str(out_dir)])
    direct, direct_routers = dit_from_official(path)
    save_dydit(direct, direct_routers, tmp_path / "again")
    assert (tmp_path / "again" / "dydit_routers.safetensors").is_file()


class _NotAllowed:
    def __reduce__(self):
        return print, ("this must never run",)


def test_unsafe_or_wrong_files_are_refused_with_the_reason(tmp_path, capsys):
    state = ref.random_official_state(heads=HEADS)
    torch.save({"ema": state, "extra": _NotAllowed()}, tmp_path / "evil.pt")
    with pytest.raises(DyDiTFileError, match="asks to build print"):
        load_official(tmp_path / "evil.pt")
    assert "must never run" not in capsys.readouterr().out

    plain_dit = {k: v for k, v in state.items()
                 if not any(part in k for part in (".attn_rate.", ".mlp_rate.", ".token_selection."))}
    torch.save(plain_dit, tmp_path / "dit.pt")
    with pytest.raises(DyDiTFileError, match="without DyDiT routers"):
        load_official(tmp_path / "dit.pt")

    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(DyDiTFileError, match="not a DiT checkpoint"):
        load_official(tmp_path / "other.pt")

    torch.save({"ema": {**state, "blocks.1.mlp.fc1.weight": torch.zeros(100, 64)}}, tmp_path / "shape.pt")
    with pytest.raises(DyDiTFileError, match=r"blocks.1.mlp.fc1.weight has shape \(100, 64\), expected \(256, 64\)"):
        load_official(tmp_path / "shape.pt")

    torch.save({"ema": {**state, "blocks.0.extra.weight": torch.zeros(2)}}, tmp_path / "extra.pt")
    with pytest.raises(DyDiTFileError, match="unexpected tensors"):
        load_official(tmp_path / "extra.pt")

    (tmp_path / "cut.pt").write_bytes((tmp_path / "dit.pt").read_bytes()[:300])
    with pytest.raises(DyDiTFileError, match="damaged"):
        load_official(tmp_path / "cut.pt")
    with pytest.raises(DyDiTFileError, match="not found"):
        load_official(tmp_path / "absent.pt")


def test_the_cli_answers_a_wrong_file_with_one_error_line(tmp_path):
    import os
    import subprocess
    import sys
    (tmp_path / "notes.pt").write_text("a text file\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CACHEKIT_TRACEBACK", None)
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_dydit.py"), str(tmp_path / "notes.pt"),
                             str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0] == "error: notes.pt is a text file, not a DyDiT checkpoint."
