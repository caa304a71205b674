"""Measure the bundled tiny DyDiT (FLOPs, CPU speed vs the dense DiT at batch 1 and 8, sliced vs
masked, PSNR and class accuracy, stacked with FORA / AdaptiveDiffusion):

    python scripts/bench_dydit.py [--name dit_dydit_50] [--steps 25] [--images 24] [--rounds 3] [--out bench/results]

See bench/dydit_bench.py for what each number is."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import load_pack  # noqa: E402

load_pack()
from cachekit.bench.cli import run_cli  # noqa: E402


def main(argv=None):
    from cachekit.bench.dydit_bench import main as bench_main
    bench_main(argv)


if __name__ == "__main__":
    run_cli(main)
