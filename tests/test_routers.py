"""Learned routers: official L2C decisions on a DiT-XL/2-shaped diffusers model, our format, and
refusal of malformed, truncated, mismatched and code-carrying files (no code ever runs).

tests/data/l2c_official_decisions.json holds, per official DiT-XL/2 router and threshold,
which attention / MLP outputs the official code (horseee/learning-to-cache,
DiT/models/dynamic_models.py with its load_ranking) reuses at each DDIM step; it was recorded
by running that code. The official router files are read from ../shared/fixtures/l2c/.
"""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel
from diffusers.models.attention import FeedForward

from cachekit import apply_router
from cachekit.core.routers import Router, RouterError, load_official, load_router, save_router

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "l2c"
DATA = Path(__file__).parent / "data"
needs_fixtures = pytest.mark.skipif(not (FIXTURES / "DiT-XL-2_DDIM20_router.pt").exists(),
                                    reason="official L2C routers not found in ../shared/fixtures/l2c/")


def _dit_xl2_shaped():
    # DiT-XL/2's depth (28 blocks, attention + MLP each) and patch size; a narrow width keeps the
    # test fast and does not change any decision.
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=28,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


@needs_fixtures
@pytest.mark.parametrize("case", json.loads((DATA / "l2c_official_decisions.json").read_text())["cases"],
                         ids=lambda c: f"{c['router']}-thres{c['threshold']}")
def test_official_dit_routers_take_the_official_decisions(case, monkeypatch):
    model = _dit_xl2_shaped()
    calls = {"ff": 0}
    original = FeedForward.forward

    def counted(self, *a, **k):
        calls["ff"] += 1
        return original(self, *a, **k)
    monkeypatch.setattr(FeedForward, "forward", counted)
    steps = case["num_steps"]
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    handle = apply_router(model, FIXTURES / case["router"], threshold=case["threshold"], scheduler=scheduler)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(x, timestep=t.expand(2), class_labels=torch.tensor([1, 2]), return_dict=False)[0]
            x = scheduler.step(out[:, :4], t, x).prev_sample
    run = handle.finish_run()
    reused = [[r > 0 for r in row] for row in run.reused]
    assert reused == case["reused"]
    mlp_reused = sum(flag for row in case["reused"] for flag in row[1::2])
    assert calls["ff"] == steps * 28 - mlp_reused            # MLPs really skipped, counted independently
    assert sum(map(sum, case["reused"])) > 0
    handle.remove()


@needs_fixtures
def test_official_files_convert_to_our_format_and_back(tmp_path):
    for name in ("DiT-XL-2_DDIM20_router.pt", "DiT-XL-2_DDIM50_router.pt", "U-ViT-H-2_DPM20_router.pth"):
        router = load_official(FIXTURES / name)
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_router.py"), str(FIXTURES / name),
                                 str(tmp_path / f"{name}.safetensors")], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        again = load_router(tmp_path / f"{name}.safetensors")
        assert torch.equal(again.logits, router.logits)
        assert (again.method, again.family, again.depth, again.layout, again.timesteps, again.threshold) == \
               (router.method, router.family, router.depth, router.layout, router.timesteps, router.threshold)
    dit = load_official(FIXTURES / "DiT-XL-2_DDIM20_router.pt")
    assert dit.num_steps == 20 and dit.num_units == 56 and dit.timesteps[0] == 999 and dit.timesteps[-1] == 0


def _tiny_dit():
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=3,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def _router(depth=3, steps=6, method="harmonica", layout=("attn", "mlp")):
    logits = torch.randn(steps, depth * len(layout), generator=torch.Generator().manual_seed(0))
    return Router(logits, method, "dit", depth, layout, "ddim", [], 0.5, "test")


def test_harmonica_routes_every_step_after_the_first_and_l2c_every_other():
    from cachekit.core.methods.router import routed_steps
    assert routed_steps("harmonica", 5) == [False, True, True, True, True]
    assert routed_steps("l2c", 6) == [False, True, False, True, False, True]      # router index T-1-k even
    model = _tiny_dit()
    router = _router()
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(6)
    handle = apply_router(model, router, scheduler=scheduler)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        for t in scheduler.timesteps:
            model(x, timestep=t.expand(1), class_labels=torch.tensor([1]), return_dict=False)
    run = handle.finish_run()
    expected = (~router.recompute()).tolist()
    assert [[r > 0 for r in row] for row in run.reused] == [[False] * 6] + expected[1:]
    handle.remove()


def test_mismatched_routers_are_refused_with_what_does_not_fit(tmp_path):
    with pytest.raises(RouterError, match="trained for 28 blocks .* this model has 6 sub-layers"):
        apply_router(_tiny_dit(), _router(depth=28), num_inference_steps=6)
    with pytest.raises(RouterError, match="layout|sub-layers"):
        apply_router(_tiny_dit(), _router(layout=("attn", "cross_attn", "mlp")), num_inference_steps=6)
    with pytest.raises(RouterError, match="trained for 6 sampling steps, but the sampler runs 10"):
        apply_router(_tiny_dit(), _router(steps=6), num_inference_steps=10)
    model = _tiny_dit()
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    handle = apply_router(model, _router(steps=6), scheduler=scheduler)
    with pytest.raises(RouterError, match="Set steps to 6"):
        model(torch.randn(1, 4, 8, 8), timestep=scheduler.timesteps[0].expand(1), class_labels=torch.tensor([1]))
    handle.remove()
    uvit = Router(torch.zeros(20, 58), "l2c", "uvit", 29, ("attn", "mlp"), "dpm_solver", [], 0.5, "x")
    with pytest.raises(RouterError, match="U-ViT"):
        apply_router(_tiny_dit(), uvit, num_inference_steps=20)


def test_malformed_and_truncated_files_are_refused(tmp_path):
    good = save_router(_router(), tmp_path / "good.safetensors")
    assert torch.equal(load_router(good).logits, _router().logits)
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(256))
    with pytest.raises(RouterError, match="not a readable safetensors router"):
        load_router(tmp_path / "truncated.safetensors")
    with pytest.raises(RouterError, match="not a readable safetensors router"):
        load_router(tmp_path / "garbage.safetensors")
    from safetensors.torch import save_file
    save_file({"logits": torch.zeros(2, 6)}, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(RouterError, match="not a CacheKit router"):
        load_router(tmp_path / "nometa.safetensors")
    meta = _router().metadata()
    save_file({"logits": torch.zeros(3, 6)}, str(tmp_path / "steps.safetensors"), metadata=meta)
    with pytest.raises(RouterError, match="metadata says 6 steps"):
        load_router(tmp_path / "steps.safetensors")
    save_file({"logits": torch.full((6, 6), float("nan"))}, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(RouterError, match="NaN"):
        load_router(tmp_path / "nan.safetensors")
    torch.save({"routers": {"0.prob": torch.zeros(5)}}, tmp_path / "odd.pt")
    with pytest.raises(RouterError, match="odd lengths"):
        load_official(tmp_path / "odd.pt")
    (tmp_path / "short.pt").write_bytes((FIXTURES / "DiT-XL-2_DDIM20_router.pt").read_bytes()[:3000]
                                        if (FIXTURES / "DiT-XL-2_DDIM20_router.pt").exists() else b"PK\x03\x04junk")
    with pytest.raises(RouterError):
        load_official(tmp_path / "short.pt")


class _Payload:
    """A pickle that would run a shell command when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickles_with_code_are_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"routers": {"0.prob": torch.zeros(4)}, "args": _Payload(marker)}, tmp_path / "evil.pt")
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"0.prob": _Payload(marker)}, f)
    for name in ("evil.pt", "evil.pth"):
        with pytest.raises(RouterError, match="refused|not a readable"):
            load_official(tmp_path / name)
    # the zip format names the refused class (torch words it "unsupported GLOBAL ..." here)
    with pytest.raises(RouterError, match=r"evil\.pt was refused: it asks to build (posix|os|nt)\.system"):
        load_official(tmp_path / "evil.pt")
        with pytest.raises(RouterError):
            apply_router(_tiny_dit(), tmp_path / name, num_inference_steps=1)
    assert not marker.exists(), "code from the file ran"


def _train_tiny(method, tmp_path, iterations=4, resume=False):
    from cachekit.core.routers.train import TrainConfig
    from cachekit.diffusers_host.train import train_router
    model = _tiny_dit()
    scheduler = DDIMScheduler()

    def make_batch(g, batch):
        return torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)

    def call(m, x, t, labels):
        return m(x, timestep=t.expand(x.shape[0]), class_labels=labels, return_dict=False)[0][:, :4]
    config = TrainConfig(method, num_steps=6, iterations=iterations, batch=2, lr=0.05, l1=1e-3, lambda_every=2)
    losses = []
    router = train_router(model, scheduler, make_batch, call, config, checkpoint=tmp_path / f"{method}.ckpt.pt",
                          resume=resume, progress=lambda i, n, loss: losses.append(loss))
    return model, router, losses


@pytest.mark.parametrize("method", ["harmonica", "l2c"])
def test_router_training_produces_a_router_that_applies(method, tmp_path):
    model, router, losses = _train_tiny(method, tmp_path)
    assert len(losses) == 4 and all(l == l and l > 0 for l in losses)       # finite, positive
    assert router.method == method and router.num_steps == 6 and router.num_units == 6
    assert router.layout == ("attn", "mlp") and router.depth == 3
    initial = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(router.logits, initial)                         # it learned something
    assert float(router.logits.abs().max()) <= 5.0
    saved = load_router(save_router(router, tmp_path / "r.safetensors"))
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(6)
    handle = apply_router(model, saved, scheduler=scheduler)
    with torch.no_grad():
        for t in scheduler.timesteps:
            model(torch.randn(1, 4, 8, 8), timestep=t.expand(1), class_labels=torch.tensor([1]))
    assert handle.finish_run().model_calls == 6
    handle.remove()
    assert not any(m._forward_hooks for m in model.modules())                # training hooks are gone


def test_router_training_resumes_from_its_checkpoint(tmp_path):
    _train_tiny("l2c", tmp_path, iterations=2)
    _, router, losses = _train_tiny("l2c", tmp_path, iterations=4, resume=True)
    assert len(losses) == 2                                                  # iterations 3 and 4 only
    assert "4 iterations" in router.source


def test_router_training_on_two_gloo_processes_keeps_one_router(tmp_path):
    """torchrun with 2 CPU processes: gradients are averaged, so both ranks end with the same logits."""
    script = tmp_path / "train_two.py"
    script.write_text(f'''
import os, sys
sys.path.insert(0, {str(ROOT / "scripts")!r})
from pack import load_pack
load_pack()
import torch, torch.distributed as dist
from diffusers import DDIMScheduler, DiTTransformer2DModel
from cachekit.core.routers.train import TrainConfig
from cachekit.diffusers_host.train import train_router
dist.init_process_group("gloo")
torch.manual_seed(0)
model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                              sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
make_batch = lambda g, b: (torch.randn(b, 4, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g))
call = lambda m, x, t, y: m(x, timestep=t.expand(x.shape[0]), class_labels=y, return_dict=False)[0][:, :4]
router = train_router(model, DDIMScheduler(), make_batch, call,
                      TrainConfig("l2c", num_steps=4, iterations=3, batch=2, lr=0.05, l1=1e-3), distributed=dist)
torch.save(router.logits, os.path.join({str(tmp_path)!r}, f"rank{{dist.get_rank()}}.pt"))
dist.destroy_process_group()
''')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(rank0, rank1)
    assert not torch.equal(rank0, torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))


def test_cli_trains_a_router_for_a_pipeline_saved_on_disk(tmp_path):
    from diffusers import AutoencoderKL, DiTPipeline
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=8, sample_size=8)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_router.py"), "--pipeline", str(tmp_path / "pipe"),
                             "--method", "l2c", "--steps", "4", "--iterations", "3", "--batch", "2",
                             "--out", str(tmp_path / "r.safetensors")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    router = load_router(tmp_path / "r.safetensors")
    assert router.num_steps == 4 and router.depth == 2 and router.method == "l2c"
    handle = apply_router(DiTPipeline.from_pretrained(tmp_path / "pipe").transformer, router, num_inference_steps=4)
    handle.remove()


@pytest.mark.parametrize("threshold", [2.0, -0.1, float("nan"), float("inf")])
def test_a_threshold_outside_0_to_1_is_refused_naming_the_value_and_the_range(threshold):
    with pytest.raises(ValueError, match=rf"threshold must be between 0 and 1.*got {threshold}"):
        apply_router(_tiny_dit(), _router(), threshold=threshold, num_inference_steps=6)


def test_a_router_on_a_unet_is_refused_as_a_router_error_not_a_fora_one():
    import tiny_diffusers as td
    with pytest.raises(RouterError, match=r"Learned routers work on DiTs .*this model is a U-Net .*DeepCache") as error:
        apply_router(td.unet(), _router(), num_inference_steps=6)
    assert "FORA" not in str(error.value)


def _junk_router_files(tmp_path: Path) -> dict[str, Path]:
    """Files users do hand to the router loaders: text, renamed safetensors, random bytes."""
    good = save_router(_router(), tmp_path / "good.safetensors")
    files = {
        "text.safetensors": b"a text file renamed to .safetensors\n",
        "text.pt": b"hello, this is a text file\n",            # torch.load: KeyError 101
        "stack.pt": b"sq\x10 " + bytes(range(200)),            # torch.load: IndexError (pop from empty list)
        "empty.pt": b"",
        "empty.safetensors": b"",
        "safetensors_renamed.pt": good.read_bytes(),
        "truncated.pt": (FIXTURES / "DiT-XL-2_DDIM20_router.pt").read_bytes()[:3000]
        if (FIXTURES / "DiT-XL-2_DDIM20_router.pt").exists() else b"PK\x03\x04" + bytes(100),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


def test_junk_router_files_give_one_clear_value_error_never_a_raw_one(tmp_path):
    for name, path in _junk_router_files(tmp_path).items():
        loaders = [load_official, lambda p: apply_router(_tiny_dit(), p, num_inference_steps=6)]
        if name != "safetensors_renamed.pt":          # load_router reads it: the content is a good router
            loaders.append(load_router)
        for load in loaders:
            with pytest.raises(RouterError) as error:
                load(path)
            message = str(error.value)
            assert name in message and "\n" not in message, message
            # torch's own advice (weights_only=False) must never reach the user, nor a claim
            # that junk "asks to build Python objects" (that is for real pickles with code).
            assert "weights_only" not in message and "Python objects" not in message, message
