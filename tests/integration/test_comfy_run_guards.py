"""The few-step and noise-injection guards (core/guards.py) in real ComfyUI, on tiny models.

A run with few steps or a sampler that injects noise every step gets a note in its run record
(the sidebar shows it, tests/integration/test_browser_comfyui.py) and one log line, and the
guard's default: with <= 4 steps reuse starts at the middle of the schedule; with a noisy
sampler AdaptiveDiffusion skips nothing and feature caches are unchanged.
"""
from __future__ import annotations

import logging

import pytest
import torch

from .test_comfy_methods import _last_run, _sample

FORA = {"interval": 2, "start_percent": 0.0, "end_percent": 1.0}
DEEPCACHE = {"cache_interval": 2, "cache_branch": 0, "schedule": "uniform", "center": 15, "power": 1.4,
             "start_percent": 0.0, "end_percent": 1.0}
SKIPPY = {"delta": 1.0, "max_skip_steps": 2}
NOISY = {"euler_ancestral", "euler_ancestral_cfg_pp", "dpm_2_ancestral", "dpmpp_2s_ancestral",
         "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
         "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
         "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "er_sde", "seeds_2", "seeds_3",
         "sa_solver", "sa_solver_pece"}


def test_every_comfyui_sampler_is_classed_by_whether_it_injects_noise(comfy):
    import comfy.samplers as samplers
    info = comfy.pack("nodes.comfy_schedule").sampler_info
    noisy = {name for name in samplers.SAMPLER_NAMES if info(samplers.sampler_object(name))[1]}
    assert noisy == NOISY
    # The custom-sampler nodes' options count: ancestral with eta 0 (or s_noise 0) adds no noise.
    assert info(samplers.ksampler("euler_ancestral", {"eta": 0.0, "s_noise": 1.0}))[1] is False
    assert info(samplers.ksampler("dpmpp_2m_sde", {"eta": 1.0, "s_noise": 0.0}))[1] is False
    assert info(samplers.ksampler("euler", {"s_churn": 0.5}))[1] is True
    assert info(samplers.ksampler("dpmpp_2m_sde_gpu", {"eta": 0.5}))[0] == "dpmpp_2m_sde"


def _logged(caplog, notes):
    """CacheKit's log lines that carry any of these notes."""
    return [r.getMessage() for r in caplog.records
            if r.name == "CacheKit" and any(note in r.getMessage() for note in notes)]


def test_four_steps_fora_caches_nothing_says_why_and_stays_exact(comfy, caplog):
    ref = _sample(comfy, "wan", "g-wan4-ref", steps=4)
    with caplog.at_level(logging.INFO, logger="CacheKit"):
        out = _sample(comfy, "wan", "g-wan4", ("CacheKitFORA", FORA), steps=4)
    run = _last_run(comfy)
    # Reuse could start at step 2; FORA's window [2, 4) refreshes its first and last step.
    assert torch.equal(out, ref) and run.hit_rate == 0
    assert len(run.notes) == 1 and run.notes[0].startswith("4-step schedule") and "computes every step" in run.notes[0]
    logged = _logged(caplog, run.notes)
    assert len(logged) == 1 and "\n" not in logged[0] and logged[0].startswith("CacheKit: FORA: 4-step schedule")


def test_four_steps_deepcache_reuses_only_in_the_second_half(comfy):
    _sample(comfy, "sd15", "g-sd4", ("CacheKitDeepCache", DEEPCACHE), steps=4)
    run = _last_run(comfy)
    # Unguarded, interval 2 would reuse at steps 1 and 3; from the middle on, only at 3.
    assert [s for s, rate in enumerate(run.step_hit_rates()) if rate] == [3]
    assert "DeepCache reuses at step 3" in run.notes[0]


def test_six_steps_get_a_note_and_cache_as_usual(comfy):
    _sample(comfy, "wan", "g-wan6", ("CacheKitFORA", {**FORA, "interval": 3}), steps=6)
    run = _last_run(comfy)
    refresh = comfy.pack("core.methods.fora").refresh_steps(6, 3)
    assert [s for s, rate in enumerate(run.step_hit_rates()) if rate] == [s for s in range(6) if s not in refresh]
    assert len(run.notes) == 1 and run.notes[0].startswith("6-step schedule")


def test_a_long_deterministic_run_has_no_note(comfy):
    _sample(comfy, "wan", "g-wan12", ("CacheKitFORA", FORA), steps=12)
    assert _last_run(comfy).notes == []


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde"])
def test_a_noise_injecting_sampler_is_noted_and_fora_caches_as_with_euler(comfy, sampler, caplog):
    _sample(comfy, "wan", "g-wan-euler", ("CacheKitFORA", FORA), steps=12)
    plain = _last_run(comfy)
    with caplog.at_level(logging.INFO, logger="CacheKit"):
        _sample(comfy, "wan", f"g-wan-{sampler}", ("CacheKitFORA", FORA), steps=12, sampler=sampler)
    noisy = _last_run(comfy)
    assert noisy.reused == plain.reused and noisy.hit_rate > 0
    assert len(noisy.notes) == 1 and noisy.notes[0].startswith(f"{sampler} adds fresh noise at every step")
    assert len(_logged(caplog, noisy.notes)) == 1


def test_adaptive_skipping_skips_nothing_with_an_ancestral_sampler(comfy):
    _sample(comfy, "sd15", "g-ad-euler", ("CacheKitAdaptiveSkip", SKIPPY), steps=12)
    assert _last_run(comfy).skipped_steps            # these settings skip with a deterministic sampler
    _sample(comfy, "sd15", "g-ad-anc", ("CacheKitAdaptiveSkip", SKIPPY), steps=12, sampler="euler_ancestral")
    run = _last_run(comfy)
    assert run.skipped_steps == [] and run.hit_rate == 0
    assert len(run.notes) == 1 and "skips no step" in run.notes[0]
    record = comfy.pack("nodes.history").recent_json(limit=1)[0]
    assert record["telemetry"]["notes"] == run.notes
