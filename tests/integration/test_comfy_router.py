"""Learned routers in real ComfyUI: the router node on a tiny PixArt built from ComfyUI's classes."""
from __future__ import annotations

import pytest
import torch

from .comfy_graph import Graph, tiny, train_router

STEPS = 6


def _pixart_router(comfy, path, method="harmonica", steps=STEPS, depth=None, seed=0):
    routers = comfy.pack("core.routers")
    blocks = len(tiny("pixart").patcher.get_model_object("diffusion_model").blocks)
    depth = blocks if depth is None else depth
    logits = torch.randn(steps, depth * 3, generator=torch.Generator().manual_seed(seed)) * 2
    router = routers.Router(logits, method, "pixart", depth, ("attn", "cross_attn", "mlp"), "euler", [], 0.5, "test")
    routers.save_router(router, path)
    return router


@pytest.mark.parametrize("method", ["harmonica", "l2c"])
def test_router_node_applies_the_routers_decisions(comfy, router_dir, method):
    router = _pixart_router(comfy, router_dir / f"tiny_pixart_{method}.safetensors", method)
    g = Graph("pixart").patch("CacheKitRouter", router_name=f"tiny_pixart_{method}.safetensors", threshold=0.0)
    g.sample(f"router-{method}", steps=STEPS, cfg=2.0)
    comfy.run(g.prompt, comfy.fresh_executor())
    run = comfy.pack("nodes.history").last()
    policy = comfy.pack("core.methods.router").RouterPolicy(router)
    routed = comfy.pack("core.methods.router").routed_steps(method, STEPS)
    expected = (~router.recompute()).tolist()
    for k in range(STEPS):
        reused = [r > 0 for r in run.reused[k]]
        assert reused == (expected[k] if routed[k] else [False] * len(expected[k])), k
    assert run.method == policy.name and run.hit_rate > 0


def test_router_node_with_forecast_reuse_takes_the_same_decisions_with_other_values(comfy, router_dir):
    router = _pixart_router(comfy, router_dir / "tiny_pixart_forecast.safetensors")
    runs = {}
    for reuse in ("hold", "forecast1", None):          # None: the input left out (a workflow saved before it)
        params = {} if reuse is None else {"reuse": reuse}
        g = Graph("pixart").patch("CacheKitRouter", router_name="tiny_pixart_forecast.safetensors", threshold=0.0,
                                  **params)
        g.sample(f"router-reuse-{reuse}", steps=STEPS, cfg=2.0)
        comfy.run(g.prompt, comfy.fresh_executor())
        runs[reuse] = comfy.pack("nodes.history").last()
    from .comfy_graph import RESULTS
    hold, forecast, default = (RESULTS[f"router-reuse-{r}"] for r in ("hold", "forecast1", None))
    assert torch.isfinite(forecast).all() and not torch.equal(forecast, hold)
    assert torch.equal(default, hold)                   # an older router file runs as trained: hold
    expected = (~router.recompute()).tolist()
    for run in runs.values():
        assert [[r > 0 for r in row] for row in run.reused[1:]] == expected[1:] and run.hit_rate > 0


def test_a_router_trained_for_forecast_records_it_and_runs_it_by_default(comfy, router_dir):
    from .comfy_graph import RESULTS
    g = Graph("pixart")
    train = g.add("CacheKitTrainRouter", model=g.model, positive=[g.loader, 1], negative=[g.loader, 2],
                  latent_image=[g.loader, 3], seed=3, steps=STEPS, cfg=2.0, scheduler="normal", method="harmonica",
                  iterations=2, l1=1e-3, lr=0.05, router_name="trained_forecast", reuse="forecast1")
    g.add("CKTestCaptureString", value=[train, 1], key="train-forecast-report")
    comfy.run(g.prompt, comfy.fresh_executor())
    assert "reuse forecast1" in RESULTS["train-forecast-report"]
    router = comfy.pack("core.routers").load_router(router_dir / "trained_forecast.safetensors")
    assert router.reuse == "forecast1"
    for reuse in ("as trained", "forecast1", "hold"):
        g = Graph("pixart").patch("CacheKitRouter", router_name="trained_forecast.safetensors", threshold=0.0,
                                  reuse=reuse)
        g.sample(f"trained-forecast-{reuse}", steps=STEPS, cfg=2.0)
        comfy.run(g.prompt, comfy.fresh_executor())
    as_trained, forecast, hold = (RESULTS[f"trained-forecast-{r}"] for r in ("as trained", "forecast1", "hold"))
    assert torch.equal(as_trained, forecast) and torch.isfinite(forecast).all()
    if (~router.recompute()[1:]).any():
        assert not torch.equal(forecast, hold)


def test_router_that_does_not_fit_is_refused(comfy, router_dir):
    _pixart_router(comfy, router_dir / "deep.safetensors", depth=28)
    g = Graph("pixart").patch("CacheKitRouter", router_name="deep.safetensors", threshold=0.0)
    g.sample("router-deep", steps=STEPS)
    with pytest.raises(AssertionError, match="trained for 28 blocks"):
        comfy.run(g.prompt, comfy.fresh_executor())
    _pixart_router(comfy, router_dir / "steps.safetensors", steps=10)
    g = Graph("pixart").patch("CacheKitRouter", router_name="steps.safetensors", threshold=0.0)
    g.sample("router-steps", steps=STEPS)
    with pytest.raises(AssertionError, match="trained for 10 sampling steps, but the sampler runs 6"):
        comfy.run(g.prompt, comfy.fresh_executor())


@pytest.mark.parametrize("family, method", [("pixart", "harmonica"), ("pixart", "l2c"), ("wan", "harmonica"),
                                            ("mmdit", "l2c"), ("flux", "harmonica")])
def test_router_trained_by_the_node_applies_with_the_router_node(comfy, router_dir, family, method):
    from .comfy_graph import RESULTS
    original = tiny(family).patcher
    before = {k: v.clone() for k, v in original.get_model_object("diffusion_model").state_dict().items()}
    router, saved = train_router(comfy, router_dir, family, method, steps=STEPS, iterations=3,
                                 router_name=f"trained_{family}_{method}", key=f"train-{method}-report")
    layout = ("attn", "cross_attn", "mlp") if family in ("pixart", "wan") else ("block",)
    assert router.method == method and router.num_steps == STEPS and router.layout == layout
    # The saved router through the Learned Router node, on the original (untouched) model.
    g = Graph(family).patch("CacheKitRouter", router_name=saved.name, threshold=0.0)
    g.sample(f"trained-{family}-{method}", steps=STEPS, cfg=2.0)
    comfy.run(g.prompt, comfy.fresh_executor())
    run = comfy.pack("nodes.history").last()
    routed = comfy.pack("core.methods.router").routed_steps(method, STEPS)
    expected = (~router.recompute()).tolist()
    for k in range(STEPS):
        assert [r > 0 for r in run.reused[k]] == (expected[k] if routed[k] else [False] * len(expected[k])), k
    assert torch.isfinite(RESULTS[f"trained-{family}-{method}"]).all()
    assert (router_dir / f"trained_{family}_{method}.ckpt.pt").exists()
    # Training worked on a copy: the user's model and its patcher are untouched.
    after = original.get_model_object("diffusion_model").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "diffusion_model" not in original.object_patches


def test_train_router_node_resumes_from_its_checkpoint(comfy, router_dir):
    def train(iterations, resume):
        g = Graph("pixart")
        node = g.add("CacheKitTrainRouter", model=g.model, positive=[g.loader, 1], negative=[g.loader, 2],
                     latent_image=[g.loader, 3], seed=1, steps=STEPS, cfg=2.0, scheduler="normal", method="l2c",
                     iterations=iterations, l1=1e-3, lr=0.05, router_name="resumed", resume=resume)
        g.add("CKTestCaptureString", value=[node, 1], key=f"resume-{iterations}")
        comfy.run(g.prompt, comfy.fresh_executor())
        return comfy.pack("core.routers").load_router(router_dir / "resumed.safetensors")
    train(2, False)
    assert "2 iterations" in train(2, False).source
    assert "4 iterations" in train(4, True).source       # two more, on top of the checkpoint


def _train_prompt(name, resume=False, iterations=2):
    g = Graph("pixart")
    node = g.add("CacheKitTrainRouter", model=g.model, positive=[g.loader, 1], negative=[g.loader, 2],
                 latent_image=[g.loader, 3], seed=1, steps=STEPS, cfg=2.0, scheduler="normal", method="l2c",
                 iterations=iterations, l1=1e-3, lr=0.05, router_name=name, resume=resume)
    g.add("CKTestCaptureString", value=[node, 1], key=f"bad-{name[:20]}")
    return g.prompt


@pytest.fixture
def no_training(comfy, monkeypatch):
    """Fails the test if the node gets as far as training."""
    node_module = comfy.pack("nodes.train_router_node")

    def trained(*args, **kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr(node_module, "train_units", trained)


@pytest.mark.parametrize("name, message", [("r" * 300, "300 characters long"), ("a/b", "no folders"),
                                           (".hidden", "letters, digits"), ("x y", "letters, digits")])
def test_train_router_refuses_a_bad_name_before_any_training(comfy, router_dir, no_training, name, message):
    # Regression: a 300-character name trained, then failed saving with a raw RuntimeError.
    with pytest.raises(AssertionError, match=message) as error:
        comfy.run(_train_prompt(name), comfy.fresh_executor())
    assert "training started" not in str(error.value) and not list(router_dir.iterdir())


class _Hostile:
    """Unpickling this would run code (creates a file): a weights_only load must refuse it."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _corrupt(path, marker):
    path.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)


def _hostile(path, marker):
    torch.save({"logits": torch.zeros(STEPS, 3), "iteration": _Hostile(str(marker)), "losses": []}, str(path))


def _wrong_shape(path, marker):
    torch.save({"logits": torch.zeros(STEPS + 3, 2), "iteration": 1, "losses": [0.5]}, str(path))


@pytest.mark.parametrize("write, message", [(_corrupt, "not a CacheKit router training checkpoint"),
                                            (_hostile, "not a CacheKit router training checkpoint"),
                                            (_wrong_shape, "another model or step count")])
def test_resume_from_a_bad_checkpoint_gives_a_clear_message(comfy, router_dir, no_training, tmp_path, write,
                                                             message):
    # Regression: torch's UnpicklingError surfaced, advising weights_only=False.
    marker = tmp_path.parent / f"{tmp_path.name}-pwned"
    write(router_dir / "bad.ckpt.pt", marker)
    with pytest.raises(AssertionError, match="Cannot resume from bad.ckpt.pt") as error:
        comfy.run(_train_prompt("bad", resume=True), comfy.fresh_executor())
    assert message in str(error.value) and "weights_only" not in str(error.value)
    assert not marker.exists()                       # no code from the file ran
