"""Train a learned router (HarmoniCa SDT + IEP, or the L2C objective) on CPU or GPUs.

    python scripts/train_router.py --model dit --method harmonica --steps 20 --minutes 10 --out routers/tiny_dit.safetensors
    python scripts/train_router.py --model dit --reuse forecast1 ...    # a router for forecast reuse
    torchrun --nproc_per_node 2 scripts/train_router.py --model dit ...     # several processes (gloo on CPU)

--model dit trains for the bundled tiny DiT (DDIM, CFG 3); --pipeline DIR for a diffusers
DiTPipeline saved on disk (its scheduler, CFG 4). In ComfyUI, the Train Router node covers
PixArt, Wan, SD3, Flux and Chroma. A checkpoint next to the
output (.ckpt.pt) lets --resume continue. Output: CacheKit's router format.
--quick: a small router in minutes on 2 CPU cores (fewer iterations, smaller batches).
--reuse: the reuse strategy the router is trained for and records (hold, or forecast1/2:
TaylorSeer extrapolation from each sub-layer's last refreshes); applying it runs that reuse.
"""
from __future__ import annotations

import argparse
import os

import torch
from tqdm import tqdm

from ..core.reuse import STRATEGIES
from ..core.routers import save_router
from ..core.routers.train import TrainConfig
from ..diffusers_host.train import train_router
from .cli import fill_defaults, float_in, int_at_least, output_file, pipeline_dir, run_cli


def bundled_dit(cfg: float = 3.0):
    # Imported here, after the arguments are checked: the models import all of diffusers (seconds).
    from ..tinymodels.architectures import NULL_CLASS
    from ..tinymodels.bundled import load
    from ..tinymodels.sampling import make_scheduler
    from ..tinymodels.shapes import NUM_CLASSES, SIZE
    denoiser = load("dit")

    def make_batch(g, batch):
        labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
        return torch.randn(batch, 3, SIZE, SIZE, generator=g), torch.cat([torch.full_like(labels, NULL_CLASS), labels])

    def call(model, x, t, both):
        u, c = model(torch.cat([x, x]), timestep=t.expand(2 * x.shape[0]), class_labels=both,
                     return_dict=False)[0].chunk(2)
        return u + cfg * (c - u)
    return denoiser.network, make_scheduler(20), make_batch, call


def dit_pipeline(path: str, cfg: float = 4.0):
    """A diffusers DiTPipeline saved on disk (class-conditional, ImageNet-style null class 1000)."""
    from diffusers import DiTPipeline
    pipe = DiTPipeline.from_pretrained(path, local_files_only=True)
    model = pipe.transformer.eval()
    channels, size = model.config.in_channels, model.config.sample_size
    classes = model.config.num_embeds_ada_norm

    def make_batch(g, batch):
        labels = torch.randint(0, classes, (batch,), generator=g)
        return torch.randn(batch, channels, size, size, generator=g), torch.cat([labels, torch.full_like(labels, 1000)])

    def call(m, x, t, both):
        # As DiTPipeline: conditional half first, guidance on the first `channels` outputs.
        out = m(torch.cat([x, x]), timestep=t.expand(2 * x.shape[0]), class_labels=both, return_dict=False)[0]
        cond, uncond = out[:, :channels].chunk(2)
        return uncond + cfg * (cond - uncond)
    return model, pipe.scheduler, make_batch, call


def _distributed():
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist


# A full run trains 200 iterations of batch 8 (or until --minutes); --quick a usable first router.
FULL = {"iterations": 200, "batch": 8}
QUICK = {"iterations": 20, "batch": 2}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a CacheKit router.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", choices=("dit",), default="dit", help="a bundled model")
    source.add_argument("--pipeline", type=pipeline_dir, help="a diffusers DiTPipeline saved on disk (local only)")
    parser.add_argument("--method", choices=("harmonica", "l2c"), default="harmonica")
    parser.add_argument("--steps", type=int_at_least(2), default=20, help="sampling steps the router is for")
    parser.add_argument("--quick", action="store_true",
                        help=f"a first router in minutes: {QUICK['iterations']} iterations of batch {QUICK['batch']} "
                             f"(default {FULL['iterations']} of batch {FULL['batch']})")
    parser.add_argument("--iterations", type=int_at_least(1), help=f"default {FULL['iterations']}")
    parser.add_argument("--minutes", type=float_in(0, low_open=True), help="stop after this long, whatever the iterations")
    parser.add_argument("--batch", type=int_at_least(1), help=f"default {FULL['batch']}")
    parser.add_argument("--lr", type=float_in(0, low_open=True), default=0.01)
    parser.add_argument("--l1", type=float_in(0), default=1e-4)
    parser.add_argument("--threshold", type=float_in(0, 1, low_open=True, high_open=True), default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", choices=STRATEGIES, default="hold",
                        help="how reused sub-layer outputs are produced, in training and when the router is applied: "
                             "hold = last computed value (published); forecast1/2 = Taylor extrapolation from the "
                             "last refreshes (TaylorSeer)")
    parser.add_argument("--out", type=output_file(".safetensors"), required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    fill_defaults(args, FULL, QUICK)
    return args


def main(argv=None):
    args = parse_args(argv)
    dist = _distributed()
    rank = dist.get_rank() if dist is not None else 0
    torch.set_num_threads(1 if dist is not None else max(1, torch.get_num_threads()))
    model, scheduler, make_batch, call = dit_pipeline(args.pipeline) if args.pipeline else bundled_dit()
    config = TrainConfig(args.method, args.steps, args.iterations, args.batch, args.lr, args.l1, args.threshold,
                         seed=args.seed, minutes=args.minutes, reuse=args.reuse)
    bar = None          # made at the first iteration: an error before it prints no bar

    def progress(done, total, loss):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=f"router ({args.method})", disable=rank != 0)
        bar.n = done
        bar.set_postfix(loss=f"{loss:.2e}")
        bar.refresh()
    checkpoint = args.out.with_suffix(".ckpt.pt")
    router = train_router(model, scheduler, make_batch, call, config, family=type(model).__name__, checkpoint=checkpoint,
                          resume=args.resume, progress=progress, distributed=dist)
    if bar is not None:
        bar.close()
    if rank == 0:
        save_router(router, args.out)
        recompute = router.recompute().float().mean().item()
        print(f"{args.out}: {router.method} router, {router.num_steps} steps x {router.num_units} sub-layers, "
              f"recomputes {recompute:.0%} of routed sub-layers, reuse {router.reuse}"
              + (f", {dist.get_world_size()} processes" if dist is not None else ""))
    if dist is not None:
        dist.barrier()
        dist.destroy_process_group()
    return router


if __name__ == "__main__":
    run_cli(main)
