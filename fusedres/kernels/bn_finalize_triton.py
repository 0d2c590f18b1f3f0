"""BatchNorm's per-channel bookkeeping in Triton: one small launch per BatchNorm forward and one
per backward, instead of ~20 [C]-sized tensor ops (each a launch and ~10 us of host time).

  forward   the conv epilogue's per-tile partial statistics merged exactly (Chan et al.:
            M2 = sum_t m2_t + rows_t * (mean_t - mean)^2), then invstd = 1/sqrt(var + eps),
            scale = invstd * gamma, shift = beta, and nn.BatchNorm2d's running update
  backward  the reduction's partial sums added up, grad_gamma = sum(dz * (x - mean)) * invstd,
            grad_beta = sum(dz), and the input gradient's coefficients
            coef_xmu = -scale * invstd^2 * sum(dz (x - mean)) / n, coef_c = -scale * sum(dz) / n
Reference: fusedres/ops/bn_finalize.py.
"""
import triton
import triton.language as tl

from ..common import launch, new_channel_output
from .tiles import tl_acc

_BLOCK_T = 32


@triton.jit
def _bn_forward_finalize_kernel(rows_ptr, sum_ptr, m2_ptr, gamma_ptr, beta_ptr, running_mean_ptr, running_var_ptr,
                                mean_ptr, var_ptr, invstd_ptr, scale_ptr, shift_ptr,
                                T, C, rows_stride, sum_stride, m2_stride, count, eps, keep, f, f_unbiased,
                                HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
                                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    total = tl.zeros([BLOCK_C], ACC)
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        mask = (rt < T)[:, None] & cmask[None, :]
        total += tl.sum(tl.load(sum_ptr + rt[:, None] * sum_stride + cols[None, :], mask=mask, other=0.0), axis=0)
    mean = total / count
    m2 = tl.zeros([BLOCK_C], ACC)
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        rmask = rt < T
        mask = rmask[:, None] & cmask[None, :]
        rows = tl.maximum(tl.load(rows_ptr + rt * rows_stride, mask=rmask, other=1.0), 1.0)
        s = tl.load(sum_ptr + rt[:, None] * sum_stride + cols[None, :], mask=mask, other=0.0)
        q = tl.load(m2_ptr + rt[:, None] * m2_stride + cols[None, :], mask=mask, other=0.0)
        d = s / rows[:, None] - mean[None, :]
        m2 += tl.sum(tl.where(mask, q + rows[:, None] * d * d, 0.0), axis=0)
    var = m2 / count
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = invstd
    if HAS_GAMMA:
        scale = invstd * tl.load(gamma_ptr + cols, mask=cmask, other=1.0).to(ACC)
    shift = tl.zeros([BLOCK_C], ACC)
    if HAS_BETA:
        shift = tl.load(beta_ptr + cols, mask=cmask, other=0.0).to(ACC)
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(var_ptr + cols, var, mask=cmask)
    tl.store(invstd_ptr + cols, invstd, mask=cmask)
    tl.store(scale_ptr + cols, scale, mask=cmask)
    tl.store(shift_ptr + cols, shift, mask=cmask)
    if UPDATE_RUNNING:
        rm = tl.load(running_mean_ptr + cols, mask=cmask).to(ACC)
        rv = tl.load(running_var_ptr + cols, mask=cmask).to(ACC)
        tl.store(running_mean_ptr + cols, (rm * keep + mean * f).to(running_mean_ptr.dtype.element_ty), mask=cmask)
        tl.store(running_var_ptr + cols, (rv * keep + var * f_unbiased).to(running_var_ptr.dtype.element_ty),
                 mask=cmask)


@triton.jit
def _bn_backward_finalize_kernel(sum_dz_ptr, sum_dz_xmu_ptr, invstd_ptr, scale_ptr, grad_gamma_ptr, grad_beta_ptr,
                                 coef_xmu_ptr, coef_c_ptr, T, C, count,
                                 BATCH_STATS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                                 ACC: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    a = tl.zeros([BLOCK_C], ACC)
    b = tl.zeros([BLOCK_C], ACC)
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        mask = (rt < T)[:, None] & cmask[None, :]
        offs = rt[:, None] * C + cols[None, :]
        a += tl.sum(tl.load(sum_dz_ptr + offs, mask=mask, other=0.0), axis=0)
        b += tl.sum(tl.load(sum_dz_xmu_ptr + offs, mask=mask, other=0.0), axis=0)
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    scale = tl.load(scale_ptr + cols, mask=cmask, other=0.0)
    tl.store(grad_gamma_ptr + cols, b * invstd, mask=cmask)
    tl.store(grad_beta_ptr + cols, a, mask=cmask)
    if BATCH_STATS:
        tl.store(coef_xmu_ptr + cols, -scale * invstd * invstd * b / count, mask=cmask)
        tl.store(coef_c_ptr + cols, -scale * a / count, mask=cmask)
    else:
        tl.store(coef_xmu_ptr + cols, tl.zeros([BLOCK_C], ACC), mask=cmask)
        tl.store(coef_c_ptr + cols, tl.zeros([BLOCK_C], ACC), mask=cmask)


def _block_c(channels: int) -> int:
    return min(128, triton.next_power_of_2(max(channels, 1)))


def bn_forward_finalize_triton(rows, sums, m2s, count, eps, gamma, beta, running_mean, running_var, momentum):
    """(mean, var, invstd, scale, shift) [C] from per-tile partials rows [T], sums, m2s [T, C]
    (strided views allowed; count = rows.sum(), known to the caller); running statistics updated
    in place. gamma and beta in any float dtype (read as the statistics dtype)."""
    T, channels = sums.shape
    acc = sums.dtype
    outs = [new_channel_output(channels, acc, sums.device) for _ in range(5)]
    update = running_mean is not None
    unbias = count / max(count - 1, 1)
    block_c = _block_c(channels)
    launch(_bn_forward_finalize_kernel, (triton.cdiv(channels, block_c),), sums.device,
           rows, sums, m2s, gamma if gamma is not None else sums, beta if beta is not None else sums,
           running_mean if update else sums, running_var if update else sums, *outs,
           T, channels, rows.stride(0), sums.stride(0), m2s.stride(0), count, eps, 1.0 - momentum, momentum,
           momentum * unbias,
           HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, UPDATE_RUNNING=update,
           BLOCK_T=_BLOCK_T, BLOCK_C=block_c, ACC=tl_acc(acc))
    return tuple(outs)


def bn_backward_finalize_triton(sum_dz, sum_dz_xmu, invstd, scale, count, batch_stats):
    """(grad_gamma, grad_beta, coef_xmu, coef_c) [C] from the sums ([C] or [T, C] partial rows)."""
    channels = invstd.shape[0]
    rows = sum_dz.shape[0] if sum_dz.dim() == 2 else 1
    outs = [new_channel_output(channels, invstd.dtype, invstd.device) for _ in range(4)]
    block_c = _block_c(channels)
    launch(_bn_backward_finalize_kernel, (triton.cdiv(channels, block_c),), invstd.device,
           sum_dz, sum_dz_xmu, invstd, scale, *outs, rows, channels, float(count),
           BATCH_STATS=bool(batch_stats), BLOCK_T=_BLOCK_T, BLOCK_C=block_c, ACC=tl_acc(invstd.dtype))
    return tuple(outs)


