"""CacheKit preview panel (Gradio 6): bundled tiny models, cached vs. uncached, with hit rates.

    python -m panel            # via scripts/panel.sh; binds 127.0.0.1:7860 unless told otherwise

Only the wiring lives here: the run is engine.py, the words and JSON report.py, the pictures
charts.py and pictures.py, none of which import gradio.
"""
from __future__ import annotations

import argparse

import gradio as gr

from ..core.reuse import STRATEGIES
from ..tinymodels.shapes import CLASSES
from ..core.heatmap import block_heatmap
from . import charts, comfy_client, engine, pictures, report

CONTROLS = ("interval", "branch", "delta", "start_percent", "reuse")   # method sliders, in the order of build()
# The charts carry their own titles (charts.py): gradio's label would sit on top of the picture.
CHART = dict(type="numpy", format="png", interactive=False, show_label=False, buttons=["download", "fullscreen"])


def _charts(t: dict):
    """Heatmap, per-step and per-block pictures of one run's telemetry."""
    groups, heat = block_heatmap(t)
    axis = charts.step_axis(t, groups)
    return (charts.heatmap_chart(groups, heat, axis).image,
            charts.step_chart(t["step_hit_rates"], axis, t.get("skipped_steps", [])).image,
            charts.block_chart(groups, heat).image)


def _controls_for(method: str):
    """The method's one-line description, and its sliders visible (the others hidden)."""
    wanted = engine.SETTINGS.get(method, ())
    return [f"**{method}**: {engine.DESCRIPTIONS.get(method, '')}"] + \
        [gr.update(visible=name in wanted) for name in CONTROLS]


def _methods_for(model):
    choices = list(engine.METHODS[model])
    return [gr.update(choices=choices, value=choices[0])] + _controls_for(choices[0])


def comfy_runs(url):
    """The newest CacheKit run of a running ComfyUI, shown in the sidebar, plus the list of runs."""
    try:
        runs = comfy_client.fetch_runs(url)
    except ValueError as error:
        raise gr.Error(str(error))
    if not runs:
        raise gr.Error(f"No CacheKit run in {url} yet: queue a prompt with a CacheKit node there.")
    newest = runs[-1]
    heat, per_step, per_block = _charts(newest["telemetry"])
    listing = "\n".join(f"- {comfy_client.describe(r)}" for r in reversed(runs))
    download = report.write_json(newest, f"cachekit_comfyui_run_{newest.get('id', 'latest')}.json")
    return report.comfy_summary(newest), heat, per_step, per_block, listing, newest, str(download)


def generate(model, method, interval, branch, class_name, seed, steps, cfg, images, delta=engine.Request.delta,
             start_percent=engine.Request.start_percent, rounds=engine.Request.rounds, reuse=engine.Request.reuse,
             progress=gr.Progress()):
    request = engine.Request(model=model, method=method, interval=int(interval), branch=int(branch),
                             class_name=class_name, seed=int(seed), steps=int(steps), cfg=float(cfg),
                             images=int(images), delta=float(delta), start_percent=float(start_percent),
                             rounds=int(rounds), reuse=str(reuse))

    def on_progress(text, done, total):
        progress(done / total, desc=text)
    try:
        result = engine.run(request, progress=False, on_progress=on_progress)
    except (ValueError, FileNotFoundError) as error:
        raise gr.Error(str(error))
    progress(1.0, desc="drawing the charts")
    heat, per_step, per_block = _charts(result.telemetry)
    diff, gain = pictures.difference(result.uncached, result.cached)
    record = report.run_record(request, result)
    record["difference_gain"] = gain
    download = report.write_json(record, report.file_name(request))
    # The gain changes per run, so it goes in the label (an update: API callers get {"value", "label"}).
    diff_label = f"|uncached − cached| × {gain}"
    return (pictures.side_by_side(result.uncached), pictures.side_by_side(result.cached),
            gr.update(value=pictures.side_by_side(diff), label=diff_label),
            report.run_summary(request, result), heat, per_step, per_block, record, str(download))


def build() -> gr.Blocks:
    with gr.Blocks(title="CacheKit preview") as app:
        with gr.Sidebar(open=True, width=400):
            gr.Markdown("## Run summary")
            summary = gr.Markdown("Run a generation to see its timings and what was reused.", elem_id="hit-summary")
            block_plot = gr.Image(label="Hit rate per block", elem_id="block-plot", **CHART)
            download = gr.File(label="Run data (JSON: settings, timings, per-step hit rates)", interactive=False,
                               elem_id="run-json")
        gr.Markdown("# CacheKit preview\nThe bundled tiny models, sampled without and with caching, same seed.")
        with gr.Row():
            model = gr.Dropdown(list(engine.MODELS), value="unet", label="Model", elem_id="model")
            # allow_custom_value: API callers may ask for the DiT's methods without first switching the
            # model dropdown; engine.Request.check refuses a method that does not fit the model.
            method = gr.Dropdown(list(engine.METHODS["unet"]), value="DeepCache", label="Method", elem_id="method",
                                 allow_custom_value=True)
            class_name = gr.Dropdown(list(CLASSES), value=CLASSES[0], label="Class")
            seed = gr.Number(value=0, precision=0, label="Seed")
        first = _controls_for("DeepCache")
        method_info = gr.Markdown(first[0], elem_id="method-info")
        with gr.Row():   # slider defaults come from engine.Request: the UI and API callers get the same run
            shown = {name: update["visible"] for name, update in zip(CONTROLS, first[1:])}
            interval = gr.Slider(1, 10, value=engine.Request.interval, step=1, label="Interval (full step every N)",
                                 visible=shown["interval"], elem_id="interval")
            branch = gr.Slider(0, 8, value=engine.Request.branch, step=1, label="DeepCache branch (0 = shallowest)",
                               visible=shown["branch"], elem_id="branch")
            delta = gr.Slider(0.0, 0.5, value=engine.Request.delta, step=0.005,
                              label="AdaptiveDiffusion delta (skip threshold)", visible=shown["delta"], elem_id="delta")
            start_percent = gr.Slider(0.0, 0.9, value=engine.Request.start_percent, step=0.05,
                                      label="FORA start (share of steps computed in full)",
                                      visible=shown["start_percent"], elem_id="start-percent")
            reuse = gr.Dropdown(list(STRATEGIES), value=engine.Request.reuse, label="Reuse",
                                info="hold: last computed value; forecast1/2: Taylor extrapolation (TaylorSeer)",
                                visible=shown["reuse"], elem_id="reuse")
        with gr.Row():
            steps = gr.Slider(5, 100, value=engine.Request.steps, step=1, label="Steps (DDIM)", elem_id="steps")
            cfg = gr.Slider(1.0, 8.0, value=engine.Request.cfg, step=0.5, label="CFG")
            images = gr.Slider(1, 8, value=engine.Request.images, step=1, label="Images", elem_id="images")
            rounds = gr.Slider(1, engine.MAX_ROUNDS, value=engine.Request.rounds, step=1, elem_id="rounds",
                               label="Timing rounds", info="more: the speedup gets a range")
        run = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            # PNG, not the default WebP: lossless, so API users get the exact pixels.
            uncached = gr.Image(label="Uncached", type="numpy", format="png", interactive=False, elem_id="uncached")
            cached = gr.Image(label="Cached", type="numpy", format="png", interactive=False, elem_id="cached")
            difference = gr.Image(label="|uncached − cached|, amplified", type="numpy", format="png",
                                  interactive=False, elem_id="difference")
        heatmap = gr.Image(label="Step x block heatmap", elem_id="heatmap", **CHART)
        step_plot = gr.Image(label="Hit rate per step", elem_id="step-plot", **CHART)
        stats = gr.JSON(label="Run data", visible=False)
        with gr.Accordion("Attach to a running ComfyUI", open=False):
            gr.Markdown("Show the CacheKit runs of a ComfyUI with CacheKit installed (newest in the sidebar).")
            with gr.Row():
                comfy_url = gr.Textbox(value=comfy_client.DEFAULT_URL, label="ComfyUI URL", elem_id="comfy-url")
                attach = gr.Button("Show ComfyUI runs", elem_id="comfy-attach")
            comfy_list = gr.Markdown(elem_id="comfy-runs")
            comfy_run = gr.JSON(label="Newest run", visible=False)
        controls = [method_info, interval, branch, delta, start_percent, reuse]
        model.change(_methods_for, model, [method] + controls)
        method.change(_controls_for, method, controls)
        inputs = [model, method, interval, branch, class_name, seed, steps, cfg, images, delta, start_percent, rounds,
                  reuse]
        run.click(generate, inputs, [uncached, cached, difference, summary, heatmap, step_plot, block_plot, stats,
                                     download], api_name="generate")
        attach.click(comfy_runs, comfy_url, [summary, heatmap, step_plot, block_plot, comfy_list, comfy_run, download],
                     api_name="comfy_runs")
    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description="CacheKit preview panel")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    build().queue().launch(server_name=args.host, server_port=args.port)
