"""`pip install .` gives a working `cachekit` package: built as a wheel, installed into a fresh
virtualenv, and used from outside the checkout (every method on the bundled tiny models, whose
weights must ship as package data). ComfyUI-Manager's install.py must not be in the package."""
from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

USE_EVERY_METHOD = textwrap.dedent("""
    import json, sys, torch
    import cachekit
    from cachekit.core.routers import Router, save_router
    from cachekit.tinymodels.bundled import load
    from cachekit.tinymodels.sampling import make_scheduler, sample

    labels, steps = torch.tensor([1]), 6
    done = {"file": cachekit.__file__}

    def run(kind, apply):
        denoiser = load(kind)
        scheduler = make_scheduler(steps)
        handle = apply(denoiser.network, scheduler)
        out = sample(denoiser, labels, steps=steps, scheduler=scheduler)
        run = handle.finish_run() if hasattr(handle, "finish_run") else handle.telemetry
        handle.remove()
        assert torch.isfinite(out).all()
        return run.hit_rate

    done["deepcache"] = run("unet", lambda m, s: cachekit.apply_deepcache(m, cache_interval=3, scheduler=s))
    done["fora"] = run("dit", lambda m, s: cachekit.apply_fora(m, interval=2, scheduler=s))
    done["adaptive"] = run("dit", lambda m, s: cachekit.apply_adaptive_skip(m, delta=1.0, max_skip_steps=2,
                                                                           scheduler=s))
    depth = len(load("dit").network.transformer_blocks)
    logits = torch.full((steps, 2 * depth), -3.0)
    logits[0] = 3.0
    save_router(Router(logits, "harmonica", "dit", depth, ("attn", "mlp"), "DDIMScheduler", [], 0.5, "test"),
                "router.safetensors")
    done["router"] = run("dit", lambda m, s: cachekit.apply_router(m, "router.safetensors", scheduler=s))
    try:
        import cachekit.install  # noqa: F401
        done["install_module"] = True
    except ModuleNotFoundError:
        done["install_module"] = False
    print(json.dumps(done))
""")


def _run(args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{args[:4]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_wheel_installs_into_a_fresh_venv_and_every_method_works_outside_the_checkout(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools in this Python")
    # The tracked and new (not ignored) files, as a clean clone would have them.
    listed = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT).stdout.split("\0")
    source = tmp_path / "src"
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
          str(source)])
    wheel = next((tmp_path / "dist").glob("cachekit-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    # torch, diffusers and safetensors come from this interpreter (the venv's own site-packages wins).
    venv_site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    ours = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (venv_site / "zz_host_packages.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)])
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = _run([str(python), "-c", USE_EVERY_METHOD], cwd=work, env=env).stdout
    done = json.loads(out.strip().splitlines()[-1])
    assert Path(done["file"]).is_relative_to(venv_site / "cachekit"), done["file"]
    assert done["install_module"] is False
    for method in ("deepcache", "fora", "adaptive", "router"):
        assert done[method] > 0, (method, done)


def test_registry_metadata_is_complete():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "comfyui" not in project["project"]["name"].lower()          # the registry's advice
    assert project["project"]["license"] == {"file": "LICENSE"} and "MIT License" in (ROOT / "LICENSE").read_text()
    comfy = project["tool"]["comfy"]
    assert comfy["Icon"].endswith("/icon.png") and (ROOT / "icon.png").stat().st_size < 50_000
    assert comfy["requires-comfyui"].startswith(">=")
    assert "<this repository>" not in (ROOT / "README.md").read_text()
