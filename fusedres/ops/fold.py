"""Inference folding: BatchNorm with running statistics folded into the preceding conv.

conv(x, W) * s + (beta - mean * s) with s = gamma / sqrt(running_var + eps) equals
conv(x, W * s) + (beta - mean * s): one conv, then the bn_act_forward epilogue (bias, residual,
ReLU) in one pass. Folding is done in float32 (float64 for float64 weights) and cast back.
"""
from typing import Optional, Tuple

import torch


def fold_bn(conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor],
            bn_bias: Optional[torch.Tensor], running_mean: torch.Tensor, running_var: torch.Tensor,
            eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight [C_out, C_in/groups, kh, kw], bias [C_out]) of the folded conv.

    The weight keeps conv_weight's dtype and memory format; the bias is float32 (float64 for
    float64 weights), as the epilogue takes it.
    """
    acc = torch.float64 if conv_weight.dtype == torch.float64 else torch.float32
    scale = (running_var.to(acc) + eps).rsqrt()
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    bias = -running_mean.to(acc) * scale
    if bn_bias is not None:
        bias = bias + bn_bias.to(acc)
    if conv_bias is not None:
        bias = bias + conv_bias.to(acc) * scale
    weight = (conv_weight.to(acc) * scale.view(-1, 1, 1, 1)).to(conv_weight.dtype)
    if conv_weight.is_contiguous(memory_format=torch.channels_last) and not conv_weight.is_contiguous():
        weight = weight.contiguous(memory_format=torch.channels_last)
    return weight, bias
