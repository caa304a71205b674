"""The learned forecast (core/learned_forecast.py) and its scan (bench/learned_forecast.py): untrained it
is exactly the baseline it is measured against (diffusers TaylorSeer lite, and AdaptiveDiffusion at
N=2), training moves it, a saved file gives the trained images through cachekit.apply_adaptive_skip,
and bad files or settings are refused with the fix."""
import pytest
import torch

from cachekit.bench import harness
from cachekit.bench.learned_forecast import ForecastSkipper, _batches, skip_pattern, train
from cachekit.bench.methods import _copy, cachekit_method, diffusers_taylorseer_lite
from cachekit.core.learned_forecast import LearnedForecast, load_learned_forecast, save_learned_forecast
from cachekit.core.quality import psnr
from cachekit.diffusers_host.step_skip import apply_adaptive_skip
from cachekit.tinymodels.bundled import DIT_FORECAST, load
from cachekit.tinymodels.sampling import make_scheduler, sample
from cachekit.tinymodels.shapes import NUM_CLASSES

STEPS = 12


def test_the_pattern_is_taylorseer_lites_schedule():
    assert skip_pattern(2) == "FFFF" + "SF" * 10 + "S"
    assert skip_pattern(3) == "FFFFSF" + "SSF" * 6 + "S"
    assert skip_pattern(3, steps=8, warmup=5) == "FFFFFSFS"


def test_untrained_corrections_give_taylorseer_lite_and_adaptive_diffusion_images():
    base, labels = load("dit"), torch.arange(2)
    for interval in (2, 3):
        skipper = ForecastSkipper(base, skip_pattern(interval, steps=STEPS))
        ours = sample(skipper, labels, steps=STEPS, cfg=3.0, seed=0, scheduler=make_scheduler(STEPS))
        lite = harness._run(harness._install(diffusers_taylorseer_lite(interval, 2, 4), base, STEPS), base, labels,
                            STEPS, 3.0, 0)
        torch.testing.assert_close(ours, lite, rtol=0, atol=1e-5)
    adaptive = cachekit_method("adaptive", delta=1.0, max_skip_steps=1, reuse="forecast2")
    every_other = harness._run(harness._install(adaptive, base, STEPS), base, labels, STEPS, 3.0, 0)
    skipper = ForecastSkipper(base, skip_pattern(2, steps=STEPS))
    ours = sample(skipper, labels, steps=STEPS, cfg=3.0, seed=0, scheduler=make_scheduler(STEPS))
    torch.testing.assert_close(ours, every_other, rtol=0, atol=1e-5)
    reference = sample(base, labels, steps=STEPS, cfg=3.0, seed=0, scheduler=make_scheduler(STEPS))
    assert not torch.allclose(ours, reference, atol=1e-3)      # steps were skipped


def test_training_lowers_the_calibration_error_and_only_moves_the_corrections():
    base = load("dit")
    batches = _batches(2, 1000)
    weights = {k: v.clone() for k, v in base.model.state_dict().items()}
    for p in base.model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        references = [sample(base, labels, steps=25, cfg=3.0, seed=seed) for labels, seed in batches]
    skipper = ForecastSkipper(base, skip_pattern(2))
    losses = train(skipper, batches, references, iters=4, lr=1e-3)
    assert min(losses[1:]) < losses[0]
    assert skipper.corrections.abs().sum() > 0
    assert all(torch.equal(weights[k], v) for k, v in base.model.state_dict().items())



# -- the product path: a saved forecast through cachekit.apply_adaptive_skip --

def _adaptive_images(base, labels, steps, **kwargs):
    d, scheduler = _copy(base), make_scheduler(steps)
    handle = apply_adaptive_skip(d.network, delta=1.0, max_skip_steps=1, reuse="forecast2", scheduler=scheduler,
                                 **kwargs)
    try:
        return sample(d, labels, steps=steps, cfg=3.0, seed=0, scheduler=scheduler), handle.finish_run()
    finally:
        handle.remove()


def test_a_saved_forecast_gives_the_trained_images_through_the_diffusers_api(tmp_path):
    base, labels = load("dit"), torch.arange(2)
    skipper = ForecastSkipper(base, skip_pattern(2, steps=STEPS), model="bundled dit")
    with torch.no_grad():
        skipper.corrections.normal_(0, 0.02)        # stands in for training: any corrections
        trained = sample(skipper, labels, steps=STEPS, cfg=3.0, seed=0, scheduler=make_scheduler(STEPS))
    path = save_learned_forecast(skipper.forecast, tmp_path / "f.safetensors")
    ours, telemetry = _adaptive_images(base, labels, STEPS, learned_forecast=path)
    torch.testing.assert_close(ours, trained, rtol=0, atol=1e-5)
    plain, _ = _adaptive_images(base, labels, STEPS)
    assert (ours - plain).abs().max() > 1e-3                     # the corrections acted
    assert telemetry.hit_rate == pytest.approx(skip_pattern(2, steps=STEPS).count("S") / STEPS)


def test_corrections_act_only_where_the_computed_steps_are_the_trained_schedule():
    forecast = LearnedForecast("FFS", torch.ones(1, 2, 1), history=1, uses_latent=True)
    entry = None
    for step, value in ((0, 1.0), (1, 2.0)):
        entry = forecast.refresh(entry, torch.full((1, 1, 2, 2), value), step)
    latent = torch.full((1, 1, 2, 2), 10.0)
    # Taylor from [1, 2] gives 3; plus 1 * (last computed, 2) + 1 * latent 10.
    assert torch.equal(forecast.output(entry, 2, latent=latent), torch.full((1, 1, 2, 2), 15.0))
    other = forecast.refresh(None, torch.full((1, 1, 2, 2), 2.0), 1)      # step 0 was not computed
    assert torch.equal(forecast.output(other, 2, latent=latent), torch.full((1, 1, 2, 2), 2.0))


def test_bad_forecast_files_and_settings_are_refused_with_the_fix(tmp_path):
    from safetensors.torch import save_file
    with pytest.raises(FileNotFoundError, match="not found"):
        load_learned_forecast(tmp_path / "missing.safetensors")
    save_file({"logits": torch.zeros(2, 2)}, str(tmp_path / "router.safetensors"), metadata={"format": "x"})
    with pytest.raises(ValueError, match="not a CacheKit learned forecast"):
        load_learned_forecast(tmp_path / "router.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(ValueError, match="text.safetensors is a text file"):
        load_learned_forecast(tmp_path / "text.safetensors")
    (tmp_path / "damaged.safetensors").write_bytes((tmp_path / "router.safetensors").read_bytes()[:40])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_learned_forecast(tmp_path / "damaged.safetensors")
    with pytest.raises(ValueError, match="schedule"):
        LearnedForecast("SFF", torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="shaped"):
        LearnedForecast("FFS", torch.zeros(2, 4, 3))
    path = save_learned_forecast(LearnedForecast("F" * 4 + "SF" * 4, torch.zeros(4, 4, 3)), tmp_path / "f.safetensors")
    base = load("dit")
    with pytest.raises(ValueError, match="corrects reuse='forecast2'"):
        apply_adaptive_skip(_copy(base).network, reuse="hold", learned_forecast=path)
    with pytest.raises(ValueError, match="trained for 12 steps; the run has 8"):
        _adaptive_images(base, torch.arange(1), 8, learned_forecast=path)
    with pytest.raises(ValueError, match="trained for 12 steps; the run has 30"):      # known up front
        apply_adaptive_skip(_copy(base).network, reuse="forecast2", learned_forecast=path, num_inference_steps=30)


def test_the_bundled_dit_forecast_beats_the_taylor_rule_on_the_bench_images():
    forecast = load_learned_forecast(DIT_FORECAST)
    assert forecast.schedule == skip_pattern(2) and forecast.corrections.abs().sum() > 0
    base, labels = load("dit"), torch.arange(12) % NUM_CLASSES
    reference = sample(base, labels, steps=25, cfg=3.0, seed=0, scheduler=make_scheduler(25))
    learned, _ = _adaptive_images(base, labels, 25, learned_forecast=DIT_FORECAST)
    taylor, _ = _adaptive_images(base, labels, 25)
    assert psnr(reference, learned) > psnr(reference, taylor) + 0.5


def test_apply_learned_forecast_runs_the_files_own_schedule(tmp_path):
    # At N=3 TaylorSeer's schedule (one skip after the warm-up) is not one AdaptiveDiffusion makes;
    # apply_learned_forecast follows the file's schedule and gives the trained images.
    from cachekit import apply_learned_forecast
    base, labels = load("dit"), torch.arange(2)
    skipper = ForecastSkipper(base, skip_pattern(3, steps=STEPS))
    with torch.no_grad():
        skipper.corrections.normal_(0, 0.02)
        trained = sample(skipper, labels, steps=STEPS, cfg=3.0, seed=0, scheduler=make_scheduler(STEPS))
    path = save_learned_forecast(skipper.forecast, tmp_path / "n3.safetensors")
    d, scheduler = _copy(base), make_scheduler(STEPS)
    handle = apply_learned_forecast(d.network, path, scheduler=scheduler)
    ours = sample(d, labels, steps=STEPS, cfg=3.0, seed=0, scheduler=scheduler)
    telemetry = handle.finish_run()
    torch.testing.assert_close(ours, trained, rtol=0, atol=1e-5)
    assert telemetry.skipped_steps == [s for s, c in enumerate(skip_pattern(3, steps=STEPS)) if c == "S"]
    with pytest.raises(ValueError, match="already has step skipping"):
        apply_learned_forecast(d.network, path)
    handle.remove()
    d2 = _copy(base)
    with pytest.raises(ValueError, match="trained for 12 steps; the run has 8"):
        apply_learned_forecast(d2.network, path, num_inference_steps=8)
    handle = apply_learned_forecast(d2.network, path, scheduler=make_scheduler(8))
    with pytest.raises(ValueError, match="trained for 12 steps; the run has 8"):
        sample(d2, labels, steps=8, cfg=3.0, seed=0, scheduler=make_scheduler(8))
    handle.remove()
