"""The one agreement point of online decisions.

An online policy decides from something measured during the run (how much the latent or an
early unit's output changed). Under `torch.distributed` every rank sees different data (its CFG
half, its batch shard), and ranks that decide differently would run different units: the
collectives inside the model (tensor / sequence parallelism) would then hang. So every online
probe passes `agree` before the decision: with a process group initialised, the probe is
averaged over all ranks (one all-reduce of a few numbers per step), and the decision, a pure
function of the agreed probe, is the same on every rank. Without a process group (or with a
world of one) the probe is returned unchanged, so single-process decisions are bit-identical to
the reference code's. Static policies plan up front and never call this.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def distributed_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.compiler.disable
def agree(probe: torch.Tensor, group=None) -> torch.Tensor:
    """The mean of `probe` over the ranks of `group` (the default group), or `probe` itself."""
    if distributed_world() == 1:
        return probe
    values = probe.detach().to(torch.float64).clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    values /= dist.get_world_size(group)
    return values.to(probe.dtype)
