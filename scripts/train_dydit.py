"""Fine-tune the bundled tiny DiT into a DyDiT on CPU:

    python scripts/train_dydit.py --lam 0.5 --minutes 50 [--resume] [--out DIR]

See tinymodels/train_dydit.py for the objective and the files written."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import load_pack  # noqa: E402

load_pack()
from cachekit.bench.cli import run_cli  # noqa: E402


def main(argv=None):
    from cachekit.tinymodels.train_dydit import main as train_main
    train_main(argv)


if __name__ == "__main__":
    run_cli(main)
