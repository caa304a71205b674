"""Attaching to a diffusers model without lying: other tools' hooks, copies, torch.compile.

What a unit module may carry is decided per case in core/proxy.py (its docstring is the
reference): diffusers `HookRegistry` hooks with pre/post_forward only (group offloading,
layerwise casting, context parallel) and accelerate hooks (cpu / disk offload, device maps) are
cached correctly: they run exactly when the unit computes. Another instance `forward`, or a
diffusers hook with `new_forward` (FirstBlockCache, PyramidAttentionBroadcast, FasterCache,
MagCache, TaylorSeer, layer skip) is refused with a ValueError when the method is applied.

This module adds what needs the whole model:

* `check_model`: a hook with `new_forward` on an ANCESTOR of a unit (FirstBlockCache's block
  hooks, FasterCache's denoiser hook on the model itself) is refused as well: it skips whole
  blocks, so the units inside would neither compute nor be reused on its steps, and the
  telemetry could not say what ran. Pre/post hooks on the root or on any other module (group
  offloading's, a counting hook) keep working, untouched.
* `CopyFilter`: a handle's traces on the root model (its forward hooks, the `_cachekit_*`
  attribute, a step skip's `forward` wrapper) are left out when the model is deep-copied,
  pickled or saved with torch.save: an instance `__getstate__` on the model (its class is not
  touched) returns the state without them, and proxies reduce to their original class
  (core/proxy.py). A copy of a patched model is a plain, unpatched model that never joins the
  original's session; unpickling it needs no CacheKit. `remove()` takes the filter away.
* `compile_safe`: the root hooks open and close the session's call scope; under torch.compile
  they run outside the graph (torch.compiler.disable), as the units' decisions do.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable

import torch

from ..core.proxy import replacing_hook_error, replacing_hooks

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")
_GETSTATE = "__getstate__"
_MISSING = object()


def check_model(model: torch.nn.Module, modules: Iterable[torch.nn.Module]) -> None:
    """Refuse diffusers hooks that replace the forward of a unit (or region) module or of a
    module that contains one. Raises ValueError naming the module, the hook and the fix."""
    targets = {id(m) for m in modules}
    seen: set[int] = set()

    def visit(module: torch.nn.Module, path: str) -> bool:
        if id(module) in seen:
            return False
        seen.add(id(module))
        contains = id(module) in targets
        for name, child in module._modules.items():
            if child is not None:
                contains = visit(child, f"{path}.{name}" if path else name) or contains
        if contains:
            for name, hook in replacing_hooks(module):
                what = f"the {type(module).__name__} `{path}`" if path else "the model itself"
                where = (f"{what} of this {type(model).__name__}" if id(module) in targets
                         else f"the units inside {what} of this {type(model).__name__}")
                raise replacing_hook_error(where, name, hook)
        return contains

    visit(model, "")


def compile_safe(hook: Callable) -> Callable:
    """A root hook that torch.compile runs outside the graph (it opens / closes the call scope)."""
    return torch.compiler.disable(hook)


class CopyFilter:
    """The model's instance `__getstate__`: its class's state, without what CacheKit handles
    put on the model. Deep copies, pickles and torch.save all read the state through it."""

    def __init__(self, model: torch.nn.Module):
        self._model = weakref.ref(model)
        self._entries: list[dict[str, Any]] = []

    def __call__(self) -> dict[str, Any]:
        model = self._model()
        state = dict(type(model).__getstate__(model))
        state.pop(_GETSTATE, None)
        for entry in self._entries:
            for name, value in entry["attrs"]:
                if state.get(name, _MISSING) is value:
                    del state[name]
            ids = entry["hooks"]
            if ids:
                for name in _HOOK_DICTS:
                    hooks = state.get(name)
                    if hooks and any(i in hooks for i in ids):
                        state[name] = type(hooks)((k, v) for k, v in hooks.items() if k not in ids)
            forward = entry["forward"]
            if forward is not None and state.get("forward", _MISSING) is forward[0]:
                if forward[1] is None:
                    del state["forward"]
                else:
                    state["forward"] = forward[1]
        return state


def exclude_from_copies(model: torch.nn.Module, *, attrs: Iterable[str] = (), hooks: Iterable[Any] = (),
                        forward: Any = None, previous_forward: Any = None) -> dict[str, Any]:
    """Leave these out of every copy of `model`: the attributes (with their present values),
    the hooks (RemovableHandles) and an instance `forward` wrapper (a copy gets
    `previous_forward`, or none). Returns a token for `include_again`."""
    state_filter = model.__dict__.get(_GETSTATE)
    if not isinstance(state_filter, CopyFilter):
        state_filter = CopyFilter(model)
        model.__dict__[_GETSTATE] = state_filter
    entry = {"attrs": [(name, model.__dict__.get(name)) for name in attrs],
             "hooks": frozenset(h.id for h in hooks),
             "forward": (forward, previous_forward) if forward is not None else None}
    state_filter._entries.append(entry)
    return entry


def include_again(model: torch.nn.Module, token: dict[str, Any]) -> None:
    """Undo `exclude_from_copies` (the handle is removed); the filter goes with its last entry."""
    state_filter = model.__dict__.get(_GETSTATE)
    if not isinstance(state_filter, CopyFilter):
        return
    state_filter._entries = [e for e in state_filter._entries if e is not token]
    if not state_filter._entries:
        del model.__dict__[_GETSTATE]
