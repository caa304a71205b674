"""Autotune (CacheKit): calibration samplings of the user's own graph inputs choose a method's settings."""
from __future__ import annotations

import time

import comfy.sample
import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..core.autotune import METHODS, TARGETS, autotune, check_method, ladders
from ..core.methods import registry
from ..core.methods.registry import FITS_TEXT
from . import history
from .method_nodes import CATEGORY, PATCH_NODE, Settings, _node_id, apply_method, method_layout


def _candidate_ladders(method: str, model) -> list[list[dict]]:
    """The method's autotune ladders for this model (DeepCache: the branches its U-Net has)."""
    spec = registry.get(method)
    return ladders(method, method_layout(spec, model).units if spec.level == "unit" else None)


def _method_tooltip() -> str:
    return " ".join(f"{key}: {FITS_TEXT[registry.get(key).fits]}." for key in METHODS)


class CacheKitAutotune(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CacheKitAutotune",
            display_name="Autotune (CacheKit)",
            category=CATEGORY,
            description=("Runs a few calibration samplings with your model, prompt and sampler, and picks the method's "
                         "settings: the fastest that keeps PSNR vs. uncached above the target, or the best quality at "
                         "the target speedup. Outputs the patched model, the settings (for a method node's 'settings' "
                         "input) and a report. With a VAE, PSNR is measured on decoded images, else on latents."),
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image", tooltip="Calibration latent; a small batch keeps tuning quick."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS),
                io.Combo.Input("method", options=list(METHODS), default="deepcache",
                               tooltip=_method_tooltip()),
                io.Combo.Input("target", options=list(TARGETS), default="psnr",
                               tooltip="psnr: minimum PSNR vs. uncached (dB). speedup: minimum measured speedup."),
                io.Float.Input("target_value", default=30.0, min=1.0, max=100.0, step=0.1),
                io.Int.Input("max_trials", default=12, min=1, max=48, tooltip="Most candidate settings to try."),
                io.Vae.Input("vae", optional=True, tooltip="Measure PSNR on decoded images."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the chosen settings."),
                Settings.Output(display_name="settings", tooltip="Connect to the matching CacheKit method node."),
                io.String.Output(display_name="report"),
            ],
            **PATCH_NODE,
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, method,
                target, target_value, max_trials, vae=None) -> io.NodeOutput:
        # Fail on unsupported models now, before any sampling (apply_method raises the clear error).
        check_method(method)
        apply_method(method, model, {})
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        last_ideal = {"value": None}

        def sample(settings: dict | None):
            patched = model if settings is None else apply_method(method, model, settings)
            start = time.perf_counter()
            out = comfy.sample.sample(patched, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                      denoise=1.0, noise_mask=latent_image.get("noise_mask"), disable_pbar=True, seed=seed)
            if vae is not None:
                out = vae.decode(out)
            out = out.float().cpu()            # also waits for the device, so the timing is complete
            seconds = time.perf_counter() - start
            run = history.last() if settings is not None else None
            last_ideal["value"] = run.ideal_speedup() if run is not None else None
            return out, seconds

        bar = comfy.utils.ProgressBar(1)
        candidate_ladders = _candidate_ladders(method, model)
        result = autotune(sample, method, target, target_value, data_range=1.0 if vae is not None else None,
                          max_trials=max_trials, candidate_ladders=candidate_ladders,
                          ideal_speedup=lambda: last_ideal["value"],
                          progress=lambda done, total: bar.update_absolute(done, total))
        chosen = apply_method(method, model, result.settings, _node_id(cls))
        return io.NodeOutput(chosen, {"method": method, "settings": result.settings, "tune": result.as_dict()},
                             result.report())
