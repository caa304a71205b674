"""Telemetry to the frontend in real ComfyUI: live events, the /cachekit/runs route, the stats node."""
from __future__ import annotations

import asyncio
import json

import pytest

from .comfy_graph import RESULTS, Graph
from .test_comfy_methods import DEEPCACHE

STEPS = 6


class _Recorder:
    def __init__(self):
        self.events = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, json.loads(json.dumps(data))))     # what goes over the websocket


@pytest.fixture
def recorder(comfy, monkeypatch):
    history = comfy.pack("nodes.history")
    rec = _Recorder()
    monkeypatch.setattr(history, "_server", lambda: rec)     # stands in for PromptServer.instance
    monkeypatch.setattr(history, "LIVE_INTERVAL_S", 0.0)
    return rec


def _deepcache_graph(key):
    g = Graph("sd15").patch("CacheKitDeepCache", **DEEPCACHE)
    patch_node = g.model[0]
    ks = g.sample(key, steps=STEPS, cfg=2.0)
    return g, patch_node, ks


def test_each_step_and_the_end_of_a_run_are_sent_to_the_frontend(comfy, recorder):
    g, patch_node, ks = _deepcache_graph("live-1")
    comfy.run(g.prompt, comfy.fresh_executor())
    progress = [d for e, d in recorder.events if e == "cachekit.progress"]
    final = [d for e, d in recorder.events if e == "cachekit.run"]
    assert len(final) == 1 and len(progress) == 1 + STEPS            # at the start, then after every step
    run = final[0]
    assert run["node_id"] == patch_node and run["sampler_node_id"] == ks and run["finished"]
    assert all(p["id"] == run["id"] and p["finished"] is None for p in progress)
    # Live numbers grow step by step up to the final record.
    units_so_far = [sum(v is not None for row in p["telemetry"]["heatmap"] for v in row) for p in progress]
    assert [p["telemetry"]["model_calls"] for p in progress] == list(range(0, STEPS + 1))
    assert run["telemetry"]["hit_rate"] == pytest.approx(comfy.pack("nodes.history").last().hit_rate)
    assert run["telemetry"]["hit_rate"] > 0
    assert run["telemetry"]["measured_speedup"] is not None
    assert units_so_far == sorted(units_so_far) and units_so_far[0] == 0 and units_so_far[-1] > 0


def _request(query):
    from multidict import MultiDict        # what aiohttp hands the route
    return type("Request", (), {"query": MultiDict(query)})()


def test_runs_route_serves_recent_runs_and_validates_its_parameters(comfy, recorder):
    routes = comfy.pack("nodes.routes")
    g, patch_node, _ = _deepcache_graph("live-2")
    comfy.run(g.prompt, comfy.fresh_executor())
    ok = asyncio.run(routes.runs(_request({"limit": "1"})))
    body = json.loads(ok.body)
    assert ok.status == 200 and len(body["runs"]) == 1 and body["runs"][0]["node_id"] == patch_node
    mine = json.loads(asyncio.run(routes.runs(_request({"node_id": patch_node}))).body)["runs"]
    assert mine and all(r["node_id"] == patch_node for r in mine)
    for query in ({"limit": "0"}, {"limit": "-1"}, {"limit": "abc"}, {"limit": "999"},
                  {"node_id": "../../etc/passwd"}, {"node_id": "x" * 100}):
        bad = asyncio.run(routes.runs(_request(query)))
        assert bad.status == 400 and "error" in json.loads(bad.body), query


def test_stats_node_outputs_the_heatmap_image_and_a_summary(comfy):
    g = Graph("sd15").patch("CacheKitDeepCache", **DEEPCACHE).patch("CacheKitAdaptiveSkip", delta=1.0, max_skip_steps=2)
    ks = g.sample("stats", steps=10, cfg=2.0)
    stats = g.add("CacheKitStats", model=g.model, samples=[ks, 0])
    g.add("CKTestCaptureImage", value=[stats, 0], key="stats-image")
    g.add("CKTestCaptureString", value=[stats, 1], key="stats-summary")
    comfy.run(g.prompt, comfy.fresh_executor())
    image, summary = RESULTS["stats-image"], RESULTS["stats-summary"]
    lines = summary.splitlines()
    assert len(lines) == 2 and lines[0].startswith("DeepCache") and lines[1].startswith("AdaptiveDiffusion")
    assert "skipped steps" in lines[0] and "skipped steps" in lines[1]
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3 and 0 <= image.min() <= image.max() <= 1
    assert image.shape[2] == 10 * 8                          # one 8-pixel column per step


def test_stats_node_without_a_cachekit_model_explains_what_to_connect(comfy):
    g = Graph("sd15")
    ks = g.sample("stats-none", steps=2)
    stats = g.add("CacheKitStats", model=g.model, samples=[ks, 0])
    g.add("CKTestCaptureString", value=[stats, 1], key="stats-none-summary")
    with pytest.raises(AssertionError, match="no CacheKit method"):
        comfy.run(g.prompt, comfy.fresh_executor())


def _renumbered(prompt: dict, mapping: dict) -> dict:
    """The same API prompt with some node ids changed (links follow)."""
    def relink(value):
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
            return [mapping.get(value[0], value[0]), value[1]]
        return value
    return {mapping.get(node_id, node_id): {**node, "inputs": {k: relink(v) for k, v in node["inputs"].items()}}
            for node_id, node in prompt.items()}


def test_a_cached_node_output_is_credited_to_the_node_id_of_the_current_graph(comfy, recorder):
    # Regression: ComfyUI served the patched MODEL from its node cache, so a run in a later
    # prompt whose CacheKit node had another id was credited to the old id.
    g, patch_node, ks = _deepcache_graph("credit-1")
    executor = comfy.fresh_executor()              # one executor: its node cache carries over
    comfy.run(g.prompt, executor)
    moved = _renumbered(g.prompt, {patch_node: "77"})
    moved[ks]["inputs"]["seed"] += 1               # the sampler runs again; the patch node is unchanged
    comfy.run(moved, executor)
    finals = [d for e, d in recorder.events if e == "cachekit.run"]
    assert [run["node_id"] for run in finals] == [patch_node, "77"]


def test_two_identical_cachekit_nodes_in_one_prompt_are_credited_each_to_its_own_sampler(comfy, recorder):
    # Regression: two identical nodes had one cache entry, so both KSamplers' runs went to the first.
    g = Graph("sd15")
    first = g.patch("CacheKitDeepCache", **DEEPCACHE).model[0]
    ks_first = g.sample("credit-2a", steps=STEPS, cfg=2.0)
    g.model = [g.loader, 0]
    second = g.patch("CacheKitDeepCache", **DEEPCACHE).model[0]
    ks_second = g.sample("credit-2b", steps=STEPS, cfg=2.0, seed=8)
    comfy.run(g.prompt, comfy.fresh_executor())
    credit = {run["sampler_node_id"]: run["node_id"] for e, run in recorder.events if e == "cachekit.run"}
    assert credit == {ks_first: first, ks_second: second}


@pytest.mark.parametrize("query", [{"limit": "²"}, {"limit": "٣"}, {"limit": "1" * 5000}, {"limit": " 3"},
                                   {"limit": "3\n"}, {"node_id": "10\n"}, {"node_id": "10%0A"},
                                   {"node_id": "１２"}, {"node_id": ""}, {"limit": ""}])
def test_runs_route_answers_400_with_a_message_to_every_bad_parameter(comfy, query):
    # Regression: "²" passed str.isdigit() and int() raised (500); 5000 digits hit Python's
    # int-string limit; "10\n" passed a `$`-anchored pattern.
    response = asyncio.run(comfy.pack("nodes.routes").runs(_request(query)))
    assert response.status == 400 and json.loads(response.body)["error"]
