"""Argument checks shared by the public op functions: clear errors that name the argument."""
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def activation(x: torch.Tensor, name: str = "input") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fusedres: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"fusedres: {name} must be 4-D [N, C, H, W], got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fusedres: {name} must be float32, float64, float16 or bfloat16, got {x.dtype}")


def same_shape(ref: torch.Tensor, t: Optional[torch.Tensor], name: str) -> None:
    if t is None:
        return
    if t.shape != ref.shape:
        raise ValueError(f"fusedres: {name} must have the input's shape {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"fusedres: {name} is on {t.device} but input is on {ref.device}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fusedres: {name} must be a floating-point tensor, got {t.dtype}")


def channel_vector(ref: torch.Tensor, v: Optional[torch.Tensor], name: str) -> None:
    if v is None:
        return
    if v.dim() != 1 or v.shape[0] != ref.shape[1]:
        raise ValueError(f"fusedres: {name} must have shape [{ref.shape[1]}] (one value per input channel), "
                         f"got {tuple(v.shape)}")
    if v.device != ref.device:
        raise ValueError(f"fusedres: {name} is on {v.device} but input is on {ref.device}")
    if not v.is_floating_point():
        raise TypeError(f"fusedres: {name} must be a floating-point tensor, got {v.dtype}")
