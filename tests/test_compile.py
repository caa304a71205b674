"""torch.compile of patched models: same outputs as eager, graph breaks only at the unit boundary.

Under torch.compile a unit proxy splits its forward in three (core/proxy.py): the decision
(`_decide`, torch.compiler.disable'd: it reads the session), the unit's own work (traced, in the
proxy class's frame), and the bookkeeping (`_record`, disabled: counts and stores the output).
So every graph break is a call to `_decide` or `_record`, and the unit's compute lands in a
graph. Frames whose loops contain units (a model's loop over its blocks) fall back to eager for
their own glue, as with any graph break in a loop; the units and blocks inside still compile.

Measured on this CPU (torch 2.13, 2 cores): tiny DiT + FORA, inductor, 6 steps: 8 graph breaks
(6 at `_decide`, 2 at `_record`), 11 graphs, ~35 s cold (~10 s with inductor's cache warm).
Tiny U-Net + DeepCache: 26 breaks (all `_decide` / `_record`); inductor needs ~100-175 s cold
here (C++ for its ~15 graphs), so the two-level U-Net compiles with `aot_eager` (dynamo and
AOTAutograd exactly as inductor gets them, without code generation; ~20 s). Inductor on the
U-Net was checked by hand: max |diff| 7.7e-7 against eager; a one-level U-Net runs inductor in the test.
"""
import re

import pytest
import torch
import torch._dynamo as dynamo
from diffusers import DiTTransformer2DModel, UNet2DConditionModel
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters

import tiny_diffusers as td
from cachekit import apply_deepcache, apply_fora

BOUNDARY = {"_decide", "_record"}       # core/proxy.py: the only places a patched model may break


def _compile(model, backend: str):
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend(backend)(gm, example_inputs)

    dynamo.reset()
    counters.clear()
    return torch.compile(model, backend=recording), graphs


def _breaks() -> tuple[int, int]:
    """(graph breaks at the unit boundary, graph breaks anywhere else)."""
    at_boundary = elsewhere = 0
    for reason, count in counters["graph_break"].items():
        names = set(re.findall(r"function `<function (\w+) at", reason))
        if names and names <= BOUNDARY:
            at_boundary += count
        else:
            elsewhere += count
    return at_boundary, elsewhere


def _counts(telemetry):
    return [list(r) for r in telemetry.computed], [list(r) for r in telemetry.reused]


def _close(a, b, atol=1e-4):
    return len(a) == len(b) and all(torch.allclose(x, y, atol=atol, rtol=0) for x, y in zip(a, b))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    dynamo.reset()
    counters.clear()


def test_fora_dit_compiles_with_inductor_and_matches_eager():
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    sched = td.scheduler(6)
    handle = apply_fora(model, interval=3, scheduler=sched)
    eager = td.sample("dit", model, sched)
    eager_counts = _counts(handle.finish_run())
    compiled, graphs = _compile(model, "inductor")
    outs = td.sample("dit", compiled, sched)
    assert _close(outs, eager)
    assert _counts(handle.finish_run()) == eager_counts       # the same units computed and reused
    at_boundary, breaks_inside_units = _breaks()
    assert breaks_inside_units == 0
    assert 0 < at_boundary <= 4 * len(handle.units)           # measured: 8 (2 layers x attn1, ff)
    code = "\n".join(gm.code for gm in graphs)
    assert "scaled_dot_product_attention" in code and "gelu" in code    # attention and MLP compiled
    handle.remove()


@pytest.mark.parametrize("levels, backend, ops", [
    # Two levels: aot_eager (inductor's code generation takes 100-175 s here); measured 26 breaks.
    (2, "aot_eager", ("conv2d", "group_norm", "scaled_dot_product_attention")),
    # Inductor itself on a U-Net: one level keeps its code generation near 45 s cold; measured 14
    # breaks, max |diff| 6e-7.
    (1, "inductor", ("conv2d", "scaled_dot_product_attention")),
])
def test_deepcache_unet_compiles_and_matches_eager(levels, backend, ops):
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8,) * levels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")[:levels],
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")[-levels:],
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2).eval()
    sched = td.scheduler(5)          # more than 4 steps: no few-step guard
    g = torch.Generator().manual_seed(1)
    sample, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 8, generator=g)

    def run(m):
        outs, x = [], sample
        with torch.no_grad():
            for t in sched.timesteps:
                outs.append(m(x, t, encoder_hidden_states=context, return_dict=False)[0])
                x = x - 0.05 * outs[-1]
        return outs

    handle = apply_deepcache(model, cache_interval=3, scheduler=sched)
    eager = run(model)
    eager_counts = _counts(handle.finish_run())
    assert handle.runs[-1].step_hit_rates()[1] > 0            # steps 1, 2 reuse the deep units
    compiled, graphs = _compile(model, backend)
    outs = run(compiled)
    assert _close(outs, eager)
    assert _counts(handle.finish_run()) == eager_counts
    at_boundary, breaks_inside_units = _breaks()
    assert breaks_inside_units == 0
    assert 0 < at_boundary <= 4 * (len(handle.units) + len(handle.units.regions))
    code = "\n".join(gm.code for gm in graphs)
    assert all(op in code for op in ops)
    handle.remove()
