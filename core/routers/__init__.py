"""Learned routers (Learning-to-Cache, HarmoniCa): our safetensors format and the official files."""
from .format import Router, RouterError, load_router, save_router
from .official import load_official

__all__ = ["Router", "RouterError", "load_router", "save_router", "load_official"]
