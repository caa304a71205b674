"""Merging a partial benchmark run into a full one (bench/merge.py)."""
import json

from cachekit.bench.merge import OLD_TIMING, main, merge


def _row(model, method, setting, psnr, speed, origin="CacheKit"):
    return {"model": model, "origin": origin, "method": method, "setting": setting, "key": "", "settings": {},
            "status": "ok", "speedup": speed, "speedup_passes": [speed, speed], "passes_agree": True,
            "speedup_wall": speed, "cpu_s": 1.0, "flops_executed": 1 / speed, "psnr_db": psnr, "ssim": 0.9,
            "accuracy": 0.5, "peak_mem_mib": 1.0, "hit_rate": 0.5}


def test_partial_rows_replace_the_same_setting_and_add_new_ones(tmp_path):
    base = {"meta": {"command": "full", "steps": 25, "images": 2, "cfg": 3.0, "rounds": 1, "passes": 2,
                     "tolerance": 0.05, "date": "d", "machine": "m", "runtime_min": 1, "models": ["dit"]},
            "rows": [_row("dit", "uncached", "steps=25", float("inf"), 1.0, "-"),
                     _row("dit", "AdaptiveDiffusion", "delta=0.01", 30.0, 1.5),
                     _row("dit", "DDIM", "steps=12", 20.0, 2.0, "fewer steps")]}
    partial = {"meta": {"command": "partial", "date": "d2"},
               "rows": [_row("dit", "uncached", "steps=25", float("inf"), 1.0, "-"),
                        _row("dit", "AdaptiveDiffusion", "delta=0.01", 31.0, 1.6),
                        _row("dit", "AdaptiveDiffusion", "delta=0.02 reuse=forecast1", 37.0, 2.1)]}
    merged = merge(base, [partial])
    rows = {(r["method"], r["setting"]): r for r in merged["rows"]}
    assert len(merged["rows"]) == 4                                         # one replaced, one added
    assert rows[("AdaptiveDiffusion", "delta=0.01")]["psnr_db"] == 31.0
    assert rows[("AdaptiveDiffusion", "delta=0.02 reuse=forecast1")]["psnr_db"] == 37.0
    assert rows[("uncached", "steps=25")]["speedup"] == 1.0 and "partial (d2)" in merged["meta"]["command"]
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    main([str(tmp_path / "base.json"), str(tmp_path / "partial.json"), "--out", str(tmp_path / "out")])
    frontier = (tmp_path / "out" / "frontier.md").read_text()
    assert "delta=0.02 reuse=forecast1" in frontier and (tmp_path / "out" / "peers.json").exists()


def test_a_run_of_another_model_comes_whole_with_its_uncached_row_and_image_count(tmp_path):
    base = {"meta": {"command": "dit run", "steps": 25, "images": 24, "cfg": 3.0, "rounds": 1, "passes": 2,
                     "tolerance": 0.05, "date": "d", "machine": "m", "runtime_min": 1, "models": ["dit"]},
            "rows": [_row("dit", "uncached", "steps=25", float("inf"), 1.0, "-"),
                     _row("dit", "FORA", "N=2", 14.0, 1.5)]}
    unet = {"meta": {"command": "unet run", "date": "d2", "images": 12, "models": ["unet"], "timing": "lockstep"},
            "rows": [_row("unet", "uncached", "steps=25", float("inf"), 1.0, "-"),
                     _row("unet", "DeepCache", "N=3", 25.0, 2.3)]}
    merged = merge(base, [unet])
    assert sorted((r["model"], r["method"]) for r in merged["rows"]) == [
        ("dit", "FORA"), ("dit", "uncached"), ("unet", "DeepCache"), ("unet", "uncached")]
    assert merged["meta"]["images_by_model"] == {"dit": 24, "unet": 12}
    assert merged["meta"]["models"] == ["dit", "unet"]
    # each model says how its speed was measured (the dit run predates the lockstep harness)
    assert merged["meta"]["timing_by_model"] == {"dit": OLD_TIMING, "unet": "lockstep"}
    assert merge(merged, [unet])["meta"]["command"].count("unet run") == 2      # base once, each merge listed once
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "unet.json").write_text(json.dumps(unet))
    main([str(tmp_path / "base.json"), str(tmp_path / "unet.json"), "--out", str(tmp_path / "out")])
    assert "dit: 24, unet: 12 images" in (tmp_path / "out" / "frontier.md").read_text()
