"""Autotune: ladder walking, the choice rule, and a real tune on a tiny diffusers U-Net."""
import math

import pytest
import torch

import tiny_diffusers as td
from cachekit import apply_deepcache, autotune_diffusers
from cachekit.core.autotune import NO_CACHING, Trial, autotune, choose, ladders
from cachekit.core.quality import psnr


def _fake_sampler(quality, cost):
    """quality(settings) -> noise level of the output, cost(settings) -> seconds (reference: 1 s)."""
    calls = []
    reference = torch.linspace(-1, 1, 64)

    def sample(settings):
        calls.append(settings)
        if settings is None:
            return reference.clone(), 1.0
        g = torch.Generator().manual_seed(0)
        return reference + quality(settings) * torch.randn(64, generator=g), cost(settings)
    return sample, calls


def _interval(s):
    return s.get("interval", s.get("cache_interval", 1))


def test_psnr_target_stops_each_ladder_after_the_first_miss_and_picks_the_fastest_that_meets_it():
    sample, calls = _fake_sampler(lambda s: 0.002 * _interval(s) ** 2 * (1 + s["start_percent"] * 5),
                                  lambda s: 0.3 + 0.7 / _interval(s))
    result = autotune(sample, "fora", "psnr", 30.0, data_range=2.0)
    by_ladder = {}
    for trial in result.trials:
        by_ladder.setdefault((trial.settings["start_percent"], trial.settings["reuse"]), []).append(trial)
    assert list(by_ladder) == [(0.0, "hold"), (0.0, "forecast1"), (0.0, "forecast2"), (0.12, "forecast1"),
                               (0.12, "forecast2"), (0.2, "hold")]
    for trials in by_ladder.values():
        # every trial but the last meets the target; the last one is the first miss
        assert all(t.psnr >= 30 for t in trials[:-1]) and trials[-1].psnr < 30
    assert result.met and result.chosen.psnr >= 30
    assert result.chosen.speedup == max(t.speedup for t in result.trials if t.psnr >= 30)
    assert calls[0] is None and calls[1] is None and calls[-1] is None     # warm-up, reference, re-time
    assert result.settings == result.chosen.settings
    assert "chosen: interval=" in result.report()


def test_speedup_target_takes_the_best_quality_that_is_fast_enough():
    sample, _ = _fake_sampler(lambda s: 0.001 * _interval(s), lambda s: 1.0 / _interval(s) ** 0.5)
    result = autotune(sample, "fora", "speedup", 1.9, data_range=2.0)
    assert result.met
    assert result.chosen.speedup >= 1.9
    assert _interval(result.chosen.settings) == 4           # sqrt(4) = 2 >= 1.9, the gentlest such
    # each ladder stopped at its first fast-enough setting
    assert [_interval(t.settings) for t in result.trials] == [2, 3, 4, 3, 4, 3, 4, 2, 3, 4, 2, 3, 4, 2, 3, 4]


def test_unreachable_targets_are_reported_not_hidden():
    trials = [Trial({"interval": 2}, 25.0, 1.5, 1.0), Trial({"interval": 3}, 20.0, 1.8, 1.0)]
    assert choose(trials, "psnr", 30.0) == (None, False)
    chosen, met = choose(trials, "speedup", 3.0)
    assert chosen.settings == {"interval": 3} and not met
    # a trial that skipped no work (ideal speedup 1) never counts, however lucky its timing
    lucky = [Trial({"interval": 2}, math.inf, 1.05, 1.0, ideal_speedup=1.0)]
    assert choose(lucky, "psnr", 30.0) == (None, False)


def test_bad_targets_give_clear_errors():
    sample, _ = _fake_sampler(lambda s: 0.0, lambda s: 1.0)
    with pytest.raises(ValueError, match="speedup target must be > 1"):
        autotune(sample, "fora", "speedup", 0.5)
    with pytest.raises(ValueError, match="target must be one of"):
        autotune(sample, "fora", "ssim", 0.9)
    with pytest.raises(ValueError, match="unknown method"):
        ladders("tomesd")
    assert set(NO_CACHING) == {"deepcache", "fora", "adaptive", "change"}


def test_tune_on_a_diffusers_unet_returns_settings_that_reproduce_the_measurement():
    model = td.unet()
    sched = td.scheduler(10)

    def run():
        return torch.stack(td.sample("unet", model, sched))
    reports = []
    result = autotune_diffusers(model, run, method="deepcache", target_kind="psnr", value=20.0, scheduler=sched,
                                max_trials=4, progress=lambda done, total: reports.append((done, total)))
    assert len(result.trials) == 4 and reports[-1][0] == reports[-1][1]
    assert all(t.ideal_speedup is not None and t.ideal_speedup > 1 for t in result.trials)
    assert "forward" not in model.__dict__ and not hasattr(model, "_cachekit_handle")   # nothing left applied
    reference = run()
    handle = apply_deepcache(model, **result.trials[0].settings, scheduler=sched)
    again = run()
    handle.remove()
    assert psnr(reference, again, float(reference.max() - reference.min())) == pytest.approx(result.trials[0].psnr)


def test_cli_tunes_a_pipeline_saved_on_disk(tmp_path, capsys):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
    from cachekit.bench.autotune_cli import main
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
                                        sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=8, sample_size=8)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    result = main(["--pipeline", str(tmp_path / "pipe"), "--class-labels", "3", "--method", "fora",
                   "--target-speedup", "1.1", "--steps", "8", "--max-trials", "2", "--json", str(tmp_path / "t.json")])
    assert 1 <= len(result.trials) <= 2
    assert all(t.ideal_speedup > 1 for t in result.trials)
    assert "Autotune fora for speedup >= 1.1x" in capsys.readouterr().out
    assert (tmp_path / "t.json").exists()
