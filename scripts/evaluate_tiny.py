"""Grade the bundled tiny models and write their model card: python scripts/evaluate_tiny.py [dit] [unet]"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import load_pack  # noqa: E402

load_pack()
from cachekit.bench.cli import int_at_least, run_cli  # noqa: E402
from cachekit.tinymodels.bundled import KINDS  # noqa: E402
from cachekit.tinymodels.evaluate import main as evaluate_main  # noqa: E402


def check_args(argv=None) -> None:
    """Refuse bad arguments before the first model is graded (grading one takes minutes; the
    evaluator's own parser would find a bad second kind only after the first)."""
    parser = argparse.ArgumentParser(prog="evaluate_tiny.py", add_help=False)
    parser.add_argument("kinds", nargs="*")      # checked below: argparse rejects an empty list with choices
    parser.add_argument("--samples", type=int_at_least(1))
    args, _ = parser.parse_known_args(argv)
    unknown = [kind for kind in args.kinds if kind not in KINDS]
    if unknown:
        parser.error(f"unknown model {', '.join(map(repr, unknown))}; choose from {', '.join(KINDS)}")


def main(argv=None):
    check_args(argv)
    evaluate_main(argv)


if __name__ == "__main__":
    run_cli(main)
