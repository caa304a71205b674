"""The Gradio preview panel: its API returns what a direct run computes, its pictures stay readable
at 100 steps, and a real browser runs it at 25 and 100 steps (screenshots kept in artifacts/)."""
from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install -r requirements-dev.txt)")

from cachekit.panel import app as panel_app  # noqa: E402
from cachekit.panel import charts, engine, pictures, report  # noqa: E402
from cachekit.core.heatmap import block_heatmap, block_means, heatmap_image  # noqa: E402
from panel_server import free_port as _free_port, png as _png, server  # noqa: E402,F401

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
ARGS = ("unet", "DeepCache", 3, 0, "triangle", 5, 6, 3.0, 2, 0.05, 0.2, 1, "hold")


def test_api_returns_the_images_hit_rates_and_json_of_a_direct_run(server):
    from gradio_client import Client
    out = Client(server, verbose=False).predict(*ARGS, api_name="/generate")
    uncached, cached, difference, summary, heatmap, step_plot, block_plot, record, download = out
    direct = engine.run(engine.Request("unet", "DeepCache", 3, 0, "triangle", 5, 6, 3.0, 2), progress=False)
    assert np.array_equal(_png(uncached), pictures.side_by_side(direct.uncached))
    assert np.array_equal(_png(cached), pictures.side_by_side(direct.cached))
    assert not np.array_equal(_png(uncached), _png(cached))
    diff, gain = pictures.difference(direct.uncached, direct.cached)
    assert np.array_equal(_png(difference["value"]), pictures.side_by_side(diff)) and gain > 1
    assert difference["label"] == f"|uncached − cached| × {gain}"
    assert record["difference_gain"] == gain
    t = record["telemetry"]
    assert t["step_hit_rates"] == direct.telemetry["step_hit_rates"]
    assert t["heatmap"] == direct.telemetry["heatmap"]
    assert t["hit_rate"] == pytest.approx(direct.telemetry["hit_rate"]) and t["hit_rate"] > 0.3
    assert f"Hit rate {t['hit_rate']:.0%}" in summary
    assert "DeepCache" in summary and "interval 3, branch 0" in summary
    assert f"**Uncached** {record['timing']['uncached_s'][0]:.2f} s" in summary
    assert f"**Cached** {record['timing']['cached_s'][0]:.2f} s" in summary
    for picture in (heatmap, step_plot, block_plot):
        assert _png(picture).shape[0] >= 50
    # The download is the same record, as plain JSON, with per-step data.
    saved = json.loads(Path(download).read_text())
    assert saved == record and saved["settings"] == {"interval": 3, "branch": 0, "reuse": "hold"}
    assert saved["sampling"]["steps"] == 6 and len(saved["telemetry"]["step_hit_rates"]) == 6
    assert len(saved["timing"]["uncached_step_s"]) == len(saved["timing"]["cached_step_s"]) == 6
    assert Path(download).name == "cachekit_unet_DeepCache_6steps_seed5.json"


class _Progress:
    """Stands in for gr.Progress: records what the panel would show."""

    def __init__(self):
        self.seen: list[tuple[float, str]] = []

    def __call__(self, fraction, desc=None, **_):
        self.seen.append((fraction, desc))


def test_a_100_step_run_gives_readable_labelled_pictures_and_says_which_pass_runs():
    progress = _Progress()
    out = panel_app.generate("dit", "FORA", 3, 0, "ring", 1, 100, 3.0, 1, 0.05, 0.2, 1, progress=progress)
    uncached, cached, difference, summary, heatmap, step_plot, block_plot, record, download = out
    texts = [desc for _, desc in progress.seen]
    assert "uncached pass: step 1/100" in texts and "cached pass: step 100/100" in texts
    assert texts.index("uncached pass: step 100/100") < texts.index("cached pass: step 1/100")
    fractions = [f for f, _ in progress.seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    groups = [f"transformer_blocks.{i}" for i in range(6)]
    assert block_heatmap(record["telemetry"])[0] == groups
    # Before: 100 steps x 6 blocks at 14 px a cell was 1400 x 84 px, squeezed to a 23 px strip
    # in the sidebar. Now every block has a labelled row at least a text line high, and the
    # picture is tall enough to survive being fitted to a ~900 px wide column.
    height, width, _ = heatmap.shape
    assert height >= 6 * charts.LINE + 3 * charts.LINE and height / width > 0.15
    chart = charts.heatmap_chart(*block_heatmap(record["telemetry"]),
                                 charts.step_axis(record["telemetry"], groups))
    assert np.array_equal(chart.image, heatmap)
    texts = [text for text, _ in chart.labels]
    assert all(g in texts for g in groups) and "step" in texts and "block" in texts
    assert {"1", "50", "100"} <= set(texts)
    for text, (x0, y0, x1, y1) in chart.labels:        # each label really is drawn: dark pixels in its box
        assert heatmap[y0:y1, x0:x1].min() < 128, text
    assert step_plot.shape[1] == width and step_plot.shape[0] >= 150    # columns line up with the heatmap
    assert block_plot.shape[0] >= 6 * charts.ROW_HEIGHT

    assert "### FORA on Tiny DiT" in summary and "interval 3, start 20% of steps" in summary
    assert "100 DDIM steps" in summary and "one timing" in summary and "FLOP-weighted estimate" in summary
    gain = int(difference["label"].split("×")[1].split()[0])
    assert difference["value"].shape == uncached.shape and gain >= 1
    assert json.loads(Path(download).read_text())["telemetry"]["num_steps"] == 100


def _disjoint(a, b) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


@pytest.mark.parametrize("blocks,steps", [(1, 5), (7, 25), (6, 100), (30, 100), (60, 100), (200, 200)])
def test_chart_labels_never_overlap_and_stay_inside(blocks, steps):
    groups = [f"transformer_blocks.{i}" if blocks < 100 else f"model.diffusion_model.output_blocks.{i}.1"
              for i in range(blocks)]
    rng = np.random.default_rng(0)
    heat = rng.random((steps, blocks))
    heat[rng.random((steps, blocks)) < 0.1] = np.nan
    t = {"num_steps": steps, "groups": groups}
    axis = charts.step_axis(t, groups)
    rates = [None if s % 9 == 0 else float(r) for s, r in enumerate(rng.random(steps))]
    for chart in (charts.heatmap_chart(groups, heat, axis), charts.step_chart(rates, axis, [2, 3]),
                  charts.block_chart(groups, heat)):
        h, w, _ = chart.image.shape
        boxes = [box for _, box in chart.labels]
        for (text, box) in chart.labels:
            assert 0 <= box[0] and box[2] <= w and 0 <= box[1] and box[3] <= h, (text, box, (w, h))
        for a, b in itertools.combinations(boxes, 2):
            assert _disjoint(a, b), (a, b)
    names = [text for text, _ in charts.heatmap_chart(groups, heat, axis).labels if text not in ("block", "step")]
    shown = [n for n in names if n.startswith(("transformer", "model", "…"))]
    if blocks * charts.ROW_HEIGHT <= charts.MAX_ROWS_HEIGHT:
        assert len(shown) == blocks               # room for every name: every block is named
    else:
        # Thinned out, not dropped: at least half as many names as lines of text fit the height.
        assert charts.MAX_ROWS_HEIGHT // (2 * (charts.LINE + 1)) <= len(shown) < blocks


def test_long_block_names_are_shortened_in_the_middle():
    name = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0"
    short = charts.shorten(name, 150)
    assert charts._width(short) <= 150 and short.endswith("blocks.0") and "…" in short
    assert charts.shorten("mid") == "mid"


def test_step_ticks_are_round_numbers_spaced_for_their_labels():
    def ticks(steps):
        return charts.tick_steps(steps, charts.StepAxis(steps, 0).cell)
    assert ticks(5) == [1, 2, 3, 4, 5] and ticks(25) == list(range(1, 26))
    assert ticks(100) == [1] + list(range(10, 101, 10))
    for steps in (2, 10, 25, 50, 99, 100, 150, 200, 1000):
        cell = charts.StepAxis(steps, 0).cell
        shown = ticks(steps)
        interval = shown[-1] - shown[-2]                  # round multiples, plus step 1 where it fits
        assert all(t == 1 or t % interval == 0 for t in shown) and 1 <= shown[0] and shown[-1] <= steps
        assert len(shown) >= 2 and shown == sorted(shown)
        assert all((b - a) * cell >= charts._width(str(steps)) + 6 for a, b in zip(shown, shown[1:]))


def test_only_the_chosen_methods_controls_are_shown_with_one_line_about_it():
    expected = {"DeepCache": {"interval", "branch", "reuse"}, "FORA": {"interval", "start_percent", "reuse"},
                "AdaptiveDiffusion": {"delta", "max_skip_steps", "reuse"}, "ChangeCache": {"threshold", "reuse"},
                "Router": set()}
    assert set(engine.SETTINGS) == set(expected) >= {m for ms in engine.METHODS.values() for m in ms}
    for method, wanted in expected.items():
        info, *updates = panel_app._controls_for(method)
        assert {name for name, u in zip(panel_app.CONTROLS, updates) if u["visible"]} == wanted
        assert info.startswith(f"**{method}**: ") and "\n" not in info and len(info) < 200
    method, *rest = panel_app._methods_for("dit")
    assert method["value"] == "FORA" and rest[0].startswith("**FORA**")


def _result(uncached_rounds, cached_rounds, telemetry=None):
    images = np.zeros((1, 32, 32, 3), np.uint8)
    return engine.Result(images, images, uncached_rounds, cached_rounds, 30.0,
                         telemetry or {"hit_rate": 0.5, "executed_fraction": 0.6, "ideal_speedup": 1.9,
                                       "skipped_steps": [], "num_steps": 25})


def test_the_summary_names_the_method_its_settings_both_times_and_a_labelled_speedup():
    request = engine.Request("dit", "FORA", interval=4, start_percent=0.3, steps=25)
    one = report.run_summary(request, _result([1.70], [2.65]))
    assert "### FORA on Tiny DiT" in one and "interval 4, start 30% of steps" in one
    assert "**Uncached** 1.70 s · **Cached** 2.65 s" in one
    # A single noisy timing never stands alone: flagged, and next to the FLOP estimate.
    assert "0.64x measured (one timing) · 1.90x FLOP-weighted estimate" in one and "noisy" in one
    three = report.run_summary(engine.Request("dit", "FORA", rounds=3), _result([1.7, 1.8, 1.6], [2.65, 1.3, 1.2]))
    assert "median of 3 rounds, range 0.64–1.38x" in three and "1.33x measured" in three
    assert "**Uncached** 1.70 s · **Cached** 1.30 s (median of 3 rounds)" in three
    assert "above the FLOP" not in one + three
    fast = report.run_summary(engine.Request("unet", "DeepCache"), _result([9.2], [2.5]))     # 3.68x > 1.9x
    assert "3.68x measured (one timing)" in fast and "Above the FLOP-weighted estimate" in fast
    router = report.run_summary(engine.Request("dit", "Router"), _result([1.0], [0.5]))
    assert "no settings (bundled router)" in router
    many = _result([1.0], [0.5], {"hit_rate": 0.6, "executed_fraction": None, "ideal_speedup": None,
                                  "skipped_steps": list(range(3, 90)), "num_steps": 100})
    text = report.run_summary(engine.Request("unet", "AdaptiveDiffusion", steps=100), many)
    assert "**Skipped steps** 87 of 100 (see the per-step chart)" in text and "FLOP" not in text


def test_the_run_record_is_plain_json_even_for_identical_images():
    request = engine.Request("unet", "AdaptiveDiffusion", delta=0.0, rounds=2)
    result = _result([1.0, 1.2], [0.9, 1.0])
    result.psnr_db = float("inf")
    record = report.run_record(request, result)
    text = json.dumps(record, allow_nan=False)          # would raise on Infinity / NaN
    assert json.loads(text)["psnr_db"] is None and record["settings"] == {"delta": 0.0, "max_skip_steps": 4,
                                                                                    "reuse": "hold"}
    assert record["timing"]["speedup_per_round"] == pytest.approx([1.0 / 0.9, 1.2])
    assert "identical" in report.run_summary(request, result)


def test_the_difference_image_is_the_absolute_difference_times_a_stated_gain():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-6, 7, a.shape), 0, 255).astype(np.uint8)
    diff, gain = pictures.difference(a, b)
    expected = np.clip(np.abs(a.astype(int) - b.astype(int)) * gain, 0, 255)
    assert np.array_equal(diff, expected) and gain & (gain - 1) == 0
    high = np.percentile(np.abs(a.astype(int) - b.astype(int)), 99)
    assert high * gain <= 255 < high * gain * 2           # the bulk of the difference nearly fills the scale
    same, one = pictures.difference(a, a)
    assert one == 1 and not same.any()
    assert pictures.difference(a, 255 - a)[1] == 1        # already visible: not amplified


def test_adaptive_step_skipping_runs_in_the_panel_engine():
    result = engine.run(engine.Request("unet", "AdaptiveDiffusion", class_name="circle", steps=12, images=1, delta=0.5),
                        progress=False)
    t = result.telemetry
    assert t["method"] == "AdaptiveDiffusion" and t["skipped_steps"]
    assert t["hit_rate"] == pytest.approx(len(t["skipped_steps"]) / 12)
    assert 12 < result.psnr_db < float("inf")       # 7 of 12 steps skipped: visibly close, not equal
    # max_skip 1 at delta 1.0: after the 4 warm-up steps every other step skips, forecast from
    # its computed neighbours
    request = engine.Request("dit", "AdaptiveDiffusion", class_name="circle", steps=12, images=1, delta=1.0,
                             max_skip_steps=1, reuse="forecast2")
    assert engine.method_settings(request) == {"delta": 1.0, "max_skip_steps": 1, "reuse": "forecast2"}
    assert engine.run(request, progress=False).telemetry["skipped_steps"] == [4, 6, 8, 10]
    with pytest.raises(ValueError, match="max_skip_steps must be a whole number from 1 to 100"):
        engine.run(engine.Request("unet", "AdaptiveDiffusion", max_skip_steps=0))


def test_the_learned_forecast_runs_in_the_panel_engine_and_is_refused_where_it_does_not_fit():
    base = dict(model="dit", method="AdaptiveDiffusion", class_name="circle", steps=25, images=1, delta=1.0,
                max_skip_steps=1, reuse="forecast2")
    plain = engine.run(engine.Request(**base), progress=False)
    learned = engine.run(engine.Request(**base, learned_forecast=True), progress=False)
    # The same steps skip; the skipped steps' predictions differ, so the images do.
    assert learned.telemetry["skipped_steps"] == plain.telemetry["skipped_steps"] == list(range(4, 25, 2))
    assert not np.array_equal(learned.cached, plain.cached)
    assert engine.Request(**base, learned_forecast=True).settings()["learned_forecast"] is True
    for change, message in (({"model": "unet"}, "trained for AdaptiveDiffusion on the tiny DiT"),
                            ({"dydit": True}, "trained for AdaptiveDiffusion on the tiny DiT"),
                            ({"reuse": "hold"}, "set Reuse to forecast2"),
                            ({"steps": 20}, "trained for 25 steps; the run has 20")):
        with pytest.raises(ValueError, match=message):
            engine.run(engine.Request(**{**base, **change}, learned_forecast=True), progress=False)


def test_fora_in_the_panel_engine_computes_the_first_share_of_steps_in_full():
    def step_hits(start):
        return engine.run(engine.Request("dit", "FORA", interval=2, class_name="ring", steps=10, images=1,
                                         start_percent=start), progress=False).telemetry["step_hit_rates"]
    late, early = step_hits(0.5), step_hits(0.0)
    assert all(not rate for rate in late[:5]) and any(rate for rate in late[5:])
    assert any(rate for rate in early[1:5])
    with pytest.raises(ValueError, match="start_percent"):
        engine.run(engine.Request("dit", "FORA", start_percent=1.0))


def test_the_bundled_router_runs_in_the_panel_engine_and_refuses_other_step_counts():
    result = engine.run(engine.Request("dit", "Router", class_name="square", steps=25, images=1), progress=False)
    t = result.telemetry
    assert t["method"] == "HarmoniCa" and 0 < t["hit_rate"] < 1
    with pytest.raises(ValueError, match="trained for 25 sampling steps"):
        engine.run(engine.Request("dit", "Router", steps=10, images=1), progress=False)


def test_bad_requests_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="FORA does not apply to the unet model"):
        engine.run(engine.Request(model="unet", method="FORA"))
    with pytest.raises(ValueError, match="Unknown class"):
        engine.run(engine.Request(class_name="hexagon"))
    with pytest.raises(ValueError, match="rounds must be between 1 and 5"):
        engine.run(engine.Request(rounds=0))


def test_heatmap_layout():
    t = {"groups": ["a", "a", "b"], "num_steps": 2, "heatmap": [[0.0, 0.0, None], [1.0, 0.0, 1.0]]}
    groups, heat = block_heatmap(t)
    assert groups == ["a", "b"]
    assert heat[0, 0] == 0.0 and np.isnan(heat[0, 1]) and heat[1, 0] == 0.5 and heat[1, 1] == 1.0
    picture = heatmap_image(heat, cell=2)
    assert picture.shape == (4, 4, 3)          # rows = blocks, columns = steps
    assert block_means(heat) == pytest.approx([0.25, 1.0])     # block b ran once, fully reused


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _wait_for_run(page, steps: int) -> str:
    """Waits until the summary describes a finished run of `steps` steps; returns the summary."""
    page.wait_for_function(
        "n => (document.querySelector('#hit-summary')?.innerText || '').includes(n + ' DDIM steps')",
        arg=steps, timeout=240_000)
    page.wait_for_timeout(1500)          # let the pictures finish loading before the screenshot
    return page.inner_text("#hit-summary")


def _shown_height(page, elem_id: str) -> float:
    return page.eval_on_selector(f"#{elem_id} img", "img => img.getBoundingClientRect().height")


def _set_number(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no Debian chromium (apt-get install chromium)")
def test_browser_runs_25_and_100_steps_and_keeps_the_pictures_readable(server):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(server)
            page.locator("#generate").wait_for()
            # DeepCache (the default): its two sliders, not FORA's or AdaptiveDiffusion's.
            assert page.locator("#branch").is_visible() and not page.locator("#start-percent").is_visible()
            assert not page.locator("#delta").is_visible() and "DeepCache" in page.inner_text("#method-info")
            _set_number(page, "images", 2)
            page.locator("#generate").click()
            page.wait_for_function("() => document.body.innerText.includes('uncached pass: step')", timeout=60_000)
            summary_25 = _wait_for_run(page, 25)
            heat_25 = _shown_height(page, "heatmap")
            page.screenshot(path=str(ARTIFACTS / "panel_25_steps.png"), full_page=True)

            # The DiT: FORA's sliders replace DeepCache's; then 100 steps.
            page.locator("#model input").click()
            page.get_by_role("option", name="dit").click()
            page.wait_for_function("() => document.querySelector('#method-info')?.innerText.includes('FORA')")
            assert page.locator("#start-percent").is_visible() and not page.locator("#branch").is_visible()
            _set_number(page, "steps", 100)
            page.locator("#generate").click()
            page.wait_for_function("() => document.body.innerText.includes('cached pass: step')", timeout=60_000)
            summary_100 = _wait_for_run(page, 100)
            heat_100, steps_100 = _shown_height(page, "heatmap"), _shown_height(page, "step-plot")
            with page.expect_download() as download:
                page.locator("#run-json a").first.click()
            saved = json.loads(Path(download.value.path()).read_text())
            page.screenshot(path=str(ARTIFACTS / "panel_100_steps.png"), full_page=True)
        finally:
            browser.close()
    assert "DeepCache on Tiny U-Net" in summary_25 and "interval 3, branch 0" in summary_25
    assert "FORA on Tiny DiT" in summary_100 and "start 20% of steps" in summary_100
    for text in (summary_25, summary_100):
        assert "Uncached" in text and "Cached" in text and "measured" in text and "FLOP-weighted" in text
    # On screen, not just in the PNG: the 100-step heatmap keeps a readable height (it was ~20 px).
    assert heat_25 > 120 and heat_100 > 120 and steps_100 > 100
    assert saved["method"] == "FORA" and len(saved["telemetry"]["step_hit_rates"]) == 100
    for name in ("panel_25_steps.png", "panel_100_steps.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000


@pytest.fixture
def fake_comfyui():
    """A stand-in ComfyUI that serves /cachekit/runs (the real one is in tests/integration)."""
    import http.server
    import threading
    result = engine.run(engine.Request("unet", "DeepCache", class_name="ring", steps=6, images=1), progress=False)
    runs = [{"id": 7, "owner": "cachekit.DeepCache.x", "node_id": "5", "prompt_id": "p", "sampler_node_id": "6",
             "started": 1.0, "finished": 2.0, "telemetry": result.telemetry}]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/cachekit/runs"):
                body = json.dumps({"runs": runs}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", result.telemetry
    httpd.shutdown()


def test_panel_attaches_to_a_running_comfyui_and_shows_its_runs(server, fake_comfyui):
    from gradio_client import Client
    url, telemetry = fake_comfyui
    summary, heatmap, step_plot, block_plot, listing, newest, download = Client(server, verbose=False).predict(
        url, api_name="/comfy_runs")
    assert f"Hit rate {telemetry['hit_rate']:.0%}" in summary and "DeepCache in ComfyUI" in summary
    assert newest["id"] == 7 and newest["telemetry"]["heatmap"] == telemetry["heatmap"]
    groups, heat = block_heatmap(telemetry)
    assert np.array_equal(_png(heatmap), charts.heatmap_chart(groups, heat, charts.step_axis(telemetry, groups)).image)
    assert json.loads(Path(download).read_text()) == newest
    assert "run 7: DeepCache on node #5" in listing


def test_attach_errors_are_clear():
    from cachekit.panel import comfy_client
    with pytest.raises(ValueError, match="must look like"):
        comfy_client.runs_url("file:///etc/passwd")
    with pytest.raises(ValueError, match="Cannot reach ComfyUI"):
        comfy_client.fetch_runs(f"http://127.0.0.1:{_free_port()}", timeout=2)
    assert comfy_client.runs_url("http://127.0.0.1:8188/") == "http://127.0.0.1:8188/cachekit/runs?limit=32"
