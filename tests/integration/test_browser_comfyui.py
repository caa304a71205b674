"""The real ComfyUI server and frontend in a real browser (Debian chromium + playwright).

The pack loads; workflows/deepcache_sd15.json runs on a tiny SD1.5-format checkpoint (shrunk
to 64 px and 8 steps); the CacheKit sidebar tab shows that run's hit rate and the DeepCache
node's badge shows it too; a run with a noise-injecting sampler shows its guard note on its card;
every workflow in workflows/ opens without missing nodes.
Screenshot: artifacts/comfyui_sidebar.png. Skips without COMFYUI_DIR, playwright or chromium.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
CHROMIUM = "/usr/bin/chromium"
CHECKPOINT_CACHE = Path(os.environ.get("CACHEKIT_TEST_MODELS", "/tmp/cachekit-test-models"))


def _requirements() -> Path:
    root = os.environ.get("COMFYUI_DIR")
    if not root or not (Path(root) / "main.py").is_file():
        pytest.skip("set COMFYUI_DIR to a ComfyUI source tree to run the browser test")
    pytest.importorskip("playwright", reason="playwright is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    return Path(root)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory):
    root = _requirements()
    base = tmp_path_factory.mktemp("comfy-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-CacheKit").symlink_to(ROOT, target_is_directory=True)
    checkpoint = CHECKPOINT_CACHE / "checkpoints" / "v1-5-pruned-emaonly-fp16.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    builder = ("import sys; import comfy.options; comfy.options.enable_args_parsing(False); "
               "from comfy.cli_args import args; args.cpu = True; import utils.install_util; "
               f"sys.path.insert(0, {str(Path(__file__).parent)!r}); from comfy_checkpoint import write_sd15_checkpoint; "
               f"from pathlib import Path; write_sd15_checkpoint(Path({str(checkpoint)!r}))")
    subprocess.run([sys.executable, "-c", builder], check=True, env=env, cwd=str(root), timeout=600)
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / checkpoint.name).symlink_to(checkpoint)
    (base / "user" / "default").mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    port = _free_port()
    log = open(base / "server.log", "w")
    process = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                "--disable-auto-launch", "--base-directory", str(base),
                                "--database-url", "sqlite:///:memory:"],
                               cwd=str(root), env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                info = _get_json(f"{url}/object_info/CacheKitDeepCache")
                if "CacheKitDeepCache" in info:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("ComfyUI did not start:\n" + (base / "server.log").read_text()[-4000:])
        if "IMPORT FAILED: nodes_upscale_model.py" in (base / "server.log").read_text():
            # The frontend (1.27) cannot build model loader nodes when a loader it maps model
            # folders to is missing; UpscaleModelLoader needs spandrel (and torchvision).
            pytest.skip("ComfyUI's upscale-model nodes did not import (install spandrel, and a torchvision with "
                        "transforms.functional); the frontend then fails on CheckpointLoaderSimple")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def page(comfy_server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(comfy_server)
        page.wait_for_function("() => !!(window.app && window.app.graph && window.app.extensionManager "
                               "&& window.LiteGraph && window.LiteGraph.registered_node_types['CacheKitDeepCache'])",
                               timeout=120_000)
        page.cachekit_errors = errors
        yield page
        browser.close()


def _load(page, path: Path) -> None:
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", json.loads(path.read_text()))


def test_every_workflow_opens_without_missing_nodes(page):
    assert WORKFLOWS
    for path in WORKFLOWS:
        _load(page, path)
        missing = page.evaluate("""() => window.app.graph._nodes
            .filter(n => !(n.type in window.LiteGraph.registered_node_types)
                         || (n.type !== 'Note' && n.type !== 'MarkdownNote' && !n.comfyClass))
            .map(n => n.type)""")
        count = page.evaluate("() => window.app.graph._nodes.length")
        expected = len(json.loads(path.read_text())["nodes"])
        assert missing == [] and count == expected, (path.name, missing, count, expected)
    assert not [e for e in page.cachekit_errors if "cachekit" in e.lower()]


def _queue_and_wait(page, comfy_server) -> dict:
    """Queue the loaded workflow from the frontend; the CacheKit run it finishes."""
    before = len(_get_json(f"{comfy_server}/cachekit/runs")["runs"])
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    deadline = time.time() + 300
    while time.time() < deadline:
        runs = _get_json(f"{comfy_server}/cachekit/runs")["runs"]
        if len(runs) > before:
            return runs[-1]
        time.sleep(1)
    pytest.fail("the workflow did not finish a CacheKit run within 5 minutes")


def test_a_workflow_runs_and_the_sidebar_and_badge_show_its_hit_rate(page, comfy_server):
    _load(page, ROOT / "workflows" / "deepcache_sd15.json")
    deepcache_id = page.evaluate("""() => {
        const g = window.app.graph;
        for (const n of g._nodes) {
            const set = (name, v) => { const w = n.widgets.find(w => w.name === name); w.value = v; };
            if (n.type === 'EmptyLatentImage') { set('width', 64); set('height', 64); }
            if (n.type === 'KSampler') { set('steps', 8); }
        }
        return g._nodes.find(n => n.type === 'CacheKitDeepCache').id;
    }""")
    run = _queue_and_wait(page, comfy_server)
    assert run["node_id"] == str(deepcache_id) and run["telemetry"]["method"] == "DeepCache"
    expected = f"{round(run['telemetry']['hit_rate'] * 100)}%"
    assert run["telemetry"]["hit_rate"] > 0.3
    # The badge of the DeepCache node.
    page.wait_for_function("(id) => (window.app.graph.getNodeById(id).cachekitBadgeText || '').includes('%')",
                           arg=deepcache_id, timeout=30_000)
    badge = page.evaluate("(id) => window.app.graph.getNodeById(id).cachekitBadgeText", deepcache_id)
    assert badge == f"hit {expected}"
    # The sidebar tab.
    page.evaluate("() => window.app.extensionManager.sidebarTab.toggleSidebarTab('cachekit')")
    card = page.locator(f"#cachekit-sidebar .cachekit-run[data-run-id='{run['id']}']")
    card.wait_for(timeout=30_000)
    assert card.locator(".cachekit-hit-rate").inner_text() == expected
    assert card.locator("canvas.cachekit-heatmap").count() == 1 and card.locator("canvas.cachekit-steps").count() == 1
    # The cache's memory, formatted as core/telemetry.py's format_bytes does.
    import importlib.util
    spec = importlib.util.spec_from_file_location("cachekit_telemetry", ROOT / "core" / "telemetry.py")
    telemetry_module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)   # (a dataclass needs it there)
    spec.loader.exec_module(telemetry_module)
    assert run["telemetry"]["cache_bytes"] > 0
    assert card.locator(".cachekit-cache-bytes").inner_text() == telemetry_module.format_bytes(run["telemetry"]["cache_bytes"])
    # The Gradio panel's client reads the same run from this real server.
    spec = importlib.util.spec_from_file_location("cachekit_comfy_client", ROOT / "panel" / "comfy_client.py")
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    assert client.fetch_runs(comfy_server)[-1]["telemetry"]["hit_rate"] == run["telemetry"]["hit_rate"]
    page.wait_for_timeout(500)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "comfyui_sidebar.png"))
    assert not [e for e in page.cachekit_errors if "cachekit" in e.lower()]


def test_change_cache_workflow_shows_each_steps_decision_value_in_the_sidebar(page, comfy_server):
    _load(page, ROOT / "workflows" / "change_cache_sd15.json")
    node_id = page.evaluate("""() => {
        const g = window.app.graph;
        for (const n of g._nodes) {
            const set = (name, v) => { const w = n.widgets.find(w => w.name === name); w.value = v; };
            if (n.type === 'EmptyLatentImage') { set('width', 64); set('height', 64); }
            if (n.type === 'KSampler') { set('steps', 8); }
            if (n.type === 'CacheKitChangeCache') { set('threshold', 5.0); set('warmup_steps', 1); }
        }
        return g._nodes.find(n => n.type === 'CacheKitChangeCache').id;
    }""")
    run = _queue_and_wait(page, comfy_server)
    telemetry = run["telemetry"]
    assert run["node_id"] == str(node_id) and telemetry["method"] == "ChangeCache" and telemetry["hit_rate"] > 0
    if not page.locator("#cachekit-sidebar").is_visible():      # an earlier test may have left it open
        page.evaluate("() => window.app.extensionManager.sidebarTab.toggleSidebarTab('cachekit')")
    card = page.locator(f"#cachekit-sidebar .cachekit-run[data-run-id='{run['id']}']")
    card.wait_for(timeout=30_000)
    text = card.locator(".cachekit-probe-values").inner_text()
    shown = [item.split(":") for item in text.split()]
    assert [int(step) for step, _ in shown] == list(range(8)), text
    for (_, value), want in zip(shown, telemetry["probe_values"]):
        assert (value == "-") if want is None else abs(float(value) - want) <= 0.006 * abs(want), (text, want)
    assert shown[0][1] == "-" and card.locator(".cachekit-probes canvas").count() == 1
    assert telemetry["probe_label"] in card.inner_text()
    assert not [e for e in page.cachekit_errors if "cachekit" in e.lower()]


def test_a_run_with_a_noise_injecting_sampler_shows_its_note_on_the_sidebar_card(page, comfy_server):
    _load(page, ROOT / "workflows" / "deepcache_sd15.json")
    page.evaluate("""() => {
        for (const n of window.app.graph._nodes) {
            const set = (name, v) => { const w = n.widgets.find(w => w.name === name); w.value = v; };
            if (n.type === 'EmptyLatentImage') { set('width', 64); set('height', 64); }
            if (n.type === 'KSampler') { set('steps', 8); set('sampler_name', 'euler_ancestral'); }
        }
    }""")
    run = _queue_and_wait(page, comfy_server)
    notes = run["telemetry"]["notes"]
    assert any(note.startswith("euler_ancestral adds fresh noise") for note in notes), notes
    if not page.locator("#cachekit-sidebar").is_visible():      # an earlier test may have left it open
        page.evaluate("() => window.app.extensionManager.sidebarTab.toggleSidebarTab('cachekit')")
    card = page.locator(f"#cachekit-sidebar .cachekit-run[data-run-id='{run['id']}']")
    card.wait_for(timeout=30_000)
    shown = card.locator(".cachekit-note")
    assert shown.count() == len(notes) and [shown.nth(i).inner_text() for i in range(len(notes))] == notes
    assert shown.first.is_visible()
    assert not [e for e in page.cachekit_errors if "cachekit" in e.lower()]


def test_two_samplers_splitting_one_schedule_show_their_steps_in_it(page, comfy_server):
    """Wan 2.2-style: two KSamplerAdvanced split one 8-step schedule at 4, each model patched by its
    own CacheKit node; the sidebar cards say which steps of the schedule each run sampled."""
    ckpt = "v1-5-pruned-emaonly-fp16.safetensors"
    sampler = {"noise_seed": 7, "steps": 8, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple",
               "positive": ["2", 0], "negative": ["3", 0]}
    deepcache = {"cache_branch": 0, "schedule": "uniform", "center": 15, "power": 1.4, "start_percent": 0.0,
                 "end_percent": 1.0}
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "CacheKitDeepCache", "inputs": {"model": ["1", 0], "cache_interval": 3, **deepcache}},
        "6": {"class_type": "CacheKitDeepCache", "inputs": {"model": ["1", 0], "cache_interval": 2, **deepcache}},
        "7": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["5", 0], "add_noise": "enable", "latent_image": ["4", 0], "start_at_step": 0, "end_at_step": 4,
            "return_with_leftover_noise": "enable", **sampler}},
        "8": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["6", 0], "add_noise": "disable", "latent_image": ["7", 0], "start_at_step": 4,
            "end_at_step": 10000, "return_with_leftover_noise": "disable", **sampler}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }
    before = len(_get_json(f"{comfy_server}/cachekit/runs")["runs"])
    client_id = page.evaluate("() => window.app.api.clientId || window.app.api.initialClientId || ''")
    body = json.dumps({"prompt": prompt, "client_id": client_id}).encode()
    request = urllib.request.Request(f"{comfy_server}/prompt", data=body, headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).read()
    deadline = time.time() + 300
    while len(runs := _get_json(f"{comfy_server}/cachekit/runs")["runs"]) < before + 2 and time.time() < deadline:
        time.sleep(1)
    high, low = runs[-2:]
    assert (high["node_id"], low["node_id"]) == ("5", "6")
    assert high["telemetry"]["run_steps"] == [0, 4] and low["telemetry"]["run_steps"] == [4, 8]
    assert high["telemetry"]["num_steps"] == low["telemetry"]["num_steps"] == 8
    if not page.locator("#cachekit-sidebar").is_visible():
        page.evaluate("() => window.app.extensionManager.sidebarTab.toggleSidebarTab('cachekit')")
    for run, text in ((high, "steps 0–3 of 8"), (low, "steps 4–7 of 8")):
        card = page.locator(f"#cachekit-sidebar .cachekit-run[data-run-id='{run['id']}']")
        card.wait_for(timeout=30_000)
        assert text in card.inner_text()
    assert not [e for e in page.cachekit_errors if "cachekit" in e.lower()]


@pytest.mark.parametrize("query", ["limit=%C2%B2", "limit=" + "9" * 5000, "node_id=10%0A", "limit=3&limit=4",
                                   "node_id=%EF%BC%91"])
def test_the_real_server_answers_bad_runs_queries_with_400_and_json(comfy_server, query):
    import urllib.error
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"{comfy_server}/cachekit/runs?{query}", timeout=10)
    assert error.value.code == 400 and json.loads(error.value.read())["error"]
