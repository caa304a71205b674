"""Speedup vs. PSNR plots, drawn with PIL (no plotting library needed)."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"CacheKit": (230, 90, 20), "fewer steps": (110, 110, 110), "deepcache (official)": (60, 160, 70),
           "cache-dit": (150, 60, 180), "diffusers": (40, 110, 200)}
MARKERS = {"dit": "o", "unet": "s"}


class _Axes:
    def __init__(self, xs, ys, size, margin):
        self.x0, self.x1 = min(0.9, min(xs)), max(xs) * 1.05
        self.y0, self.y1 = min(ys) - 2, max(ys) + 2
        self.w, self.h = size
        self.m = margin

    def sx(self, v):
        return self.m + (v - self.x0) / (self.x1 - self.x0) * (self.w - 2 * self.m)

    def sy(self, v):
        return self.h - self.m - (v - self.y0) / (self.y1 - self.y0) * (self.h - 2 * self.m)

    def frame(self, draw, x_label, y_label):
        w, h, m = self.w, self.h, self.m
        draw.rectangle([m, m, w - m, h - m], outline="black")
        for i in range(6):
            xv, yv = self.x0 + (self.x1 - self.x0) * i / 5, self.y0 + (self.y1 - self.y0) * i / 5
            draw.line([self.sx(xv), h - m, self.sx(xv), h - m + 4], fill="black")
            draw.text((self.sx(xv) - 12, h - m + 6), f"{xv:.2f}", fill="black")
            draw.text((8, self.sy(yv) - 6), f"{yv:.1f}", fill="black")
        draw.text((w / 2 - 80, h - 30), x_label, fill="black")
        draw.text((8, 20), y_label, fill="black")

    def legend(self, draw, items):
        for i, (origin, c) in enumerate(items):
            y = self.m + 10 + 18 * i
            draw.rectangle([self.w - self.m - 170, y, self.w - self.m - 160, y + 10], fill=c)
            draw.text((self.w - self.m - 152, y - 2), origin, fill=c)


def scatter(rows: list[dict], path: Path, size=(900, 600), margin=70) -> None:
    points = [(r["speedup"], min(r["psnr_db"], 60.0), r) for r in rows
              if r.get("speedup") is not None and math.isfinite(r["speedup"]) and r.get("psnr_db") is not None]
    if not points:
        return
    axes = _Axes([p[0] for p in points], [p[1] for p in points], size, margin)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    axes.frame(draw, "measured speedup (x, CPU time)", "PSNR vs. uncached (dB); circle = DiT, square = U-Net")
    for x, y, r in points:
        c = COLOURS.get(r["origin"], (120, 120, 120))
        px, py = axes.sx(x), axes.sy(y)
        box = [px - 5, py - 5, px + 5, py + 5]
        (draw.ellipse if MARKERS.get(r["model"]) == "o" else draw.rectangle)(box, fill=c)
        draw.text((px + 7, py - 6), f"{r['method']} {r['setting']}", fill=c)
    axes.legend(draw, COLOURS.items())
    img.save(path)


def _marker(draw, origin: str, px: float, py: float, c, r: float = 5) -> None:
    """CacheKit: filled circles; alternatives: outlined shapes (square, triangle, diamond)."""
    if origin == "CacheKit":
        draw.ellipse([px - r, py - r, px + r, py + r], fill=c)
    elif origin == "cache-dit":
        draw.polygon([(px, py - r - 1), (px - r, py + r), (px + r, py + r)], outline=c, width=2)
    elif origin == "fewer steps":
        draw.polygon([(px, py - r - 1), (px + r + 1, py), (px, py + r + 1), (px - r - 1, py)], outline=c, width=2)
    else:
        draw.rectangle([px - r, py - r, px + r, py + r], outline=c, width=2)


def _label(draw, text: str, px: float, py: float, colour, placed: list, width: int) -> None:
    """Text beside a point, on the left when it would leave the image, moved down past labels
    already placed."""
    left, top, right, bottom = draw.textbbox((0, 0), text)
    tw, th = right - left, bottom - top + 2
    x = px + 10 if px + 10 + tw < width - 4 else px - 10 - tw
    y = py - 14
    for _ in range(20):
        box = (x, y, x + tw, y + th)
        if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
            break
        y += th
    placed.append((x, y, x + tw, y + th))
    draw.text((x, y), text, fill=colour)


def frontier_plot(rows: list[dict], path: Path, title: str, size=(1000, 680), margin=70) -> None:
    """One model's rows (bench/frontier.py: `speed`, `pareto_psnr`): PSNR vs. speed, the Pareto
    front as a staircase, the fewer-steps baseline as a line; uncached (inf dB) drawn at the top."""
    usable = [r for r in rows if r.get("speed") is not None and r.get("psnr_db") is not None]
    if not usable:
        return
    finite = [r["psnr_db"] for r in usable if math.isfinite(r["psnr_db"])] or [0.0]
    top = max(finite) + 3
    y_of = lambda r: r["psnr_db"] if math.isfinite(r["psnr_db"]) else top
    axes = _Axes([r["speed"] for r in usable], [y_of(r) for r in usable], size, margin)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    axes.frame(draw, "speedup (x, process CPU time)", f"{title}. PSNR vs. uncached (dB); black: Pareto front")
    fewer = sorted((r for r in usable if r["origin"] == "fewer steps"), key=lambda r: r["speed"])
    draw.line([(axes.sx(r["speed"]), axes.sy(y_of(r))) for r in fewer], fill=COLOURS["fewer steps"], width=1)
    front = sorted((r for r in usable if r.get("pareto_psnr")), key=lambda r: r["speed"])
    stairs = []
    for r in front:
        x, y = axes.sx(r["speed"]), axes.sy(y_of(r))
        if stairs:
            stairs.append((stairs[-1][0], y))
        stairs.append((x, y))
    if len(stairs) > 1:
        draw.line(stairs, fill="black", width=2)
    placed: list[tuple[float, float, float, float]] = []
    for r in usable:
        c = COLOURS.get(r["origin"], (0, 0, 0))
        px, py = axes.sx(r["speed"]), axes.sy(y_of(r))
        _marker(draw, r["origin"], px, py, c)
        if r.get("pareto_psnr"):
            draw.ellipse([px - 8, py - 8, px + 8, py + 8], outline="black")
            label = "uncached" if r["method"] == "uncached" else f"{r['method']} {r['setting']}"
            _label(draw, label, px, py, c if r["origin"] in COLOURS else "black", placed, size[0])
    present = {r["origin"] for r in usable}
    axes.legend(draw, [(f"{o} ({'filled' if o == 'CacheKit' else 'outline'})", c) for o, c in COLOURS.items()
                       if o in present])
    img.save(path)
