#!/usr/bin/env bash
# The README's main command: installs what it needs (scripts/setup.sh), then opens the CacheKit
# preview panel on the bundled tiny models at http://127.0.0.1:7860 (pass --host / --port to change).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec "$PY" scripts/panel.py "$@"
