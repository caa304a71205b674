"""Load the repository root as the package `cachekit` (never put the pack folder on sys.path:
its `nodes` and `core` would clash with ComfyUI's top-level modules)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cachekit_pack_loader", ROOT / "scripts" / "pack.py")
_loader = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_loader)
load_pack = _loader.load_pack

load_pack()
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
