"""The learned-forecast scan (bench/learned_forecast.py): untrained it is exactly the baseline it is
measured against (diffusers TaylorSeer lite, and AdaptiveDiffusion at N=2), and training moves it."""
import torch

from cachekit.bench import harness
from cachekit.bench.learned_forecast import ForecastSkipper, _batches, skip_pattern, train
from cachekit.bench.methods import cachekit_method, diffusers_taylorseer_lite
from cachekit.tinymodels.bundled import load
from cachekit.tinymodels.sampling import make_scheduler, sample

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
