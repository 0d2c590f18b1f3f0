"""Autograd Functions: conv -> BatchNorm -> (+ residual) -> ReLU units built on fusedres.ops.

What is saved for backward: the unit's input and conv weight (the conv's own needs), the pre-BN
conv output z, the per-channel mean and inverse std, and, for the residual + ReLU unit only, the
unit's output (its ReLU mask; that tensor is the next unit's input, so autograd keeps it anyway).
The normalized activation is never saved: backward recomputes (z - mean) * scale + shift.

Passes over an activation-sized tensor (read or write), conv excluded:
  forward: statistics 1 + normalize-activate 2 (3 with residual); stock eager: BN 3, ReLU 2, add 3
  backward: reduce 2 (+1 read of the output and +1 write of the residual gradient with a
  residual) + elementwise 3.
"""
import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.layout import stats_dtype


def tracing() -> bool:
    """Whether torch.compile or torch.export is tracing: Python-side caches keyed on a tensor's
    version or data pointer (which a traced graph cannot see) are then bypassed."""
    is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.7
    return torch.compiler.is_compiling() or is_exporting()


def _conv_backward(grad_z, x, weight, has_bias, stride, padding, dilation, groups, needs):
    """aten's conv backward (cuDNN / oneDNN): (grad_x, grad_weight, grad_bias), None where not needed."""
    if not any(needs):
        return None, None, None
    bias_sizes = [weight.shape[0]] if has_bias else None
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_z, x, weight, bias_sizes, list(stride), list(padding), list(dilation), False, [0, 0], groups,
        list(needs))
    return grad_x, grad_w, grad_b


def batch_count(z) -> int:
    """Values per channel of z, checked as nn.BatchNorm2d checks a training batch (its own message)."""
    count = z.numel() // z.shape[1]
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {z.size()}")
    return count


def batch_or_running_stats(z, batch_stats, eps, running_mean, running_var, momentum):
    """(mean, invstd) of BatchNorm over z: batch statistics (running ones updated), or the running ones."""
    if batch_stats:
        batch_count(z)
        return ops.bn_stats(z, eps, running_mean, running_var, momentum)
    return running_stats(running_mean, running_var, eps, z)


def running_stats(running_mean, running_var, eps, z):
    """(mean, invstd) from the running statistics, in z's statistics dtype."""
    acc = stats_dtype(z)
    return running_mean.to(acc), (running_var.to(acc) + eps).rsqrt()


def bn_scale_shift(invstd, bn_weight, bn_bias):
    """BatchNorm as (z - mean) * scale + shift: scale = invstd * gamma, shift = beta."""
    scale = invstd if bn_weight is None else invstd * bn_weight.detach().to(invstd.dtype)
    shift = torch.zeros_like(invstd) if bn_bias is None else bn_bias.detach().to(invstd.dtype)
    return scale, shift


def bn_backward_coefficients(scale, invstd, sum_dz, sum_dz_xmu, count, batch_stats, sync=None):
    """(coef_xmu, coef_c) of BatchNorm's input gradient scale * dz + (z - mean) * coef_xmu + coef_c;
    zero with constant (running) statistics, where dz/dz_in is just the scale. With sync
    (ops.SyncGroup) the two sums are all-reduced over its processes first and `count` is the whole
    batch's; the caller's sums stay local (gamma's and beta's gradients: DDP averages them)."""
    if not batch_stats:
        zero = torch.zeros_like(scale)
        return zero, zero
    if sync is not None:
        sum_dz, sum_dz_xmu = ops.all_reduce_sums(sum_dz, sum_dz_xmu, sync)
    return -scale * invstd * invstd * sum_dz_xmu / count, -scale * sum_dz / count


def stats_from_moments(mean, var, count, eps, running_mean, running_var, momentum, sync=None):
    """(mean, invstd, count) of BatchNorm from a batch's moments over `count` values per channel,
    running statistics updated. With sync (ops.SyncGroup) the moments are first combined with the
    same BatchNorm's on every process (one all-reduce) and count becomes the whole batch's, a 0-d
    tensor."""
    if sync is not None:
        mean, var, count = ops.all_reduce_moments(mean, var, count, sync)
    mean, invstd = ops.bn_stats_from_moments(mean, var, count, eps, running_mean, running_var, momentum)
    return mean, invstd, count


def synced_batch_stats(z, eps, running_mean, running_var, momentum, sync):
    """(mean, invstd, count) of BatchNorm over z and the same BatchNorm's inputs on every process
    of `sync` (running statistics updated with them); count is the whole batch's, a 0-d tensor."""
    var, mean = ops.channel_var_mean(z)
    return stats_from_moments(mean, var, batch_count(z), eps, running_mean, running_var, momentum, sync)


def bn_act_forward_save(ctx, z, bn_weight, bn_bias, mean, invstd, residual, batch_stats, relu, sync=None,
                        count=None):
    """(y, saved): y = act((z - mean) * scale + shift + residual); ctx gets the flags
    bn_act_backward needs and `saved` is the tensors it needs (for save_for_backward). With `sync`
    (ops.SyncGroup), mean and invstd are of the batch over every process, `count` values per channel."""
    scale, shift = bn_scale_shift(invstd, bn_weight, bn_bias)
    y = ops.bn_act_forward(z, mean, scale, shift, residual, relu)
    ctx.sync = sync if batch_stats else None
    ctx.count = count if count is not None else z.numel() // z.shape[1]
    ctx.batch_stats = batch_stats
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.bn_dtypes = (None if bn_weight is None else bn_weight.dtype, None if bn_bias is None else bn_bias.dtype)
    mask_source = y if (residual is not None and relu) else None
    return y, (z, mean, scale, shift, invstd, mask_source)


def bn_act_backward(ctx, grad_y, saved, need_z, need_gamma, need_beta, need_residual):
    """(grad_z, grad_gamma, grad_beta, grad_residual) of bn_act_forward_save's y, None where not needed."""
    z, mean, scale, shift, invstd, output = saved
    relu = ctx.relu
    if ctx.has_residual and relu:
        # dz is also the residual's gradient: the reduction pass writes it once.
        sum_dz, sum_dz_xmu, grad_z_act = ops.bn_act_backward_reduce(
            grad_y, z, mean, scale, shift, output, relu=True, write_grad_z=True)
        grad_for_bn, mask_in_elementwise = grad_z_act, False
        grad_residual = grad_z_act
    else:
        sum_dz, sum_dz_xmu, _ = ops.bn_act_backward_reduce(grad_y, z, mean, scale, shift, None, relu=relu)
        grad_for_bn, mask_in_elementwise = grad_y, relu
        grad_residual = grad_y if ctx.has_residual else None

    grad_gamma = (sum_dz_xmu * invstd).to(ctx.bn_dtypes[0]) if need_gamma else None
    grad_beta = sum_dz.to(ctx.bn_dtypes[1]) if need_beta else None
    grad_z = None
    if need_z:
        coef_xmu, coef_c = bn_backward_coefficients(scale, invstd, sum_dz, sum_dz_xmu, ctx.count, ctx.batch_stats,
                                                    ctx.sync)
        grad_z = ops.bn_act_backward_elementwise(grad_for_bn, z, mean, scale, shift, coef_xmu, coef_c,
                                                 relu=mask_in_elementwise)
    if grad_residual is not None and need_residual:
        grad_residual = grad_residual.to(ctx.residual_dtype)
    else:
        grad_residual = None
    return grad_z, grad_gamma, grad_beta, grad_residual


class ConvBNAct(torch.autograd.Function):
    """y = act(BN(conv2d(x, weight, bias)) + residual), act ReLU or identity.

    batch_stats=True: training-mode BatchNorm (batch statistics, running statistics updated in
    place with the factor `momentum`); False: the running statistics as constants (eval mode with
    gradients, e.g. fine-tuning with frozen BN).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
                stride, padding, dilation, groups, eps, momentum, batch_stats, relu, sync):
        z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        count = None
        if batch_stats and sync is not None:
            mean, invstd, count = synced_batch_stats(z, eps, running_mean, running_var, momentum, sync)
        else:
            mean, invstd = batch_or_running_stats(z, batch_stats, eps, running_mean, running_var, momentum)
        y, bn_saved = bn_act_forward_save(ctx, z, bn_weight, bn_bias, mean, invstd, residual, batch_stats, relu,
                                          sync, count)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, *bn_saved)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, *bn_saved = ctx.saved_tensors
        need_x, need_w, need_b, need_gamma, need_beta = ctx.needs_input_grad[:5]
        need_z = need_x or need_w or need_b
        grad_z, grad_gamma, grad_beta, grad_residual = bn_act_backward(ctx, grad_y, bn_saved, need_z, need_gamma,
                                                                      need_beta, ctx.needs_input_grad[7])
        grad_x = grad_w = grad_b = None
        if need_z:
            grad_x, grad_w, grad_b = _conv_backward(grad_z, x, weight, ctx.has_bias, *ctx.conv_args,
                                                    (need_x, need_w, need_b))
        return (grad_x, grad_w, grad_b, grad_gamma, grad_beta, None, None, grad_residual,
                None, None, None, None, None, None, None, None, None)


class BNAct(torch.autograd.Function):
    """y = act(BN(z) + residual) of a raw conv output z whose statistics (mean, invstd) were taken
    elsewhere (a conv epilogue; running statistics when not batch_stats). Backward includes the
    path through the batch statistics, which are functions of z. With sync (ops.SyncGroup) they
    are the statistics of every process's batch, `count` values per channel in all."""

    @staticmethod
    def forward(ctx, z, bn_weight, bn_bias, mean, invstd, residual, batch_stats, relu, sync=None, count=None):
        y, bn_saved = bn_act_forward_save(ctx, z, bn_weight, bn_bias, mean, invstd, residual, batch_stats, relu,
                                          sync, count)
        ctx.save_for_backward(*bn_saved)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        grad_z, grad_gamma, grad_beta, grad_residual = bn_act_backward(
            ctx, grad_y, ctx.saved_tensors, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            ctx.needs_input_grad[2], ctx.needs_input_grad[5])
        return grad_z, grad_gamma, grad_beta, None, None, grad_residual, None, None, None, None


def sync_batch_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], eps: float,
                    momentum: float, sync: ops.SyncGroup) -> torch.Tensor:
    """Training-mode BatchNorm of x with the batch statistics of every process of `sync` (one
    all-reduce forward, one backward), running statistics updated with them: nn.SyncBatchNorm's
    forward, on any device. The math is float32 (float64 for float64 x); y has x's dtype."""
    mean, invstd, count = synced_batch_stats(x.detach(), eps, running_mean, running_var, momentum, sync)
    return BNAct.apply(x, weight, bias, mean, invstd, None, True, False, sync, count)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                residual: Optional[torch.Tensor] = None, *, stride: Sequence[int] = (1, 1),
                padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1,
                eps: float = 1e-5, momentum: float = 0.1, batch_stats: bool = True, relu: bool = True,
                sync: Optional[ops.SyncGroup] = None) -> torch.Tensor:
    """act(BatchNorm(conv2d(x)) + residual) with autograd; see ConvBNAct.

    Args:
        x (Tensor[N, C_in, H, W]); weight (Tensor[C_out, C_in/groups, kh, kw]); bias (Tensor[C_out] or None).
        bn_weight, bn_bias (Tensor[C_out] or None): gamma and beta (None: 1 and 0, affine=False).
        running_mean, running_var (Tensor[C_out] or None): updated when batch_stats, read otherwise.
        residual (Tensor[N, C_out, H', W'] or None): added before the activation.
        sync (ops.SyncGroup or None): batch statistics over every process of its group, as
            nn.SyncBatchNorm (ops.sync_group makes one).
    Under autocast the conv runs in the autocast dtype, as F.conv2d would; BN math stays float32.
    """
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    ops.check_conv(x, weight, bias, stride, padding, dilation, groups)
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        return ConvBNAct.apply(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
                               tuple(stride), tuple(padding), tuple(dilation), groups, eps, momentum, batch_stats,
                               relu, sync)


def conv_bias_act_inference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            residual: Optional[torch.Tensor] = None, *, stride: Sequence[int] = (1, 1),
                            padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1,
                            relu: bool = True) -> torch.Tensor:
    """act(conv2d(x, weight) + bias + residual) for a BN-folded conv (see ops.fold_bn); no autograd.

    Where the fused conv kernels run (ops.kernel_unsupported_reason), bias, residual and ReLU are
    the conv's epilogue: one pass. Otherwise aten's conv runs without its bias and bias, residual
    and ReLU are one bn_act_forward pass after it.
    """
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
    ops.check_conv(x, weight, None, stride, padding, dilation, groups)
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        if ops.kernel_unsupported_reason(x, weight) is None:
            return ops.conv2d_forward(x, weight, bias, stride, padding, dilation, groups, residual=residual,
                                      relu=relu)[0]
        z = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        return ops.bn_act_forward(z, None, None, bias, residual, relu)
