"""Train a bundled tiny model: python scripts/train_tiny.py {dit,unet,classifier} --minutes N [--resume]"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import load_pack  # noqa: E402

load_pack()
from cachekit.bench.cli import float_in, int_at_least, run_cli  # noqa: E402


def check_args(argv=None) -> None:
    """Refuse bad numbers before training starts. This matters: a run that trains nothing (e.g.
    --minutes 0) still writes its weights, over the bundled ones by default."""
    parser = argparse.ArgumentParser(prog="train_tiny.py", add_help=False)
    parser.add_argument("kind", nargs="?")
    parser.add_argument("--minutes", type=float_in(0, low_open=True))
    parser.add_argument("--lr", type=float_in(0, low_open=True))
    parser.add_argument("--batch", type=int_at_least(1))
    parser.add_argument("--min-snr", type=float_in(0, low_open=True))
    parser.add_argument("--decay", type=float_in(0, 1))
    parser.add_argument("--teacher")
    parser.add_argument("--out")                 # the real parser's other options, so that their
    parser.add_argument("--seed")                # values are not taken for the positional kind
    parser.add_argument("--resume", action="store_true")
    args, _ = parser.parse_known_args(argv)
    if args.teacher is not None and args.teacher == args.kind:
        parser.error(f"--teacher {args.teacher}: a model cannot be its own teacher; use the other diffusion model")


def main(argv=None):
    check_args(argv)
    from cachekit.tinymodels.train import main as train_main    # after the check: it imports all of diffusers
    train_main(argv)


if __name__ == "__main__":
    run_cli(main)
