"""Op: normalize-activate y = act((x - mean[c]) * scale[c] + shift[c] + residual) and its backward.

Forward is one elementwise pass. With mean and scale absent it is the epilogue of a BN-folded conv,
y = act(conv + bias[c] + residual). act: any of common.ACTIVATIONS (an Activation; True / False
mean ReLU / none); the kernels take its code and alpha. Backward, with dz = grad * act'(u),
u = (x - mean) * scale + shift recomputed from x (after a residual add, ReLU only, whose mask is
output > 0):
  bn_act_backward_reduce       one pass: sum(dz), sum(dz * (x - mean)), and dz when asked
  bn_act_backward_elementwise  one pass: grad_input = scale * dz + (x - mean) * coef_xmu + coef_c
Reference here; kernels in fusedres/kernels/bn_act_triton.py, csrc/cpu/bn_act_cpu.cpp and
csrc/cuda/bn_act_cuda.cu.
"""
import functools
from typing import Optional, Tuple

import torch

from . import validate
from ..common import ACTIVATIONS, RELU, Activation, as_activation, dense, like, per_channel, stats_dtype
from .bn_finalize import channel_sums
from .registry import available_backend, call, dispatch, register, register_fake, register_loader


def activation_of(act, alpha: float = 0.0) -> Activation:
    """The Activation an op's (act, alpha) arguments name: an activation code (int) and alpha as
    the kernels take them, or anything common.as_activation takes (then alpha is its own)."""
    if isinstance(act, int) and not isinstance(act, bool):
        if not 0 <= act < len(ACTIVATIONS):
            raise ValueError(f"fusedres: act must be an activation code in [0, {len(ACTIVATIONS)}) "
                             f"({ACTIVATIONS}), got {act}")
        return Activation(ACTIVATIONS[act], float(alpha))
    return as_activation(act)


def act_args(act) -> Tuple[int, float]:
    """(code, alpha) of an Activation or a ReLU flag, as the kernels take them (the hot path)."""
    if act is True:
        return 1, 0.0
    if act is False:
        return 0, 0.0
    return act.code, act.alpha


def _activation_backward(grad, x, mean, scale, shift, output, act: Activation):
    if output is not None:  # ReLU after a residual add: its mask from the output
        return torch.where(output > 0, grad, 0)
    u = (x - per_channel(mean, x)) * per_channel(scale, x) + per_channel(shift, x)
    return act.backward(grad, u)


# ---------------------------------------------------------------------------------------------
# Plain PyTorch references, computed in the statistics dtype (float32, float64 for float64 x).
# ---------------------------------------------------------------------------------------------
def bn_act_forward_reference(x, mean, scale, shift, residual, act, alpha=0.0):
    act = activation_of(act, alpha)
    acc = stats_dtype(x)
    z = x.to(acc)
    if mean is not None:
        z = z - per_channel(mean, x)
    if scale is not None:
        z = z * per_channel(scale, x)
    z = z + per_channel(shift, x)
    if residual is not None:
        z = z + residual.to(acc)
    return act.apply(z).to(x.dtype)


def bn_act_backward_reduce_reference(grad_output, x, mean, scale, shift, output, act, alpha=0.0,
                                     write_grad_z=False):
    act = activation_of(act, alpha)
    _check_output(output, act)
    acc = stats_dtype(x)
    xf = x.to(acc)
    dz = _activation_backward(grad_output.to(acc), xf, mean, scale, shift,
                              None if output is None else output.to(acc), act)
    dims = [0] + list(range(2, x.dim()))
    sum_dz = dz.sum(dims)
    sum_dz_xmu = (dz * (xf - per_channel(mean, x))).sum(dims)
    grad_z = dz.to(grad_output.dtype) if write_grad_z else grad_output.new_empty(0)
    return sum_dz, sum_dz_xmu, grad_z


def bn_act_backward_elementwise_reference(grad, x, mean, scale, shift, coef_xmu, coef_c, act, alpha=0.0):
    act = activation_of(act, alpha)
    acc = stats_dtype(x)
    xf = x.to(acc)
    dz = _activation_backward(grad.to(acc), xf, mean, scale, shift, None, act)
    xmu = xf - per_channel(mean, x)
    dx = per_channel(scale, x) * dz + xmu * per_channel(coef_xmu, x) + per_channel(coef_c, x)
    return dx.to(x.dtype)


def _check_output(output, act: Activation) -> None:
    if output is not None and not act.is_relu:
        raise ValueError(f"fusedres: output (the ReLU mask's source after a residual add) is given only with "
                         f"act = ReLU, got act {act.name!r}")


register("bn_act_forward", "reference")(bn_act_forward_reference)
register("bn_act_backward_reduce", "reference")(bn_act_backward_reduce_reference)
register("bn_act_backward_elementwise", "reference")(bn_act_backward_elementwise_reference)

for _backend in ("cpu", "cuda"):
    for _op in ("bn_act_forward", "bn_act_backward_reduce", "bn_act_backward_elementwise"):
        register_loader(_op, _backend, lambda _op=_op: getattr(torch.ops.fusedres_kernels, _op).default)


def _load_triton(op: str):
    from ..kernels import bn_act_triton

    if op == "bn_act_backward_reduce":  # the sums stay [splits, C] rows: the bookkeeping kernel adds them up
        return functools.partial(bn_act_triton.bn_act_backward_reduce_triton, reduce_sums=False)
    return getattr(bn_act_triton, op + "_triton")


for _op in ("bn_act_forward", "bn_act_backward_reduce", "bn_act_backward_elementwise"):
    register_loader(_op, "triton", lambda _op=_op: _load_triton(_op))


# ---------------------------------------------------------------------------------------------
# The torch.library ops (torch.ops.fusedres.*): dispatch to a backend; fakes give output metadata.
# The extension's own ops (torch.ops.fusedres_kernels.*) take the same fakes.
# ---------------------------------------------------------------------------------------------
Tensor = torch.Tensor


@torch.library.custom_op("fusedres::bn_act_forward", mutates_args=())
def _forward_op(x: Tensor, mean: Optional[Tensor], scale: Optional[Tensor], shift: Tensor,
                residual: Optional[Tensor], act: int, alpha: float) -> Tensor:
    return dispatch("bn_act_forward", x.device, x, mean, scale, shift, residual, act, alpha)


@torch.library.custom_op("fusedres::bn_act_backward_reduce", mutates_args=())
def _backward_reduce_op(grad_output: Tensor, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                        output: Optional[Tensor], act: int, alpha: float, write_grad_z: bool
                        ) -> Tuple[Tensor, Tensor, Tensor]:
    sum_dz, sum_dz_xmu, grad_z = dispatch("bn_act_backward_reduce", x.device, grad_output, x, mean, scale, shift,
                                          output, act, alpha, write_grad_z)
    return channel_sums(sum_dz), channel_sums(sum_dz_xmu), grad_z


@torch.library.custom_op("fusedres::bn_act_backward_elementwise", mutates_args=())
def _backward_elementwise_op(grad: Tensor, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                             coef_xmu: Tensor, coef_c: Tensor, act: int, alpha: float) -> Tensor:
    return dispatch("bn_act_backward_elementwise", x.device, grad, x, mean, scale, shift, coef_xmu, coef_c, act,
                    alpha)


def _forward_fake(x, mean, scale, shift, residual, act, alpha):
    return torch.empty_like(x)


def _backward_reduce_fake(grad_output, x, mean, scale, shift, output, act, alpha, write_grad_z):
    acc = stats_dtype(x)
    grad_z = torch.empty_like(x, dtype=grad_output.dtype) if write_grad_z else grad_output.new_empty(0)
    return x.new_empty(x.shape[1], dtype=acc), x.new_empty(x.shape[1], dtype=acc), grad_z


def _backward_elementwise_fake(grad, x, mean, scale, shift, coef_xmu, coef_c, act, alpha):
    return torch.empty_like(x)


for _op, _fake in (("bn_act_forward", _forward_fake), ("bn_act_backward_reduce", _backward_reduce_fake),
                   ("bn_act_backward_elementwise", _backward_elementwise_fake)):
    register_fake(_op, _fake)


# ---------------------------------------------------------------------------------------------
# Public functions: validate, bring every tensor to one layout and dtype, dispatch.
# ---------------------------------------------------------------------------------------------
def _params(x, **vectors):
    acc = stats_dtype(x)
    out = []
    for name, v in vectors.items():
        validate.channel_vector(x, v, name)
        out.append(None if v is None else v.detach().to(acc).contiguous())
    return out


def bn_act_forward(x: torch.Tensor, mean: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                   shift: torch.Tensor, residual: Optional[torch.Tensor] = None, act=RELU) -> torch.Tensor:
    """y = act((x - mean) * scale + shift + residual).

    Args:
        x (Tensor[N, C, H, W]): NCHW or channels_last; y has the same dtype and memory format.
        mean, scale (Tensor[C], optional): absent means 0 and 1.
        shift (Tensor[C]): beta in training, the folded bias in inference.
        residual (Tensor[N, C, H, W], optional): added before the activation.
        act: an Activation (common.ACTIVATIONS: none, relu, relu6, silu, hardswish, leaky_relu with
            its slope as alpha, gelu, gelu_tanh), its name, or a bool (True: ReLU, False: none).
    """
    code, alpha = act_args(as_activation(act))
    validate.activation(x, "x")
    if shift is None:
        raise ValueError("fusedres: shift must be a tensor of per-channel values, got None")
    validate.same_shape(x, residual, "residual")
    x = dense(x)
    mean, scale, shift = _params(x, mean=mean, scale=scale, shift=shift)
    return call("bn_act_forward", x.device, x, mean, scale, shift, like(residual, x), code, alpha)


def bn_act_backward_reduce(grad_output: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
                           shift: torch.Tensor, output: Optional[torch.Tensor] = None, act=RELU,
                           write_grad_z: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum(dz), sum(dz * (x - mean)), dz or an empty tensor), per channel, dz = grad * act'(u).

    u = (x - mean) * scale + shift is recomputed from x; with the forward output given (ReLU after
    a residual add, where u is not x's alone; act must then be ReLU) the mask is output > 0.
    """
    act = as_activation(act)
    _check_output(output, act)
    validate.activation(x, "x")
    validate.same_shape(x, grad_output, "grad_output")
    validate.same_shape(x, output, "output")
    x = dense(x)
    mean, scale, shift = _params(x, mean=mean, scale=scale, shift=shift)
    grad_output = like(grad_output.to(x.dtype), x)
    sum_dz, sum_dz_xmu, grad_z = call("bn_act_backward_reduce", x.device, grad_output, x, mean, scale, shift,
                                      like(output, x), *act_args(act), bool(write_grad_z))
    return channel_sums(sum_dz), channel_sums(sum_dz_xmu), grad_z


def bn_act_backward_elementwise(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
                                shift: torch.Tensor, coef_xmu: torch.Tensor, coef_c: torch.Tensor,
                                act=RELU) -> torch.Tensor:
    """grad_input = scale * dz + (x - mean) * coef_xmu + coef_c, dz = grad * act'((x - mean) * scale + shift)."""
    code, alpha = act_args(as_activation(act))
    validate.activation(x, "x")
    validate.same_shape(x, grad, "grad")
    x = dense(x)
    mean, scale, shift, coef_xmu, coef_c = _params(x, mean=mean, scale=scale, shift=shift,
                                                   coef_xmu=coef_xmu, coef_c=coef_c)
    grad = like(grad.to(x.dtype), x)
    return call("bn_act_backward_elementwise", x.device, grad, x, mean, scale, shift, coef_xmu, coef_c, code, alpha)
