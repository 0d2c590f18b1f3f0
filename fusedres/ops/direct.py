"""The autograd Functions' short path to the kernels: no argument checks, the backend resolved once.

The public functions of fusedres.ops check every argument and bring tensors to one layout on
every call (~10-70 us of Python per op). The autograd Functions call these instead; they
guarantee what the checks would: activations dense (NCHW- or channels_last-contiguous), tensors
that meet in one kernel in one layout (common.like), per-channel vectors contiguous in the
statistics dtype (float32, float64 for float64 activations), conv arguments as pairs (the
modules' own, checked once by ops.check_conv where they enter). Each call is the implementation
the registry resolved for (op, device type, backend choice): a Triton launcher, or an extension
op torch.ops.fusedres_kernels.<op>. While torch.compile / torch.export trace, the custom ops
torch.ops.fusedres.<op> run instead, and the [C]-sized bookkeeping runs as the references' tensor
ops (inductor fuses those itself).

Per-channel sums of a backward reduction may come back as [T, C] per-tile rows; only
bn_backward_finalize reads them, and it adds them up.
"""
from typing import NamedTuple, Optional, Tuple, Union

import torch

from ..common import tracing
from .bn_act import act_args
from .bn_finalize import (StatsPartials, bn_backward_finalize_reference, finalize_from_moments, mark_running_written,
                          running_update)
from .conv import (ChannelMoments, conv2d_forward_unchecked, conv2d_input_grad_unchecked,  # noqa: F401
                   conv2d_weight_grad_unchecked)
from .conv import as_moments as moments  # merged (mean, biased var) of a conv epilogue's statistics
from .conv_inference import OP as _CONV_INFERENCE
from .registry import call, kernel

Tensor = torch.Tensor


class BatchNormStats(NamedTuple):
    """One BatchNorm's per-channel statistics for this forward, as the kernels take them:
    y = (z - mean) * scale + shift with scale = invstd * gamma, shift = beta."""
    mean: Tensor
    invstd: Tensor
    scale: Tensor
    shift: Tensor


def bn_stats(x: Tensor, eps: float, running_mean: Optional[Tensor], running_var: Optional[Tensor],
             momentum: float) -> Tuple[Tensor, Tensor]:
    """(mean, invstd) of x's batch, running statistics updated: one statistics pass, the
    bookkeeping inside it (the running statistics' versions bumped: mark_running_written)."""
    result = call("bn_stats", x.device, x, eps, running_mean, running_var, momentum)
    mark_running_written(running_mean, running_var)
    return result


def bn_act_forward(x: Tensor, mean: Optional[Tensor], scale: Optional[Tensor], shift: Tensor,
                   residual: Optional[Tensor] = None, act=True) -> Tensor:
    """act: an Activation, or True / False for ReLU / none (so for every bn_act op here)."""
    return call("bn_act_forward", x.device, x, mean, scale, shift, residual, *act_args(act))


def bn_act_backward_reduce(grad: Tensor, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                           output: Optional[Tensor] = None, act=True, write_grad_z: bool = False
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """(sum dz, sum dz * (x - mean) as [C] or [T, C] rows, dz or an empty tensor); output: ReLU's
    mask source after a residual add (act ReLU only)."""
    return call("bn_act_backward_reduce", x.device, grad, x, mean, scale, shift, output, *act_args(act),
                write_grad_z)


def bn_act_backward_elementwise(grad: Tensor, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                                coef_xmu: Tensor, coef_c: Tensor, act=True) -> Tensor:
    return call("bn_act_backward_elementwise", x.device, grad, x, mean, scale, shift, coef_xmu, coef_c,
                *act_args(act))


def conv2d_bias_act_inference(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], stride, padding,
                              dilation, groups: int, relu: bool, packed_weight: Optional[Tensor] = None,
                              post_op=None) -> Tensor:
    """act(conv2d(x, weight) + bias [+ residual]) on the backend the registry resolved (eager only:
    the op has no traced form; see ops.conv_inference); post_op: an ops.PostOp activation."""
    return kernel(_CONV_INFERENCE, x.device)(x, weight, bias, residual, stride, padding, dilation, groups, relu,
                                             packed_weight, post_op)


def bn_backward_finalize(sum_dz: Tensor, sum_dz_xmu: Tensor, invstd: Tensor, scale: Tensor, count,
                         batch_stats: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_gamma, grad_beta, coef_xmu, coef_c) [C] from the sums ([C] or [T, C] rows): one small
    kernel. count: values per channel (an int; a 0-d tensor for a synchronized batch, which takes
    the reference's tensor ops)."""
    if tracing() or isinstance(count, torch.Tensor):
        return bn_backward_finalize_reference(sum_dz, sum_dz_xmu, invstd, scale, count, batch_stats)
    return kernel("bn_backward_finalize", invstd.device)(sum_dz, sum_dz_xmu, invstd, scale, float(count),
                                                         bool(batch_stats))


def bn_forward_finalize(stats: Union[StatsPartials, ChannelMoments], count, eps: float, gamma: Optional[Tensor],
                        beta: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        momentum: float) -> Tuple[Tensor, BatchNormStats]:
    """(biased var, BatchNormStats) of a BatchNorm from a conv epilogue's statistics, running
    statistics updated: one small kernel for eager partials; the reference's tensor ops for
    merged moments (a traced graph's)."""
    if isinstance(stats, StatsPartials) and not tracing():
        mean, var, invstd, scale, shift = kernel("bn_forward_finalize", stats.sum.device)(
            stats.rows, stats.sum, stats.m2, count, eps, gamma, beta, running_mean, running_var, momentum)
        mark_running_written(running_mean, running_var)
    else:
        stats = moments(stats)
        mean, var, invstd, scale, shift = finalize_from_moments(stats.mean, stats.var, count, eps, gamma, beta,
                                                                running_mean, running_var, momentum)
    return var, BatchNormStats(mean, invstd, scale, shift)


__all__ = ["BatchNormStats", "ChannelMoments", "StatsPartials", "bn_act_backward_elementwise",
           "bn_act_backward_reduce", "bn_act_forward", "bn_backward_finalize", "bn_forward_finalize", "bn_stats",
           "conv2d_bias_act_inference",
           "conv2d_forward_unchecked", "conv2d_input_grad_unchecked", "conv2d_weight_grad_unchecked", "moments",
           "running_update"]
