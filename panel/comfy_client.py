"""Read a running ComfyUI's CacheKit runs (GET <url>/cachekit/runs), for the panel. No gradio here."""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8188"


def runs_url(base: str, limit: int = 32) -> str:
    parsed = urllib.parse.urlparse((base or "").strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"ComfyUI URL must look like {DEFAULT_URL}, got {base!r}.")
    path = parsed.path.rstrip("/")
    return urllib.parse.urlunparse((parsed.scheme, parsed.netloc, f"{path}/cachekit/runs", "", f"limit={int(limit)}", ""))


def fetch_runs(base: str, limit: int = 32, timeout: float = 10.0) -> list[dict]:
    """The recent CacheKit runs of that ComfyUI, oldest first."""
    url = runs_url(base, limit)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = json.loads(response.read())
    except urllib.error.HTTPError as error:
        if error.code == 404:
            raise ValueError(f"{base} answers, but has no CacheKit route: is CacheKit installed there?") from error
        raise ValueError(f"ComfyUI at {base} answered {error.code}.") from error
    except (urllib.error.URLError, OSError) as error:
        raise ValueError(f"Cannot reach ComfyUI at {base}: {getattr(error, 'reason', error)}.") from error
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list):
        raise ValueError(f"{url} did not return CacheKit runs.")
    return runs


def describe(run: dict) -> str:
    t = run["telemetry"]
    where = f"node #{run['node_id']}" if run.get("node_id") else t["family"]
    state = "" if run.get("finished") else " (sampling)"
    return f"run {run['id']}: {t['method']} on {where}, hit rate {t['hit_rate']:.0%}{state}"
