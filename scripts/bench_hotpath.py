"""Hot-path benchmark: CacheKit's DeepCache vs the official helper, and interval-1 overhead in
diffusers and real ComfyUI (see bench/hotpath.py).

    python scripts/bench_hotpath.py [--quick]
    source scripts/comfy_env.sh && $PYTHON scripts/bench_hotpath.py --comfy [--quick]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import load_pack  # noqa: E402

load_pack()
from cachekit.bench.hotpath import main  # noqa: E402
from cachekit.bench.cli import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
