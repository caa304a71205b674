# Sourced by the README's commands: installs what CacheKit's scripts and tests need into $PY.
# A CPU torch first (never the multi-GB CUDA build); an existing torch is left alone.
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -r requirements-dev.txt
# The official DeepCache package, for the benchmark and the equivalence test. Without its
# dependencies: only its helper is used, and it would pull transformers.
"$PY" -m pip install -q --no-deps "DeepCache==0.1.1"
