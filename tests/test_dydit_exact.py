"""DyDiT on diffusers DiTs: sliced execution equals the official masked computation.

The reference (tests/dydit_reference.py) is the official DyDiT forward written from the official
code's behaviour: it computes every head, group and token and multiplies by the masks. The model
under test is the same tiny random DyDiT in the official layout, converted to a diffusers
DiTTransformer2DModel, with apply_dydit slicing heads and groups and gathering tokens. fp32.
"""
import copy
import pickle

import pytest
import torch

import dydit_reference as ref
import tiny_diffusers as td
from cachekit import apply_dydit, dit_from_official
from cachekit.core.dydit import DyDiTRouters, RouterShape
from cachekit.core.dydit.official import convert
from cachekit.diffusers_host.dydit import SlicedAttnProcessor

HEADS = 4
TOL = 1e-5


def _converted(**kwargs):
    state = ref.random_official_state(heads=HEADS, **kwargs)
    model, routers = dit_from_official(convert(state, "tiny"))
    return state, model, routers


def _inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g)


def _run(model, x, t, y):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y, return_dict=False)[0]


def _reference(state, x, t, y, **kwargs):
    with torch.no_grad():
        return ref.forward(state, x, t, y, heads=HEADS, **kwargs)


@pytest.mark.parametrize("t", [999.0, 640.0, 250.0, 20.0])
def test_cfg_pair_sliced_equals_masked_reference(t):
    state, model, routers = _converted(token_bias=1.0)
    x = _inputs()
    x = torch.cat([x[:1], x[:1]])                          # a CFG pair: one latent, class and null label
    y = torch.tensor([3, 10])
    times = torch.tensor([t, t])
    expected, masks = _reference(state, x, times, y)
    handle = apply_dydit(model, routers, num_inference_steps=1)
    out = _run(model, x, times, y)
    handle.remove()
    assert (out - expected).abs().max() <= TOL
    # Width masks are per timestep: the same for both rows.
    assert all(torch.equal(m["heads"][0], m["heads"][1]) and torch.equal(m["groups"][0], m["groups"][1]) for m in masks)
    telemetry = handle.telemetry
    assert telemetry.masked_calls == 0
    for block, m in enumerate(masks):
        assert telemetry.head_sum[0][block] == int(m["heads"].sum())
        assert telemetry.group_sum[0][block] == int(m["groups"].sum())
        assert telemetry.tokens_kept[0][block] == int(m["tokens"].sum())


def test_the_cases_above_exercise_partial_masks_and_ragged_tokens():
    """Guard against a vacuous test: the tiny model's routers switch heads and groups off at some
    timesteps, and the two rows of a CFG pair keep different numbers of tokens."""
    state, _, _ = _converted(token_bias=1.0)
    x = torch.cat([_inputs()[:1]] * 2)
    partial_heads = partial_groups = ragged = False
    for t in (999.0, 640.0, 250.0, 20.0):
        _, masks = _reference(state, x, torch.tensor([t, t]), torch.tensor([3, 10]))
        for m in masks:
            partial_heads |= 1 < int(m["heads"][0].sum()) < HEADS
            partial_groups |= 1 < int(m["groups"][0].sum()) < HEADS
            kept = m["tokens"].sum(dim=1)
            ragged |= bool(kept[0] != kept[1]) and 0 < int(kept.sum()) < m["tokens"].numel()
    assert partial_heads and partial_groups and ragged


def test_all_gates_on_is_bit_identical_and_remove_restores():
    model = td.dit()
    attn = model.transformer_blocks[0].attn1
    shape = RouterShape(depth=3, heads=attn.heads, mlp_groups=attn.heads, hidden=attn.to_q.in_features,
                        token_hidden=attn.to_q.in_features // 16)
    routers = DyDiTRouters(shape, embedding="diffusers").open_all()
    sched = td.scheduler(6)
    reference = td.sample("dit", model, sched)
    handle = apply_dydit(model, routers, scheduler=sched)
    outs = td.sample("dit", model, sched)
    assert all(torch.equal(a, b) for a, b in zip(outs, reference))
    telemetry = handle.telemetry
    assert telemetry.executed_fraction() > 1.0     # all on, and the token routers ran on top
    assert all(h == 2 * attn.heads for row in telemetry.head_sum for h in row)   # batch 2, every head
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(td.sample("dit", model, sched), reference))
    for module in model.modules():
        assert "forward" not in module.__dict__
        assert not isinstance(getattr(module, "processor", None), SlicedAttnProcessor)
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert not hasattr(model, "_cachekit_dydit")


def test_all_off_runs_only_head_0_group_0_and_no_token():
    state, model, routers = _converted(router_bias=-100.0, token_bias=-100.0)
    x, y = _inputs(), torch.tensor([1, 2])
    times = torch.tensor([500.0, 500.0])
    expected, masks = _reference(state, x, times, y)
    assert all(int(m["heads"].sum()) == 2 and int(m["groups"].sum()) == 2 and not m["tokens"].any() for m in masks)
    handle = apply_dydit(model, routers, num_inference_steps=1)
    out = _run(model, x, times, y)
    handle.remove()
    assert (out - expected).abs().max() <= TOL
    telemetry = handle.telemetry
    assert telemetry.mean_heads()[0] == [1.0, 1.0] and telemetry.mean_groups()[0] == [1.0, 1.0]
    assert telemetry.token_keep_rates()[0] == [0.0, 0.0]


def test_rows_with_different_timesteps_run_masked_and_match():
    state, model, routers = _converted(token_bias=1.0)
    x, y = _inputs(3), torch.tensor([1, 2, 10])
    times = torch.tensor([999.0, 20.0, 999.0])
    expected, masks = _reference(state, x, times, y)
    assert any(not torch.equal(m["heads"][0], m["heads"][1]) for m in masks), "the test needs differing rows"
    handle = apply_dydit(model, routers, num_inference_steps=1)
    out = _run(model, x, times, y)
    handle.remove()
    assert (out - expected).abs().max() <= TOL
    assert handle.telemetry.masked_calls == 1


@pytest.mark.parametrize("per_block", [1, 16])
def test_a_sampling_run_matches_the_reference_step_by_step_and_caches_slices_per_mask(per_block):
    state, model, routers = _converted(token_bias=1.0)
    sched = td.scheduler(10)
    handle = apply_dydit(model, routers, scheduler=sched, slice_cache=per_block)
    x, y = _inputs(), torch.tensor([4, 10])
    distinct = set()
    for t in sched.timesteps:
        times = t.expand(2).float()
        expected, masks = _reference(state, x, times, y)
        out = _run(model, x, times, y)
        assert (out - expected).abs().max() <= TOL
        for block, m in enumerate(masks):
            distinct.add((block, "attn", tuple(m["heads"][0].tolist())))
            distinct.add((block, "mlp", tuple(m["groups"][0].tolist())))
        x = x - 0.05 * out[:, :4]
    telemetry = handle.telemetry
    full = {(b, kind, (True,) * HEADS) for b in range(2) for kind in ("attn", "mlp")}
    # A slice set is built once per distinct partial mask and sub-layer when the cache holds them
    # all (all-on runs unsliced); a smaller cache rebuilds what it dropped, and holds no more.
    partial = len(distinct - full)
    assert partial > 4
    assert telemetry.slice_builds == partial if per_block == 16 else telemetry.slice_builds > partial
    assert telemetry.cache_bytes > 0 and handle.slices.nbytes <= telemetry.cache_bytes
    assert all(len(entries) <= per_block for entries in handle.slices._slots.values())
    assert telemetry.executed_fraction() < 1.0
    summary = telemetry.as_dict()["dydit"]
    assert len(summary["mean_heads"]) == 10 and len(summary["mean_heads"][0]) == 2
    handle.remove()
    assert handle.slices.nbytes == 0


def test_width_only_and_tokens_only():
    state, model, routers = _converted(token_bias=1.0)
    x, y = _inputs(), torch.tensor([4, 10])
    times = torch.tensor([640.0, 640.0])
    unpatched = _run(model, x, times, y)
    for width, tokens in ((True, False), (False, True)):
        handle = apply_dydit(model, routers, width=width, tokens=tokens, num_inference_steps=1)
        out = _run(model, x, times, y)
        handle.remove()
        assert not torch.equal(out, unpatched)
        telemetry = handle.telemetry
        if not width:
            assert telemetry.mean_heads()[0] == [HEADS, HEADS]
        if not tokens:
            assert telemetry.token_keep_rates()[0] == [1.0, 1.0]


def test_width_start_percent_runs_full_width_first_then_the_official_dydit():
    state, model, routers = _converted(token_bias=1.0)
    official, width_off = copy.deepcopy(model), copy.deepcopy(model)
    sched = td.scheduler(10)
    handle = apply_dydit(model, routers, scheduler=sched, width_start_percent=0.3)      # steps 0-2 full width
    apply_dydit(official, routers, scheduler=sched)
    apply_dydit(width_off, routers, scheduler=sched, width=False)
    x, y = _inputs(), torch.tensor([4, 10])
    for step, t in enumerate(sched.timesteps):
        times = t.expand(2).float()
        out = _run(model, x, times, y)
        same_as = width_off if step < 3 else official
        other = official if step < 3 else width_off
        assert torch.equal(out, _run(same_as, x, times, y)), step
        assert not torch.equal(out, _run(other, x, times, y)), step
        x = x - 0.05 * out[:, :4]
    heads = handle.telemetry.mean_heads()
    assert all(h == [HEADS, HEADS] for h in heads[:3]) and any(h != [HEADS, HEADS] for h in heads[3:])
    assert all(rates != [1.0, 1.0] for rates in handle.telemetry.token_keep_rates())     # tokens route throughout
    # 1.0: full width at every step (an empty routed window, not one that starts at step 0).
    never = copy.deepcopy(width_off)
    handle.remove()
    apply_dydit(never, routers, scheduler=sched, width_start_percent=1.0)
    x = _inputs()
    for t in sched.timesteps:
        times = t.expand(2).float()
        out = _run(never, x, times, y)
        assert torch.equal(out, _run(width_off, x, times, y))
        x = x - 0.05 * out[:, :4]
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="width_start_percent must be in"):
            apply_dydit(copy.deepcopy(official), routers, scheduler=sched, width_start_percent=bad)


def test_a_patched_model_copies_and_pickles_plain():
    _, model, routers = _converted()
    handle = apply_dydit(model, routers, num_inference_steps=1)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert not hasattr(twin, "_cachekit_dydit")
        for module in twin.modules():
            assert "forward" not in module.__dict__ and "__getstate__" not in module.__dict__
            assert not isinstance(getattr(module, "processor", None), SlicedAttnProcessor)
            assert not module._forward_hooks and not module._forward_pre_hooks
    x, t, y = _inputs(), torch.tensor([300.0, 300.0]), torch.tensor([1, 2])
    patched = _run(model, x, t, y)
    handle.remove()
    assert torch.equal(_run(twin, x, t, y), _run(model, x, t, y))
    assert not torch.equal(patched, _run(model, x, t, y))
    for module in model.modules():
        assert "__getstate__" not in module.__dict__


def test_bad_models_and_routers_are_refused():
    _, model, routers = _converted()
    with pytest.raises(ValueError, match="use_official_timestep_embedding"):
        apply_dydit(td.dit(), DyDiTRouters(RouterShape(3, 2, 2, 32, 2)), num_inference_steps=2)
    with pytest.raises(ValueError, match="depth 3, 2 heads"):
        apply_dydit(model, DyDiTRouters(RouterShape(3, 2, 2, 32, 2), embedding="diffusers"), num_inference_steps=2)
    with pytest.raises(ValueError, match="DiTTransformer2DModel"):
        apply_dydit(td.pixart(), routers, num_inference_steps=2)
    handle = apply_dydit(model, routers, num_inference_steps=2)
    with pytest.raises(ValueError, match="already has DyDiT"):
        apply_dydit(model, routers, num_inference_steps=2)
    handle.remove()
    model.transformer_blocks[0].set_chunk_feed_forward(4)
    with pytest.raises(ValueError, match="disable_forward_chunking"):
        apply_dydit(model, routers, num_inference_steps=2)
    model.transformer_blocks[0].set_chunk_feed_forward(None)
    model.transformer_blocks[0].ff.net[2].forward = lambda v: v
    with pytest.raises(ValueError, match="instance forward"):
        apply_dydit(model, routers, num_inference_steps=2)
    del model.transformer_blocks[0].ff.net[2].forward
    model.transformer_blocks[1].attn1.set_processor(torch.nn.Identity())
    with pytest.raises(ValueError, match="set_default_attn_processor"):
        apply_dydit(model, routers, num_inference_steps=2)
    for module in model.modules():           # a refused apply leaves nothing behind
        assert not isinstance(getattr(module, "processor", None), SlicedAttnProcessor)
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_one_timestep_for_the_whole_batch():
    state, model, routers = _converted(token_bias=1.0)
    x, y = _inputs(), torch.tensor([4, 10])
    expected, _ = _reference(state, x, torch.tensor([640.0, 640.0]), y)
    handle = apply_dydit(model, routers, num_inference_steps=1)
    out = _run(model, x, torch.tensor([640.0]), y)
    handle.remove()
    assert (out - expected).abs().max() <= TOL
    assert all(n == 2 for n in handle.telemetry.attn_samples[0])


def test_telemetry_flops_match_torchs_count_of_the_linear_layers():
    """The closed-form FLOPs in the telemetry equal FlopCounterMode's count of every matmul that
    ran in the blocks' attention and MLP (token router included), plus the attention scores
    4 h N^2 d per sample, counted in closed form (FlopCounterMode counts 0 for CPU SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode
    state, model, routers = _converted(token_bias=1.0)
    x, y, times = _inputs(), torch.tensor([3, 10]), torch.tensor([640.0, 640.0])
    handle = apply_dydit(model, routers, num_inference_steps=1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _run(model, x, times, y)
    handle.remove()
    telemetry = handle.telemetry
    matmuls = ("aten.mm", "aten.addmm", "aten.bmm")
    counted = 0
    for name, ops in counter.get_flop_counts().items():
        if name.endswith((".attn1", ".ff")):
            counted += sum(n for op, n in ops.items() if str(op) in matmuls)
    tokens, head_dim = 16, 64 // HEADS
    scores = sum(4 * h * tokens * tokens * head_dim for h in telemetry.head_sum[0])
    assert counted > 0 and counted + scores == telemetry.executed_flops
    assert telemetry.executed_flops < telemetry.full_flops


def test_gather_and_scatter_split_over_two_layers_equal_run_tokenwise():
    from cachekit.core.dydit.tokens import gather_kept, run_tokenwise, scatter_kept
    fc1, fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
    x = torch.randn(2, 5, 8)
    keep = torch.tensor([[True, False, True, False, False], [False, True, True, True, True]])
    mlp = lambda v: fc2(torch.nn.functional.gelu(fc1(v)))
    with torch.no_grad():
        split = scatter_kept(fc2(torch.nn.functional.gelu(fc1(gather_kept(x, keep)))), keep)
        whole = run_tokenwise(mlp, x, keep)
        assert torch.equal(split, whole)
        assert torch.equal(split[~keep], torch.zeros(int((~keep).sum()), 8))
        assert torch.allclose(split[keep], mlp(x)[keep], atol=1e-6)
