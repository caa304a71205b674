"""CacheKit preview panel (Gradio 6): bundled tiny models, cached vs. uncached, with hit rates.

    python -m panel            # via scripts/panel.sh; binds 127.0.0.1:7860 unless told otherwise
"""
from __future__ import annotations

import argparse

import gradio as gr
import numpy as np
import pandas as pd

from ..tinymodels.shapes import CLASSES
from ..core.heatmap import block_heatmap, heatmap_image
from . import comfy_client, engine

SCALE = 6


def _picture(images: np.ndarray) -> np.ndarray:
    """Images side by side, enlarged (nearest) so 32x32 pixels stay crisp."""
    row = np.concatenate(list(images), axis=1)
    return np.kron(row, np.ones((SCALE, SCALE, 1), dtype=np.uint8))


def _sidebar_values(t: dict, measured: float | None, psnr_db: float | None):
    steps = pd.DataFrame({"step": list(range(t["num_steps"])),
                          "hit rate": [0.0 if v is None else v for v in t["step_hit_rates"]]})
    groups, heat = block_heatmap(t)
    with np.errstate(all="ignore"):
        per_block = np.nan_to_num(np.nanmean(heat, axis=0)) if heat.size else np.zeros(len(groups))
    blocks = pd.DataFrame({"block": groups, "hit rate": per_block})
    speed = [f"{measured:.2f}x measured"] if measured else []
    if t.get("ideal_speedup"):
        speed.append(f"{t['ideal_speedup']:.2f}x FLOP-weighted ideal")
    lines = [f"### Hit rate {t['hit_rate']:.0%}"]
    if speed:
        lines.append("**Speedup** " + ", ".join(speed))
    if psnr_db is not None:
        lines.append(f"**PSNR vs. uncached** {psnr_db:.1f} dB")
    if t["executed_fraction"] is not None:
        lines.append(f"**Work executed** {t['executed_fraction']:.0%}")
    if t.get("skipped_steps"):
        lines.append(f"**Skipped steps** {', '.join(map(str, t['skipped_steps']))}")
    summary = "  \n".join(lines)
    return summary, steps, blocks, heatmap_image(heat)


def comfy_runs(url):
    """The newest CacheKit run of a running ComfyUI, shown in the sidebar, plus the list of runs."""
    try:
        runs = comfy_client.fetch_runs(url)
    except ValueError as error:
        raise gr.Error(str(error))
    if not runs:
        raise gr.Error(f"No CacheKit run in {url} yet: queue a prompt with a CacheKit node there.")
    newest = runs[-1]
    t = newest["telemetry"]
    summary, step_df, block_df, heat = _sidebar_values(t, t.get("measured_speedup"), None)
    listing = "\n".join(f"- {comfy_client.describe(r)}" for r in reversed(runs))
    return summary, step_df, block_df, heat, listing, newest


def generate(model, method, interval, branch, class_name, seed, steps, cfg, images, delta=engine.Request.delta,
             start_percent=engine.Request.start_percent, progress=gr.Progress(track_tqdm=True)):
    request = engine.Request(model=model, method=method, interval=int(interval), branch=int(branch),
                             class_name=class_name, seed=int(seed), steps=int(steps), cfg=float(cfg), images=int(images),
                             delta=float(delta), start_percent=float(start_percent))
    try:
        result = engine.run(request)
    except (ValueError, FileNotFoundError) as error:
        raise gr.Error(str(error))
    summary, step_df, block_df, heat = _sidebar_values(result.telemetry, result.speedup, result.psnr_db)
    stats = {"speedup": result.speedup, "psnr_db": result.psnr_db, "uncached_s": result.uncached_s,
             "cached_s": result.cached_s, "telemetry": result.telemetry}
    return (_picture(result.uncached), _picture(result.cached), summary, step_df, block_df, heat, stats)


def _methods_for(model):
    choices = list(engine.METHODS[model])
    return gr.update(choices=choices, value=choices[0]), gr.update(visible=model == "unet")


def build() -> gr.Blocks:
    with gr.Blocks(title="CacheKit preview") as app:
        with gr.Sidebar(open=True, width=380):
            gr.Markdown("## Cache hit rates")
            summary = gr.Markdown("Run a generation to see what was reused.", label="Summary", elem_id="hit-summary")
            step_plot = gr.BarPlot(x="step", y="hit rate", title="Per step", y_lim=[0, 1], label="Hit rate per step",
                                  elem_id="step-plot")
            block_plot = gr.BarPlot(x="block", y="hit rate", title="Per block", y_lim=[0, 1], label="Hit rate per block",
                                   elem_id="block-plot")
            heatmap = gr.Image(label="Step x block (columns = steps; bright = reused)", type="numpy",
                               format="png", interactive=False, elem_id="heatmap")
        gr.Markdown("# CacheKit preview\nThe bundled tiny models, sampled without and with caching, same seed.")
        with gr.Row():
            model = gr.Dropdown(list(engine.MODELS), value="unet", label="Model")
            method = gr.Dropdown(list(engine.METHODS["unet"]), value="DeepCache", label="Method")
            class_name = gr.Dropdown(list(CLASSES), value=CLASSES[0], label="Class")
            seed = gr.Number(value=0, precision=0, label="Seed")
        with gr.Row():   # slider defaults come from engine.Request: the UI and API callers get the same run
            interval = gr.Slider(1, 10, value=engine.Request.interval, step=1, label="Interval (full step every N)")
            branch = gr.Slider(0, 8, value=engine.Request.branch, step=1, label="DeepCache branch")
            steps = gr.Slider(5, 100, value=engine.Request.steps, step=1, label="Steps (DDIM)")
            cfg = gr.Slider(1.0, 8.0, value=engine.Request.cfg, step=0.5, label="CFG")
            images = gr.Slider(1, 8, value=engine.Request.images, step=1, label="Images")
            delta = gr.Slider(0.0, 0.5, value=engine.Request.delta, step=0.005,
                              label="AdaptiveDiffusion delta (skip threshold)")
            start_percent = gr.Slider(0.0, 0.9, value=engine.Request.start_percent, step=0.05,
                                      label="FORA start (share of steps computed in full)")
        run = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            # PNG, not the default WebP: lossless, so API users get the exact pixels.
            uncached = gr.Image(label="Uncached", type="numpy", format="png", interactive=False, elem_id="uncached")
            cached = gr.Image(label="Cached", type="numpy", format="png", interactive=False, elem_id="cached")
        stats = gr.JSON(label="Run data", visible=False)
        with gr.Accordion("Attach to a running ComfyUI", open=False):
            gr.Markdown("Show the CacheKit runs of a ComfyUI with CacheKit installed (newest in the sidebar).")
            with gr.Row():
                comfy_url = gr.Textbox(value=comfy_client.DEFAULT_URL, label="ComfyUI URL", elem_id="comfy-url")
                attach = gr.Button("Show ComfyUI runs", elem_id="comfy-attach")
            comfy_list = gr.Markdown(elem_id="comfy-runs")
            comfy_run = gr.JSON(label="Newest run", visible=False)
        model.change(_methods_for, model, [method, branch])
        inputs = [model, method, interval, branch, class_name, seed, steps, cfg, images, delta, start_percent]
        run.click(generate, inputs,
                  [uncached, cached, summary, step_plot, block_plot, heatmap, stats], api_name="generate")
        attach.click(comfy_runs, comfy_url, [summary, step_plot, block_plot, heatmap, comfy_list, comfy_run],
                     api_name="comfy_runs")
    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description="CacheKit preview panel")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    build().queue().launch(server_name=args.host, server_port=args.port)
