"""Fine-tune the bundled tiny DiT into a DyDiT on CPU (our own weights: nothing official is shipped).

    python scripts/train_dydit.py --lam 0.5 --minutes 50            # or --iterations N
    python scripts/train_dydit.py --lam 0.5 --minutes 20 --resume   # 20 more minutes from the checkpoint

The objective is the official one (alibaba-damo-academy/DyDiT, `train.py`, `loss.py`,
`dynamic_model.py`), learnt from the code, applied to the diffusers DiT:

* loss = diffusion loss of the dynamic model (width and token gates on)
       + diffusion loss of the complete model (the same weights, every head / group / token)
       + 2 * (FLOPs ratio - lambda)^2,
  the FLOPs ratio being the batch mean of each sample's blocks' executed share: per block,
  attention FLOPs x active heads / heads plus MLP FLOPs x active groups / groups x kept tokens /
  tokens (the official `DynamicLoss`; FLOPs per block from core/dydit/telemetry.BlockGeometry).
* gates are Gumbel-sigmoid (temperature 5, the official Router / TokenSelect default) made
  binary by a straight-through estimator: the forward sees 0/1 (as inference does), the
  backward the soft sigmoid's gradient. In eval a gate is on when sigmoid(logit) > 0.5.
* routers start with every gate on, as the official init: Xavier weights, width-router biases
  15 and token-router output bias 35; lambda warms up linearly from 1 (the official `--warmup`,
  scaled to a CPU budget) and the batch's timesteps are stratified over four quarters of
  [0, 1000) (`--t_sample`), so every batch sees early and late steps.
* masked execution, as the official training: every head, group and token is computed and
  multiplied by its gate; forward hooks put the masks into diffusers' own forward (no copy of
  the DiT's forward here). Inference (diffusers_host/dydit.py) slices instead, and
  tests/test_dydit_bundled.py checks the two agree.

Differences, for the budget (minutes on one core, not 200k GPU steps): the regression target
is by default the frozen dense bundled DiT's noise prediction (`--target dense`, a distillation
target: the same optimum as the noise, far less variance per step; `--target noise` is the
official one); routers learn 10x faster than the DiT (`--router-lr`); min-SNR loss weights as
the bundled DiT was trained with; EMA 0.995 instead of 0.9999 (a few thousand steps).

MLP groups: the official DiT has as many groups as heads (16 x 288 channels of 4608). Our MLP
is 768 wide with 6 heads: 6 groups would cut the MLP, 63 % of a block's FLOPs, in sixths with
a sixth always on. We use 12 groups of 64 channels: twice the official granularity relative
to the width, and 64 channels keep every sliced matmul a whole number of SIMD tiles on CPU.

Writes `dit_dydit_<lambda x 100>.safetensors` (the DiT, fp16), `.routers.safetensors` (the
router side-car, core/dydit/sidecar.py) and `.train.json`; a resumable checkpoint
`.ckpt.pt` every few minutes and at the end.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from tqdm import tqdm

from ..core.dydit.routers import DyDiTRouters, RouterShape, TOKEN_REDUCTION
from ..core.dydit.sidecar import load_routers, save_routers
from ..core.dydit.telemetry import BlockGeometry
from .architectures import NULL_CLASS, build_dit
from .bundled import _load_into, load
from .sampling import TRAIN_TIMESTEPS
from .shapes import sample_batch
from .train import min_snr_weights, save_weights

WEIGHTS = Path(__file__).resolve().parent / "weights"
MLP_GROUPS = 12
TAU = 5.0                       # the official Gumbel-sigmoid temperature
WIDTH_BIAS, TOKEN_BIAS = 15.0, 35.0   # the official router init: every gate starts on
FLOPS_WEIGHT = 2.0              # the official token_loss_ratio
QUARTERS = 4                    # the official --t_sample: batch rows cycle through t quarters


def tag(lam: float) -> str:
    return f"dit_dydit_{round(lam * 100):d}"


def files(lam: float, out: Path = WEIGHTS) -> dict[str, Path]:
    name = tag(lam)
    return {"model": out / f"{name}.safetensors", "routers": out / f"{name}.routers.safetensors",
            "record": out / f"{name}.train.json", "checkpoint": out / f"{name}.ckpt.pt"}


# -- routers and gates ------------------------------------------------------------------------
def router_shape(model: torch.nn.Module, mlp_groups: int = MLP_GROUPS) -> RouterShape:
    attn = model.transformer_blocks[0].attn1
    hidden = attn.to_q.in_features
    return RouterShape(depth=len(model.transformer_blocks), heads=attn.heads, mlp_groups=mlp_groups, hidden=hidden,
                       token_hidden=hidden // TOKEN_REDUCTION)


def geometry(model: torch.nn.Module, shape: RouterShape) -> BlockGeometry:
    attn = model.transformer_blocks[0].attn1
    return BlockGeometry(hidden=shape.hidden, heads=shape.heads, head_dim=attn.to_q.out_features // attn.heads,
                         mlp_groups=shape.mlp_groups,
                         group_width=model.transformer_blocks[0].ff.net[2].in_features // shape.mlp_groups,
                         token_hidden=shape.token_hidden)


def initial_routers(shape: RouterShape) -> DyDiTRouters:
    """The official init: Xavier-uniform weights (DiT's _basic_init), biases set so every gate
    starts on (15 for the width routers, 35 for the token router's output)."""
    routers = DyDiTRouters(shape, embedding="diffusers")
    for module in routers.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            torch.nn.init.zeros_(module.bias)
    for block in routers.blocks:
        block.attn_rate.router.bias.data.fill_(WIDTH_BIAS)
        block.mlp_rate.router.bias.data.fill_(WIDTH_BIAS)
        block.token_selection.mlp_head[2].bias.data.fill_(TOKEN_BIAS)
    return routers


def gate(logits: torch.Tensor, training: bool, tau: float = TAU, generator: torch.Generator | None = None):
    """0/1 gates. Training: Gumbel-sigmoid (logistic noise = the difference of two Gumbels) with
    a straight-through estimator, binary forward, soft gradient. Eval: sigmoid(logit) > 0.5."""
    if not training:
        return (torch.sigmoid(logits) > 0.5).to(logits.dtype)
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype).clamp_(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


# -- masked execution through hooks -----------------------------------------------------------
@dataclass
class Gates:
    """One call's gates (float 0/1, with STE gradients in training); per block lists."""
    heads: torch.Tensor | None = None                 # [depth, B, heads]
    groups: torch.Tensor | None = None                # [depth, B, groups]
    tokens: list[torch.Tensor] = field(default_factory=list)   # per block [B, N]


class MaskedDyDiT:
    """The DyDiT forward on a diffusers DiT by masks (the official training path).

    `complete = True` runs the plain model (the official complete_model). Hooks:
    block 0's timestep embedder -> width gates for every block; attn1.to_out[0] pre-hook ->
    head mask on the attention output before the output projection; ff.net[0].proj hook ->
    group mask before GELU; norm3 pre-hook -> the token router reads the residual stream after
    the attention residual; ff hook -> the token gate on the MLP output (it commutes with the
    adaLN gate the block applies next)."""

    def __init__(self, model: torch.nn.Module, routers: DyDiTRouters, generator: torch.Generator | None = None):
        self.model, self.routers, self.generator = model, routers, generator
        self.geometry = geometry(model, routers.shape)
        self.complete = False
        self.gates: Gates | None = None
        blocks = list(model.transformer_blocks)
        hooks = [model.register_forward_pre_hook(self._start),
                 blocks[0].norm1.emb.timestep_embedder.register_forward_hook(self._width)]
        for i, block in enumerate(blocks):
            hooks += [block.attn1.to_out[0].register_forward_pre_hook(lambda m, a, i=i: self._heads(i, a)),
                      block.ff.net[0].proj.register_forward_hook(lambda m, a, out, i=i: self._groups(i, out)),
                      block.norm3.register_forward_pre_hook(lambda m, a, i=i: self._route_tokens(i, a)),
                      block.ff.register_forward_hook(lambda m, a, out, i=i: self._tokens(i, out))]
        self._hooks = hooks

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @property
    def training(self) -> bool:
        return self.routers.training

    def _start(self, module, args):
        self.gates = None if self.complete else Gates()

    def _width(self, module, args, t_emb):
        g = self.gates
        if g is None or g.heads is not None:      # the final layer embeds again
            return None
        if not self.training:                     # inference's own gates (core/dydit/routers.py)
            heads, groups = self.routers.width_gates(t_emb)
            g.heads, g.groups = heads.to(t_emb.dtype), groups.to(t_emb.dtype)
            return None
        heads, groups = [], []
        for b in self.routers.blocks:
            for router, out in ((b.attn_rate.router, heads), (b.mlp_rate.router, groups)):
                on = gate(router(t_emb), True, generator=self.generator)
                out.append(torch.cat([on.new_ones(on.shape[0], 1), on], dim=1))    # head / group 0 always on
        g.heads, g.groups = torch.stack(heads), torch.stack(groups)
        return None

    def _per_row(self, mask: torch.Tensor, rows: int) -> torch.Tensor:
        return mask.expand(rows, -1) if mask.shape[0] == 1 else mask

    def _heads(self, block, args):
        if self.gates is None:
            return None
        x = args[0]
        mask = self._per_row(self.gates.heads[block], x.shape[0]).repeat_interleave(self.geometry.head_dim, dim=1)
        return (x * mask[:, None, :].to(x.dtype),)

    def _groups(self, block, out):
        if self.gates is None:
            return None
        mask = self._per_row(self.gates.groups[block], out.shape[0]).repeat_interleave(self.geometry.group_width, 1)
        return out * mask[:, None, :].to(out.dtype)

    def _route_tokens(self, block, args):
        if self.gates is None:
            return None
        if not self.training:
            self.gates.tokens.append(self.routers.token_keep(block, args[0]).to(args[0].dtype))
            return None
        logits = self.routers.blocks[block].token_selection.mlp_head(args[0]).squeeze(-1)
        self.gates.tokens.append(gate(logits, True, generator=self.generator))
        return None

    def _tokens(self, block, out):
        if self.gates is None:
            return None
        return out * self.gates.tokens[block][..., None].to(out.dtype)

    def flops_ratio(self, gates: Gates | None = None) -> torch.Tensor:
        """[B] each sample's executed share of the blocks' FLOPs (the official DynamicLoss form)."""
        g = gates or self.gates
        geo, tokens = self.geometry, g.tokens[0].shape[1]
        attn, mlp = geo.attention_flops(tokens, geo.heads), geo.mlp_flops(tokens, geo.mlp_groups)
        rows = g.tokens[0].shape[0]
        heads = g.heads.mean(dim=2).expand(-1, rows) if g.heads.shape[1] == 1 else g.heads.mean(dim=2)
        groups = g.groups.mean(dim=2).expand(-1, rows) if g.groups.shape[1] == 1 else g.groups.mean(dim=2)
        token_share = torch.stack([t.mean(dim=1) for t in g.tokens])            # [depth, B]
        executed = attn * heads + mlp * groups * token_share
        return executed.sum(dim=0) / (len(g.tokens) * (attn + mlp))


# -- data and the objective -------------------------------------------------------------------
def stratified_timesteps(batch: int, g: torch.Generator) -> torch.Tensor:
    """Row i draws from quarter i % 4 of [0, 1000) (the official --t_sample)."""
    width = TRAIN_TIMESTEPS // QUARTERS
    lower = (torch.arange(batch) % QUARTERS) * width
    return torch.randint(0, width, (batch,), generator=g) + lower


def noisy_batch(batch: int, g: torch.Generator, alphas: torch.Tensor):
    """(noisy images, t, labels with 10 % null for CFG, noise)."""
    images, labels = sample_batch(batch, g)
    labels = torch.where(torch.rand(batch, generator=g) < 0.1, torch.full_like(labels, NULL_CLASS), labels)
    t = stratified_timesteps(batch, g)
    noise = torch.randn(images.shape, generator=g)
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * images + (1 - a).sqrt() * noise, t, labels, noise


def lambda_at(step: int, lam: float, warmup: int) -> float:
    """The official schedule: 1 for the first steps (100 of 1000 warm-up steps), then linear to lambda."""
    hold = warmup // 10
    if step < hold:
        return 1.0
    if step >= warmup:
        return lam
    return 1.0 - (1.0 - lam) * (step - hold) / max(1, warmup - hold)


def _call(model, x, t, labels):
    return model(x, timestep=t, class_labels=labels, return_dict=False)[0]


def dydit_loss(masked: MaskedDyDiT, x, t, labels, target, weights, lam: float) -> tuple[torch.Tensor, dict]:
    """The official objective on one batch: (total, parts as floats)."""
    masked.complete = False
    per_sample = (_call(masked.model, x, t, labels) - target).square().mean(dim=(1, 2, 3))
    diffusion = (per_sample * weights).mean()
    ratio = masked.flops_ratio().mean()
    gates = masked.gates
    masked.complete = True
    per_sample = (_call(masked.model, x, t, labels) - target).square().mean(dim=(1, 2, 3))
    masked.complete = False
    complete = (per_sample * weights).mean()
    flops = FLOPS_WEIGHT * (ratio - lam) ** 2
    parts = {"diffusion": diffusion.item(), "complete": complete.item(), "flops": flops.item(),
             "ratio": ratio.item(), "heads": gates.heads.mean().item(), "groups": gates.groups.mean().item(),
             "tokens": torch.stack([g.mean() for g in gates.tokens]).mean().item()}
    return diffusion + complete + flops, parts


# -- training ---------------------------------------------------------------------------------
@dataclass
class Settings:
    lam: float = 0.5
    batch: int = 16
    lr: float = 1e-4
    router_lr: float = 1e-3
    ema: float = 0.995
    warmup: int = 300
    min_snr: float | None = 5.0
    target: str = "dense"
    seed: int = 0
    mlp_groups: int = MLP_GROUPS
    log_every: int = 20


def load_bundled_dit() -> torch.nn.Module:
    return load("dit").model


def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), live.parameters()):
            e.lerp_(p, 1 - decay)


class Trainer:
    """One fine-tuning run; `step()` is one iteration, `save_checkpoint` / `resume` round-trip it."""

    def __init__(self, settings: Settings, model: torch.nn.Module | None = None, routers: DyDiTRouters | None = None,
                 teacher: torch.nn.Module | None = None):
        s = self.settings = settings
        if s.target not in ("dense", "noise"):
            raise ValueError(f"target must be 'dense' or 'noise', got {s.target!r}")
        self.model = model if model is not None else load_bundled_dit()
        self.teacher = None
        if s.target == "dense":
            self.teacher = (teacher if teacher is not None else copy.deepcopy(self.model)).eval().requires_grad_(False)
        torch.manual_seed(s.seed)
        self.routers = routers if routers is not None else initial_routers(router_shape(self.model, s.mlp_groups))
        self.model.train().requires_grad_(True)
        self.routers.train().requires_grad_(True)
        self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.ema_routers = copy.deepcopy(self.routers).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW([{"params": list(self.model.parameters()), "lr": s.lr},
                                            {"params": list(self.routers.parameters()), "lr": s.router_lr}],
                                           weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(s.seed)
        self.masked = MaskedDyDiT(self.model, self.routers, self.generator)
        self.alphas = DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS).alphas_cumprod
        self.state = {"step": 0, "seconds": 0.0}
        self.history: list[dict] = []          # one row per `log_every` steps: means of the parts
        self._window: list[dict] = []

    def step(self) -> dict:
        s = self.settings
        x, t, labels, noise = noisy_batch(s.batch, self.generator, self.alphas)
        if self.teacher is not None:
            with torch.no_grad():
                target = _call(self.teacher, x, t, labels)
        else:
            target = noise
        weights = min_snr_weights(self.alphas[t], s.min_snr)
        lam = lambda_at(self.state["step"], s.lam, s.warmup)
        loss, parts = dydit_loss(self.masked, x, t, labels, target, weights, lam)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.model.parameters()) + list(self.routers.parameters()), 1.0)
        self.optimizer.step()
        decay = min(s.ema, (1 + self.state["step"]) / (10 + self.state["step"]))
        _ema_update(self.ema_model, self.model, decay)
        _ema_update(self.ema_routers, self.routers, decay)
        self.state["step"] += 1
        parts.update(loss=loss.item(), target_ratio=lam)
        self._window.append(parts)
        if len(self._window) >= s.log_every:
            row = {k: round(sum(p[k] for p in self._window) / len(self._window), 5) for k in self._window[0]}
            row["step"] = self.state["step"]
            self.history.append(row)
            self._window.clear()
        return parts

    # -- checkpoints (our own file: tensors, numbers, strings; read with weights_only=True) --
    def save_checkpoint(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"model": self.model.state_dict(), "routers": self.routers.state_dict(),
                    "ema_model": self.ema_model.state_dict(), "ema_routers": self.ema_routers.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                    "step": self.state["step"], "seconds": self.state["seconds"],
                    "history": json.dumps(self.history), "settings": json.dumps(self.settings.__dict__)}, tmp)
        tmp.replace(path)

    def resume(self, path: Path) -> None:
        saved = torch.load(path, weights_only=True)
        settings = json.loads(saved["settings"])
        if settings.get("mlp_groups") != self.settings.mlp_groups or settings.get("lam") != self.settings.lam:
            raise ValueError(f"{path.name} was trained with lambda {settings.get('lam')} and "
                             f"{settings.get('mlp_groups')} MLP groups; resume it with the same --lam")
        self.model.load_state_dict(saved["model"])
        self.routers.load_state_dict(saved["routers"])
        self.ema_model.load_state_dict(saved["ema_model"])
        self.ema_routers.load_state_dict(saved["ema_routers"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.generator.set_state(saved["generator"])
        self.state = {"step": int(saved["step"]), "seconds": float(saved["seconds"])}
        self.history = json.loads(saved["history"])


def eval_ratio(model: torch.nn.Module, routers: DyDiTRouters, steps: int = 25, batch: int = 4, seed: int = 0) -> dict:
    """The eval-mode (sigmoid > 0.5) FLOPs ratio over a DDIM schedule's timesteps, masked."""
    from .sampling import make_scheduler
    was = routers.training
    routers.eval()
    masked = MaskedDyDiT(model, routers)
    g = torch.Generator().manual_seed(seed)
    ratios, heads, groups, tokens = [], [], [], []
    try:
        with torch.no_grad():
            for t in make_scheduler(steps).timesteps:
                x = torch.randn(batch, 3, 32, 32, generator=g)
                labels = torch.arange(batch) % NULL_CLASS
                _call(model, x, t.expand(batch), labels)
                ratios.append(masked.flops_ratio().mean().item())
                heads.append(masked.gates.heads.mean().item())
                groups.append(masked.gates.groups.mean().item())
                tokens.append(torch.stack([m.mean() for m in masked.gates.tokens]).mean().item())
    finally:
        masked.remove()
        routers.train(was)
    mean = lambda v: round(sum(v) / len(v), 4)
    return {"flops_ratio": mean(ratios), "heads": mean(heads), "groups": mean(groups), "tokens": mean(tokens),
            "per_step_ratio": [round(r, 3) for r in ratios]}


def train(settings: Settings, *, minutes: float | None = None, iterations: int | None = None, out: Path = WEIGHTS,
          resume: bool = False, checkpoint_every_min: float = 5.0, progress: bool = True) -> dict:
    """Train for `minutes` (wall, this run's share) or `iterations` (this run's), whichever comes first."""
    if minutes is None and iterations is None:
        raise ValueError("give --minutes or --iterations")
    torch.set_num_threads(1)
    paths = files(settings.lam, out)
    trainer = Trainer(settings)
    if resume and paths["checkpoint"].exists():
        trainer.resume(paths["checkpoint"])
    start_step, start_seconds = trainer.state["step"], trainer.state["seconds"]
    clock = time.perf_counter() - start_seconds
    last_ckpt = time.perf_counter()
    total = iterations if iterations is not None else None
    bar = tqdm(total=total, unit="it", desc=f"DyDiT lambda {settings.lam}", disable=not progress)
    while True:
        done = trainer.state["step"] - start_step
        if iterations is not None and done >= iterations:
            break
        if minutes is not None and trainer.state["seconds"] - start_seconds >= minutes * 60:
            break
        trainer.step()
        trainer.state["seconds"] = time.perf_counter() - clock
        bar.update(1)
        if trainer.history and trainer.history[-1]["step"] == trainer.state["step"]:
            h = trainer.history[-1]
            bar.set_postfix(loss=f"{h['loss']:.4f}", ratio=f"{h['ratio']:.3f}", target=f"{h['target_ratio']:.2f}")
        if time.perf_counter() - last_ckpt > checkpoint_every_min * 60:
            trainer.save_checkpoint(paths["checkpoint"])
            last_ckpt = time.perf_counter()
    bar.close()
    trainer.save_checkpoint(paths["checkpoint"])
    return finish(trainer, paths)


def finish(trainer: Trainer, paths: dict[str, Path]) -> dict:
    """Ship the EMA weights (fp16 DiT + fp32 router side-car) and a JSON record of the run."""
    s = trainer.settings
    save_weights(trainer.ema_model, paths["model"])
    source = f"CacheKit tiny DyDiT, lambda {s.lam}, {trainer.state['step']} fine-tuning steps from the bundled DiT"
    save_routers(trainer.ema_routers, paths["routers"], source)
    model = load_dydit_dit(paths["model"])
    evaluation = eval_ratio(model, load_routers(paths["routers"]))
    record = {"lambda": s.lam, "steps": trainer.state["step"], "train_minutes": round(trainer.state["seconds"] / 60, 1),
              "settings": s.__dict__, "eval": evaluation, "history": trainer.history,
              "objective": "diffusion + complete-model diffusion + 2 (FLOPs ratio - lambda)^2 (official DyDiT)"}
    paths["record"].write_text(json.dumps(record, indent=1))
    return record


def load_dydit_dit(path: Path) -> torch.nn.Module:
    return _load_into(build_dit(), path)


def describe_losses(history: list[dict], every: int = 1) -> str:
    return "\n".join(f"{h['step']:>6} loss {h['loss']:.4f} diff {h['diffusion']:.4f} complete {h['complete']:.4f} "
                     f"ratio {h['ratio']:.3f} (target {h['target_ratio']:.2f})" for h in history[::every])


def main(argv=None):
    import argparse

    from ..bench.cli import float_in, int_at_least
    parser = argparse.ArgumentParser(prog="train_dydit.py", description="Fine-tune the bundled tiny DiT into a DyDiT.")
    parser.add_argument("--lam", type=float_in(0, 1, low_open=True), default=0.5,
                        help="target share of the blocks' FLOPs (0 < lambda <= 1)")
    parser.add_argument("--minutes", type=float_in(0, low_open=True), help="this run's wall-clock budget")
    parser.add_argument("--iterations", type=int_at_least(1), help="this run's iterations")
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="folder for the weights, record and checkpoint")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--batch", type=int_at_least(2), default=Settings.batch)
    parser.add_argument("--lr", type=float_in(0, low_open=True), default=Settings.lr)
    parser.add_argument("--router-lr", type=float_in(0, low_open=True), default=Settings.router_lr)
    parser.add_argument("--warmup", type=int_at_least(0), default=Settings.warmup,
                        help="iterations over which the FLOPs target goes from 1 to lambda")
    parser.add_argument("--target", choices=("dense", "noise"), default=Settings.target)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=float_in(0, low_open=True), default=5.0, help="minutes")
    args = parser.parse_args(argv)
    if args.minutes is None and args.iterations is None:
        parser.error("give --minutes or --iterations (or both: whichever ends first)")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder")
    checkpoint = files(args.lam, args.out)["checkpoint"]
    if args.resume and not checkpoint.exists():
        parser.error(f"--resume: no checkpoint {checkpoint} (train without --resume first)")
    settings = Settings(lam=args.lam, batch=args.batch, lr=args.lr, router_lr=args.router_lr, warmup=args.warmup,
                        target=args.target, seed=args.seed)
    record = train(settings, minutes=args.minutes, iterations=args.iterations, out=args.out, resume=args.resume,
                   checkpoint_every_min=args.checkpoint_every)
    print(json.dumps({k: v for k, v in record.items() if k != "history"}))


__all__ = ["MaskedDyDiT", "Settings", "Trainer", "dydit_loss", "eval_ratio", "files", "gate", "initial_routers",
           "lambda_at", "load_dydit_dit", "router_shape", "train"]
