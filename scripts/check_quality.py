"""Re-score the peer benchmark's deciding rows on more images (see bench/quality_check.py):

    python scripts/check_quality.py [--peers bench/results/peers.json] [--images 96] [--out bench/results]"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import load_pack  # noqa: E402

load_pack()
from cachekit.bench.cli import run_cli  # noqa: E402
from cachekit.bench.quality_check import main  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
