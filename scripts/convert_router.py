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
from cachekit.core.routers import RouterError, load_official, save_router  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--threshold", type=float, help="default: the official README's (0.1 for DiT)")
    args = parser.parse_args(argv)
    try:
        router = load_official(args.source, args.threshold)
    except RouterError as error:
        raise SystemExit(f"error: {error}")
    save_router(router, args.output)
    print(f"{args.output}: {router.method} router for {router.family} depth {router.depth}, {router.num_steps} steps, "
          f"threshold {router.threshold}")
    return router


if __name__ == "__main__":
    main()
