"""Apply any registered method to a diffusers model by its key (core/methods/registry.py).

    handle = apply(pipe, "fora", interval=3)        # the same as apply_fora(pipe, interval=3)

A method whose declaration names a public function of this host (`hosts["diffusers"]`, e.g.
"apply_deepcache") goes through that function, so its checks and messages are the public API's.
Any other method is applied from its declaration alone: a unit-level method caches the units
of a U-Net (fits "unet") or a DiT (fits "dit"), or of whichever the model is (fits "any"), with
its policy; a call-level method runs its policy on the whole model call, as adaptive step
skipping does.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch

from ..core.methods import registry
from ..core.methods.registry import MethodSpec
from ..core.units import UnitMap
from .api import STEP_SKIP_ATTR, CacheHandle, _check_free, _resolve
from .step_skip import StepSkipHandle
from .units import dit_units, is_unet, unet_units

HOST = "diffusers"


def host_function(spec: MethodSpec):
    """The host's public apply function the method names, or None."""
    name = spec.hosts.get(HOST)
    if name is None:
        return None
    package = importlib.import_module(__package__)
    function = getattr(package, name, None)
    if function is None:
        raise ValueError(f"{spec.name} names {HOST} function {name!r}, which {__package__} does not export.")
    return function


def apply(target: Any, method: str, *, scheduler: Any = None, num_inference_steps: int | None = None, **settings):
    """Apply the registered `method` with keyword `settings` to a pipeline or model; returns its handle."""
    spec = registry.get(method)
    function = host_function(spec)
    if function is not None:
        return function(target, **settings, scheduler=scheduler, num_inference_steps=num_inference_steps)
    return apply_generic(spec, target, settings, scheduler, num_inference_steps)


def apply_off(target: Any, method: str, *, scheduler: Any = None, num_inference_steps: int | None = None,
              **required):
    """The method with caching off (every unit computed): output equals the unpatched model's."""
    spec = registry.get(method)
    return apply(target, method, scheduler=scheduler, num_inference_steps=num_inference_steps,
                 **{**spec.off, **required})


def model_units(model: torch.nn.Module, fits: str) -> UnitMap | None:
    """The unit map a method of this fit works on (None for "any": call-level methods need none)."""
    if fits == "unet":
        return unet_units(model)[0]
    if fits == "dit":
        return dit_units(model)[0]
    return None     # "any": the model decides (apply_generic)


def check_kind(spec: MethodSpec, model: torch.nn.Module, alternatives: str = "") -> None:
    """Refuse a model of the wrong kind in the method's words, before anything is patched."""
    name = type(model).__name__
    if spec.fits == "unet" and not is_unet(model):
        raise ValueError(f"{spec.name} needs a U-Net; got {name}.{alternatives}")
    if spec.fits == "dit" and is_unet(model):
        raise ValueError(f"{spec.name} works on DiT transformers; this model is a U-Net ({name}).{alternatives}")


def apply_generic(spec: MethodSpec, target: Any, settings: dict, scheduler: Any = None,
                  num_inference_steps: int | None = None):
    model, scheduler = _resolve(target, scheduler)
    config = spec.make_config(settings)
    policy = spec.make_policy(config)
    if spec.level == "call":
        if getattr(model, STEP_SKIP_ATTR, None) is not None:
            raise ValueError("This model already has a whole-step method applied; call remove() on its handle first.")
        return StepSkipHandle(model, None, scheduler, num_inference_steps, policy=policy)
    check_kind(spec, model)
    _check_free(model)
    if spec.fits == "unet" or (spec.fits == "any" and is_unet(model)):
        units, slots, region_slots = unet_units(model)
    else:
        (units, slots), region_slots = dit_units(model), None
    spec.check_units(policy, units)
    start, end = spec.window(config)
    return CacheHandle(model, units, slots, policy, start, end, scheduler, num_inference_steps, region_slots)


def apply_change_cache(target: Any, *, threshold: float = 0.1, warmup_steps: int = 2, max_reuse: int = 3,
                       cache_branch: int = 0, start_percent: float = 0.0, end_percent: float = 1.0,
                       reuse: str = "hold", scheduler: Any = None, num_inference_steps: int | None = None):
    """Change-driven caching (core/methods/change.py) on a diffusers U-Net or DiT, or a pipeline.

    Each step runs the first unit; while its relative change since the last full step stays
    below `threshold`, the other blocks (a U-Net's deep part below `cache_branch`) are reused.
    Returns the handle (`finish_run()`, `remove()`)."""
    return apply(target, "change", scheduler=scheduler, num_inference_steps=num_inference_steps,
                 threshold=threshold, warmup_steps=warmup_steps, max_reuse=max_reuse, cache_branch=cache_branch,
                 start_percent=start_percent, end_percent=end_percent, reuse=reuse)
