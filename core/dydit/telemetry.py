"""What DyDiT did in one run: active heads, MLP groups and tokens per step and block, and the
share of the blocks' FLOPs that ran.

A RunTelemetry (so run lists, summaries and the panel read it like any method's), whose units
are every block's attention and MLP: `computed[step][unit]` counts the samples that ran the
sub-layer (DyDiT never reuses; a sub-layer that FORA reused, or a step that step skipping
skipped, ran nothing and is not counted here). `cache_bytes` is the peak memory of the sliced
weights.

FLOPs are counted in closed form (torch's FlopCounterMode counts 0 for CPU
scaled_dot_product_attention), for the transformer blocks only (embedders and the final layer
are the same with and without DyDiT): per sample with N tokens, hidden C, h of H heads of width
d, K of N tokens through the MLP with m of M hidden channels, token router width r:
attention 2 N C (3 h d) + 4 h N^2 d + 2 N (h d) C; MLP 4 K C m; token router 2 N (C r + r).
A call that fell back to masking (rows with different timesteps) ran every channel: it counts
full width.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..telemetry import RunTelemetry


@dataclass(frozen=True)
class BlockGeometry:
    hidden: int
    heads: int
    head_dim: int
    mlp_groups: int
    group_width: int
    token_hidden: int

    def attention_flops(self, tokens: int, heads: int) -> float:
        inner = heads * self.head_dim
        return 2.0 * tokens * self.hidden * 3 * inner + 4.0 * heads * tokens * tokens * self.head_dim \
            + 2.0 * tokens * inner * self.hidden

    def mlp_flops(self, tokens: int, groups: int) -> float:
        return 4.0 * tokens * self.hidden * groups * self.group_width

    def token_router_flops(self, tokens: int) -> float:
        return 2.0 * tokens * (self.hidden * self.token_hidden + self.token_hidden)


def _grid(steps: int, depth: int) -> list[list[int]]:
    return [[0] * depth for _ in range(steps)]


@dataclass
class DyDiTTelemetry(RunTelemetry):
    geometry: BlockGeometry | None = None
    depth: int = 0
    head_sum: list[list[int]] = field(default_factory=list)      # [step][block] sum over samples of active heads
    attn_samples: list[list[int]] = field(default_factory=list)  # [step][block] samples that ran attention
    group_sum: list[list[int]] = field(default_factory=list)     # [step][block] sum over samples of active groups
    mlp_samples: list[list[int]] = field(default_factory=list)   # [step][block] samples that ran the MLP
    tokens_kept: list[list[int]] = field(default_factory=list)   # [step][block] tokens through the MLP
    tokens_seen: list[list[int]] = field(default_factory=list)   # [step][block] tokens of those samples
    masked_calls: int = 0            # calls whose rows had different timesteps (ran masked, full width)
    slice_builds: int = 0            # sliced weight sets built during the run
    executed_flops: float = 0.0
    full_flops: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("head_sum", "attn_samples", "group_sum", "mlp_samples", "tokens_kept", "tokens_seen"):
            if not getattr(self, name):
                setattr(self, name, _grid(self.num_steps, self.depth))

    # -- recording --
    def note_attention(self, step: int, block: int, samples: int, tokens: int, head_counts: list[int],
                       masked: bool) -> None:
        """head_counts: active heads of each sample (masked: what the mask keeps; all heads ran)."""
        geo = self.geometry
        self.computed[step][2 * block] += samples
        self.attn_samples[step][block] += samples
        self.head_sum[step][block] += sum(head_counts)
        full = geo.attention_flops(tokens, geo.heads)
        self.full_flops += full * samples
        self.executed_flops += full * samples if masked else sum(geo.attention_flops(tokens, h) for h in head_counts)

    def note_mlp(self, step: int, block: int, samples: int, tokens: int, group_counts: list[int], kept: int,
                 masked: bool, routed: bool) -> None:
        """kept: tokens (of all samples) that ran the MLP; routed: the token router ran."""
        geo = self.geometry
        self.computed[step][2 * block + 1] += samples
        self.mlp_samples[step][block] += samples
        self.group_sum[step][block] += sum(group_counts)
        self.tokens_kept[step][block] += kept
        self.tokens_seen[step][block] += samples * tokens
        self.full_flops += geo.mlp_flops(tokens, geo.mlp_groups) * samples
        width = geo.mlp_groups if masked else sum(group_counts) / max(1, len(group_counts))
        executed = geo.mlp_flops(kept, 1) * width
        if routed:
            executed += geo.token_router_flops(tokens) * samples
        self.executed_flops += executed

    # -- summaries --
    def mean_heads(self) -> list[list[float | None]]:
        return _means(self.head_sum, self.attn_samples)

    def mean_groups(self) -> list[list[float | None]]:
        return _means(self.group_sum, self.mlp_samples)

    def token_keep_rates(self) -> list[list[float | None]]:
        return _means(self.tokens_kept, self.tokens_seen)

    def executed_fraction(self, resolve: bool = True) -> float | None:
        """Share of the transformer blocks' FLOPs that ran (closed form, see the module doc)."""
        return self.executed_flops / self.full_flops if self.full_flops else None

    def as_dict(self, resolve: bool = True) -> dict:
        record = super().as_dict(resolve)
        record["dydit"] = {
            "mean_heads": self.mean_heads(), "mean_groups": self.mean_groups(),
            "token_keep_rates": self.token_keep_rates(), "heads": self.geometry.heads if self.geometry else None,
            "mlp_groups": self.geometry.mlp_groups if self.geometry else None,
            "masked_calls": self.masked_calls, "slice_builds": self.slice_builds,
            "slice_cache_bytes": self.cache_bytes, "block_flops_executed": self.executed_fraction(),
        }
        return record

    def summary(self) -> str:
        frac = self.executed_fraction()
        heads = _overall(self.head_sum, self.attn_samples)
        groups = _overall(self.group_sum, self.mlp_samples)
        tokens = _overall(self.tokens_kept, self.tokens_seen)
        parts = [f"DyDiT on {self.family}: {self.num_steps} steps, {self.depth} blocks"]
        if heads is not None and self.geometry is not None:
            parts.append(f"heads {heads:.1f}/{self.geometry.heads}")
        if groups is not None and self.geometry is not None:
            parts.append(f"MLP groups {groups:.1f}/{self.geometry.mlp_groups}")
        if tokens is not None:
            parts.append(f"tokens through the MLP {tokens:.0%}")
        if frac is not None:
            parts.append(f"block FLOPs executed {frac:.0%}")
        if self.masked_calls:
            parts.append(f"{self.masked_calls} calls masked (rows with different timesteps)")
        return ", ".join(parts)


class DyDiTRun:
    """A run as core/lifecycle.RunLifecycle sees it: its telemetry, finished once on close."""

    def __init__(self, telemetry: DyDiTTelemetry):
        self.telemetry = telemetry

    def close(self) -> DyDiTTelemetry:
        self.telemetry.finish()
        return self.telemetry


def _means(sums: list[list[int]], counts: list[list[int]]) -> list[list[float | None]]:
    return [[s / c if c else None for s, c in zip(srow, crow)] for srow, crow in zip(sums, counts)]


def _overall(sums: list[list[int]], counts: list[list[int]]) -> float | None:
    total = sum(map(sum, counts))
    return sum(map(sum, sums)) / total if total else None
