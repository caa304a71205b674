"""DyDiT and DyFLUX: dynamic width (attention heads, MLP channel groups) and token routing."""
from .routers import DyDiTRouters, RouterShape
from .sidecar import DyDiTFileError, load_routers, save_routers
from .telemetry import DyDiTTelemetry

__all__ = ["DyDiTFileError", "DyDiTRouters", "DyDiTTelemetry", "RouterShape", "load_routers", "save_routers"]
