"""fusedres: fused BatchNorm / ReLU / residual kernels and drop-in ResNet blocks for PyTorch.

Layers, each using only the one below it:
  kernels (fusedres/kernels: Triton; csrc: C++ CPU and CUDA)
  -> ops (fusedres.ops: one registry dispatching by device and backend)
  -> autograd Functions (fusedres.autograd)
  -> modules (FusedBasicBlock, FusedBottleneck, FusedResidual; FusedDenseLayer, FusedDenseBlock, FusedTransition)
  -> fuse(model): blocks found by what they compute (torch.fx), swapped in
"""
import torch as _torch

from . import _versions

_versions.check_torch(_torch.__version__)

from . import _extension  # noqa: E402
from .autograd import conv_bias_act_inference, conv_bn_act  # noqa: F401,E402
from .dense_modules import FusedDenseBlock, FusedDenseLayer, FusedTransition  # noqa: F401,E402
from .fuse import FuseReport, fuse, fuse_report, unfuse  # noqa: F401,E402
from .modules import FusedBasicBlock, FusedBottleneck, FusedResidual, SyncBatchNorm2d, convert_sync_batchnorm  # noqa: F401,E402
from .ops import backends, get_backend, set_backend, use_backend  # noqa: F401,E402

__version__ = "0.1.0"
__all__ = ["FusedBasicBlock", "FusedBottleneck", "FusedResidual", "FusedDenseLayer", "FusedDenseBlock",
           "FusedTransition", "SyncBatchNorm2d", "convert_sync_batchnorm", "fuse", "fuse_report", "unfuse",
           "FuseReport", "backends", "get_backend", "set_backend", "use_backend",
           "conv_bn_act", "conv_bias_act_inference", "extension_loaded"]


def extension_loaded() -> bool:
    """Whether the compiled extension fusedres._C is available."""
    return _extension.loaded()
