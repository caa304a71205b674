"""Every CLI in scripts/*.py answers a user's mistake with one line, `error: ...`, and exit code 2,
never a traceback, and before any heavy work (no training, no sampling: each case is quick).
Also the API check under the autotune CLI: a method that does not fit fails before sampling."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from cachekit.core.routers import Router, save_router

ROOT = Path(__file__).resolve().parents[1]
ROUTER = ROOT / "tinymodels" / "weights" / "dit_router_harmonica_25.safetensors"    # for 25 steps
TEXT = b"a text file, not a router\n"
JUNK_PICKLE = b"sq\x10 " + bytes(range(200))          # torch.load: IndexError (pop from empty list)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli")
    router = save_router(Router(torch.zeros(4, 6), "l2c", "dit", 3, ("attn", "mlp"), "ddim", [], 0.5, "test"),
                         folder / "small.safetensors")
    data = {"text.pt": TEXT, "text.safetensors": TEXT, "junk.pt": JUNK_PICKLE, "renamed.pt": router.read_bytes(),
            "run.ckpt.pt": TEXT}
    for name, content in data.items():
        (folder / name).write_bytes(content)
    (folder / "empty_dir").mkdir()
    return {name: folder / name for name in [*data, "small.safetensors", "empty_dir"]} | {"dir": folder}


def cases(f: dict[str, Path]) -> list[tuple[str, list[str], tuple[str, ...]]]:
    """(script, arguments, words the error line must contain)."""
    d = f["dir"]
    return [
        # convert_router
        ("convert_router", [str(d / "missing.pt"), str(d / "o.safetensors")], ("router file not found",)),
        ("convert_router", [str(f["text.pt"]), str(d / "o.safetensors")], ("text.pt", "text file")),
        ("convert_router", [str(f["junk.pt"]), str(d / "o.safetensors")], ("junk.pt", "not a readable")),
        ("convert_router", [str(f["renamed.pt"]), str(d / "o.safetensors")], ("safetensors file", "rename")),
        ("convert_router", [str(f["junk.pt"]), str(d / "o.txt")], ("must end in .safetensors",)),
        ("convert_router", [str(f["junk.pt"]), str(d / "o.safetensors"), "--threshold", "2"], ("--threshold",)),
        # autotune
        ("autotune", ["--model", "unet", "--method", "deepcache", "--target-psnr", "30", "--steps", "0"],
         ("--steps", "at least 1")),
        ("autotune", ["--model", "unet", "--method", "magic", "--target-psnr", "30"], ("--method", "invalid choice")),
        ("autotune", ["--model", "unet", "--method", "fora", "--target-psnr", "30"], ("FORA", "U-Net", "deepcache")),
        ("autotune", ["--model", "dit", "--method", "deepcache", "--target-psnr", "30"], ("DeepCache needs a U-Net",)),
        ("autotune", ["--model", "unet", "--method", "deepcache", "--target-psnr", "-5"], ("PSNR target",)),
        ("autotune", ["--pipeline", str(d / "missing"), "--method", "fora", "--target-psnr", "30"], ("no such folder",)),
        ("autotune", ["--pipeline", str(f["empty_dir"]), "--method", "fora", "--target-psnr", "30"],
         ("model_index.json",)),
        # train_router
        ("train_router", ["--steps", "0", "--out", str(d / "r.safetensors")], ("--steps", "at least 2")),
        ("train_router", ["--out", str(d / "r.txt")], ("must end in .safetensors",)),
        ("train_router", ["--threshold", "1.5", "--out", str(d / "r.safetensors")], ("--threshold",)),
        ("train_router", ["--pipeline", str(f["empty_dir"]), "--out", str(d / "r.safetensors")], ("model_index.json",)),
        ("train_router", ["--resume", "--quick", "--out", str(d / "run.safetensors")], ("Cannot resume from run.ckpt.pt",)),
        # bench_hotpath
        ("bench_hotpath", ["--steps", "0", "--no-write"], ("--steps", "at least 2")),
        ("bench_hotpath", ["--parts", "X", "--no-write"], ("--parts", "invalid choice")),
        ("bench_hotpath", ["--batches", "0", "--no-write"], ("--batches", "at least 1")),
        # benchmark
        ("benchmark", ["--methods", "Magic"], ("--methods", "invalid choice", "DeepCache")),
        ("benchmark", ["--steps", "0"], ("--steps", "at least 2")),
        ("benchmark", ["--steps", "3", "--interval", "3"], ("--steps (3) must be greater than --interval (3)",)),
        # merge_peers
        ("merge_peers", [str(d / "missing.json"), str(d / "missing.json"), "--out", str(d)], ("missing.json",)),
        ("merge_peers", [str(f["text.pt"]), str(f["text.pt"]), "--out", str(d)], ("text.pt", "not a benchmark")),
        # bench_peers
        ("bench_peers", ["--steps", "0"], ("--steps",)),
        ("bench_peers", ["--only", "Magic"], ("unknown method Magic", "FORA")),
        ("bench_peers", ["--only", "FORA", "--setting-contains", "branch="], ("no benchmark row matches", "FORA")),
        ("bench_peers", ["--router", str(f["text.safetensors"])], ("text.safetensors", "text file")),
        ("bench_peers", ["--router", f"{ROUTER}:2"], ("threshold must be between 0 and 1",)),
        ("bench_peers", ["--router", str(ROUTER), "--steps", "10"], ("trained for 25 sampling steps",)),
        # check_quality
        ("check_quality", ["--peers", str(d / "missing.json")], ("missing.json",)),
        ("check_quality", ["--peers", str(f["text.pt"])], ("text.pt", "not a peer benchmark")),
        ("check_quality", ["--images", "0"], ("--images", "at least 1")),
        ("check_quality", ["--batch", "0"], ("--batch", "at least 1")),
        ("check_quality", ["--extra", "Nope x=1"], ("--extra 'Nope x=1'", "no scored row")),
        # scan_forecast_corrections
        ("scan_forecast_corrections", ["--intervals", "1"], ("--intervals", "at least 2")),
        ("scan_forecast_corrections", ["--fewer-steps", "30"], ("--fewer-steps must be below 25",)),
        # scan_learned_forecast
        ("scan_learned_forecast", ["--intervals", "1"], ("--intervals", "at least 2")),
        ("scan_learned_forecast", ["--intervals", "30"], ("--intervals must be at most 21",)),
        ("scan_learned_forecast", ["--lr", "2"], ("--lr must be between 0 and 1",)),
        ("scan_learned_forecast", ["--model", "vae"], ("--model", "invalid choice")),
        # convert_dydit
        ("convert_dydit", [str(d / "missing.pt"), str(d / "o")], ("checkpoint not found",)),
        ("convert_dydit", [str(f["text.pt"]), str(d / "o")], ("text.pt", "text file")),
        ("convert_dydit", [str(f["junk.pt"]), str(d / "o")], ("junk.pt", "not a readable")),
        ("convert_dydit", [str(f["renamed.pt"]), str(d / "o")], ("safetensors file",)),
        # convert_dyflux
        ("convert_dyflux", [str(d / "missing.pt"), str(d / "o.safetensors")], ("missing.pt",)),
        ("convert_dyflux", [str(f["junk.pt"]), str(d / "o.txt")], ("must end in .safetensors",)),
        ("convert_dyflux", [str(f["text.pt"]), str(d / "o.safetensors")], ("text.pt",)),
        ("convert_dyflux", [str(f["renamed.pt"]), str(d / "o.safetensors")], ("renamed.pt",)),
        # evaluate_tiny
        ("evaluate_tiny", ["dit", "vae"], ("unknown model 'vae'",)),
        ("evaluate_tiny", ["--samples", "0"], ("--samples", "at least 1")),
        # train_tiny (never with valid arguments: it would write over the bundled weights)
        ("train_tiny", ["dit", "--minutes", "0"], ("--minutes", "> 0")),
        ("train_tiny", ["vae", "--minutes", "1"], ("invalid choice: 'vae'",)),
        ("train_tiny", ["unet", "--minutes", "1", "--teacher", "unet"], ("own teacher",)),
        # train_dydit (never with valid arguments: it would train and write weights)
        ("train_dydit", ["--lam", "0", "--iterations", "1", "--out", str(d)], ("--lam", "(0, 1]")),
        ("train_dydit", ["--lam", "0.5", "--out", str(d)], ("--minutes or --iterations",)),
        ("train_dydit", ["--iterations", "1", "--resume", "--out", str(d)], ("--resume", "no checkpoint")),
        ("train_dydit", ["--iterations", "1", "--out", str(f["text.pt"])], ("--out", "is a file")),
        # polish_dydit (never with valid arguments: it would train and write weights)
        ("polish_dydit", ["--out", str(d / "p")], ("--minutes or --iterations",)),
        ("polish_dydit", ["--iterations", "1", "--source", str(d), "--out", str(d)], ("--out must differ",)),
        ("polish_dydit", ["--iterations", "1", "--out", str(f["text.pt"])], ("--out", "is a file")),
        ("polish_dydit", ["--iterations", "1", "--source", str(d), "--out", str(d / "p")],
         ("dit_dydit_50.safetensors", "train_dydit.py")),
        # bench_dydit
        ("bench_dydit", ["--steps", "0"], ("--steps", "at least 2")),
        ("bench_dydit", ["--name", "dit_dydit_nope"], ("dit_dydit_nope", "train_dydit.py")),
        ("bench_dydit", ["--width-start", "1.5"], ("--width-start 1.5", "[0, 1)")),
        ("bench_dydit", ["--seed", "-1"], ("--seed", "at least 0")),
    ]


def _run(script: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CACHEKIT_TRACEBACK", None)
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_every_cli_answers_mistakes_with_one_error_line_and_exit_code_2(files):
    # Each case is a fresh interpreter (the point is what a shell user sees); two at a time.
    all_cases = cases(files)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: _run(case[0], case[1]), all_cases))
    failures = []
    for (script, args, words), result in zip(all_cases, results):
        lines = result.stderr.strip().splitlines()
        ok = (result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
              and all(word in lines[0] for word in words) and "Traceback" not in result.stderr)
        if not ok:
            failures.append(f"{script} {' '.join(args)}: rc {result.returncode}, stderr:\n{result.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
    scripts = {path.stem for path in (ROOT / "scripts").glob("*.py")} - {"pack", "demo", "panel", "make_workflows"}
    assert scripts <= {case[0] for case in all_cases}, "a CLI without error cases"


def test_a_genuine_bug_still_shows_its_traceback():
    from cachekit.bench.cli import run_cli

    def buggy(argv):
        raise KeyError("a bug")
    with pytest.raises(KeyError):
        run_cli(buggy, [])


def test_autotune_refuses_a_method_that_does_not_fit_before_sampling():
    import tiny_diffusers as td
    from cachekit import autotune_diffusers
    calls = []

    def run():
        calls.append(1)
        return torch.zeros(1)
    with pytest.raises(ValueError, match=r"FORA works on DiT.*U-Net \(UNet2DConditionModel\).*deepcache"):
        autotune_diffusers(td.unet(), run, method="fora", num_inference_steps=4)
    with pytest.raises(ValueError, match="DeepCache needs a U-Net"):
        autotune_diffusers(td.dit(), run, method="deepcache", num_inference_steps=4)
    with pytest.raises(ValueError, match="num_inference_steps"):          # no step source: also before sampling
        autotune_diffusers(td.dit(), run, method="fora")
    with pytest.raises(ValueError, match="PSNR target must be > 0"):
        autotune_diffusers(td.unet(), run, method="deepcache", target_kind="psnr", value=-1, num_inference_steps=4)
    assert calls == []
    model = td.unet()
    autotune_diffusers(model, run, method="deepcache", num_inference_steps=4, max_trials=1)
    assert not hasattr(model, "_cachekit_handle")                          # the fit check left nothing applied
