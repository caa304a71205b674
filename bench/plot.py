"""Speedup vs. PSNR scatter, drawn with PIL (no plotting library needed)."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"CacheKit": (230, 90, 20), "diffusers": (40, 110, 200), "deepcache (official)": (60, 160, 70)}
MARKERS = {"dit": "o", "unet": "s"}


def scatter(rows: list[dict], path: Path, size=(900, 600), margin=70) -> None:
    points = [(r["speedup"], min(r["psnr_db"], 60.0), r) for r in rows if math.isfinite(r["speedup"])]
    if not points:
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(0.9, min(xs)), max(xs) * 1.05
    y0, y1 = min(ys) - 2, max(ys) + 2
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    sx = lambda v: margin + (v - x0) / (x1 - x0) * (w - 2 * margin)
    sy = lambda v: h - margin - (v - y0) / (y1 - y0) * (h - 2 * margin)
    draw.rectangle([margin, margin, w - margin, h - margin], outline="black")
    for i in range(6):
        xv, yv = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        draw.text((sx(xv) - 12, h - margin + 6), f"{xv:.2f}", fill="black")
        draw.text((8, sy(yv) - 6), f"{yv:.1f}", fill="black")
    draw.text((w / 2 - 80, h - 30), "measured speedup (x)", fill="black")
    draw.text((8, 20), "PSNR vs. uncached (dB); circle = DiT, square = U-Net", fill="black")
    for x, y, r in points:
        c = COLOURS.get(r["origin"], (120, 120, 120))
        px, py = sx(x), sy(y)
        box = [px - 5, py - 5, px + 5, py + 5]
        (draw.ellipse if MARKERS.get(r["model"]) == "o" else draw.rectangle)(box, fill=c)
        draw.text((px + 7, py - 6), f"{r['method']} {r['setting']}", fill=c)
    for i, (origin, c) in enumerate(COLOURS.items()):
        draw.rectangle([w - margin - 170, margin + 10 + 18 * i, w - margin - 160, margin + 20 + 18 * i], fill=c)
        draw.text((w - margin - 152, margin + 8 + 18 * i), origin, fill=c)
    img.save(path)
