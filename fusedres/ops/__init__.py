"""Ops: one registry (registry.py) dispatching every op to its reference, CPU, CUDA or Triton kernel."""
from .bn_act import bn_act_backward_elementwise, bn_act_backward_reduce, bn_act_forward  # noqa: F401
from .bn_stats import (bn_stats, bn_stats_from_moments, channel_var_mean, merge_partials,  # noqa: F401
                       update_running_stats)
from .conv import (CONV_OPS, ChannelMoments, StatsPartials, check_conv, conv2d_forward,  # noqa: F401
                   conv2d_input_grad, conv2d_weight_grad, kernel_unsupported_reason)
from .distributed import SyncGroup, all_reduce_moments, all_reduce_sums, sync_group  # noqa: F401
from .fold import fold_bn  # noqa: F401
from .registry import (available_backend, backends, get_backend, implementations, resolve, set_backend,  # noqa: F401
                       use_backend)
