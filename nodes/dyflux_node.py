"""DyFLUX Token Router (CacheKit): per-token skipping on FLUX blocks with the official DyFLUX routers.

How it reaches inside ComfyUI's Flux without a copy of its block forward (core/dydit/dyflux.py
has the official semantics):

* Every block runs through `patches_replace["dit"]` and its own `original_block`.
* Double block: the router needs the text stream after its attention residual, which ComfyUI's
  block computes only after the image feed-forward. So the image FF is deferred: while the block
  runs, its `img_mlp` returns zeros and keeps its input (the modulated image tokens), its
  `txt_norm2` hands the post-attention text to the router, and its `img_mod` hands over the
  gates. After the block the router decides on the post-attention image tokens, the FF runs on
  the selected tokens only and is added with the block's own gate (ComfyUI's `apply_mod`).
* Single block: the router reads the block input and decides before the block runs. While it
  runs, `linear1` computes qkv for every token and the MLP input only for selected tokens,
  attention computes queries only for text and selected tokens (an `optimized_attention_override`
  for this block's call only, chaining any existing one), and `linear2` runs on those tokens only,
  so unselected image tokens get a zero update: they pass through unchanged.
* When a block keeps every token, it runs exactly as unpatched.

The submodules are swapped with object patches on the clone (ComfyUI restores them when another
patcher takes the model). A swapped module is a view: an instance of a subclass of the original
class that shares the original's parameter and child-module dicts, so weight names (LoRA),
device moves and isinstance checks see the same module. A copy or pickle of it is a plain copy
of the original.

Telemetry: per step and block, the image tokens computed and passed (summed over the batch),
in CacheKit's run record (Cache Stats, the sidebar); the "hit rate" is the share of image
tokens skipped.
"""
from __future__ import annotations

import uuid

import comfy.ops
import folder_paths
import torch
from comfy.ldm.flux.layers import DoubleStreamBlock, SingleStreamBlock, apply_mod
from comfy.ldm.flux.model import Flux
from comfy.patcher_extension import WrappersMP
from comfy_api.latest import io

from ..core.clock import StepClock
from ..core.dydit.dyflux import DyFluxError, DyFluxRouters, DyFluxRun, load_routers
from ..core.dydit.token_blocks import attend_kept_queries, linear_kept_tail
from ..core.dydit.tokens import run_tokenwise
from .comfy_host import SESSIONS_KEY, diffusion_model_of, outer_sample_wrapper
from .method_nodes import CATEGORY, PATCH_NODE, _node_id
from .router_node import FOLDER, register_folder

TXT_LEN = "cachekit_dyflux_txt_len"      # transformer_options key: this call's text length, for single blocks
ORIGINAL, SLOT, BASE = "_cachekit_dyflux_original", "_cachekit_dyflux_slot", "_cachekit_dyflux_base"
_REPLACE_KEYS = ("double_block", "single_block")


# -- module views ------------------------------------------------------------------------
def _reduce_ex(self, protocol):
    # A copy or pickle of a view is a plain copy of the original module (no CacheKit class).
    original = self.__dict__[ORIGINAL]
    state = {k: v for k, v in self.__dict__.items() if k not in (ORIGINAL, SLOT)}
    return copy_module, (type(original), state)


def copy_module(cls, state):
    module = cls.__new__(cls)
    module.__dict__.update(state)
    return module


_VIEW_CLASSES: dict[tuple, type] = {}


def _view(module: torch.nn.Module, forward, slot) -> torch.nn.Module:
    base = type(module)
    cls = _VIEW_CLASSES.get((base, forward))
    if cls is None:
        cls = type(f"DyFLUX{base.__name__}", (base,), {"forward": forward, "__reduce_ex__": _reduce_ex, BASE: base,
                                                       "__module__": __name__})
        _VIEW_CLASSES[(base, forward)] = cls
    view = cls.__new__(cls)
    view.__dict__.update(module.__dict__)       # shares _parameters, _modules, _buffers (the dicts themselves)
    view.__dict__[ORIGINAL] = module
    view.__dict__[SLOT] = slot
    return view


def _base_forward(view, *args):
    return getattr(type(view), BASE).forward(view, *args)


class _Slot:
    """Per block: the call in progress (set by the block's replacement while the block runs)."""
    __slots__ = ("active",)

    def __init__(self):
        self.active = None


class _DoubleCall:
    __slots__ = ("router", "mod", "text", "mlp_input", "img_mod")

    def __init__(self, router, mod):
        self.router, self.mod = router, mod
        self.text = self.mlp_input = self.img_mod = None


class _SingleCall:
    __slots__ = ("keep", "shared")

    def __init__(self, keep, shared):
        self.keep, self.shared = keep, shared


def _deferred_mlp(self, x):
    call = self.__dict__[SLOT].active
    if call is None:
        return _base_forward(self, x)
    call.mlp_input = x
    return torch.zeros_like(x)            # added with the gate: the post-attention image stays as is


def _tapped_img_mod(self, vec):
    out = _base_forward(self, vec)
    call = self.__dict__[SLOT].active
    if call is not None:
        call.img_mod = out
    return out


def _tapped_txt_norm2(self, txt):
    call = self.__dict__[SLOT].active
    if call is not None:                  # txt is the text stream after its attention residual
        call.text = call.router.text_summary(txt, call.mod)
    return _base_forward(self, txt)


def _splittable(cls) -> bool:
    """A Linear whose forward is F.linear on its (cast) weight, so its output rows can be split."""
    plain = comfy.ops.disable_weight_init.Linear
    if cls.forward is torch.nn.Linear.forward:
        return True
    return (issubclass(cls, plain) and cls.forward is plain.forward
            and cls.forward_comfy_cast_weights is plain.forward_comfy_cast_weights)


def _weight_bias(linear, x):
    if getattr(linear, "comfy_cast_weights", False) or getattr(linear, "weight_function", None) or \
            getattr(linear, "bias_function", None):
        return comfy.ops.cast_bias_weight(linear, x)
    return linear.weight, linear.bias


def _routed_linear1(self, x):
    call = self.__dict__[SLOT].active
    if call is None or not _splittable(getattr(type(self), BASE)):
        return _base_forward(self, x)     # (another Linear type: the MLP input runs for every token)
    weight, bias = _weight_bias(self, x)
    return linear_kept_tail(x, weight, bias, call.shared, call.keep)


def _routed_linear2(self, h):
    call = self.__dict__[SLOT].active
    if call is None:
        return _base_forward(self, h)
    return run_tokenwise(lambda t: _base_forward(self, t), h, call.keep)


def _attention_override(previous, keep):
    """For one single block's call: queries of text and selected tokens only (all keys and values)."""
    def override(func, *args, **kwargs):
        rest = args[3:]

        def attend(q, k, v):
            if previous is not None:
                return previous(func, q, k, v, *rest, **kwargs)
            return func(q, k, v, *rest, **kwargs)
        q, k, v = args[:3]
        if (kwargs.get("mask") is not None or not kwargs.get("skip_reshape") or kwargs.get("skip_output_reshape")
                or q.dim() != 4 or tuple(q.shape[::2]) != tuple(keep.shape)):
            return attend(q, k, v)        # a layout this routing does not know: all queries (still exact)
        return attend_kept_queries(attend, q, k, v, keep)
    return override


# -- the patch ---------------------------------------------------------------------------
class DyFluxPatch:
    """What one DyFLUX node installs on a clone: routers, threshold, per-block slots, the run owner."""

    def __init__(self, routers: DyFluxRouters, threshold: float, hidden_size: int):
        self.routers, self.threshold, self.hidden_size = routers, threshold, hidden_size
        self.owner = f"cachekit.dyflux.{uuid.uuid4().hex[:12]}"
        self.double_slots = [_Slot() for _ in routers.double]
        self.single_slots = [_Slot() for _ in routers.single]
        self.mlps: list = [None] * len(routers.double)

    def _record(self, options: dict, kind: str, index: int, keep: torch.Tensor) -> None:
        session = (options.get(SESSIONS_KEY) or {}).get(self.owner)
        if session is None:
            return
        sigmas = options.get("sigmas")
        sigma = float(sigmas.flatten()[0]) if sigmas is not None else None
        if kind == "double" and index == 0:
            session.note_call(int(keep.shape[0]))
        session.note_block(sigma, kind, index, keep)

    def double(self, index: int):
        router, slot = self.routers.double[index], self.double_slots[index]

        def replace(args: dict, extra: dict) -> dict:
            options = args.get("transformer_options")
            options = options if isinstance(options, dict) else {}
            options[TXT_LEN] = int(args["txt"].shape[1])
            call = _DoubleCall(router, router.modulation(args["vec"]))
            slot.active = call
            try:
                out = extra["original_block"](args)
            finally:
                slot.active = None
            if call.mlp_input is None or call.text is None or call.img_mod is None:
                raise RuntimeError(f"DyFLUX: Flux double block {index} did not run img_mod, img_mlp and txt_norm2 as "
                                   "ComfyUI 0.3.x does; this ComfyUI version's Flux block is not supported.")
            img = out["img"]                          # the image stream after attention (its FF was deferred)
            keep = router.keep(img, call.text, call.mod, self.threshold)
            self._record(options, "double", index, keep)
            if bool(keep.any()):
                ff = run_tokenwise(lambda t: _base_forward(self.mlps[index], t), call.mlp_input, keep)
                out["img"] = img + apply_mod(ff, call.img_mod[1].gate, None, None)
            return out
        return replace

    def single(self, index: int):
        router, slot = self.routers.single[index], self.single_slots[index]

        def replace(args: dict, extra: dict) -> dict:
            options = args.get("transformer_options")
            options = options if isinstance(options, dict) else {}
            txt_len = options.get(TXT_LEN)
            if txt_len is None:
                raise RuntimeError("DyFLUX: a Flux single block ran before any double block, so the text length is "
                                   "unknown; this ComfyUI version's Flux is not supported.")
            x, vec = args["img"], args["vec"]
            mod = router.modulation(vec)
            keep = router.keep(x[:, txt_len:], router.text_summary(x[:, :txt_len], mod), mod, self.threshold)
            self._record(options, "single", index, keep)
            if bool(keep.all()):
                return extra["original_block"](args)
            keep_all = torch.cat([keep.new_ones(keep.shape[0], txt_len), keep], dim=1)
            routed = {**args, "transformer_options": {
                **options, "optimized_attention_override":
                    _attention_override(options.get("optimized_attention_override"), keep_all)}}
            slot.active = _SingleCall(keep_all, 3 * self.hidden_size)
            try:
                return extra["original_block"](routed)
            finally:
                slot.active = None
        return replace

    def install(self, model):
        patched = model.clone()
        dm = "diffusion_model"
        for i, slot in enumerate(self.double_slots):
            path = f"{dm}.double_blocks.{i}"
            self.mlps[i] = _view(patched.get_model_object(f"{path}.img_mlp"), _deferred_mlp, slot)
            patched.add_object_patch(f"{path}.img_mlp", self.mlps[i])
            patched.add_object_patch(f"{path}.img_mod", _view(patched.get_model_object(f"{path}.img_mod"),
                                                              _tapped_img_mod, slot))
            patched.add_object_patch(f"{path}.txt_norm2", _view(patched.get_model_object(f"{path}.txt_norm2"),
                                                                _tapped_txt_norm2, slot))
            patched.set_model_patch_replace(self.double(i), "dit", "double_block", i)
        for i, slot in enumerate(self.single_slots):
            path = f"{dm}.single_blocks.{i}"
            patched.add_object_patch(f"{path}.linear1", _view(patched.get_model_object(f"{path}.linear1"),
                                                              _routed_linear1, slot))
            patched.add_object_patch(f"{path}.linear2", _view(patched.get_model_object(f"{path}.linear2"),
                                                              _routed_linear2, slot))
            patched.set_model_patch_replace(self.single(i), "dit", "single_block", i)

        def open_session(guider, sigmas):
            return DyFluxRun(StepClock(sigmas.tolist()), len(self.double_slots), len(self.single_slots),
                             on_close=self.routers.release)
        return patched, open_session


def flux_blocks(model) -> tuple[int, int, int]:
    """(double blocks, single blocks, width) of a ComfyUI Flux model; a clear error for anything else."""
    dm = diffusion_model_of(model)
    if not isinstance(dm, Flux) or not all(isinstance(b, DoubleStreamBlock) for b in dm.double_blocks) or \
            not all(isinstance(b, SingleStreamBlock) for b in dm.single_blocks):
        raise DyFluxError(f"DyFLUX routes the blocks of FLUX models; this model is {type(dm).__name__}. Connect a "
                          "FLUX model (the official router is for flux.1-lite-8B). DyDiT (class-conditional DiT) has "
                          "no ComfyUI model type: it runs through CacheKit's diffusers API.")
    replaced = (model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {}))
    if any(key[0] in _REPLACE_KEYS for key in replaced):
        raise DyFluxError("This model's Flux blocks are already patched (a CacheKit cache such as FORA or ChangeCache, "
                          "another DyFLUX node, or another pack's block patch). Put DyFLUX Token Router first, right "
                          "after the model loader, and caching nodes after it.")
    return len(dm.double_blocks), len(dm.single_blocks), int(dm.params.hidden_size)


def apply_dyflux(model, routers: DyFluxRouters, threshold: float = 0.0, node_id: str | None = None):
    """Patch a clone of `model` (a ComfyUI Flux ModelPatcher) with DyFLUX token routing.
    threshold 0 uses the routers' own (the official 0.5)."""
    if not threshold == threshold or not 0.0 <= threshold < 1.0:       # NaN passes ComfyUI's min/max check
        raise DyFluxError(f"threshold must be in [0, 1) (0 = the router's own), got {threshold}.")
    double, single, width = flux_blocks(model)
    routers.check_model(double, single, width, "this FLUX model")
    patch = DyFluxPatch(routers, threshold if threshold > 0 else routers.threshold, width)
    patched, open_session = patch.install(model)
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, patch.owner,
                                 outer_sample_wrapper(patch.owner, open_session, node_id))
    return patched


def load_router_file(name: str) -> DyFluxRouters:
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise DyFluxError(f"DyFLUX router {name!r} is not in models/{FOLDER}/. Convert the official checkpoint with "
                          "scripts/convert_dyflux.py, put the .safetensors there and refresh.")
    return load_routers(path)


def router_files() -> list[str]:
    return [name for name in folder_paths.get_filename_list(FOLDER) if name.lower().endswith(".safetensors")]


class CacheKitDyFLUX(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folder()
        return io.Schema(
            node_id="CacheKitDyFLUX",
            display_name="DyFLUX Token Router (CacheKit)",
            category=CATEGORY,
            description=("DyFLUX (DyDiT on FLUX): a trained router per block picks the image tokens that need the "
                         "block; the others skip the double blocks' image feed-forward and pass through the single "
                         "blocks unchanged. Needs the FLUX model the router was trained for (official: "
                         f"flux.1-lite-8B) and its router side-car in models/{FOLDER}/ (convert the official "
                         "checkpoint with scripts/convert_dyflux.py)."),
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("router_name", options=router_files(),
                               tooltip=f"A DyFLUX router side-car (.safetensors) in models/{FOLDER}/."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=0.99, step=0.01,
                               tooltip="A token runs where sigmoid(logit) > threshold. 0 uses the router's own "
                                       "(the official 0.5); higher skips more tokens."),
            ],
            outputs=[io.Model.Output(tooltip="The model with DyFLUX token routing.")],
            **PATCH_NODE,
        )

    @classmethod
    def execute(cls, model, router_name, threshold) -> io.NodeOutput:
        routers = load_router_file(router_name)
        return io.NodeOutput(apply_dyflux(model, routers, threshold, _node_id(cls)))
