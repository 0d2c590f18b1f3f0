"""Drop-in fused DenseNet modules with torchvision's constructor arguments and state_dict keys.

FusedDenseLayer, FusedDenseBlock and FusedTransition hold the same submodules as torchvision's
_DenseLayer, _DenseBlock and _Transition (denselayer{i}.norm1 / conv1 / norm2 / conv2; transition
norm / conv / pool), so densenet121/161/169/201 checkpoints load both ways with strict=True,
legacy `norm.1`-style keys included. Only forward differs:

  FusedDenseBlock  one feature buffer for the block (fusedres.autograd.dense_block): no torch.cat,
                   statistics once per slice, BN + ReLU in the convs' prologues where the fused conv
                   kernels run, gradients added in place into one gradient buffer
  FusedTransition  BN -> ReLU -> 1x1 conv -> 2x2 average pool, reusing the statistics the block
                   recorded for its output, BN + ReLU in the conv's prologue where the kernels run
  FusedDenseLayer  one layer on its own (torchvision's layer API: a tensor or a list of tensors in,
                   the k new channels out): BN -> ReLU -> conv units as the transition runs them
                   (no pool); a block does not call it, it runs its layers together

`memory_efficient` is accepted for the constructor's sake and changes nothing: the fused block
never stores the concatenation it would have recomputed.
"""
from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .autograd import DenseLayerArgs, Unit, bn_relu_conv_inference, bn_relu_conv_pool, dense_block
from .batchnorm import bn_args
from .block_plumbing import (CachesDerivedValues, cached_fallback_reason, check_block_input, conv_args, eval_bn_stats,
                             inference, norm_relu_conv_reason, norm_with_relu, runs_reference)
from .common import warn_once
from .models.densenet import DenseBlock, DenseLayer, Transition, rename_legacy_keys_hook


def _shared_children(source: nn.Module, names):
    """([(name, module)], missing names) of `source`'s children under `names`, to be shared by a
    fused module. A missing `relu*` after a norm with its ReLU inside (timm's BatchNormAct2d, see
    norm_with_relu) becomes an nn.Identity: no state, so the state_dict keys stay the source's."""
    found, missing = [], []
    for name in names:
        module = getattr(source, name, None)
        if module is None and name.startswith("relu") and norm_with_relu(getattr(source, "norm" + name[4:], None)):
            module = nn.Identity()
        if module is None:
            missing.append(name)
        else:
            found.append((name, module))
    return found, missing


class FusedDenseLayer(CachesDerivedValues, DenseLayer):
    """torchvision.models.densenet._DenseLayer, fused: norm1-relu1-conv1 (1x1 to bn_size * growth)
    over the concatenated features, norm2-relu2-conv2 (3x3 to growth), dropout.
    bottleneck=False: norm1-relu1-conv1 (3x3 with bias, to growth) only. The reference DenseLayer's
    constructor and submodules; only forward differs (its own forward is the fallback)."""

    def _units(self):
        if self.bottleneck:
            return ((self.norm1, self.conv1), (self.norm2, self.conv2))
        return ((self.norm1, self.conv1),)

    def _fallback_reason(self) -> Optional[str]:
        for (bn, conv), relu in zip(self._units(), (self.relu1, getattr(self, "relu2", None))):
            why = norm_relu_conv_reason(bn, relu, conv)
            if why is not None:
                return why
        return None

    def _layer_args(self) -> DenseLayerArgs:
        """This forward's arguments (counts num_batches_tracked as nn.BatchNorm2d.forward does)."""
        return DenseLayerArgs(tuple(Unit(conv_args(conv), bn_args(bn)) for bn, conv in self._units()), self.drop_rate)

    _reference_forward = DenseLayer.forward

    def forward(self, input: Union[torch.Tensor, List[torch.Tensor]]) -> torch.Tensor:
        name = type(self).__name__
        prev = [input] if isinstance(input, torch.Tensor) else list(input)
        if not prev:
            raise ValueError(f"{name}: input must be a tensor or a non-empty list of tensors")
        x = prev[0] if len(prev) == 1 else torch.cat(prev, 1)
        check_block_input(x, self.conv1, name, "norm1", source="")
        if runs_reference(x, self, name, self._fallback_reason):
            return self._reference_forward(x)
        units = self._units()
        if inference(x, *[m for unit in units for m in unit]):  # BN + ReLU + conv per unit, no autograd
            h = x
            for bn, conv in units:
                h = bn_relu_conv_inference(h, eval_bn_stats(self, bn, h), conv_args(conv))
            return h
        # BN -> ReLU -> conv per unit (the transition's units, no pool): on its own a layer has no
        # feature buffer to share, and a one-layer dense block would copy its input into one
        h = x
        for bn, conv in units:
            h = bn_relu_conv_pool(h, bn_args(bn), conv_args(conv), pool=None)
        if self.drop_rate > 0:
            h = F.dropout(h, p=float(self.drop_rate), training=self.training)
        return h

    @classmethod
    def from_module(cls, layer: nn.Module) -> "FusedDenseLayer":
        """A FusedDenseLayer sharing `layer`'s submodules (torchvision's _DenseLayer, timm's DenseLayer or
        this package's): with norm2 / relu2 / conv2 the bottleneck layer, without them the plain one.
        A norm with its ReLU inside (timm's BatchNormAct2d) needs no relu module: the fused layer
        gets an nn.Identity there (no state, so the state_dict keys stay the original's)."""
        names = ["norm1", "relu1", "conv1"]
        bottleneck = isinstance(getattr(layer, "conv2", None), nn.Module)
        if bottleneck:
            names += ["norm2", "relu2", "conv2"]
        children, missing = _shared_children(layer, names)
        missing += [] if hasattr(layer, "drop_rate") else ["drop_rate"]
        if missing:
            raise TypeError(f"{cls.__name__}.from_module: {type(layer).__name__} lacks {', '.join(missing)}; expected "
                            f"a torchvision-style _DenseLayer")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for n, module in children:
            setattr(fused, n, module)
        fused.drop_rate = float(layer.drop_rate)
        fused.memory_efficient = bool(getattr(layer, "memory_efficient", getattr(layer, "grad_checkpointing", False)))
        fused.bottleneck = bottleneck
        fused._register_load_state_dict_pre_hook(rename_legacy_keys_hook, with_module=True)
        fused.training = layer.training  # its own flag only: a frozen (eval) BN inside stays frozen
        return fused


class FusedDenseBlock(DenseBlock):
    """torchvision.models.densenet._DenseBlock, fused: its L layers write into one preallocated
    [N, C0 + L*k, H, W] buffer (see fusedres.autograd.dense), which is the block's output. The
    reference DenseBlock's constructor, with FusedDenseLayer layers."""

    layer_class = FusedDenseLayer

    def _fallback_reason(self) -> Optional[str]:
        for name, layer in self.items():
            if not isinstance(layer, FusedDenseLayer):
                return f"{name} is a {type(layer).__name__}, not a FusedDenseLayer"
            why = layer._fallback_reason()
            if why is not None:
                return f"{name}: {why}"
        return None

    _reference_forward = DenseBlock.forward

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        layers = list(self.values())
        if not layers:
            return init_features
        check_block_input(init_features, layers[0].conv1, name, "denselayer1.norm1", source="")
        if runs_reference(init_features, self, name, self._fallback_reason):
            return self._reference_forward(init_features)
        return dense_block(init_features, [layer._layer_args() for layer in layers],
                           dropout=[layer.training for layer in layers])

    @classmethod
    def from_module(cls, block: nn.Module) -> "FusedDenseBlock":
        """A FusedDenseBlock whose layers share `block`'s (torchvision's _DenseBlock or this package's)."""
        fused = cls.__new__(cls)
        nn.ModuleDict.__init__(fused)
        for name, layer in block.named_children():
            fused.add_module(name, FusedDenseLayer.from_module(layer))
        fused.training = block.training  # its own flag only: a frozen (eval) BN inside stays frozen
        return fused


class FusedTransition(CachesDerivedValues, Transition):
    """torchvision.models.densenet._Transition, fused: norm-relu-conv (1x1)-pool (2x2 average). The
    reference Transition's constructor and submodules; only forward differs."""

    def _fallback_reason(self) -> Optional[str]:
        names = list(self._modules)
        if names != ["norm", "relu", "conv", "pool"]:
            return f"submodules {names}, expected norm, relu, conv, pool"
        why = norm_relu_conv_reason(self.norm, self.relu, self.conv)
        if why is not None:
            return why
        pool = self.pool
        if (type(pool) is not nn.AvgPool2d or pool.kernel_size not in (2, (2, 2)) or pool.stride not in (2, (2, 2))
                or pool.padding not in (0, (0, 0)) or pool.ceil_mode or pool.divisor_override is not None):
            return f"pool {pool} is not a 2x2, stride-2 AvgPool2d"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        why = cached_fallback_reason(self, self._fallback_reason)
        if why is not None:
            warn_once((name, why), f"fusedres: {name} runs the unfused reference forward: {why}")
            return super().forward(x)
        norm, conv = self._modules["norm"], self._modules["conv"]
        check_block_input(x, conv, name, "norm", source="")
        if x.numel() == 0:  # an empty batch: exactly what the reference does with one
            return super().forward(x)
        if inference(x, norm, conv):  # BN + ReLU + conv, then the pool, no autograd
            return F.avg_pool2d(bn_relu_conv_inference(x, eval_bn_stats(self, norm, x), conv_args(conv)), 2, 2)
        return bn_relu_conv_pool(x, bn_args(norm), conv_args(conv), pool=2)

    @classmethod
    def from_module(cls, transition: nn.Module) -> "FusedTransition":
        """A FusedTransition sharing `transition`'s submodules (torchvision's _Transition; timm's
        DenseTransition, whose norm has its ReLU inside, gets an nn.Identity as `relu`)."""
        children, missing = _shared_children(transition, ("norm", "relu", "conv", "pool"))
        if missing:
            raise TypeError(f"{cls.__name__}.from_module: {type(transition).__name__} lacks {', '.join(missing)}")
        fused = cls.__new__(cls)
        nn.Sequential.__init__(fused)
        for n, module in children:
            fused.add_module(n, module)
        fused.training = transition.training  # its own flag only: a frozen (eval) BN inside stays frozen
        return fused
