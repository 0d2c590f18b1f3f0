"""BatchNorm for the fused modules: each forward's arguments as nn.BatchNorm2d.forward computes
them (bn_args), and SyncBatchNorm2d, synchronized batch statistics on any device.
"""
from typing import Optional

import torch
import torch.nn as nn

from .autograd import BNArgs, sync_batch_norm
from .ops import sync_group


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode batch statistics are those of every process's batch,
    like nn.SyncBatchNorm, on any device (nn.SyncBatchNorm, and DistributedDataParallel holding
    one, accept only CUDA modules), with nn.BatchNorm2d's state_dict keys.

    It synchronizes, as nn.SyncBatchNorm does, only in training mode under an initialized
    torch.distributed with more than one process in `process_group` (None: the default group);
    otherwise it is nn.BatchNorm2d. Fused blocks fuse it, synchronized; standalone it is one
    all-reduce of per-channel count, sum and sum of squares forward and one of BatchNorm's two
    sums backward."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Optional[object] = None, device=None,
                 dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sync = sync_group(self.process_group) if self.training else None
        if sync is None:
            return super().forward(x)
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm2d: input has {x.shape[1]} channels, expected {self.num_features}")
        if x.numel() == 0:
            raise ValueError("SyncBatchNorm2d: an empty batch on one process while synchronizing statistics "
                             "(every process needs at least one sample per step)")
        b = bn_args(self)
        return sync_batch_norm(x, b.weight, b.bias, b.running_mean, b.running_var, b.eps, b.momentum, b.sync)

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, process_group: Optional[object] = None
                       ) -> "SyncBatchNorm2d":
        """A SyncBatchNorm2d sharing bn's parameters and buffers (and its training flag)."""
        sync = cls.__new__(cls)
        nn.Module.__init__(sync)
        sync.__dict__.update({k: v for k, v in bn.__dict__.items()
                              if k not in ("_parameters", "_buffers", "_modules")})
        sync._parameters = bn._parameters
        sync._buffers = bn._buffers
        sync._modules = bn._modules
        sync.process_group = process_group
        return sync


def convert_sync_batchnorm(module: nn.Module, process_group: Optional[object] = None) -> nn.Module:
    """module with every nn.BatchNorm2d / nn.SyncBatchNorm in it replaced, in place, by a
    SyncBatchNorm2d over process_group sharing its parameters and buffers (so state_dict keys and
    optimizers are unchanged). Returns module, or the replacement if module itself is one."""
    if type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return SyncBatchNorm2d.from_batchnorm(module, process_group)
    for name, child in module._modules.items():
        if child is not None:
            module._modules[name] = convert_sync_batchnorm(child, process_group)
    return module


def check_sync_args(sync_bn: bool, process_group: Optional[object], owner: str) -> None:
    """The sync_bn / process_group arguments of fuse and the blocks (errors name `owner`)."""
    if not isinstance(sync_bn, bool):
        raise TypeError(f"{owner}: sync_bn must be a bool, got {type(sync_bn).__name__}")
    if process_group is not None and not sync_bn:
        raise ValueError(f"{owner}: process_group is the group sync_bn=True synchronizes over; "
                         "give sync_bn=True with it")


def bn_args(bn: nn.BatchNorm2d) -> BNArgs:
    """BatchNorm's arguments for this forward, with nn.BatchNorm2d.forward's own bookkeeping
    (num_batches_tracked counted, momentum=None as a cumulative average). Parameters and buffers
    are read from the module's dicts (nn.Module.__getattr__ costs ~1 us per name)."""
    params, buffers = bn._parameters, bn._buffers
    running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
    training = bn.training
    momentum = 0.0 if bn.momentum is None else bn.momentum
    tracked = buffers.get("num_batches_tracked")
    if training and bn.track_running_stats and tracked is not None:
        tracked.add_(1)
        momentum = 1.0 / float(tracked) if bn.momentum is None else bn.momentum
    batch_stats = training or (running_mean is None and running_var is None)
    track = not training or bn.track_running_stats
    # nn.SyncBatchNorm synchronizes only in training mode, under an initialized process group of > 1
    sync = (sync_group(bn.process_group) if training and isinstance(bn, (SyncBatchNorm2d, nn.SyncBatchNorm))
            else None)
    return BNArgs(params.get("weight"), params.get("bias"), running_mean if track else None,
                  running_var if track else None, bn.eps, momentum, batch_stats, sync)
