"""Test-only ComfyUI nodes and an API-format graph builder for the integration tests."""
from __future__ import annotations

import itertools

RESULTS: dict[str, object] = {}
_MODELS: dict[tuple, object] = {}
_ids = itertools.count(1)


def tiny(family: str, seed: int = 0):
    from .comfy_models import build
    key = (family, seed)
    if key not in _MODELS:
        _MODELS[key] = build(family, seed)
    return _MODELS[key]


class CKTestModel:
    """MODEL, conditioning and an empty latent of a tiny random model from ComfyUI's classes."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": ("STRING", {"default": "sd15"}), "seed": ("INT", {"default": 0}),
                             "size": ("INT", {"default": 0, "min": 0, "max": 64})}}
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "LATENT")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, family, seed, size):
        t = tiny(family, seed)
        latent = t.latent
        if size:
            import torch
            samples = t.latent["samples"]
            latent = {"samples": torch.zeros(*samples.shape[:-2], size, size, dtype=samples.dtype)}
        return (t.patcher, t.positive, t.negative, latent)


class CKTestCapture:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "key": ("STRING", {"default": "out"})}}
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "capture"
    CATEGORY = "testing"

    def capture(self, samples, key):
        RESULTS[key] = samples["samples"].clone()
        return ()


def _value_capture(io_type: str) -> type:
    """A node that keeps a value of `io_type` (a STRING, CacheKit settings) in RESULTS[key]."""
    class Capture:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"value": (io_type,), "key": ("STRING", {"default": "out"})}}
        RETURN_TYPES = ()
        OUTPUT_NODE = True
        FUNCTION = "capture"
        CATEGORY = "testing"

        def capture(self, value, key):
            RESULTS[key] = value
            return ()
    return Capture


def register_test_nodes(nodes_module) -> None:
    nodes_module.NODE_CLASS_MAPPINGS["CKTestModel"] = CKTestModel
    nodes_module.NODE_CLASS_MAPPINGS["CKTestCapture"] = CKTestCapture
    nodes_module.NODE_CLASS_MAPPINGS["CKTestCaptureString"] = _value_capture("STRING")
    nodes_module.NODE_CLASS_MAPPINGS["CKTestCaptureSettings"] = _value_capture("CACHEKIT_SETTINGS")
    nodes_module.NODE_CLASS_MAPPINGS["CKTestCaptureImage"] = _value_capture("IMAGE")


class Graph:
    """Build an API-format prompt: loader -> [patch nodes] -> KSampler(s) -> capture."""

    def __init__(self, family: str, seed: int = 0):
        self.prompt: dict = {}
        self.loader = self.add("CKTestModel", family=family, seed=seed, size=0)
        self.model = [self.loader, 0]

    def add(self, class_type: str, **inputs) -> str:
        node_id = str(len(self.prompt) + 1)
        self.prompt[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    def patch(self, class_type: str, **params) -> "Graph":
        node = self.add(class_type, model=self.model, **params)
        self.model = [node, 0]
        return self

    def sample(self, key: str = "out", *, steps=6, cfg=2.0, sampler="euler", scheduler="normal", seed=7,
               size: int = 0, latent_from=None) -> str:
        latent = [self.loader, 3]
        if size:
            latent = [self.add("CKTestModel", family=self.prompt[self.loader]["inputs"]["family"],
                               seed=self.prompt[self.loader]["inputs"]["seed"], size=size), 3]
        if latent_from is not None:
            latent = latent_from
        ks = self.add("KSampler", model=self.model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
                      scheduler=scheduler, positive=[self.loader, 1], negative=[self.loader, 2],
                      latent_image=latent, denoise=1.0)
        self.add("CKTestCapture", samples=[ks, 0], key=key)
        return ks


def train_router(comfy, router_dir, family: str, method: str, *, steps: int, iterations: int, router_name: str,
                 key: str):
    """Train a router on the tiny `family` model with the CacheKitTrainRouter node, check that it was saved and
    reported and that training moved its logits; return (the loaded router, its path)."""
    import torch
    g = Graph(family)
    train = g.add("CacheKitTrainRouter", model=g.model, positive=[g.loader, 1], negative=[g.loader, 2],
                  latent_image=[g.loader, 3], seed=3, steps=steps, cfg=2.0, scheduler="normal", method=method,
                  iterations=iterations, l1=1e-3, lr=0.05, router_name=router_name)
    g.add("CKTestCaptureString", value=[train, 1], key=key)
    comfy.run(g.prompt, comfy.fresh_executor())
    saved = router_dir / f"{router_name}.safetensors"
    assert saved.exists() and f"Trained a {method} router" in RESULTS[key]
    router = comfy.pack("core.routers").load_router(saved)
    initial = torch.randn(router.logits.shape, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(router.logits, initial)       # the gradient reached the logits through ComfyUI
    return router, saved
