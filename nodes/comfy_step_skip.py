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

import uuid
from typing import Callable

from comfy.patcher_extension import WrappersMP

from ..core.methods.adaptive import AdaptiveConfig, AdaptivePolicy
from ..core.session import CacheSession
from ..core.streams import SINGLE_STREAM
from ..core.units import call_unit_map
from .comfy_host import SESSIONS_KEY, open_run_session, outer_sample_wrapper
from .comfy_schedule import RunSchedule


def _predict_noise_wrapper(owner: str) -> Callable:
    def wrapper(executor, x, timestep, model_options={}, seed=None):
        sessions = model_options.get("transformer_options", {}).get(SESSIONS_KEY, {})
        session = sessions.get(owner)
        if session is None or session.closed:
            return executor(x, timestep, model_options, seed)
        guider = executor.class_obj
        sigma = float(timestep.flatten()[0])
        latent = guider.inner_model.model_sampling.calculate_input(timestep, x)
        sigma_b = timestep.reshape((-1,) + (1,) * (x.ndim - 1)).to(x.dtype)

        def encode(denoised):      # the noise: re-applied at a reused call's own x and sigma
            return (x - denoised) / sigma_b if sigma > 0 else None

        def decode(eps):
            return x - sigma_b * eps if sigma > 0 and eps.shape == x.shape else None

        with session.call_scope(sigma=sigma, layout=SINGLE_STREAM, samples=x.shape[0]) as call:
            return session.run_call(call, lambda: executor(x, timestep, model_options, seed), probe=latent,
                                    encode=encode, decode=decode, peers=sessions.values())
    return wrapper


def install_step_skip(model, config: AdaptiveConfig | None = None, node_id: str | None = None, policy=None):
    """Patch a clone of `model` (a ModelPatcher) with a call-level policy (AdaptiveDiffusion by
    default, from `config`). Returns the clone."""
    patched = model.clone()
    policy = policy if policy is not None else AdaptivePolicy(config)
    owner = f"cachekit.{policy.name}.{uuid.uuid4().hex[:12]}"
    units = call_unit_map(type(patched.model).__name__)

    def open_session(guider, sigmas, run: RunSchedule) -> CacheSession:
        return open_run_session(owner, units, policy, run, range(run.num_steps))

    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, owner, outer_sample_wrapper(owner, open_session, node_id))
    patched.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, owner, _predict_noise_wrapper(owner))
    return patched
