#!/usr/bin/env bash
# The README's test command: installs what the tests need, then runs pytest. Set COMFYUI_DIR
# (and PYTHON to a Python with ComfyUI's requirements) to include the real-ComfyUI tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec "$PY" -m pytest -q "$@"
