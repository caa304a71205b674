"""The Gradio preview panel: its API returns what a direct run computes, and a real browser
shows the run's hit rate in the sidebar (screenshot kept in artifacts/)."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install -r requirements-dev.txt)")

from cachekit.panel import app as panel_app  # noqa: E402
from cachekit.panel import engine  # noqa: E402
from cachekit.core.heatmap import block_heatmap, heatmap_image  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
ARGS = ("unet", "DeepCache", 3, 0, "triangle", 5, 6, 3.0, 2, 0.05, 0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    app = panel_app.build().queue()
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


def _png(path) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"))


def test_api_returns_the_images_and_hit_rates_of_a_direct_run(server):
    from gradio_client import Client
    out = Client(server, verbose=False).predict(*ARGS, api_name="/generate")
    uncached, cached, summary, step_plot, block_plot, heatmap, stats = out
    direct = engine.run(engine.Request("unet", "DeepCache", 3, 0, "triangle", 5, 6, 3.0, 2), progress=False)
    assert np.array_equal(_png(uncached), panel_app._picture(direct.uncached))
    assert np.array_equal(_png(cached), panel_app._picture(direct.cached))
    assert not np.array_equal(_png(uncached), _png(cached))
    t = stats["telemetry"]
    assert t["step_hit_rates"] == direct.telemetry["step_hit_rates"]
    assert t["heatmap"] == direct.telemetry["heatmap"]
    assert t["hit_rate"] == pytest.approx(direct.telemetry["hit_rate"]) and t["hit_rate"] > 0.3
    assert [row[1] for row in step_plot["data"]] == pytest.approx([v or 0.0 for v in t["step_hit_rates"]])
    assert f"Hit rate {t['hit_rate']:.0%}" in summary
    assert _png(heatmap).shape[0] > 0


def test_adaptive_step_skipping_runs_in_the_panel_engine():
    result = engine.run(engine.Request("unet", "AdaptiveDiffusion", class_name="circle", steps=12, images=1, delta=0.5),
                        progress=False)
    t = result.telemetry
    assert t["method"] == "AdaptiveDiffusion" and t["skipped_steps"]
    assert t["hit_rate"] == pytest.approx(len(t["skipped_steps"]) / 12)
    assert 12 < result.psnr_db < float("inf")       # 7 of 12 steps skipped: visibly close, not equal


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


def test_heatmap_layout():
    t = {"groups": ["a", "a", "b"], "num_steps": 2, "heatmap": [[0.0, 0.0, None], [1.0, 0.0, 1.0]]}
    groups, heat = block_heatmap(t)
    assert groups == ["a", "b"]
    assert heat[0, 0] == 0.0 and np.isnan(heat[0, 1]) and heat[1, 0] == 0.5 and heat[1, 1] == 1.0
    picture = heatmap_image(heat, cell=2)
    assert picture.shape == (4, 4, 3)          # rows = blocks, columns = steps


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no Debian chromium (apt-get install chromium)")
def test_browser_runs_a_generation_and_sees_the_sidebar_hit_rate(server):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(server)
            page.locator("#generate").click()
            page.wait_for_function(
                "() => (document.querySelector('#hit-summary')?.innerText || '').includes('Hit rate')", timeout=180_000)
            text = page.inner_text("#hit-summary")
            page.wait_for_timeout(1000)
            page.screenshot(path=str(ARTIFACTS / "panel.png"), full_page=True)
        finally:
            browser.close()
    assert "Hit rate" in text and "Speedup" in text and "PSNR" in text
    assert (ARTIFACTS / "panel.png").stat().st_size > 10_000


@pytest.fixture
def fake_comfyui():
    """A stand-in ComfyUI that serves /cachekit/runs (the real one is in tests/integration)."""
    import http.server
    import json
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
    summary, step_plot, block_plot, heatmap, listing, newest = Client(server, verbose=False).predict(
        url, api_name="/comfy_runs")
    assert f"Hit rate {telemetry['hit_rate']:.0%}" in summary
    assert newest["id"] == 7 and newest["telemetry"]["heatmap"] == telemetry["heatmap"]
    assert [row[1] for row in step_plot["data"]] == pytest.approx([v or 0.0 for v in telemetry["step_hit_rates"]])
    assert "run 7: DeepCache on node #5" in listing


def test_attach_errors_are_clear():
    from cachekit.panel import comfy_client
    with pytest.raises(ValueError, match="must look like"):
        comfy_client.runs_url("file:///etc/passwd")
    with pytest.raises(ValueError, match="Cannot reach ComfyUI"):
        comfy_client.fetch_runs(f"http://127.0.0.1:{_free_port()}", timeout=2)
    assert comfy_client.runs_url("http://127.0.0.1:8188/") == "http://127.0.0.1:8188/cachekit/runs?limit=32"
