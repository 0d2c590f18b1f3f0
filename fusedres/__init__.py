"""fusedres: fused BatchNorm / ReLU / residual kernels, drop-in ResNet blocks and conv -> BN units for PyTorch.

Layers, each importing only those below it (tests/test_layering.py holds this):
  common (layout, dtypes, allocation, warn-once, tracing, the one Triton launch helper)
  -> kernels (fusedres/kernels: Triton; csrc: C++ CPU and CUDA)
  -> ops (fusedres.ops: one registry dispatching by device and backend; ops.direct, the short path)
  -> autograd Functions (fusedres.autograd)
  -> modules: batchnorm (SyncBatchNorm2d, each forward's BN arguments) -> block_plumbing (what every
     fused block shares) -> modules (FusedBasicBlock, FusedBottleneck, FusedResidual, FusedUnits,
     FusedSequential, FusedGraph, FusedNormReLU) and
     dense_modules (FusedDenseLayer, FusedDenseBlock, FusedTransition)
  -> fuse(model): blocks found by what they compute (torch.fx), swapped in; memory_report(model, x)
The reference models (fusedres.models) import nothing of fusedres.
"""
import torch as _torch

from . import _versions

_versions.check_torch(_torch.__version__)

from . import _extension  # noqa: E402
from .autograd import conv_bias_act_inference, conv_bn_act  # noqa: F401,E402
from .dense_modules import FusedDenseBlock, FusedDenseLayer, FusedTransition  # noqa: F401,E402
from .fuse import FuseReport, fuse, fuse_report, refresh, unfuse  # noqa: F401,E402
from .batchnorm import SyncBatchNorm2d, convert_sync_batchnorm  # noqa: F401,E402
from .block_plumbing import train_choices as cpu_train_choices  # noqa: F401,E402
from .modules import (FusedBasicBlock, FusedBottleneck, FusedGraph, FusedNormReLU, FusedResidual,  # noqa: F401,E402
                      FusedSequential, FusedUnits)
from .ops import backends, get_backend, set_backend, use_backend  # noqa: F401,E402
from .memory import MemoryReport, memory_report  # noqa: F401,E402
from .modules import set_memory_efficient  # noqa: F401,E402

__version__ = "0.1.0"
__all__ = ["FusedBasicBlock", "FusedBottleneck", "FusedResidual", "FusedUnits", "FusedSequential", "FusedGraph",
           "FusedNormReLU", "FusedDenseLayer", "FusedDenseBlock",
           "FusedTransition", "SyncBatchNorm2d", "convert_sync_batchnorm", "fuse", "fuse_report", "unfuse", "refresh",
           "FuseReport", "backends", "get_backend", "set_backend", "use_backend",
           "conv_bn_act", "conv_bias_act_inference", "extension_loaded", "cpu_train_choices",
           "memory_report", "MemoryReport", "set_memory_efficient"]


def extension_loaded() -> bool:
    """Whether the compiled extension fusedres._C is available."""
    return _extension.loaded()
