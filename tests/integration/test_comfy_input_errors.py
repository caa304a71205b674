"""User mistakes in real ComfyUI get one clear error, before any sampling: a router threshold
outside [0, 1], a router on a U-Net, junk router files, and Autotune with a method that does
not fit the model."""
from __future__ import annotations

import importlib

import pytest

from .comfy_graph import Graph
from .test_comfy_router import STEPS, _pixart_router


def _errors(comfy, prompt) -> list[dict]:
    """The execution errors ComfyUI reports for `prompt` (what the user sees), or [] if it ran."""
    executor = comfy.fresh_executor()
    try:
        comfy.run(prompt, executor)
    except AssertionError:
        pass
    return [data for event, data in executor.status_messages if event == "execution_error"]


@pytest.fixture
def sampling_calls(comfy, monkeypatch):
    """Counts calls of comfy.sample.sample: Autotune's calibration samplings go through it."""
    calls = []
    sample = importlib.import_module("comfy.sample")
    original = sample.sample
    monkeypatch.setattr(sample, "sample", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_router_threshold_nan_is_refused_naming_the_value_and_the_range(comfy, router_dir):
    # ComfyUI's own min/max check lets NaN through (every comparison with NaN is false).
    _pixart_router(comfy, router_dir / "r.safetensors")
    g = Graph("pixart").patch("CacheKitRouter", router_name="r.safetensors", threshold=float("nan"))
    g.sample("router-nan", steps=STEPS)
    errors = _errors(comfy, g.prompt)
    assert errors, "a NaN threshold ran"
    assert "threshold must be between 0 and 1" in errors[0]["exception_message"]
    assert "nan" in errors[0]["exception_message"]


def test_router_on_a_unet_names_routers_and_deepcache_not_fora(comfy, router_dir):
    _pixart_router(comfy, router_dir / "r.safetensors")
    g = Graph("sd15").patch("CacheKitRouter", router_name="r.safetensors", threshold=0.0)
    g.sample("router-unet", steps=STEPS)
    errors = _errors(comfy, g.prompt)
    message = errors[0]["exception_message"]
    assert "Learned routers work on DiTs" in message and "U-Net" in message and "DeepCache" in message
    assert "FORA" not in message


@pytest.mark.parametrize("name, data", [("text.safetensors", b"a text file renamed to .safetensors\n"),
                                        ("text.pt", b"hello, this is a text file\n"),
                                        ("stack.pt", b"sq\x10 " + bytes(range(200))),
                                        ("empty.pth", b"")])
def test_junk_router_files_give_the_loaders_clear_message(comfy, router_dir, name, data):  # noqa: F811
    (router_dir / name).write_bytes(data)
    g = Graph("pixart").patch("CacheKitRouter", router_name=name, threshold=0.0)
    g.sample("router-junk", steps=STEPS)
    errors = _errors(comfy, g.prompt)
    assert errors[0]["exception_type"].endswith("RouterError"), errors[0]
    message = errors[0]["exception_message"].strip()       # ComfyUI ends it with a newline
    assert name in message and "weights_only" not in message and "\n" not in message


@pytest.mark.parametrize("family, method, words", [("sd15", "fora", ("FORA", "U-Net")),
                                                   ("pixart", "deepcache", ("DeepCache", "U-Net"))])
def test_autotune_refuses_a_method_that_does_not_fit_before_any_sampling(comfy, sampling_calls, family, method,
                                                                       words):
    g = Graph(family)
    tune = g.add("CacheKitAutotune", model=g.model, positive=[g.loader, 1], negative=[g.loader, 2],
                 latent_image=[g.loader, 3], seed=7, steps=4, cfg=2.0, sampler_name="euler", scheduler="normal",
                 method=method, target="psnr", target_value=20.0, max_trials=1)
    g.add("CKTestCaptureString", value=[tune, 2], key=f"tune-{family}-{method}")
    errors = _errors(comfy, g.prompt)
    assert errors and all(word in errors[0]["exception_message"] for word in words), errors
    assert sampling_calls == []
