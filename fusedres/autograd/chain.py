"""Conv -> BN -> activation chains on the fused conv kernels: the normalized activation never exists.

A chain conv_1 -> BN_1 -> ReLU -> ... -> conv_n -> BN_n (-> + residual) (-> ReLU), as in a ResNet
block, runs as
  z_1 = conv_1(x)                         statistics of z_1 in conv_1's epilogue
  z_k = conv_k(act(BN_{k-1}(z_{k-1})))    BN_{k-1} + its activation (any of common.ACTIVATIONS) in
                                          conv_k's prologue, statistics of z_k in its epilogue
  y   = act(BN_n(z_n) + residual)         one bn_act_forward pass
so in training each activation-sized tensor is written once (z_k, y) and nothing else is: no
statistics pass, no normalized activation, no separate ReLU or add. Backward saves x, every z_k
and y, and per conv:
  dgrad  gradient of act(BN(z_{k-1})), act' from z_{k-1} and BatchNorm's two sums in its epilogue
  BN     one elementwise pass from those sums to dz_{k-1} (bn_act_backward_elementwise)
  wgrad  act(BN(z_{k-1})) recomputed in its prologue from z_{k-1}
"""
import contextlib
from typing import Optional, Sequence, Tuple

import torch

from .. import ops
from ..common import RELU, stats_dtype, tracing
from ..ops.bn_act import act_args
from ..ops import direct
from ..ops.direct import BatchNormStats, ChannelMoments, StatsPartials
from .units import (BNArgs, ConvArgs, ConvSpec, Unit, autocast_dtype, backward_bookkeeping, batch_count,  # noqa: F401
                    bn_act, bn_scale_shift, running_stats, stats_from_moments)


class BNReLUConv(torch.autograd.Function):
    """z = conv2d(p(x), weight, bias), p(x) = in_act((x - mean) * scale + shift) in the conv's
    prologue when in_norm (the input's BatchNorm: its statistics, scale = invstd * gamma,
    shift = beta), else p(x) = x. Also returns z's statistics from the conv's epilogue (not
    differentiable; empty tensors unless want_stats): in eager mode the per-tile partials
    (rows, sum, m2), while tracing the merged (mean, var) and an empty tensor. With
    in_batch_stats, mean and invstd are x's batch statistics and backward includes the path
    through them; with in_sync (ops.SyncGroup) they are the statistics of every process's batch,
    in_count values per channel in all."""

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, mean, invstd, scale, shift, conv: ConvSpec, in_norm, in_batch_stats,
                want_stats, in_sync=None, in_count=None, in_act=RELU):
        pro = (mean, scale, shift, *act_args(in_act)) if in_norm else (None, None, None, 0, 0.0)
        z, stats = direct.conv2d_forward_unchecked(x, weight, bias, *conv, *pro, None, 0, 0.0, bool(want_stats),
                                                   None)
        empty = z.new_empty(0, dtype=stats_dtype(z))
        if stats is None:
            outs = (empty, empty.clone(), empty.clone())
        elif isinstance(stats, StatsPartials):
            outs = tuple(stats)
        else:
            outs = (stats.mean, stats.var, empty)
        ctx.set_materialize_grads(False)  # the statistics outputs get no gradient: no zeros made for them
        ctx.conv = conv
        ctx.in_norm = in_norm
        ctx.in_act = in_act
        ctx.in_batch_stats = in_batch_stats
        ctx.in_sync = in_sync if in_batch_stats else None
        ctx.in_count = in_count
        ctx.dtypes = (None if bias is None else bias.dtype, None if gamma is None else gamma.dtype,
                      None if beta is None else beta.dtype)
        if in_norm:
            ctx.save_for_backward(x, weight, mean, scale, shift, invstd)
        else:
            ctx.save_for_backward(x, weight)
        ctx.mark_non_differentiable(*outs)
        return (z, *outs)

    @staticmethod
    def backward(ctx, grad_z, *_unused_stats_grads):
        if grad_z is None:  # z reached no loss (set_materialize_grads(False) passes None through)
            return (None,) * 16
        x, weight, *bn = ctx.saved_tensors
        need_x, need_w, need_b, need_gamma, need_beta = ctx.needs_input_grad[:5]
        conv = ctx.conv
        pro = (bn[0], bn[1], bn[2], *act_args(ctx.in_act)) if ctx.in_norm else (None, None, None, 0, 0.0)
        grad_x = grad_w = grad_b = grad_gamma = grad_beta = None
        if ctx.in_norm and (need_x or need_gamma or need_beta):
            mean, scale, shift, invstd = bn
            du, sum_du, sum_du_xmu = direct.conv2d_input_grad_unchecked(grad_z, weight, x, *conv, *pro)
            count = ctx.in_count if ctx.in_count is not None else x.numel() // x.shape[1]
            grad_gamma, grad_beta, coef_xmu, coef_c = backward_bookkeeping(
                sum_du, sum_du_xmu, invstd, scale, count, ctx.in_batch_stats and need_x, ctx.in_sync)
            grad_gamma = grad_gamma.to(ctx.dtypes[1]) if need_gamma else None
            grad_beta = grad_beta.to(ctx.dtypes[2]) if need_beta else None
            if need_x:
                grad_x = direct.bn_act_backward_elementwise(du, x, mean, scale, shift, coef_xmu, coef_c, act=False)
        elif need_x:
            grad_x = direct.conv2d_input_grad_unchecked(grad_z, weight, x, *conv, None, None, None, 0, 0.0)[0]
        if need_w:
            grad_w = direct.conv2d_weight_grad_unchecked(grad_z, x, weight, *conv, *pro)
        if need_b:
            grad_b = grad_z.sum((0, 2, 3), dtype=stats_dtype(grad_z)).to(ctx.dtypes[0])
        return (grad_x, grad_w, grad_b, grad_gamma, grad_beta, None, None, None, None, None, None, None, None, None,
                None, None)


def bn_relu_conv(x, conv: ConvArgs, in_bn: Optional[BNArgs] = None, in_stats: Optional[BatchNormStats] = None, *,
                 want_stats: bool, in_count=None):
    """BNReLUConv.apply with keywords: conv(in_bn.act(in_bn(x))) (conv(x) without in_bn), and its
    epilogue's statistics as BNReLUConv returns them."""
    in_norm = in_bn is not None
    stats = in_stats if in_norm else (None, None, None, None)
    return BNReLUConv.apply(x, conv.weight, conv.bias, in_bn.weight if in_norm else None,
                            in_bn.bias if in_norm else None, *stats, conv.spec, in_norm,
                            in_norm and in_bn.batch_stats, want_stats, in_bn.sync if in_norm else None, in_count,
                            in_bn.act if in_norm else RELU)


def epilogue_bn(z, a, b, c, bn: BNArgs):
    """(BatchNormStats, count) of BatchNorm `bn` over z from BNReLUConv's statistics outputs
    (a, b, c): one bookkeeping kernel in eager mode (running statistics updated); with bn.sync
    the moments are all-reduced first; without batch statistics, the running ones."""
    count = z.numel() // z.shape[1]
    if not bn.batch_stats:
        mean, invstd = running_stats(bn.running_mean, bn.running_var, bn.eps, z)
        return BatchNormStats(mean, invstd, *bn_scale_shift(invstd, bn.weight, bn.bias)), count
    batch_count(z)
    stats = ChannelMoments(a, b) if tracing() else StatsPartials(a, b, c)
    if bn.sync is not None:
        moments = direct.moments(stats)
        mean, invstd, count = stats_from_moments(moments.mean, moments.var, count, bn.eps, bn.running_mean,
                                                 bn.running_var, bn.momentum, bn.sync)
        return BatchNormStats(mean, invstd, *bn_scale_shift(invstd, bn.weight, bn.bias)), count
    _, stats = direct.bn_forward_finalize(stats, count, bn.eps, bn.weight, bn.bias, bn.running_mean,
                                          bn.running_var, bn.momentum)
    return stats, count


def chain_unsupported_reason(x: torch.Tensor, convs: Sequence[ConvArgs]) -> Optional[str]:
    """None if conv_bn_chain runs every conv of `convs` on the fused conv kernels, else why not."""
    dtype = autocast_dtype(x)
    for conv in convs:
        why = ops.kernel_unsupported_reason(x, conv.weight, dtype)
        if why is not None:
            return why
    return None


def conv_bn_chain(x: torch.Tensor, units: Sequence[Tuple[ConvArgs, BNArgs]], residual: Optional[torch.Tensor] = None,
                  act=True) -> torch.Tensor:
    """act(BN_n(conv_n(act_{n-1}(BN_{n-1}(... act_1(BN_1(conv_1(x))) ...)))) + residual) with autograd:
    act_k = BN_k's act (BNArgs.act), `act` last (an Activation, or a bool for ReLU / none).

    units: (ConvArgs, BNArgs) pairs (or Unit). BN_k uses batch statistics (running statistics
    updated in place, as nn.BatchNorm2d) when its batch_stats, else its running statistics as
    constants; with its sync, the statistics of every process's batch (nn.SyncBatchNorm). Under
    autocast the convs run in the autocast dtype, as F.conv2d would; BatchNorm math stays float32.
    """
    if not units:
        raise ValueError("fusedres: conv_bn_chain needs at least one (conv, bn) unit")
    dtype = autocast_dtype(x)
    if dtype is not None:
        x = x.to(dtype)
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        h = x
        prev = stats = count = None
        for conv, bn in units:
            if dtype is not None:
                conv = conv._replace(weight=conv.weight.to(dtype),
                                     bias=conv.bias.to(dtype) if conv.bias is not None else None)
            # the previous unit's BN + activation runs in this conv's prologue; the first conv has none
            z, a, b, c = bn_relu_conv(h, conv, prev, stats, want_stats=bn.batch_stats,
                                      in_count=count if prev is not None and prev.sync is not None else None)
            stats, count = epilogue_bn(z, a, b, c, bn)
            h, prev = z, bn
        return bn_act(h, prev.weight, prev.bias, stats, residual, batch_stats=prev.batch_stats, act=act,
                      sync=prev.sync, count=count)
