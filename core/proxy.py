"""Unit proxies: a module that behaves exactly like the original, but runs through the runtime.

A proxy is an instance of a subclass of the original module's class that shares the original's
attribute dictionaries (`_parameters`, `_modules`, `_buffers`, ...). So parameter names, weight
patching (LoRA), device moves and isinstance checks all see the same module, while `forward`
first asks the active session (if any) whether to compute or reuse. The original object is not
touched: a host installs the proxy where the original was (a ComfyUI object patch, or a swap in
the diffusers module tree that `remove` undoes) and puts the original back afterwards.

Outside a CacheKit run (no active session for the proxy's owner) a proxy simply runs the
original forward, so a proxy left in place can never change a result by itself.
"""
from __future__ import annotations

from typing import Any

import torch

from .session import active_call

_CLASSES: dict[tuple, type] = {}

# Attribute holding ((owner, unit_index), ...) from the first installed to the last.
LINKS = "_cachekit_links"
BASE = "_cachekit_base_class"


def is_proxy(module: Any) -> bool:
    return hasattr(type(module), BASE)


def original_class(module: torch.nn.Module) -> type:
    return getattr(type(module), BASE, type(module))


def make_proxy(module: torch.nn.Module, owner: str, index: int, extra: dict[str, Any] | None = None) -> torch.nn.Module:
    """A proxy of `module` that runs as unit `index` of the session owned by `owner`.

    A proxy of a proxy (two CacheKit patches on one module) chains them: the patch installed
    last decides first, and computes by asking the earlier one.
    """
    base = original_class(module)
    state = dict(module.__dict__)
    _check_no_foreign_forward(module, state.pop("forward", None), base)
    cls = _proxy_class(base, extra or {})
    proxy = cls.__new__(cls)
    proxy.__dict__.update(state)             # shares the attribute dicts, copies nothing heavy
    proxy.__dict__[LINKS] = tuple(module.__dict__.get(LINKS, ())) + ((owner, index),)
    return proxy


def _check_no_foreign_forward(module: torch.nn.Module, forward: Any, base: type) -> None:
    """An instance `forward` would win over the proxy's and leave the unit silently uncached.

    The module's own forward bound to itself (what DeepCacheSDHelper.disable() leaves behind) is
    harmless and dropped; anything else belongs to other machinery (a hook, an offloader,
    another cache) that CacheKit cannot keep and bypass at once: refuse, say what to do."""
    if forward is None:
        return
    if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is base.forward:
        return
    raise ValueError(f"A {base.__name__} of this model has its own `forward` set by another tool (a hook, "
                     "offloading or another cache), which CacheKit would bypass or be bypassed by. Remove that "
                     "tool (or load the model afresh) before applying CacheKit.")


def run_links(module: torch.nn.Module, compute_original, unit_input: Any):
    """Run the proxy's links outermost first; compute_original() runs the original forward."""
    links = module.__dict__[LINKS]

    def run(i: int):
        if i < 0:
            return compute_original()
        owner, index = links[i]
        call = active_call(owner)
        if call is None:
            return run(i - 1)
        return call.session.run_unit(call, index, lambda: run(i - 1), unit_input)

    return run(len(links) - 1)


def _proxy_class(base: type, extra: dict[str, Any]) -> type:
    key = (base, tuple(sorted((name, id(value)) for name, value in extra.items())))
    cls = _CLASSES.get(key)
    if cls is not None:
        return cls

    def forward(self, *args, **kwargs):
        unit_input = args[0] if args else next(iter(kwargs.values()), None)
        return run_links(self, lambda: base.forward(self, *args, **kwargs), unit_input)

    namespace = {"forward": forward, BASE: base, "__module__": __name__}
    namespace.update(extra)
    cls = type(f"CacheKit{base.__name__}", (base,), namespace)
    _CLASSES[key] = cls
    return cls
