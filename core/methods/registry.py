"""The method registry: one declaration per method, read by every host and tool.

A `MethodSpec` says everything the rest of CacheKit needs to know about a method, as data:

* `key` (settings' "method", CLI names) and `name` (what people and telemetry read);
* `config`: the validated config dataclass; its fields are the method's keyword settings
  (diffusers `apply_*`, ComfyUI node widgets, autotune settings);
* `level` ("unit": blocks / sub-layers of one model call, or "call": the whole model call) and
  `fits` ("unet", "dit" or "any"): which host machinery and which models;
* `policy`: config -> the policy a CacheSession runs (core/methods/base.py);
* `settings`: the inputs a UI shows, as plain data (`Setting`: name, type, default, range,
  options, help text), in widget order - the ComfyUI nodes turn them into widgets; the preview
  panel shows the few in `main_settings`;
* `off`: the settings that turn caching off (the model then computes exactly as unpatched);
* `ladder`: autotune's candidate settings (None: the method is not tuned);
* `summary` (one line) and `node` (the ComfyUI node's id, title and description);
* `bench`: the settings the peer benchmark runs; `hosts`: a host's public function for the
  method, by name (e.g. {"diffusers": "apply_deepcache"}), where the host has one; a method
  without one is applied by the host's generic path from `level`, `fits` and `policy`.

Who reads it: nodes/method_nodes.py (node classes, apply_method), nodes/autotune_node.py,
diffusers_host/registry.py (apply by key) and diffusers_host/autotune.py, panel/engine.py,
bench/methods.py, scripts/benchmark.py, core/autotune.py. They read it on every use, so a
method registered later (a plugin, a test) appears everywhere but in ComfyUI's node list, which
is made when ComfyUI loads the pack. A new method is its policy file,
one `register(MethodSpec(...))` below, tests and a workflow.

Pure torch: no host (ComfyUI, diffusers, gradio) is imported here.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from ..reuse import STRATEGIES
from ..units import UnitMap
from .adaptive import AdaptiveConfig, AdaptivePolicy
from .change import ChangeConfig, ChangePolicy
from .deepcache import SCHEDULES, DeepCacheConfig, DeepCachePolicy, max_branch
from .fora import ForaConfig, ForaPolicy
from .router import RouterPolicy, check_threshold

LEVELS = ("unit", "call")
FITS = ("unet", "dit", "any")
FITS_TEXT = {"unet": "U-Nets", "dit": "DiTs", "any": "any model"}
SETTING_TYPES = ("int", "float", "combo", "bool")
RESERVED = ("model", "settings", "scheduler", "num_inference_steps", "target")   # host arguments, never settings


@dataclass(frozen=True)
class Setting:
    """One input of a method, as a UI shows it. `role` marks a setting other tools look for
    by meaning: "interval" (compute everything every N steps; 1 = off), "branch"."""
    name: str
    type: str
    default: Any
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: tuple = ()
    tooltip: str = ""
    role: str = ""
    label: str = ""            # short name in benchmark rows ("N"); the name when empty
    # A setting added after release: hosts let callers omit it (ComfyUI: an optional input, so
    # API-format prompts saved before it still validate) and the config's default fills it.
    optional: bool = False

    def __post_init__(self) -> None:
        if self.type not in SETTING_TYPES:
            raise ValueError(f"setting {self.name!r}: type must be one of {SETTING_TYPES}, got {self.type!r}")
        if self.name in RESERVED:
            raise ValueError(f"setting name {self.name!r} is reserved for host arguments {RESERVED}")
        if self.type == "combo" and self.default not in self.options:
            raise ValueError(f"setting {self.name!r}: default {self.default!r} is not among options {self.options}")
        if self.type in ("int", "float"):
            low = -float("inf") if self.min is None else self.min
            high = float("inf") if self.max is None else self.max
            if not low <= self.default <= high:
                raise ValueError(f"setting {self.name!r}: default {self.default!r} is outside [{self.min}, {self.max}]")

    def coerce(self, value: Any) -> Any:
        """A UI value as the config wants it: floats as float, whole-number floats of int settings as int."""
        if self.type == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if self.type == "int" and isinstance(value, float) and value.is_integer():
            return int(value)
        return value


@dataclass(frozen=True)
class NodeSpec:
    """The method's ComfyUI node. `description` may name host facts in braces ({dit_families}),
    filled in by the node module. `generated`: False where the node is written by hand."""
    node_id: str
    display_name: str
    description: str
    output_tooltip: str
    generated: bool = True


@dataclass(frozen=True)
class MethodSpec:
    key: str
    name: str
    config: type
    level: str
    fits: str
    policy: Callable[[Any], Any]
    summary: str
    off: Mapping[str, Any]
    settings: tuple[Setting, ...] = ()
    main_settings: tuple[str, ...] = ()          # the few a compact UI shows (the preview panel)
    ladder: Callable[[UnitMap | None], list[list[dict]]] | None = None
    bench: tuple[Mapping[str, Any], ...] = ()
    node: NodeSpec | None = None
    hosts: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"method {self.key!r}"
        if not self.key or not self.key.isidentifier() or self.key != self.key.lower():
            raise ValueError(f"{where}: the key must be a lower-case identifier")
        if self.level not in LEVELS:
            raise ValueError(f"{where}: level must be one of {LEVELS}, got {self.level!r}")
        if self.fits not in FITS:
            raise ValueError(f"{where}: fits must be one of {FITS}, got {self.fits!r}")
        if not dataclasses.is_dataclass(self.config):
            raise ValueError(f"{where}: config must be a dataclass")
        fields = self.fields()
        names = [s.name for s in self.settings]
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: setting names repeat: {names}")
        for name in (*names, *self.off, *self.main_settings, *(k for b in self.bench for k in b)):
            if name not in fields:
                raise ValueError(f"{where}: {name!r} is not a field of {self.config.__name__} ({', '.join(fields)})")
        for setting in self.settings:
            default = fields[setting.name].default
            if default is not dataclasses.MISSING and default != setting.default:
                raise ValueError(f"{where}: setting {setting.name!r} defaults to {setting.default!r} but "
                                 f"{self.config.__name__} to {default!r}")

    # -- reading --
    def fields(self) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(self.config)}

    def required(self) -> tuple[str, ...]:
        """Config fields without a default (e.g. a router): a caller must always pass them."""
        return tuple(n for n, f in self.fields().items()
                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)

    def setting(self, name: str) -> Setting | None:
        return next((s for s in self.settings if s.name == name), None)

    def with_role(self, role: str) -> Setting | None:
        return next((s for s in self.settings if s.role == role), None)

    @property
    def tunable(self) -> bool:
        return self.ladder is not None

    def fits_model(self, kind: str) -> bool:
        """Whether the method applies to a model of this kind ("unet" or "dit")."""
        return self.fits in ("any", kind)

    def defaults(self) -> dict[str, Any]:
        return {s.name: s.default for s in self.settings}

    def label(self, settings: Mapping[str, Any]) -> str:
        """Settings in a few characters, as benchmark rows show them: "N=3 branch=0"."""
        def short(name):
            setting = self.setting(name)
            return (setting.label or setting.name) if setting else name
        return " ".join(f"{short(k)}={v}" for k, v in settings.items())

    # -- making --
    def make_config(self, settings: Mapping[str, Any] | None = None):
        """The validated config from keyword settings (the config's defaults fill the rest)."""
        settings = dict(settings or {})
        unknown = sorted(set(settings) - set(self.fields()))
        if unknown:
            raise ValueError(f"{self.name} has no setting {', '.join(map(repr, unknown))}; its settings are "
                             f"{', '.join(self.fields())}.")
        missing = [n for n in self.required() if n not in settings]
        if missing:
            raise ValueError(f"{self.name} needs {', '.join(missing)}.")
        return self.config(**settings)

    def make_policy(self, config):
        return self.policy(config)

    def ladders(self, units: UnitMap | None = None) -> list[list[dict]]:
        """Autotune's candidates, each ladder from gentle to aggressive. `units`: the model's unit
        map where the host has it (DeepCache's branches depend on the U-Net)."""
        if self.ladder is None:
            raise ValueError(f"{self.name} has no autotune ladder; tune one of {tuple(tunable_keys())}.")
        return self.ladder(units)

    @staticmethod
    def check_units(policy, units: UnitMap) -> None:
        """Run the policy's own checks against the model's units (branch depth, router layout)."""
        for hook in ("validate", "check_units"):
            check = getattr(policy, hook, None)
            if check is not None:
                check(units)

    @staticmethod
    def window(config) -> tuple[float, float]:
        """The [start, end) share of the sampling in which caching is active."""
        return float(getattr(config, "start_percent", 0.0)), float(getattr(config, "end_percent", 1.0))


# -- the registry ------------------------------------------------------------------------------
_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Add a method. Keys, names and node ids must be new (unless `replace` names the same key)."""
    def identity(s: MethodSpec) -> dict:
        return {"key": s.key, "name": s.name, "node id": s.node.node_id if s.node else None}
    for other in _REGISTRY.values():
        if replace and other.key == spec.key:
            continue
        mine = identity(spec)
        for what, value in identity(other).items():
            if value is not None and value == mine[what]:
                raise ValueError(f"method {spec.key!r}: {what} {value!r} is already registered by {other.key!r}")
    _REGISTRY[spec.key] = spec
    return spec


def unregister(key: str) -> None:
    _REGISTRY.pop(key, None)


def get(key: str) -> MethodSpec:
    try:
        return _REGISTRY[key]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {key!r}; choose one of {tuple(_REGISTRY)}") from None


def by_name(name: str) -> MethodSpec:
    for spec in _REGISTRY.values():
        if spec.name == name:
            return spec
    raise ValueError(f"unknown method {name!r}; choose one of {tuple(s.name for s in _REGISTRY.values())}")


def methods() -> list[MethodSpec]:
    """Every registered method, in registration order."""
    return list(_REGISTRY.values())


def keys() -> list[str]:
    return list(_REGISTRY)


def tunable_keys() -> list[str]:
    return [s.key for s in _REGISTRY.values() if s.tunable]


class LiveNames(Sequence):
    """A tuple-like view that reads the registry on every use, so a method registered later
    (a plugin, a test) shows up in every list built from it."""

    def __init__(self, build: Callable[[], Iterable[str]]):
        self._build = build

    def _items(self) -> tuple:
        return tuple(self._build())

    def __getitem__(self, index):
        return self._items()[index]

    def __len__(self) -> int:
        return len(self._items())

    def __iter__(self) -> Iterator:
        return iter(self._items())

    def __contains__(self, item) -> bool:
        return item in self._items()

    def __eq__(self, other) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, (tuple, list, LiveNames)) else NotImplemented

    def __repr__(self) -> str:
        return repr(self._items())


class LiveMapping(Mapping):
    """A read-only dict view rebuilt from the registry on every use (see LiveNames)."""

    def __init__(self, build: Callable[[], dict]):
        self._build = build

    def __getitem__(self, key):
        return self._build()[key]

    def __iter__(self) -> Iterator:
        return iter(self._build())

    def __len__(self) -> int:
        return len(self._build())

    def __repr__(self) -> str:
        return repr(self._build())


# -- shared settings ---------------------------------------------------------------------------
def percent_settings(start_default: float = 0.0, end_default: float = 1.0) -> tuple[Setting, Setting]:
    return (
        Setting("start_percent", "float", start_default, 0.0, 1.0, 0.01, label="start",
                tooltip="Caching starts at this fraction of the sampling (by sigma); before it every step is "
                        "computed."),
        Setting("end_percent", "float", end_default, 0.0, 1.0, 0.01,
                tooltip="Caching ends at this fraction of the sampling; after it every step is computed."),
    )


def reuse_setting() -> Setting:
    """How a unit method's reused features are produced (core/reuse.py). Declared last, so saved
    workflows from before it still line up by position."""
    return Setting("reuse", "combo", "hold", options=STRATEGIES, optional=True,
                   tooltip="How reused features are produced: hold = last computed value (the published method); "
                           "forecast1/2 = Taylor extrapolation from the last refreshes (TaylorSeer), order 1 or 2; "
                           "keeps 2 or 3 tensors per cached unit. Forecasts want a warm-up: start_percent about 0.1 "
                           "(the first steps change the features most).")


# Forecast reuse is tried after hold at each candidate, from interval 3 on (at 2 a reused step is
# one step from a refresh, where holding is already close), order 1 (2 tensors per unit) first.
FORECASTS = ("forecast1", "forecast2")
FORECAST_INTERVALS = (3, 4, 5, 6, 8)
# Shallow branches are fastest; deeper ones keep more of the U-Net live (quality for speed).
DEEPCACHE_BRANCHES = (0, 1, 2, 3, 4, 6, 8)
INTERVALS = (2, 3, 4, 5, 6, 8)


def deepcache_branches(deepest: int) -> list[int]:
    """The candidate branches a U-Net with branches 0..deepest has."""
    return [b for b in DEEPCACHE_BRANCHES if b <= deepest]


def _with_forecasts(hold: list[dict], forecast: list[dict]) -> list[list[dict]]:
    """A hold ladder, then the same candidates (from FORECAST_INTERVALS) with each forecast order.
    Every candidate names its reuse, so tuned settings never inherit a node's widget."""
    return [[{**c, "reuse": "hold"} for c in hold]] + [[{**c, "reuse": r} for c in forecast] for r in FORECASTS]


def _deepcache_ladder(units: UnitMap | None) -> list[list[dict]]:
    """Per branch, shallowest (fastest) first: hold; for the two shallowest branches (where reuse
    costs the most quality) also forecast1 and forecast2."""
    branches = deepcache_branches(max_branch(units)) if units is not None else (0, 1, 2)
    ladders = []
    for i, b in enumerate(branches):
        hold = [{"cache_interval": n, "cache_branch": b} for n in INTERVALS]
        if i < 2:
            ladders += _with_forecasts(hold, [{"cache_interval": n, "cache_branch": b} for n in FORECAST_INTERVALS])
        else:
            ladders.append([{**c, "reuse": "hold"} for c in hold])
    return ladders


# FORA with forecast reuse from 12 % of the steps (3 of 25 computed first, TaylorSeer's
# "first_enhance" warm-up): the first steps change the features most, and a forecast built from
# them extrapolates badly. On the bundled DiT (DDIM 25) N=3 forecast2 gives 12.8 dB from step 0
# and 31.2 dB with this warm-up, for 2 more computed steps of 25.
FORA_WARMUP = 0.12


def _fora_ladder(units: UnitMap | None) -> list[list[dict]]:
    """From step 0 (fastest): hold, forecast1, forecast2; forecast1 / forecast2 after a warm-up;
    then hold from 20 % of the steps."""
    first = _with_forecasts([{"interval": n, "start_percent": 0.0} for n in INTERVALS],
                            [{"interval": n, "start_percent": 0.0} for n in FORECAST_INTERVALS])
    warm = [[{"interval": n, "start_percent": FORA_WARMUP, "reuse": r} for n in INTERVALS] for r in FORECASTS]
    return first + warm + [[{"interval": n, "start_percent": 0.2, "reuse": "hold"} for n in INTERVALS]]


def _adaptive_ladder(units: UnitMap | None) -> list[list[dict]]:
    """Forecast2 at cap 1 (no two skips in a row; at delta 1.0 every other step skips after the
    warm-up, from 8 steps down to the official 4: on the bundled DiT the most accurate step
    skipping at 1.5-1.75x), hold at caps 2 and 4, then forecast1 / forecast2 at cap 2 (a skipped
    step's prediction extrapolated from the computed ones: on the bundled DiT +7 dB over hold at
    the same speed)."""
    deltas = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
    return ([[{"delta": 1.0, "max_skip_steps": 1, "reuse": "forecast2", "warmup_steps": w} for w in (8, 6, 4)],
             [{"delta": d, "max_skip_steps": 1, "reuse": "forecast2"} for d in (0.02, 0.1)]]
            + [[{"delta": d, "max_skip_steps": m, "reuse": "hold"} for d in deltas] for m in (2, 4)]
            + [[{"delta": d, "max_skip_steps": 2, "reuse": r} for d in deltas] for r in FORECASTS])


# -- the methods -------------------------------------------------------------------------------
register(MethodSpec(
    key="deepcache", name="DeepCache", config=DeepCacheConfig, level="unit", fits="unet", policy=DeepCachePolicy,
    summary="Runs the full U-Net every N steps; in between only the shallow layers run and the deep features "
            "are reused.",
    settings=(
        Setting("cache_interval", "int", 3, 1, 100, role="interval", label="N",
                tooltip="A full U-Net step every N steps (uniform schedule). 1 disables caching."),
        Setting("cache_branch", "int", 0, 0, 100, role="branch", label="branch",
                tooltip="Which skip branch stays live: 0 = shallowest (fastest). Same meaning as the official "
                        "DeepCacheSDHelper."),
        Setting("schedule", "combo", "uniform", options=SCHEDULES,
                tooltip="uniform: full step every cache_interval steps. non-uniform: the official quadratic schedule, "
                        "same number of full steps, packed around center."),
        Setting("center", "int", 15, 0, 1000, tooltip="non-uniform only: the step around which full steps gather."),
        Setting("power", "float", 1.4, 1.01, 3.0, 0.01,
                tooltip="non-uniform only: how strongly full steps gather around center."),
        *percent_settings(),
        reuse_setting(),
    ),
    main_settings=("cache_interval", "cache_branch", "reuse"),
    off={"cache_interval": 1, "cache_branch": 0},
    ladder=_deepcache_ladder,
    bench=(*({"cache_interval": n, "cache_branch": b} for n in (2, 3, 5) for b in (0, 1)),
           *({"cache_interval": n, "cache_branch": b, "reuse": r} for n in (3, 5) for b in (0, 1)
             for r in ("forecast1", "forecast2"))),
    node=NodeSpec("CacheKitDeepCache", "DeepCache (CacheKit)",
                  "DeepCache for U-Nets (SD1.x, SD2.x, SDXL and its refiner, SVD video): on cache steps only the "
                  "shallow branch of the U-Net runs; the deep features come from the last full step.",
                  "The model with DeepCache."),
    hosts={"diffusers": "apply_deepcache"},
))

register(MethodSpec(
    key="fora", name="FORA", config=ForaConfig, level="unit", fits="dit", policy=ForaPolicy,
    summary="Computes every transformer block every N steps and reuses the blocks' attention and MLP outputs "
            "in between, after the first share of steps runs in full.",
    settings=(
        Setting("interval", "int", 3, 1, 100, role="interval", label="N",
                tooltip="Refresh every N steps (the first and last steps are always computed). 1 disables caching."),
        *percent_settings(),
        reuse_setting(),
    ),
    main_settings=("interval", "start_percent", "reuse"),
    off={"interval": 1, "start_percent": 0.0},
    ladder=_fora_ladder,
    bench=(*({"interval": n} for n in (2, 3, 4, 5)),
           *({"interval": n, "reuse": r} for n in (2, 3, 4) for r in ("forecast1", "forecast2")),
           *({"interval": n, "start_percent": FORA_WARMUP, "reuse": r}
             for n, r in ((2, "forecast1"), (3, "forecast1"), (3, "forecast2"), (4, "forecast1"), (4, "forecast2"),
                          (5, "forecast2")))),
    node=NodeSpec("CacheKitFORA", "FORA (CacheKit)",
                  "FORA for DiTs: every N steps compute everything; in between reuse each block's attention and MLP "
                  "outputs. Covers {dit_families}. {dit_block_families} reuse whole-block residuals (their attention "
                  "is computed inline in the block).",
                  "The model with FORA."),
    hosts={"diffusers": "apply_fora"},
))

register(MethodSpec(
    key="adaptive", name="AdaptiveDiffusion", config=AdaptiveConfig, level="call", fits="any", policy=AdaptivePolicy,
    summary="Skips whole steps, reusing the last noise prediction while the latents change smoothly "
            "(delta: how much change is tolerated).",
    settings=(
        Setting("delta", "float", 0.01, 0.0, 1.0, 0.001,
                tooltip="Skip threshold. 0 never skips; larger skips more. 0.01 is the official default."),
        Setting("max_skip_steps", "int", 4, 1, 100, label="max_skip",
                tooltip="At most this many skipped steps in a row. 1 with a forecast reuse (and delta 1.0: every "
                        "other step skips) is the most accurate at up to 1.8x. (The official code lets the first run "
                        "of skips after the warm-up reach 5 whatever this is; CacheKit keeps the cap.)"),
        Setting("reuse", "combo", "hold", options=STRATEGIES, optional=True,
                tooltip="What a skipped step uses: hold = the previous noise prediction (the published method); "
                        "forecast1/2 = extrapolated from the last computed steps (Taylor order 1 or 2)."),
        Setting("warmup_steps", "int", 4, 4, 1000, optional=True, label="warmup",
                tooltip="Steps that always run before any skip. 4 is the official (the fewest the rule can decide "
                        "from); more keeps the noisiest steps exact, which helps forecast reuse most."),
    ),
    main_settings=("delta", "max_skip_steps", "reuse"),
    off={"delta": 0.0, "max_skip_steps": 4},
    ladder=_adaptive_ladder,
    bench=(*({"delta": d, "max_skip_steps": 4} for d in (0.01, 0.05, 0.2)),
           *({"delta": d, "max_skip_steps": 2} for d in (0.02, 0.05)),
           *({"delta": d, "max_skip_steps": m, "reuse": "forecast1"} for d, m in ((0.02, 2), (0.05, 2), (0.05, 4))),
           {"delta": 0.02, "max_skip_steps": 2, "reuse": "forecast2"},
           # between the cap-2 and cap-4 rows (the >= 1.5x band on the bundled DiT is decided here)
           *({"delta": 0.01, "max_skip_steps": 3, "reuse": r} for r in ("hold", "forecast1")),
           {"delta": 0.03, "max_skip_steps": 2, "reuse": "forecast1"},
           # cap 1 at delta 1.0: every other step skips, forecast from the neighbouring computed
           # steps (on the bundled DiT, 288 images: 39.1 dB at 1.74x, +4.8 dB over SeaCache 0.25;
           # diffusers' TaylorSeer lite computes the same and ties it)
           *({"delta": 1.0, "max_skip_steps": 1, "reuse": r} for r in ("forecast1", "forecast2")),
           *({"delta": 1.0, "max_skip_steps": 1, "reuse": "forecast2", "warmup_steps": w} for w in (6, 8))),
    node=NodeSpec("CacheKitAdaptiveSkip", "Adaptive Step Skip (CacheKit)",
                  "AdaptiveDiffusion for any model: a step reuses the previous noise prediction when the latents "
                  "change smoothly (third-order difference small against the first-order one). A skipped step runs "
                  "nothing: no CFG branch, no ControlNet. The first 4 steps always run. Samplers with several model "
                  "calls per step (heun, dpm_2) decide once per step, on the first call.",
                  "The model with adaptive step skipping."),
    hosts={"diffusers": "apply_adaptive_skip"},
))


def _change_ladder(units: UnitMap | None) -> list[list[dict]]:
    """Thresholds from gentle to aggressive; hold, then forecast1; U-Nets at branches 0 and 1."""
    branches = (0, 1) if units is None or units.geometry is not None else (0,)
    return [[{"threshold": t, "cache_branch": b, "reuse": r}
             for t in (0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.3, 0.5)]
            for b in branches for r in ("hold", "forecast1")]


register(MethodSpec(
    key="change", name="ChangeCache", config=ChangeConfig, level="unit", fits="any", policy=ChangePolicy,
    summary="Decides each step from how much the first block's output changed since the last full step "
            "(First Block Cache / TeaCache family): below the threshold the other blocks are reused.",
    settings=(
        Setting("threshold", "float", 0.1, 0.0, 10.0, 0.005, label="t",
                tooltip="Reuse while the first block's relative change since the last full step is below this. "
                        "0 never reuses; larger reuses more."),
        Setting("warmup_steps", "int", 2, 0, 1000, label="warmup",
                tooltip="The first steps of the active range always compute everything."),
        Setting("max_reuse", "int", 3, 0, 1000, label="max_reuse",
                tooltip="At most this many reused steps in a row; 0 removes the cap."),
        Setting("cache_branch", "int", 0, 0, 100, role="branch", label="branch",
                tooltip="U-Nets only: which skip branch stays live on reused steps (0 = fastest), as DeepCache. "
                        "DiTs reuse every block after the first."),
        *percent_settings(),
        reuse_setting(),
    ),
    main_settings=("threshold", "max_reuse", "reuse"),
    off={"threshold": 0.0},
    ladder=_change_ladder,
    # U-Nets' first layer changes about ten times less than a DiT's first block: both scales.
    bench=(*({"threshold": t} for t in (0.01, 0.02, 0.05, 0.1, 0.2)),
           *({"threshold": t, "reuse": "forecast1"} for t in (0.02, 0.1))),
    node=NodeSpec("CacheKitChangeCache", "Change Cache (CacheKit)",
                  "Online, change-driven caching for U-Nets and DiTs (the First Block Cache / TeaCache family): each "
                  "step runs the first block; when its output changed less than the threshold since the last full "
                  "step, the other blocks (a U-Net's deep part) reuse their stored values. Covers {dit_families} "
                  "and SD1.x / SD2.x / SDXL.",
                  "The model with change-driven caching."),
))


@dataclass(frozen=True)
class RouterConfig:
    """A learned L2C / HarmoniCa router: a `Router`, or a router file (CacheKit .safetensors, an
    official L2C .pt). threshold None: the router's own; 0 recomputes everything (caching off)."""
    router: Any
    threshold: float | None = None
    reuse: str | None = None       # None: the reuse the router was trained for (hold for official ones)

    def __post_init__(self) -> None:
        from ..routers import Router
        from .deepcache import check_reuse
        if self.reuse is not None:
            check_reuse(self.reuse)
        if not isinstance(self.router, (Router, str, os.PathLike)):
            raise ValueError(f"router must be a Router or a router file, got {type(self.router).__name__}.")
        check_threshold(self.threshold)


def router_policy(config: RouterConfig) -> RouterPolicy:
    from ..routers import Router, load_any
    router = config.router if isinstance(config.router, Router) else load_any(config.router)
    return RouterPolicy(router, config.threshold, config.reuse)


register(MethodSpec(
    key="router", name="Router", config=RouterConfig, level="unit", fits="dit", policy=router_policy,
    summary="A learned HarmoniCa router decides per step and layer what to reuse (the bundled one is "
            "trained for 25 steps).",
    off={"threshold": 0.0},
    # Written by hand (nodes/router_node.py): its router list comes from ComfyUI's model folders,
    # and its threshold 0 means "the router's own".
    node=NodeSpec("CacheKitRouter", "Learned Router (CacheKit)",
                  "Learning-to-Cache / HarmoniCa: a trained router decides, per step and sub-layer, whether to "
                  "recompute or reuse the cached output.",
                  "The model with the learned router.", generated=False),
    hosts={"diffusers": "apply_router"},
))
