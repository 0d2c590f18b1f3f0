"""The bottom layer: what every other layer may use, and nothing of fusedres above it.

Memory layout, statistics dtype, output allocation (poisoned under the tests), warn-once, the
Triton interpreter flag, whether torch.compile / torch.export is tracing, and `launch`, through
which every Triton kernel is launched (device guard, the interpreter's lock, the profiler's
marker the launch counters read). Imports torch only: `import fusedres` never needs triton.

A 4-D activation in NCHW or channels_last is seen as a dense [outer, C, inner] array
(NCHW: outer = N, inner = H*W; channels_last: outer = N*H*W, inner = 1), so storage index i
belongs to channel (i // inner) % C. Same rule as csrc/bn_common.h.
"""
import os
import threading
import warnings
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


# Poisoned outputs are made out of place (full_like), never with fill_: on torch 2.11 an aten
# in-place op on the tensor an autograd.Function's forward returns makes torch.compile route that
# output's gradient to the wrong slot (zeros reach backward; pytorch/pytorch#180642, fixed in
# 2.12). tests/test_compile.py's DenseNet failed on 2.11 only through this poisoning.
def new_output_like(ref: torch.Tensor) -> torch.Tensor:
    if poison_outputs() and ref.numel() > 0:
        return torch.full_like(ref, float("nan"))
    return torch.empty_like(ref)


def new_scratch(shape, dtype: torch.dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """A fresh tensor a kernel fills in whole (NaN under FUSEDRES_POISON_OUTPUTS=1)."""
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if poison_outputs() and out.numel() > 0:
        return torch.full_like(out, float("nan"))  # keeps the memory format
    return out


def new_channel_output(channels: int, dtype: torch.dtype, device) -> torch.Tensor:
    return new_scratch((channels,), dtype, device)


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """Per-channel statistics are float32, or float64 for float64 activations."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Activations: one code per function, the same numbers in every kernel (csrc/activation.h,
# kernels/activation_triton.py).
# ---------------------------------------------------------------------------------------------
ACTIVATIONS = ("none", "relu", "relu6", "silu", "hardswish", "leaky_relu", "gelu", "gelu_tanh")
_GELU_TANH_BETA = 0.7978845608028654  # sqrt(2 / pi), torch's kBeta
_GELU_TANH_KAPPA = 0.044715


class Activation(NamedTuple):
    """The activation a unit applies after BatchNorm (+ residual): ACTIVATIONS[code], alpha =
    LeakyReLU's negative slope (0 otherwise). Each backward is torch's own formula, so a fused
    unit's gradient is stock's: ReLU passes where u > 0; ReLU6 where 0 < u < 6 (hardtanh's);
    Hardswish's slope is 0 up to -3, u / 3 + 1/2 below 3, 1 from 3 (torch's sides); GELU erf or
    tanh as torch's gelu_backward."""
    name: str = "relu"
    alpha: float = 0.0

    @property
    def code(self) -> int:
        return ACTIVATIONS.index(self.name)

    @property
    def is_relu(self) -> bool:
        return self.name == "relu"

    @property
    def is_none(self) -> bool:
        return self.name == "none"

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        """act(u) in torch (the references, and where no kernel applies it)."""
        name = self.name
        if name == "none":
            return u
        if name == "relu":
            return torch.relu(u)
        if name == "relu6":
            return torch.nn.functional.hardtanh(u, 0.0, 6.0)
        if name == "silu":
            return torch.nn.functional.silu(u)
        if name == "hardswish":
            return torch.nn.functional.hardswish(u)
        if name == "leaky_relu":
            return torch.nn.functional.leaky_relu(u, self.alpha)
        return torch.nn.functional.gelu(u, approximate="tanh" if name == "gelu_tanh" else "none")

    def backward(self, grad: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """grad * act'(u), as torch's backward of each activation computes it."""
        name = self.name
        if name == "none":
            return grad
        if name == "relu":
            return torch.where(u > 0, grad, 0)
        if name == "relu6":
            return torch.where((u <= 0) | (u >= 6), 0, grad)
        if name == "silu":
            s = torch.sigmoid(u)
            return grad * s * (1 + u * (1 - s))
        if name == "hardswish":
            return torch.where(u <= -3, 0, torch.where(u < 3, grad * (u / 3 + 0.5), grad))
        if name == "leaky_relu":
            return torch.where(u > 0, grad, grad * self.alpha)
        if name == "gelu":
            cdf = 0.5 * (1 + torch.erf(u * 0.7071067811865476))
            pdf = torch.exp(-0.5 * u * u) * 0.3989422804014327
            return grad * (cdf + u * pdf)
        inner = _GELU_TANH_BETA * (u + _GELU_TANH_KAPPA * u * u * u)
        t = torch.tanh(inner)
        left_derivative = 0.5 * (1 + t)
        right_derivative = 0.5 * u * (1 - t * t) * _GELU_TANH_BETA * (1 + 3 * _GELU_TANH_KAPPA * u * u)
        return grad * (left_derivative + right_derivative)


RELU = Activation("relu")
NO_ACTIVATION = Activation("none")


def as_activation(act) -> Activation:
    """An Activation from an Activation, a name in ACTIVATIONS, or a bool (the ReLU flag the ops
    took before other activations: True = ReLU, False = none)."""
    if isinstance(act, Activation):
        if act.name not in ACTIVATIONS:
            raise ValueError(f"fusedres: activation must be one of {ACTIVATIONS}, got {act.name!r}")
        return act
    if isinstance(act, bool):
        return RELU if act else NO_ACTIVATION
    if isinstance(act, str) and act in ACTIVATIONS:
        return Activation(act)
    raise ValueError(f"fusedres: activation must be an Activation, one of {ACTIVATIONS} or a bool, got {act!r}")


# ---------------------------------------------------------------------------------------------
# Warn once, tracing, Triton launches.
# ---------------------------------------------------------------------------------------------
_warned = set()
_warn_lock = threading.Lock()


def warn_once(key, message: str, stacklevel: int = 3) -> None:
    """One RuntimeWarning per key per process (two threads hitting one fallback warn once)."""
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def tracing() -> bool:
    """Whether torch.compile or torch.export is tracing: the ops then go through their
    torch.library custom ops, and Python-side caches keyed on a tensor's version or data pointer
    (which a traced graph cannot see) are bypassed."""
    return torch.compiler.is_compiling() or _is_exporting()


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.7


def triton_interpreted() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on the CPU, in numpy (how CI tests them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_interpreter_lock = threading.Lock()


def sm_count(device: torch.device) -> int:
    """Multiprocessors of `device` (132 on H100/H200), which the kernels size their grids by; 0 for
    the CPU (the interpreter, where few, large programs are fastest). The one hardware query of
    the kernels' launch plans, so benchmarks/triton_variants.py can plan an H200's launches
    without one."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch(kernel, grid, device: torch.device, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) on `device`: the one place a Triton kernel is launched.

    - Triton launches on the current CUDA device, so a tensor on cuda:1 needs that device made
      current (a guard only where it differs: the guard costs ~2 us).
    - The interpreter patches triton.language globally: one interpreted launch at a time.
    - Under torch.profiler each launch is a `triton::<kernel>` range: the launch counters
      (benchmarks/bench_overhead.py, tests/test_overhead.py) count one device launch per range and
      ignore what runs inside it (the interpreter's own tensor ops).
    """
    if torch.autograd._profiler_enabled():
        name = getattr(getattr(kernel, "fn", kernel), "__name__", "kernel")
        with torch.autograd.profiler.record_function(f"triton::{name}"):
            return _launch(kernel, grid, device, args, kwargs)
    return _launch(kernel, grid, device, args, kwargs)


def _launch(kernel, grid, device, args, kwargs) -> None:
    if device.type == "cuda":
        if device.index is not None and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                kernel[grid](*args, **kwargs)
            return
        kernel[grid](*args, **kwargs)
        return
    with _interpreter_lock:
        kernel[grid](*args, **kwargs)
