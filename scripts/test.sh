#!/usr/bin/env bash
# The README's test command: installs what the tests need (scripts/setup.sh), then runs pytest.
#   bash scripts/test.sh [pytest args]            the project virtualenv; real-ComfyUI tests skip
#   bash scripts/test.sh --comfyui [pytest args]  also real ComfyUI 0.3.64 and its browser test, in
#                                                 the environment scripts/comfy_env.sh builds once
# With CI=true (CI runs `bash scripts/test.sh --comfyui`) a missing ComfyUI, chromium or fixture
# fails the run instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--comfyui" ]; then
  shift
  source scripts/comfy_env.sh
fi
source scripts/setup.sh
exec "$PY" -m pytest -q "$@"
