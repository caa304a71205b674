"""Method decisions equal the official implementations' decisions.

The expected values in tests/data were produced by running the official functions
(horseee/DeepCache) on the listed arguments; FORA's rule is checked against hand-worked cases
of the official countdown rule in prathebaselva/FORA (`step == numstep-1 or step % N == 0`).
"""
import json
import math
from pathlib import Path

import pytest

from cachekit.core.methods.base import full_plan
from cachekit.core.methods.deepcache import (DeepCacheConfig, DeepCachePolicy, full_steps, is_deep,
                                             quad_center_steps)
from cachekit.core.methods.fora import ForaConfig, ForaPolicy, refresh_steps
from cachekit.core.units import Unit, UnitMap, UNetGeometry

DATA = Path(__file__).parent / "data"


def test_non_uniform_schedule_equals_official_sample_from_quad_center():
    cases = json.loads((DATA / "deepcache_quad_center_official.json").read_text())["cases"]
    assert len(cases) > 300
    for key, expected in cases.items():
        total, interval, center, power = key.split(",")
        total, interval, center, power = int(total), int(interval), int(center), float(power)
        n = math.ceil(total / interval)
        if expected is None:
            with pytest.raises(ValueError, match="non-uniform DeepCache schedule cannot place"):
                quad_center_steps(total, n, center, power)
        else:
            assert quad_center_steps(total, n, center, power) == expected, key


def test_uniform_schedule_is_every_interval_from_window_start():
    config = DeepCacheConfig(cache_interval=3)
    assert sorted(full_steps(config, 10)) == [0, 3, 6, 9]
    assert sorted(full_steps(DeepCacheConfig(cache_interval=1), 4)) == [0, 1, 2, 3]


def test_deep_layers_equal_official_helper_is_skip_step():
    rows = json.loads((DATA / "deepcache_helper_official.json").read_text())["rows"]
    checked = 0
    for branch, interval, step, kind, block, layer, official_skip in rows:
        cache_block, cache_layer = divmod(branch, 3)
        full = step % interval == 0
        ours = (not full) and is_deep(kind, (block, layer), cache_block, cache_layer)
        assert ours == official_skip, (branch, interval, step, kind, block, layer)
        checked += 1
    assert checked > 6000


def _unet_units():
    # Shape of a 2-level SD-style U-Net: 2 res blocks + downsampler, then 2 res blocks.
    downs, ups = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)], [(1, 2), (1, 1), (1, 0), (0, 2), (0, 1), (0, 0)]
    units = [Unit(f"in{b}{l}", "g", "down") for b, l in downs]
    units.append(Unit("mid", "mid", "mid"))
    units += [Unit(f"out{b}{l}", "g", "up") for b, l in ups]
    return UnitMap("unet", tuple(units), geometry=UNetGeometry(tuple(downs + [(0, 0)] + ups), 3))


def test_deepcache_plan_branch_0_keeps_only_the_last_up_layer_live():
    units = _unet_units()
    plan = DeepCachePolicy(DeepCacheConfig(cache_interval=3)).plan(units, 7, range(7))
    assert plan[0] == [False] * len(units) and plan[3] == [False] * len(units) and plan[6] == [False] * len(units)
    live = [u.name for u, reuse in zip(units.units, plan[1]) if not reuse]
    assert live == ["out00"]
    assert plan[1] == plan[2] == plan[4] == plan[5]


def test_deepcache_plan_deeper_branch_and_window():
    units = _unet_units()
    plan = DeepCachePolicy(DeepCacheConfig(cache_interval=2, cache_branch=2)).plan(units, 8, range(2, 6))
    assert plan[0] == plan[1] == plan[6] == plan[7] == [False] * len(units)   # outside the window
    assert not any(plan[2]) and not any(plan[4])                                 # window steps 0, 2
    live = [u.name for u, reuse in zip(units.units, plan[3]) if not reuse]
    assert live == ["in00", "in01", "out02", "out01", "out00"]


def test_deepcache_branch_beyond_model_is_refused():
    with pytest.raises(ValueError, match="cache_branch 9 is deeper than this U-Net allows"):
        DeepCachePolicy(DeepCacheConfig(cache_branch=9)).validate(_unet_units())


@pytest.mark.parametrize("kwargs, message", [
    ({"cache_interval": 0}, "cache_interval must be an integer >= 1"),
    ({"cache_branch": -1}, "cache_branch must be an integer >= 0"),
    ({"schedule": "cosine"}, "schedule must be one of"),
    ({"power": 1.0}, "power must be a number > 1.0"),
    ({"start_percent": 0.8, "end_percent": 0.2}, "start_percent .* must be below end_percent"),
    ({"end_percent": 1.5}, "end_percent must be between 0.0 and 1.0"),
])
def test_deepcache_bad_parameters_give_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeepCacheConfig(**kwargs)


def test_fora_refresh_follows_official_countdown_rule():
    # Official: countdown i = T-1..0, compute iff i == T-1 or i % N == 0.
    for total in (1, 2, 7, 20, 50, 250):
        for interval in (1, 2, 3, 5):
            official = {total - 1 - i for i in range(total) if i == total - 1 or i % interval == 0}
            assert refresh_steps(total, interval) == official
    assert sorted(refresh_steps(20, 3)) == [0, 1, 4, 7, 10, 13, 16, 19]


def test_fora_plan_reuses_every_unit_between_refreshes():
    units = UnitMap("dit", tuple(Unit(f"u{i}", "g", "attn") for i in range(4)))
    plan = ForaPolicy(ForaConfig(interval=3)).plan(units, 20, range(20))
    for step in range(20):
        assert plan[step] == [step not in {0, 1, 4, 7, 10, 13, 16, 19}] * 4
    assert ForaPolicy(ForaConfig(interval=1)).plan(units, 5, range(5)) == full_plan(units, 5)


def test_fora_bad_parameters_give_clear_errors():
    with pytest.raises(ValueError, match="interval must be an integer >= 1"):
        ForaConfig(interval=0)
    with pytest.raises(ValueError, match="interval must be an integer >= 1"):
        ForaConfig(interval=2.5)
