"""What a ComfyUI sampling run is part of, and what its sampler does to the latent.

**The whole schedule.** KSamplerAdvanced (start_at_step / end_at_step) and SplitSigmas hand the
sampler only its part of the schedule; `transformer_options["sample_sigmas"]` is that same part
(ComfyUI sets it from the sigmas the run got). Wan 2.2 14B samples one schedule with two
experts: the high-noise model runs steps 0..k-1, the low-noise one k..N-1. For step numbers,
windows, FORA's countdown and the sidebar to mean the same in both, a run's steps are counted
in the whole schedule, found from the run's own sigmas (the only thing every host and process
shares - no frame inspection, nothing read from the prompt graph):

* a run whose last sigma is above 0 stops early (leftover noise for a next sampler);
* a run that adds no noise (KSamplerAdvanced add_noise off, DisableNoise: the noise tensor is
  all zeros) and starts below the model's top sigma continues a latent an earlier run left.

Only such runs are located, in this order: the schedules recent split runs were found in (the
second expert finds the first's), then ComfyUI's schedulers for this model at step counts near
the run's (the first expert: which N has the run as its first k steps) - only when every
schedule that holds the run agrees on N and the run's place (ComfyUI's "normal" N-step schedule
starts exactly like "sgm_uniform" at N - 1 steps, and "linear_quadratic" is similar: a first
part sampled with them keeps its own count, as without the split; "simple", "beta", "karras",
"exponential", "kl_optimal" and "ddim_uniform" are unique, checked at 4, 8, 12, 20 steps on a discrete
and a flow model) - then, for a continuation of a recent split run whose schedule was not found
(ambiguous, or a custom scheduler), that run's sigmas followed by this one's. A run that adds
fresh noise part-way (img2img, a KSampler with denoise < 1) is indistinguishable by its sigmas
from a continuation, and is its own schedule, as before. Results are remembered per run sigmas:
the search (about 0.1-0.3 s on 2 CPU cores for a 20-step schedule) runs once per distinct split.

**Noise injection.** Ancestral and SDE samplers call the model at the same sigmas as the
deterministic ones, so sigmas cannot tell them apart; the sampler object the OUTER_SAMPLE
wrapper receives can: a KSAMPLER's function (`sample_euler_ancestral` ...), its defaults
(eta, s_noise, s_churn) and the node's extra options (SamplerEulerAncestral eta 0 is
deterministic).
"""
from __future__ import annotations

import collections
import inspect
import math
from dataclasses import dataclass

import comfy.samplers

from ..core.clock import locate_run

# Samplers that add noise every step without an eta setting to say so.
NOISY_WITHOUT_ETA = frozenset({"ddpm", "lcm", "er_sde", "sa_solver", "sa_solver_pece"})
RECENT = 8                   # schedules of recent split runs, tried first
_recent: collections.deque = collections.deque(maxlen=RECENT)
_found: collections.OrderedDict = collections.OrderedDict()     # run key -> (full, first) or None
_FOUND_MAX = 64


@dataclass(frozen=True)
class RunSchedule:
    """A sampling run as CacheKit counts it."""
    sigmas: list[float]          # the whole schedule the run samples part of (its own when not split)
    steps: range                 # the run's steps in it
    sampler: str | None = None   # the sampler's name, where it has one
    injects_noise: bool = False  # the sampler adds fresh noise at every step

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def split(self) -> bool:
        return self.steps != range(self.num_steps)


def sampler_info(sampler) -> tuple[str | None, bool]:
    """(name, adds noise at every step) of a ComfyUI sampler object."""
    function = getattr(sampler, "sampler_function", None)
    if function is None:
        return (type(sampler).__name__ if sampler is not None else None), False
    name = getattr(function, "__name__", "")
    name = name.removeprefix("sample_").removesuffix("_function").removesuffix("_gpu")
    options = getattr(sampler, "extra_options", None) or {}
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        parameters = {}

    def setting(key):
        if key in options:
            return options[key]
        parameter = parameters.get(key)
        return parameter.default if parameter is not None and parameter.default is not inspect.Parameter.empty else None

    def positive(value) -> bool:
        try:
            return value is not None and float(value) > 0
        except (TypeError, ValueError):
            return False

    s_noise = setting("s_noise")
    if s_noise is not None and not positive(s_noise):
        return name, False
    noisy = positive(setting("eta")) or name in NOISY_WITHOUT_ETA or positive(setting("s_churn"))
    return name, noisy


def _candidates(model_sampling, steps: int, sampler: str | None):
    """Every ComfyUI scheduler at step counts near the run's (with KSampler's variant for dpm_2 /
    uni_pc, which drops the penultimate sigma of a schedule one step longer)."""
    discard = sampler in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    for n in range(max(steps, 1), max(4 * steps, steps + 32) + 1):
        for name in list(comfy.samplers.SCHEDULER_HANDLERS):
            for extra in ((0, 1) if discard else (0,)):
                try:
                    sigmas = comfy.samplers.calculate_sigmas(model_sampling, name, n + extra).tolist()
                except Exception:         # a scheduler another pack added that cannot run here
                    break
                yield sigmas[:-2] + sigmas[-1:] if extra else sigmas


def _continuation(run: list[float]) -> tuple[list[float], int] | None:
    """A recent split run that ended where this one starts, its schedule unknown: theirs + ours."""
    for full in reversed(_recent):
        if full[-1] > 0 and math.isclose(full[-1], run[0], rel_tol=1e-4, abs_tol=1e-6):
            return full[:-1] + run, len(full) - 1
    return None


def locate_schedule(model_sampling, run: list[float], *, adds_noise: bool, sampler: str | None = None
                    ) -> tuple[list[float], int]:
    """(whole schedule, index of the run's first step in it); the run's own sigmas when not split."""
    stops_early = run[-1] > 0
    top = float(getattr(model_sampling, "sigma_max", run[0]))
    continues = not adds_noise and run[0] < top * (1 - 1e-4)
    if len(run) < 2 or not (stops_early or continues):
        return run, 0
    found = locate_run(run, list(_recent), allow_offset=continues)     # the run we continue: exact
    if found is None:
        key = (tuple(round(s, 6) for s in run), continues, type(model_sampling).__name__, sampler)
        if key not in _found:
            _found[key] = locate_run(run, _candidates(model_sampling, len(run) - 1, sampler),
                                     allow_offset=continues, unique=True)
            while len(_found) > _FOUND_MAX:
                _found.popitem(last=False)
        found = _found[key]
    if found is None and continues:
        found = _continuation(run)
    full, first = found if found is not None else (run, 0)
    if stops_early and full not in _recent:
        _recent.append(full)
    return full, first


def run_schedule(guider, noise, sampler, sigmas) -> RunSchedule:
    """The run an OUTER_SAMPLE wrapper sees: (guider, noise, sampler, sigmas) of outer_sample."""
    run = [float(s) for s in sigmas.tolist()]
    name, noisy = sampler_info(sampler)
    if len(run) < 2:
        return RunSchedule(run, range(max(len(run) - 1, 0)), name, noisy)
    model_sampling = guider.model_patcher.get_model_object("model_sampling")
    adds_noise = noise is None or bool(noise.any())
    full, first = locate_schedule(model_sampling, run, adds_noise=adds_noise, sampler=name)
    return RunSchedule(full, range(first, first + len(run) - 1), name, noisy)
