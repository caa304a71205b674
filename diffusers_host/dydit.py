"""DyDiT on a diffusers DiT: run only the heads, MLP groups and tokens the routers keep.

    import cachekit
    handle = cachekit.apply_dydit(pipe, "dydit_routers.safetensors")   # or a DyDiTRouters
    image = pipe(class_labels=[207], num_inference_steps=50).images[0]
    print(handle.telemetry.summary())
    handle.remove()                                                     # the model is as before

How it attaches (submodules only; the transformer's and the blocks' forwards are diffusers'):

* a forward hook on block 0's timestep embedder reads the timestep embedding once per call
  (the official routers' input) and computes every block's head and MLP-group masks at once;
* each block's self-attention gets an attention processor that runs the kept heads only: q/k/v
  rows and output-projection columns of those heads, sliced once per distinct mask and kept in
  a bounded LRU (core/dydit/slicing.py);
* a pre-hook on the block's FF norm (`norm3`; the official `norm2`) keeps the residual stream
  after the attention residual, which the token router reads;
* the FF's first layer (`ff.net[0]`, fc1 + GELU) and last (`ff.net[2]`, fc2) get an instance
  forward: fc1 gathers the kept tokens (core/dydit/tokens.py) and runs the kept groups' rows,
  fc2 the kept groups' columns and scatters back; unselected tokens' MLP output is 0, so after
  the adaLN gate and the residual add they pass unchanged, as in the official code.

When every gate of a sub-layer is on, it runs diffusers' own code (the original processor and
forwards): with all gates on the output is bit-identical to the unpatched model.

Rows with different timesteps may have different width masks in a block; that block then runs
masked, as the official code does (why: core/dydit/widths.py). Tokens are per row anyway: the
kept tokens of all rows are flattened into one sequence (core/dydit/tokens.py).

Stacking: FORA (apply_fora) proxies the same attention and FF modules; a unit it reuses runs
nothing (so DyDiT counts nothing for it), a unit it computes runs through the processor and FF
layers above, sliced. Step skipping (apply_adaptive_skip) wraps the model's forward: a skipped
step runs no block, and DyDiT's telemetry lists it in `skipped_steps`.

Official checkpoints: diffusers' DiT is not numerically the official DiT (timestep embedding
with downscale_freq_shift=1 instead of 0; FF norm eps 1e-5 instead of 1e-6). A converted DyDiT
(`dit_from_official`, scripts/convert_dydit.py) is built with norm_eps=1e-6 and gets the
official embedding (`use_official_timestep_embedding`); apply_dydit refuses routers trained on
the official embedding for a model that does not compute it.
"""
from __future__ import annotations

import copy
import functools
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core.dydit.routers import DyDiTRouters
from ..core.dydit.sidecar import load_routers
from ..core.dydit.slicing import SliceCache, attention, channels, columns, fused_qkv, rows, signature
from ..core.dydit.telemetry import BlockGeometry, DyDiTRun, DyDiTTelemetry
from ..core.dydit.tokens import gather_kept, scatter_kept
from ..core.dydit.widths import Width, widths_from_gates
from ..core.lifecycle import RunLifecycle
from . import attach
from .api import RunRecorder, StepTracker, _resolve, call_timestep

DYDIT_ATTR = "_cachekit_dydit"
_OWNER_IDS = itertools.count()
_PLAIN_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")


# -- per call ---------------------------------------------------------------------------------
@dataclass
class DyDiTCall:
    step: int
    samples: int
    heads: list[Width] | None = None         # per block; None until the timestep embedding is seen
    groups: list[Width] | None = None
    residual: dict[int, torch.Tensor] = field(default_factory=dict)   # block -> residual stream (token router input)
    pending: dict[int, tuple] = field(default_factory=dict)           # block -> what fc1 left for fc2
    masked: bool = False


# -- the attention processor ------------------------------------------------------------------
class SlicedAttnProcessor:
    """Runs the kept heads of one block's self-attention; the original processor when all are on.

    Copies of the model (deepcopy, pickle) get the original processor: a copy is plain."""

    def __init__(self, handle: "DyDiTHandle", block: int, original: Any):
        self.handle = handle
        self.block = block
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        call = self.handle.current
        width = call.heads[self.block] if call is not None and call.heads is not None else None
        if width is None or width.full:
            if width is not None:
                self.handle.note_attention(call, self.block, hidden_states, width, masked=False)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise RuntimeError("DyDiT slices self-attention over [batch, tokens, channels] without a mask or "
                               "encoder states; this call passed them. Remove DyDiT (handle.remove()) for this model.")
        head_dim = attn.to_q.out_features // attn.heads
        sources = (attn.to_q.weight, attn.to_q.bias, attn.to_k.weight, attn.to_k.bias, attn.to_v.weight,
                   attn.to_v.bias, attn.to_out[0].weight)
        kept = width.kept                     # None: rows differ, run every head and mask per row

        def build():
            index = channels(kept, head_dim, hidden_states.device) if kept is not None else None
            w_qkv, b_qkv = fused_qkv([(attn.to_q.weight, attn.to_q.bias), (attn.to_k.weight, attn.to_k.bias),
                                      (attn.to_v.weight, attn.to_v.bias)], index)
            w_out = columns(attn.to_out[0].weight, index) if index is not None else attn.to_out[0].weight
            return w_qkv, b_qkv, w_out

        w_qkv, b_qkv, w_out = self.handle.slices.get((self.block, "attn"), (kept, signature(*sources)), build)
        mask = None
        if kept is None:
            mask = width.row_mask.repeat_interleave(head_dim, dim=1)
        out = attention(hidden_states, w_qkv, b_qkv, w_out, attn.to_out[0].bias, head_dim, mask)
        self.handle.note_attention(call, self.block, hidden_states, width, masked=kept is None)
        return attn.to_out[1](out)

    def __deepcopy__(self, memo):
        return copy.deepcopy(self.original, memo)

    def __reduce_ex__(self, protocol):
        # Unpickles as (a copy of) the original processor: needs no CacheKit, joins no handle.
        return copy.copy, (self.original,)


# -- the handle -------------------------------------------------------------------------------
class DyDiTHandle(RunRecorder):
    """DyDiT applied to one diffusers DiT. `remove()` restores the model exactly."""

    def __init__(self, model: torch.nn.Module, routers: DyDiTRouters, *, width: bool, tokens: bool,
                 slice_cache: int, scheduler: Any, num_inference_steps: int | None, width_start_percent: float = 0.0):
        self.model = model
        self.routers = routers
        self.width = width
        self.tokens = tokens
        self.width_start_percent = width_start_percent
        self._width_from = 0                 # this run's first step with routed width (see width_start_percent)
        self.slices = SliceCache(slice_cache)
        self.owner = f"cachekit-dydit-{next(_OWNER_IDS)}"
        self.current: DyDiTCall | None = None
        self._tracker = StepTracker(scheduler, num_inference_steps)
        self.lifecycle = RunLifecycle(self.owner, self._new_run)
        self._routers_by_kind: dict[tuple, DyDiTRouters] = {}
        blocks = list(model.transformer_blocks)
        attn = blocks[0].attn1
        shape = routers.shape
        self.geometry = BlockGeometry(hidden=shape.hidden, heads=shape.heads,
                                      head_dim=attn.to_q.out_features // attn.heads, mlp_groups=shape.mlp_groups,
                                      group_width=blocks[0].ff.net[2].in_features // shape.mlp_groups,
                                      token_hidden=shape.token_hidden)
        self._hooks = []
        self._leaves: list[tuple[torch.nn.Module, Any]] = []
        self._copy_tokens: list[tuple[torch.nn.Module, Any]] = []
        self._fc2_layers = [block.ff.net[2] for block in blocks]      # fc1's slices are built with fc2's
        self._processors: list[tuple[int, Any, SlicedAttnProcessor]] = []
        try:
            self._attach(blocks)
        except BaseException:
            self._detach()
            raise
        setattr(model, DYDIT_ATTR, self)
        self._copy_token = attach.exclude_from_copies(model, attrs=(DYDIT_ATTR,), hooks=self._root_hooks)

    # -- attach / detach --
    def _attach(self, blocks: list[torch.nn.Module]) -> None:
        model = self.model
        self._root_hooks = [
            model.register_forward_pre_hook(attach.compile_safe(self._before_call), with_kwargs=True),
            model.register_forward_hook(attach.compile_safe(self._after_call), with_kwargs=True, always_call=True),
        ]
        self._hooks += self._root_hooks
        embedder = blocks[0].norm1.emb.timestep_embedder
        self._hook(embedder, embedder.register_forward_hook(self._on_timestep_embedding))
        for i, block in enumerate(blocks):
            original = block.attn1.processor
            processor = SlicedAttnProcessor(self, i, original)
            block.attn1.set_processor(processor)
            self._processors.append((i, original, processor))
            self._hook(block.norm3, block.norm3.register_forward_pre_hook(functools.partial(self._keep_residual, i)))
            fc1, fc2 = block.ff.net[0], block.ff.net[2]
            for leaf, run in ((fc1, self._fc1), (fc2, self._fc2)):
                forward = functools.partial(run, i, leaf)
                leaf.forward = forward
                self._leaves.append((leaf, forward))
                self._copy_tokens.append((leaf, attach.exclude_from_copies(leaf, forward=forward)))

    def _hook(self, module: torch.nn.Module, hook: Any) -> None:
        """A hook on a submodule; copies of the model (deepcopy, pickle) are made without it."""
        self._hooks.append(hook)
        self._copy_tokens.append((module, attach.exclude_from_copies(module, hooks=[hook])))

    def _detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        blocks = list(self.model.transformer_blocks)
        for i, original, processor in self._processors:
            attn = blocks[i].attn1              # the module in the tree now (a FORA proxy writes through)
            if attn.processor is processor:     # a processor the user set while patched stays
                attn.set_processor(original)
        self._processors = []
        for leaf, forward in self._leaves:
            if leaf.__dict__.get("forward") is forward:
                del leaf.__dict__["forward"]
        self._leaves = []
        for module, token in self._copy_tokens:
            attach.include_again(module, token)
        self._copy_tokens = []

    def remove(self) -> None:
        self.finish_run()
        self._detach()
        self.slices.clear()
        if getattr(self.model, DYDIT_ATTR, None) is self:
            delattr(self.model, DYDIT_ATTR)
        attach.include_again(self.model, self._copy_token)

    # -- runs and calls --
    def _new_run(self) -> DyDiTRun:
        depth = len(self.model.transformer_blocks)
        names = [f"transformer_blocks.{i}.{part}" for i in range(depth) for part in ("attn1", "ff")]
        groups = [f"transformer_blocks.{i}" for i in range(depth) for _ in range(2)]
        telemetry = DyDiTTelemetry(method="DyDiT", family=f"diffusers-{type(self.model).__name__}", unit_names=names,
                                   unit_groups=groups, num_steps=self._tracker.num_steps, geometry=self.geometry,
                                   depth=depth)
        return DyDiTRun(telemetry)

    def _before_call(self, module, args, kwargs):
        new_run, step, _ = self._tracker.locate(call_timestep(args, kwargs), self.session is not None)
        if new_run:
            self.lifecycle.open()
            routed = self._tracker.window(self.width_start_percent, 1.0)
            # An empty window (width_start_percent 1) routes no step: its start would be the run's first.
            self._width_from = routed.start if routed else self._tracker.num_steps
        x = args[0] if args else kwargs.get("hidden_states")
        self.current = DyDiTCall(step, x.shape[0] if isinstance(x, torch.Tensor) else 1)
        self._started = time.perf_counter()
        self._builds = self.slices.builds
        return None

    def _after_call(self, module, args, kwargs, output):
        call, self.current = self.current, None
        run = self.session
        if call is None or run is None:
            return None
        telemetry = run.telemetry
        if call.heads is None:              # no block ran: a step skip reused the whole prediction
            telemetry.note_skipped(call.step)
        telemetry.add_time(call.step, time.perf_counter() - self._started)
        telemetry.model_calls += 1
        telemetry.model_call_samples += call.samples
        telemetry.masked_calls += int(call.masked)
        telemetry.slice_builds += self.slices.builds - self._builds
        telemetry.note_cache_bytes(self.slices.nbytes)
        return None

    def _routers_like(self, x: torch.Tensor) -> DyDiTRouters:
        """The routers on x's device and dtype (the official model runs them in its own dtype)."""
        key = (x.device, x.dtype)
        routers = self._routers_by_kind.get(key)
        if routers is None:
            weight = self.routers.blocks[0].attn_rate.router.weight
            same = (weight.device, weight.dtype) == key
            routers = self.routers if same else copy.deepcopy(self.routers).to(device=x.device, dtype=x.dtype)
            self._routers_by_kind[key] = routers
        return routers

    def _on_timestep_embedding(self, module, args, t_emb):
        call = self.current
        if call is None or call.heads is not None:      # the final layer embeds again: masks are per call
            return None
        depth = len(self.routers.blocks)
        if t_emb.shape[0] == 1 and call.samples > 1:     # one timestep for the batch: one row per sample
            t_emb = t_emb.expand(call.samples, -1)
        if self.width and call.step >= self._width_from:
            with torch.no_grad():
                heads, groups = self._routers_like(t_emb).width_gates(t_emb)
            call.heads, call.groups = widths_from_gates(heads), widths_from_gates(groups)
            call.masked = any(w.row_mask is not None for w in call.heads + call.groups)
        else:
            samples = t_emb.shape[0]
            call.heads = [Width.all_on(self.geometry.heads, samples)] * depth
            call.groups = [Width.all_on(self.geometry.mlp_groups, samples)] * depth
        return None

    def _keep_residual(self, block: int, module, args):
        call = self.current
        if call is not None and call.heads is not None:
            call.residual[block] = args[0]
        return None

    # -- the MLP: fc1 (+ GELU) on the kept tokens and groups, fc2 back --
    def _fc1(self, block: int, leaf: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        call = self.current
        residual = call.residual.pop(block, None) if call is not None else None
        if call is None or call.groups is None or residual is None:
            return type(leaf).forward(leaf, hidden)
        width = call.groups[block]
        keep, kept_tokens = None, hidden.shape[0] * hidden.shape[1]
        if self.tokens:
            with torch.no_grad():
                keep = self._routers_like(residual).token_keep(block, residual)
            kept_tokens = int(keep.sum())
            if kept_tokens == keep.numel():
                keep = None
        self.note_mlp(call, block, hidden, width, kept_tokens, masked=width.row_mask is not None)
        if width.full and keep is None:
            return type(leaf).forward(leaf, hidden)
        x = gather_kept(hidden, keep) if keep is not None else hidden
        weights = None
        if width.kept is not None:
            fc1, fc2 = leaf.proj, self._fc2_layers[block]
            group = fc2.in_features // self.geometry.mlp_groups

            def build():
                index = channels(width.kept, group, hidden.device)
                return (*rows(fc1.weight, fc1.bias, index), columns(fc2.weight, index))

            weights = self.slices.get((block, "mlp"), (width.kept, signature(fc1.weight, fc1.bias, fc2.weight)), build)
            h = F.linear(x, weights[0], weights[1])
        else:
            h = leaf.proj(x)
            if width.row_mask is not None:       # rows differ: mask each token by its row's groups
                group = h.shape[-1] // width.row_mask.shape[1]
                mask = width.row_mask.repeat_interleave(group, dim=1)
                if keep is not None:
                    mask = mask[keep.nonzero(as_tuple=True)[0]].unsqueeze(0)
                else:
                    mask = mask[:, None, :]
                h = h * mask.to(h.dtype)
        call.pending[block] = (keep, weights)
        return leaf.gelu(h)

    def _fc2(self, block: int, leaf: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        call = self.current
        pending = call.pending.pop(block, None) if call is not None else None
        if pending is None:
            return type(leaf).forward(leaf, h)
        keep, weights = pending
        y = F.linear(h, weights[2], leaf.bias) if weights is not None else type(leaf).forward(leaf, h)
        return scatter_kept(y, keep) if keep is not None else y

    # -- telemetry --
    def note_attention(self, call: DyDiTCall, block: int, x: torch.Tensor, width: Width, masked: bool) -> None:
        run = self.session
        if run is not None:
            run.telemetry.note_attention(call.step, block, x.shape[0], x.shape[1], width.counts, masked)

    def note_mlp(self, call: DyDiTCall, block: int, x: torch.Tensor, width: Width, kept: int, masked: bool) -> None:
        run = self.session
        if run is not None:
            run.telemetry.note_mlp(call.step, block, x.shape[0], x.shape[1], width.counts, kept, masked, self.tokens)


# -- applying ---------------------------------------------------------------------------------
OFFICIAL_EPS = 1e-6          # the official DiT's LayerNorms (diffusers' DiT FF norm defaults to 1e-5)


def apply_dydit(target: Any, routers: DyDiTRouters | str | Path, *, width: bool = True, tokens: bool = True,
                slice_cache: int = 2, scheduler: Any = None, num_inference_steps: int | None = None,
                width_start_percent: float = 0.0) -> DyDiTHandle:
    """DyDiT on a diffusers DiTTransformer2DModel (or a pipeline holding one).

    routers: a DyDiTRouters or the path of a router side-car (.safetensors, from
    scripts/convert_dydit.py). width / tokens: run the width routers (heads, MLP groups) and the
    token routers (False: that part stays full, for ablations). slice_cache: sliced weight sets
    kept per block and sub-layer (least recently used dropped; their memory is
    `telemetry.cache_bytes`). The scheduler (or num_inference_steps) places each call in a step
    (telemetry, width_start_percent): DyDiT's masks depend on the timestep alone.

    width_start_percent: the width routers act from this fraction of the steps on; the steps
    before it run every head and MLP group (the token routers still act). 0 is the official
    DyDiT. Why: on the bundled tiny DyDiT the few heads and groups its routers keep at the
    noisiest steps are where the class is lost; 0.08 (2 of 25 steps at full width) keeps the
    dense DiT's class accuracy (6.9 points below it without) for 3 % of the dense FLOPs
    (1.55x -> 1.49x at batch 8; bench/results/dydit.md)."""
    if not 0.0 <= width_start_percent <= 1.0:
        raise ValueError(f"width_start_percent must be in [0, 1] (a fraction of the sampling steps); got "
                         f"{width_start_percent}. 0 runs the official DyDiT from the first step.")
    model, scheduler = _resolve(target, scheduler)
    if not isinstance(routers, DyDiTRouters):
        routers = load_routers(routers)
    if getattr(model, DYDIT_ATTR, None) is not None:
        raise ValueError("This model already has DyDiT applied; call remove() on its handle first.")
    check_dydit_model(model, routers)
    return DyDiTHandle(model, routers.eval(), width=width, tokens=tokens, slice_cache=slice_cache, scheduler=scheduler,
                       num_inference_steps=num_inference_steps, width_start_percent=width_start_percent)


def check_dydit_model(model: torch.nn.Module, routers: DyDiTRouters) -> None:
    """Refuse, with the reason and the fix, a model DyDiT cannot run exactly with these routers."""
    name = type(model).__name__
    if name != "DiTTransformer2DModel":
        raise ValueError(f"DyDiT runs on class-conditional DiTs (diffusers DiTTransformer2DModel); got {name}. "
                         "Other transformers have no DyDiT routers.")
    blocks = list(model.transformer_blocks)
    attn = blocks[0].attn1
    found = (f"depth {len(blocks)}, {attn.heads} heads, hidden {attn.to_q.in_features}, "
             f"MLP {blocks[0].ff.net[2].in_features}")
    shape = routers.shape
    if (shape.depth, shape.heads, shape.hidden) != (len(blocks), attn.heads, attn.to_q.in_features) or \
            blocks[0].ff.net[2].in_features % shape.mlp_groups:
        raise ValueError(f"These DyDiT routers are for a DiT with {shape.describe()}; this model has {found}. "
                         "Use the routers converted with this model's checkpoint.")
    for i, block in enumerate(blocks):
        where = f"transformer_blocks.{i}"
        a = block.attn1
        if type(a.processor).__name__ not in _PLAIN_PROCESSORS:
            raise ValueError(f"{where}.attn1 has the attention processor {type(a.processor).__name__}; DyDiT replaces "
                             f"the processor and only knows {', '.join(_PLAIN_PROCESSORS)}. Reset it with "
                             "model.set_default_attn_processor() (or remove the tool that set it) first.")
        unusual = [n for n in ("spatial_norm", "group_norm", "norm_q", "norm_k") if getattr(a, n, None) is not None]
        if unusual or a.residual_connection or a.rescale_output_factor != 1.0 or a.is_cross_attention:
            raise ValueError(f"{where}.attn1 is not a plain DiT self-attention "
                             f"({unusual or 'residual / rescale / cross-attention'}); DyDiT cannot slice it.")
        net = block.ff.net
        if block.attn2 is not None or block.norm3 is None or type(net[0]).__name__ != "GELU" or \
                not isinstance(net[2], torch.nn.Linear):
            raise ValueError(f"{where} is not a DiT block (self-attention, then a GELU MLP after norm3); DyDiT "
                             "cannot run on it.")
        if getattr(block, "_chunk_size", None) is not None:
            raise ValueError(f"{where} runs its feed-forward in chunks; DyDiT routes whole token sets. Call "
                             "model.disable_forward_chunking() first.")
        for leaf, label in ((net[0], "ff.net.0"), (net[2], "ff.net.2")):
            if "forward" in leaf.__dict__:
                raise ValueError(f"{where}.{label} already has an instance forward (an offloading or other hook); "
                                 "DyDiT patches that layer's forward. Remove the hook (or load the model on one "
                                 "device) first.")
    if routers.embedding == "official" and not official_numerics(model):
        raise ValueError("These routers were trained on the official DiT's timestep embedding, and this model "
                         "computes diffusers' (downscale_freq_shift=1, FF norm eps 1e-5): about 1 in 6 width "
                         "decisions would flip. Build the model with dit_from_official / load_dydit, or call "
                         "cachekit.use_official_timestep_embedding(model) on a converted model.")


def official_numerics(model: torch.nn.Module) -> bool:
    """Does this DiT compute the official DiT's timestep embedding and norms?"""
    return all(block.norm1.emb.time_proj.downscale_freq_shift == 0 and block.norm3.eps == OFFICIAL_EPS
               for block in model.transformer_blocks)


def use_official_timestep_embedding(model: torch.nn.Module) -> torch.nn.Module:
    """Make a converted official DiT compute the official timestep embedding (frequencies over
    half the channels, not half - 1). diffusers has no config entry for it, so it is set on the
    embedding modules after loading; the FF norm's eps comes from the config (norm_eps=1e-6)."""
    if any(block.norm3.eps != OFFICIAL_EPS for block in model.transformer_blocks):
        raise ValueError(f"This DiT's FF norm eps is {model.transformer_blocks[0].norm3.eps}, the official DiT's is "
                         f"{OFFICIAL_EPS}: load it with the config of the conversion (norm_eps={OFFICIAL_EPS}).")
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model


# -- official checkpoints ---------------------------------------------------------------------
ROUTERS_FILE = "dydit_routers.safetensors"
TRANSFORMER_DIR = "transformer"


def dit_from_official(checkpoint: Any) -> tuple[torch.nn.Module, DyDiTRouters]:
    """An official DyDiT checkpoint (.pt path, or core.dydit.official.OfficialDyDiT) as a diffusers
    DiTTransformer2DModel with the official numerics, and its routers (fp32, CPU, eval)."""
    from diffusers import DiTTransformer2DModel

    from ..core.dydit.official import OfficialDyDiT, load_official
    from ..core.dydit.sidecar import DyDiTFileError, check_state
    official = checkpoint if isinstance(checkpoint, OfficialDyDiT) else load_official(checkpoint)
    model = DiTTransformer2DModel(**official.config)
    model.load_state_dict(official.transformer, strict=True)
    computed = model.pos_embed.pos_embed
    if official.pos_embed is not None and (official.pos_embed.shape != computed.shape or
                                           float((official.pos_embed - computed).abs().max()) > 1e-5):
        raise DyDiTFileError(f"{official.source}: its pos_embed is not the fixed sin-cos table DiT uses (diffusers "
                             "computes that table and cannot load another); the checkpoint is not a standard DyDiT.")
    use_official_timestep_embedding(model)
    routers = DyDiTRouters(official.shape, "official")
    check_state(routers, official.routers, official.source)
    routers.load_state_dict(official.routers)
    return model.eval().requires_grad_(False), routers.eval().requires_grad_(False)


def save_dydit(model: torch.nn.Module, routers: DyDiTRouters, directory: str | Path, source: str = "") -> Path:
    """A converted DyDiT as a folder: transformer/ (diffusers save_pretrained) + the router side-car."""
    from ..core.dydit.sidecar import save_routers
    directory = Path(directory)
    model.save_pretrained(str(directory / TRANSFORMER_DIR))
    save_routers(routers, directory / ROUTERS_FILE, source)
    return directory


def load_dydit(directory: str | Path) -> tuple[torch.nn.Module, DyDiTRouters]:
    """A folder written by save_dydit (or scripts/convert_dydit.py): the DiT with the numerics its
    routers were trained on, and the routers."""
    from diffusers import DiTTransformer2DModel
    directory = Path(directory)
    routers = load_routers(directory / ROUTERS_FILE)
    model = DiTTransformer2DModel.from_pretrained(str(directory / TRANSFORMER_DIR))
    if routers.embedding == "official":
        use_official_timestep_embedding(model)
    return model.eval(), routers
