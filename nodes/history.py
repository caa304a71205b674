"""Recent sampling runs' telemetry, kept in memory (bounded) for the UI and for tests."""
from __future__ import annotations

import threading
import time
from collections import deque

from ..core.telemetry import RunTelemetry

MAX_RUNS = 32
_runs: deque = deque(maxlen=MAX_RUNS)
_lock = threading.Lock()


def publish(owner: str, node_id: str | None, telemetry: RunTelemetry) -> None:
    with _lock:
        _runs.append({"owner": owner, "node_id": node_id, "finished": time.time(), "telemetry": telemetry})


def recent() -> list[dict]:
    """Newest last."""
    with _lock:
        return list(_runs)


def last() -> RunTelemetry | None:
    with _lock:
        return _runs[-1]["telemetry"] if _runs else None
