"""Train Router (CacheKit): train an L2C / HarmoniCa router for the connected model, image-free.

The training runs inside ComfyUI's own sampling (a custom sampler given to sample_custom), so
conditioning, CFG and model loading are ComfyUI's. Gradients only reach the router's logits,
but they flow through the model: the model is trained on a copy of its diffusion model made
outside inference mode (ComfyUI executes nodes in inference mode, whose tensors autograd
cannot use), attached to a clone of the MODEL by an object patch; the copy is dropped after.
`reuse` (optional, last): the reuse strategy the router is trained for; the router records it
and the Learned Router node runs it by default (core/routers/train.py).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..core.methods.registry import reuse_setting
from ..core.methods.router import RouterPolicy
from ..core.reuse import STRATEGIES
from ..core.routers import save_router
from ..core.routers.train import Sampler, TrainConfig, load_checkpoint, train_units
from .comfy_host import diffusion_model_of, install
from .comfy_units import FORA_BLOCK_FAMILIES_TEXT, FORA_SUBLAYER_FAMILIES_TEXT, dit_layout
from .method_nodes import CATEGORY, PATCH_NODE, _node_id
from .router_node import FOLDER, register_folder

_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


MAX_NAME = 100     # with ".ckpt.pt" well inside every file system's 255-byte limit


def _output_path(name: str) -> str:
    """Checked before any training: a name that cannot be saved must not cost a training run."""
    shown = name if len(name) <= 40 else name[:37] + "..."
    if not name or set(name) - _NAME_OK or name.startswith(".") or ".." in name:
        raise ValueError(f"router_name {shown!r}: use letters, digits, '_', '-' and '.' (not first), no folders.")
    if len(name) > MAX_NAME:
        raise ValueError(f"router_name is {len(name)} characters long; use at most {MAX_NAME}.")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    register_folder()
    folder = folder_paths.get_folder_paths(FOLDER)[0]
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


def _soft_block(holder: dict, index: int):
    """A patches_replace["dit"] entry that routes a whole block softly during training."""
    def replace(args: dict, extra: dict) -> dict:
        # A copy of the inputs made before the block runs: Flux / Chroma / HunyuanVideo blocks
        # update them in place (`txt += ...`, `x += ...`), which would leave a zero residual.
        before = {k: args[k].clone() for k in ("img", "txt") if isinstance(args.get(k), torch.Tensor)}
        fresh = extra["original_block"](args)
        # MMDiT's last block returns no text stream: route only the streams that come back.
        keys = [k for k in before if fresh.get(k) is not None]
        unit_input = {k: before[k] for k in keys}
        return {**fresh, **holder["soft"].apply(index, {k: fresh[k] for k in keys}, unit_input)}
    return replace


def _trainable_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy whose parameters and buffers are ordinary tensors (usable by autograd)."""
    with torch.inference_mode(False):
        twin = copy.deepcopy(module)
        for sub in twin.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[name] = b.detach().clone()
    return twin


class CacheKitTrainRouter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CacheKitTrainRouter",
            display_name="Train Router (CacheKit)",
            category=CATEGORY,
            description=("Trains a learned router for this model, prompt and step count, without images: HarmoniCa's "
                         "step-wise denoising training with its image error proxy, or the Learning-to-Cache objective. "
                         f"Saves it to models/{FOLDER}/ and outputs the model with it applied. Sampler: Euler steps "
                         "on the chosen scheduler's sigmas. Per block on "
                         f"{FORA_BLOCK_FAMILIES_TEXT}; per sub-layer (attention, MLP) on the other DiTs: "
                         f"{FORA_SUBLAYER_FAMILIES_TEXT}."),
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image", tooltip="Its batch is the training batch."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff),
                io.Int.Input("steps", default=20, min=2, max=200, tooltip="The step count the router is for."),
                io.Float.Input("cfg", default=4.5, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS),
                io.Combo.Input("method", options=["harmonica", "l2c"], default="harmonica"),
                io.Int.Input("iterations", default=100, min=1, max=100000,
                             tooltip="harmonica: whole trajectories; l2c: single routed steps."),
                io.Float.Input("l1", default=1e-4, min=0.0, max=1.0, step=1e-5, round=1e-6,
                               tooltip="Pressure towards reuse; higher = faster, lower quality."),
                io.Float.Input("lr", default=0.01, min=1e-5, max=1.0, step=1e-4, round=1e-5),
                io.String.Input("router_name", default="my_router"),
                io.Boolean.Input("resume", default=False, optional=True,
                                 tooltip="Continue from this router's checkpoint (<router_name>.ckpt.pt, written every "
                                         "20 iterations and at the end) up to `iterations` in all."),
                io.Combo.Input("reuse", options=list(STRATEGIES), default="hold", optional=True,
                               tooltip=f"{reuse_setting().tooltip} The router is trained for it and records it."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the trained router."), io.String.Output(display_name="report")],
            **PATCH_NODE,
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, scheduler, method, iterations, l1, lr,
                router_name, resume=False, reuse="hold") -> io.NodeOutput:
        path = _output_path(router_name)
        checkpoint = Path(path).with_suffix(".ckpt.pt")
        layout = dit_layout(diffusion_model_of(model))
        if resume and checkpoint.exists():     # refuse a bad checkpoint now, not deep inside sampling
            load_checkpoint(checkpoint, steps, len(layout.units.units), reuse)
        trainee = model.clone()
        twin = _trainable_copy(diffusion_model_of(model))
        trainee.add_object_patch("diffusion_model", twin)
        # Sub-layers (PixArt, Wan, Lumina 2, ...) are modules (forward hooks); whole blocks (SD3,
        # Flux, HunyuanVideo, ...) are reached through patches_replace["dit"] and
        # trained as residual units.
        modules = [trainee.get_model_object(slot.path) if slot.how == "proxy" else None for slot in layout.slots]
        holder = {}
        for index, slot in enumerate(layout.slots):
            if slot.how == "dit":
                key, number = slot.dit_key
                trainee.set_model_patch_replace(_soft_block(holder, index), "dit", key, number)
        kinds = [u.kind for u in layout.units.units]
        config = TrainConfig(method, steps, iterations, int(latent_image["samples"].shape[0]), lr, l1, 0.5, seed=seed,
                             reuse=reuse)
        bar = comfy.utils.ProgressBar(iterations)
        result = {}

        def sampler_function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
            extra_args = extra_args or {}
            model_sampling = model_k.inner_model.inner_model.model_sampling
            s_in = x.new_ones([x.shape[0]])

            def start(g, batch):
                noise = torch.randn(x.shape, generator=g).to(x)
                return model_sampling.noise_scaling(sigmas[0], noise, torch.zeros_like(x), True), None

            def predict(xk, k, cond):
                # Flux and Chroma blocks update activations in place (`x += ...`) after using them;
                # tensors kept for the backward pass are copied when kept, so those updates
                # cannot corrupt them (costs memory, only while training).
                with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda t: t):
                    return model_k(xk, sigmas[k] * s_in, **extra_args)

            def step(denoised, k, xk):
                sigma, following = sigmas[k], sigmas[k + 1]
                return xk + (xk - denoised) / sigma * (following - sigma)

            sampler = Sampler(len(sigmas) - 1, start, predict, step)
            with torch.inference_mode(False), torch.enable_grad():
                result["router"] = train_units(modules, kinds, sampler, config, family=layout.units.family,
                                               progress=lambda done, total, loss: bar.update_absolute(done, total),
                                               timesteps=[float(s) for s in sigmas[:-1]],
                                               on_units=lambda soft: holder.__setitem__("soft", soft),
                                               checkpoint=checkpoint, resume=resume)
            return x

        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
        comfy.sample.sample_custom(trainee, noise, cfg, comfy.samplers.KSAMPLER(sampler_function), sigmas, positive,
                                   negative, latent, disable_pbar=True, seed=seed)
        router = result["router"]
        router.sampler = f"euler/{scheduler}"
        save_router(router, path)
        policy = RouterPolicy(router)
        patched = install(model, layout, policy, 0.0, 1.0, _node_id(cls))
        recompute = router.recompute().float().mean().item()
        report = (f"Trained a {method} router for {layout.units.family}: {steps} steps x {router.num_units} sub-layers, "
                  f"{iterations} iterations, reuse {router.reuse}; it recomputes {recompute:.0%} of routed sub-layers. "
                  f"Saved as {os.path.basename(path)} (models/{FOLDER}/).")
        return io.NodeOutput(patched, report)
