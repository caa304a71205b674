"""The panel's Autotune view: the API tunes a bundled model and marks the frontier, the plot draws
it, the last tune is kept on disk and shown when the panel opens, and bad requests are refused."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install -r requirements-dev.txt)")

from cachekit.core.autotune import Trial, TuneResult, choose  # noqa: E402
from cachekit.core.methods import registry  # noqa: E402
from cachekit.panel import app as panel_app  # noqa: E402
from cachekit.panel import charts, report, tuning  # noqa: E402
from panel_server import png as _png, server  # noqa: E402,F401

# FORA on the tiny DiT: interval 2 from 20 % of the steps is the best PSNR of the three; it is
# tried twice, so the slower of the two equal-PSNR twins is dominated (never on the frontier).
TWIN = {"interval": 2, "start_percent": 0.2, "reuse": "hold"}
SHORT_LADDER = [[dict(TWIN), {"interval": 3, "start_percent": 0.0, "reuse": "hold"}, dict(TWIN)]]
# model, method, target, value, steps, images, max candidates: a tune of about 2 s on one core.
ARGS = ("dit", "FORA", "psnr", 1.0, 6, 1, 8)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test keeps its last tune in its own folder, never in the user's ~/.cache."""
    folder = tmp_path / "panel-cache"
    monkeypatch.setenv(tuning.CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def short_ladder(monkeypatch):
    from cachekit.diffusers_host import autotune as host_autotune
    asked = []

    def ladders(method, units=None):
        asked.append(method)
        return [[dict(c) for c in ladder] for ladder in SHORT_LADDER]
    monkeypatch.setattr(host_autotune, "ladders", ladders)
    return asked


def _dominated(i: int, trials: list[dict]) -> bool:
    """Another trial at least as fast and as good, and strictly better on one (null PSNR: identical)."""
    def key(t):
        return t["speedup"], math.inf if t["psnr"] is None else t["psnr"]
    s, p = key(trials[i])
    return any((so > s and po >= p) or (so >= s and po > p)
               for j, (so, po) in enumerate(map(key, trials)) if j != i)


def _table_rows(table) -> list[list]:
    """A Dataframe value as rows: a pandas frame (direct call) or {"headers", "data"} (the client)."""
    if isinstance(table, dict):
        assert table["headers"] == report.AUTOTUNE_HEADERS
        return table["data"]
    assert list(table.columns) == report.AUTOTUNE_HEADERS
    return table.values.tolist()


def test_the_autotune_api_returns_every_trial_with_the_frontier_marked_and_keeps_it(server, short_ladder, cache_dir):
    from gradio_client import Client
    client = Client(server, verbose=False)
    summary, table, plot, record, download = client.predict(*ARGS, api_name="/autotune")
    assert short_ladder == ["fora"]
    trials = record["trials"]
    assert [t["settings"] for t in trials] == SHORT_LADDER[0]
    # The twins: same settings, same images, so the same PSNR; only the faster one is on the frontier.
    first, _, second = trials
    assert first["psnr"] == second["psnr"] and first["psnr"] > trials[1]["psnr"]
    assert sorted([first["on_frontier"], second["on_frontier"]]) == [False, True]
    slower = first if not first["on_frontier"] else second
    assert slower["speedup"] <= (second if slower is first else first)["speedup"]
    for i, t in enumerate(trials):      # the marks are exactly the trials nothing dominates
        assert t["on_frontier"] == (not _dominated(i, trials)), (i, trials)
    assert record["frontier"] == [i for i, t in enumerate(trials) if t["on_frontier"]]
    for t in trials:
        assert t["speedup"] > 0 and t["ideal_speedup"] > 1 and t["seconds"] > 0
    # The table: one row per trial, in order, with the same marks.
    rows = _table_rows(table)
    assert [row[0] for row in rows] == [1, 2, 3]
    assert [row[5] == "✓" for row in rows] == [t["on_frontier"] for t in trials]
    assert rows[1][1] == "interval=3, start_percent=0, reuse=hold"
    assert rows[0][2] == f"{trials[0]['speedup']:.2f}x" and rows[0][4] == f"{trials[0]['psnr']:.1f}"
    # The choice (PSNR >= 1 dB: the fastest trial that skipped work and beat uncached, if any).
    chosen = record["chosen"]
    assert (chosen is not None) == record["met"]
    assert [row[6] == "✓" for row in rows] == [i == chosen for i in range(3)]
    assert "### Autotune: FORA on Tiny DiT, target PSNR ≥ 1 dB" in summary
    assert ("**Target met**" in summary) == record["met"] and "3 candidates tried" in summary
    assert _png(plot).shape[0] > 200 and _png(plot).shape[1] == charts.PLOT_WIDTH
    assert json.loads(Path(download).read_text()) == record
    assert Path(download).name == "cachekit_autotune_dit_FORA_psnr1.json"
    # Kept as the last tune, where the panel reads it when it opens.
    assert json.loads((cache_dir / tuning.LAST_FILE).read_text()) == record
    again = client.predict(api_name="/last_autotune")
    assert again[3] == record and "_The last autotune, run " in again[0]
    assert [row[5] for row in _table_rows(again[1])] == [row[5] for row in rows]


class _Progress:
    def __init__(self):
        self.seen: list[tuple[float, str]] = []

    def __call__(self, fraction, desc=None, **_):
        self.seen.append((fraction, desc))


def test_a_direct_tune_reports_its_progress_run_by_run_and_step_by_step(short_ladder, cache_dir):
    progress = _Progress()
    summary, table, plot, record, download = panel_app.autotune(*ARGS, progress=progress)
    texts = [desc for _, desc in progress.seen]
    assert texts[0] == "loading the Tiny DiT"
    assert "calibration run 1 of at most 11: step 1/6" in texts      # 3 + 8 before autotune counts
    # After the first run autotune says the real total: warm-up, reference, 3 candidates, re-timing.
    assert "calibration run 6 of at most 6: step 6/6" in texts and texts[-1] == "drawing the frontier"
    fractions = [f for f, _ in progress.seen]
    assert fractions[-1] == 1.0 and all(0 <= f <= 1 for f in fractions)
    assert len(record["trials"]) == 3 and tuning.load_last() == record


def _record(trials: list[Trial], target="psnr", value=20.0, method="FORA", model="dit") -> dict:
    result = TuneResult(registry.by_name(method).key, target, value, 1.0, trials)
    result.chosen, result.met = choose(trials, target, value)
    request = tuning.TuneRequest(model=model, method=method, target=target, value=value, steps=10, images=2)
    return json.loads(json.dumps(tuning.record(request, result), allow_nan=False))


def _synthetic() -> dict:
    return _record([
        Trial({"interval": 2, "start_percent": 0.0, "reuse": "hold"}, 24.0, 1.6, 0.6, 1.7),   # frontier
        Trial({"interval": 3, "start_percent": 0.0, "reuse": "hold"}, 19.0, 2.2, 0.45, 2.3),  # frontier
        Trial({"interval": 2, "start_percent": 0.2, "reuse": "hold"}, 22.0, 1.3, 0.8, 1.4),   # dominated by #1
        Trial({"interval": 1, "start_percent": 0.0, "reuse": "hold"}, math.inf, 0.95, 1.05, 1.0),  # identical
    ])


def test_the_record_marks_the_frontier_and_writes_identical_images_as_null():
    record = _synthetic()
    assert [t["on_frontier"] for t in record["trials"]] == [True, True, False, True]
    assert record["frontier"] == [0, 1, 3]
    assert record["chosen"] == 0 and record["met"] and record["trials"][0]["chosen"]
    assert record["settings"] == {"interval": 2, "start_percent": 0.0, "reuse": "hold"}
    assert record["trials"][3]["psnr"] is None and record["format"] == tuning.FORMAT
    rows = report.autotune_rows(record)
    assert [r[5] for r in rows] == ["✓", "✓", "", "✓"] and [r[6] for r in rows] == ["✓", "", "", ""]
    assert rows[3][4] == "identical" and rows[2][3] == "1.40x"
    summary = report.autotune_summary(record)
    assert "**Target met**: trial #1, `interval=2, start_percent=0, reuse=hold`" in summary
    assert "1.60x measured, 1.70x FLOP-weighted, PSNR 24.0 dB" in summary
    missed = _record([Trial({"interval": 2, "start_percent": 0.0}, 15.0, 0.9, 1.1, 1.5)], value=30.0)
    text = report.autotune_summary(missed)
    assert missed["chosen"] is None and "**Target not met**" in text and "caching stays off" in text


def test_the_frontier_plot_draws_every_trial_the_frontier_and_the_choice():
    record = _synthetic()
    chart = charts.frontier_chart(record)
    image = chart.image
    h, w, _ = image.shape
    assert w == charts.PLOT_WIDTH and h > 300
    drawn = {i: (x, y, front) for i, x, y, front in chart.points}
    assert set(drawn) == {0, 1, 2, 3}
    for i, (x, y, front) in drawn.items():
        color = tuple(int(c) for c in image[round(y), round(x)])
        assert color == (charts.FRONTIER if front else charts.TRIAL), (i, color)
        assert front == record["trials"][i]["on_frontier"]
    # Speed goes right, PSNR goes up; identical images sit above every finite PSNR.
    assert drawn[1][0] > drawn[0][0] > drawn[2][0] > drawn[3][0]
    assert drawn[0][1] < drawn[2][1] < drawn[1][1] and drawn[3][1] < drawn[0][1]
    def dark(row, columns) -> bool:
        return bool((image[row, columns].max(axis=-1) < 100).any())
    x, y, _ = drawn[0]          # the chosen trial is ringed (dark pixels ~9 px from its centre)
    x, y = round(x), round(y)
    assert dark(y, slice(x + 6, x + 11)) and dark(y, slice(x - 10, x - 5))
    x, y, _ = drawn[1]          # the others are not
    x, y = round(x), round(y)
    assert not dark(y, slice(x + 6, x + 11))
    texts = [text for text, _ in chart.labels]
    assert {"#1", "#2", "#4"} <= set(texts) and "#3" not in texts        # only frontier trials are numbered
    assert "identical" in texts and "PSNR (dB)" in texts and "target PSNR >= 20 dB" in texts
    for text, box in chart.labels:
        assert 0 <= box[0] and box[2] <= w and 0 <= box[1] and box[3] <= h, (text, box)
        assert image[box[1]:box[3], box[0]:box[2]].min() < 160, text      # really drawn
    for (a_text, a), (b_text, b) in itertools.combinations(chart.labels, 2):
        assert charts._apart(a, b), (a_text, b_text)


def test_the_last_tune_is_shown_when_the_panel_opens(cache_dir):
    summary, table, plot, record, download, section = panel_app.last_autotune()
    assert summary == report.NO_AUTOTUNE and plot is None and record is None and table.empty
    assert "open" not in section                       # nothing kept: the section stays closed
    kept = _synthetic()
    path = tuning.save_last(kept)
    assert path == cache_dir / "last_autotune.json" and tuning.load_last() == kept
    summary, table, plot, record, download, section = panel_app.last_autotune()
    assert record == kept and section["open"] is True
    assert "_The last autotune, run " in summary and "FORA on Tiny DiT" in summary
    assert np.array_equal(plot, charts.frontier_chart(kept).image)
    assert _table_rows(table) == report.autotune_rows(kept)
    assert json.loads(Path(download).read_text()) == kept
    # The app runs it on load.
    app = panel_app.build()
    loads = [d for d in app.config["dependencies"] if d.get("api_name") == "last_autotune"]
    assert len(loads) == 1 and [t[1] for t in loads[0]["targets"]] == ["load"]
    path.write_text("{not json")
    summary, *_, section = panel_app.last_autotune()
    assert "could not be shown" in summary and "not readable JSON" in summary and section["open"] is True
    path.write_text(json.dumps({"format": "something else"}))
    assert "not a panel autotune record" in panel_app.last_autotune()[0]


def test_the_default_cache_folder_is_under_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(tuning.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.last_path() == tmp_path / "xdg" / "cachekit" / "panel" / "last_autotune.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tuning.last_path() == Path.home() / ".cache" / "cachekit" / "panel" / "last_autotune.json"


@pytest.mark.parametrize("args,message", [
    (("unet", "FORA", "psnr", 25), "FORA cannot be tuned on the unet model (it works on DiTs); tune DeepCache"),
    (("dit", "DeepCache", "psnr", 25), "DeepCache cannot be tuned on the dit model (it works on U-Nets); tune FORA"),
    (("dit", "Router", "psnr", 25), "Router has no autotune ladder, so it cannot be tuned"),
    (("dit", "TeaCache", "psnr", 25), "Unknown method 'TeaCache'; tune one of FORA, AdaptiveDiffusion"),
    (("unet", "DeepCache", "psnr", 0), "A PSNR target must be > 0 dB"),
    (("unet", "DeepCache", "psnr", 150), "A PSNR target must be at most 100 dB, got 150"),
    (("unet", "DeepCache", "speedup", 1.0), "A speedup target must be > 1"),
    (("unet", "DeepCache", "speedup", 50), "A speedup target must be at most 20x, got 50"),
    (("unet", "DeepCache", "quality", 30), "The target must be one of ('psnr', 'speedup')"),
    (("unet", "DeepCache", "psnr", None), "The target value, steps, images and max candidates must be numbers"),
    (("unet", "DeepCache", "psnr", float("nan")), "The target value must be a number"),
    (("vae", "DeepCache", "psnr", 25), "Unknown model 'vae'"),
])
def test_bad_requests_are_refused_with_a_clear_message_before_any_sampling(args, message, monkeypatch, cache_dir):
    from cachekit.panel import engine
    monkeypatch.setattr(engine, "model", lambda kind: pytest.fail("a refused request must not load the model"))
    with pytest.raises(gr.Error) as error:
        panel_app.autotune(*args, 10, 2, 8, progress=_Progress())
    assert message in error.value.message
    assert not (cache_dir / tuning.LAST_FILE).exists()


def test_bad_requests_reach_api_callers_as_the_same_message(server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match="FORA cannot be tuned on the unet model"):
        Client(server, verbose=False).predict("unet", "FORA", "psnr", 25, 6, 1, 4, api_name="/autotune")


def test_the_tunable_methods_per_model_come_from_the_registry():
    def expected(kind):
        return tuple(s.name for s in registry.methods() if s.key in registry.tunable_keys() and s.fits_model(kind))
    assert tuning.TUNABLE["unet"] == expected("unet") and "DeepCache" in expected("unet")
    assert tuning.TUNABLE["dit"] == expected("dit") and "FORA" in expected("dit")
    assert "Router" not in tuning.TUNABLE["dit"] and "ChangeCache" in tuning.TUNABLE["unet"]
    assert panel_app._tune_methods_for("dit")["choices"] == list(expected("dit"))
    # A method registered later is tunable in the panel without a change there.
    extra = dataclasses.replace(registry.get("fora"), key="fora_panel_test", name="FORA panel test", node=None,
                                hosts={})
    registry.register(extra)
    try:
        assert "FORA panel test" in tuning.TUNABLE["dit"] and "FORA panel test" not in tuning.TUNABLE["unet"]
    finally:
        registry.unregister(extra.key)
    assert "FORA panel test" not in tuning.TUNABLE["dit"]


def test_the_chosen_settings_can_be_used_in_the_main_controls():
    record = _synthetic()
    *updates, steps, note = panel_app.apply_autotune(record)
    model, method, *controls = updates
    assert model["value"] == "dit" and method["value"] == "FORA" and "FORA" in method["choices"]
    values = {name: u.get("value") for name, u in zip(panel_app.CONTROLS, controls)}
    assert values == {"interval": 2, "branch": None, "delta": None, "max_skip_steps": None, "threshold": None,
                      "start_percent": 0.0, "reuse": "hold"}
    assert steps["value"] == 10 and "Set **FORA** on the Tiny DiT: interval 2, start 0% of steps" in note
    adaptive = _record([Trial({"delta": 0.1, "max_skip_steps": 2}, 33.0, 1.4, 0.7, 1.6)], value=30.0,
                       method="AdaptiveDiffusion", model="unet")
    *updates, steps, note = panel_app.apply_autotune(adaptive)
    assert updates[0]["value"] == "unet" and updates[1]["value"] == "AdaptiveDiffusion"
    assert updates[2 + panel_app.CONTROLS.index("delta")]["value"] == 0.1
    assert updates[2 + panel_app.CONTROLS.index("max_skip_steps")]["value"] == 2
    assert "max skip 2" in note and "No control here" not in note
    # a setting the panel has no control for is named, and left to the method's default
    official = _record([Trial({"delta": 0.1, "max_skip_steps": 2, "official_cap": True}, 33.0, 1.4, 0.7, 1.6)],
                       value=30.0, method="AdaptiveDiffusion", model="unet")
    *_, note = panel_app.apply_autotune(official)
    assert "No control here for official_cap=True" in note
    with pytest.raises(gr.Error, match="nothing to use"):
        panel_app.apply_autotune(_record([Trial({"interval": 2, "start_percent": 0.0}, 15.0, 0.9, 1.1, 1.5)],
                                         value=30.0))
    with pytest.raises(gr.Error, match="Run autotune first"):
        panel_app.apply_autotune(None)


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no Debian chromium (apt-get install chromium)")
def test_browser_shows_the_last_tune_on_open_and_uses_its_choice(server, cache_dir):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    tuning.save_last(_synthetic())
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(server)
            # No click: the load event fills the Autotune section and opens it.
            page.wait_for_function("() => (document.querySelector('#autotune-summary')?.innerText || '')"
                                   ".includes('The last autotune')", timeout=60_000)
            # The plot is its own output and a lazy image: bring it into view, then wait for it.
            plot = page.locator("#autotune-plot img")
            plot.scroll_into_view_if_needed()
            plot.wait_for(state="visible", timeout=30_000)
            assert "interval=3, start_percent=0, reuse=hold" in page.inner_text("#autotune-table")
            assert "DeepCache" in page.inner_text("#method-info")
            page.locator("#autotune-apply").click()
            page.wait_for_function("() => document.querySelector('#method-info')?.innerText.includes('FORA')",
                                   timeout=30_000)
            page.wait_for_function("() => (document.querySelector('#autotune-apply-note')?.innerText || '')"
                                   ".includes('Press Generate')", timeout=30_000)
            assert page.locator("#start-percent").is_visible() and not page.locator("#branch").is_visible()
            assert page.locator("#steps input[type=number]").input_value() == "10"
            assert page.locator("#interval input[type=number]").input_value() == "2"
        finally:
            browser.close()
