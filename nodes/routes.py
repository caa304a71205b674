"""HTTP route for the frontend: GET /cachekit/runs?limit=N&node_id=ID, the recent runs' telemetry.

Parameters are validated and only select from the in-memory history; nothing touches files.
"""
from __future__ import annotations

import re

from . import history

# ASCII-only full matches with bounded lengths: str.isdigit() accepts "²" (int() then raises), a
# 5000-digit number hits Python's int-string limit, and "$" matches before a trailing newline.
_LIMIT = re.compile(r"[0-9]{1,3}", re.ASCII)
_NODE_ID = re.compile(r"[A-Za-z0-9:_.-]{1,64}", re.ASCII)
_KNOWN = {"limit", "node_id"}
_registered = False


def _bad(message: str):
    from aiohttp import web
    return web.json_response({"error": message}, status=400)


async def runs(request):
    from aiohttp import web
    if any(len(request.query.getall(key)) > 1 for key in _KNOWN & set(request.query)):
        return _bad("give limit and node_id at most once each")
    limit_text = request.query.get("limit", str(history.MAX_RUNS))
    if not _LIMIT.fullmatch(limit_text) or not 1 <= int(limit_text) <= history.MAX_RUNS:
        return _bad(f"limit must be an integer from 1 to {history.MAX_RUNS}")
    node_id = request.query.get("node_id")
    if node_id is not None and not _NODE_ID.fullmatch(node_id):
        return _bad("node_id must be a node id such as 12 or 5:3 (letters, digits, ':', '_', '.', '-'; at most 64)")
    return web.json_response({"runs": history.recent_json(int(limit_text), node_id)})


def register() -> bool:
    """Add the route to ComfyUI's server (once). False when there is no server (library use)."""
    global _registered
    if _registered:
        return True
    server = history._server()
    if server is None:
        return False
    server.routes.get("/cachekit/runs")(runs)
    _registered = True
    return True
