"""Op: the inference conv of a BN-folded unit, y = act(conv2d(x, W) + bias [+ residual]).

Backends:
  onednn     one oneDNN primitive: conv with bias, residual add and ReLU as post-ops, the weight
             prepacked for the input's shape (kernels/conv_onednn.py); CPU, float32, channels_last
  reference  aten's conv, then bias, residual and ReLU in float32 (float64 for float64)
On a GPU the same unit runs on the fused conv kernels (conv2d_forward's epilogue), and on the CPU
where oneDNN does not run it (NCHW, float64, bfloat16) as aten's conv + one bn_act_forward pass
(fusedres.autograd picks). The op has no torch.library form: a traced graph holds aten's conv
and the post-ops as plain tensor ops, which inductor fuses itself (fusedres.autograd).
"""
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from ..common import Activation, per_channel, stats_dtype
from ..kernels import conv_onednn
from .registry import available_backend, register

OP = "conv2d_bias_act_inference"
Tensor = torch.Tensor


class PostOp(NamedTuple):
    """An activation other than ReLU after a BN-folded conv: oneDNN's eltwise post-op (attr,
    scalars, algorithm, as torch's mkldnn fusion names them) and the same function in torch for
    every other path (apply)."""
    name: str  # silu, hardswish, hardtanh, gelu, leaky_relu
    scalars: tuple = ()  # hardtanh: (min, max); leaky_relu: (negative_slope,)
    algorithm: Optional[str] = None  # gelu: "none" or "tanh"

    @property
    def activation(self) -> Optional[Activation]:
        """The same function as one of the kernels' activations (common.ACTIVATIONS), or None
        (a Hardtanh other than ReLU6's 0..6)."""
        if self.name in ("silu", "hardswish"):
            return Activation(self.name)
        if self.name == "leaky_relu":
            return Activation("leaky_relu", float(self.scalars[0]) if self.scalars else 0.01)
        if self.name == "gelu":
            return Activation("gelu_tanh" if self.algorithm == "tanh" else "gelu")
        if self.name == "hardtanh" and tuple(self.scalars) == (0.0, 6.0):
            return Activation("relu6")
        return None

    @property
    def attr(self) -> str:
        return "swish" if self.name == "silu" else self.name

    def apply(self, z: Tensor) -> Tensor:
        if self.name == "silu":
            return F.silu(z)
        if self.name == "hardswish":
            return F.hardswish(z)
        if self.name == "hardtanh":
            return F.hardtanh(z, *self.scalars)
        if self.name == "gelu":
            return F.gelu(z, approximate=self.algorithm or "none")
        if self.name == "leaky_relu":
            return F.leaky_relu(z, *self.scalars)
        raise ValueError(f"fusedres: unknown post-op {self.name!r}")


@register(OP, "reference")
def conv2d_bias_act_inference_reference(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor],
                                        stride, padding, dilation, groups: int, relu: bool,
                                        packed_weight: Optional[Tensor] = None, post_op: Optional[PostOp] = None
                                        ) -> Tensor:
    acc = stats_dtype(x)
    z = F.conv2d(x, weight, None, stride, padding, dilation, groups).to(acc) + per_channel(bias.to(acc), x)
    if residual is not None:
        z = z + residual.to(acc)
    if post_op is not None:
        return post_op.apply(z).to(x.dtype)
    return (torch.relu(z) if relu else z).to(x.dtype)


@register(OP, "onednn")
def conv2d_bias_act_inference_onednn(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor],
                                     stride, padding, dilation, groups: int, relu: bool,
                                     packed_weight: Optional[Tensor] = None, post_op: Optional[PostOp] = None
                                     ) -> Tensor:
    """packed_weight: weight from pack_weight for x's shape (None: the plain weight, which oneDNN
    reorders on every call, as aten's conv does). post_op: an activation other than ReLU (relu
    False), as the primitive's eltwise post-op."""
    w = packed_weight if packed_weight is not None else weight
    if post_op is not None and residual is not None:
        # torch's oneDNN binary fusion takes ReLU alone after the add ("Unary Fusion behavior
        # undefined" for the others): the add in the primitive, the activation one pass after
        y = conv_onednn.conv_bias_act(x, w, bias, residual, stride, padding, dilation, groups, False)
        return post_op.apply(y)
    unary = (post_op.attr, list(post_op.scalars), post_op.algorithm) if post_op is not None else None
    return conv_onednn.conv_bias_act(x, w, bias, residual, stride, padding, dilation, groups, relu, unary)


def onednn_unsupported_reason(x: Tensor, weight: Tensor) -> Optional[str]:
    """None if the onednn backend runs this inference conv under the current backend choice,
    else why not (the caller keeps aten's conv and one bn_act_forward pass)."""
    backend = available_backend(OP, x.device)
    if backend != "onednn":
        return f"the onednn backend is not chosen for {x.device.type} tensors (got {backend})"
    if not torch.backends.mkldnn.enabled:  # (asked per call: torch.backends.mkldnn.flags() toggles it)
        return "oneDNN is disabled (torch.backends.mkldnn.enabled is False)"
    return conv_onednn.unsupported_reason(x, weight)


def pack_weight(weight: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                groups: int, input_shape: Sequence[int]) -> Tensor:
    """weight prepacked for inputs of input_shape (kernels/conv_onednn.pack_weight); float32."""
    return conv_onednn.pack_weight(weight, stride, padding, dilation, groups, input_shape)
