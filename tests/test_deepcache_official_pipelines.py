"""apply_deepcache on real diffusers SD pipelines equals the official DeepCacheSDHelper bit for bit,
also where the step count is not simply "calls so far": img2img (the first call is part-way into
scheduler.timesteps) and schedulers that repeat timesteps (Heun) or interleave midpoints (KDPM2).
Tiny random components, no text encoder (embeddings are passed in), 32 px."""
from __future__ import annotations

import copy

import pytest
import torch

from cachekit import apply_deepcache

diffusers = pytest.importorskip("diffusers")
DeepCache = pytest.importorskip("DeepCache", reason="the official DeepCache package is not installed")

STEPS, INTERVAL = 10, 3
# Tiny pipelines built from default configs: diffusers warns about every one (steps_offset, ...).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                  latent_channels=4, norm_num_groups=8).eval()
    g = torch.Generator().manual_seed(1)
    return unet, vae, torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g), \
        torch.rand(1, 3, 32, 32, generator=g)


SCHEDULERS = {"ddim": "DDIMScheduler", "heun": "HeunDiscreteScheduler", "kdpm2": "KDPM2DiscreteScheduler"}


def _pipeline(parts, kind, scheduler):
    unet, vae = parts[0], parts[1]
    cls = diffusers.StableDiffusionImg2ImgPipeline if kind == "img2img" else diffusers.StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=None, tokenizer=None, unet=copy.deepcopy(unet),
               scheduler=getattr(diffusers, SCHEDULERS[scheduler])(), safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, parts, kind):
    kwargs = dict(prompt_embeds=parts[2], negative_prompt_embeds=parts[3], num_inference_steps=STEPS,
                  guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pt")
    kwargs.update(image=parts[4], strength=0.6) if kind == "img2img" else kwargs.update(height=32, width=32)
    with torch.no_grad():
        return pipe(**kwargs).images


@pytest.mark.parametrize("kind, scheduler", [("txt2img", "ddim"), ("img2img", "ddim"), ("txt2img", "heun"),
                                             ("img2img", "heun"), ("img2img", "kdpm2")])
def test_images_equal_the_official_helper(parts, kind, scheduler):
    official_pipe = _pipeline(parts, kind, scheduler)
    helper = DeepCache.DeepCacheSDHelper(pipe=official_pipe)
    helper.set_params(cache_interval=INTERVAL, cache_branch_id=0)
    helper.enable()
    official = _sample(official_pipe, parts, kind)
    helper.disable()

    pipe = _pipeline(parts, kind, scheduler)
    handle = apply_deepcache(pipe, cache_interval=INTERVAL, cache_branch=0)
    ours = _sample(pipe, parts, kind)
    run = handle.finish_run()
    handle.remove()
    assert run.hit_rate > 0                               # the comparison is not between two uncached runs
    assert torch.equal(ours, official)


def test_img2img_counts_the_schedule_from_the_first_call(parts):
    pipe = _pipeline(parts, "img2img", "ddim")
    handle = apply_deepcache(pipe, cache_interval=INTERVAL, cache_branch=0)
    _sample(pipe, parts, "img2img")
    run = handle.finish_run()
    handle.remove()
    first = STEPS - int(STEPS * 0.6)                     # strength 0.6 skips the first 4 timesteps
    ran = [s for s, row in enumerate(run.computed) if sum(row) + sum(run.reused[s]) > 0]
    full = [s for s in ran if sum(run.reused[s]) == 0]
    assert ran == list(range(first, STEPS)) and full == [first, first + 3]


def test_a_unet_the_official_helper_was_enabled_on_before_is_cached(parts):
    # Regression: DeepCacheSDHelper.disable() leaves `block.forward = <the block's own bound forward>`
    # on every block; the proxies copied it, so nothing was cached (hit rate 0, image uncached).
    pipe = _pipeline(parts, "txt2img", "ddim")
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=INTERVAL, cache_branch_id=0)
    helper.enable()
    helper.disable()
    reference = _sample(_pipeline(parts, "txt2img", "ddim"), parts, "txt2img")
    handle = apply_deepcache(pipe, cache_interval=INTERVAL, cache_branch=0)
    cached = _sample(pipe, parts, "txt2img")
    run = handle.finish_run()
    handle.remove()
    assert run.hit_rate > 0 and not torch.equal(cached, reference)


def test_a_block_with_a_foreign_forward_is_refused_not_silently_uncached(parts):
    pipe = _pipeline(parts, "txt2img", "ddim")
    block = pipe.unet.down_blocks[0].resnets[0]
    block.forward = lambda *args, **kwargs: type(block).forward(block, *args, **kwargs)   # e.g. an offload hook
    with pytest.raises(ValueError, match="its own `forward` set by another tool"):
        apply_deepcache(pipe, cache_interval=INTERVAL)
