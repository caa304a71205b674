"""Learned corrections to the skipped-step forecast vs TaylorSeer order 2 (see bench/learned_forecast.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import load_pack  # noqa: E402

load_pack()
from cachekit.bench.cli import run_cli  # noqa: E402
from cachekit.bench.learned_forecast import main  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
