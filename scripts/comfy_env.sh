# Sourced by `scripts/test.sh --comfyui` and by CI: builds (once) and selects a real ComfyUI 0.3.64
# for the integration and browser tests, from the pinned source snapshot beside the project
# ($CACHEKIT_COMFY_SNAPSHOT, default ../shared/comfy-test/ComfyUI-0.3.64.tar.gz). Exports
# COMFYUI_DIR and PYTHON (its virtualenv). Everything lives in $CACHEKIT_COMFY_CACHE (default
# ~/.cache/cachekit/comfyui-0.3.64): the unpacked tree, a virtualenv with torch 2.13.0 CPU,
# ComfyUI's requirements (without torch/torchvision/torchaudio), spandrel without its
# dependencies, the torchvision stand-in, playwright and CacheKit's test requirements.
# Reused while its inputs are unchanged. Never inside the project: ComfyUI's code is not ours.
_ck_snapshot=${CACHEKIT_COMFY_SNAPSHOT:-$PWD/../shared/comfy-test/ComfyUI-0.3.64.tar.gz}
_ck_stub=$(dirname "$_ck_snapshot")/torchvision_stub
_ck_cache=${CACHEKIT_COMFY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cachekit/comfyui-0.3.64}
if [ ! -f "$_ck_snapshot" ] || [ ! -d "$_ck_stub" ]; then
  echo "CacheKit: no ComfyUI snapshot at $_ck_snapshot (with torchvision_stub/ beside it);" \
       "set CACHEKIT_COMFY_SNAPSHOT to ComfyUI-0.3.64.tar.gz" >&2
  return 2 2>/dev/null || exit 2
fi
_ck_key=$( (cksum < "$_ck_snapshot"; find "$_ck_stub" -name "*.py" | sort | xargs cat; \
            cat requirements-dev.txt requirements-panel.txt scripts/comfy_env.sh) | cksum)
if [ "$(cat "$_ck_cache/.ready" 2>/dev/null)" != "$_ck_key" ]; then
  echo "CacheKit: building the ComfyUI 0.3.64 test environment in $_ck_cache (once, about 2 minutes)"
  mkdir -p "$_ck_cache" && rm -rf "$_ck_cache/ComfyUI" "$_ck_cache/venv" "$_ck_cache/torchvision_stub"
  tar -xzf "$_ck_snapshot" -C "$_ck_cache"
  cp -r "$_ck_stub" "$_ck_cache/torchvision_stub"
  python3 -m venv "$_ck_cache/venv"
  grep -v -E "^(torch|torchvision|torchaudio|spandrel)([<>=~ ].*)?$|^#|^$" "$_ck_cache/ComfyUI/requirements.txt" \
    > "$_ck_cache/requirements-comfy.txt"
  # transformers < 5, as in October 2025 when ComfyUI 0.3.64 came out: transformers 5 imports
  # torchvision.transforms.InterpolationMode once torchvision seems present, which the stand-in
  # below lacks, and diffusers then fails to import.
  "$_ck_cache/venv/bin/python" -m pip install -q "torch==${CACHEKIT_TORCH_VERSION:-2.13.0}" "transformers<5" \
    -r "$_ck_cache/requirements-comfy.txt" -r requirements-dev.txt
  "$_ck_cache/venv/bin/python" -m pip install -q --no-deps spandrel   # DeepCache: scripts/setup.sh
  # The stand-in: torch 2.13.0 has no matching torchvision here (see the snapshot's README).
  # ComfyUI imports torchvision at start (Cosmos code) and spandrel needs transforms.functional.
  "$_ck_cache/venv/bin/python" -c "import site; print(site.getsitepackages()[0])" \
    | { read -r site; echo "$_ck_cache/torchvision_stub" > "$site/cachekit_torchvision_stub.pth"; }
  echo "$_ck_key" > "$_ck_cache/.ready"
fi
export COMFYUI_DIR="$_ck_cache/ComfyUI"
export PYTHON="$_ck_cache/venv/bin/python"
unset _ck_snapshot _ck_stub _ck_cache _ck_key
