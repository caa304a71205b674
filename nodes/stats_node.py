"""Cache Stats (CacheKit): the last run of a CacheKit-patched model as an IMAGE heatmap and a summary."""
from __future__ import annotations

import numpy as np
import torch
from comfy.patcher_extension import WrappersMP
from comfy_api.latest import io

from ..core.heatmap import block_heatmap, heatmap_image
from . import history
from .method_nodes import CATEGORY

_GAP = 6    # pixels between the heatmaps of stacked methods


def cachekit_owners(model) -> list[str]:
    """The CacheKit patches on a ModelPatcher, outermost last (their OUTER_SAMPLE wrapper keys)."""
    wrappers = getattr(model, "wrappers", {}).get(WrappersMP.OUTER_SAMPLE, {})
    return [key for key in wrappers if isinstance(key, str) and key.startswith("cachekit.")]


def _stack(pictures: list[np.ndarray]) -> np.ndarray:
    width = max(p.shape[1] for p in pictures)
    rows = []
    for p in pictures:
        padded = np.full((p.shape[0], width, 3), 255, dtype=np.uint8)
        padded[:, :p.shape[1]] = p
        rows += [padded, np.full((_GAP, width, 3), 255, dtype=np.uint8)]
    return np.concatenate(rows[:-1], axis=0)


class CacheKitStats(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CacheKitStats",
            display_name="Cache Stats (CacheKit)",
            category=CATEGORY,
            description=("What the CacheKit methods on this model reused in their last sampling run: a step x block "
                         "heatmap (columns = steps, rows = blocks; bright = reused, dark = computed, grey = did not "
                         "run) and a summary. Connect the KSampler's LATENT to 'samples' so it runs after sampling."),
            inputs=[
                io.Model.Input("model", tooltip="The model from the CacheKit node(s)."),
                io.Latent.Input("samples", tooltip="The sampler's output: only orders this node after sampling."),
            ],
            outputs=[io.Image.Output(display_name="heatmap"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, model, samples) -> io.NodeOutput:
        owners = cachekit_owners(model)
        if not owners:
            raise ValueError("This model has no CacheKit method: connect the MODEL output of a CacheKit node.")
        runs = [run for run in (history.last_of({owner}) for owner in owners) if run is not None]
        if not runs:
            raise ValueError("No sampling run of this model yet: connect the KSampler's LATENT output to 'samples' "
                             "so this node runs after it.")
        pictures, lines = [], []
        for run in runs:
            data = run.as_dict()
            pictures.append(heatmap_image(block_heatmap(data)[1], cell=8))
            measured = run.measured_speedup()
            ideal = run.ideal_speedup()
            lines.append(run.summary()
                         + (f"; speedup {measured:.2f}x measured" if measured else "")
                         + (f", {ideal:.2f}x FLOP-weighted" if ideal else "")
                         + (f"; skipped steps {run.skipped_steps}" if run.skipped_steps else ""))
        image = torch.from_numpy(_stack(pictures)).float().div(255).unsqueeze(0)
        return io.NodeOutput(image, "\n".join(lines))
