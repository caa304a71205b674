"""The FLOP estimate in ComfyUI: never measured inside a sampling, measured when a report asks."""
from __future__ import annotations

import pytest
from torch.utils.flop_counter import FlopCounterMode

from .comfy_graph import RESULTS, Graph
from .test_comfy_methods import METHODS


@pytest.mark.parametrize("family", ["sd15", "flux", "pixart"])
def test_flops_are_profiled_after_the_run_when_the_sidebar_asks(comfy, family, monkeypatch):
    history = comfy.pack("nodes.history")
    flops = comfy.pack("core.flops")
    monkeypatch.setattr(flops, "_MEMO", type(flops._MEMO)())          # nothing known yet
    entered = []
    original = FlopCounterMode.__enter__
    monkeypatch.setattr(FlopCounterMode, "__enter__", lambda self: (entered.append(1), original(self))[1])
    node, params, _ = METHODS[family]
    g = Graph(family)
    g.patch(node, **params)
    g.sample(f"{family}-flops", steps=6, cfg=2.0)
    comfy.run(g.prompt, comfy.fresh_executor())
    assert RESULTS[f"{family}-flops"] is not None
    assert entered == []                                              # the sampling never profiled
    run = history.last()
    assert run.as_dict(resolve=False)["executed_fraction"] is None
    record = history.recent_json(1)[0]                                # what GET /cachekit/runs answers
    fraction = record["telemetry"]["executed_fraction"]
    assert entered and fraction is not None and 0.0 < fraction < 1.0
    assert all(f > 0 for f in run.unit_flops)                         # every unit ran in the replay
