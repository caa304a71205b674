#!/usr/bin/env bash
# Terminal demo (not the main job; that is scripts/panel.sh): installs what it needs, then samples tiny models uncached and
# cached and prints the speedup and hit rates.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec "$PY" scripts/demo.py "$@"
