"""Benchmark harness pieces: metrics, a tiny end-to-end run, and CacheKit vs. the official DeepCache."""
import time

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
    rows = harness.bench_model("dit", [cachekit_fora(2)], steps=5, images=2, cfg=3.0, rounds=1, passes=1)
    assert [r["method"] for r in rows] == ["uncached", "FORA"]
    fora = rows[1]
    assert 0.4 < fora["flops_executed"] < 1.0 and fora["hit_rate"] > 0
    assert fora["speedup"] > 0 and 0 < fora["psnr_db"] < 100 and -1 <= fora["ssim"] <= 1


def test_benchmark_reports_adaptive_step_skipping_with_its_skipped_work():
    rows = harness.bench_model("unet", [cachekit_adaptive(0.5, 2)], steps=12, images=2, cfg=3.0, rounds=1, passes=1)
    adaptive = rows[1]
    assert adaptive["method"] == "AdaptiveDiffusion" and adaptive["hit_rate"] > 0
    # A skipped step skips the whole model call, so the FLOPs executed drop by the hit rate.
    assert adaptive["flops_executed"] == pytest.approx(1 - adaptive["hit_rate"], abs=0.01)


def test_benchmark_reports_the_bundled_router():
    from cachekit.panel.engine import BUNDLED_ROUTER
    rows = harness.bench_model("dit", [cachekit_router(BUNDLED_ROUTER)], steps=25, images=2, cfg=3.0, rounds=1,
                               passes=1)
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


# -- honest speed, baselines, frontier (issue 14) ---------------------------------------------
from cachekit.bench import frontier  # noqa: E402
from cachekit.bench.methods import (CACHE_DIT, FEWER_STEPS, Method, all_methods, default_fewer_steps,  # noqa: E402
                                    fewer_steps)


def _row(origin, psnr, passes, model="dit", method="M", setting="s", accuracy=0.5, **extra):
    return {"model": model, "origin": origin, "method": method, "setting": setting, "status": "ok",
            "speedup": sorted(passes)[len(passes) // 2], "speedup_passes": passes, "psnr_db": psnr,
            "accuracy": accuracy, **extra}


def test_pareto_marks_only_undominated_rows_and_keeps_ties():
    rows = [_row("CacheKit", 30.0, [1.5, 1.5], setting="a"),
            _row("CacheKit", 28.0, [1.4, 1.4], setting="dominated"),      # slower and worse than a
            _row("diffusers", 30.0, [1.5, 1.5], setting="tie"),          # same point as a: both stay
            _row("fewer steps", 20.0, [2.0, 2.0], setting="fast"),
            _row("diffusers", 20.0, [1.9, 1.9], setting="equal-quality-slower"),
            {**_row("cache-dit", 99.0, [9.0, 9.0], setting="gone"), "status": "unavailable: x", "speedup": None}]
    assert frontier.pareto(rows) == [True, False, True, True, False, False]
    assert frontier.pareto([rows[0]]) == [True]


def test_band_speed_is_conservative_for_cachekit_and_generous_for_alternatives():
    assert frontier.band_speed(_row("CacheKit", 30.0, [2.1, 1.9])) == 1.9
    assert frontier.band_speed(_row("fewer steps", 30.0, [2.1, 1.9])) == 2.1
    # The speed rule decides the frontier: a CacheKit row is dominated by its worse pass.
    rows = [_row("CacheKit", 25.0, [2.2, 1.8]), _row("diffusers", 25.0, [1.9, 1.7])]
    assert frontier.pareto(rows) == [False, True]


def test_band_summary_picks_the_best_of_each_side_and_says_none():
    rows = [_row("CacheKit", 31.0, [1.6, 1.55], setting="slow-good"),
            _row("CacheKit", 25.0, [2.3, 2.05], setting="fast"),
            _row("CacheKit", 40.0, [1.6, 1.45], setting="only-one-pass-fast"),    # lower pass < 1.5
            _row("fewer steps", 27.0, [1.4, 1.52], setting="k=16"),               # higher pass counts
            _row("diffusers", 22.0, [2.0, 2.01], setting="hook", accuracy=0.25),
            _row("-", float("inf"), [1.0, 1.0], method="uncached")]
    bands = {b["band"]: b for b in frontier.band_summary(rows)}
    assert bands[1.5]["cachekit"]["setting"] == "slow-good" and bands[1.5]["alternative"]["setting"] == "k=16"
    assert bands[1.5]["margin_db"] == pytest.approx(4.0)
    assert bands[2.0]["cachekit"]["setting"] == "fast" and bands[2.0]["alternative"]["setting"] == "hook"
    assert bands[2.0]["alternative"]["accuracy"] == 0.25 and bands[2.0]["margin_db"] == pytest.approx(3.0)
    assert bands[2.5]["cachekit"] is None and bands[2.5]["alternative"] is None and bands[2.5]["margin_db"] is None
    text = frontier.to_markdown(frontier.build(rows))
    assert "| dit | >= 2.5x | none |" in text and "higher for every alternative" in text


def test_forecast_rows_are_compared_with_fewer_steps_at_their_own_speed():
    rows = [_row("fewer steps", 30.0, [1.5, 1.5], setting="k=16"),
            _row("fewer steps", 20.0, [2.5, 2.5], setting="k=10"),
            _row("CacheKit", 27.0, [2.0, 2.1], method="FORA", setting="N=2 f1", settings={"reuse": "forecast1"}),
            _row("CacheKit", 21.0, [3.0, 3.0], method="FORA", setting="N=4 f1", settings={"reuse": "forecast1"}),
            _row("CacheKit", 29.0, [2.0, 2.0], method="FORA", setting="hold", settings={"reuse": "hold"})]
    assert frontier.fewer_steps_psnr_at(rows, "dit", 2.0) == pytest.approx(25.0)
    assert frontier.fewer_steps_psnr_at(rows, "dit", 3.0) is None          # outside the measured range
    (fora,) = frontier.forecast_summary(rows)
    assert [e["setting"] for e in fora["settings"]] == ["N=2 f1", "N=4 f1"]     # hold rows are not forecast
    assert fora["best"]["setting"] == "N=2 f1" and fora["best"]["margin_db"] == pytest.approx(2.0)


def test_repeatability_flags_passes_more_than_five_percent_apart():
    assert harness.passes_agree([2.0, 2.09]) is True
    assert harness.passes_agree([2.0, 2.11]) is False
    assert harness.passes_agree([2.11, 2.0]) is False
    assert harness.passes_agree([2.0, 2.11], tolerance=0.1) is True
    assert harness.passes_agree([2.0]) is None
    rows = [_row("CacheKit", 30.0, [2.0, 2.3], passes_agree=False),
            _row("diffusers", 30.0, [2.0, 2.0], passes_agree=True)]
    result = frontier.build(rows)
    assert [u["speedup_passes"] for u in result["passes_disagree"]] == [[2.0, 2.3]]


class _Counting(harness.Denoiser):
    """A fake denoiser that logs which run called it and sleeps (wall time, no CPU)."""

    def __init__(self, name, log, sleep=0.0):
        super().__init__("dit", None)
        self.name, self.log, self.sleep = name, log, sleep

    def __call__(self, x, t, labels):
        self.log.append(self.name)
        if self.sleep:
            time.sleep(self.sleep)
        return x


def _calls(name, n, log, sleep=0.0):
    def run(wrap):
        denoiser = wrap(_Counting(name, log, sleep))
        for _ in range(n):
            denoiser(None, None, None)
        return n
    return run


def test_lockstep_runs_take_turns_per_model_call_and_the_longer_one_finishes_alone():
    log = []
    outputs, turns = harness.lockstep({"a": _calls("a", 3, log), "b": _calls("b", 5, log)})
    assert outputs == {"a": 3, "b": 5}
    assert log == ["a", "b", "a", "b", "a", "b", "b", "b"]
    log.clear()
    harness.lockstep({"b": _calls("b", 2, log), "a": _calls("a", 2, log)})
    assert log == ["b", "a", "b", "a"]


def test_lockstep_counts_each_runs_own_turns_and_not_its_waiting():
    log = []
    _, turns = harness.lockstep({"sleepy": _calls("sleepy", 4, log, sleep=0.05), "quick": _calls("quick", 4, log)})
    assert turns.wall["sleepy"] >= 0.2                   # its own sleeps, inside its turns
    assert turns.wall["quick"] < 0.1                     # the other run's sleeps are not its time
    assert turns.cpu["sleepy"] < 0.1                     # sleeping is wall time, not CPU time


def test_lockstep_reraises_a_runs_error_without_hanging():
    def broken(wrap):
        wrap(_Counting("x", []))(None, None, None)
        raise ValueError("boom")
    with pytest.raises(ValueError, match="boom"):
        harness.lockstep({"ok": _calls("ok", 5, []), "broken": broken})


def test_the_bench_lists_every_baseline():
    methods = all_methods(magcache_ratios={}, fewer=default_fewer_steps(25))
    assert [m.setting for m in methods if m.origin == FEWER_STEPS] == [f"steps={k}" for k in range(8, 21, 2)]
    official = {m.setting for m in methods if m.origin == "deepcache (official)"}
    assert {"N=3 branch=0", "N=3 branch=1"} <= official
    cache_dit = [m for m in methods if m.origin == CACHE_DIT]
    assert {m.name for m in cache_dit} == {"DBCache", "DBCache+TaylorSeer"}
    assert all(m.unavailable == "" or "cache-dit" in m.unavailable for m in cache_dit)
    assert {"FirstBlockCache", "PyramidAttentionBroadcast", "FasterCache", "TaylorSeer", "TaylorSeer lite", "MagCache",
            "SeaCache"} <= {m.name for m in methods if m.origin == "diffusers"}


def test_taylorseer_lite_is_adaptive_diffusion_at_max_skip_1_with_forecast2():
    # The strongest diffusers baseline at >= 1.5x does the same computation as CacheKit's
    # AdaptiveDiffusion delta 1.0, max_skip 1, forecast2 (every other step after the warm-up
    # skipped, the prediction extrapolated): the bench must show them level, not CacheKit ahead.
    from cachekit.bench.methods import cachekit_method, diffusers_taylorseer_lite
    base, labels, steps = load("dit"), torch.arange(2), 12
    images = {}
    for warmup in (4, 6):
        for method in (cachekit_method("adaptive", delta=1.0, max_skip_steps=1, reuse="forecast2", warmup_steps=warmup),
                       diffusers_taylorseer_lite(2, 2, warmup)):
            images[method.origin, warmup] = harness._run(harness._install(method, base, steps), base, labels, steps,
                                                         3.0, 0)
        torch.testing.assert_close(images["CacheKit", warmup], images["diffusers", warmup], rtol=0, atol=1e-5)
    reference = harness._run(None, base, labels, steps, 3.0, 0)
    assert not torch.allclose(images["CacheKit", 4], reference, atol=1e-3)
    assert not torch.allclose(images["CacheKit", 4], images["CacheKit", 6], atol=1e-3)


def test_rows_can_be_chosen_by_method_and_setting_to_add_to_an_earlier_run():
    from cachekit.bench.harness import parse_args
    args = parse_args(["--only", "FORA", "--setting-contains", "start="])
    settings = [m.setting for m in args.methods]
    assert settings and all(m.name == "FORA" and "start=0.12" in m.setting for m in args.methods)
    assert "N=3 start=0.12 reuse=forecast2" in settings
    assert len(parse_args(["--only", "FORA"]).methods) > len(settings)


def test_tiny_run_has_fewer_steps_rows_two_passes_and_unavailable_peers():
    def broken(denoiser, scheduler, steps):
        raise ImportError("no such package")
    peers = [fewer_steps(2),
             Method("Missing", "x", CACHE_DIT, ("dit",), broken, unavailable="cache-dit is not installed"),
             Method("Broken", "y", "diffusers", ("dit",), broken)]
    rows = harness.bench_model("dit", peers, steps=4, images=2, cfg=3.0, rounds=1, passes=2, progress=False)
    assert [r["method"] for r in rows] == ["uncached", "DDIM", "Missing", "Broken"]
    fewer = rows[1]
    assert fewer["origin"] == FEWER_STEPS and fewer["setting"] == "steps=2" and fewer["status"] == "ok"
    assert fewer["flops_executed"] == pytest.approx(0.5, abs=0.01)
    assert len(fewer["speedup_passes"]) == 2 and fewer["passes_agree"] in (True, False)
    assert 0 < fewer["psnr_db"] < 100 and fewer["speedup_wall"] > 0
    assert rows[2]["status"] == "unavailable: cache-dit is not installed" and rows[2]["speedup"] is None
    assert rows[3]["status"].startswith("unavailable: failed here: ImportError: no such package")


def test_a_failing_cachekit_method_is_an_error_not_a_row():
    def broken(denoiser, scheduler, steps):
        raise RuntimeError("bug")
    with pytest.raises(RuntimeError, match="bug"):
        harness.bench_model("dit", [Method("Mine", "x", "CacheKit", ("dit",), broken)], steps=3, images=1, cfg=3.0,
                            rounds=1, passes=1, progress=False)


def test_frontier_files_from_rows(tmp_path):
    rows = [_row("-", float("inf"), [1.0, 1.0], method="uncached"), _row("CacheKit", 30.0, [1.6, 1.7]),
            _row("fewer steps", 25.0, [1.6, 1.6]), _row("CacheKit", 20.0, [2.6, 2.6], model="unet"),
            {**_row("cache-dit", None, [1.0], setting="gone"), "status": "unavailable: not installed", "speedup": None,
             "speedup_passes": []}]
    frontier.write(frontier.build(rows, {"tolerance": 0.05}), tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"frontier.md", "frontier.json", "frontier_dit.png",
                                                    "frontier_unet.png"}
    text = (tmp_path / "frontier.md").read_text()
    assert "unavailable: not installed" in text and "| P |" in text
