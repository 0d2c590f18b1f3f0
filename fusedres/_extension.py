"""Loads the compiled extension fusedres._C, remembering why it is missing when it is."""
import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.fusedres_kernels.*)

    LOAD_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    LOAD_ERROR = f"fusedres._C did not load ({exc}); build it with `pip install --no-build-isolation .`"


def loaded() -> bool:
    return LOAD_ERROR is None


def built_with_cuda() -> bool:
    return loaded() and bool(torch.ops.fusedres_kernels.built_with_cuda())
