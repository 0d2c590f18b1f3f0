"""Conv -> BN -> ReLU chains on the fused conv kernels: the normalized activation never exists.

A chain conv_1 -> BN_1 -> ReLU -> ... -> conv_n -> BN_n (-> + residual) (-> ReLU), as in a ResNet
block, runs as
  z_1 = conv_1(x)                         statistics of z_1 in conv_1's epilogue
  z_k = conv_k(relu(BN_{k-1}(z_{k-1})))   BN_{k-1} + ReLU in conv_k's prologue, statistics of z_k
                                          in its epilogue
  y   = act(BN_n(z_n) + residual)         one bn_act_forward pass
so in training each activation-sized tensor is written once (z_k, y) and nothing else is: no
statistics pass, no normalized activation, no separate ReLU or add. Backward saves x, every z_k
and y, and per conv:
  dgrad  gradient of relu(BN(z_{k-1})), ReLU mask and BatchNorm's two sums in its epilogue
  BN     one elementwise pass from those sums to dz_{k-1} (bn_act_backward_elementwise)
  wgrad  relu(BN(z_{k-1})) recomputed in its prologue from z_{k-1}
"""
import contextlib
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from .. import ops
from ..ops.layout import stats_dtype
from .units import (BNAct, autocast_dtype, batch_count, bn_backward_coefficients, bn_scale_shift, running_stats,
                    stats_from_moments)


class ConvArgs(NamedTuple):
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int


class BNArgs(NamedTuple):
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    eps: float
    momentum: float
    batch_stats: bool
    sync: Optional[ops.SyncGroup] = None  # batch statistics over every process of a group (training only)


class BNReLUConv(torch.autograd.Function):
    """z = conv2d(p(x), weight, bias), p(x) = relu(BN(x)) with BN's (mean, invstd, gamma, beta)
    applied in the conv's prologue when in_norm, else p(x) = x. Also returns z's batch mean and
    biased variance from the conv's epilogue (empty tensors unless want_stats; not
    differentiable). With in_batch_stats, mean and invstd are x's batch statistics and backward
    includes the path through them; with in_sync (ops.SyncGroup) they are the statistics of
    every process's batch, in_count values per channel in all."""

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, mean, invstd, conv_args, in_norm, in_batch_stats, want_stats,
                in_sync=None, in_count=None):
        pro = {}
        scale = shift = None
        if in_norm:
            scale, shift = bn_scale_shift(invstd, gamma, beta)
            pro = dict(in_mean=mean, in_scale=scale, in_shift=shift, in_relu=True)
        z, moments = ops.conv2d_forward(x, weight, bias, *conv_args, stats=want_stats, **pro)
        if moments is None:
            moments = tuple(z.new_empty(0, dtype=stats_dtype(z)) for _ in range(2))
        ctx.conv_args = conv_args
        ctx.in_norm = in_norm
        ctx.in_batch_stats = in_batch_stats
        ctx.in_sync = in_sync if in_batch_stats else None
        ctx.in_count = in_count
        ctx.dtypes = (None if bias is None else bias.dtype, None if gamma is None else gamma.dtype,
                      None if beta is None else beta.dtype)
        ctx.save_for_backward(x, weight, mean, scale, shift, invstd)
        ctx.mark_non_differentiable(*moments)
        return (z, *moments)

    @staticmethod
    def backward(ctx, grad_z, *_unused_partial_grads):
        x, weight, mean, scale, shift, invstd = ctx.saved_tensors
        need_x, need_w, need_b, need_gamma, need_beta = ctx.needs_input_grad[:5]
        conv_args = ctx.conv_args
        pro = dict(in_mean=mean, in_scale=scale, in_shift=shift, in_relu=True) if ctx.in_norm else {}
        grad_x = grad_w = grad_b = grad_gamma = grad_beta = None
        if ctx.in_norm and (need_x or need_gamma or need_beta):
            du, sum_du, sum_du_xmu = ops.conv2d_input_grad(grad_z, weight, x, *conv_args, **pro)
            grad_gamma = (sum_du_xmu * invstd).to(ctx.dtypes[1]) if need_gamma else None
            grad_beta = sum_du.to(ctx.dtypes[2]) if need_beta else None
            if need_x:
                count = ctx.in_count if ctx.in_count is not None else x.numel() // x.shape[1]
                coef_xmu, coef_c = bn_backward_coefficients(scale, invstd, sum_du, sum_du_xmu, count,
                                                            ctx.in_batch_stats, ctx.in_sync)
                grad_x = ops.bn_act_backward_elementwise(du, x, mean, scale, shift, coef_xmu, coef_c, relu=False)
        elif need_x:
            grad_x = ops.conv2d_input_grad(grad_z, weight, x, *conv_args)[0]
        if need_w:
            grad_w = ops.conv2d_weight_grad(grad_z, x, weight, *conv_args, **pro)
        if need_b:
            grad_b = grad_z.sum((0, 2, 3), dtype=stats_dtype(grad_z)).to(ctx.dtypes[0])
        return grad_x, grad_w, grad_b, grad_gamma, grad_beta, None, None, None, None, None, None, None, None


def chain_unsupported_reason(x: torch.Tensor, convs: Sequence[ConvArgs]) -> Optional[str]:
    """None if conv_bn_chain runs every conv of `convs` on the fused conv kernels, else why not."""
    dtype = autocast_dtype(x.device.type)
    for conv in convs:
        why = ops.kernel_unsupported_reason(x, conv.weight, dtype)
        if why is not None:
            return why
    return None


def conv_bn_chain(x: torch.Tensor, units: Sequence[Tuple[ConvArgs, BNArgs]], residual: Optional[torch.Tensor] = None,
                  relu: bool = True) -> torch.Tensor:
    """act(BN_n(conv_n(relu(BN_{n-1}(... relu(BN_1(conv_1(x))) ...)))) + residual) with autograd.

    BN_k uses batch statistics (running statistics updated in place, as nn.BatchNorm2d) when
    units[k].batch_stats, else its running statistics as constants; with units[k].sync, the
    statistics of every process's batch (nn.SyncBatchNorm). Under autocast the convs run
    in the autocast dtype, as F.conv2d would; BatchNorm math stays float32.
    """
    if not units:
        raise ValueError("fusedres: conv_bn_chain needs at least one (conv, bn) unit")
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:
        x = x.to(dtype)
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        h = x
        prev = mean = invstd = count = None
        for conv, bn in units:
            weight, bias = conv.weight, conv.bias
            if dtype is not None:
                weight = weight.to(dtype)
                bias = bias.to(dtype) if bias is not None else None
            conv_args = (conv.stride, conv.padding, conv.dilation, conv.groups)
            # the previous unit's BN + ReLU runs in this conv's prologue; the first conv has none
            in_bn = (prev.weight, prev.bias, mean, invstd) if prev is not None else (None,) * 4
            z, batch_mean, batch_var = BNReLUConv.apply(h, weight, bias, *in_bn, conv_args, prev is not None,
                                                        prev is not None and prev.batch_stats, bn.batch_stats,
                                                        None if prev is None else prev.sync, count)
            if bn.batch_stats:
                mean, invstd, count = stats_from_moments(batch_mean, batch_var, batch_count(z), bn.eps,
                                                         bn.running_mean, bn.running_var, bn.momentum, bn.sync)
            else:
                mean, invstd = running_stats(bn.running_mean, bn.running_var, bn.eps, z)
                count = None
            h, prev = z, bn
        return BNAct.apply(h, prev.weight, prev.bias, mean, invstd, residual, prev.batch_stats, relu, prev.sync, count)
