#!/usr/bin/env bash
# The test command of the README: installs a CPU torch (never the multi-GB CUDA build), the test
# requirements, then runs pytest. Set COMFYUI_DIR (and run with ComfyUI's Python) to include the
# real-ComfyUI integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
"$PY" -m pip install -q -r requirements-dev.txt
exec "$PY" -m pytest -q "$@"
