"""The frontier's deciding rows re-scored on more images (bench/quality_check.py, issue 14):
which rows are picked, the accuracy interval, the verdicts, and one real scoring run."""
from __future__ import annotations

import pytest
import torch

from cachekit.bench import quality_check as qc


def _row(origin, method, setting, psnr, passes, model="unet", accuracy=0.5, **settings):
    return {"model": model, "origin": origin, "method": method, "setting": setting, "status": "ok",
            "speedup": max(passes), "speedup_passes": passes, "psnr_db": psnr, "accuracy": accuracy,
            "settings": settings}


ROWS = [_row("-", "uncached", "steps=25", float("inf"), [1.0, 1.0], steps=25),
        _row("fewer steps", "DDIM", "steps=16", 21.0, [1.6, 1.66], steps=16),
        _row("fewer steps", "DDIM", "steps=10", 16.0, [2.5, 2.49], steps=10),
        _row("CacheKit", "DeepCache", "N=3 branch=1 reuse=forecast1", 27.0, [2.19, 2.23], interval=3, branch=1,
             reuse="forecast1"),
        _row("CacheKit", "DeepCache", "N=2 branch=0", 25.0, [1.67, 1.68], interval=2, branch=0),
        _row("deepcache (official)", "DeepCache", "N=2 branch=0", 25.0, [2.06, 1.89]),
        _row("CacheKit", "DeepCache", "N=5 branch=0", 17.0, [4.0, 4.1], interval=5, branch=0)]


def test_wilson_interval_is_sound_at_the_edges_and_narrows_with_more_images():
    assert qc.wilson(0, 10)[0] == 0.0 and qc.wilson(10, 10)[1] == 1.0
    low, high = qc.wilson(8, 12)
    assert low < 8 / 12 < high
    low96, high96 = qc.wilson(64, 96)
    assert high96 - low96 < high - low
    assert qc.wilson(64, 96) == pytest.approx((0.568, 0.753), abs=0.002)     # textbook value


def test_deciding_rows_are_band_contenders_and_the_unit_method_against_fewer_steps():
    picked = qc.deciding_rows(ROWS)["unet"]
    names = [(r["origin"], r["setting"]) for r in picked]
    # >= 1.5x and >= 2x: CacheKit's forecast DeepCache (27 dB) vs the official package (its faster pass
    # 2.06); >= 2.5x: N=5 vs fewer steps at 2.5; the forecast row with every fewer-steps row.
    assert ("CacheKit", "N=3 branch=1 reuse=forecast1") in names
    assert ("deepcache (official)", "N=2 branch=0") in names
    assert ("CacheKit", "N=5 branch=0") in names
    assert ("fewer steps", "steps=16") in names and ("fewer steps", "steps=10") in names
    assert ("CacheKit", "N=2 branch=0") in names                         # a contender: third best at >= 1.5x
    assert len(qc.contenders(ROWS, "unet", 1.5, qc.frontier.is_cachekit)) == 3
    assert len(names) == len(set(names))
    speeds = [qc.frontier.band_speed(r) for r in picked]
    assert speeds == sorted(speeds)


def _scored(setting, psnr, accuracy, speed, origin="CacheKit", method="DeepCache"):
    return {"origin": origin, "method": method, "setting": setting, "speed": speed, "psnr_db": psnr,
            "accuracy": accuracy, "accuracy_ci95": [0, 1], "agreement": accuracy, "ssim": 0.9}


def _rescored_rows() -> list[dict]:
    """ROWS as re-scored on more images: the order of the close CacheKit rows is unchanged here."""
    return [_scored("steps=25", float("inf"), 0.9, 1.0, "-", "uncached"),
            _scored("steps=16", 20.0, 0.6, 1.66, "fewer steps", "DDIM"),
            _scored("steps=10", 15.0, 0.4, 2.5, "fewer steps", "DDIM"),
            _scored("N=3 branch=1 reuse=forecast1", 26.0, 0.7, 2.19),
            _scored("N=2 branch=0", 25.5, 0.8, 2.06, "deepcache (official)"),
            _scored("N=2 branch=0", 24.0, 0.9, 1.67),
            _scored("N=5 branch=0", 18.0, 0.3, 4.0)]


def test_verdicts_use_the_rescored_quality_not_the_twelve_image_one():
    scored = {"unet": _rescored_rows()}
    result = qc.verdicts(ROWS, scored)
    bands = {b["band"]: b for b in result["bands"]}
    assert bands[1.5]["margin_db"] == pytest.approx(0.5) and not bands[1.5]["margin_met"]
    assert not bands[1.5]["accuracy_not_below"]                             # 0.7 < 0.8 on the re-scored images
    assert bands[2.5]["alternative"]["setting"] == "steps=10" and not bands[2.5]["accuracy_not_below"]
    (fc,) = result["forecast"]
    # fewer steps interpolated at 2.19 between (1.66, 20) and (2.5, 15)
    assert fc["fewer_steps_psnr_db"] == pytest.approx(20 - 5 * (2.19 - 1.66) / (2.5 - 1.66), abs=0.01)
    assert fc["margin_db"] == pytest.approx(26.0 - fc["fewer_steps_psnr_db"], abs=0.01)
    # On the new images a contender that was second on 12 images can win its band.
    scored["unet"][-2] = _scored("N=2 branch=0", 26.5, 0.9, 1.67)
    again = {b["band"]: b for b in qc.verdicts(ROWS, scored)["bands"]}
    assert again[1.5]["cachekit"]["setting"] == "N=2 branch=0" and again[1.5]["margin_db"] == pytest.approx(1.0)
    assert again[1.5]["margin_met"] and again[1.5]["accuracy_not_below"]
    assert again[2.0]["cachekit"]["setting"] == "N=3 branch=1 reuse=forecast1"      # 1.67x is below 2x
    text = qc.to_markdown({"meta": {"images": 96, "command": "c", "date": "d", "runtime_min": 1, "peers": "p",
                                    "peers_date": "d", "peers_images": 12}, "rows": scored, **result})
    assert "| unet | >= 1.5x |" in text and "**no**" in text


def test_scoring_reruns_each_row_on_the_bundled_model():
    rows = [r for r in ROWS if r["origin"] in ("fewer steps", "CacheKit") and r["setting"] != "N=5 branch=0"]
    scored = qc.score("unet", rows, steps=25, images=3, cfg=3.0, progress=False)
    assert scored[0]["method"] == "uncached" and scored[0]["psnr_db"] == float("inf")
    assert scored[0]["agreement"] == 1.0
    by = {s["setting"]: s for s in scored[1:]}
    assert set(by) == {r["setting"] for r in rows}
    for s in by.values():                       # every row really changed the images, and is scored
        assert 5 < s["psnr_db"] < 60 and 0 <= s["accuracy"] <= 1
        low, high = s["accuracy_ci95"]
        assert low <= s["accuracy"] <= high
    assert by["steps=10"]["psnr_db"] < by["steps=16"]["psnr_db"]
    # Every row reports the FLOPs it executed over the uncached run's, as the bench counts them.
    cached = by["N=2 branch=0"]
    assert 0.3 < cached["work"] < 0.9 and cached["work_first"] == cached["work"]      # one batch
    assert by["steps=10"]["work"] == pytest.approx(10 / 25, abs=0.002) and scored[0]["work"] is None
    assert not any(s["extra"] for s in scored)


def test_extra_rows_are_listed_apart_and_decide_nothing():
    extra = {**_scored("N=2 branch=1", 40.0, 0.95, 1.55), "extra": True, "work": 0.3, "work_first": 0.25}
    scored = {"unet": _rescored_rows() + [extra]}
    # N=2 branch=1 is the 4th CacheKit row of the >= 1.5x band by its 12-image PSNR: no contender
    rows = ROWS + [_row("CacheKit", "DeepCache", "N=2 branch=1", 16.0, [1.55, 1.6], interval=2, branch=1)]
    bands = qc.verdicts(rows, scored)["bands"]
    assert all(b["cachekit"]["setting"] != "N=2 branch=1" for b in bands)     # 40 dB, yet outside the rule
    text = qc.to_markdown({"meta": {"images": 96, "command": "c", "date": "d", "runtime_min": 1, "peers": "p",
                                    "peers_date": "d", "peers_images": 12}, "rows": scored,
                           **qc.verdicts(rows, scored)})
    apart = text.split("## Outside the rule")[1].split("## Every re-scored row")[0]
    assert "N=2 branch=1" in apart and "25.0% / 30.0%" in apart and "N=5 branch=0" not in apart


def test_rows_that_cannot_be_rebuilt_are_named():
    odd = [_row("cache-dit", "Warp", "x=1", 20.0, [2.0, 2.0])]
    with pytest.raises(ValueError, match="Warp x=1"):
        qc.score("unet", odd, steps=25, images=2, cfg=3.0, progress=False)


def test_images_are_sampled_in_the_benchs_batches_with_one_seed_each():
    """Per-batch deciders must see batches like the timed ones: batch k of `batch` images, seed k."""
    from cachekit.core.quality import psnr
    from cachekit.tinymodels.bundled import load
    from cachekit.tinymodels.sampling import sample
    row = next(r for r in ROWS if r["origin"] == "fewer steps" and r["setting"] == "steps=16")
    scored = qc.score("unet", [row], steps=25, images=4, cfg=3.0, batch=2, progress=False)
    base = qc.load("unet")
    labels = torch.arange(4) % qc.NUM_CLASSES
    run = lambda steps: torch.cat([sample(base, labels[i:i + 2], steps=steps, cfg=3.0, seed=k)
                                   for k, i in enumerate((0, 2))])
    assert scored[1]["psnr_db"] == round(psnr(run(25), run(16)), 2)
    assert scored[1]["work_first"] == scored[1]["work"] == pytest.approx(16 / 25, abs=0.002)
    whole = qc.score("unet", [row], steps=25, images=4, cfg=3.0, progress=False)       # one batch, seed 0
    assert whole[1]["psnr_db"] != scored[1]["psnr_db"]
