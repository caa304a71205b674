"""Train a learned router on a bundled model (see bench/train_router_cli.py); works under torchrun.
--reuse forecast1 / forecast2 trains it for forecast reuse (it records it; applying it runs it)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import load_pack  # noqa: E402

load_pack()
from cachekit.bench.train_router_cli import main  # noqa: E402
from cachekit.bench.cli import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
