"""Labelled pictures of a run for the panel: the step x block heatmap, hit rate per step and per block.

Drawn with PIL (it comes with gradio) rather than gr.BarPlot: a plot library picks its own tick
density and, at 100 steps or 30 blocks, its labels collide or the picture collapses to a strip.
Here every size is chosen from the data: a cell is never thinner than the text needs, labels
are thinned out instead of overlapped, and each chart records where it put its labels so
tests can check them. Steps are shown 1-based (step 1 is the first step), as progress counts them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..core.heatmap import COMPUTED, IDLE, REUSED, block_means, heatmap_colors

FONT = ImageFont.load_default(size=13)     # Pillow's bundled font: no system font needed
_ASCENT, _DESCENT = FONT.getmetrics()
LINE = _ASCENT + _DESCENT                  # height of one line of text, the unit of label spacing
INK, GRID, BACKGROUND = (40, 40, 40), (215, 215, 220), (255, 255, 255)
PLOT_WIDTH = 700            # pixels the steps share: 7 px a step at 100 steps, about the panel's column
MAX_CELL_WIDTH = 36         # a few steps must not turn into huge blocks
ROW_HEIGHT = LINE + 4       # a block's row, tall enough for its own label
MAX_ROWS_HEIGHT = 640       # past this, rows shrink and only every k-th block is named
MAX_LABEL_WIDTH = 190       # longer block names are shortened in the middle
PAD = 8
TITLE = LINE + PAD          # the title row on top of every chart (the panel hides gradio's label overlay)
Box = tuple[int, int, int, int]


@dataclass
class Chart:
    image: np.ndarray                                            # RGB uint8
    labels: list[tuple[str, Box]] = field(default_factory=list)  # every text drawn, with its line box


def _width(text: str) -> int:
    return math.ceil(FONT.getlength(text))


def shorten(text: str, max_width: int = MAX_LABEL_WIDTH) -> str:
    """Keep both ends of a long name (block names differ at the end: 'transformer_blocks.11')."""
    if _width(text) <= max_width:
        return text
    keep = len(text)
    while keep > 2 and _width(text[:keep // 2] + "…" + text[len(text) - (keep - keep // 2):]) > max_width:
        keep -= 1
    return text[:keep // 2] + "…" + text[len(text) - (keep - keep // 2):]


def label_every(row_height: float) -> int:
    """Name every k-th row so that label lines (plus 1 px) never touch."""
    return max(1, math.ceil((LINE + 1) / row_height))


def tick_steps(num_steps: int, cell_width: float) -> list[int]:
    """1-based step numbers to label: round multiples with some air between them (1, 10, 20 ... at
    100 steps rather than a crowded 1, 5, 10 ...), plus step 1 where it does not touch the next."""
    label = _width(str(num_steps))
    interval = next((k for k in (1, 2, 5, 10, 20, 25, 50, 100, 200, 500, 1000) if k * cell_width >= 1.3 * label + 4),
                    num_steps)
    ticks = list(range(interval, num_steps + 1, interval))
    if not ticks or (ticks[0] > 1 and (ticks[0] - 1) * cell_width >= label + 6):
        ticks.insert(0, 1)
    return ticks


class _Canvas:
    """A PIL drawing that remembers the box of every text it draws."""

    def __init__(self, width: int, height: int):
        self.image = Image.new("RGB", (int(width), int(height)), BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self.labels: list[tuple[str, Box]] = []

    def text(self, x: float, y: float, text: str, anchor: str = "la", fill=INK) -> None:
        """anchor: PIL's horizontal l/m/r and vertical a (top) / m (middle). Boxes span a full line."""
        w = _width(text)
        left = {"l": x, "m": x - w / 2, "r": x - w}[anchor[0]]
        top = {"a": y, "m": y - LINE / 2}[anchor[1]]
        self.draw.text((left, top), text, font=FONT, fill=fill)
        self.labels.append((text, (math.floor(left), math.floor(top), math.ceil(left + w), math.ceil(top + LINE))))

    def title(self, text: str) -> None:
        self.text(PAD / 2, 3, text)

    def chart(self) -> Chart:
        return Chart(np.asarray(self.image).copy(), self.labels)


@dataclass(frozen=True)
class StepAxis:
    """Where the steps go: shared by the heatmap and the per-step chart so their columns line up."""
    num_steps: int
    left: int

    @property
    def cell(self) -> float:
        return min(MAX_CELL_WIDTH, max(2.0, PLOT_WIDTH / max(1, self.num_steps)))

    @property
    def right(self) -> int:
        return self.left + math.ceil(self.cell * self.num_steps)

    def x(self, step: int) -> float:           # left edge of 0-based step `step`
        return self.left + step * self.cell

    def draw_ticks(self, canvas: _Canvas, top: float, title: str = "step") -> float:
        """Tick marks and 1-based step numbers under a plot; returns the y below them."""
        for step in tick_steps(self.num_steps, self.cell):
            cx = self.x(step - 1) + self.cell / 2
            canvas.draw.line([(cx, top), (cx, top + 4)], fill=INK)
            canvas.text(cx, top + 5, str(step), anchor="ma")
        canvas.text(self.left, top + 5 + LINE + 2, title)
        return top + 5 + 2 * LINE + 4

    def canvas_width(self, *widths: int) -> int:
        """Wide enough for the plot and for lines of these widths that start at its left edge (with
        few steps the plot is narrower than its legend or title)."""
        last_tick = self.right + _width(str(self.num_steps)) // 2 + 1      # centred under the last step
        return max([last_tick] + [self.left + w for w in widths]) + PAD


def _label_column(names: list[str]) -> int:
    return max([_width(shorten(n)) for n in names] + [_width("block"), _width("100%")]) + 2 * PAD


def step_axis(telemetry: dict, groups: list[str]) -> StepAxis:
    return StepAxis(telemetry["num_steps"], _label_column(groups))


def _rows(count: int) -> tuple[float, int]:
    """Row height and label interval for `count` blocks (rows shrink only past MAX_ROWS_HEIGHT)."""
    height = ROW_HEIGHT if count * ROW_HEIGHT <= MAX_ROWS_HEIGHT else max(3.0, MAX_ROWS_HEIGHT / count)
    return height, label_every(height)


def _rows_top(row: float) -> float:
    """First row's top: below the title and the 'block' header, also for the (centred) label of a
    thin first row."""
    return TITLE + LINE + PAD + max(0.0, (LINE - row) / 2)


def heatmap_chart(groups: list[str], heat: np.ndarray, axis: StepAxis | None = None,
                  title: str = "What each block reused at each step") -> Chart:
    """Steps left to right, blocks top to bottom (model input first), with a colour legend."""
    axis = axis or StepAxis(heat.shape[0], _label_column(groups))
    row, every = _rows(len(groups))
    top = _rows_top(row)
    bottom = top + row * len(groups)
    legend = [(COMPUTED, "computed"), (REUSED, "reused"), (IDLE, "did not run")]
    legend_width = sum(16 + _width(name) + 18 for _, name in legend)
    width = axis.canvas_width(legend_width, PAD + _width(title) - axis.left)
    canvas = _Canvas(width, bottom + 3 * LINE + 2 * PAD + 14)
    canvas.title(title)
    canvas.text(axis.left - PAD, TITLE + PAD / 2, "block", anchor="ra")
    colors = heatmap_colors(heat).round().astype(np.uint8)          # [blocks, steps, 3]
    # Whole-pixel edges, with a 1 px gap between cells only where cells are wide enough to spare it.
    xs = [round(axis.x(s)) for s in range(axis.num_steps + 1)]
    ys = [round(top + j * row) for j in range(len(groups) + 1)]
    gap_x, gap_y = int(axis.cell >= 6), int(row >= 6)
    for j in range(len(groups)):
        for s in range(axis.num_steps):
            canvas.draw.rectangle([xs[s], ys[j], max(xs[s], xs[s + 1] - 1 - gap_x), max(ys[j], ys[j + 1] - 1 - gap_y)],
                                  fill=tuple(int(c) for c in colors[j, s]))
    for j in range(0, len(groups), every):
        canvas.text(axis.left - PAD, top + (j + 0.5) * row, shorten(groups[j]), anchor="rm")
    y = axis.draw_ticks(canvas, bottom + 2)
    x = axis.left
    for color, name in legend:
        canvas.draw.rectangle([x, y + 2, x + 11, y + 13], fill=color)
        canvas.text(x + 16, y, name)
        x += 16 + _width(name) + 18
    return canvas.chart()


def step_chart(step_hit_rates: list[float | None], axis: StepAxis, skipped: list[int] = (),
               title: str = "Hit rate per step (share of the work reused)") -> Chart:
    """Bars of the share reused at each step (a whole skipped step is 100 %); aligned with the heatmap."""
    plot = 120
    top = TITLE + LINE // 2 + 4
    x_title = "step" + (" · blue = whole step skipped" if skipped else "")
    canvas = _Canvas(axis.canvas_width(_width(x_title), PAD + _width(title) - axis.left), top + plot + 3 * LINE + 12)
    canvas.title(title)
    for share in (0.0, 0.5, 1.0):
        y = top + plot * (1 - share)
        canvas.draw.line([(axis.left, y), (axis.right, y)], fill=GRID)
        canvas.text(axis.left - PAD, y, f"{share:.0%}", anchor="rm")
    skipped = set(skipped)
    for s, rate in enumerate(step_hit_rates):
        x0 = round(axis.x(s))
        x1 = max(x0, round(axis.x(s + 1)) - 1 - int(axis.cell >= 6))
        if rate is None:                       # nothing ran: a grey tick on the baseline
            canvas.draw.rectangle([x0, top + plot - 2, x1, top + plot], fill=IDLE)
        elif rate > 0:
            color = (60, 150, 230) if s in skipped else REUSED
            canvas.draw.rectangle([x0, top + plot * (1 - rate), x1, top + plot], fill=color)
    canvas.draw.line([(axis.left, top + plot), (axis.right, top + plot)], fill=INK)
    axis.draw_ticks(canvas, top + plot + 1, x_title)
    return canvas.chart()


def block_chart(groups: list[str], heat: np.ndarray, width: int = 360, title: str = "Hit rate per block") -> Chart:
    """One horizontal bar per block: the share of its work reused over the run, value at the bar's end."""
    shares = block_means(heat)
    row, every = _rows(len(groups))
    label_w = min(_label_column(groups), width // 2)
    value_w = _width("100%") + PAD
    bar_w = width - label_w - value_w - PAD
    top = _rows_top(row)
    canvas = _Canvas(width, top + row * len(groups) + LINE / 2 + PAD)
    canvas.title(title)
    canvas.text(label_w - PAD, TITLE + PAD / 2, "block", anchor="ra")
    canvas.text(label_w, TITLE + PAD / 2, "share of its work reused")
    for j, share in enumerate(shares):
        y0 = top + j * row
        canvas.draw.rectangle([label_w, y0 + 1, label_w + bar_w, y0 + max(1, row - 2)], fill=(238, 238, 242))
        if share > 0:
            canvas.draw.rectangle([label_w, y0 + 1, label_w + bar_w * share, y0 + max(1, row - 2)], fill=REUSED)
        if j % every == 0:
            canvas.text(label_w - PAD, y0 + row / 2, shorten(groups[j], label_w - 2 * PAD), anchor="rm")
            canvas.text(label_w + bar_w + 4, y0 + row / 2, f"{share:.0%}", anchor="lm")
    return canvas.chart()


# -- autotune: PSNR against speedup, with the Pareto frontier ----------------------------------
TRIAL, FRONTIER, CHOSEN, TARGET = (160, 160, 170), (230, 115, 20), (30, 30, 30), (60, 150, 230)


@dataclass
class FrontierChart(Chart):
    # Where each trial was drawn: (trial index, x, y, on the frontier), for tests and tooltips.
    points: list[tuple[int, float, float, bool]] = field(default_factory=list)


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round values (1, 2, 2.5 or 5 times a power of ten apart) covering [low, high], at most `count`."""
    if not high > low:
        high = low + 1.0
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks, value = [], first
    while value <= high + 1e-9 * step:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _dashed(draw: ImageDraw.ImageDraw, a: tuple[float, float], b: tuple[float, float], fill, dash: int = 5) -> None:
    length = math.dist(a, b)
    for start in range(0, int(length), 2 * dash):
        t0, t1 = start / length, min(1.0, (start + dash) / length)
        draw.line([(a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0),
                   (a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1)], fill=fill, width=1)


def _fmt_tick(value: float) -> str:
    return f"{value:g}"


def frontier_chart(record: dict, width: int = PLOT_WIDTH, plot_height: int = 300,
                   title: str = "PSNR vs. measured speedup: every trial, the frontier in orange") -> FrontierChart:
    """The trials of a tune (report: panel/tuning.record) as points, speedup across and PSNR up;
    the frontier (trials no other beats on both) joined by a line, the chosen trial ringed, the
    target dashed. Trials with images identical to the uncached ones sit in a band on top.
    Frontier points are numbered as in the table where their label has room."""
    trials = record["trials"]
    speeds = [t["speedup"] for t in trials]
    finite = [t["psnr"] for t in trials if t["psnr"] is not None]
    identical = any(t["psnr"] is None for t in trials)
    target, value = record["target"], float(record["target_value"])
    x_low, x_high = min(speeds + [1.0]), max(speeds + [1.0] + ([value] if target == "speedup" else []))
    y_values = finite + ([value] if target == "psnr" else []) or [0.0, 1.0]
    y_low, y_high = min(y_values), max(y_values)
    pad_x, pad_y = 0.06 * ((x_high - x_low) or 1.0), 0.08 * ((y_high - y_low) or 2.0)
    x_ticks = nice_ticks(x_low - pad_x, x_high + pad_x)
    y_ticks = nice_ticks(y_low - pad_y, y_high + pad_y)
    x_low, x_high = min(x_ticks[0], x_low - pad_x), max(x_ticks[-1], x_high + pad_x)
    y_low, y_high = min(y_ticks[0], y_low - pad_y), max(y_ticks[-1], y_high + pad_y)

    y_labels = [_fmt_tick(v) for v in y_ticks] + (["identical"] if identical else [])
    left = max(_width(s) for s in y_labels + ["PSNR (dB)"]) + 2 * PAD
    top = TITLE + 2 * LINE + 2                # the y axis title sits above the plot, clear of the top tick
    band = 2 * LINE if identical else 0       # identical images: a band above the finite PSNRs
    plot_top = top + band
    right = width - PAD - _width(_fmt_tick(x_ticks[-1])) // 2
    bottom = plot_top + plot_height
    legend = [(TRIAL, "trial"), (FRONTIER, "on the frontier"), (CHOSEN, "chosen (ringed)"),
              (TARGET, f"target PSNR >= {value:g} dB" if target == "psnr" else f"target speedup >= {value:g}x")]
    below = bottom + LINE // 2 + 3            # x tick labels: clear of the lowest y tick label
    canvas = _Canvas(width, below + 2 * LINE + 6 + LINE + 2 * PAD)
    canvas.title(title)
    canvas.text(PAD, TITLE + 2, "PSNR (dB)")

    def px(speed: float) -> float:
        return left + (speed - x_low) / (x_high - x_low) * (right - left)

    def py(psnr) -> float:
        if psnr is None:
            return top + band / 2
        return bottom - (psnr - y_low) / (y_high - y_low) * plot_height

    for tick in y_ticks:
        y = py(tick)
        canvas.draw.line([(left, y), (right, y)], fill=GRID)
        canvas.text(left - PAD, y, _fmt_tick(tick), anchor="rm")
    if identical:
        canvas.draw.rectangle([left, top, right, plot_top - 2], fill=(246, 246, 248))
        canvas.text(left - PAD, py(None), "identical", anchor="rm")
    for tick in x_ticks:
        x = px(tick)
        canvas.draw.line([(x, top), (x, bottom)], fill=GRID)
        canvas.draw.line([(x, bottom), (x, bottom + 4)], fill=INK)
        canvas.text(x, below, _fmt_tick(tick), anchor="ma")
    canvas.draw.line([(px(1.0), top), (px(1.0), bottom)], fill=(150, 150, 155))      # uncached
    canvas.draw.line([(left, bottom), (right, bottom)], fill=INK)
    canvas.draw.line([(left, top), (left, bottom)], fill=INK)
    canvas.text(left, below + LINE + 2, "measured speedup (x, uncached time / cached time; 1 = uncached)")
    if target == "psnr":
        _dashed(canvas.draw, (left, py(value)), (right, py(value)), TARGET)
    else:
        _dashed(canvas.draw, (px(value), top), (px(value), bottom), TARGET)

    front = sorted((i for i, t in enumerate(trials) if t["on_frontier"]), key=lambda i: speeds[i])
    if len(front) > 1:
        canvas.draw.line([(px(speeds[i]), py(trials[i]["psnr"])) for i in front], fill=FRONTIER, width=2)
    points = []
    order = sorted(range(len(trials)), key=lambda i: trials[i]["on_frontier"])     # frontier drawn last, on top
    for i in order:
        t = trials[i]
        x, y = px(t["speedup"]), py(t["psnr"])
        r = 5 if t["on_frontier"] else 4
        canvas.draw.ellipse([x - r, y - r, x + r, y + r], fill=FRONTIER if t["on_frontier"] else TRIAL)
        if t.get("chosen"):
            canvas.draw.ellipse([x - 9, y - 9, x + 9, y + 9], outline=CHOSEN, width=2)
        points.append((i, x, y, bool(t["on_frontier"])))

    # Number the frontier points where a label fits: inside the plot, clear of every other label
    # and of the points themselves.
    taken = [box for _, box in canvas.labels]
    dots = [(x - 6, y - 6, x + 6, y + 6) for _, x, y, _ in points]
    for i in front:
        x, y = px(speeds[i]), py(trials[i]["psnr"])
        text = f"#{i + 1}"
        w = _width(text)
        for dx, dy in ((10, -LINE - 2), (10, 2), (-10 - w, -LINE - 2), (-10 - w, 2)):
            box = (math.floor(x + dx), math.floor(y + dy), math.ceil(x + dx + w), math.ceil(y + dy + LINE))
            inside = left < box[0] and box[2] < right and top <= box[1] and box[3] <= bottom
            clear = all(_apart(box, other) for other in taken + dots)
            if inside and clear:
                canvas.text(box[0], box[1], text, fill=FRONTIER)
                taken.append(canvas.labels[-1][1])
                break

    y = below + 2 * LINE + 6
    x = left
    for color, name in legend:
        if color is CHOSEN:
            canvas.draw.ellipse([x, y + 1, x + 12, y + 13], outline=CHOSEN, width=2)
        elif color is TARGET:
            _dashed(canvas.draw, (x, y + 7), (x + 12, y + 7), TARGET, dash=3)
        else:
            canvas.draw.ellipse([x + 2, y + 3, x + 10, y + 11], fill=color)
        canvas.text(x + 16, y, name)
        x += 16 + _width(name) + 18
    chart = canvas.chart()
    return FrontierChart(chart.image, chart.labels, points)


def _apart(a: Box | tuple, b: Box | tuple) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
