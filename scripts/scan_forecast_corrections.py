"""FORA forecast corrections (FoCa-style) vs fewer steps on the bundled DiT (see bench/forecast_corrections.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import load_pack  # noqa: E402

load_pack()
from cachekit.bench.cli import run_cli  # noqa: E402
from cachekit.bench.forecast_corrections import main  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
