"""One run lifecycle for every host: open a session per sampling run, publish it, close it.

Hosts differ in how they see a run: ComfyUI wraps the whole sampling (an OUTER_SAMPLE
wrapper: `with lifecycle.run(...)`), diffusers only sees model calls and starts a new run when
the timesteps go back (`open` / `close`). Both go through this class, so a session is always
closed (its tensors dropped, its telemetry finished and recorded) exactly once, also on error
or interrupt, and the last runs stay readable after the model is unpatched.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

from .telemetry import RunTelemetry

MAX_RUNS = 16


class RunLifecycle:
    def __init__(self, owner: str, make_session: Callable[..., Any], *,
                 on_open: Callable[[Any], Any] | None = None,
                 on_close: Callable[[Any, RunTelemetry, Any], None] | None = None):
        """make_session(*args) builds a run's session; on_open(session) returns a token (e.g. the
        live record a UI shows) that on_close(session, telemetry, token) receives."""
        self.owner = owner
        self._make_session = make_session
        self._on_open = on_open
        self._on_close = on_close
        self.session: Any = None
        self._token: Any = None
        self.runs: list[RunTelemetry] = []       # finished runs, newest last

    @property
    def telemetry(self) -> RunTelemetry | None:
        """The current run's telemetry, or the last finished run's."""
        if self.session is not None:
            return self.session.telemetry
        return self.runs[-1] if self.runs else None

    @property
    def token(self) -> Any:
        """What on_open returned for the run in progress."""
        return self._token

    def open(self, *args: Any) -> Any:
        """Start a run (ending the one in progress, if any) and return its session."""
        self.close()
        session = self._make_session(*args)
        self.session = session
        self._token = self._on_open(session) if self._on_open is not None else None
        return session

    def close(self) -> RunTelemetry | None:
        """End the current run: drop its state, record its telemetry. Safe to call twice."""
        session, self.session = self.session, None
        if session is None:
            return None
        telemetry = session.close()
        self.runs = (self.runs + [telemetry])[-MAX_RUNS:]
        if self._on_close is not None:
            self._on_close(session, telemetry, self._token)
        self._token = None
        return telemetry

    @contextlib.contextmanager
    def run(self, *args: Any):
        """A whole sampling run: the session is closed when the block ends, however it ends."""
        session = self.open(*args)
        try:
            yield session
        finally:
            if self.session is session:
                self.close()
