"""Guards for runs where caching pays little or misleads: few steps, noise-injecting samplers.

Hosts call `guard_window` before they open a run's session (it may move the window where a
method can reuse) and `run_notes` after (the notes say what the guard did, from the session's
actual plan, for the run record, the sidebar and the log).

* **Few steps** (distilled Lightning / lightx2v / LCM / Turbo / Hyper models run 1-8 steps):
  consecutive steps differ so much that a reused feature is far from the one it replaces, and
  every reused step is a large share of the image. With `FEW_STEPS` (4) steps or fewer in the
  whole schedule, a method may reuse only from the middle of the schedule on (the window starts
  no earlier than step ceil(N/2)); the method plans over that shorter window, so:
  FORA (first and last step of its window always fresh) reuses nothing up to 4 steps; DeepCache
  (full step at the window's start) reuses at most the last step; ChangeCache's warm-up counts
  from the middle; AdaptiveDiffusion's own warm-up (3 steps) already skips nothing; a learned
  router decides by itself (it is trained for its step count) and only gets the note.
  From FEW_STEPS + 1 to `FEW_STEPS_NOTE` (8) steps the run is unchanged and gets a note: 8
  steps may be a distilled model or a quick preview of a normal one, and only the user knows.
* **Noise-injecting samplers** (ancestral, SDE, lcm, ddpm, er_sde, sa_solver ...: fresh noise
  enters the latent at every step). Feature caches (FORA, DeepCache, routers, ChangeCache) still
  work - the sampler's own update, with its noise, runs at every step - but a reused feature was
  computed before the latest noise, so the same settings cost more quality than with a
  deterministic sampler: note only. AdaptiveDiffusion decides from how smoothly the latents
  change, which injected noise defeats (its rule assumes an ODE trajectory): it skips nothing
  (policies that need this say `needs_deterministic_sampler = True`) and the note says why.

No host is imported here.
"""
from __future__ import annotations

import math
from typing import Any

FEW_STEPS = 4          # at most this many steps: reuse only from the middle of the schedule
FEW_STEPS_NOTE = 8     # at most this many steps: a note, behaviour unchanged


def guard_window(policy: Any, num_steps: int, window: range, *, injects_noise: bool = False) -> range:
    """The window where `policy` may reuse in a schedule of `num_steps` steps, after the guards."""
    if injects_noise and getattr(policy, "needs_deterministic_sampler", False):
        return range(0)
    if num_steps <= FEW_STEPS:
        start = max(window.start, math.ceil(num_steps / 2))
        return range(start, max(start, window.stop))
    return window


def open_guarded_session(owner: str, units: Any, policy: Any, clock: Any, window: range, *, sampler: str | None = None,
                         injects_noise: bool = False, run_steps: range | None = None) -> Any:
    """A run's CacheSession with the guards applied to its window and their notes on its record
    (every host opens its sessions through this)."""
    from .session import CacheSession
    window = guard_window(policy, clock.num_steps, window, injects_noise=injects_noise)
    session = CacheSession(owner, units, policy, clock, window, run_steps=run_steps)
    session.telemetry.notes.extend(run_notes(session, sampler=sampler, injects_noise=injects_noise))
    return session


def _steps(steps: list[int]) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {', '.join(map(str, steps))}"


def run_notes(session: Any, *, sampler: str | None = None, injects_noise: bool = False) -> list[str]:
    """What the guards did to this run, in plain English (empty when nothing applies).

    session: the run's CacheSession (its policy, clock, window, run steps and static plan)."""
    policy, n = session.policy, session.clock.num_steps
    name = policy.name
    notes = []
    if n <= FEW_STEPS_NOTE:
        if session.plan is not None:
            reused = [s for s in session.run_steps if any(session.plan[s])]
            outcome = (f"{name} reuses at {_steps(reused)}" if reused else f"{name} computes every step (nothing to "
                       f"reuse in so few steps)")
        elif len(session.window):
            outcome = f"{name} may reuse from step {session.window.start} on"
        else:
            outcome = f"{name} computes every step"
        if n <= FEW_STEPS:
            notes.append(f"{n}-step schedule (a few-step, distilled model?): steps this far apart differ too much "
                         f"to reuse early, so reuse starts at the middle at the earliest; {outcome}.")
        else:
            notes.append(f"{n}-step schedule: if this is a few-step (distilled) model, reuse costs more quality "
                         f"than usual; prefer gentler settings (a smaller interval, start_percent 0.5). "
                         f"{outcome[0].upper()}{outcome[1:]}.")
    if injects_noise:
        label = sampler or "this sampler"
        if getattr(policy, "needs_deterministic_sampler", False):
            notes.append(f"{label} adds fresh noise at every step: {name}'s rule (how smoothly the latents change) "
                         f"does not hold, so it skips no step. Use a deterministic sampler (euler, dpmpp_2m, "
                         f"uni_pc) to skip steps.")
        else:
            notes.append(f"{label} adds fresh noise at every step: reused features predate that noise, so "
                         f"{name} costs more quality at the same settings than with a deterministic sampler "
                         f"(euler, dpmpp_2m, uni_pc).")
    return notes
