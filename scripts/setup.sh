# Sourced by the README's commands (scripts/panel.sh, scripts/test.sh): sets $PY to a Python with
# what CacheKit's scripts and tests need. Without $PYTHON that is the project's own virtualenv
# (.venv, ignored by git): nothing is ever installed into the system interpreter.
# Torch: an existing one is kept. Otherwise torch $CACHEKIT_TORCH_VERSION (default 2.13.0), the CPU
# build when no NVIDIA GPU is present. A second run with nothing changed installs nothing.
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
else
  if [ ! -x .venv/bin/python ]; then
    echo "CacheKit: creating the project virtualenv .venv (once; set PYTHON=... to use another Python)"
    python3 -m venv .venv || { echo "CacheKit: 'python3 -m venv' failed; install python3-venv or set PYTHON" >&2; exit 2; }
  fi
  PY=$PWD/.venv/bin/python
fi
_ck_stamp_dir=$("$PY" -c "import sys; print(sys.prefix)")
_ck_stamp="$_ck_stamp_dir/.cachekit-setup"
_ck_want=$(cat requirements-dev.txt requirements-panel.txt scripts/setup.sh 2>/dev/null | cksum)
if [ "$(cat "$_ck_stamp" 2>/dev/null)" != "$_ck_want" ] || ! "$PY" -c "import torch" 2>/dev/null; then
  if ! "$PY" -c "import torch" 2>/dev/null; then
    _ck_torch="torch==${CACHEKIT_TORCH_VERSION:-2.13.0}"
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "CacheKit: no torch in $PY; an NVIDIA GPU is present, installing $_ck_torch from the default index (CUDA build)"
      "$PY" -m pip install -q "$_ck_torch"
    else
      echo "CacheKit: no torch in $PY and no NVIDIA GPU; installing the CPU build of $_ck_torch (PyTorch's CPU index)"
      if ! "$PY" -m pip install -q --timeout 20 --retries 1 --index-url https://download.pytorch.org/whl/cpu "$_ck_torch" 2>/dev/null; then
        echo "CacheKit: PyTorch's CPU index is unreachable; installing $_ck_torch from the default index instead"
        "$PY" -m pip install -q "$_ck_torch"
      fi
    fi
  fi
  echo "CacheKit: installing the test and panel requirements into $PY"
  "$PY" -m pip install -q -r requirements-dev.txt
  # The official DeepCache package, for the benchmark and the equivalence test. Without its
  # dependencies: only its helper is used, and it would pull transformers.
  "$PY" -m pip install -q --no-deps "DeepCache==0.1.1"
  echo "$_ck_want" > "$_ck_stamp"
fi
unset _ck_stamp_dir _ck_stamp _ck_want _ck_torch
