"""Train a router for a diffusers DiT-style model, image-free (the model's own trajectories).

Both objectives make the cache decision soft during training: a unit's output becomes
w * fresh + (1 - w) * cached with w = sigmoid(logit), so the error of reusing flows into the
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
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..reuse import add_residual, blend, residual_of
from ..streams import Tree, tree_map
from ..methods.router import routed_steps
from .format import METHODS, Router


class SoftUnits:
    """The units during training: full / reference / soft-routed calls, by forward hooks on unit
    modules or through `apply` from a host's block replacement (residual units)."""

    def __init__(self, modules: list[torch.nn.Module | None], threshold: float):
        self.mode = "full"
        self.weights: torch.Tensor | None = None
        self.threshold = threshold
        self.cache: list[Any] = [None] * len(modules)
        self._hooks = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules) if m is not None]

    def _hook(self, index: int):
        def hook(module, args, output):
            return self.apply(index, output)
        return hook

    def apply(self, index: int, fresh: Tree, unit_input: Tree | None = None) -> Tree:
        """A unit's output this call. With unit_input, the unit is residual: what is cached and
        reused is output minus input (whole blocks whose gates are computed inside the block).
        The reuse itself is core/reuse.py's: blend(w, fresh, held value)."""
        if self.mode == "reference":                # computed, cache untouched
            return fresh
        residual = unit_input is not None
        cached = self.cache[index]
        if self.mode == "full" or cached is None or not _same_shapes(cached, fresh):
            self._keep(index, fresh, unit_input)
            return fresh
        w = self.weights[index]
        out = blend(w, fresh, add_residual(unit_input, cached) if residual else cached)
        if float(w.detach()) > self.threshold:      # the sub-layer would be recomputed: refresh
            self._keep(index, out, unit_input)
        return out

    def _keep(self, index: int, value: Tree, unit_input: Tree | None) -> None:
        kept = residual_of(value, unit_input) if unit_input is not None else value
        self.cache[index] = tree_map(torch.Tensor.detach, kept)

    def reset(self) -> None:
        self.cache = [None] * len(self.cache)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _same_shapes(a: Tree, b: Tree) -> bool:
    shapes = []
    tree_map(lambda x: shapes.append(tuple(x.shape)), a)
    other = []
    tree_map(lambda x: other.append(tuple(x.shape)), b)
    return shapes == other


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
    state = TrainState(torch.zeros(config.num_steps, len(modules)))
    if resume and checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint, config.num_steps, len(modules))
    else:
        g = torch.Generator().manual_seed(config.seed)
        state.logits = torch.randn(config.num_steps, len(modules), generator=g)   # as the official Router init
    logits = state.logits.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([logits], lr=config.lr, weight_decay=0.0)
    rank = distributed.get_rank() if distributed is not None else 0
    g = torch.Generator().manual_seed(config.seed * 1000 + rank + state.iteration)
    soft = SoftUnits(modules, config.threshold)
    if on_units is not None:
        on_units(soft)
    routed = routed_steps(config.method, config.num_steps)
    started = time.perf_counter() - state.seconds
    steps = range(config.num_steps)

    def run(x, cond, mode, k, weights=None):
        soft.mode, soft.weights = mode, weights
        return sampler.predict(x, k, cond)

    def trajectory(x, cond, routing: list[torch.Tensor | None]) -> torch.Tensor:
        soft.reset()
        with torch.no_grad():
            for k in steps:
                w = routing[k]
                out = run(x, cond, "soft" if w is not None else "full", k, w)
                x = sampler.step(out, k, x)
        return x

    def iep_lambdas(x_T, cond) -> list[float]:
        # Switch the routers on one step at a time from the last step backwards and measure
        # how much the final sample moves: HarmoniCa's Image Error Proxy.
        routing: list[torch.Tensor | None] = [None] * config.num_steps
        previous = trajectory(x_T, cond, routing)
        lambdas = [0.0] * config.num_steps
        for k in range(config.num_steps - 1, 0, -1):
            if not routed[k]:
                continue
            routing[k] = torch.sigmoid(logits.detach()[k])
            current = trajectory(x_T, cond, routing)
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
                    for j in range(k):
                        out = run(x, cond, "full", j)       # records every unit at step k-1
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
    return Router(state.logits, config.method, family, depth, layout, "", [float(t) for t in timesteps or []],
                  config.threshold, f"trained by CacheKit ({config.method}, {state.iteration} iterations, l1 {config.l1})")


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
                "lambdas": state.lambdas, "seconds": state.seconds}, str(path))


def load_checkpoint(path: Path, num_steps: int, num_units: int) -> TrainState:
    """A training checkpoint written by _save_checkpoint, checked before use.

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
    return TrainState(logits.float(), iteration, [float(v) for v in losses],
                      None if lambdas is None else [float(v) for v in lambdas], float(seconds))
