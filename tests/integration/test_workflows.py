"""Every workflow in workflows/ against the real node schemas of ComfyUI and of this pack.

Checks: every node type exists; every link connects an output to an input of the same type
(or an any-type input); widget values are as many as the node's widgets (seeds carry the
frontend's control value) and in range: numbers within min/max, choices among the options
(model file lists are empty here, so file names only need a model file extension).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MODEL_FILE = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")
IMAGE_FILE = (".png", ".jpg", ".jpeg", ".webp")


def _inputs(cls, sections=("required", "optional")) -> list[tuple[str, object, dict]]:
    spec = cls.INPUT_TYPES()
    out = []
    for section in sections:
        for name, value in spec.get(section, {}).items():
            type_, options = value[0], (value[1] if len(value) > 1 and isinstance(value[1], dict) else {})
            out.append((name, type_, options))
    return out


def _is_widget(type_, options) -> bool:
    return isinstance(type_, (list, tuple)) or (isinstance(type_, str) and type_ in WIDGET_TYPES
                                                and not options.get("forceInput"))


def _check_value(node, name, type_, options, value):
    where = f"{node['type']}#{node['id']}.{name} = {value!r}"
    choices = type_ if isinstance(type_, (list, tuple)) else options.get("options")
    if choices is not None:
        if isinstance(value, str) and value.endswith(MODEL_FILE) and re.search(r"_name\d*$", name):
            return        # a model file: the lists are empty (or only built-ins) without model files
        if isinstance(value, str) and value.endswith(IMAGE_FILE) and name == "image":
            return        # an input image (LoadImage): the input folder is empty here
        assert value in choices, where
        return
    if type_ in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        if type_ == "INT":
            assert float(value).is_integer(), where
        assert options.get("min", -float("inf")) <= value <= options.get("max", float("inf")), where
    elif type_ == "BOOLEAN":
        assert isinstance(value, bool), where
    elif type_ == "STRING":
        assert isinstance(value, str), where


def test_there_is_a_workflow_for_every_method_and_family():
    names = {p.stem for p in WORKFLOWS}
    assert {"deepcache_sd15", "deepcache_sdxl", "fora_sd3", "fora_flux", "fora_pixart", "fora_wan",
            "adaptive_skip_sd15", "stack_deepcache_adaptive_sd15", "autotune_deepcache_sd15", "router_pixart",
            "fora_wan22_two_experts", "deepcache_sd21", "deepcache_sdxl_refiner", "deepcache_svd",
            "fora_qwen_image", "fora_hunyuan_video", "fora_wan22_5b"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_matches_the_real_node_schemas(comfy, path):
    import nodes
    data = json.loads(path.read_text())
    by_id = {n["id"]: n for n in data["nodes"]}
    assert any(n["type"] == "Note" for n in data["nodes"]), "every workflow explains its settings in a note"
    assert any(n["type"].startswith("CacheKit") for n in data["nodes"])
    for node in data["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        assert node["type"] in nodes.NODE_CLASS_MAPPINGS, f"unknown node type {node['type']} in {path.name}"
        cls = nodes.NODE_CLASS_MAPPINGS[node["type"]]
        inputs = _inputs(cls)
        linked = {i["name"] for i in node.get("inputs", [])}
        widgets = [(n, t, o) for n, t, o in inputs if _is_widget(t, o) and n not in linked]
        values = list(node.get("widgets_values", []))
        expected = len(widgets) + sum(1 for n, t, o in widgets if o.get("control_after_generate") or n in ("seed", "noise_seed"))
        assert len(values) == expected, f"{node['type']}#{node['id']} in {path.name}: {len(values)} widget values, expected {expected}"
        for name, type_, options in widgets:
            _check_value(node, name, type_, options, values.pop(0))
            if options.get("control_after_generate") or name in ("seed", "noise_seed"):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize"), node["type"]
        required = {n for n, t, o in _inputs(cls, ("required",)) if not _is_widget(t, o)}
        assert required <= linked, f"{node['type']}#{node['id']} in {path.name}: unconnected {required - linked}"
        names = [n for n, _, _ in inputs]
        for slot in node.get("inputs", []):
            assert slot["name"] in names, f"{node['type']} has no input {slot['name']}"
    for link_id, src, src_slot, dst, dst_slot, type_ in data["links"]:
        source, target = by_id[src], by_id[dst]
        out_types = nodes.NODE_CLASS_MAPPINGS[source["type"]].RETURN_TYPES
        assert out_types[src_slot] == type_, f"link {link_id} in {path.name}: {source['type']} slot {src_slot} is {out_types[src_slot]}, not {type_}"
        input_name = target["inputs"][dst_slot]["name"]
        declared = dict((n, t) for n, t, _ in _inputs(nodes.NODE_CLASS_MAPPINGS[target["type"]]))[input_name]
        assert declared == type_ or not (declared != type_), \
            f"link {link_id} in {path.name}: {type_} into {target['type']}.{input_name} ({declared})"
        assert target["inputs"][dst_slot]["link"] == link_id and link_id in source["outputs"][src_slot]["links"]
