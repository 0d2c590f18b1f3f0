"""Ops: 2-D convolution with BatchNorm fused at both ends (forward, input gradient, weight gradient).

  conv2d_forward      y = act(conv2d(pro(x), W) + bias + residual), pro(x) = act((x - mean) * scale + shift)
                      per input channel (optional), with the BatchNorm statistics (mean, biased
                      variance) of conv2d(pro(x), W) + bias when asked, from the kernel epilogue's
                      per-tile partials
  conv2d_input_grad   the gradient of pro(x)'s conv; with the prologue's BN given, dU = dA * act'(U)
                      (U the prologue's pre-activation) and its per-channel sums for BatchNorm's backward
  conv2d_weight_grad  the weight gradient, recomputing pro(x) from x
Reference here (plain PyTorch; it materializes pro(x)); Triton kernels in
fusedres/kernels/conv_triton.py. There is no C++ backend for these: on the CPU and where the
kernels do not apply, fusedres.autograd keeps aten's conv with the core BatchNorm ops.
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..common import memory_format, per_channel, poison_outputs, stats_dtype, tracing
from . import validate
from ..common import as_activation
from .bn_act import act_args, activation_of, bn_act_forward_reference
from .bn_finalize import StatsPartials, channel_sums, merge_partials
from .registry import available_backend, dispatch, get_backend, kernel, register, register_loader

CONV_OPS = ("conv2d_forward", "conv2d_input_grad", "conv2d_weight_grad")
Tensor = torch.Tensor


class ChannelMoments(NamedTuple):
    """Per-channel batch mean and biased variance (float32; float64 for float64 input)."""
    mean: torch.Tensor  # [C]
    var: torch.Tensor  # [C]


def _prologue_reference(x, in_mean, in_scale, in_shift, in_act, in_alpha):
    """pro(x), rounded to x's dtype as the kernels round it: bn_act_forward's reference."""
    if in_scale is None:
        return x
    return bn_act_forward_reference(x, in_mean, in_scale, in_shift, None, in_act, in_alpha)


def conv2d_forward_reference(x, weight, bias, stride, padding, dilation, groups, in_mean, in_scale, in_shift,
                             in_act, in_alpha, residual, act, alpha, stats, out=None):
    acc = stats_dtype(x)
    a = _prologue_reference(x, in_mean, in_scale, in_shift, in_act, in_alpha)
    z = F.conv2d(a, weight, None, stride, padding, dilation, groups).to(acc)
    if bias is not None:
        z = z + per_channel(bias.to(acc), x)
    partials = None
    if stats:
        stored = z.to(x.dtype).to(acc)
        count = stored.numel() // stored.shape[1]
        s = stored.sum((0, 2, 3))
        m2 = ((stored - per_channel(s / count, x)) ** 2).sum((0, 2, 3))
        partials = StatsPartials(torch.full((1,), float(count), dtype=acc, device=x.device), s[None], m2[None])
    if residual is not None:
        z = z + residual.to(acc)
    z = activation_of(act, alpha).apply(z)
    if out is not None:
        return out.copy_(z), partials
    return z.to(x.dtype).contiguous(memory_format=memory_format(x)), partials


def _accumulate_reference(out, out_scale, da):
    """out += out_scale * da, added in float32 and rounded once, as the kernels do."""
    return out.copy_(out.to(da.dtype) + per_channel(out_scale.to(da.dtype), out) * da)


def conv2d_input_grad_reference(grad_y, weight, x, stride, padding, dilation, groups, in_mean, in_scale, in_shift,
                                in_act, in_alpha, out=None, out_scale=None):
    acc = stats_dtype(grad_y)  # summed in float32 as the kernels' accumulators are, rounded once
    da = torch.nn.grad.conv2d_input(x.shape, weight.to(acc), grad_y.to(acc), stride, padding, dilation, groups)
    if in_scale is None:
        if out is not None:
            return _accumulate_reference(out, out_scale, da), None, None
        return da.to(grad_y.dtype).contiguous(memory_format=memory_format(x)), None, None
    xmu = x.to(acc) - per_channel(in_mean, x)
    da = activation_of(in_act, in_alpha).backward(da, xmu * per_channel(in_scale, x) + per_channel(in_shift, x))
    if out is not None:  # dU is never rounded: added into out in float32, summed unrounded
        return _accumulate_reference(out, out_scale, da), da.sum((0, 2, 3)), (da * xmu).sum((0, 2, 3))
    du = da.to(grad_y.dtype)  # summed as stored, as the kernels do
    return (du.contiguous(memory_format=memory_format(x)), du.to(acc).sum((0, 2, 3)),
            (du.to(acc) * xmu).sum((0, 2, 3)))


def conv2d_weight_grad_reference(grad_y, x, weight, stride, padding, dilation, groups, in_mean, in_scale, in_shift,
                                 in_act, in_alpha):
    a = _prologue_reference(x, in_mean, in_scale, in_shift, in_act, in_alpha)
    return torch.nn.grad.conv2d_weight(a.to(stats_dtype(x)), weight.shape, grad_y.to(stats_dtype(x)), stride,
                                       padding, dilation, groups)


register("conv2d_forward", "reference")(conv2d_forward_reference)
register("conv2d_input_grad", "reference")(conv2d_input_grad_reference)
register("conv2d_weight_grad", "reference")(conv2d_weight_grad_reference)


def _load_triton(op: str):
    """The Triton launcher of `op` with the registry's argument order (imports triton on first use)."""
    from ..kernels import conv_triton as ct

    def geometry(x, weight, stride, padding, dilation, groups):
        return ct.geometry(tuple(x.shape), tuple(weight.shape), stride, padding, dilation, groups)

    def forward(x, weight, bias, stride, padding, dilation, groups, in_mean, in_scale, in_shift, in_act, in_alpha,
                residual, act, alpha, stats, out=None):
        y, partials = ct.conv_forward(x, weight, bias, geometry(x, weight, stride, padding, dilation, groups),
                                      in_mean=in_mean, in_scale=in_scale, in_shift=in_shift, in_act=in_act,
                                      in_alpha=in_alpha,
                                      residual=residual, act=act, alpha=alpha, stats=stats,
                                      out_format=memory_format(x), out=out)
        return y, None if partials is None else StatsPartials(*partials)

    def input_grad(grad_y, weight, x, stride, padding, dilation, groups, in_mean, in_scale, in_shift, in_act, in_alpha,
                   out=None, out_scale=None):
        # the BatchNorm sums stay [T, C] per-tile rows: the bookkeeping kernel adds them up
        return ct.conv_input_grad(grad_y, weight, geometry(x, weight, stride, padding, dilation, groups), x=x,
                                  in_mean=in_mean, in_scale=in_scale, in_shift=in_shift, in_act=in_act,
                                  in_alpha=in_alpha,
                                  out_format=memory_format(x), out=out, out_scale=out_scale, reduce_sums=False)

    def weight_grad(grad_y, x, weight, stride, padding, dilation, groups, in_mean, in_scale, in_shift, in_act,
                    in_alpha):
        return ct.conv_weight_grad(grad_y, x, geometry(x, weight, stride, padding, dilation, groups),
                                   in_mean=in_mean, in_scale=in_scale, in_shift=in_shift, in_act=in_act,
                                   in_alpha=in_alpha)

    return {"conv2d_forward": forward, "conv2d_input_grad": input_grad, "conv2d_weight_grad": weight_grad}[op]


for _op in CONV_OPS:
    register_loader(_op, "triton", lambda _op=_op: _load_triton(_op))


def weight_grad_like(dw: Tensor, weight: Tensor) -> Tensor:
    """A backend's weight gradient (float32 / float64) in the weight's dtype and memory format."""
    return dw.to(weight.dtype).contiguous(memory_format=memory_format(weight))


# ---------------------------------------------------------------------------------------------
# The torch.library ops (torch.ops.fusedres.conv2d_*): dispatch to a backend, with fakes. Outputs
# never alias inputs: with `out` the op writes into it and returns an empty tensor in its place;
# absent statistics are empty tensors.
# ---------------------------------------------------------------------------------------------
def _empty(ref: Tensor, dtype=None) -> Tensor:
    return ref.new_empty(0, dtype=dtype or ref.dtype)


@torch.library.custom_op("fusedres::conv2d_forward", mutates_args=("out",))
def _conv2d_forward_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
                       dilation: List[int], groups: int, in_mean: Optional[Tensor], in_scale: Optional[Tensor],
                       in_shift: Optional[Tensor], in_act: int, in_alpha: float, residual: Optional[Tensor], act: int,
                       alpha: float,
                       stats: bool, out: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    if out is not None and poison_outputs():
        out.fill_(float("nan"))
    y, partials = dispatch("conv2d_forward", x.device, x, weight, bias, tuple(stride), tuple(padding),
                           tuple(dilation), groups, in_mean, in_scale, in_shift, in_act, in_alpha, residual, act,
                           alpha, stats, out)
    if out is not None:
        y = _empty(x)
    if partials is None:
        return y, _empty(x, stats_dtype(x)), _empty(x, stats_dtype(x))
    mean, var = merge_partials(partials)
    return y, mean, var


@_conv2d_forward_op.register_fake
def _conv2d_forward_fake(x, weight, bias, stride, padding, dilation, groups, in_mean, in_scale, in_shift, in_act,
                         in_alpha,
                         residual, act, alpha, stats, out):
    shape = _output_shape(x, weight, stride, padding, dilation)
    y = _empty(x) if out is not None else torch.empty(shape, dtype=x.dtype, device=x.device,
                                                      memory_format=memory_format(x))
    acc = stats_dtype(x)
    c = weight.shape[0] if stats else 0
    return y, x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc)


@torch.library.custom_op("fusedres::conv2d_input_grad", mutates_args=("out",))
def _conv2d_input_grad_op(grad_y: Tensor, weight: Tensor, x: Tensor, stride: List[int], padding: List[int],
                          dilation: List[int], groups: int, in_mean: Optional[Tensor], in_scale: Optional[Tensor],
                          in_shift: Optional[Tensor], in_act: int, in_alpha: float, out: Optional[Tensor],
                          out_scale: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    dx, sum_du, sum_du_xmu = dispatch("conv2d_input_grad", x.device, grad_y, weight, x, tuple(stride),
                                      tuple(padding), tuple(dilation), groups, in_mean, in_scale, in_shift, in_act,
                                      in_alpha,
                                      out, out_scale)
    acc = stats_dtype(grad_y)
    return (_empty(grad_y) if out is not None else dx, _empty(x, acc) if sum_du is None else channel_sums(sum_du),
            _empty(x, acc) if sum_du_xmu is None else channel_sums(sum_du_xmu))


@_conv2d_input_grad_op.register_fake
def _conv2d_input_grad_fake(grad_y, weight, x, stride, padding, dilation, groups, in_mean, in_scale, in_shift,
                            in_act, in_alpha, out, out_scale):
    dx = _empty(grad_y) if out is not None else torch.empty(x.shape, dtype=grad_y.dtype, device=x.device,
                                                            memory_format=memory_format(x))
    c = x.shape[1] if in_scale is not None else 0
    acc = stats_dtype(grad_y)
    return dx, x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc)


@torch.library.custom_op("fusedres::conv2d_weight_grad", mutates_args=())
def _conv2d_weight_grad_op(grad_y: Tensor, x: Tensor, weight: Tensor, stride: List[int], padding: List[int],
                           dilation: List[int], groups: int, in_mean: Optional[Tensor], in_scale: Optional[Tensor],
                           in_shift: Optional[Tensor], in_act: int, in_alpha: float) -> Tensor:
    dw = dispatch("conv2d_weight_grad", x.device, grad_y, x, weight, tuple(stride), tuple(padding), tuple(dilation),
                  groups, in_mean, in_scale, in_shift, in_act, in_alpha)
    return weight_grad_like(dw, weight)


@_conv2d_weight_grad_op.register_fake
def _conv2d_weight_grad_fake(grad_y, x, weight, stride, padding, dilation, groups, in_mean, in_scale, in_shift,
                             in_act, in_alpha):
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device, memory_format=memory_format(weight))


# ---------------------------------------------------------------------------------------------
# Checks and public functions.
# ---------------------------------------------------------------------------------------------
def _pair(v, name) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise ValueError(f"fusedres: {name} must be an int or a pair of ints, got {v!r}")
    return v


def check_conv(x, weight, bias, stride, padding, dilation, groups):
    """Clear errors for a conv's arguments (naming each); returns (stride, padding, dilation) as pairs."""
    validate.activation(x, "x")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"fusedres: weight must be a 4-D tensor [C_out, C_in/groups, kh, kw], got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    if not isinstance(groups, int) or groups < 1 or x.shape[1] % groups or weight.shape[0] % groups:
        raise ValueError(f"fusedres: groups={groups!r} must be a positive int dividing the input's {x.shape[1]} "
                         f"and the weight's {weight.shape[0]} channels")
    if weight.shape[1] * groups != x.shape[1]:
        raise ValueError(f"fusedres: weight {tuple(weight.shape)} with groups={groups} expects "
                         f"{weight.shape[1] * groups} input channels, got x with {x.shape[1]}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"fusedres: weight ({weight.dtype}, {weight.device}) must match x ({x.dtype}, {x.device})")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"fusedres: bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"fusedres: need stride >= 1, dilation >= 1, padding >= 0; got stride={stride}, "
                         f"padding={padding}, dilation={dilation}")
    return stride, padding, dilation


def _check_prologue(x, in_mean, in_scale, in_shift):
    given = [t is not None for t in (in_mean, in_scale, in_shift)]
    if any(given) and not all(given):
        raise ValueError("fusedres: in_mean, in_scale and in_shift must be given together (the input's BatchNorm)")
    for name, v in (("in_mean", in_mean), ("in_scale", in_scale), ("in_shift", in_shift)):
        validate.channel_vector(x, v, name)
    if in_scale is not None:
        acc = stats_dtype(x)
        return tuple(v.to(acc).contiguous() for v in (in_mean, in_scale, in_shift))
    return None, None, None


def _output_shape(x, weight, stride, padding, dilation):
    return (x.shape[0], weight.shape[0]) + tuple(
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip(x.shape[2:], padding, dilation, weight.shape[2:], stride))


def _check_out(out, shape, dtype, device, name):
    """`out` given to write into: any strides (a channel slice of a larger buffer), no overlap."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"fusedres: {name} must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"fusedres: {name} must be a {tuple(shape)} {dtype} tensor on {device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    # (an aten query a traced graph cannot hold: skipped while torch.compile traces)
    if not torch.compiler.is_compiling() and torch._debug_has_internal_overlap(out) == 1:
        raise ValueError(f"fusedres: {name} has overlapping memory (an expanded tensor); each element must be "
                         f"its own")


def kernel_unsupported_reason(x: torch.Tensor, weight: torch.Tensor, dtype: Optional[torch.dtype] = None
                              ) -> Optional[str]:
    """None if the fused conv kernels (not the reference) will run this conv, else why not.
    dtype: the dtype both will have when the conv runs (autocast), if not their own."""
    backend = available_backend("conv2d_forward", x.device)
    if backend is None or backend == "reference":
        return f"no fused conv kernel for {x.device.type} tensors under backend {get_backend()!r}"
    x_dtype = dtype or x.dtype
    if x.device.type == "cuda":
        if x_dtype == torch.float64:
            return "float64 convolutions run in aten on CUDA"
        if memory_format(x) != torch.channels_last and x.shape[2] * x.shape[3] > 1:
            return "NCHW input: the fused conv kernels are channels_last implicit GEMMs (use channels_last)"
    if (dtype or weight.dtype) != x_dtype:
        return f"weight dtype {weight.dtype} differs from the input's {x.dtype}"
    if gpu_shape_rules_apply(x):
        return gpu_shape_reason(x, weight, x_dtype)
    return None


def gpu_shape_rules_apply(x: torch.Tensor) -> bool:
    """Whether gpu_shape_reason decides for x's convs: on a GPU (and where a recording plans
    launches as on one, benchmarks/triton_variants.py). Not under the interpreter on the CPU, whose
    tests run the kernels on every shape."""
    return x.device.type == "cuda"


def gpu_shape_reason(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> Optional[str]:
    """Conv shapes that go to cuDNN (then the fused BatchNorm ops) on a GPU rather than the
    implicit-GEMM Triton kernels, or None. Reasoned defaults, not yet measured against cuDNN."""
    if weight.shape[1] == 1 and weight.shape[0] > 1 and x.shape[1] > 1:
        # depthwise (one input channel per group): a reduction of kh*kw values per output, which the
        # implicit GEMM's K tile mostly wastes; cuDNN has kernels for exactly this (a depthwise
        # Triton kernel is worth writing only if measured faster)
        return "depthwise conv: cuDNN's depthwise kernels, then the fused BatchNorm ops"
    row_bytes = x.shape[1] * dtype.itemsize
    if x.shape[1] == weight.shape[1] and row_bytes % 16:
        # an ungrouped conv whose input pixel is not a whole number of 16-byte vectors (an RGB stem:
        # 3 channels, 6 bytes in bf16): every operand copy would be a scalar load (sm_90 compile:
        # 12 scalar loads per tile in DenseNet-121's 7x7 stem); cuDNN has stem kernels
        return f"{x.shape[1]} input channels ({row_bytes} bytes per pixel, not a multiple of 16): cuDNN's conv"
    return None


def conv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1),
                   groups: int = 1, *, in_mean: Optional[torch.Tensor] = None, in_scale: Optional[torch.Tensor] = None,
                   in_shift: Optional[torch.Tensor] = None, in_act=False,
                   residual: Optional[torch.Tensor] = None, act=False, stats: bool = False,
                   out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[ChannelMoments]]:
    """y = act(conv2d(pro(x), weight) + bias + residual), pro(x) = act((x - in_mean) * in_scale + in_shift).

    Args:
        x (Tensor[N, C_in, H, W]); weight (Tensor[C_out, C_in/groups, kh, kw]) of x's dtype; bias (Tensor[C_out]).
        in_mean, in_scale, in_shift (Tensor[C_in]): the input's BatchNorm, applied as each tile is
            loaded; padding is zero after it. in_act: the activation after
            it (an Activation of common.ACTIVATIONS, its name, or a bool: True ReLU, False none).
        residual (Tensor[N, C_out, P, Q]): added after the bias; act: the activation last.
        stats: also return the ChannelMoments (mean, biased variance) of conv2d(pro(x)) + bias as
            stored in y's dtype (before residual and ReLU), merged from the epilogue's per-tile partials.
        out (Tensor[N, C_out, P, Q]): written in place instead of a new tensor; any strides, e.g. a
            channel slice of a dense block's feature buffer.
    Returns:
        (y in x's dtype and memory format (or `out`), ChannelMoments or None).
    """
    stride, padding, dilation = check_conv(x, weight, bias, stride, padding, dilation, groups)
    in_mean, in_scale, in_shift = _check_prologue(x, in_mean, in_scale, in_shift)
    out_shape = _output_shape(x, weight, stride, padding, dilation)
    if residual is not None:
        validate.activation(residual, "residual")
        if tuple(residual.shape) != out_shape or residual.device != x.device:
            raise ValueError(f"fusedres: residual must have the output's shape {out_shape} on {x.device}, got "
                             f"{tuple(residual.shape)} on {residual.device}")
    if out is not None:
        _check_out(out, out_shape, x.dtype, x.device, "out")
    y, moments = conv2d_forward_unchecked(x, weight, bias, stride, padding, dilation, groups, in_mean, in_scale,
                                          in_shift, *act_args(as_activation(in_act)), residual,
                                          *act_args(as_activation(act)), bool(stats), out)
    return y, as_moments(moments)


def as_moments(stats):
    """A conv epilogue's statistics as merged ChannelMoments (StatsPartials merged; moments and None
    as they are)."""
    return ChannelMoments(*merge_partials(stats)) if isinstance(stats, StatsPartials) else stats


def conv2d_forward_unchecked(x, weight, bias, stride, padding, dilation, groups, in_mean, in_scale, in_shift, in_act,
                             in_alpha,
                             residual, act, alpha, stats, out=None):
    """conv2d_forward without checks (the autograd Functions' short path, see ops.direct): (y or
    `out`, StatsPartials (eager) or ChannelMoments (traced) when stats, else None)."""
    if tracing():
        y, mean, var = torch.ops.fusedres.conv2d_forward(x, weight, bias, stride, padding, dilation, groups, in_mean,
                                                         in_scale, in_shift, in_act, in_alpha, residual, act, alpha,
                                                         stats, out)
        return (y if out is None else out), (ChannelMoments(mean, var) if stats else None)
    if out is not None and poison_outputs():
        out.fill_(float("nan"))
    y, partials = kernel("conv2d_forward", x.device)(x, weight, bias, stride, padding, dilation, groups, in_mean,
                                                     in_scale, in_shift, in_act, in_alpha, residual, act, alpha,
                                                     stats, out)
    return (y if out is None else out), partials


def conv2d_input_grad(grad_y: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, stride: Sequence[int] = (1, 1),
                      padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1, *,
                      in_mean: Optional[torch.Tensor] = None, in_scale: Optional[torch.Tensor] = None,
                      in_shift: Optional[torch.Tensor] = None, in_act=False,
                      out: Optional[torch.Tensor] = None, out_scale: Optional[torch.Tensor] = None):
    """(dA, None, None) with dA the gradient of the conv's input; with the prologue's BN given,
    (dU, sum(dU), sum(dU * (x - in_mean))) with dU = dA * in_act'(U), U = (x - mean) * scale + shift.
    x is the forward's input (its shape always; its values only for the prologue).
    With `out` (x's shape, grad_y's dtype or float32, any strides) the result is accumulated in place instead,
    out += out_scale * dU (out_scale [C_in], default 1), summed in float32 and rounded once, and
    `out` is returned in dU's place: a dense block adds each layer's input gradient into the
    prefix of its gradient buffer this way."""
    stride, padding, dilation = check_conv(x, weight, None, stride, padding, dilation, groups)
    in_mean, in_scale, in_shift = _check_prologue(x, in_mean, in_scale, in_shift)
    validate.activation(grad_y, "grad_y")
    if out is not None:
        # a float32 gradient buffer for half types keeps the sum of many layers' terms unrounded
        wide = stats_dtype(grad_y)
        _check_out(out, x.shape, wide if out.dtype == wide else grad_y.dtype, x.device, "out")
        validate.channel_vector(x, out_scale, "out_scale")
        out_scale = (torch.ones(x.shape[1], dtype=stats_dtype(grad_y), device=x.device) if out_scale is None
                     else out_scale.to(stats_dtype(grad_y)).contiguous())
    elif out_scale is not None:
        raise ValueError("fusedres: out_scale scales what is accumulated into out; give out too")
    dx, sum_du, sum_du_xmu = conv2d_input_grad_unchecked(grad_y, weight, x, stride, padding, dilation, groups, in_mean,
                                                         in_scale, in_shift, *act_args(as_activation(in_act)), out,
                                                         out_scale)
    return dx, channel_sums(sum_du), channel_sums(sum_du_xmu)


def conv2d_input_grad_unchecked(grad_y, weight, x, stride, padding, dilation, groups, in_mean, in_scale, in_shift,
                                in_act, in_alpha, out=None, out_scale=None):
    """conv2d_input_grad without checks (ops.direct): (dx or `out`, sums, sums), the sums [C] or
    [T, C] per-tile rows (None without the prologue's BatchNorm)."""
    if tracing():
        dx, sum_du, sum_du_xmu = torch.ops.fusedres.conv2d_input_grad(grad_y, weight, x, stride, padding, dilation,
                                                                      groups, in_mean, in_scale, in_shift, in_act,
                                                                      in_alpha,
                                                                      out, out_scale)
    else:
        dx, sum_du, sum_du_xmu = kernel("conv2d_input_grad", x.device)(grad_y, weight, x, stride, padding, dilation,
                                                                       groups, in_mean, in_scale, in_shift, in_act,
                                                                       in_alpha,
                                                                       out, out_scale)
    if in_scale is None:
        sum_du = sum_du_xmu = None
    return (dx if out is None else out), sum_du, sum_du_xmu


def conv2d_weight_grad(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int] = (1, 1),
                       padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1, *,
                       in_mean: Optional[torch.Tensor] = None, in_scale: Optional[torch.Tensor] = None,
                       in_shift: Optional[torch.Tensor] = None, in_act=False) -> torch.Tensor:
    """The weight gradient, in weight's dtype and memory format (summed in float32 / float64)."""
    stride, padding, dilation = check_conv(x, weight, None, stride, padding, dilation, groups)
    in_mean, in_scale, in_shift = _check_prologue(x, in_mean, in_scale, in_shift)
    validate.activation(grad_y, "grad_y")
    return conv2d_weight_grad_unchecked(grad_y, x, weight, stride, padding, dilation, groups, in_mean, in_scale,
                                        in_shift, *act_args(as_activation(in_act)))


def conv2d_weight_grad_unchecked(grad_y, x, weight, stride, padding, dilation, groups, in_mean, in_scale, in_shift,
                                 in_act, in_alpha):
    """conv2d_weight_grad without checks (ops.direct), in the weight's dtype and memory format."""
    if tracing():
        return torch.ops.fusedres.conv2d_weight_grad(grad_y, x, weight, stride, padding, dilation, groups, in_mean,
                                                     in_scale, in_shift, in_act, in_alpha)
    dw = kernel("conv2d_weight_grad", x.device)(grad_y, x, weight, stride, padding, dilation, groups, in_mean,
                                                in_scale, in_shift, in_act, in_alpha)
    return weight_grad_like(dw, weight)
