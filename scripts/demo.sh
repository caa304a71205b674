#!/usr/bin/env bash
# The README's main command: installs what it needs, then samples tiny models uncached and
# cached and prints the speedup and hit rates.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec "$PY" scripts/demo.py "$@"
