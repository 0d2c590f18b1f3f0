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

from . import ops


def _conv_backward(grad_z, x, weight, has_bias, stride, padding, dilation, groups, needs):
    """aten's conv backward (cuDNN / oneDNN): (grad_x, grad_weight, grad_bias), None where not needed."""
    if not any(needs):
        return None, None, None
    bias_sizes = [weight.shape[0]] if has_bias else None
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_z, x, weight, bias_sizes, list(stride), list(padding), list(dilation), False, [0, 0], groups,
        list(needs))
    return grad_x, grad_w, grad_b


class ConvBNAct(torch.autograd.Function):
    """y = act(BN(conv2d(x, weight, bias)) + residual), act ReLU or identity.

    batch_stats=True: training-mode BatchNorm (batch statistics, running statistics updated in
    place with the factor `momentum`); False: the running statistics as constants (eval mode with
    gradients, e.g. fine-tuning with frozen BN).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
                stride, padding, dilation, groups, eps, momentum, batch_stats, relu):
        z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        if batch_stats:
            count = z.numel() // z.shape[1]
            if count <= 1:  # nn.BatchNorm2d's own message, raised at the same point
                raise ValueError(f"Expected more than 1 value per channel when training, got input size {z.size()}")
            mean, invstd = ops.bn_stats(z, eps, running_mean, running_var, momentum)
        else:
            acc = torch.float64 if z.dtype == torch.float64 else torch.float32
            mean = running_mean.to(acc)
            invstd = (running_var.to(acc) + eps).rsqrt()
        scale = invstd if bn_weight is None else invstd * bn_weight.detach().to(invstd.dtype)
        shift = torch.zeros_like(invstd) if bn_bias is None else bn_bias.detach().to(invstd.dtype)
        y = ops.bn_act_forward(z, mean, scale, shift, residual, relu)

        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.batch_stats = batch_stats
        ctx.relu = relu
        ctx.has_residual = residual is not None
        ctx.residual_dtype = residual.dtype if residual is not None else None
        ctx.has_bias = bias is not None
        ctx.bn_dtypes = (None if bn_weight is None else bn_weight.dtype, None if bn_bias is None else bn_bias.dtype)
        mask_source = y if (residual is not None and relu) else None
        ctx.save_for_backward(x, weight, z, mean, scale, shift, invstd, mask_source)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, z, mean, scale, shift, invstd, output = ctx.saved_tensors
        need_x, need_w, need_b, need_gamma, need_beta = ctx.needs_input_grad[:5]
        need_residual = ctx.needs_input_grad[7]
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

        grad_x = grad_w = grad_b = None
        if need_x or need_w or need_b:
            if ctx.batch_stats:
                count = z.numel() // z.shape[1]
                coef_xmu = -scale * invstd * invstd * sum_dz_xmu / count
                coef_c = -scale * sum_dz / count
            else:  # constant statistics: dz/dz_conv is just the scale
                coef_xmu = torch.zeros_like(scale)
                coef_c = coef_xmu
            grad_z = ops.bn_act_backward_elementwise(grad_for_bn, z, mean, scale, shift, coef_xmu, coef_c,
                                                     relu=mask_in_elementwise)
            grad_x, grad_w, grad_b = _conv_backward(grad_z, x, weight, ctx.has_bias, *ctx.conv_args,
                                                    (need_x, need_w, need_b))
        if grad_residual is not None and need_residual:
            grad_residual = grad_residual.to(ctx.residual_dtype)
        else:
            grad_residual = None
        return (grad_x, grad_w, grad_b, grad_gamma, grad_beta, None, None, grad_residual,
                None, None, None, None, None, None, None, None)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                residual: Optional[torch.Tensor] = None, *, stride: Sequence[int] = (1, 1),
                padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1,
                eps: float = 1e-5, momentum: float = 0.1, batch_stats: bool = True, relu: bool = True) -> torch.Tensor:
    """act(BatchNorm(conv2d(x)) + residual) with autograd; see ConvBNAct.

    Args:
        x (Tensor[N, C_in, H, W]); weight (Tensor[C_out, C_in/groups, kh, kw]); bias (Tensor[C_out] or None).
        bn_weight, bn_bias (Tensor[C_out] or None): gamma and beta (None: 1 and 0, affine=False).
        running_mean, running_var (Tensor[C_out] or None): updated when batch_stats, read otherwise.
        residual (Tensor[N, C_out, H', W'] or None): added before the activation.
    Under autocast the conv runs in the autocast dtype, as F.conv2d would; BN math stays float32.
    """
    dtype = _autocast_dtype(x.device.type)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        return ConvBNAct.apply(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
                               tuple(stride), tuple(padding), tuple(dilation), groups, eps, momentum, batch_stats,
                               relu)


def conv_bias_act_inference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            residual: Optional[torch.Tensor] = None, *, stride: Sequence[int] = (1, 1),
                            padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1,
                            relu: bool = True) -> torch.Tensor:
    """act(conv2d(x, weight) + bias + residual) for a BN-folded conv (see ops.fold_bn); no autograd.

    The conv runs without its bias; bias, residual and ReLU are one epilogue pass after it.
    """
    dtype = _autocast_dtype(x.device.type)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        z = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        return ops.bn_act_forward(z, None, None, bias, residual, relu)
