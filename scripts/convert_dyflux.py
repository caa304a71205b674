"""Convert the official DyFLUX checkpoint (.pt) to CacheKit's DyFLUX router side-car (.safetensors).

    python scripts/convert_dyflux.py transformer_230000.pt dyflux_lite_8b.safetensors

Only the token routers ({transformer_blocks|single_transformer_blocks}.N.token_selection.*) are
kept. The checkpoint is memory-mapped and read with torch.load(weights_only=True) and an
allow-list (core/dydit/dyflux.py): no code from the file ever runs. Put the output in
ComfyUI's models/cachekit_routers/ and pick it in "DyFLUX Token Router (CacheKit)".
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import load_pack  # noqa: E402

load_pack()
from cachekit.bench.cli import output_file, run_cli  # noqa: E402
from cachekit.core.dydit.dyflux import convert_official  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the official DyFLUX checkpoint (.pt)")
    parser.add_argument("output", type=output_file(".safetensors"))
    args = parser.parse_args(argv)
    routers = convert_official(args.source, args.output)       # a wrong or damaged file: DyFluxError
    print(f"{args.output}: DyFLUX routers for {routers.describe()}, threshold {routers.threshold}")
    return routers


if __name__ == "__main__":
    run_cli(main)
