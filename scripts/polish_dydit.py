"""Second stage for a DyDiT: fine-tune its weights under its frozen routers' inference gates:

    python scripts/polish_dydit.py --lam 0.5 --minutes 30 --out DIR

See tinymodels/polish_dydit.py for why and what it writes."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import load_pack  # noqa: E402

load_pack()
from cachekit.bench.cli import run_cli  # noqa: E402


def main(argv=None):
    from cachekit.tinymodels.polish_dydit import main as polish_main
    polish_main(argv)


if __name__ == "__main__":
    run_cli(main)
