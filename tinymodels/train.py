"""Train the bundled tiny models on CPU from procedural data (no downloads).

    python scripts/train_tiny.py dit --minutes 60          # or unet, or classifier
    python scripts/train_tiny.py dit --minutes 30 --resume  # 30 more minutes, from the checkpoint
                                                            # (or the shipped weights where none)

DDPM epsilon objective, AdamW, 10 % label dropout (the null class, for CFG), EMA weights.
`--teacher unet` regresses onto the bundled U-Net's noise prediction for the same noisy image,
label and timestep instead of onto the sampled noise: the same optimum (the U-Net estimates the
conditional mean of the noise), with far less variance per step, which a DiT needs on a CPU
budget. Steps trained that way are recorded as `teacher_steps`. With a teacher, batches are made in a
worker process, so the teacher's forward pass runs on a second core while the student trains.
`--min-snr G` weights each sample's loss by min(SNR, G) / SNR (Hang et al., 2023): the nearly
noise-free timesteps, whose noise is barely predictable, stop dominating the gradient, which
speeds up transformer training several-fold. `--decay F` anneals the learning rate (cosine, to a
tenth) over the last fraction F of the run.
A checkpoint is written every few minutes and at the end; the final EMA weights are saved as
fp16 safetensors next to this file, with a JSON record of the run for the model card.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import save_file
from tqdm import tqdm

from .architectures import BUILDERS, NULL_CLASS, Denoiser
from .classifier import ShapeClassifier, accuracy
from .sampling import TRAIN_TIMESTEPS
from .shapes import sample_batch

WEIGHTS = Path(__file__).resolve().parent / "weights"
DEFAULTS = {  # lr, batch, EMA decay
    "dit": (1e-3, 32, 0.999),
    "unet": (1e-3, 32, 0.995),
    "classifier": (2e-3, 64, None),
}


def save_weights(model: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def diffusion_batch(batch: int, g: torch.Generator, alphas: torch.Tensor, teacher=None) -> tuple:
    """(noisy images, timesteps, labels with 10 % dropped to the null class, regression target)."""
    images, labels = sample_batch(batch, g)
    labels = torch.where(torch.rand(batch, generator=g) < 0.1, torch.full_like(labels, NULL_CLASS), labels)
    t = torch.randint(0, TRAIN_TIMESTEPS, (batch,), generator=g)
    noise = torch.randn(images.shape, generator=g)
    a = alphas[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * images + (1 - a).sqrt() * noise
    if teacher is None:
        return noisy, t, labels, noise
    with torch.no_grad():
        return noisy, t, labels, teacher(noisy, t, labels)


class TeacherBatches(torch.utils.data.IterableDataset):
    """Endless `diffusion_batch`es with a teacher's targets, made in a DataLoader worker process."""

    def __init__(self, batch: int, seed: int, teacher: str, alphas: torch.Tensor):
        self.batch, self.seed, self.teacher, self.alphas = batch, seed, teacher, alphas

    def __iter__(self):
        from .bundled import load
        torch.set_num_threads(1)
        teacher, g = load(self.teacher), torch.Generator().manual_seed(self.seed)
        while True:
            yield diffusion_batch(self.batch, g, self.alphas, teacher)


def min_snr_weights(alphas_t: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Per-sample loss weights min(SNR, gamma) / SNR for the epsilon objective (1 where gamma is None)."""
    if gamma is None:
        return torch.ones_like(alphas_t)
    snr = alphas_t / (1 - alphas_t)
    return snr.clamp(max=gamma) / snr


def lr_factor(progress: float, decay: float) -> float:
    """1 until the last `decay` fraction of the run, then a cosine down to 0.1."""
    if decay <= 0 or progress < 1 - decay:
        return 1.0
    into = min(1.0, (progress - (1 - decay)) / decay)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * into))


def _checkpoint_path(kind: str, out: Path) -> Path:
    return out / f"{kind}.ckpt.pt"


def train(kind: str, minutes: float, *, out: Path = WEIGHTS, resume: bool = False, seed: int = 0,
          lr: float | None = None, batch: int | None = None, checkpoint_every_min: float = 5.0,
          teacher: str | None = None, min_snr: float | None = None, lr_decay: float = 0.0) -> dict:
    torch.set_num_threads(1)
    d_lr, d_batch, ema_decay = DEFAULTS[kind]
    lr, batch = lr or d_lr, batch or d_batch
    model = ShapeClassifier() if kind == "classifier" else BUILDERS[kind]()
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    state = {"step": 0, "seconds": 0.0, "losses": [], "teacher_steps": 0}
    ckpt = _checkpoint_path(kind, out)
    if resume and ckpt.exists():
        saved = torch.load(ckpt, weights_only=True)   # our own file: tensors and numbers only
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        g.set_state(saved["generator"])
        state = {"step": int(saved["step"]), "seconds": float(saved["seconds"]), "losses": list(saved["losses"]),
                 "teacher_steps": int(saved.get("teacher_steps", 0))}
    elif resume and (out / f"{kind}.safetensors").exists():
        # No checkpoint on this machine (checkpoints are not committed): continue from the
        # shipped EMA weights. The optimizer restarts; its warm-up keeps the first steps gentle.
        from safetensors.torch import load_file
        weights = {k: v.float() for k, v in load_file(str(out / f"{kind}.safetensors")).items()}
        model.load_state_dict(weights)
        if ema is not None:
            ema.load_state_dict(weights)
        record_file = out / f"{kind}.train.json"
        if record_file.exists():
            old = json.loads(record_file.read_text())
            state = {"step": old["steps"], "seconds": old["train_minutes"] * 60,
                     "losses": list(old.get("loss_per_100_steps", [])), "teacher_steps": old.get("teacher_steps", 0)}
        # A new random stream: the shipped weights saw the seeded one up to here.
        g.manual_seed(seed + state["step"])
    noise_scheduler = DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS)
    alphas = noise_scheduler.alphas_cumprod
    denoiser = None if kind == "classifier" else Denoiser(kind, model)
    teacher_batches = None
    if teacher is not None:
        if kind == "classifier" or teacher == kind:
            raise ValueError("--teacher needs a diffusion model other than the one being trained.")
        # The worker draws from its own stream, seeded by the step it starts at, so a resumed
        # run sees new images.
        teacher_batches = iter(torch.utils.data.DataLoader(
            TeacherBatches(batch, seed * 1_000_003 + state["step"], teacher, alphas),
            batch_size=None, num_workers=1, prefetch_factor=4))

    def save_checkpoint():
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "ema": ema.state_dict() if ema is not None else {}, "generator": g.get_state(),
                    "step": state["step"], "seconds": state["seconds"], "losses": state["losses"],
                    "teacher_steps": state["teacher_steps"]}, ckpt)

    start_step, run_start_seconds = state["step"], state["seconds"]
    budget = state["seconds"] + minutes * 60       # --minutes is this run's share
    started = time.perf_counter() - state["seconds"]
    last_ckpt = time.perf_counter()
    window: list[float] = []
    bar = tqdm(total=int(budget), initial=int(state["seconds"]), unit="s", desc=f"training {kind}")
    model.train()
    while time.perf_counter() - started < budget:
        if kind == "classifier":
            images, labels = sample_batch(batch, g)
            loss = F.cross_entropy(model(images), labels)
        else:
            if teacher_batches is not None:
                noisy, t, labels, target = next(teacher_batches)
                state["teacher_steps"] += 1
            else:
                noisy, t, labels, target = diffusion_batch(batch, g, alphas)
            per_sample = (denoiser(noisy, t, labels) - target).square().mean(dim=(1, 2, 3))
            loss = (per_sample * min_snr_weights(alphas[t], min_snr)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        warmup = min(1.0, (state["step"] - start_step + 1) / 200)
        progress = (state["seconds"] - run_start_seconds) / (minutes * 60)
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup * lr_factor(progress, lr_decay)
        optimizer.step()
        if ema is not None:
            decay = min(ema_decay, (1 + state["step"]) / (10 + state["step"]))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - decay)
        state["step"] += 1
        window.append(loss.item())
        if len(window) == 100:
            state["losses"].append(sum(window) / len(window))
            window.clear()
            bar.set_postfix(step=state["step"], loss=f"{state['losses'][-1]:.4f}")
        state["seconds"] = time.perf_counter() - started
        bar.n = int(min(state["seconds"], budget))
        bar.refresh()
        if time.perf_counter() - last_ckpt > checkpoint_every_min * 60:
            save_checkpoint()
            last_ckpt = time.perf_counter()
    bar.close()
    save_checkpoint()
    final = ema if ema is not None else model
    final.eval()
    save_weights(final, out / f"{kind}.safetensors")
    record = {"kind": kind, "steps": state["step"], "train_minutes": round(state["seconds"] / 60, 1),
              "batch": batch, "lr": lr, "ema_decay": ema_decay, "final_loss": state["losses"][-1] if state["losses"] else None,
              "loss_per_100_steps": [round(v, 5) for v in state["losses"]],
              "params": sum(p.numel() for p in final.parameters()), "teacher_steps": state["teacher_steps"],
              "teacher": teacher, "min_snr": min_snr, "lr_decay": lr_decay}
    if kind == "classifier":
        eval_g = torch.Generator().manual_seed(12345)
        images, labels = sample_batch(2048, eval_g)
        record["heldout_accuracy"] = accuracy(final, images, labels)
    (out / f"{kind}.train.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train a bundled tiny model on CPU.")
    parser.add_argument("kind", choices=list(DEFAULTS))
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher", choices=("unet", "dit"), help="regress onto this bundled model's noise prediction")
    parser.add_argument("--min-snr", type=float, help="weight the loss by min(SNR, G) / SNR (e.g. 5)")
    parser.add_argument("--decay", type=float, default=0.0,
                        help="cosine-anneal the lr over this last fraction of the run")
    args = parser.parse_args(argv)
    record = train(args.kind, args.minutes, out=args.out, resume=args.resume, seed=args.seed, lr=args.lr,
                   batch=args.batch, teacher=args.teacher, min_snr=args.min_snr, lr_decay=args.decay)
    print(json.dumps({k: v for k, v in record.items() if k != "loss_per_100_steps"}))


if __name__ == "__main__":
    main()
