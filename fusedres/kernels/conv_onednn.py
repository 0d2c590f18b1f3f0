"""oneDNN kernels (CPU): a BN-folded inference conv as ONE oneDNN primitive with fused post-ops.

    y = act(conv2d(x, W) + bias [+ residual])

through the ops PyTorch registers for inductor's CPU fusions (aten/src/ATen/native/mkldnn/Conv.cpp):
  torch.ops.mkldnn._convolution_pointwise          conv + bias + unary post-op ("relu" / "none")
  torch.ops.mkldnn._convolution_pointwise.binary   conv + bias + binary post-op ("add") + unary
  torch.ops.mkldnn._reorder_convolution_weight     the weight in the blocked layout oneDNN picks
                                                   for one input shape (prepacked once, cached)
Present in torch 2.0 and later (checked for 2.13 and 2.14 here; looked up, not assumed:
`missing_reason`). What they take, measured on this project's 2-core AVX2 EPYC: float32 (float64
raises inside ideep), any input layout, and they always WRITE channels_last, so only
channels_last input runs here (an NCHW model keeps aten's conv and its NCHW output).

Why prepack: aten's conv reorders the plain weight into oneDNN's layout on every call. Packed for
the input's shape, ResNet-50's 512x512 3x3 conv at 7x7 takes 1.47 ms instead of 3.41 at batch 1
and 11.6 instead of 13.6 ms at batch 8. A weight packed for ANOTHER shape can be far slower than
no packing (packed for batch 8, run at batch 1: 9.5 ms against 0.69 for the 1024->256 1x1), so a
pack is keyed by the input's shape.
"""
import functools
from typing import Optional, Sequence

import torch

Tensor = torch.Tensor


def missing_reason() -> Optional[str]:
    """None if this torch has the oneDNN ops above and oneDNN is on, else why not."""
    if not torch.backends.mkldnn.is_available():
        return "this torch was built without oneDNN (torch.backends.mkldnn.is_available() is False)"
    if not torch.backends.mkldnn.enabled:
        return "oneDNN is disabled (torch.backends.mkldnn.enabled is False)"
    return _ops_missing()


@functools.lru_cache(maxsize=None)
def _ops_missing() -> Optional[str]:
    """None if the ops exist and take the arguments this file passes (one tiny call of each, once
    per process: a signature that changed in some torch would otherwise raise mid-forward)."""
    mkldnn = torch.ops.mkldnn
    for name, overload in (("_convolution_pointwise", "default"), ("_convolution_pointwise", "binary"),
                           ("_reorder_convolution_weight", "default")):
        try:
            getattr(getattr(mkldnn, name), overload)
        except (AttributeError, RuntimeError):
            return f"torch {torch.__version__} has no torch.ops.mkldnn.{name}.{overload}"
    try:
        x = torch.ones(1, 2, 3, 3).contiguous(memory_format=torch.channels_last)
        w = torch.ones(2, 2, 1, 1)
        packed = pack_weight(w, (1, 1), (0, 0), (1, 1), 1, x.shape)
        y = conv_bias_act(x, packed, torch.zeros(2), None, (1, 1), (0, 0), (1, 1), 1, True)
        y = conv_bias_act(x, packed, torch.zeros(2), y, (1, 1), (0, 0), (1, 1), 1, True)
    except (RuntimeError, TypeError) as e:
        return f"torch {torch.__version__}'s oneDNN conv ops did not take fusedres's arguments: {e}"
    if not torch.equal(y, torch.full_like(y, 4.0)):
        return f"torch {torch.__version__}'s oneDNN conv ops gave a wrong result on a probe"
    return None


def unsupported_reason(x: Tensor, weight: Tensor) -> Optional[str]:
    """None if conv_bias_act runs this conv, else why not (the caller keeps aten's conv)."""
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return f"oneDNN runs CPU tensors, got {x.device.type}"
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return f"oneDNN's fused conv runs float32 here, got {x.dtype} input and {weight.dtype} weights"
    # (a tensor both formats describe, [N, 1, H, W] or [N, C, 1, 1], counts as NCHW for aten's conv,
    # whose output is then NCHW: it stays on aten's conv too)
    if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return "NCHW input: oneDNN's fused conv writes channels_last (use channels_last)"
    return None


def pack_weight(weight: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                groups: int, input_shape: Sequence[int]) -> Tensor:
    """weight (float32, [C_out, C_in/groups, kh, kw]) reordered into the layout oneDNN picks for an
    input of input_shape: an opaque mkldnn tensor, valid for that shape only (see module docstring)."""
    return torch.ops.mkldnn._reorder_convolution_weight.default(
        weight.contiguous(), list(padding), list(stride), list(dilation), groups, list(input_shape))


def conv_bias_act(x: Tensor, packed_weight: Tensor, bias: Tensor, residual: Optional[Tensor], stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int], groups: int, relu: bool,
                  unary: Optional[tuple] = None) -> Tensor:
    """act(conv2d(x, W) + bias [+ residual]) as one oneDNN primitive; x channels_last float32,
    packed_weight from pack_weight for x's shape, bias [C_out] float32. Returns channels_last.
    act: ReLU (relu), nothing, or `unary` = (eltwise attr, scalars, algorithm) as torch's mkldnn
    fusion names them ("swish", [], None; "hardtanh", [0.0, 6.0], None; "gelu", [], "tanh"; ...;
    with a residual, ReLU only)."""
    pad, strd, dil = list(padding), list(stride), list(dilation)
    attr, scalars, algorithm = unary if unary is not None else ("relu" if relu else "none", [], None)
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise.default(x, packed_weight, bias, pad, strd, dil, groups,
                                                              attr, scalars, algorithm)
    if not residual.is_contiguous(memory_format=torch.channels_last):
        residual = residual.contiguous(memory_format=torch.channels_last)
    return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, packed_weight, bias, pad, strd, dil, groups,
                                                          "add", None, None if attr == "none" else attr, scalars,
                                                          algorithm)
