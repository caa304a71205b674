"""CacheKit preview panel (Gradio 6): bundled tiny models, cached vs. uncached, with hit rates.

    python -m panel            # via scripts/panel.sh; binds 127.0.0.1:7860 unless told otherwise

Only the wiring lives here: the run is engine.py, the autotune tuning.py, the words and JSON
report.py, the pictures charts.py and pictures.py, none of which import gradio.
"""
from __future__ import annotations

import argparse

import gradio as gr
import pandas as pd

from ..core.reuse import STRATEGIES
from ..tinymodels.shapes import CLASSES
from ..core.heatmap import block_heatmap
from . import charts, comfy_client, engine, pictures, report, tuning

CONTROLS = engine.CONTROLS     # the method sliders; build() creates them in this order
# The charts carry their own titles (charts.py): gradio's label would sit on top of the picture.
CHART = dict(type="numpy", format="png", interactive=False, show_label=False, buttons=["download", "fullscreen"])
# The default value of each autotune target (switching the target resets the value to it).
TARGET_DEFAULTS = {"psnr": tuning.TuneRequest.value, "speedup": 1.5}


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
             threshold=engine.Request.threshold, dydit=engine.Request.dydit,
             dydit_width_start=engine.Request.dydit_width_start, max_skip_steps=engine.Request.max_skip_steps,
             learned_forecast=engine.Request.learned_forecast, progress=gr.Progress()):
    request = engine.Request(model=model, method=method, interval=int(interval), branch=int(branch),
                             class_name=class_name, seed=int(seed), steps=int(steps), cfg=float(cfg),
                             images=int(images), delta=float(delta), start_percent=float(start_percent),
                             rounds=int(rounds), reuse=str(reuse), threshold=float(threshold), dydit=bool(dydit),
                             dydit_width_start=float(dydit_width_start), max_skip_steps=int(max_skip_steps),
                             learned_forecast=bool(learned_forecast))

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


def _tune_methods_for(model):
    choices = list(tuning.TUNABLE.get(model, ()))
    return gr.update(choices=choices, value=choices[0] if choices else None)


def _autotune_view(record: dict, saved: bool = False):
    """Summary, trial table, frontier plot, record and JSON download of one tune's record."""
    table = pd.DataFrame(report.autotune_rows(record), columns=report.AUTOTUNE_HEADERS)
    download = report.write_json(record, tuning.file_name(record))
    return (report.autotune_summary(record, saved=saved), table, charts.frontier_chart(record).image, record,
            str(download))


def _empty_table():
    return pd.DataFrame(columns=report.AUTOTUNE_HEADERS)


def autotune(model, method, target, value, steps, images, max_trials, progress=gr.Progress()):
    """Tune `method` on the bundled `model` for a PSNR or speedup target; keeps the result as the
    last tune (shown again when the panel opens)."""
    try:
        request = tuning.TuneRequest(model=model, method=method, target=target, value=float(value), steps=int(steps),
                                     images=int(images), max_trials=int(max_trials))
    except (TypeError, ValueError):
        raise gr.Error(f"The target value, steps, images and max candidates must be numbers; got {value!r}, "
                       f"{steps!r}, {images!r}, {max_trials!r}.")
    try:
        request.check()
        result = tuning.run(request, on_progress=lambda text, fraction: progress(fraction, desc=text))
    except (ValueError, FileNotFoundError) as error:
        raise gr.Error(str(error))
    progress(1.0, desc="drawing the frontier")
    record = tuning.record(request, result)
    try:
        tuning.save_last(record)
    except OSError as error:
        gr.Warning(f"Could not keep this autotune for the next session ({error}).")
    return _autotune_view(record)


def last_autotune():
    """The last autotune's view, read back from disk (the panel's load event); opens the Autotune
    section when there is one."""
    try:
        record = tuning.load_last()
        if record is None:
            return report.NO_AUTOTUNE, _empty_table(), None, None, None, gr.update()
        return (*_autotune_view(record, saved=True), gr.update(open=True))
    except (ValueError, KeyError, TypeError, IndexError) as error:
        message = f"The saved autotune could not be shown: {error} Run autotune again to replace it."
        return message, _empty_table(), None, None, None, gr.update(open=True)


def apply_autotune(record):
    """Model, method, its controls and steps set to the last tune's choice (then press Generate)."""
    if not record:
        raise gr.Error("Run autotune first: there are no tuned settings to use yet.")
    if record.get("chosen") is None:
        raise gr.Error("The last autotune found no setting faster than uncached, so there is nothing to use.")
    controls, panel, left = tuning.control_values(record)
    steps = min(max(int(panel["steps"]), 5), 100)        # the main Steps slider's range
    note = [f"Set **{panel['method']}** on the {report.model_name(panel['model'])}: "
            + ", ".join(report._setting(k, v) for k, v in controls.items()) + f"; {steps} steps. Press Generate."]
    if left:
        note.append(f"No control here for {report.tuned_settings(left)}: Generate runs the method's default "
                    "for it (pass it to apply_* or the node).")
    updates = [gr.update(value=panel["model"]),
               gr.update(choices=list(engine.METHODS[panel["model"]]), value=panel["method"])]
    updates += [gr.update(value=controls[name]) if name in controls else gr.update() for name in CONTROLS]
    return (*updates, gr.update(value=steps), "  \n".join(note))


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
            delta = gr.Slider(0.0, 1.0, value=engine.Request.delta, step=0.005,
                              label="AdaptiveDiffusion delta (skip threshold)", visible=shown["delta"], elem_id="delta")
            max_skip = gr.Slider(1, 8, value=engine.Request.max_skip_steps, step=1,
                                 label="Max skipped steps in a row (1 + forecast: most accurate)",
                                 visible=shown["max_skip_steps"], elem_id="max-skip")
            threshold = gr.Slider(0.0, 0.5, value=engine.Request.threshold, step=0.005,
                                  label="ChangeCache threshold (first-block change)", visible=shown["threshold"],
                                  elem_id="threshold")
            start_percent = gr.Slider(0.0, 0.9, value=engine.Request.start_percent, step=0.01,
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
        with gr.Row(equal_height=True):
            dydit = gr.Checkbox(value=engine.Request.dydit, label="On the bundled DyDiT (tiny DiT)", elem_id="dydit",
                                info="cached pass: the DiT fine-tuned with DyDiT routers (dynamic heads, MLP groups, "
                                     "tokens) plus the method; alone: FORA interval 1", scale=2)
            dydit_width_start = gr.Slider(0.0, 0.5, value=engine.Request.dydit_width_start, step=0.04,
                                          label="DyDiT full width until", elem_id="dydit-width-start",
                                          info="share of steps with every head and MLP group before DyDiT's width "
                                               "routers act (0: official DyDiT; 0.08 keeps the class accuracy)",
                                          scale=1)
            learned_forecast = gr.Checkbox(value=engine.Request.learned_forecast, elem_id="learned-forecast",
                                           label="Learned forecast (tiny DiT, AdaptiveDiffusion)", scale=2,
                                           info="corrections trained for the DiT on top of forecast2; 25 steps, "
                                                "best at delta 1.0 and max skip 1 (+2 dB on 288 images)")
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
        with gr.Accordion("Autotune", open=False, elem_id="autotune") as tune_section:
            gr.Markdown("Measure a ladder of settings on the bundled model, from gentle to aggressive, and choose "
                        "the fastest that keeps a PSNR, or the best PSNR at a speedup. The frontier: trials no "
                        "other trial beats on both. The last result is kept and shown when the panel opens.")
            with gr.Row():
                tune_model = gr.Dropdown(list(engine.MODELS), value="unet", label="Model", elem_id="tune-model")
                tune_method = gr.Dropdown(list(tuning.TUNABLE["unet"]), value=tuning.TUNABLE["unet"][0],
                                          label="Method", allow_custom_value=True, elem_id="tune-method")
                tune_target = gr.Radio(list(TARGET_DEFAULTS), value="psnr", label="Target", elem_id="tune-target",
                                       info="psnr: the fastest at least this PSNR; speedup: the best PSNR this fast")
                tune_value = gr.Number(value=TARGET_DEFAULTS["psnr"], label="Target value", elem_id="tune-value",
                                       info=f"PSNR in dB (up to {tuning.MAX_PSNR:g}); speedup above 1 "
                                            f"(up to {tuning.MAX_SPEEDUP:g})")
            with gr.Row():
                tune_steps = gr.Slider(5, 50, value=tuning.TuneRequest.steps, step=1, label="Steps (DDIM)",
                                       elem_id="tune-steps")
                tune_images = gr.Slider(1, 8, value=tuning.TuneRequest.images, step=1, label="Images",
                                        elem_id="tune-images")
                tune_trials = gr.Slider(1, tuning.MAX_TRIALS, value=tuning.TuneRequest.max_trials, step=1,
                                        label="Max candidates", elem_id="tune-trials",
                                        info="each is one calibration sampling")
            with gr.Row():
                tune_run = gr.Button("Run autotune", variant="primary", elem_id="autotune-run")
                tune_apply = gr.Button("Use the chosen settings above", elem_id="autotune-apply")
            tune_note = gr.Markdown(elem_id="autotune-apply-note")
            tune_summary = gr.Markdown(report.NO_AUTOTUNE, elem_id="autotune-summary")
            tune_plot = gr.Image(label="PSNR vs. speedup", elem_id="autotune-plot", **CHART)
            tune_table = gr.Dataframe(_empty_table(), headers=report.AUTOTUNE_HEADERS, interactive=False, wrap=True,
                                      column_widths=["5%", "41%", "11%", "13%", "11%", "10%", "9%"],
                                      label="Every trial (# in the order run; speedup measured, FLOP-weighted "
                                            "from the work skipped)", elem_id="autotune-table")
            tune_record = gr.JSON(label="Autotune data", visible=False)
            tune_download = gr.File(label="Autotune data (JSON: every trial, the frontier, the choice)",
                                    interactive=False, elem_id="autotune-json")
        with gr.Accordion("Attach to a running ComfyUI", open=False):
            gr.Markdown("Show the CacheKit runs of a ComfyUI with CacheKit installed (newest in the sidebar).")
            with gr.Row():
                comfy_url = gr.Textbox(value=comfy_client.DEFAULT_URL, label="ComfyUI URL", elem_id="comfy-url")
                attach = gr.Button("Show ComfyUI runs", elem_id="comfy-attach")
            comfy_list = gr.Markdown(elem_id="comfy-runs")
            comfy_run = gr.JSON(label="Newest run", visible=False)
        controls = [method_info, interval, branch, delta, max_skip, threshold, start_percent, reuse]
        # .input, not .change: "Use the chosen settings" sets model and method together, and a
        # model change would reset the method to the model's first.
        model.input(_methods_for, model, [method] + controls)
        method.change(_controls_for, method, controls)
        inputs = [model, method, interval, branch, class_name, seed, steps, cfg, images, delta, start_percent, rounds,
                  reuse, threshold, dydit, dydit_width_start, max_skip, learned_forecast]
        run.click(generate, inputs, [uncached, cached, difference, summary, heatmap, step_plot, block_plot, stats,
                                     download], api_name="generate", concurrency_id="sampling")
        # Tunes and runs share one queue: both patch and time the same loaded model.
        tune_model.input(_tune_methods_for, tune_model, tune_method)
        tune_target.input(lambda target: TARGET_DEFAULTS.get(target), tune_target, tune_value)
        tune_view = [tune_summary, tune_table, tune_plot, tune_record, tune_download]
        tune_run.click(autotune, [tune_model, tune_method, tune_target, tune_value, tune_steps, tune_images,
                                  tune_trials], tune_view, api_name="autotune", concurrency_id="sampling",
                       show_progress_on=tune_plot)
        tune_apply.click(apply_autotune, tune_record, [model, method, interval, branch, delta, max_skip, threshold,
                                                       start_percent, reuse, steps, tune_note],
                         api_name="apply_autotune")
        app.load(last_autotune, None, tune_view + [tune_section], api_name="last_autotune")
        attach.click(comfy_runs, comfy_url, [summary, heatmap, step_plot, block_plot, comfy_list, comfy_run, download],
                     api_name="comfy_runs")
    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description="CacheKit preview panel")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    build().queue().launch(server_name=args.host, server_port=args.port)
