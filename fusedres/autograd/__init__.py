"""Autograd Functions built on fusedres.ops.

  units.py  conv (aten) -> BatchNorm -> (+ residual) -> ReLU units on the core BatchNorm ops: every
            device and backend
  chain.py  conv -> BN -> ReLU chains on the fused conv kernels (BatchNorm in the convs' prologues
            and epilogues), where those kernels run
  dense.py  DenseNet dense blocks over one feature buffer, and the transition
"""
from .units import (BNAct, BNArgs, BNSpec, ConvArgs, ConvBNUnits, ConvSpec, PoolSpec, Unit,  # noqa: F401
                    conv_bias_act_inference, conv_bias_act_inference_unchecked, conv_bn_act, conv_bn_act_unchecked,
                    conv_bn_units, sync_batch_norm)
from .chain import BNReLUConv, chain_unsupported_reason, conv_bn_chain  # noqa: F401
from .dense import DenseLayerArgs, bn_relu_conv_inference, bn_relu_conv_pool, channel_stats, dense_block  # noqa: F401
from .units import autocast_dtype, bn_relu, bn_relu_inference, bn_scale_shift, running_stats  # noqa: F401
from ..ops.direct import BatchNormStats  # noqa: F401
