"""Op: BatchNorm's cross-process reductions for synchronized batch statistics (as nn.SyncBatchNorm).

Forward: each process has its batch's per-channel mean and biased variance over `count` values
(a conv epilogue's moments, or channel_var_mean). One all-reduce of [count, sum, sum of squares]
per BatchNorm gives the statistics of the whole batch over every process, whatever each
process's batch size. The sums are taken in float64: sum(x^2) - n * mean^2 cancels about
log10((mean / std)^2) digits, harmless in float64's 16 (a mean 1e3 times the std loses 6).
Backward: one all-reduce of BatchNorm's two per-channel sums, sum(dz) and sum(dz * (x - mean)),
for the input gradient. The weight and bias gradients stay local: DistributedDataParallel
averages parameter gradients itself.
"""
from typing import NamedTuple, Optional, Tuple

import torch


class SyncGroup(NamedTuple):
    """Synchronize a BatchNorm's batch statistics over this process group (None: the default group)."""
    group: Optional[object]


def sync_group(process_group: Optional[object]) -> Optional[SyncGroup]:
    """SyncGroup(process_group) where there is something to synchronize with, as nn.SyncBatchNorm
    decides it: torch.distributed initialized and more than one process in the group; else None."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return SyncGroup(group) if dist.get_world_size(group) > 1 else None


def all_reduce_moments(mean: torch.Tensor, var: torch.Tensor, count: int, sync: SyncGroup
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased var, count) of the whole batch over sync's processes, from this process's;
    count is a 0-d float64 tensor (no device-to-host copy). One all-reduce."""
    wide = torch.float64
    n = torch.full((1,), float(count), dtype=wide, device=mean.device)
    m = mean.to(wide)
    packed = torch.cat([n, m * n, (var.to(wide) + m * m) * n])
    torch.distributed.all_reduce(packed, group=sync.group)
    channels = mean.shape[0]
    total = packed[0]
    mean_all = packed[1:1 + channels] / total
    var_all = (packed[1 + channels:] / total - mean_all * mean_all).clamp_min(0)
    return mean_all.to(mean.dtype), var_all.to(var.dtype), total


def all_reduce_sums(sum_dz: torch.Tensor, sum_dz_xmu: torch.Tensor, sync: SyncGroup
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm's backward sums over every process's batch. One all-reduce."""
    packed = torch.cat([sum_dz, sum_dz_xmu])
    torch.distributed.all_reduce(packed, group=sync.group)
    return packed[:sum_dz.shape[0]], packed[sum_dz.shape[0]:]
