"""AdaptiveDiffusion's skip rule equals the official decisions.

tests/data/adaptive_official.json holds the decisions of the official `estimate_skipping`
(UniModal4Reasoning/AdaptiveDiffusion, examples/AdaptiveDiffusion/acceleration/sparse_pipeline.py)
driven by the official sampling loop's bookkeeping, on two latent trajectories recorded from
the bundled U-Net (tests/data/adaptive_trajectories.safetensors: the initial noise, then the
latent after every DDIM step). The hand-worked cases below spell the rule out.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cachekit.core.methods.adaptive import AdaptiveConfig, AdaptiveSkipRule

DATA = Path(__file__).parent / "data"


def _run(latents, delta=0.01, max_skip_steps=4, official_cap=False):
    """Decisions for a trajectory: latents[k] is the latent step k starts from."""
    rule = AdaptiveSkipRule(AdaptiveConfig(delta, max_skip_steps, official_cap))
    return [rule.decide(x) for x in latents], rule


def _from_diffs(diffs):
    """Scalar latents whose successive differences are `diffs` (d_1, d_2, ...); the first latent
    is the initial noise, the second L_0."""
    values, latents = 0.0, [torch.tensor([123.0]), torch.tensor([0.0])]
    for d in diffs:
        values += d
        latents.append(torch.tensor([values]))
    return latents


def _longest_skip_run(decisions):
    longest = run = 0
    for computed in decisions:
        run = 0 if computed else run + 1
        longest = max(longest, run)
    return longest


def _pattern(decisions):
    return "".join("x" if d else "." for d in decisions)


def test_decisions_equal_the_official_code_on_recorded_trajectories():
    fixture = json.loads((DATA / "adaptive_official.json").read_text())
    trajectories = load_file(str(DATA / "adaptive_trajectories.safetensors"))
    assert len(fixture["cases"]) >= 50
    skipping_cases = 0
    for case in fixture["cases"]:
        latents = [t.float() for t in trajectories[case["trajectory"]]]
        steps = len(case["computed"])
        # Steps 0..T-1 start from the noise, L_0, ..., L_(T-2); the official code also decides
        # after the last step (a step that never comes), so feed L_(T-1) as well for the mask.
        decisions, rule = _run(latents[:steps + 1], case["delta"], case["max_skip_steps"], official_cap=True)
        assert decisions[:steps] == case["computed"], case
        assert rule.mask == case["mask"], case
        skipping_cases += not all(case["computed"])
        # The default cap differs only where the official run of skips exceeded max_skip_steps.
        strict, _ = _run(latents[:steps + 1], case["delta"], case["max_skip_steps"])
        if _longest_skip_run(case["computed"]) <= case["max_skip_steps"]:
            assert strict[:steps] == case["computed"], case
        assert _longest_skip_run(strict[:steps]) <= case["max_skip_steps"], case
    assert skipping_cases > 30


def test_warm_up_computes_the_first_four_steps_whatever_the_latents():
    decisions, _ = _run(_from_diffs([1.0] * 2), delta=1e9)
    assert decisions == [True] * 4


@pytest.mark.parametrize("cap", [1, 2, 4])
def test_never_more_than_max_skip_steps_skipped_in_a_row(cap):
    # d_k constant: |(d + d) / 2 - d| = 0 <= delta * d, so every step after the warm-up may skip;
    # the cap alone decides. Regression: max_skip_steps 1 or 2 skipped five steps in a row.
    decisions, _ = _run(_from_diffs([0.5] * 20), delta=0.01, max_skip_steps=cap)
    assert _pattern(decisions) == "xxxx" + (("." * cap + "x") * 20)[:18]
    assert _longest_skip_run(decisions) == cap


def test_a_longer_warm_up_computes_more_steps_first_then_the_rule_decides_as_before():
    decisions, _ = _run(_from_diffs([0.5] * 20), delta=1.0, max_skip_steps=1)
    assert _pattern(decisions) == "xxxx" + ".x" * 9
    rule = AdaptiveSkipRule(AdaptiveConfig(1.0, 1, warmup_steps=7))
    decisions = [rule.decide(x) for x in _from_diffs([0.5] * 20)]
    assert _pattern(decisions) == "xxxxxxx" + ".x" * 7 + "."
    for bad in (3, 0, 4.0, True):
        with pytest.raises(ValueError, match="warmup_steps must be an integer >= 4"):
            AdaptiveConfig(warmup_steps=bad)


def test_official_cap_lets_the_first_run_of_skips_reach_five():
    # The official check needs more than 4 decisions: steps 4-8 skip (five in a row whatever
    # max_skip_steps is), step 9 runs, then the cap applies.
    decisions, _ = _run(_from_diffs([0.5] * 20), delta=0.01, max_skip_steps=4, official_cap=True)
    assert _pattern(decisions) == "xxxx.....x....x....x.."
    decisions, _ = _run(_from_diffs([0.5] * 20), delta=0.01, max_skip_steps=1, official_cap=True)
    assert _pattern(decisions) == "xxxx....." + "x." * 6 + "x"


def test_threshold_is_relative_to_the_first_order_difference():
    # d_k = 2^k: |(d_k + d_(k-2)) / 2 - d_(k-1)| / d_(k-1) = (2 - 1)^2 / (2 * 2) = 0.25.
    diffs = [2.0 ** k for k in range(1, 12)]
    assert _pattern(_run(_from_diffs(diffs), delta=0.2)[0]) == "x" * 13
    assert _pattern(_run(_from_diffs(diffs), delta=0.3)[0]) == "xxxx....x...."   # capped at 4 in a row
    # The ratio, not the scale, decides: the same shape 1000x smaller decides the same.
    assert _run(_from_diffs([d / 1000 for d in diffs]), delta=0.3)[0] == _run(_from_diffs(diffs), delta=0.3)[0]


def test_one_decision_for_the_whole_batch_from_the_mean_change():
    # Two samples: one changes steadily, one erratically; the mean over both decides.
    steady = _from_diffs([1.0] * 8)
    erratic = _from_diffs([1.0, 5.0, 0.1, 7.0, 0.2, 9.0, 0.1, 4.0])
    batch = [torch.cat([a, b]) for a, b in zip(steady, erratic)]
    mean = [(a + b) / 2 for a, b in zip(steady, erratic)]
    assert _run(batch, delta=0.05)[0] == _run(mean, delta=0.05)[0]
    assert _run(batch, delta=0.05)[0] != _run(steady, delta=0.05)[0]


def test_delta_zero_never_skips_on_a_real_trajectory():
    latents = [t.float() for t in load_file(str(DATA / "adaptive_trajectories.safetensors"))["ddim50_delta0.01"]]
    assert all(_run(latents, delta=0.0)[0])


@pytest.mark.parametrize("kwargs, message", [({"delta": -0.1}, "delta"), ({"delta": "0.1"}, "delta"),
                                             ({"max_skip_steps": 0}, "max_skip_steps"),
                                             ({"max_skip_steps": 2.5}, "max_skip_steps")])
def test_bad_settings_give_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveConfig(**kwargs)


def test_the_recorded_score_is_what_delta_bounds():
    """The telemetry's per-step value (the sidebar shows it): |third-order diff| / d_(k-1); a step
    outside the cap skips exactly when it is <= delta."""
    diffs = [1.0, 0.9, 0.8, 0.72, 0.7, 0.5, 0.45, 0.44, 0.2, 0.19]
    decisions, rule = _run(_from_diffs(diffs), delta=0.05, max_skip_steps=10)
    assert rule.scores and min(rule.scores) >= 4       # none in the warm-up
    for step, score in rule.scores.items():
        # d values are 1-based and the rule reads d_(k-1), d_(k-2), d_(k-3) at step k
        d = [None] + diffs
        cur, prev, prev_prev = d[step - 1], d[step - 2], d[step - 3]
        assert score == pytest.approx(abs((cur + prev_prev) / 2 - prev) / prev, rel=1e-4, abs=1e-5)
        assert (not decisions[step]) == (score <= 0.05 + 1e-6), (step, score)
    assert any(decisions[4:]) and not all(decisions[4:])
