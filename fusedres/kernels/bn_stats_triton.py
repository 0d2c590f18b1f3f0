"""BatchNorm batch statistics in Triton: per-split Welford summaries, then a per-channel merge.

One read of the activation. Each [BLOCK_R, BLOCK_C] tile is summarized by its own mean and M2
(held in registers, so computing them costs no extra read) and merged into the program's running
summary with Chan's formula; the merge kernel combines the splits the same way. Unlike
sum(x^2) - n*mean^2 this does not cancel when |mean| >> std (1e3 + N(0,1) loses nothing).
"""
import torch
import triton
import triton.language as tl

from ..common import channel_view, launch, new_channel_output, new_scratch, stats_dtype
from .tiles import reduce_launch_shape, tile_count, tile_offsets, tl_acc


@triton.jit
def _bn_stats_partial_kernel(x_ptr, part_mean_ptr, part_m2_ptr, outer, C, inner, outer_per_split,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INNER_IS_ONE: tl.constexpr,
                             ACC: tl.constexpr):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    o_begin = split * outer_per_split
    o_end = tl.minimum(o_begin + outer_per_split, outer)
    n = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for t in range(0, tile_count(o_begin, o_end, inner, BLOCK_R, INNER_IS_ONE)):
        offs, mask, rmask = tile_offsets(t, o_begin, o_end, C, inner, cols, cmask, BLOCK_R, INNER_IS_ONE)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        t_n = tl.sum(rmask.to(ACC), axis=0)
        t_mean = tl.sum(x, axis=0) / t_n
        d = tl.where(mask, x - t_mean[None, :], 0.0)
        t_m2 = tl.sum(d * d, axis=0)
        n_new = n + t_n
        delta = t_mean - mean
        w = t_n / n_new
        mean += delta * w
        m2 += t_m2 + delta * delta * n * w
        n = n_new
    tl.store(part_mean_ptr + split * C + cols, mean, mask=cmask)
    tl.store(part_m2_ptr + split * C + cols, m2, mask=cmask)


@triton.jit
def _bn_stats_merge_kernel(part_mean_ptr, part_m2_ptr, mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr,
                           C, splits, outer, inner, outer_per_split, eps, momentum, unbias,
                           UPDATE_RUNNING: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    n = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for s in range(0, splits):
        n_s = (tl.minimum(outer_per_split, outer - s * outer_per_split) * inner).to(ACC)
        s_mean = tl.load(part_mean_ptr + s * C + cols, mask=cmask, other=0.0)
        s_m2 = tl.load(part_m2_ptr + s * C + cols, mask=cmask, other=0.0)
        n_new = n + n_s
        delta = s_mean - mean
        w = n_s / n_new
        mean += delta * w
        m2 += s_m2 + delta * delta * n * w
        n = n_new
    var = m2 / n
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(invstd_ptr + cols, 1.0 / tl.sqrt(var + eps), mask=cmask)
    if UPDATE_RUNNING:  # nn.BatchNorm2d: (1 - f) * running + f * batch, unbiased variance
        rm = tl.load(running_mean_ptr + cols, mask=cmask).to(ACC)
        rv = tl.load(running_var_ptr + cols, mask=cmask).to(ACC)
        rm = rm * (1.0 - momentum) + mean * momentum
        rv = rv * (1.0 - momentum) + var * (momentum * unbias)
        tl.store(running_mean_ptr + cols, rm.to(running_mean_ptr.dtype.element_ty), mask=cmask)
        tl.store(running_var_ptr + cols, rv.to(running_var_ptr.dtype.element_ty), mask=cmask)


def bn_stats_triton(x, eps, running_mean, running_var, momentum):
    """(mean, invstd) float32 [C] of dense x [N, C, H, W]; updates running stats in place if given."""
    outer, channels, inner = channel_view(x)
    block_c, block_r, outer_per_split, splits = reduce_launch_shape(outer, channels, inner, x.device)
    acc = stats_dtype(x)
    part = new_scratch((2, splits, channels), acc, x.device)
    launch(_bn_stats_partial_kernel, (triton.cdiv(channels, block_c), splits), x.device,
        x, part[0], part[1], outer, channels, inner, outer_per_split,
        BLOCK_R=block_r, BLOCK_C=block_c, INNER_IS_ONE=inner == 1, ACC=tl_acc(x.dtype))
    mean = new_channel_output(channels, acc, x.device)
    invstd = new_channel_output(channels, acc, x.device)
    update = running_mean is not None
    count = outer * inner
    merge_block = min(256, triton.next_power_of_2(channels))
    launch(_bn_stats_merge_kernel, (triton.cdiv(channels, merge_block),), x.device,
        part[0], part[1], mean, invstd, running_mean if update else mean, running_var if update else mean,
        channels, splits, outer, inner, outer_per_split, eps, momentum, count / max(count - 1, 1),
        UPDATE_RUNNING=update, BLOCK_C=merge_block, ACC=tl_acc(x.dtype))
    return mean, invstd
