"""Real-ComfyUI integration harness (in-process, CPU).

Needs a ComfyUI source tree in COMFYUI_DIR and a Python with ComfyUI's requirements; skips
with the reason otherwise. The pack is linked into a temporary custom_nodes folder and loaded
by ComfyUI's own loader, so the tests see exactly what ComfyUI sees. Graphs run through
ComfyUI's validator and PromptExecutor with its node output cache.
"""
from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "ComfyUI-CacheKit"


class _ServerStub:
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.events = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))

    def queue_updated(self):
        pass


class Comfy:
    """What the tests use: ComfyUI's modules, the loaded pack, and a prompt runner."""

    def __init__(self, root: Path):
        import torch
        torch.set_num_threads(1)
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))       # only ComfyUI's own root, never the pack
        import comfy.options
        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import args
        args.cpu = True
        # As main.py does first: ComfyUI's `utils` package must win over comfy/utils.py, which
        # some extra nodes would otherwise find as a top-level `utils`.
        import utils.install_util  # noqa: F401
        import comfy.model_management  # noqa: F401
        import comfy.sample  # noqa: F401
        import execution
        import folder_paths  # noqa: F401
        import nodes
        self.nodes, self.execution = nodes, execution
        self._tmp = tempfile.TemporaryDirectory(prefix="cachekit-comfy-")
        link = Path(self._tmp.name) / PACK_NAME
        link.symlink_to(ROOT, target_is_directory=True)
        # All of ComfyUI's built-in extra nodes (EasyCache, SD3 / Flux / video latents, PreviewAny ...),
        # as a server has them: the workflows in workflows/ use several.
        asyncio.run(nodes.init_builtin_extra_nodes())
        ok = asyncio.run(nodes.load_custom_node(str(link)))
        # ComfyUI names a pack's module after its path (dots replaced).
        self.pack_module = str(link).replace(".", "_x_")
        if not ok or "CacheKitDeepCache" not in nodes.NODE_CLASS_MAPPINGS:
            raise RuntimeError("ComfyUI did not load the CacheKit pack; see the log above")
        from . import comfy_graph
        comfy_graph.register_test_nodes(nodes)
        self.server = _ServerStub()
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC)

    def pack(self, submodule: str):
        return sys.modules[f"{self.pack_module}.{submodule}"]

    def run(self, prompt: dict, executor=None) -> None:
        executor = executor or self.executor
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        assert valid[0], f"invalid prompt: {valid[1]} {valid[3]}"
        executor.execute(prompt, prompt_id, {"client_id": None}, valid[2])
        if not executor.success:
            errors = [data for event, data in executor.status_messages if event == "execution_error"]
            raise AssertionError(f"prompt failed: {errors}")

    def fresh_executor(self):
        return self.execution.PromptExecutor(self.server, cache_type=self.execution.CacheType.CLASSIC)


_COMFY: Comfy | None = None


@pytest.fixture(scope="session")
def comfy() -> Comfy:
    global _COMFY
    root = os.environ.get("COMFYUI_DIR")
    if not root or not (Path(root) / "comfy" / "model_patcher.py").is_file():
        pytest.skip("no ComfyUI tree: set COMFYUI_DIR to a ComfyUI checkout and run with a Python that has "
                    "its requirements (see README, 'Testing against real ComfyUI')")
    if _COMFY is None:
        try:
            _COMFY = Comfy(Path(root))
        except ImportError as error:
            pytest.skip(f"ComfyUI at {root} cannot be imported with this Python: {error}")
    return _COMFY


@pytest.fixture
def router_dir(comfy, tmp_path, monkeypatch):
    """A temporary models/cachekit_routers folder."""
    import folder_paths
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "cachekit_routers",
                        ([str(tmp_path)], {".safetensors", ".pt", ".pth"}))
    return tmp_path
