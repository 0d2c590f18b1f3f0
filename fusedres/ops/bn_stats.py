"""Op: BatchNorm batch statistics (per-channel mean and 1/sqrt(var + eps)) with the running update.

Reference here; kernels in fusedres/kernels/bn_stats_triton.py, csrc/cpu/bn_stats_cpu.cpp and
csrc/cuda/bn_stats_cuda.cu, all registered under the one name "bn_stats".
"""
from typing import Optional, Tuple

import torch

from . import validate
from ..common import channel_view, dense, stats_dtype
from .bn_finalize import mark_running_written, running_update
from .registry import call, dispatch, register, register_fake, register_loader


def bn_stats_reference(x: torch.Tensor, eps: float, running_mean: Optional[torch.Tensor] = None,
                       running_var: Optional[torch.Tensor] = None, momentum: float = 0.1
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch in float64, rounded to the statistics dtype at the end."""
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.to(torch.float64), dim=dims, unbiased=False)
    count = x.numel() // x.shape[1]
    if running_mean is not None:
        with torch.no_grad():
            unbiased = var * (count / (count - 1))
            running_mean.copy_(running_mean.to(torch.float64) * (1 - momentum) + mean * momentum)
            running_var.copy_(running_var.to(torch.float64) * (1 - momentum) + unbiased * momentum)
    acc = stats_dtype(x)
    return mean.to(acc), (var + eps).rsqrt().to(acc)


register("bn_stats", "reference")(bn_stats_reference)


for _backend in ("cpu", "cuda"):
    register_loader("bn_stats", _backend, lambda: torch.ops.fusedres_kernels.bn_stats.default)
register_loader("bn_stats", "triton",
                lambda: __import__("fusedres.kernels.bn_stats_triton", fromlist=["_"]).bn_stats_triton)


@torch.library.custom_op("fusedres::bn_stats", mutates_args=("running_mean", "running_var"))
def _bn_stats_op(x: torch.Tensor, eps: float, running_mean: Optional[torch.Tensor],
                 running_var: Optional[torch.Tensor], momentum: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return dispatch("bn_stats", x.device, x, eps, running_mean, running_var, momentum)


def _bn_stats_fake(x, eps, running_mean, running_var, momentum):
    acc = stats_dtype(x)
    return x.new_empty(x.shape[1], dtype=acc), x.new_empty(x.shape[1], dtype=acc)


register_fake("bn_stats", _bn_stats_fake)


def bn_stats(x: torch.Tensor, eps: float = 1e-5, running_mean: Optional[torch.Tensor] = None,
             running_var: Optional[torch.Tensor] = None, momentum: float = 0.1
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch statistics of x.

    Args:
        x (Tensor[N, C, H, W]): NCHW or channels_last, any float dtype.
        eps: added to the biased variance before the inverse square root.
        running_mean, running_var (Tensor[C], optional): updated in place as nn.BatchNorm2d does.
        momentum: the exponential-average factor f: running = (1 - f) * running + f * batch
            (the module passes 1 / num_batches_tracked for momentum=None).
    Returns:
        mean, invstd (Tensor[C]): float32 (float64 for float64 x).
    """
    validate.activation(x, "x")
    if (running_mean is None) != (running_var is None):
        raise ValueError("fusedres: running_mean and running_var must be given together")
    for name, r in (("running_mean", running_mean), ("running_var", running_var)):
        validate.channel_vector(x, r, name)
        if r is not None and not r.is_contiguous():
            raise ValueError(f"fusedres: {name} must be contiguous")
    x = dense(x)
    count = channel_view(x).count
    if count == 0:
        raise ValueError(f"fusedres: bn_stats needs at least one value per channel, got shape {tuple(x.shape)}")
    if running_mean is not None and count < 2:
        raise ValueError("fusedres: the running variance needs more than 1 value per channel, "
                         f"got input size {tuple(x.shape)}")
    result = call("bn_stats", x.device, x, float(eps), running_mean, running_var, float(momentum))
    mark_running_written(running_mean, running_var)
    return result


def bn_stats_from_moments(mean: torch.Tensor, var: torch.Tensor, count, eps: float = 1e-5,
                          running_mean: Optional[torch.Tensor] = None, running_var: Optional[torch.Tensor] = None,
                          momentum: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, invstd) of BatchNorm from a batch's per-channel mean and biased variance over `count`
    values per channel (a conv epilogue's ChannelMoments; count an int, or a 0-d tensor for a
    batch synchronized across processes), with the running update of bn_stats."""
    running_update(running_mean, running_var, mean, var, count, momentum)
    return mean, (var + eps).rsqrt()


def channel_var_mean(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(biased variance, mean) per channel of x, no eps: the statistics of one slice of a dense
    block's feature buffer, shared by every later BatchNorm over it (each adds its own eps).
    bn_stats with eps = 0 gives 1/std; var = std^2 is exact to a rounding (0 for a constant channel)."""
    mean, invstd = bn_stats(x, eps=0.0)
    return invstd.pow(-2), mean
