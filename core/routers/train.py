"""Train a router for a diffusers DiT-style model, image-free (the model's own trajectories).

Both objectives make the cache decision soft during training: a unit's output becomes
w * fresh + (1 - w) * reused with w = sigmoid(logit), so the error of reusing flows into the
logits, and an L1 term on w pushes towards reuse.

* harmonica: Step-wise Denoising Training (SDT) as in ModelTC/HarmoniCa's train_router.py:
  a whole DDIM trajectory from noise runs with the router active, so the cache a step sees is
  the one earlier routed steps left (it may be several steps old). At each step after the
  first, the loss is mse(routed output, fully computed output at the same input) weighted by
  the Image Error Proxy (IEP) lambda_k, plus l1 * sum(w). lambda_k is the change of the final
  sample when step k's routing is switched on, measured by full trajectories every
  `lambda_every` iterations. A unit's cache is refreshed where w > threshold, and the
  trajectory continues from the routed output.
* l2c: Learning-to-Cache's objective (horseee/learning-to-cache): a routed step k (router
  index T-1-k even) follows a full step k-1; loss = mse(routed, full) + l1 * sum(w) at step k,
  with the state at step k-1 taken from the model's own uncached trajectory.

Logits are clamped to [-5, 5] after each update, as the official trainers do.

Reuse (`TrainConfig.reuse`, core/reuse.py). The `reused` value a gate blends with is what the
runtime (core/session.py) would reuse for that unit at that step: the strategy's `output` from
the unit's refresh history, where every refresh went through the strategy's `refresh` with the
sampling step index (the runtime's clock step). With "hold" that is the last kept value, as
published; with "forecast1"/"forecast2" the Taylor extrapolation from the unit's last refreshes
(TaylorSeer), so the router learns which units forecast well. Which steps refresh a unit:

* harmonica (the step-wise rollout, also IEP's trajectories): step 0 refreshes every unit
  (computed in full); at a routed step k the units whose hard decision computes
  (sigmoid(logit) > threshold, what the runtime would do) refresh with the unit's output at k,
  the soft blend as in the official trainer (= the fresh value where w = 1); the others keep
  their history, however many steps old.
* l2c (teacher forcing): the trajectory to step k is the uncached model's; its full steps (L2C's
  odd router indices) refresh every unit, and its earlier routed steps j < k refresh the units
  the current router computes at j (sigmoid(logit_j) > threshold) with the uncached value, so a
  unit's history at k has the runtime's refresh steps. With hold only the last refresh (k-1,
  always full) matters, as in the official objective.

The trained router records its reuse (`Router.reuse`); applying it runs that reuse unless the
caller overrides it. Residual units keep output minus input, as the runtime does.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..reuse import STRATEGIES, add_residual, blend, residual_of, strategy_from_name
from ..streams import Tree, tree_map
from ..methods.router import routed_steps
from .format import METHODS, Router


class SoftUnits:
    """The units during training: full / reference / soft-routed / teacher calls, by forward hooks
    on unit modules or through `apply` from a host's block replacement (residual units).

    Modes (set with `step`, the sampling step index, before each model call):
    * full: computed; every unit refreshes;
    * reference: computed; nothing refreshes (the loss's target);
    * soft: `weights` w per unit: w * fresh + (1 - w) * reused; units with w > threshold refresh
      with that output (HarmoniCa's rollout);
    * teacher: computed (the trajectory stays the uncached model's); the units where `refresh`
      is true refresh (L2C's teacher forcing: the runtime's refresh steps for the router).
    `cache[i]` is unit i's entry of the reuse strategy (core/reuse.py), exactly as the runtime
    stores it."""

    def __init__(self, modules: list[torch.nn.Module | None], threshold: float, reuse: str = "hold"):
        self.mode = "full"
        self.step = 0
        self.weights: torch.Tensor | None = None
        self.refresh: list[bool] | None = None
        self.threshold = threshold
        self.strategy = strategy_from_name(reuse)
        self.cache: list[Any] = [None] * len(modules)
        self._shapes: list[list[tuple] | None] = [None] * len(modules)
        self._hooks = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules) if m is not None]

    def _hook(self, index: int):
        def hook(module, args, output):
            return self.apply(index, output)
        return hook

    def apply(self, index: int, fresh: Tree, unit_input: Tree | None = None) -> Tree:
        """A unit's output this call. With unit_input, the unit is residual: what is kept and
        reused is output minus input (whole blocks whose gates are computed inside the block).
        The reuse itself is core/reuse.py's: blend(w, fresh, reused value)."""
        if self.mode == "reference":                # computed, cache untouched
            return fresh
        if self.cache[index] is not None and self._shapes[index] != _shapes(fresh):
            self.cache[index] = None                # another shape: its history does not apply
        if self.mode == "full" or self.cache[index] is None:
            self._keep(index, fresh, unit_input)
            return fresh
        if self.mode == "teacher":
            if self.refresh[index]:
                self._keep(index, fresh, unit_input)
            return fresh
        w = self.weights[index]
        out = blend(w, fresh, self.reused(index, unit_input))
        if float(w.detach()) > self.threshold:      # the sub-layer would be recomputed: refresh
            self._keep(index, out, unit_input)
        return out

    def reused(self, index: int, unit_input: Tree | None = None) -> Tree:
        """What the runtime would reuse for unit `index` at `step` from its refresh history (the
        strategy's output; with unit_input, added back to the current input)."""
        value = self.strategy.output(self.cache[index], self.step)
        return add_residual(unit_input, value) if unit_input is not None else value

    def _keep(self, index: int, value: Tree, unit_input: Tree | None) -> None:
        kept = residual_of(value, unit_input) if unit_input is not None else value
        kept = tree_map(torch.Tensor.detach, kept)
        self.cache[index] = self.strategy.refresh(self.cache[index], kept, self.step)
        self._shapes[index] = _shapes(kept)

    def reset(self) -> None:
        self.cache = [None] * len(self.cache)
        self._shapes = [None] * len(self._shapes)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _shapes(tree: Tree) -> list[tuple]:
    shapes = []
    tree_map(lambda x: shapes.append(tuple(x.shape)), tree)
    return shapes


@dataclass
class TrainConfig:
    method: str = "harmonica"
    num_steps: int = 20
    iterations: int = 200
    batch: int = 8
    lr: float = 0.01
    l1: float = 1e-4
    threshold: float = 0.5
    lambda_every: int = 50          # IEP refresh (harmonica)
    seed: int = 0
    minutes: float | None = None    # stop after this much time, whatever the iterations
    reuse: str = "hold"             # the reuse strategy the router is trained for (core/reuse.py)

    def __post_init__(self) -> None:
        """Refuse settings the loop cannot train with, before any model is touched."""
        def finite(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        problems = [
            (self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}"),
            (isinstance(self.num_steps, int) and self.num_steps >= 2,
             f"steps must be at least 2 (the first step has nothing cached to reuse), got {self.num_steps}"),
            (isinstance(self.iterations, int) and self.iterations >= 1, f"iterations must be at least 1, got {self.iterations}"),
            (isinstance(self.batch, int) and self.batch >= 1, f"batch must be at least 1, got {self.batch}"),
            (finite(self.lr) and self.lr > 0, f"lr must be a number > 0, got {self.lr}"),
            (finite(self.l1) and self.l1 >= 0, f"l1 must be a number >= 0, got {self.l1}"),
            (finite(self.threshold) and 0 < self.threshold < 1, f"threshold must be between 0 and 1, got {self.threshold}"),
            (isinstance(self.lambda_every, int) and self.lambda_every >= 1,
             f"lambda_every must be at least 1, got {self.lambda_every}"),
            (self.minutes is None or (finite(self.minutes) and self.minutes > 0), f"minutes must be > 0, got {self.minutes}"),
            (self.reuse in STRATEGIES, f"reuse must be one of {STRATEGIES}, got {self.reuse!r}"),
        ]
        for ok, message in problems:
            if not ok:
                raise ValueError(f"Router training: {message}.")


@dataclass
class TrainState:
    logits: torch.Tensor
    iteration: int = 0
    losses: list[float] = field(default_factory=list)
    lambdas: list[float] | None = None
    seconds: float = 0.0
    reuse: str = "hold"


@dataclass
class Sampler:
    """How the trainer samples: start(generator, batch) -> (x, conditioning); predict(x, k, cond) ->
    the model output the sampler uses at step k (CFG included); step(out, k, x) -> the next x."""
    num_steps: int
    start: Callable[[torch.Generator, int], tuple]
    predict: Callable[[torch.Tensor, int, Any], torch.Tensor]
    step: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


def train_units(modules: list[torch.nn.Module | None], kinds: list[str], sampler: Sampler, config: TrainConfig, *,
                family: str, checkpoint: Path | None = None, resume: bool = False,
                progress: Callable[[int, int, float], None] | None = None, distributed: Any = None,
                timesteps: list[float] | None = None, on_units: Callable[[SoftUnits], None] | None = None) -> Router:
    """The training loop over any host: `modules` are the unit modules, in router column order
    (None for a unit the host routes through SoftUnits.apply itself; on_units(soft) lets it
    hold on to the SoftUnits)."""
    layout = tuple(dict.fromkeys(kinds))
    depth = len(kinds) // len(layout)
    state = TrainState(torch.zeros(config.num_steps, len(modules)), reuse=config.reuse)
    if resume and checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint, config.num_steps, len(modules), config.reuse)
    else:
        g = torch.Generator().manual_seed(config.seed)
        state.logits = torch.randn(config.num_steps, len(modules), generator=g)   # as the official Router init
    logits = state.logits.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([logits], lr=config.lr, weight_decay=0.0)
    rank = distributed.get_rank() if distributed is not None else 0
    g = torch.Generator().manual_seed(config.seed * 1000 + rank + state.iteration)
    soft = SoftUnits(modules, config.threshold, config.reuse)
    if on_units is not None:
        on_units(soft)
    routed = routed_steps(config.method, config.num_steps)
    started = time.perf_counter() - state.seconds
    steps = range(config.num_steps)

    def run(x, cond, mode, k, weights=None):
        soft.mode, soft.step, soft.weights = mode, k, weights
        return sampler.predict(x, k, cond)

    def iep_lambdas(x_T, cond) -> list[float]:
        # Switch the routers on one step at a time from the last step backwards and measure
        # how much the final sample moves: HarmoniCa's Image Error Proxy.
        routing: list[torch.Tensor | None] = [None] * config.num_steps
        previous = rollout(soft, sampler, x_T, cond, routing)
        lambdas = [0.0] * config.num_steps
        for k in range(config.num_steps - 1, 0, -1):
            if not routed[k]:
                continue
            routing[k] = torch.sigmoid(logits.detach()[k])
            current = rollout(soft, sampler, x_T, cond, routing)
            lambdas[k] = float(((current - previous) ** 2).mean())
            previous = current
        total = sum(lambdas) or 1.0
        return [v / total * sum(routed) for v in lambdas]       # mean 1 over the routed steps

    try:
        while state.iteration < config.iterations:
            if config.minutes is not None and time.perf_counter() - started > config.minutes * 60:
                break
            x, cond = sampler.start(g, config.batch)
            soft.reset()
            iteration_loss = 0.0
            if config.method == "harmonica":
                if state.lambdas is None or state.iteration % config.lambda_every == 0:
                    state.lambdas = iep_lambdas(x, cond)
                for k in steps:
                    if not routed[k]:
                        with torch.no_grad():
                            out = run(x, cond, "full", k)
                        x = sampler.step(out, k, x)
                        continue
                    with torch.no_grad():
                        reference = run(x, cond, "reference", k)
                    w = torch.sigmoid(logits[k])
                    predicted = run(x, cond, "soft", k, w)
                    loss = ((predicted - reference) ** 2).mean() * state.lambdas[k] + config.l1 * w.sum()
                    iteration_loss += _update(loss, logits, optimizer, distributed)
                    x = sampler.step(predicted.detach(), k, x)
            else:
                candidates = [k for k in steps if routed[k]]
                k = candidates[int(torch.randint(len(candidates), (1,), generator=g))]
                with torch.no_grad():
                    # The uncached trajectory; units refresh at the runtime's refresh steps
                    # (every unit at full steps, the router's computed units at routed ones).
                    for j in range(k):
                        if routed[j]:
                            soft.refresh = (torch.sigmoid(logits.detach()[j]) > config.threshold).tolist()
                            out = run(x, cond, "teacher", j)
                        else:
                            out = run(x, cond, "full", j)
                        x = sampler.step(out, j, x)
                    reference = run(x, cond, "reference", k)
                w = torch.sigmoid(logits[k])
                predicted = run(x, cond, "soft", k, w)
                loss = ((predicted - reference) ** 2).mean() + config.l1 * w.sum()
                iteration_loss = _update(loss, logits, optimizer, distributed)
            state.iteration += 1
            state.losses.append(iteration_loss)
            state.seconds = time.perf_counter() - started
            if progress is not None:
                progress(state.iteration, config.iterations, iteration_loss)
            if checkpoint is not None and rank == 0 and state.iteration % 20 == 0:
                _save_checkpoint(checkpoint, logits, state)
    finally:
        soft.remove()
    state.logits = logits.detach().clone()
    if checkpoint is not None and rank == 0:
        _save_checkpoint(checkpoint, logits, state)
    reuse = "" if config.reuse == "hold" else f", reuse {config.reuse}"
    return Router(state.logits, config.method, family, depth, layout, "", [float(t) for t in timesteps or []],
                  config.threshold,
                  f"trained by CacheKit ({config.method}, {state.iteration} iterations, l1 {config.l1}{reuse})",
                  config.reuse)


def rollout(soft: SoftUnits, sampler: Sampler, x: torch.Tensor, cond: Any,
            routing: list[torch.Tensor | None]) -> torch.Tensor:
    """A whole trajectory from x without gradients: step k soft-routed with weights routing[k],
    or computed in full where it is None (HarmoniCa's rollout, as IEP measures it). With 0/1
    weights this is the runtime's sampling with those decisions."""
    soft.reset()
    with torch.no_grad():
        for k in range(sampler.num_steps):
            w = routing[k]
            soft.mode, soft.step, soft.weights = ("soft" if w is not None else "full"), k, w
            out = sampler.predict(x, k, cond)
            x = sampler.step(out, k, x)
    return x


def _update(loss: torch.Tensor, logits: torch.Tensor, optimizer, distributed) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if distributed is not None:
        distributed.all_reduce(logits.grad, op=distributed.ReduceOp.SUM)
        logits.grad /= distributed.get_world_size()
    optimizer.step()
    with torch.no_grad():
        logits.clamp_(-5, 5)
    return float(loss.detach())


def _save_checkpoint(path: Path, logits: torch.Tensor, state: TrainState) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"logits": logits.detach().clone(), "iteration": state.iteration, "losses": state.losses,
                "lambdas": state.lambdas, "seconds": state.seconds, "reuse": state.reuse}, str(path))


def load_checkpoint(path: Path, num_steps: int, num_units: int, reuse: str | None = None) -> TrainState:
    """A training checkpoint written by _save_checkpoint, checked before use (with `reuse`: that it
    was trained for that reuse strategy; checkpoints from before reuse was recorded are hold).

    Read with weights_only=True (no code from the file runs). Anything else, corrupt, hostile or
    for another model, is refused with one message that says what to do; never torch's own,
    which advises weights_only=False."""
    name = Path(path).name

    def refuse(why: str) -> ValueError:
        return ValueError(f"Cannot resume from {name}: {why}. Delete it (or turn resume off) to train from scratch.")
    try:
        saved = torch.load(str(path), weights_only=True, map_location="cpu")
    except Exception as error:  # corrupt zip, truncated file, forbidden pickle globals, ...
        raise refuse(f"it is not a CacheKit router training checkpoint ({type(error).__name__})") from None
    if not isinstance(saved, dict) or not {"logits", "iteration", "losses"} <= set(saved):
        raise refuse("it is not a CacheKit router training checkpoint (missing logits / iteration / losses)")
    logits, iteration, losses = saved["logits"], saved["iteration"], saved["losses"]
    lambdas, seconds = saved.get("lambdas"), saved.get("seconds", 0.0)
    saved_reuse = saved.get("reuse", "hold")
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or not torch.isfinite(logits).all():
        raise refuse("its logits are not a finite float tensor")
    if tuple(logits.shape) != (num_steps, num_units):
        raise refuse(f"it is for {tuple(logits.shape)[0]} steps x {tuple(logits.shape)[-1]} units, this training "
                     f"is for {num_steps} x {num_units} (another model or step count)")
    numbers = (int, float)
    if (isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0
            or not isinstance(losses, list) or not all(isinstance(v, numbers) for v in losses)
            or (lambdas is not None and (not isinstance(lambdas, list) or not all(isinstance(v, numbers) for v in lambdas)))
            or not isinstance(seconds, numbers)):
        raise refuse("its iteration, losses, lambdas or seconds have the wrong types")
    if not isinstance(saved_reuse, str) or saved_reuse not in STRATEGIES:
        raise refuse(f"its reuse {saved_reuse!r} is not one of {STRATEGIES}")
    if reuse is not None and saved_reuse != reuse:
        raise refuse(f"it was trained for reuse {saved_reuse}, this training is for {reuse}")
    return TrainState(logits.float(), iteration, [float(v) for v in losses],
                      None if lambdas is None else [float(v) for v in lambdas], float(seconds), saved_reuse)
