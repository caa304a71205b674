"""Second stage for the tiny DyDiT: fine-tune its DiT weights under the gates inference uses.

    python scripts/polish_dydit.py --lam 0.5 --minutes 30 --out DIR

Why a second stage. After the official objective (tinymodels/train_dydit.py) the routed model
loses class accuracy that its weights run dense keep (bench/results/dydit.md): the weights were
trained under *random* gates (Gumbel noise, each gate on with probability sigmoid(logit)) on
noised training images, while inference runs *fixed* gates (sigmoid > 0.5) on the sampler's own
trajectory, with classifier-free guidance multiplying the cond - uncond error by the scale.
Longer training under the official objective did not help (it lowered the loss and the accuracy).

This stage closes those three gaps, and nothing else changes:
* routers frozen, eval gates: the DiT learns the exact widths and tokens inference will run;
* states from the dense teacher's own DDIM trajectories (seeds from 1000 up, disjoint from the
  bench's seed-0 evaluation images), at the schedule's timesteps;
* the loss is the teacher's noise prediction matched on the CFG-guided output as well as on the
  conditional and unconditional ones (guided at the sampler's scale).
The FLOPs term of the official objective has nothing to move (the routers are frozen); the
eval FLOPs ratio is measured again at the end, since the token routers read features that change.

Writes `dit_dydit_<lambda x 100>.safetensors`, `.routers.safetensors` (the input routers, re-saved)
and `.train.json` (the first stage's record plus a `polish` section) into --out.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..core.dydit.sidecar import load_routers, save_routers
from .architectures import NULL_CLASS, NUM_CLASSES
from .bundled import load
from .sampling import make_scheduler, sample
from .shapes import SIZE
from .train import save_weights
from .train_dydit import MaskedDyDiT, _call, _ema_update, eval_ratio, files, load_dydit_dit

FIRST_SEED = 1000          # trajectory seeds: the bench evaluates seed 0, so these never overlap it
HELD_OUT_SEED = 900_000    # seeds of the trajectories only the validation loss sees


@dataclass
class PolishSettings:
    lam: float = 0.5
    images: int = 768          # teacher trajectories
    held_out: int = 32         # trajectories kept for the validation loss
    on_policy: bool = False    # states from the student's own trajectories (teacher's predictions as targets)
    steps: int = 25            # the sampler the bench and panel run (DDIM 25)
    cfg: float = 3.0
    batch: int = 16            # (image, step) pairs per iteration; the model sees 2x rows (uncond + cond)
    lr: float = 5e-5
    ema: float = 0.995
    seed: int = 0


@dataclass
class Trajectories:
    """DDIM states and the dense teacher's noise predictions there: x, eps_uncond, eps_cond [K, S, 3, H, W]."""
    x: torch.Tensor
    eps_uncond: torch.Tensor
    eps_cond: torch.Tensor
    labels: torch.Tensor       # [K]
    timesteps: torch.Tensor    # [S]


def teacher_trajectories(teacher: torch.nn.Module, images: int, *, steps: int, cfg: float, batch: int = 32,
                         first_seed: int = FIRST_SEED, driver: torch.nn.Module | None = None,
                         progress: bool = True) -> Trajectories:
    """Run the bundled CFG sampler (tinymodels/sampling.sample) and keep every state it visits
    with the teacher's two noise predictions there. The sampler follows `driver`'s predictions
    (the student's own trajectory: the states it will meet, DAgger-style), or the teacher's."""
    timesteps = make_scheduler(steps).timesteps.clone()
    shape = (images, steps, 3, SIZE, SIZE)
    xs, eus, ecs = torch.empty(shape), torch.empty(shape), torch.empty(shape)
    labels = torch.randint(0, NUM_CLASSES, (images,), generator=torch.Generator().manual_seed(first_seed))
    for n, start in enumerate(tqdm(range(0, images, batch), desc="teacher trajectories", disable=not progress)):
        rows = slice(start, min(images, start + batch))
        step = iter(range(steps))

        def recording(x, t, y):
            eps = _call(teacher, x, t, y)
            i, half = next(step), x.shape[0] // 2
            xs[rows, i], eus[rows, i], ecs[rows, i] = x[:half], eps[:half], eps[half:]
            return eps if driver is None else _call(driver, x, t, y)
        sample(recording, labels[rows], steps=steps, cfg=cfg, seed=first_seed + 1 + n)
    return Trajectories(xs, eus, ecs, labels, timesteps)


def guided_loss(eps_uncond, eps_cond, target_uncond, target_cond, cfg: float) -> torch.Tensor:
    """Mean squared error of the guided prediction plus those of its two halves."""
    guided = eps_uncond + cfg * (eps_cond - eps_uncond)
    target = target_uncond + cfg * (target_cond - target_uncond)
    mse = lambda a, b: (a - b).square().mean()
    return mse(guided, target) + mse(eps_cond, target_cond) + mse(eps_uncond, target_uncond)


class Polisher:
    """One polishing run: the DiT's weights train, the routers stay as given (eval gates)."""

    def __init__(self, settings: PolishSettings, model: torch.nn.Module, routers, data: Trajectories):
        self.settings, self.model, self.data = settings, model, data
        self.routers = routers.eval().requires_grad_(False)
        self.model.train().requires_grad_(True)
        # Copy before hooking: a deep copy would carry the live model's mask hooks along.
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.masked = MaskedDyDiT(self.model, self.routers)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.step_count = 0
        self.history: list[dict] = []
        self._window: list[float] = []

    def _loss(self, model: torch.nn.Module, d: Trajectories, images: torch.Tensor, steps: torch.Tensor):
        """The guided loss of `model` at the states (images[i], steps[i]) of `d`, uncond and cond in one call."""
        x, y, t = d.x[images, steps], d.labels[images], d.timesteps[steps]
        both = torch.cat([torch.full_like(y, NULL_CLASS), y])
        eu, ec = _call(model, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return guided_loss(eu, ec, d.eps_uncond[images, steps], d.eps_cond[images, steps], self.settings.cfg)

    def step(self) -> float:
        s, d = self.settings, self.data
        images = torch.randint(0, d.x.shape[0], (s.batch,), generator=self.generator)
        steps = torch.randint(0, d.x.shape[1], (s.batch,), generator=self.generator)
        loss = self._loss(self.model, d, images, steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        _ema_update(self.ema_model, self.model, s.ema)
        self.step_count += 1
        self._window.append(loss.item())
        if len(self._window) == 20:
            self.history.append({"step": self.step_count, "loss": round(sum(self._window) / 20, 6)})
            self._window.clear()
        return loss.item()

    def validation_loss(self, held_out: Trajectories) -> float:
        """The guided loss of the EMA weights over every state of held-out trajectories."""
        masked = MaskedDyDiT(self.ema_model, self.routers)
        every = torch.arange(held_out.x.shape[0])
        try:
            with torch.no_grad():          # one timestep at a time: every held-out image at step i
                losses = [self._loss(self.ema_model, held_out, every, torch.full_like(every, i)).item()
                          for i in range(len(held_out.timesteps))]
        finally:
            masked.remove()
        return sum(losses) / len(losses)


def polish(settings: PolishSettings, *, source: Path, out: Path, minutes: float | None = None,
           iterations: int | None = None, progress: bool = True) -> dict:
    """Polish the DyDiT in `source` (files of tinymodels/train_dydit.files) and write it into `out`."""
    if minutes is None and iterations is None:
        raise ValueError("give minutes or iterations")
    torch.set_num_threads(1)
    torch.manual_seed(settings.seed)
    given = files(settings.lam, source)
    missing = [p.name for k, p in given.items() if k != "checkpoint" and not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{source}: {', '.join(missing)} missing; train the first stage with "
                                f"`python scripts/train_dydit.py --lam {settings.lam} --minutes N` first")
    teacher = load("dit").model
    start = time.perf_counter()
    driver = None
    if settings.on_policy:          # the first stage's DyDiT, routed as at inference, drives the sampler
        driver = load_dydit_dit(given["model"])
        routing = MaskedDyDiT(driver, load_routers(given["routers"]).eval())
    data = teacher_trajectories(teacher, settings.images, steps=settings.steps, cfg=settings.cfg, driver=driver,
                                progress=progress)
    if driver is not None:
        routing.remove()
    held_out = teacher_trajectories(teacher, settings.held_out, steps=settings.steps, cfg=settings.cfg,
                                    first_seed=HELD_OUT_SEED, progress=False)
    trajectory_minutes = (time.perf_counter() - start) / 60
    polisher = Polisher(settings, load_dydit_dit(given["model"]), load_routers(given["routers"]), data)
    before = polisher.validation_loss(held_out)
    bar = tqdm(total=iterations, unit="it", desc="polishing DyDiT", disable=not progress)
    clock = time.perf_counter()
    while (iterations is None or polisher.step_count < iterations) and \
            (minutes is None or time.perf_counter() - clock < minutes * 60):
        loss = polisher.step()
        bar.update(1)
        if polisher.step_count % 20 == 0:
            bar.set_postfix(loss=f"{loss:.5f}")
    bar.close()
    seconds = time.perf_counter() - clock
    after = polisher.validation_loss(held_out)
    polisher.masked.remove()
    return _write(polisher, settings, given, files(settings.lam, out),
                  {"steps": polisher.step_count, "minutes": round(seconds / 60, 1),
                   "trajectory_minutes": round(trajectory_minutes, 1), "settings": asdict(settings),
                   "first_seed": FIRST_SEED, "held_out_guided_loss": {"before": round(before, 6),
                                                                       "after": round(after, 6)},
                   "history": polisher.history})


def _write(polisher: Polisher, settings: PolishSettings, given: dict, paths: dict, section: dict) -> dict:
    record = json.loads(given["record"].read_text())
    paths["model"].parent.mkdir(parents=True, exist_ok=True)
    save_weights(polisher.ema_model, paths["model"])
    source = (f"CacheKit tiny DyDiT, lambda {settings.lam}, {record.get('steps')} fine-tuning steps from the bundled "
              f"DiT, then {section['steps']} polishing steps under frozen routers")
    save_routers(polisher.routers, paths["routers"], source)
    section["eval"] = eval_ratio(load_dydit_dit(paths["model"]), load_routers(paths["routers"]))
    record["polish"] = section
    paths["record"].write_text(json.dumps(record, indent=1))
    return record


def main(argv=None):
    import argparse

    from ..bench.cli import float_in, int_at_least
    from .train_dydit import WEIGHTS
    parser = argparse.ArgumentParser(prog="polish_dydit.py",
                                     description="Fine-tune a DyDiT's weights under its frozen routers' inference "
                                                 "gates, on the dense DiT's own CFG trajectories.")
    parser.add_argument("--lam", type=float_in(0, 1, low_open=True), default=0.5,
                        help="which DyDiT (files dit_dydit_<100 x lambda>.*)")
    parser.add_argument("--source", type=Path, default=WEIGHTS, help="folder holding the first stage's files")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the polished files (never the bundled folder by default)")
    parser.add_argument("--minutes", type=float_in(0, low_open=True), help="polishing wall-clock budget")
    parser.add_argument("--iterations", type=int_at_least(1), help="polishing iterations")
    parser.add_argument("--images", type=int_at_least(8), default=PolishSettings.images,
                        help="teacher trajectories to learn from")
    parser.add_argument("--batch", type=int_at_least(2), default=PolishSettings.batch)
    parser.add_argument("--lr", type=float_in(0, low_open=True), default=PolishSettings.lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--on-policy", action="store_true",
                        help="learn on the states the routed model itself visits (the teacher's predictions there "
                             "as targets) instead of the teacher's own trajectories")
    args = parser.parse_args(argv)
    if args.minutes is None and args.iterations is None:
        parser.error("give --minutes or --iterations (or both: whichever ends first)")
    for flag, folder in (("--source", args.source), ("--out", args.out)):
        if folder.exists() and not folder.is_dir():
            parser.error(f"{flag} {folder} is a file; give a folder")
    if args.out.resolve() == args.source.resolve():
        parser.error("--out must differ from --source: polishing never overwrites the files it starts from")
    settings = PolishSettings(lam=args.lam, images=args.images, batch=args.batch, lr=args.lr, seed=args.seed,
                              on_policy=args.on_policy)
    record = polish(settings, source=args.source, out=args.out, minutes=args.minutes, iterations=args.iterations)
    print(json.dumps({k: v for k, v in record["polish"].items() if k != "history"}))


__all__ = ["PolishSettings", "Polisher", "Trajectories", "guided_loss", "polish", "teacher_trajectories"]
