"""Attach that never lies: other tools' hooks on units, state set while patched, copies.

Decisions (core/proxy.py and diffusers_host/attach.py document them):
* diffusers HookRegistry hooks with pre/post_forward and accelerate hooks on a unit: cached, the
  hooks run exactly when the unit computes;
* diffusers hooks with new_forward (another cache, a layer skip) on a unit or an ancestor, and
  any other instance `forward`: refused with a ValueError at apply time;
* hooks on the root or on non-unit modules: untouched, keep working;
* state set while patched is the module's state after remove();
* a copy (deepcopy, pickle, torch.save) of a patched model is a plain, unpatched model.
"""
import copy
import functools
import io
import pickle

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig
from diffusers.hooks import apply_first_block_cache, apply_pyramid_attention_broadcast
from diffusers.models.attention_processor import Attention, AttnProcessor

import tiny_diffusers as td
from cachekit import apply_adaptive_skip, apply_deepcache, apply_fora

STEPS = 9
REFRESHES = [0, 2, 5, 8]       # FORA, interval 3, 9 steps: the steps every unit computes

try:
    from accelerate.hooks import ModelHook as AccelerateHook
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module
except ImportError:            # not installed: what accelerate's hooks set and unset, attribute for attribute
    class AccelerateHook:
        no_grad = False

        def init_hook(self, module):
            return module

        def detach_hook(self, module):
            return module

        def pre_forward(self, module, *args, **kwargs):
            return args, kwargs

        def post_forward(self, module, output):
            return output

    def add_hook_to_module(module, hook):
        module._old_forward = module.forward
        module = hook.init_hook(module)
        module._hf_hook = hook

        def new_forward(module, *args, **kwargs):
            args, kwargs = module._hf_hook.pre_forward(module, *args, **kwargs)
            return module._hf_hook.post_forward(module, module._old_forward(*args, **kwargs))

        module.forward = functools.update_wrapper(functools.partial(new_forward, module), module._old_forward)
        return module

    def remove_hook_from_module(module, recurse=False):
        if hasattr(module, "_hf_hook"):
            module._hf_hook.detach_hook(module)
            delattr(module, "_hf_hook")
        if hasattr(module, "_old_forward"):
            module.forward = module._old_forward
            delattr(module, "_old_forward")
        if recurse:
            for child in module.children():
                remove_hook_from_module(child, recurse)
        return module


class Counting(ModelHook):
    """A diffusers hook with pre/post_forward only (as group offloading's)."""

    def __init__(self):
        super().__init__()
        self.pre = self.post = 0

    def pre_forward(self, module, *args, **kwargs):
        self.pre += 1
        return args, kwargs

    def post_forward(self, module, output):
        self.post += 1
        return output


class Replacing(ModelHook):
    """A diffusers hook with new_forward (as FirstBlockCache's, PAB's, a layer skip's)."""

    def new_forward(self, module, *args, **kwargs):
        return self.fn_ref.original_forward(*args, **kwargs)


class AccelerateCounting(AccelerateHook):
    def __init__(self):
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def diffusers_hook(module, hook=None, name="count"):
    hook = hook or Counting()
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    return hook


@pytest.fixture
def attention_runs(monkeypatch):
    """Executions of each Attention's own forward, keyed by its to_q (shared by proxy and original)."""
    runs = {}
    original = Attention.forward

    def counted(self, *args, **kwargs):
        key = self._modules["to_q"]
        runs[key] = runs.get(key, 0) + 1
        return original(self, *args, **kwargs)
    monkeypatch.setattr(Attention, "forward", counted)
    return runs


def attentions(model):
    return [block.attn1 for block in model.transformer_blocks]


def sample(model, steps=STEPS):
    return td.sample("dit", model, td.scheduler(steps))


def plain(model):
    return not any(type(m).__name__.startswith("CacheKit") for m in model.modules())


def equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# -- 1. other machinery on a unit ---------------------------------------------------------
def test_a_diffusers_hooked_attention_is_cached_like_every_other(attention_runs):
    """Measured bug: FORA interval 3 over 9 steps ran the hooked attention 9 times, the others 4."""
    model = td.dit()
    reference = td.dit()
    reference.load_state_dict(model.state_dict())
    hooked = attentions(model)[1]
    keys = [a.to_q for a in attentions(model)]
    hook = diffusers_hook(hooked)
    handle = apply_fora(model, interval=3, scheduler=td.scheduler(STEPS))
    outs = sample(model)
    assert [attention_runs[k] for k in keys] == [len(REFRESHES)] * 3
    assert hook.pre == hook.post == len(REFRESHES)          # the hook runs when the module computes
    rates = handle.telemetry.step_hit_rates()
    assert [i for i, r in enumerate(rates) if r == 0.0] == REFRESHES and all(
        r == 1.0 for i, r in enumerate(rates) if i not in REFRESHES)
    # The hook (a pure counter) changes nothing: same outputs as FORA on the unhooked twin.
    apply_fora(reference, interval=3, scheduler=td.scheduler(STEPS))
    assert equal(outs, sample(reference))
    handle.remove()          # (remove() replays one call on fake tensors for the FLOP profile)
    assert plain(model) and model.transformer_blocks[1].attn1 is hooked
    before = hook.pre
    sample(model, 2)
    assert hook.pre == before + 2                             # still hooked after remove()


def test_an_accelerate_hooked_unit_is_cached(attention_runs):
    model = td.dit()
    hooked = attentions(model)[0]
    hook = AccelerateCounting()
    add_hook_to_module(hooked, hook)
    handle = apply_fora(model, interval=3, scheduler=td.scheduler(STEPS))
    sample(model)
    assert [attention_runs[a.to_q] for a in attentions(model)] == [len(REFRESHES)] * 3
    assert hook.calls == len(REFRESHES)
    handle.remove()
    assert plain(model) and "_hf_hook" in hooked.__dict__
    before = hook.calls
    sample(model, 1)
    assert hook.calls == before + 1


def test_accelerate_hooks_removed_while_patched_leave_the_unit_cached(attention_runs):
    """`pipe.remove_all_hooks()` (run by enable_model_cpu_offload) removes accelerate hooks from
    every module in the tree, the proxies included: the unit stays cached, the hook is gone."""
    model = td.dit()
    hooked = attentions(model)[0]
    hook = AccelerateCounting()
    add_hook_to_module(hooked, hook)
    handle = apply_fora(model, interval=3, scheduler=td.scheduler(STEPS))
    remove_hook_from_module(model, recurse=True)
    assert "forward" not in hooked.__dict__ and "_hf_hook" not in hooked.__dict__
    sample(model)
    assert [attention_runs[a.to_q] for a in attentions(model)] == [len(REFRESHES)] * 3
    assert hook.calls == 0
    handle.remove()
    assert plain(model) and "forward" not in hooked.__dict__


def test_other_caches_on_a_unit_or_an_ancestor_are_refused():
    model = td.dit()      # PyramidAttentionBroadcast hooks the attentions themselves
    apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500))
    with pytest.raises(ValueError, match=r"Attention `transformer_blocks.0.attn1`.*'pyramid_attention_broadcast' "
                                         r"\(PyramidAttentionBroadcastHook\).*remove_hook"):
        apply_fora(model, num_inference_steps=4)
    assert plain(model)                                        # nothing was installed
    model = td.dit()      # FirstBlockCache hooks the blocks: ancestors of the units
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match=r"units inside the BasicTransformerBlock `transformer_blocks.0`.*"
                                         r"FBCHeadBlockHook.*disable_cache"):
        apply_fora(model, num_inference_steps=4)
    model = td.unet()     # a forward-replacing hook on the model itself (as FasterCache's denoiser hook)
    diffusers_hook(model, Replacing(), "replace")
    with pytest.raises(ValueError, match=r"units inside the model itself of this UNet2DConditionModel.*'replace'"):
        apply_deepcache(model, num_inference_steps=4)
    assert plain(model) and not hasattr(model, "_cachekit_handle")


def test_a_forward_replacing_hook_inside_a_unit_is_allowed(attention_runs):
    """Below a unit (PeftInputAutocastDisableHook on LoRA layers) it runs when the unit computes."""
    model = td.dit()
    inner = attentions(model)[0].to_q
    calls = []
    original = inner.forward

    class Inside(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)
    diffusers_hook(inner, Inside(), "inside")
    handle = apply_fora(model, interval=3, scheduler=td.scheduler(STEPS))
    sample(model)
    assert len(calls) == len(REFRESHES)
    handle.remove()


def test_an_unknown_instance_forward_is_refused():
    model = td.dit()
    attn = attentions(model)[2]
    attn.forward = lambda *a, **k: Attention.forward(attn, *a, **k)
    with pytest.raises(ValueError, match=r"Attention units.*own `forward` set by another tool "
                                         r"\(test_an_unknown_instance_forward_is_refused.<locals>.<lambda>\).*"
                                         r"remove that tool's hook"):
        apply_fora(model, num_inference_steps=4)
    assert plain(model)
    del attn.forward
    attn.forward = attn.forward            # its own forward bound to itself: harmless, accepted
    apply_fora(model, num_inference_steps=4).remove()


def test_hooks_on_the_root_and_non_unit_modules_keep_working(attention_runs):
    model = td.dit()
    reference = td.dit()
    reference.load_state_dict(model.state_dict())
    hooks = {"root": diffusers_hook(model), "block": diffusers_hook(model.transformer_blocks[0]),
             "pos_embed": diffusers_hook(model.pos_embed), "norm": diffusers_hook(model.transformer_blocks[1].norm1)}
    root_accelerate = AccelerateCounting()
    add_hook_to_module(model, root_accelerate)            # on top of the root's diffusers chain
    handle = apply_fora(model, interval=3, scheduler=td.scheduler(STEPS))
    outs = sample(model)
    assert {name: (h.pre, h.post) for name, h in hooks.items()} == {name: (STEPS, STEPS) for name in hooks}
    assert root_accelerate.calls == STEPS
    assert [attention_runs[a.to_q] for a in attentions(model)] == [len(REFRESHES)] * 3   # still cached
    apply_fora(reference, interval=3, scheduler=td.scheduler(STEPS))
    assert equal(outs, sample(reference))
    handle.remove()
    before = {name: h.pre for name, h in hooks.items()}
    sample(model, 1)
    assert all(h.pre == before[name] + 1 for name, h in hooks.items())


def test_hooks_added_while_patched_run_and_survive_remove(attention_runs):
    model = td.dit()
    keep = diffusers_hook(attentions(model)[1], name="before")   # the original has a registry
    unhooked = td.dit()
    unhooked.load_state_dict(model.state_dict())
    handle = apply_fora(model, interval=3, scheduler=td.scheduler(STEPS))
    # On the proxy in the tree: a new registry; its chain wraps the proxy, so it runs on every call.
    wrapping = diffusers_hook(model.transformer_blocks[0].attn1)
    # Through the original's registry (reached from the proxy): the proxy computes through it.
    joined = diffusers_hook(model.transformer_blocks[1].attn1, name="while")
    accelerate = AccelerateCounting()
    add_hook_to_module(model.transformer_blocks[2].attn1, accelerate)
    sample(model)
    assert [attention_runs[a.to_q] for a in attentions(model)] == [len(REFRESHES)] * 3
    assert wrapping.pre == STEPS and accelerate.calls == STEPS          # around the decision
    assert keep.pre == joined.pre == len(REFRESHES)                    # when the unit computes
    handle.remove()
    assert plain(model)
    attention_runs.clear()
    before = (wrapping.pre, accelerate.calls, keep.pre, joined.pre)
    outs = sample(model, 2)
    assert (wrapping.pre, accelerate.calls, keep.pre, joined.pre) == tuple(n + 2 for n in before)
    assert [attention_runs[a.to_q] for a in attentions(model)] == [2, 2, 2]
    assert equal(outs, sample(unhooked, 2))
    # Unpatched state is what computes: a processor set now is used through the moved chains.
    processor = CountingProcessor()
    for attn in attentions(model):
        attn.set_processor(processor)
    sample(model, 1)
    assert processor.calls == 3
    apply_fora(model, interval=3, scheduler=td.scheduler(STEPS)).remove()    # and it can be patched again


# -- 2. state set while patched ----------------------------------------------------------
class CountingProcessor(AttnProcessor):
    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return super().__call__(*args, **kwargs)


def test_state_set_while_patched_is_the_state_after_remove():
    model = td.dit()
    originals = attentions(model)
    ff = model.transformer_blocks[0].ff
    stale = originals[2]                          # a reference the user kept from before
    originals[1].note = "set before"
    handle = apply_fora(model, interval=3, scheduler=td.scheduler(4))
    model.train()
    assert all(m.training for m in originals)     # written through at once
    model.eval()
    model.transformer_blocks[0].attn1.set_processor(AttnProcessor())
    model.transformer_blocks[0].ff.flag = 7
    del model.transformer_blocks[1].attn1.note
    stale.set_processor(CountingProcessor())      # set on the original directly
    replacement = Attention(query_dim=32, heads=2, dim_head=16).eval()
    model.transformer_blocks[1].attn1 = replacement
    sample(model, 4)
    handle.remove()
    assert plain(model)
    assert not any(m.training for m in model.modules())
    assert type(originals[0].processor) is AttnProcessor and model.transformer_blocks[0].attn1 is originals[0]
    assert model.transformer_blocks[0].ff is ff and ff.flag == 7
    assert model.transformer_blocks[1].attn1 is replacement          # the user's module stays
    assert not hasattr(originals[1], "note")
    assert type(stale.processor) is CountingProcessor                 # not undone by remove()
    model.train()
    handle = apply_fora(model, interval=3, scheduler=td.scheduler(4))
    model.eval()
    handle.remove()
    assert not any(m.training for m in model.modules())


def test_a_processor_set_while_patched_is_what_computes():
    """Also for a hooked unit, whose hook chain computes on the original module."""
    model = td.dit()
    diffusers_hook(attentions(model)[0])
    handle = apply_fora(model, interval=3, scheduler=td.scheduler(STEPS))
    processor = CountingProcessor()
    for attn in attentions(model):            # the proxies in the tree
        attn.set_processor(processor)
    sample(model)
    assert processor.calls == 3 * len(REFRESHES)
    handle.remove()
    assert all(a.processor is processor for a in attentions(model))


# -- 3. copies ----------------------------------------------------------------------------
def _counts(telemetry):
    return [list(r) for r in telemetry.computed], [list(r) for r in telemetry.reused]


def _assert_plain_copy(twin):
    assert plain(twin)
    assert not hasattr(twin, "_cachekit_handle") and not hasattr(twin, "_cachekit_step_skip")
    assert "__getstate__" not in twin.__dict__ and "forward" not in twin.__dict__
    assert not twin._forward_pre_hooks and not twin._forward_hooks
    assert not any(k.startswith("_cachekit") for m in twin.modules() for k in m.__dict__)


def test_a_deep_copy_is_plain_and_never_joins_the_session():
    model = td.dit()
    unpatched = sample(model)
    handle = apply_fora(model, interval=3, scheduler=td.scheduler(STEPS))
    patched = sample(model)
    after = copy.deepcopy(model)                      # after a run (still patched)
    _assert_plain_copy(after)
    assert equal(sample(after), unpatched)

    first = _counts(handle.telemetry)

    # During a run; the copy runs between the original's calls and nested in its forward (same
    # thread, the original's call scope active): the original's counts and outputs are untouched.
    sched = td.scheduler(STEPS)
    x = td.inputs("dit", model)
    copies, nested = [], []

    def run_copy(module, args, output):
        if not nested:
            nested.append(None)
            with torch.no_grad():
                nested[0] = copies[0](**td.inputs("dit", model), timestep=sched.timesteps[0].expand(2)).sample

    outs = []
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            outs.append(model(**x, timestep=t.expand(2)).sample)
            x["hidden_states"] = x["hidden_states"] - 0.05 * outs[-1]
            if i == 3:
                copies.append(copy.deepcopy(model))
                before = _counts(handle.telemetry)
                copy_out = sample(copies[0])
                assert _counts(handle.telemetry) == before
                hook = model.transformer_blocks[0].register_forward_hook(run_copy)
    hook.remove()
    assert equal(outs, patched) and _counts(handle.telemetry) == first
    assert equal(copy_out, unpatched) and torch.equal(nested[0], unpatched[0])
    _assert_plain_copy(copies[0])
    handle.remove()


def test_pickle_and_torch_save_give_a_plain_model():
    model = td.dit()
    unpatched = sample(model)
    handle = apply_fora(model, interval=3, scheduler=td.scheduler(STEPS))
    sample(model)
    data = pickle.dumps(model)
    assert b"cachekit" not in data and b"CacheKit" not in data     # unpickling needs no CacheKit
    for twin in (pickle.loads(data), _torch_roundtrip(model)):
        _assert_plain_copy(twin)
        assert equal(sample(twin), unpatched)
    assert not plain(model) and handle.telemetry is not None        # the original is still patched
    handle.remove()


def _torch_roundtrip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_copies_of_a_unet_with_deepcache_and_step_skip_are_plain():
    model = td.unet()
    sched = td.scheduler(4)
    unpatched = td.sample("unet", model, sched)
    cache = apply_deepcache(model, cache_interval=2, scheduler=sched)
    skip = apply_adaptive_skip(model, scheduler=sched)
    td.sample("unet", model, sched)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        _assert_plain_copy(twin)
        assert equal(td.sample("unet", twin, sched), unpatched)
    skip.remove()
    cache.remove()
    assert "__getstate__" not in model.__dict__ and not model._forward_pre_hooks


def test_a_copy_of_a_hooked_unit_binds_the_hooks_to_the_copy():
    model = td.dit()
    hook = AccelerateCounting()
    add_hook_to_module(attentions(model)[0], hook)
    unpatched = sample(model, 2)
    handle = apply_fora(model, interval=3, scheduler=td.scheduler(STEPS))
    twin = copy.deepcopy(model)
    attn = twin.transformer_blocks[0].attn1
    assert type(attn) is Attention and attn.forward.args[0] is attn
    if hasattr(attn._old_forward, "__self__"):
        assert attn._old_forward.__self__ is attn
    assert equal(sample(twin, 2), unpatched)
    handle.remove()
