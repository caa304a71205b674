"""DyFLUX token routing: the official routers, their side-car file, and a run's token record.

Semantics of the official code (alibaba-damo-academy/DyDiT, DyFLUX/flux_models/, eval mode,
token-dynamic mode, the only one released):

* Every FLUX block, double and single, has a `token_selection` router
  (`TokenSelect_baesd_on_x_t_text`): `linear_t` = Linear(C -> 4C) on SiLU(temb) gives
  (shift, scale, shift_text, scale_text); `norm` = its own LayerNorm(C, eps 1e-5, affine);
  per image token  logit = router(norm(x) * (1 + scale) + shift + mean_text), where
  mean_text = mean over the text tokens of norm(text) * (1 + scale_text) + shift_text;
  `router` = Linear(C -> 1). A token is selected when sigmoid(logit) > 0.5.
  temb is FLUX's time + guidance + pooled-text vector (ComfyUI's `vec`).
* Double blocks: the router reads the image and text streams after their attention residuals;
  attention covers every token; only the image feed-forward is skipped for unselected tokens
  (their FF output is 0, so they keep the post-attention value). The text FF always runs.
* Single blocks: the router reads the block input (text = the first text_len tokens). Attention
  runs over all tokens (keys and values of every token); for unselected image tokens the
  block adds nothing (MLP-in, MLP-out and the output projection are skipped): they pass
  through unchanged. Text tokens always run.
* The official model (FLUX.1-lite 8B: 8 double + 38 single blocks) runs the routers in the
  model's dtype; so does CacheKit.

Checkpoint: a DeepSpeed-style `torch.save` dict whose "module" is the diffusers-named state dict,
router keys `{transformer_blocks|single_transformer_blocks}.{i}.token_selection.{linear_t,norm,
router}.{weight,bias}`. It is read with `torch.load(weights_only=True)` (no code from the file
runs) and only the router tensors are kept, in a safetensors side-car:

    tensors   the official key names above, in the checkpoint's dtype
    metadata  format=cachekit-dyflux, version=1, double_blocks, single_blocks, hidden_size,
              threshold, source (free text)

At run time only the side-car is read (safetensors: no code can run).
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..routers.safe_load import RefusedGlobal, UnreadableCheckpoint, load_weights_only
from ..routers.sniff import content_kind, read_sidecar
from ..telemetry import RunTelemetry

FORMAT = "cachekit-dyflux"
VERSION = "1"
THRESHOLD = 0.5                 # the official eval threshold on sigmoid(logit)
NORM_EPS = 1e-5                 # TokenSelect's LayerNorm (nn.LayerNorm default)
KINDS = {"double": "transformer_blocks", "single": "single_transformer_blocks"}    # ours -> official prefix
PARTS = ("linear_t.weight", "linear_t.bias", "norm.weight", "norm.bias", "router.weight", "router.bias")
ALLOWED_GLOBALS = [argparse.Namespace]          # training scripts often save their args next to the weights
_KEY = re.compile(r"^(?:module\.)?(transformer_blocks|single_transformer_blocks)\.(\d+)\.token_selection\."
                  r"(linear_t|norm|router)\.(weight|bias)$")
_CHECKPOINT = "the official DyFLUX checkpoint (transformer_230000.pt from huggingface.co/heisejiasuo/DyFLUX)"
CONVERT = ("convert the official checkpoint with "
           "`python scripts/convert_dyflux.py transformer_230000.pt dyflux.safetensors`")


class DyFluxError(ValueError):
    """A DyFLUX file or router set that cannot be used; the message says what is wrong and the fix."""


# -- one block's router ------------------------------------------------------------------
@dataclass
class BlockRouter:
    """One block's `token_selection`, as plain tensors (official shapes)."""
    linear_t_weight: torch.Tensor       # [4C, C]
    linear_t_bias: torch.Tensor         # [4C]
    norm_weight: torch.Tensor           # [C]
    norm_bias: torch.Tensor             # [C]
    router_weight: torch.Tensor         # [1, C]
    router_bias: torch.Tensor           # [1]
    _cast: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def hidden_size(self) -> int:
        return int(self.norm_weight.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(PARTS, (self.linear_t_weight, self.linear_t_bias, self.norm_weight, self.norm_bias,
                                self.router_weight, self.router_bias)))

    def _weights(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tensors on `like`'s device and in its dtype, made once per (device, dtype)."""
        key = (like.device, like.dtype)
        weights = self._cast.get(key)
        if weights is None:
            weights = tuple(t.to(device=like.device, dtype=like.dtype) for t in self.tensors().values())
            self._cast[key] = weights
        return weights

    def modulation(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(shift, scale, shift_text, scale_text), each [B, 1, C], from temb [B, C] (or [B, 1, C])."""
        w, b = self._weights(vec)[:2]
        vec = vec.reshape(vec.shape[0], -1)
        return tuple(m[:, None, :] for m in F.linear(F.silu(vec), w, b).chunk(4, dim=1))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._weights(x)[2:4]
        return F.layer_norm(x, (x.shape[-1],), w, b, NORM_EPS)

    def text_summary(self, txt: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Mean over the text tokens of the modulated, normalised text: [B, 1, C]."""
        return (self._norm(txt) * (1 + mod[3]) + mod[2]).mean(dim=1, keepdim=True)

    def logits(self, img: torch.Tensor, text: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """One logit per image token: [B, N]."""
        w, b = self._weights(img)[4:6]
        x = self._norm(img) * (1 + mod[1]) + mod[0]
        return F.linear(x + text, w, b).squeeze(-1)

    def keep(self, img: torch.Tensor, text: torch.Tensor, mod: tuple[torch.Tensor, ...],
             threshold: float = THRESHOLD) -> torch.Tensor:
        """bool [B, N]: the image tokens this block computes."""
        return torch.sigmoid(self.logits(img, text, mod)) > threshold


# -- the set of routers --------------------------------------------------------------------
@dataclass
class DyFluxRouters:
    double: list[BlockRouter]
    single: list[BlockRouter]
    threshold: float = THRESHOLD
    source: str = ""

    @property
    def hidden_size(self) -> int:
        return (self.double or self.single)[0].hidden_size

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for kind, routers in (("double", self.double), ("single", self.single)):
            for i, router in enumerate(routers):
                for part, tensor in router.tensors().items():
                    state[f"{KINDS[kind]}.{i}.token_selection.{part}"] = tensor
        return state

    def release(self) -> None:
        """Drop the device / dtype copies made while sampling (the file's tensors stay)."""
        for router in (*self.double, *self.single):
            router._cast.clear()

    def describe(self) -> str:
        return f"{len(self.double)} double + {len(self.single)} single blocks of width {self.hidden_size}"

    def check_model(self, double_blocks: int, single_blocks: int, hidden_size: int, model: str = "this model") -> None:
        """Refuse a router set made for another FLUX (block counts or width)."""
        if hidden_size != self.hidden_size:
            raise DyFluxError(f"This DyFLUX router is for FLUX models of width {self.hidden_size}; {model} has width "
                              f"{hidden_size}. Load the FLUX model the router was trained for (the official DyFLUX "
                              "router: Freepik flux.1-lite-8B).")
        if (double_blocks, single_blocks) != (len(self.double), len(self.single)):
            raise DyFluxError(f"This DyFLUX router has {len(self.double)} double and {len(self.single)} single blocks; "
                              f"{model} has {double_blocks} double and {single_blocks} single blocks. Routers only "
                              "fit the model they were trained for: the official DyFLUX router is for flux.1-lite-8B "
                              "(8 double + 38 single), not FLUX.1 dev or schnell (19 + 38).")


def routers_from_state(state: dict[str, torch.Tensor], source: str = "", threshold: float = THRESHOLD,
                       name: str = "the file") -> DyFluxRouters:
    """Routers from official-named tensors (anything else in `state` is ignored); checks completeness and shapes."""
    found: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _KEY.match(key)
        if m is None:
            continue
        kind = "double" if m.group(1) == KINDS["double"] else "single"
        found.setdefault((kind, int(m.group(2))), {})[f"{m.group(3)}.{m.group(4)}"] = value
    if not found:
        hint = ""
        if any(re.match(r"^(?:module\.)?blocks\.\d+\.token_selection\.mlp_head", k) for k in state):
            hint = (" It is a DyDiT (class-conditional DiT) checkpoint: ComfyUI has no class-conditional DiT model "
                    "type, so DyDiT runs through CacheKit's diffusers API.")
        raise DyFluxError(f"{name} holds no DyFLUX token routers (no '{KINDS['double']}.N.token_selection.*' or "
                          f"'{KINDS['single']}.N.token_selection.*' tensors): it is not a DyFLUX checkpoint.{hint} "
                          f"Use {_CHECKPOINT}.")
    blocks: dict[str, list[BlockRouter]] = {"double": [], "single": []}
    width = None
    for kind in ("double", "single"):
        indices = sorted(i for k, i in found if k == kind)
        if indices != list(range(len(indices))):
            missing = sorted(set(range(max(indices, default=-1) + 1)) - set(indices))
            raise DyFluxError(f"{name} is incomplete: {KINDS[kind]} routers {missing} are missing. Convert the whole "
                              f"checkpoint again ({_CHECKPOINT}).")
        for i in indices:
            parts = found[(kind, i)]
            absent = [p for p in PARTS if p not in parts]
            if absent:
                raise DyFluxError(f"{name} is incomplete: {KINDS[kind]}.{i}.token_selection lacks {', '.join(absent)}.")
            c = int(parts["norm.weight"].shape[0]) if parts["norm.weight"].dim() == 1 else -1
            expected = {"linear_t.weight": (4 * c, c), "linear_t.bias": (4 * c,), "norm.weight": (c,),
                        "norm.bias": (c,), "router.weight": (1, c), "router.bias": (1,)}
            for part, shape in expected.items():
                if tuple(parts[part].shape) != shape or not parts[part].is_floating_point():
                    raise DyFluxError(f"{name}: {KINDS[kind]}.{i}.token_selection.{part} has shape "
                                      f"{tuple(parts[part].shape)} ({parts[part].dtype}), expected {shape} (float) "
                                      f"for width {c}: not a DyFLUX router.")
            if width is not None and c != width:
                raise DyFluxError(f"{name}: {KINDS[kind]}.{i} has width {c}, other blocks {width}: not one model's "
                                  "routers.")
            width = c
            blocks[kind].append(BlockRouter(*(parts[p].detach().cpu().contiguous() for p in PARTS)))
    return DyFluxRouters(blocks["double"], blocks["single"], float(threshold), source)


# -- the official checkpoint ---------------------------------------------------------------
def read_official(path: str | Path) -> DyFluxRouters:
    """The routers of an official DyFLUX checkpoint (.pt), read with weights_only=True and an allow-list."""
    path = Path(path)
    if not path.is_file():
        raise DyFluxError(f"DyFLUX checkpoint not found: {path}")
    kind = content_kind(path)
    if kind == "safetensors":
        raise DyFluxError(f"{path.name} is a safetensors file, not the official DyFLUX .pt checkpoint: if it is a "
                          "CacheKit DyFLUX side-car, it is already converted; put it in models/cachekit_routers/.")
    if kind in ("empty", "text"):
        raise DyFluxError(f"{path.name} is {'empty' if kind == 'empty' else 'a text file'}, not {_CHECKPOINT}.")
    data = _torch_load(path)
    state = None
    if isinstance(data, dict):
        # DeepSpeed / the official training script: "module"; a DyDiT train.py checkpoint: "ema" (named in the error)
        state = data["module"] if "module" in data else data["ema"] if isinstance(data.get("ema"), dict) else data
    if not isinstance(state, dict):
        raise DyFluxError(f"{path.name} holds a {type(data).__name__}, not a state dict: it is not {_CHECKPOINT}.")
    return routers_from_state(state, source=path.name, name=path.name)


def _torch_load(path: Path):
    try:
        # mmap: the official file holds the whole 8B transformer; only the router tensors are read.
        return load_weights_only(path, ALLOWED_GLOBALS, mmap=True)
    except RefusedGlobal as refused:
        raise DyFluxError(f"{path.name} was refused: it asks to build {refused.name}, and only tensors, plain "
                          f"containers and {', '.join(c.__name__ for c in ALLOWED_GLOBALS)} are allowed. CacheKit "
                          f"never runs code from a file; use {_CHECKPOINT}.") from refused
    except UnreadableCheckpoint as error:
        raise DyFluxError(f"{path.name} is not a readable PyTorch checkpoint: it is damaged (truncated?) or not "
                          f"{_CHECKPOINT}.") from error


def convert_official(source: str | Path, output: str | Path) -> DyFluxRouters:
    routers = read_official(source)
    save_routers(routers, output)
    return routers


# -- the side-car --------------------------------------------------------------------------
def save_routers(routers: DyFluxRouters, path: str | Path) -> Path:
    from safetensors.torch import save_file
    path = Path(path)
    metadata = {"format": FORMAT, "version": VERSION, "double_blocks": str(len(routers.double)),
                "single_blocks": str(len(routers.single)), "hidden_size": str(routers.hidden_size),
                "threshold": repr(routers.threshold), "source": routers.source}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in routers.state_dict().items()}, str(path), metadata=metadata)
    return path


_OTHER_FORMATS = {
    "cachekit-router": "a Learning-to-Cache / HarmoniCa step router: use the Learned Router (CacheKit) node",
    "cachekit-dydit": ("a DyDiT router side-car (class-conditional DiT): ComfyUI has no class-conditional DiT model "
                       "type, so DyDiT runs through CacheKit's diffusers API"),
}


def load_routers(path: str | Path) -> DyFluxRouters:
    """A DyFLUX side-car (safetensors only), checked for completeness and shapes."""
    path = Path(path)
    metadata, state = read_sidecar(path, DyFluxError, "CacheKit DyFLUX side-car", CONVERT, keep=_KEY.match)
    fmt = metadata.get("format")
    if fmt != FORMAT:
        what = _OTHER_FORMATS.get(fmt)
        if what:
            raise DyFluxError(f"{path.name} is {what}, not a DyFLUX token router.")
        raise DyFluxError(f"{path.name} is not a CacheKit DyFLUX side-car (its metadata has format={fmt!r}, expected "
                          f"{FORMAT!r}): {CONVERT}.")
    if metadata.get("version") != VERSION:
        raise DyFluxError(f"{path.name} is DyFLUX side-car version {metadata.get('version')!r}; this CacheKit reads "
                          f"version {VERSION}: update CacheKit or convert the checkpoint again.")
    try:
        threshold = float(metadata.get("threshold", THRESHOLD))
    except ValueError:
        threshold = float("nan")
    if not 0.0 < threshold < 1.0:
        raise DyFluxError(f"{path.name} has threshold {metadata.get('threshold')!r}; it must lie in (0, 1).")
    routers = routers_from_state(state, source=metadata.get("source", ""), threshold=threshold, name=path.name)
    declared = (metadata.get("double_blocks"), metadata.get("single_blocks"), metadata.get("hidden_size"))
    actual = (str(len(routers.double)), str(len(routers.single)), str(routers.hidden_size))
    if declared != actual:
        raise DyFluxError(f"{path.name} declares {declared[0]} double + {declared[1]} single blocks of width "
                          f"{declared[2]} but holds {routers.describe()}: the file is damaged; {CONVERT}.")
    return routers


# -- what a run did ------------------------------------------------------------------------
class DyFluxRun:
    """One sampling run's token record, as CacheKit's run telemetry: one unit per block;
    computed[step][block] = image tokens the block computed (summed over rows and calls),
    reused[step][block] = image tokens it let pass (so the hit rate is the skipped share)."""

    def __init__(self, clock, double_blocks: int, single_blocks: int, family: str = "flux", on_close=None):
        names = ([f"double_blocks.{i}" for i in range(double_blocks)]
                 + [f"single_blocks.{i}" for i in range(single_blocks)])
        self.clock = clock
        self.telemetry = RunTelemetry(method="DyFLUX", family=family, unit_names=names, unit_groups=list(names),
                                      num_steps=clock.num_steps)
        self.double_blocks = double_blocks
        self._on_close = on_close

    def note_call(self, samples: int) -> None:
        self.telemetry.model_calls += 1
        self.telemetry.model_call_samples += samples

    def note_block(self, sigma: float | None, kind: str, index: int, keep: torch.Tensor) -> None:
        step = self.clock.step_of(sigma)
        unit = index if kind == "double" else self.double_blocks + index
        kept = int(keep.sum())
        self.telemetry.computed[step][unit] += kept
        self.telemetry.reused[step][unit] += keep.numel() - kept

    def kept_share(self) -> list[list[float | None]]:
        """[step][block] share of image tokens computed (None where the block did not run)."""
        t = self.telemetry
        return [[c / (c + r) if c + r else None for c, r in zip(cc, rr)] for cc, rr in zip(t.computed, t.reused)]

    def close(self) -> RunTelemetry:
        if self._on_close is not None:
            self._on_close()
        self.telemetry.finish()
        return self.telemetry
