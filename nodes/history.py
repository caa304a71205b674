"""Recent sampling runs' telemetry: kept in memory (bounded), pushed live to the ComfyUI frontend.

Each CacheKit run is announced when its sampling starts ("cachekit.progress" events while it
runs, at most a few per second) and when it ends ("cachekit.run"). The frontend's sidebar tab
and node badges listen to these; GET /cachekit/runs (nodes/routes.py) serves the same records
for a page that opens later.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque

from ..core.telemetry import RunTelemetry

MAX_RUNS = 32
LIVE_INTERVAL_S = 0.25
log = logging.getLogger("CacheKit")
_runs: deque = deque(maxlen=MAX_RUNS)
_lock = threading.Lock()
_ids = itertools.count(1)


def _server():
    try:
        from server import PromptServer      # ComfyUI's server; absent when used as a library
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def _context() -> tuple[str | None, str | None]:
    """(prompt id, id of the node that is sampling) from ComfyUI's executing context."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None, None
    context = get_executing_context()
    return (context.prompt_id, context.node_id) if context is not None else (None, None)


class LiveRun:
    """One sampling run of one CacheKit patch, from start to finish."""

    def __init__(self, owner: str, node_id: str | None, telemetry: RunTelemetry):
        self.id = next(_ids)
        self.owner, self.node_id, self.telemetry = owner, node_id, telemetry
        self.prompt_id, self.sampler_node_id = _context()
        self.started = time.time()
        self.finished: float | None = None
        self._last_sent = 0.0

    def as_json(self, resolve: bool = False) -> dict:
        """resolve: measure a missing FLOP profile now (GET /cachekit/runs, never during sampling)."""
        return {"id": self.id, "owner": self.owner, "node_id": self.node_id, "prompt_id": self.prompt_id,
                "sampler_node_id": self.sampler_node_id, "started": self.started, "finished": self.finished,
                "telemetry": self.telemetry.as_dict(resolve)}

    def progress(self, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self._last_sent >= LIVE_INTERVAL_S:
            self._last_sent = now
            _send("cachekit.progress", self)

    def finish(self) -> None:
        self.finished = time.time()
        with _lock:
            _runs.append(self)
        _send("cachekit.run", self)


def _send(event: str, run: LiveRun) -> None:
    server = _server()
    if server is None:
        return
    try:
        server.send_sync(event, run.as_json())
    except Exception:          # the UI is a convenience: never let it break sampling
        log.debug("CacheKit: could not send %s", event, exc_info=True)


def start(owner: str, node_id: str | None, telemetry: RunTelemetry) -> LiveRun:
    run = LiveRun(owner, node_id, telemetry)
    run.progress(force=True)
    return run


def recent() -> list[dict]:
    """Newest last: {"owner", "node_id", "finished", "telemetry"}."""
    with _lock:
        runs = list(_runs)
    return [{"owner": r.owner, "node_id": r.node_id, "finished": r.finished, "telemetry": r.telemetry}
            for r in runs]


def recent_json(limit: int = MAX_RUNS, node_id: str | None = None) -> list[dict]:
    with _lock:
        runs = list(_runs)
    if node_id is not None:
        runs = [r for r in runs if r.node_id == node_id]
    return [r.as_json(resolve=True) for r in runs[-limit:]]


def last() -> RunTelemetry | None:
    with _lock:
        return _runs[-1].telemetry if _runs else None


def last_of(owners: set[str]) -> RunTelemetry | None:
    """The newest finished run of any of these patches."""
    with _lock:
        for run in reversed(_runs):
            if run.owner in owners:
                return run.telemetry
    return None
