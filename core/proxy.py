"""Unit proxies: a module that behaves exactly like the original, but runs through the runtime.

A proxy is an instance of a subclass of the original module's class that shares the original's
attribute dictionaries (`_parameters`, `_modules`, `_buffers`, hook dicts, ...). So parameter
names, weight patching (LoRA), device moves and isinstance checks all see the same module, while
`forward` first asks the active session (if any) whether to compute or reuse. A host installs
the proxy where the original was (a ComfyUI object patch, or a swap in the diffusers module tree
that `restore_module` undoes) and puts the original back afterwards.

Outside a CacheKit run (no active session for the proxy's owner) a proxy simply runs the
original forward, so a proxy left in place can never change a result by itself.

The original is the state, the proxy a view that decides
--------------------------------------------------------
* Attributes set on a proxy (`train()` / `eval()`, `set_processor`, any attribute) are written
  through to the original at once, so the original is always the module's current state:
  whatever computes on the original (another tool's hook chain, below) sees them, and unpatching
  (`restore_module`) never undoes a user's change. `forward` is the exception: one bound to the
  original (accelerate's remove_hook_from_module restoring `_old_forward`) goes to the original
  only; any other stays on the proxy (see "hooks added while patched"). A write made directly
  to the original while it is out of the tree (a reference kept from before patching) is kept
  by `restore_module`, but the proxy does not see it until then.

Other machinery on a unit module (checked when the proxy is made: refused, never silently lost)
----------------------------------------------------------------------------------------------
* Its own `forward` bound to itself (what DeepCacheSDHelper.disable() leaves behind): harmless,
  dropped.
* A diffusers `HookRegistry` chain (`_diffusers_hook`: group offloading, layerwise casting,
  context parallel, any `ModelHook` with `pre_forward` / `post_forward` only): CACHED. The proxy
  decides first; when the unit computes it runs the chain, so the hooks run exactly when the
  module computes (and not on reused steps, as for its own work). The chain is the one on the
  original at call time (hooks added to or removed from that registry while patched count), and
  it runs on the original module, the object the hooks were registered with (group offloading
  compares modules by identity).
* A diffusers hook with `new_forward` (FirstBlockCache, PyramidAttentionBroadcast, FasterCache,
  MagCache, TaylorSeer: another cache; or a layer skip): REFUSED with a ValueError. It replaces
  the module's forward and decides itself whether to compute, so two caches would decide for
  one unit and the telemetry could not say what ran. (diffusers_host/attach.py refuses the same
  hooks on an ancestor of a unit: they skip whole blocks.)
* An accelerate hook (`_hf_hook` + `_old_forward`, from `add_hook_to_module`, cpu / disk
  offload, `device_map` dispatch): CACHED, as diffusers pre/post hooks: accelerate's chain always
  calls `_old_forward`; it runs when the unit computes, on the original.
* Any other instance `forward`: REFUSED (ValueError naming the module class, the function found
  and the fix): CacheKit cannot tell whether it must run, nor keep it and bypass it at once.

Hooks added while patched (on the proxy that is in the tree): their chain wraps the proxy's
forward, so they run on every call and the unit's work is still cached. `restore_module` hands
the chain to the original and retires the proxy (it then computes on the original), so the
hooks keep working after `remove()`.

torch.compile
-------------
Traced, a proxy's forward is split in three: `_decide` (torch.compiler.disable'd: it asks the
session, reused values come back from it), the unit's own work (traced in the proxy class's
frame; every proxy class has its own code object, so compiled variants are kept per class) and
`_record` (disabled: the links run again with the computed value and count and store it; they
take the same decisions, as nothing changed in between). So graphs break only at a unit's
boundary, never inside its compute. Eager runs take the single pass of `run_links`. As with any
graph break in a loop, a frame that loops over units (a model's loop over its blocks) runs its
own glue eagerly; `fullgraph=True` cannot work with a cache that decides per unit.

Copies
------
A copy of a proxy (`copy.deepcopy`, `pickle`, `torch.save`) is a plain module of the original
class with the module's current state (as `restore_module` would leave it): a copy never joins
a CacheKit session, and unpickling needs no CacheKit. References to the original inside the
state (a hook chain bound to it) point to the copy.
"""
from __future__ import annotations

import copy
import copyreg
import functools
import types
from typing import Any

import torch

from .session import active_call

_CLASSES: dict[tuple, type] = {}

# Attribute holding ((owner, index, is_region), ...) from the first installed to the last.
LINKS = "_cachekit_links"
BASE = "_cachekit_base_class"
ORIGINAL = "_cachekit_original"      # the module this proxy stands for
SNAPSHOT = "_cachekit_snapshot"      # the original's attributes when the proxy was made
INNER = "_cachekit_inner_forward"    # set on a retired proxy: the original's own chain (or None)
_OWN_KEYS = frozenset((LINKS, ORIGINAL, SNAPSHOT, INNER, "_cachekit_gate"))
_MISSING = object()


def is_proxy(module: Any) -> bool:
    return hasattr(type(module), BASE)


def original_class(module: torch.nn.Module) -> type:
    return getattr(type(module), BASE, type(module))


def original_module(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module a proxy (or a proxy of a proxy) stands for; a plain module itself."""
    while is_proxy(module) and module.__dict__.get(ORIGINAL) is not None:
        module = module.__dict__[ORIGINAL]
    return module


def make_proxy(module: torch.nn.Module, owner: str, index: int, extra: dict[str, Any] | None = None,
               region: bool = False) -> torch.nn.Module:
    """A proxy of `module` that runs as unit `index` (or region `index`) of the session owned by `owner`.

    A proxy of a proxy (two CacheKit patches on one module) chains them: the patch installed
    last decides first, and computes by asking the earlier one.
    """
    base = original_class(module)
    state = {key: value for key, value in module.__dict__.items() if key not in _OWN_KEYS}
    forward = state.pop("forward", None)
    if is_proxy(module) and forward is not None:
        raise ValueError(_refusal(base, f"a `forward` hook chain added while an earlier CacheKit patch was applied "
                                        f"({_describe(forward)})", "remove that hook or the earlier patch"))
    root = original_module(module)
    check_foreign_forward(root, root.__dict__.get("forward"), base)
    cls = _proxy_class(base, extra or {})
    proxy = cls.__new__(cls)
    proxy.__dict__.update(state)             # shares the attribute dicts, copies nothing heavy
    proxy.__dict__[LINKS] = tuple(module.__dict__.get(LINKS, ())) + ((owner, index, region),)
    proxy.__dict__[ORIGINAL] = module
    proxy.__dict__[SNAPSHOT] = dict(state)
    return proxy


def restore_module(original: torch.nn.Module, proxy: torch.nn.Module) -> torch.nn.Module:
    """The original module, with what was set on the proxy while patched (train / eval, an
    attention processor, any attribute) carried over, so unpatching never undoes a user's change.

    Attributes are written through to the original as they are set; this also carries what was
    written into the proxy's __dict__ directly (a value changed on the proxy since it was made
    wins; one changed only on the original is kept). A hook chain installed on the proxy while
    patched (its own `forward`) moves to the original, and the proxy is retired: it no longer
    decides, and computes on the original, so the chain (which calls the proxy) keeps working."""
    if proxy is original or not is_proxy(proxy):
        return original
    snapshot = proxy.__dict__.get(SNAPSHOT, {})
    for key, value in list(proxy.__dict__.items()):
        if key in _OWN_KEYS or key == "forward":
            continue
        if snapshot.get(key, _MISSING) is not value and original.__dict__.get(key, _MISSING) is not value:
            original.__dict__[key] = value
    for key, value in snapshot.items():
        if key not in proxy.__dict__ and original.__dict__.get(key, _MISSING) is value:
            del original.__dict__[key]       # deleted on the proxy, unchanged on the original
    chain = proxy.__dict__.pop("forward", None)
    proxy.__dict__[LINKS] = ()
    if chain is not None:
        proxy.__dict__[INNER] = original.__dict__.get("forward")
        original.__dict__["forward"] = chain
    else:
        proxy.__dict__.pop(INNER, None)
    return original


# -- other tools' forward chains ---------------------------------------------------------
def foreign_chain(module: torch.nn.Module, forward: Any) -> str | None:
    """'diffusers' or 'accelerate' when `forward` is that tool's hook chain bound to `module`
    (or to a proxy of it: a chain installed while patched)."""
    if not isinstance(forward, functools.partial) or not forward.args or not _bound_to(forward.args[0], module):
        return None
    qualname = getattr(forward.func, "__qualname__", "")
    registry = module.__dict__.get("_diffusers_hook")
    if (registry is not None and _bound_to(getattr(registry, "_module_ref", None), module)
            and qualname.startswith("HookRegistry.")):
        return "diffusers"
    if "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__:
        return "accelerate"
    return None


def _bound_to(obj: Any, module: torch.nn.Module) -> bool:
    return obj is module or (is_proxy(obj) and original_module(obj) is module)


def replacing_hooks(module: torch.nn.Module) -> list[tuple[str, Any]]:
    """(name, hook) of the module's diffusers hooks that replace its forward (`new_forward`)."""
    registry = module.__dict__.get("_diffusers_hook")
    hooks = getattr(registry, "hooks", None)
    if not isinstance(hooks, dict):
        return []
    return [(name, hook) for name, hook in hooks.items() if hasattr(hook, "new_forward")]


def replacing_hook_error(where: str, name: str, hook: Any) -> ValueError:
    return ValueError(
        f"CacheKit cannot cache {where}: it carries the diffusers hook '{name}' ({type(hook).__name__}), which "
        "replaces the module's forward and decides itself whether to compute (another cache such as "
        "FirstBlockCache, PyramidAttentionBroadcast or FasterCache, or a layer skip); two caches cannot decide for "
        "one module. Remove that hook first (diffusers caches: model.disable_cache(); any hook: "
        f"HookRegistry.check_if_exists_or_initialize(module).remove_hook('{name}')), then apply CacheKit.")


def check_foreign_forward(module: torch.nn.Module, forward: Any, base: type) -> None:
    """Refuse a unit whose other machinery CacheKit would bypass or be bypassed by (see the
    module docstring); accept no forward, the module's own, and diffusers / accelerate chains."""
    for name, hook in replacing_hooks(module):
        raise replacing_hook_error(f"the {base.__name__} units of this model", name, hook)
    if forward is None or _own_forward(forward, module, base) or foreign_chain(module, forward) is not None:
        return
    raise ValueError(_refusal(base, f"its own `forward` set by another tool ({_describe(forward)})",
                              "remove that tool's hook (or load the model afresh)"))


def _refusal(base: type, what: str, fix: str) -> str:
    return (f"CacheKit cannot cache the {base.__name__} units of this model: one has {what}, which CacheKit would "
            f"bypass or be bypassed by, leaving the unit uncached or the hook skipped. diffusers HookRegistry hooks "
            f"(pre/post_forward) and accelerate hooks are supported. To apply CacheKit, {fix} first.")


def _describe(forward: Any) -> str:
    func = forward.func if isinstance(forward, functools.partial) else forward
    return getattr(func, "__qualname__", None) or type(func).__name__


def _own_forward(forward: Any, module: torch.nn.Module, base: type) -> bool:
    return getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is base.forward


# -- running ------------------------------------------------------------------------------
def run_links(module: torch.nn.Module, compute_original, unit_input: Any):
    """Run the proxy's links outermost first; compute_original() runs the original forward."""
    links = module.__dict__.get(LINKS, ())

    def run(i: int):
        if i < 0:
            return compute_original()
        owner, index, region = links[i]
        call = active_call(owner)
        if call is None:
            return run(i - 1)
        if region:
            return call.session.run_region(call, index, lambda: run(i - 1))
        return call.session.run_unit(call, index, lambda: run(i - 1), unit_input)

    return run(len(links) - 1)


def _compute(module: torch.nn.Module, base_forward, args: tuple, kwargs: dict):
    """The module's work: its original's hook chain when it has one, else the class forward."""
    state = module.__dict__
    original = original_module(module)
    if INNER in state:             # retired, and the chain now on the original calls this proxy
        inner = state[INNER]
        return inner(*args, **kwargs) if inner is not None else base_forward(original, *args, **kwargs)
    chain = original.__dict__.get("forward")
    if chain is not None and foreign_chain(original, chain) is not None:
        return chain(*args, **kwargs)
    # A retired proxy (no links) computes on the original: the module's state after unpatching.
    return base_forward(module if state.get(LINKS) else original, *args, **kwargs)


def _plain(module: torch.nn.Module) -> bool:
    """A live proxy whose original carries no hook chain: it computes with the class forward."""
    state = module.__dict__
    return INNER not in state and bool(state.get(LINKS)) and "forward" not in original_module(module).__dict__


class _Compute(Exception):
    """Raised where the original would compute, to leave the decision code (compiled runs)."""


def _needs_compute():
    raise _Compute


@torch.compiler.disable
def _decide(module: torch.nn.Module, unit_input: Any) -> tuple[bool, Any, bool]:
    """(True, value, _) when the links answer without computing (a reuse), else (False, None,
    whether the class forward computes: see _plain). Outside the graph, so nothing here is
    guarded on (a proxy's links differ per unit and would recompile every unit)."""
    try:
        return True, run_links(module, _needs_compute, unit_input), False
    except _Compute:
        return False, None, _plain(module)


@torch.compiler.disable
def _record(module: torch.nn.Module, unit_input: Any, out: Any) -> Any:
    """Run the links again with the computed value: they take the same decisions (nothing
    changed since _decide) and count and store it."""
    return run_links(module, lambda: out, unit_input)


def _proxy_class(base: type, extra: dict[str, Any]) -> type:
    key = (base, tuple(sorted((name, id(value)) for name, value in extra.items())))
    cls = _CLASSES.get(key)
    if cls is not None:
        return cls

    def base_forward(module, *args, **kwargs):
        if type(module) is cls:
            # super(): under torch.compile a class that diffusers marks allow_in_graph
            # (Attention) cannot be asked for its forward directly.
            return super(cls, module).forward(*args, **kwargs)
        return base.forward(module, *args, **kwargs)

    def forward(self, *args, **kwargs):
        unit_input = args[0] if args else next(iter(kwargs.values()), None)
        if torch.compiler.is_compiling():
            # The decision runs outside the graph (a break at the unit's boundary); the unit's
            # own work is traced between the two decision calls, in this (per class) frame.
            reused, value, plain = _decide(self, unit_input)
            if reused:
                return value
            if plain:
                out = super(cls, self).forward(*args, **kwargs)
            else:
                out = _compute(self, base_forward, args, kwargs)
            return _record(self, unit_input, out)
        links = self.__dict__.get(LINKS)
        if links is not None and len(links) == 1 and active_call(links[0][0]) is None and _plain(self):
            # Outside a CacheKit run (or a run that stays out of the units): straight to the work.
            return super(cls, self).forward(*args, **kwargs)
        return run_links(self, lambda: _compute(self, base_forward, args, kwargs), unit_input)

    def __setattr__(self, name, value):
        if name == "forward" and _for_original(self, value):
            return
        base.__setattr__(self, name, value)
        _write_through(self, name)

    def __delattr__(self, name):
        if name == "forward" and "forward" not in self.__dict__:
            original_module(self).__dict__.pop("forward", None)
            return
        base.__delattr__(self, name)
        _write_through(self, name)

    def __reduce_ex__(self, protocol):
        # copyreg's reconstructor: object.__new__(base), then base.__setstate__(state).
        return copyreg._reconstructor, (base, object, None), _plain_state(self)

    def __deepcopy__(self, memo):
        twin = base.__new__(base)
        memo[id(self)] = twin
        original = self.__dict__.get(ORIGINAL)
        while original is not None:                  # what was bound to the original binds to the copy
            memo.setdefault(id(original), twin)
            original = original.__dict__.get(ORIGINAL) if is_proxy(original) else None
        twin.__setstate__(copy.deepcopy(_plain_state(self), memo))
        return twin

    namespace = {"forward": _own_code(forward, f"CacheKit{base.__name__}.forward"), "__setattr__": __setattr__,
                 "__delattr__": __delattr__, "__reduce_ex__": __reduce_ex__, "__deepcopy__": __deepcopy__, BASE: base,
                 "__module__": __name__}
    namespace.update(extra)
    cls = type(f"CacheKit{base.__name__}", (base,), namespace)
    _CLASSES[key] = cls
    return cls


def _own_code(function, qualname: str):
    """`function` with a code object of its own: torch.compile keeps compiled code per code
    object (at most 8 variants each), so every proxy class gets its own."""
    code = function.__code__.replace(co_qualname=qualname)
    clone = types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__,
                               function.__closure__)
    clone.__qualname__ = qualname
    return clone


def _for_original(proxy: torch.nn.Module, forward: Any) -> bool:
    """A `forward` bound to the original, set through the proxy (accelerate's
    remove_hook_from_module puts `_old_forward` back): it goes to the original, whose chain the
    proxy computes with, instead of shadowing the proxy's forward. True when handled."""
    original = original_module(proxy)
    if original is proxy:
        return False
    bound = forward.args[0] if isinstance(forward, functools.partial) and forward.args else getattr(
        forward, "__self__", None)
    if bound is not original:
        return False
    if _own_forward(forward, original, original_class(proxy)):
        original.__dict__.pop("forward", None)
    else:
        original.__dict__["forward"] = forward
    return True


def _write_through(proxy: torch.nn.Module, name: str) -> None:
    if name in _OWN_KEYS or name == "forward":
        return
    original = proxy.__dict__.get(ORIGINAL)
    if original is None:
        return
    value = proxy.__dict__.get(name, _MISSING)
    if value is _MISSING:
        original.__dict__.pop(name, None)
    else:
        original.__dict__[name] = value
    if is_proxy(original):
        _write_through(original, name)


def _plain_state(proxy: torch.nn.Module) -> dict[str, Any]:
    """The module's state without CacheKit: what `restore_module` would leave on the original."""
    state = {key: value for key, value in proxy.__dict__.items() if key not in _OWN_KEYS and key != "forward"}
    state.pop("_compiled_call_impl", None)
    chain = proxy.__dict__.get("forward")
    if chain is None:
        chain = proxy.__dict__.get(INNER) if INNER in proxy.__dict__ else original_module(proxy).__dict__.get("forward")
    if chain is not None:
        state["forward"] = chain
    return state
