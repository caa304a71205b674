"""Learned routers in real ComfyUI: the router node on a tiny PixArt built from ComfyUI's classes."""
from __future__ import annotations

import pytest
import torch

from .comfy_graph import Graph, tiny

STEPS = 6


@pytest.fixture
def router_dir(comfy, tmp_path, monkeypatch):
    import folder_paths
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "cachekit_routers",
                        ([str(tmp_path)], {".safetensors", ".pt", ".pth"}))
    return tmp_path


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
