"""ComfyUI host adapter: installs a method on a cloned ModelPatcher, the native way.

* Units are reached through object patches (module proxies) and patches_replace["dit"]; both
  live on the clone only and are undone by ComfyUI when another patcher takes the model.
* An OUTER_SAMPLE wrapper opens a CacheSession for each sampling run (so a second KSampler, a
  hires pass at another size or the next prompt starts clean) and closes it in `finally`,
  also on interrupt or error. The step of each model call comes from its sigma (core/clock.py).
* An APPLY_MODEL wrapper (every model class goes through BaseModel.apply_model; not all
  call DIFFUSION_MODEL wrappers) makes the session active for each model call with the
  call's streams (cond_or_uncond + uuids), sigma, input and whether anything edits unit
  outputs in place (ControlNet, block patches such as FreeU: stored values are then copied).
  Nothing is captured at node time except the unit layout: the model itself is always the one
  ComfyUI calls.
* The FLOP profile of a model is measured after the run, when the sidebar or a report asks
  (core/flops.py): the wrapper records the shapes of one call's inputs, and the profile replays
  that call on fake tensors. Sampling itself never profiles.
"""
from __future__ import annotations

import inspect
import logging
import uuid
from typing import Any, Callable

import comfy.patcher_extension
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.patcher_extension import WrappersMP

from ..core.clock import StepClock, window_steps
from ..core.flops import FlopProfiler, lazy_profile
from ..core.guards import open_guarded_session
from ..core.lifecycle import RunLifecycle
from ..core.methods.base import Policy
from ..core.proxy import make_proxy, run_links
from ..core.session import CacheSession, active_call
from ..core.streams import CallLayout, empty_from_specs, input_signature, tensor_specs
from . import history
from .comfy_schedule import RunSchedule, run_schedule
from .comfy_units import ComfyLayout

log = logging.getLogger("CacheKit")
SESSIONS_KEY = "cachekit_sessions"   # transformer_options[SESSIONS_KEY][owner] -> CacheSession


# -- U-Net gates -------------------------------------------------------------------------
class UnitGate:
    """What a proxied U-Net block yields when forward_timestep_embed iterates it."""
    __slots__ = ("block",)

    def __init__(self, block):
        self.block = block


def _iter_gate(self):
    return iter((self.__dict__["_cachekit_gate"],))


def _gate_handler(gate, x, emb, context=None, transformer_options={}, output_shape=None, time_context=None,
                  num_video_frames=None, image_only_indicator=None):
    block = gate.block
    layers = list(block._modules.values())
    before = transformer_options.get("transformer_index")

    def compute():
        return forward_timestep_embed(layers, x, emb, context, transformer_options, output_shape,
                                      time_context, num_video_frames, image_only_indicator)

    out = run_links(block, compute, x)
    if before is not None:
        # A reused block did not run its transformers; keep the index where a computed one
        # would have left it, so attention patches keyed by index still find their layer.
        n = sum(isinstance(layer, SpatialTransformer) for layer in layers)
        transformer_options["transformer_index"] = before + n
    return out


_GATE_EXTRA = {"__iter__": _iter_gate}


def _gate_proxy(module, owner: str, index: int):
    proxy = make_proxy(module, owner, index, extra=_GATE_EXTRA)
    proxy.__dict__["_cachekit_gate"] = UnitGate(proxy)
    return proxy


# -- DiT block replace -------------------------------------------------------------------
def _dit_replace(owner: str, index: int, previous: Callable | None) -> Callable:
    """A patches_replace["dit"] entry that runs the block as a unit (chaining any earlier one)."""
    def replace(args: dict, extra: dict) -> dict:
        original = extra["original_block"]
        compute = (lambda: previous(args, extra)) if previous is not None else (lambda: original(args))
        call = active_call(owner)
        if call is None:
            return compute()
        keys = [k for k in ("img", "txt") if k in args]
        unit_input = {k: args[k] for k in keys}

        def compute_unit():
            # Blocks may update their inputs in place (Flux / Chroma / HunyuanVideo: `txt += ...`
            # in double blocks, `x += ...` in single blocks): the residual is taken against a copy
            # made before the block runs (only when it runs; a reuse adds to the input as is).
            for k in keys:
                unit_input[k] = args[k].clone()
            return compute()
        return call.session.run_unit(call, index, compute_unit, unit_input)
    return replace


# -- wrappers ----------------------------------------------------------------------------
def _transformer_options(args: tuple, kwargs: dict) -> dict | None:
    options = kwargs.get("transformer_options")
    if isinstance(options, dict):
        return options
    for value in reversed(args):
        if isinstance(value, dict) and ("sigmas" in value or "cond_or_uncond" in value):
            return value
    return None


# Block patches of ComfyUI's U-Net that may edit block outputs in place (FreeU scales `h`).
_IN_PLACE_PATCHES = ("input_block_patch", "input_block_patch_after_skip", "output_block_patch", "middle_block_patch")
_CONTROL_ARG = 4     # _apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def _edits_in_place(args: tuple, kwargs: dict, options: dict) -> bool:
    control = kwargs.get("control", args[_CONTROL_ARG] if len(args) > _CONTROL_ARG else None)
    patches = options.get("patches", {})
    return control is not None or any(patches.get(name) for name in _IN_PLACE_PATCHES)


def _apply_model_wrapper(owner: str) -> Callable:
    def wrapper(executor, *args, **kwargs):
        options = _transformer_options(args, kwargs)
        session = options.get(SESSIONS_KEY, {}).get(owner) if options else None
        if session is None:
            return executor(*args, **kwargs)
        x = args[0]
        conds = options.get("cond_or_uncond") or [0]
        uuids = options.get("uuids") or [None] * len(conds)
        layout = CallLayout(tuple(zip(conds, uuids)))
        sigmas = options.get("sigmas")
        sigma = float(sigmas.flatten()[0]) if sigmas is not None else None
        if session.telemetry.unit_flops is None and session.telemetry.flop_source is None:
            _prepare_profile(session, executor.class_obj, args, kwargs, layout)
        return session.model_call(lambda: executor(*args, **kwargs), sigma=sigma, layout=layout,
                                  samples=x.shape[0], call_input=x, protect=_edits_in_place(args, kwargs, options))
    return wrapper


def _prepare_profile(session: CacheSession, base_model, args: tuple, kwargs: dict, layout: CallLayout) -> None:
    """Known FLOP profile: use it. Unknown: record this call's input shapes, so that a report can
    replay it after the run on fake tensors (BaseModel._apply_model, below every wrapper, with
    this run's patches but no ControlNet: its FLOPs are not the units')."""
    x = args[0]
    key = (base_model.diffusion_model, input_signature(x, layout))
    known = FlopProfiler.lookup(key)
    if known is not None:
        session.telemetry.unit_flops, session.telemetry.call_flops = known
        return
    options = _transformer_options(args, kwargs)
    replay_options = {k: v for k, v in options.items() if k != SESSIONS_KEY}
    tensors = tensor_specs(([a for a in args if a is not options], {k: v for k, v in kwargs.items()
                                                                     if k != "transformer_options"}))

    def replay():
        fake_args, fake_kwargs = empty_from_specs(tensors)
        fake_args = list(fake_args) + [None] * (_CONTROL_ARG + 1 - len(fake_args))
        fake_args[_CONTROL_ARG] = None
        fake_kwargs.pop("control", None)
        with torch.no_grad():
            base_model._apply_model(*fake_args[:_CONTROL_ARG + 1], transformer_options=dict(replay_options),
                                    **fake_kwargs)

    session.telemetry.flop_source = lazy_profile(session, key, x.shape[0], replay)


def outer_sample_wrapper(owner: str, open_session: Callable, node_id: str | None) -> Callable:
    """OUTER_SAMPLE wrapper: one session per sampling run, published and dropped when it ends.

    open_session(guider, sigmas) builds the run's session; it is visible to the other wrappers
    through transformer_options[SESSIONS_KEY][owner] for the run only. An opener that takes a
    third argument also gets the run's RunSchedule (nodes/comfy_schedule.py: the whole schedule
    a split run is part of, its steps in it, the sampler and whether it injects noise).
    """
    with_schedule = _takes_schedule(open_session)

    def on_open(session):
        notes = session.telemetry.notes
        if notes:
            log.info("CacheKit: %s: %s", session.policy.name, " ".join(notes))
        return history.start(owner, node_id, session.telemetry)

    def on_close(session, telemetry, live):
        live.finish()
        log.info("CacheKit: %s", telemetry.summary())

    def wrapper(executor, *args, **kwargs):
        guider = executor.class_obj
        lifecycle = RunLifecycle(owner, open_session, on_open=on_open, on_close=on_close)
        run_args = (guider, args[3]) + ((run_schedule(guider, args[0], args[2], args[3]),) if with_schedule else ())
        with lifecycle.run(*run_args) as session:
            live = lifecycle.token
            args, kwargs = _with_step_callback(args, kwargs, live.progress)
            original_options = guider.model_options
            guider.model_options = comfy.patcher_extension.copy_nested_dicts(original_options)
            options = guider.model_options.setdefault("transformer_options", {})
            options[SESSIONS_KEY] = {**options.get(SESSIONS_KEY, {}), owner: session}
            try:
                return executor(*args, **kwargs)
            finally:
                guider.model_options = original_options
    return wrapper


_CALLBACK_ARG = 5    # outer_sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, ...)


def _takes_schedule(open_session: Callable) -> bool:
    try:
        parameters = inspect.signature(open_session).parameters.values()
    except (TypeError, ValueError):
        return False
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters) >= 3 or any(
        p.kind is p.VAR_POSITIONAL for p in parameters)


def _with_step_callback(args: tuple, kwargs: dict, on_step: Callable[[], None]) -> tuple[tuple, dict]:
    """Chain `on_step` after the sampler's per-step callback (previews, progress bar)."""
    if "callback" in kwargs or len(args) <= _CALLBACK_ARG:
        original = kwargs.get("callback")
        kwargs = {**kwargs, "callback": _chained(original, on_step)}
        return args, kwargs
    args = list(args)
    args[_CALLBACK_ARG] = _chained(args[_CALLBACK_ARG], on_step)
    return tuple(args), kwargs


def _chained(original: Callable | None, on_step: Callable[[], None]) -> Callable:
    def callback(*a, **k):
        result = original(*a, **k) if original is not None else None
        on_step()
        return result
    return callback


def open_run_session(owner: str, units, policy, run: RunSchedule, window: range) -> CacheSession:
    """A run's session over its whole schedule, with the guards of core/guards.py and their notes."""
    return open_guarded_session(owner, units, policy, StepClock(run.sigmas), window, sampler=run.sampler,
                                injects_noise=run.injects_noise, run_steps=run.steps if run.split else None)


def _unit_session_opener(owner: str, layout: ComfyLayout, policy: Policy, start_percent: float,
                         end_percent: float) -> Callable:
    def open_session(guider, sigmas, run: RunSchedule) -> CacheSession:
        model_sampling = guider.model_patcher.get_model_object("model_sampling")
        window = window_steps(run.sigmas, model_sampling.percent_to_sigma(start_percent),
                              model_sampling.percent_to_sigma(end_percent))
        return open_run_session(owner, layout.units, policy, run, window)
    return open_session


def install(model, layout: ComfyLayout, policy: Policy, start_percent: float, end_percent: float,
            node_id: str | None = None):
    """Patch a clone of `model` (a ModelPatcher) with the method. Returns the clone."""
    patched = model.clone()
    owner = f"cachekit.{policy.name}.{uuid.uuid4().hex[:12]}"
    uses_gates = False
    for index, slot in enumerate(layout.slots):
        if slot.how == "gate":
            patched.add_object_patch(slot.path, _gate_proxy(patched.get_model_object(slot.path), owner, index))
            uses_gates = True
        elif slot.how == "proxy":
            patched.add_object_patch(slot.path, make_proxy(patched.get_model_object(slot.path), owner, index))
        else:
            key, number = slot.dit_key
            existing = (patched.model_options.get("transformer_options", {}).get("patches_replace", {})
                        .get("dit", {}).get(slot.dit_key))
            patched.set_model_patch_replace(_dit_replace(owner, index, existing), "dit", key, number)
    if uses_gates and not _has_gate_patch(patched):
        patched.set_model_patch((UnitGate, _gate_handler), "forward_timestep_embed_patch")
    opener = _unit_session_opener(owner, layout, policy, start_percent, end_percent)
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, owner, outer_sample_wrapper(owner, opener, node_id))
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, owner, _apply_model_wrapper(owner))
    return patched


def _has_gate_patch(model) -> bool:
    patches = model.model_options.get("transformer_options", {}).get("patches", {})
    return any(entry[0] is UnitGate for entry in patches.get("forward_timestep_embed_patch", []))


def diffusion_model_of(model) -> Any:
    return model.get_model_object("diffusion_model")
