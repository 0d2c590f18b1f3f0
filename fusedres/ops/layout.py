"""Memory-layout helpers shared by every backend of the BatchNorm ops.

A 4-D activation in NCHW or channels_last is seen as a dense [outer, C, inner] array
(NCHW: outer = N, inner = H*W; channels_last: outer = N*H*W, inner = 1), so storage index i
belongs to channel (i // inner) % C. Same rule as csrc/bn_common.h.
"""
import os
from typing import NamedTuple, Optional

import torch


class ChannelView(NamedTuple):
    outer: int
    channels: int
    inner: int

    @property
    def count(self) -> int:
        """Values per channel."""
        return self.outer * self.inner


def is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels_last-only tensor, else contiguous_format. A non-dense 4-D view
    (a channel slice of a dense block's feature buffer) gets the format its strides follow."""
    if x.dim() == 4 and not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last if x.stride(1) < x.stride(3) else torch.contiguous_format
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [C] vector viewed to broadcast over x's channel axis."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def dense(x: torch.Tensor) -> torch.Tensor:
    """x itself if it is NCHW- or channels_last-contiguous, else a copy in the format it suggests."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    fmt = torch.channels_last if x.dim() == 4 and x.stride(1) == 1 else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether dense a and b of one shape index memory alike. Strides alone can differ without
    mattering: an [N, C, 1, 1] tensor is both NCHW- and channels_last-contiguous, and autograd
    may hand back its gradient with other strides for the size-1 dims."""
    if a.is_contiguous() and b.is_contiguous():
        return True
    cl = torch.channels_last
    return a.dim() == 4 and a.is_contiguous(memory_format=cl) and b.is_contiguous(memory_format=cl)


def like(t: Optional[torch.Tensor], ref: torch.Tensor) -> Optional[torch.Tensor]:
    """t laid out in memory as dense ref is, copied only when it is not already."""
    if t is None or same_layout(ref, t):
        return t
    return t.contiguous(memory_format=torch.contiguous_format if ref.is_contiguous() else torch.channels_last)


def channel_view(x: torch.Tensor) -> ChannelView:
    """[outer, C, inner] view of a dense x (see module docstring)."""
    channels = x.shape[1]
    if x.is_contiguous():
        inner = 1
        for s in x.shape[2:]:
            inner *= s
        return ChannelView(x.shape[0], channels, inner)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return ChannelView(x.shape[0] * x.shape[2] * x.shape[3], channels, 1)
    raise ValueError(f"fusedres: expected an NCHW- or channels_last-contiguous tensor, got strides {x.stride()}")


def poison_outputs() -> bool:
    """FUSEDRES_POISON_OUTPUTS=1 (set by the tests): kernels' outputs start as NaN, so an element a
    kernel fails to write shows up against the reference. Same switch as csrc/bn_common.h."""
    return os.environ.get("FUSEDRES_POISON_OUTPUTS", "0") == "1"


def new_output_like(ref: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(ref)
    if poison_outputs() and out.numel() > 0:
        out.fill_(float("nan"))
    return out


def new_scratch(shape, dtype: torch.dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """A fresh tensor a kernel fills in whole (NaN under FUSEDRES_POISON_OUTPUTS=1)."""
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if poison_outputs() and out.numel() > 0:
        out.fill_(float("nan"))
    return out


def new_channel_output(channels: int, dtype: torch.dtype, device) -> torch.Tensor:
    return new_scratch((channels,), dtype, device)


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """Per-channel statistics are float32, or float64 for float64 activations."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
