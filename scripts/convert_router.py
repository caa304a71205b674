"""Convert an official Learning-to-Cache router (.pt / .pth) to CacheKit's safetensors format.

    python scripts/convert_router.py DDIM20_router.pt dit_ddim20_l2c.safetensors [--threshold 0.1]

The official file is read with torch.load(weights_only=True) and an allow-list (see
core/routers/official.py): no code from the file ever runs.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import load_pack  # noqa: E402

load_pack()
from cachekit.bench.cli import float_in, output_file, run_cli  # noqa: E402
from cachekit.core.routers import load_official, save_router  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="an official L2C router (.pt / .pth)")
    parser.add_argument("output", type=output_file(".safetensors"))
    parser.add_argument("--threshold", type=float_in(0, 1, low_open=True, high_open=True),
                        help="default: the official README's (0.1 for DiT)")
    args = parser.parse_args(argv)
    router = load_official(args.source, args.threshold)      # a wrong or damaged file: RouterError
    save_router(router, args.output)
    print(f"{args.output}: {router.method} router for {router.family} depth {router.depth}, {router.num_steps} steps, "
          f"threshold {router.threshold}")
    return router


if __name__ == "__main__":
    run_cli(main)
