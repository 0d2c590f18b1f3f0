"""Ops: BatchNorm's per-channel bookkeeping, at most one small kernel per BatchNorm forward and
one per BatchNorm backward (as [C]-sized tensor ops it was ~20 launches per BatchNorm, each
~10 us of host time).

  bn_forward_finalize   a conv epilogue's per-tile partial statistics (StatsPartials) merged
                        exactly, invstd = 1/sqrt(var + eps), scale = invstd * gamma, shift = beta,
                        and nn.BatchNorm2d's running update
  bn_backward_finalize  a backward reduction's sums ([C], or [T, C] per-tile rows added up here)
                        to grad_gamma, grad_beta and the input gradient's coefficients coef_xmu,
                        coef_c (see fusedres.autograd.units)
Reference here. Kernels: fusedres/kernels/bn_finalize_triton.py (both); csrc/cpu/bn_stats_cpu.cpp
and csrc/cuda/bn_stats_cuda.cu (the backward; their forward bookkeeping is inside bn_stats, which
computes the statistics there). Neither is a torch.library op: while torch.compile traces, the
references run (a few [C] tensor ops, which inductor fuses into a kernel of its own).
"""
from typing import NamedTuple, Optional, Tuple

import torch

from ..common import stats_dtype, tracing
from .registry import kernel, register, register_loader

Tensor = torch.Tensor


class StatsPartials(NamedTuple):
    """Per-tile BatchNorm statistics of a conv epilogue: tile t summarizes rows[t] values per
    channel with their sum[t] and centered sum of squares m2[t] (float32; float64 for float64).
    May be strided views (the Triton conv writes rows as the last column of its sum buffer)."""
    rows: Tensor  # [T]
    sum: Tensor  # [T, C]
    m2: Tensor  # [T, C]


def channel_sums(t: Optional[Tensor]) -> Optional[Tensor]:
    """A backend's per-channel sums as [C]: [T, C] per-tile rows added up (None stays None)."""
    return t.sum(0) if t is not None and t.dim() == 2 else t


def _check_partials(partials: StatsPartials) -> None:
    rows, sums, m2s = partials
    if sums.dim() != 2 or m2s.shape != sums.shape or rows.shape != sums.shape[:1]:
        raise ValueError(f"fusedres: partials must be rows [T], sum [T, C], m2 [T, C]; got {tuple(rows.shape)}, "
                         f"{tuple(sums.shape)}, {tuple(m2s.shape)}")


def merge_partials(partials: StatsPartials) -> Tuple[Tensor, Tensor]:
    """(mean, biased variance) per channel, merged exactly (Chan et al.): M2 = sum_t m2_t +
    rows_t * (mean_t - mean)^2, so a large mean does not cancel as in sum(x^2) - n * mean^2."""
    _check_partials(partials)
    rows, sums, m2s = partials
    count = rows.sum()
    mean = sums.sum(0) / count
    tile_rows = rows.clamp_min(1)[:, None]
    var = (m2s.sum(0) + (tile_rows * (sums / tile_rows - mean) ** 2).sum(0)) / count
    return mean, var


def running_update(running_mean: Optional[Tensor], running_var: Optional[Tensor], mean: Tensor, var: Tensor,
                   count, momentum: float) -> None:
    """nn.BatchNorm2d's running update from a batch's mean and biased variance over `count` values
    per channel (an int, or a 0-d tensor for a batch synchronized across processes):
    running = (1 - f) * running + f * batch, the variance unbiased; in the statistics' dtype,
    rounded as the kernels round (f * n / (n - 1) one factor)."""
    if running_mean is None:
        return
    if not isinstance(count, torch.Tensor) and count < 2:
        raise ValueError("fusedres: the running variance needs more than 1 value per channel")
    acc = mean.dtype
    with torch.no_grad():
        running_mean.copy_((running_mean.to(acc) * (1 - momentum) + mean * momentum).to(running_mean.dtype))
        running_var.copy_((running_var.to(acc) * (1 - momentum) + var * (momentum * count / (count - 1)))
                          .to(running_var.dtype))


def mark_running_written(running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> None:
    """Bump the running statistics' version counters after a kernel wrote them in place through
    their pointers (the C++, CUDA and Triton kernels), as aten's in-place ops bump theirs: what
    is derived from them and keyed on their versions (a fused module's BatchNorm fold, its oneDNN
    packs, its eval statistics) then sees the update. Not while tracing (the custom ops declare
    the mutation to the compiler). An inference tensor has no counter and is left as it is."""
    if running_mean is None or tracing():
        return
    torch.autograd.graph.increment_version((running_mean, running_var))


def finalize_from_moments(mean: Tensor, var: Tensor, count, eps: float, gamma: Optional[Tensor],
                          beta: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          momentum: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """bn_forward_finalize from merged moments (a synchronized batch's, a dense block's shared
    slice statistics, or a traced graph's): (mean, var, invstd, scale, shift), running updated."""
    running_update(running_mean, running_var, mean, var, count, momentum)
    invstd = (var + eps).rsqrt()
    return (mean, var, invstd, *scale_shift(invstd, gamma, beta))


def scale_shift(invstd: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """BatchNorm as (z - mean) * scale + shift: scale = invstd * gamma, shift = beta (one small op
    for the scale; beta itself where it is already a contiguous vector of the statistics dtype)."""
    if gamma is None:
        scale = invstd
    else:
        scale = torch.mul(invstd, gamma.detach() if gamma.dtype == invstd.dtype else gamma.detach().to(invstd.dtype))
    if beta is None:
        shift = torch.zeros_like(invstd)
    elif beta.dtype == invstd.dtype and beta.is_contiguous():
        shift = beta.detach()
    else:
        shift = beta.detach().to(invstd.dtype).contiguous()
    return scale, shift


def bn_forward_finalize_reference(rows, sums, m2s, count, eps, gamma, beta, running_mean, running_var, momentum):
    mean, var = merge_partials(StatsPartials(rows, sums, m2s))
    return finalize_from_moments(mean, var, count, eps, gamma, beta, running_mean, running_var, momentum)


def bn_backward_finalize_reference(sum_dz, sum_dz_xmu, invstd, scale, count, batch_stats):
    if sum_dz.dim() == 2:
        sum_dz, sum_dz_xmu = sum_dz.sum(0), sum_dz_xmu.sum(0)
    grad_gamma = sum_dz_xmu * invstd
    if not batch_stats:
        zero = torch.zeros_like(scale)
        return grad_gamma, sum_dz.clone(), zero, zero.clone()
    return grad_gamma, sum_dz.clone(), -scale * invstd * invstd * sum_dz_xmu / count, -scale * sum_dz / count


register("bn_forward_finalize", "reference")(bn_forward_finalize_reference)
register("bn_backward_finalize", "reference")(bn_backward_finalize_reference)
register_loader("bn_forward_finalize", "triton",
                lambda: __import__("fusedres.kernels.bn_finalize_triton", fromlist=["_"]).bn_forward_finalize_triton)
register_loader("bn_backward_finalize", "triton",
                lambda: __import__("fusedres.kernels.bn_finalize_triton", fromlist=["_"]).bn_backward_finalize_triton)
for _backend in ("cpu", "cuda"):
    register_loader("bn_backward_finalize", _backend, lambda: torch.ops.fusedres_kernels.bn_backward_finalize.default)


def _check_vector(v, channels, name):
    if v is not None and (v.dim() != 1 or v.shape[0] != channels):
        raise ValueError(f"fusedres: {name} must have shape [{channels}], got {tuple(v.shape)}")


def bn_forward_finalize(partials: StatsPartials, eps: float = 1e-5, gamma: Optional[Tensor] = None,
                        beta: Optional[Tensor] = None, running_mean: Optional[Tensor] = None,
                        running_var: Optional[Tensor] = None, momentum: float = 0.1
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(mean, biased var, invstd, scale, shift) [C] of BatchNorm from a conv epilogue's partials,
    running statistics (if given) updated in place as nn.BatchNorm2d does."""
    _check_partials(partials)
    rows, sums, m2s = partials
    count = int(rows.sum())  # (a device -> host copy; the autograd path knows the count instead)
    if (running_mean is None) != (running_var is None):
        raise ValueError("fusedres: running_mean and running_var must be given together")
    if running_mean is not None and count < 2:
        raise ValueError("fusedres: the running variance needs more than 1 value per channel")
    for name, v in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean), ("running_var", running_var)):
        _check_vector(v, sums.shape[1], name)
    acc = sums.dtype
    gamma = None if gamma is None else gamma.detach().to(acc).contiguous()
    beta = None if beta is None else beta.detach().to(acc).contiguous()
    result = kernel("bn_forward_finalize", sums.device)(rows, sums, m2s, count, float(eps), gamma, beta,
                                                        running_mean, running_var, float(momentum))
    mark_running_written(running_mean, running_var)
    return result


def bn_backward_finalize(sum_dz: Tensor, sum_dz_xmu: Tensor, invstd: Tensor, scale: Tensor, count,
                         batch_stats: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_gamma, grad_beta, coef_xmu, coef_c) [C] of a BatchNorm backward from its reduction's
    sums ([C] or [T, C] rows), as float32 (float64) tensors; coefficients 0 unless batch_stats."""

    acc = stats_dtype(invstd)
    if invstd.dim() != 1 or scale.shape != invstd.shape:
        raise ValueError(f"fusedres: invstd and scale must be [C], got {tuple(invstd.shape)}, {tuple(scale.shape)}")
    if sum_dz.shape != sum_dz_xmu.shape or sum_dz.dim() not in (1, 2) or sum_dz.shape[-1] != invstd.shape[0]:
        raise ValueError(f"fusedres: sum_dz and sum_dz_xmu must be [C] or [T, C] with C = {invstd.shape[0]}, got "
                         f"{tuple(sum_dz.shape)}, {tuple(sum_dz_xmu.shape)}")
    args = [t.to(acc).contiguous() for t in (sum_dz, sum_dz_xmu, invstd, scale)]
    return kernel("bn_backward_finalize", invstd.device)(*args, float(count), bool(batch_stats))
