"""Grade a bundled model: sample 256 images (DDIM 50, CFG), classify them, save a sample grid.

    python scripts/evaluate_tiny.py dit unet     # updates tinymodels/weights/*.eval.json + MODEL_CARD.md
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .architectures import DIT_CONFIG, UNET_CONFIG
from .bundled import WEIGHTS, load, load_classifier, weights_path
from .classifier import accuracy
from .sampling import sample
from .shapes import CLASSES, NUM_CLASSES


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid(images: torch.Tensor, columns: int, scale: int = 3) -> Image.Image:
    pixels = to_uint8(images)
    rows = [np.concatenate(list(pixels[i:i + columns]), axis=1) for i in range(0, len(pixels), columns)]
    picture = Image.fromarray(np.concatenate(rows, axis=0))
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def evaluate(kind: str, n: int = 256, steps: int = 50, cfg: float = 3.0, seed: int = 0, batch: int = 64) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    denoiser, classifier = load(kind), load_classifier()
    labels = torch.arange(n) % NUM_CLASSES
    images = []
    for start in tqdm(range(0, n, batch), desc=f"sampling {kind}", unit="batch"):
        images.append(sample(denoiser, labels[start:start + batch], steps=steps, cfg=cfg, seed=seed + start))
    images = torch.cat(images)
    with torch.no_grad():
        predicted = classifier(images).argmax(dim=1)
    per_class = {c: (predicted[labels == i] == i).float().mean().item() for i, c in enumerate(CLASSES)}
    result = {"kind": kind, "samples": n, "sampler": f"DDIM {steps} steps", "cfg": cfg, "seed": seed,
              "accuracy": accuracy(classifier, images, labels), "per_class": per_class}
    order = torch.cat([torch.nonzero(labels == c).flatten()[:8] for c in range(NUM_CLASSES)])
    grid(images[order], columns=8).save(WEIGHTS / f"{kind}.samples.png")
    (WEIGHTS / f"{kind}.eval.json").write_text(json.dumps(result, indent=1))
    return result


ARCHITECTURES = {
    "dit": (f"diffusers DiTTransformer2DModel, {DIT_CONFIG['num_layers']} blocks, hidden "
            f"{DIT_CONFIG['num_attention_heads'] * DIT_CONFIG['attention_head_dim']} ({DIT_CONFIG['num_attention_heads']} "
            f"heads), patch {DIT_CONFIG['patch_size']}, adaLN-Zero"),
    "unet": (f"diffusers UNet2DConditionModel, channels {UNET_CONFIG['block_out_channels']}, cross-attention to "
             "4 class tokens at 16x16 and 8x8"),
}


def write_model_card() -> str:
    parts = ["# Bundled tiny models\n",
             "Trained by `scripts/train_tiny.py` on CPU from procedural 32x32 images (`tinymodels/shapes.py`): "
             f"{NUM_CLASSES} classes ({', '.join(CLASSES)}) of coloured shapes on textured backgrounds, "
             "drawn fresh for every batch from a seeded generator (no downloads). DDPM epsilon objective "
             "(1000 linear-beta steps), AdamW, 10 % label dropout to the null class for classifier-free "
             "guidance, EMA weights, shipped in fp16 safetensors.\n",
             "Quality is graded by a small CNN trained on the same generator (`classifier.safetensors`): "
             "the share of 256 samples (DDIM 50 steps, CFG 3, classes in turn) it labels with the class "
             "that was asked for.\n"]
    for kind in ("dit", "unet", "classifier"):
        train_file, eval_file = WEIGHTS / f"{kind}.train.json", WEIGHTS / f"{kind}.eval.json"
        if not train_file.exists():
            continue
        t = json.loads(train_file.read_text())
        size = weights_path(kind).stat().st_size / 2 ** 20 if weights_path(kind).exists() else 0
        parts.append(f"\n## {kind}\n")
        if kind in ARCHITECTURES:
            parts.append(f"- architecture: {ARCHITECTURES[kind]}\n")
        parts.append(f"- parameters: {t['params']:,} ({size:.1f} MiB fp16)\n- training: {t['steps']} steps, "
                     f"batch {t['batch']}, lr {t['lr']}, EMA {t['ema_decay']}, {t['train_minutes']} minutes "
                     f"on CPU (one training thread; `--teacher` runs add a process on a second core)\n"
                     f"- final training loss (mean of the last 100 steps): {t['final_loss']:.4f}\n")
        if t.get("teacher_steps"):
            parts.append(f"- of these, {t['teacher_steps']} steps regressed onto the bundled {t['teacher']}'s noise "
                         "prediction for the same noisy image, label and timestep (`--teacher`) instead of onto "
                         "the sampled noise\n")
        if t.get("min_snr"):
            parts.append(f"- loss weighted by min(SNR, {t['min_snr']:g}) / SNR (`--min-snr`)\n")
        if t.get("lr_decay"):
            parts.append(f"- learning rate annealed (cosine, to a tenth) over the last {t['lr_decay']:.0%} of the "
                         "latest run (`--decay`)\n")
        for line in t.get("history", []):
            parts.append(f"- history: {line}\n")
        if t.get("shipped_weights"):
            parts.append(f"- shipped weights: {t['shipped_weights']}\n")
        if "heldout_accuracy" in t:
            parts.append(f"- accuracy on 2048 fresh generator images: {t['heldout_accuracy']:.1%}\n")
        if eval_file.exists():
            e = json.loads(eval_file.read_text())
            per = ", ".join(f"{c} {v:.0%}" for c, v in e["per_class"].items())
            parts.append(f"- **class accuracy of samples: {e['accuracy']:.1%}** ({e['samples']} samples, "
                         f"{e['sampler']}, CFG {e['cfg']}); per class: {per}\n- samples (rows = classes): "
                         f"![{kind} samples]({kind}.samples.png)\n")
    card = "".join(parts)
    (WEIGHTS / "MODEL_CARD.md").write_text(card)
    return card


def main(argv=None):
    parser = argparse.ArgumentParser(description="Grade bundled tiny models and write their model card.")
    parser.add_argument("kinds", nargs="*", default=["dit", "unet"])
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args(argv)
    for kind in args.kinds:
        print(json.dumps(evaluate(kind, n=args.samples)))
    write_model_card()


if __name__ == "__main__":
    main()
