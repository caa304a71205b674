"""Convert an official DyDiT checkpoint (.pt) to a diffusers DiT folder plus CacheKit's router side-car.

    python scripts/convert_dydit.py new_dydit0.7.pt dydit-xl-2-0.7/
    # dydit-xl-2-0.7/transformer/            diffusers DiTTransformer2DModel (save_pretrained)
    # dydit-xl-2-0.7/dydit_routers.safetensors   the routers (official key names + metadata)

    import cachekit
    model, routers = cachekit.load_dydit("dydit-xl-2-0.7")     # official numerics set
    handle = cachekit.apply_dydit(model, routers, scheduler=pipe.scheduler)

The checkpoint is read with torch.load(weights_only=True) and an allow-list (argparse.Namespace
only; see core/dydit/official.py): no code from the file ever runs. The EMA weights are taken
when the file holds them. The official weights' license (DiT: CC BY-NC 4.0) stays with them: do
not redistribute the converted folder beyond what that license allows.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import load_pack  # noqa: E402

load_pack()
from cachekit.bench.cli import run_cli  # noqa: E402
from cachekit.core.dydit.official import load_official  # noqa: E402
from cachekit.diffusers_host.dydit import dit_from_official, save_dydit  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="an official DyDiT checkpoint (.pt), e.g. new_dydit0.7.pt")
    parser.add_argument("output", type=Path, help="the folder to write (transformer/ + dydit_routers.safetensors)")
    args = parser.parse_args(argv)
    if args.output.exists() and any(args.output.iterdir()):
        raise ValueError(f"{args.output} exists and is not empty; choose a new folder.")
    official = load_official(args.source)          # a wrong or damaged file: DyDiTFileError (a ValueError)
    model, routers = dit_from_official(official)
    save_dydit(model, routers, args.output, source=f"official DyDiT {args.source.name}")
    print(f"{args.output}: DiT with {official.shape.describe()}, {official.config['num_embeds_ada_norm']} classes, "
          f"{official.config['sample_size']}x{official.config['sample_size']} latents")
    return args.output


if __name__ == "__main__":
    run_cli(main)
