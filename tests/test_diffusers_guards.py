"""The few-step and noisy-sampler guards (core/guards.py) on the diffusers API, as in ComfyUI:
a 4-step schedule reuses only from its middle; an ancestral / SDE scheduler stops adaptive step
skipping and puts a note on the run."""
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LCMScheduler)

import tiny_diffusers as td
from cachekit import apply_adaptive_skip, apply_deepcache, apply_fora, remove_cache
from cachekit.diffusers_host.api import scheduler_injects_noise


def test_noise_injecting_schedulers_are_recognised():
    assert scheduler_injects_noise(EulerAncestralDiscreteScheduler())
    assert scheduler_injects_noise(LCMScheduler())
    assert scheduler_injects_noise(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"))
    assert not scheduler_injects_noise(DPMSolverMultistepScheduler())
    assert not scheduler_injects_noise(DDIMScheduler()) and not scheduler_injects_noise(EulerDiscreteScheduler())
    assert not scheduler_injects_noise(None)


def _reused_steps(run):
    return [s for s, row in enumerate(run.reused) if any(row)]


def test_a_four_step_schedule_reuses_only_from_its_middle():
    model = td.dit()
    sched = td.scheduler(4)
    handle = apply_fora(model, interval=2, scheduler=sched)
    td.sample("dit", model, sched)
    run = handle.finish_run()
    assert _reused_steps(run) == []                # FORA's window (steps 2-3) keeps its ends fresh
    assert "4-step schedule" in run.notes[0]
    remove_cache(model)
    # Unguarded, interval 2 over 4 steps would reuse at steps 1 and 3: the guard changed something.
    handle = apply_fora(model, interval=2, scheduler=td.scheduler(8))
    td.sample("dit", model, td.scheduler(8))
    run = handle.finish_run()
    assert _reused_steps(run) and "8-step schedule" in run.notes[0]      # 5-8 steps: a note only
    remove_cache(model)
    handle = apply_deepcache(td.unet(), cache_interval=2, scheduler=sched)
    unet = handle.model
    td.sample("unet", unet, sched)
    assert _reused_steps(handle.finish_run()) == [3]        # DeepCache: full at step 2, reuse at 3
    remove_cache(unet)


def test_an_ancestral_scheduler_stops_step_skipping_and_says_why():
    model = td.unet()
    sched = EulerAncestralDiscreteScheduler()
    sched.set_timesteps(12)
    handle = apply_adaptive_skip(model, delta=10.0, scheduler=sched)     # would skip a lot on ODE samplers
    td.sample("unet", model, sched)
    run = handle.finish_run()
    assert not run.skipped_steps
    assert any("EulerAncestralDiscreteScheduler adds fresh noise" in n and "skips no step" in n for n in run.notes)
    handle.remove()
    ddim = td.scheduler(12)
    handle = apply_adaptive_skip(model, delta=10.0, scheduler=ddim)
    td.sample("unet", model, ddim)
    run = handle.finish_run()
    assert run.skipped_steps and run.notes == []           # the same settings skip on DDIM
    handle.remove()
