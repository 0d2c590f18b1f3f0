"""Autograd Functions built on fusedres.ops.

  units.py  conv (aten) -> BatchNorm -> (+ residual) -> ReLU units on the core BatchNorm ops: every
            device and backend
  chain.py  conv -> BN -> ReLU chains on the fused conv kernels (BatchNorm in the convs' prologues
            and epilogues), where those kernels run
  dense.py  DenseNet dense blocks over one feature buffer, and the transition
"""
from .chain import BNArgs, BNReLUConv, ConvArgs, chain_unsupported_reason, conv_bn_chain  # noqa: F401
from .units import BNAct, ConvBNAct, conv_bias_act_inference, conv_bn_act, sync_batch_norm, tracing  # noqa: F401
from .dense import DenseLayerArgs, bn_relu_conv_pool, channel_stats, dense_block  # noqa: F401
