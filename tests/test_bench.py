"""Benchmark harness pieces: metrics, a tiny end-to-end run, and CacheKit vs. the official DeepCache."""
import pytest
import torch

from cachekit.bench import harness
from cachekit.core import quality as metrics
from cachekit.bench.methods import (cachekit_adaptive, cachekit_deepcache, cachekit_fora, cachekit_router,
                                    official_deepcache)
from cachekit.tinymodels.bundled import load
from cachekit.tinymodels.sampling import make_scheduler, sample


def test_psnr_and_ssim():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert metrics.psnr(x, x) == float("inf")
    assert metrics.psnr(x, x + 0.02) == pytest.approx(40.0, abs=0.01)    # 0.01 RMS in [0, 1] units
    assert metrics.psnr(x, x + 0.02, data_range=0.2) == pytest.approx(20.0, abs=0.01)
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    slightly, badly = x + 0.05 * torch.randn_like(x), x + 0.5 * torch.randn_like(x)
    assert 1.0 > metrics.ssim(x, slightly) > metrics.ssim(x, badly)


def test_tiny_benchmark_run_reports_every_metric():
    rows = harness.bench_model("dit", [cachekit_fora(2)], steps=4, images=2, cfg=3.0, repeats=1)
    assert [r["method"] for r in rows] == ["uncached", "FORA"]
    fora = rows[1]
    assert 0.4 < fora["flops_executed"] < 1.0 and fora["hit_rate"] > 0
    assert fora["speedup"] > 0 and 0 < fora["psnr_db"] < 100 and -1 <= fora["ssim"] <= 1


def test_benchmark_reports_adaptive_step_skipping_with_its_skipped_work():
    rows = harness.bench_model("unet", [cachekit_adaptive(0.5, 2)], steps=12, images=2, cfg=3.0, repeats=1)
    adaptive = rows[1]
    assert adaptive["method"] == "AdaptiveDiffusion" and adaptive["hit_rate"] > 0
    # A skipped step skips the whole model call, so the FLOPs executed drop by the hit rate.
    assert adaptive["flops_executed"] == pytest.approx(1 - adaptive["hit_rate"], abs=0.01)


def test_benchmark_reports_the_bundled_router():
    from cachekit.panel.engine import BUNDLED_ROUTER
    rows = harness.bench_model("dit", [cachekit_router(BUNDLED_ROUTER)], steps=25, images=2, cfg=3.0, repeats=1)
    router = rows[1]
    assert router["method"] == "HarmoniCa" and 0 < router["hit_rate"] < 1 and router["flops_executed"] < 1


def test_cachekit_deepcache_reproduces_the_official_package_exactly():
    pytest.importorskip("DeepCache", reason="the official DeepCache package is not installed")
    base = load("unet")
    labels = torch.arange(3)
    images = {}
    for method in (cachekit_deepcache(3, 0), official_deepcache(3, 0)):
        scheduler = make_scheduler(10)
        setup = method.install(base, scheduler, 10)
        images[method.origin] = sample(setup.denoiser, labels, steps=10, scheduler=scheduler)
        setup.finish()
    reference = sample(base, labels, steps=10)
    assert torch.equal(images["CacheKit"], images["deepcache (official)"])
    assert not torch.equal(images["CacheKit"], reference)
