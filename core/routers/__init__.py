"""Learned routers (Learning-to-Cache, HarmoniCa): our safetensors format and the official files."""
from __future__ import annotations

from pathlib import Path

from .format import Router, RouterError, load_router, save_router
from .official import load_official

OFFICIAL_SUFFIXES = (".pt", ".pth")


def load_any(path: str | Path) -> Router:
    """A router file by its name: an official L2C .pt / .pth, else our .safetensors format.
    Either loader refuses a wrong or damaged file with a RouterError that says what it is."""
    path = Path(path)
    return load_official(path) if path.suffix.lower() in OFFICIAL_SUFFIXES else load_router(path)


__all__ = ["Router", "RouterError", "load_any", "load_router", "save_router", "load_official"]
