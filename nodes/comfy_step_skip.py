"""ComfyUI host for whole-step skipping (AdaptiveDiffusion), at the sampler's noise prediction.

A PREDICT_NOISE wrapper sits outside CFG, ControlNet and every model patch: on a skipped step
nothing below it runs, neither CFG branch nor any ControlNet, nor a DeepCache / FORA unit.

What is reused is the noise, eps = (x - denoised) / sigma, of the last call that ran; a skipped
call returns x - sigma * eps at its own x and sigma. For eps-prediction models this is exactly
the official "reuse the previous noise prediction"; for flow models eps is the velocity.
The rule watches the latent the model sees (model_sampling.calculate_input, i.e. the
variance-preserving latent for SD-style models, as the official diffusers pipeline has it).
"""
from __future__ import annotations

import time
import uuid
from typing import Callable

from comfy.patcher_extension import WrappersMP

from ..core.clock import StepClock
from ..core.methods.adaptive import AdaptiveConfig
from ..core.step_skip import StepSkipSession
from .comfy_host import SESSIONS_KEY, outer_sample_wrapper

_NOISE = "noise"


def _predict_noise_wrapper(owner: str) -> Callable:
    def wrapper(executor, x, timestep, model_options={}, seed=None):
        sessions = model_options.get("transformer_options", {}).get(SESSIONS_KEY, {})
        session = sessions.get(owner)
        if session is None or session.closed:
            return executor(x, timestep, model_options, seed)
        guider = executor.class_obj
        sigma = float(timestep.flatten()[0])
        latent = guider.inner_model.model_sampling.calculate_input(timestep, x)
        step, compute = session.begin_call(sigma, latent)
        sigma_b = timestep.reshape((-1,) + (1,) * (x.ndim - 1)).to(x.dtype)
        eps = session.stored(_NOISE)
        if not compute and sigma > 0 and eps is not None and eps.shape == x.shape:
            session.record(step, x.shape[0], reused=True)
            for other in sessions.values():
                if other is not session and hasattr(other, "note_step_skipped"):
                    other.note_step_skipped(sigma)
            return x - sigma_b * eps
        started = time.perf_counter()
        denoised = executor(x, timestep, model_options, seed)
        if sigma > 0:
            session.store(_NOISE, (x - denoised) / sigma_b)
        session.record(step, x.shape[0], reused=False, seconds=time.perf_counter() - started)
        return denoised
    return wrapper


def install_step_skip(model, config: AdaptiveConfig, node_id: str | None = None):
    """Patch a clone of `model` (a ModelPatcher) with adaptive step skipping. Returns the clone."""
    patched = model.clone()
    owner = f"cachekit.AdaptiveDiffusion.{uuid.uuid4().hex[:12]}"
    family = type(patched.model).__name__

    def open_session(guider, sigmas) -> StepSkipSession:
        return StepSkipSession(owner, config, StepClock(sigmas.tolist()), family)

    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, owner, outer_sample_wrapper(owner, open_session, node_id))
    patched.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, owner, _predict_noise_wrapper(owner))
    return patched
