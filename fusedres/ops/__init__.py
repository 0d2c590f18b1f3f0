"""Ops: one registry (registry.py) dispatching every op to its reference, CPU, CUDA or Triton kernel.

Public functions (checked, any layout) here; the autograd Functions' unchecked short path in
ops.direct.
"""
from . import direct  # noqa: F401
from .bn_act import bn_act_backward_elementwise, bn_act_backward_reduce, bn_act_forward  # noqa: F401
from .bn_finalize import (StatsPartials, bn_backward_finalize, bn_forward_finalize, merge_partials,  # noqa: F401
                          running_update)
from .bn_stats import bn_stats, bn_stats_from_moments, channel_var_mean  # noqa: F401
from .conv import (CONV_OPS, ChannelMoments, check_conv, conv2d_forward, conv2d_input_grad,  # noqa: F401
                   conv2d_weight_grad, kernel_unsupported_reason)
from .conv_inference import PostOp, onednn_unsupported_reason, pack_weight  # noqa: F401
from .distributed import SyncGroup, all_reduce_moments, all_reduce_sums, sync_group  # noqa: F401
from .fold import fold_bn  # noqa: F401
from .registry import (available_backend, backends, get_backend, implementations, resolve, set_backend,  # noqa: F401
                       use_backend)
