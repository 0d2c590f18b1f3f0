"""Ops: one registry (registry.py) dispatching every op to its reference, CPU, CUDA or Triton kernel."""
from .bn_act import bn_act_backward_elementwise, bn_act_backward_reduce, bn_act_forward  # noqa: F401
from .bn_stats import bn_stats  # noqa: F401
from .fold import fold_bn  # noqa: F401
from .registry import backends, get_backend, implementations, resolve, set_backend, use_backend  # noqa: F401
