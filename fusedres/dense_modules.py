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
                   the k new channels out); a block does not call it, it runs its layers together

`memory_efficient` is accepted for the constructor's sake and changes nothing: the fused block
never stores the concatenation it would have recomputed.
"""
from collections import OrderedDict
from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .autograd.dense import DenseLayerArgs, bn_relu_conv_pool, dense_block
from .modules import _warn_once, bn_args, check_block_input, conv_args, runs_reference, unfusable_reason


def rename_legacy_keys_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                            error_msgs):
    """load_state_dict pre-hook of a dense layer: legacy keys (`norm.1.weight`, saved before
    torchvision 0.2) are renamed in place to `norm1.weight`, as torchvision renames them, so
    `model.load_state_dict(old_checkpoint, strict=True)` loads them."""
    for kind in ("norm", "relu", "conv"):
        for i in ("1", "2"):
            for name in ("weight", "bias", "running_mean", "running_var"):
                old = f"{prefix}{kind}.{i}.{name}"
                if old in state_dict:
                    state_dict[f"{prefix}{kind}{i}.{name}"] = state_dict.pop(old)


def build_dense_layer(layer: nn.Module, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float,
                      memory_efficient: bool, bottleneck: bool) -> None:
    """Give `layer` torchvision's _DenseLayer submodules and attributes (fused and reference alike)."""
    layer.norm1 = nn.BatchNorm2d(num_input_features)
    layer.relu1 = nn.ReLU(inplace=True)
    if bottleneck:
        layer.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        layer.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        layer.relu2 = nn.ReLU(inplace=True)
        layer.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
    else:  # the plain DenseNet layer: BN-ReLU-conv3x3 with bias
        layer.conv1 = nn.Conv2d(num_input_features, growth_rate, kernel_size=3, stride=1, padding=1, bias=True)
    layer.drop_rate = float(drop_rate)
    layer.memory_efficient = memory_efficient
    layer.bottleneck = bottleneck
    layer._register_load_state_dict_pre_hook(rename_legacy_keys_hook, with_module=True)


def add_dense_layers(block: nn.Module, layer_cls, num_layers: int, num_input_features: int, bn_size: int,
                     growth_rate: int, drop_rate: float, memory_efficient: bool, bottleneck: bool) -> None:
    """torchvision's _DenseBlock layers `denselayer1` ... `denselayer{num_layers}` of layer_cls."""
    for i in range(num_layers):
        layer = layer_cls(num_input_features + i * growth_rate, growth_rate=growth_rate, bn_size=bn_size,
                          drop_rate=drop_rate, memory_efficient=memory_efficient, bottleneck=bottleneck)
        block.add_module(f"denselayer{i + 1}", layer)


def concatenating_forward(block: nn.Module, init_features: torch.Tensor) -> torch.Tensor:
    """torchvision's _DenseBlock.forward: each layer reads the list of all earlier features."""
    features = [init_features]
    for layer in block.values():
        features.append(layer(features))
    return torch.cat(features, 1)


def transition_layers(num_input_features: int, num_output_features: int) -> "OrderedDict[str, nn.Module]":
    """torchvision's _Transition submodules: norm, relu, conv (1x1, no bias), pool (2x2 average)."""
    return OrderedDict([
        ("norm", nn.BatchNorm2d(num_input_features)),
        ("relu", nn.ReLU(inplace=True)),
        ("conv", nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)),
        ("pool", nn.AvgPool2d(kernel_size=2, stride=2)),
    ])


class FusedDenseLayer(nn.Module):
    """torchvision.models.densenet._DenseLayer, fused: norm1-relu1-conv1 (1x1 to bn_size * growth)
    over the concatenated features, norm2-relu2-conv2 (3x3 to growth), dropout.
    bottleneck=False: norm1-relu1-conv1 (3x3 with bias, to growth) only."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float,
                 memory_efficient: bool = False, *, bottleneck: bool = True) -> None:
        super().__init__()
        build_dense_layer(self, num_input_features, growth_rate, bn_size, drop_rate, memory_efficient, bottleneck)

    def _units(self):
        if self.bottleneck:
            return ((self.norm1, self.conv1), (self.norm2, self.conv2))
        return ((self.norm1, self.conv1),)

    def _fallback_reason(self) -> Optional[str]:
        for bn, conv in self._units():
            why = unfusable_reason(conv, bn, sync_ok=False)
            if why is not None:
                return why
        for relu in (self.relu1, getattr(self, "relu2", None)):
            if relu is not None and type(relu) is not nn.ReLU:
                return f"{type(relu).__name__} where a ReLU was expected"
        return None

    def _layer_args(self) -> DenseLayerArgs:
        """This forward's arguments (counts num_batches_tracked as nn.BatchNorm2d.forward does)."""
        return DenseLayerArgs(tuple((bn_args(bn), conv_args(conv)) for bn, conv in self._units()), self.drop_rate)

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.norm1(x)))
        if self.bottleneck:
            out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out

    def forward(self, input: Union[torch.Tensor, List[torch.Tensor]]) -> torch.Tensor:
        name = type(self).__name__
        prev = [input] if isinstance(input, torch.Tensor) else list(input)
        if not prev:
            raise ValueError(f"{name}: input must be a tensor or a non-empty list of tensors")
        x = prev[0] if len(prev) == 1 else torch.cat(prev, 1)
        check_block_input(x, self.conv1, name, "norm1", source="")
        if runs_reference(x, name, self._fallback_reason):
            return self._reference_forward(x)
        # a one-layer block over the concatenation; its new channels are the layer's output
        return dense_block(x, [self._layer_args()], dropout=[self.training])[:, x.shape[1]:]

    @classmethod
    def from_module(cls, layer: nn.Module) -> "FusedDenseLayer":
        """A FusedDenseLayer sharing `layer`'s submodules (torchvision's _DenseLayer or this package's)."""
        names = ["norm1", "relu1", "conv1"]
        bottleneck = getattr(layer, "bottleneck", hasattr(layer, "conv2"))
        if bottleneck:
            names += ["norm2", "relu2", "conv2"]
        missing = [n for n in names + ["drop_rate"] if not hasattr(layer, n)]
        if missing:
            raise TypeError(f"{cls.__name__}.from_module: {type(layer).__name__} lacks {', '.join(missing)}; expected "
                            f"a torchvision-style _DenseLayer")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for n in names:
            setattr(fused, n, getattr(layer, n))
        fused.drop_rate = float(layer.drop_rate)
        fused.memory_efficient = bool(getattr(layer, "memory_efficient", False))
        fused.bottleneck = bottleneck
        fused._register_load_state_dict_pre_hook(rename_legacy_keys_hook, with_module=True)
        fused.training = layer.training  # its own flag only: a frozen (eval) BN inside stays frozen
        return fused


class FusedDenseBlock(nn.ModuleDict):
    """torchvision.models.densenet._DenseBlock, fused: its L layers write into one preallocated
    [N, C0 + L*k, H, W] buffer (see fusedres.autograd.dense), which is the block's output."""

    _version = 2

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int, drop_rate: float,
                 memory_efficient: bool = False, *, bottleneck: bool = True) -> None:
        super().__init__()
        add_dense_layers(self, FusedDenseLayer, num_layers, num_input_features, bn_size, growth_rate, drop_rate,
                         memory_efficient, bottleneck)

    def _fallback_reason(self) -> Optional[str]:
        for name, layer in self.items():
            if not isinstance(layer, FusedDenseLayer):
                return f"{name} is a {type(layer).__name__}, not a FusedDenseLayer"
            why = layer._fallback_reason()
            if why is not None:
                return f"{name}: {why}"
        return None

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return concatenating_forward(self, x)

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        layers = list(self.values())
        if not layers:
            return init_features
        check_block_input(init_features, layers[0].conv1, name, "denselayer1.norm1", source="")
        if runs_reference(init_features, name, self._fallback_reason):
            return self._reference_forward(init_features)
        return dense_block(init_features, [layer._layer_args() for layer in layers],
                           dropout=[layer.training for layer in layers])

    @classmethod
    def from_module(cls, block: nn.Module) -> "FusedDenseBlock":
        """A FusedDenseBlock whose layers share `block`'s (torchvision's _DenseBlock or this package's)."""
        fused = cls.__new__(cls)
        nn.ModuleDict.__init__(fused)
        for name, layer in block.items():
            fused.add_module(name, FusedDenseLayer.from_module(layer))
        fused.training = block.training  # its own flag only: a frozen (eval) BN inside stays frozen
        return fused


class FusedTransition(nn.Sequential):
    """torchvision.models.densenet._Transition, fused: norm-relu-conv (1x1)-pool (2x2 average)."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__(transition_layers(num_input_features, num_output_features))

    def _fallback_reason(self) -> Optional[str]:
        names = list(self._modules)
        if names != ["norm", "relu", "conv", "pool"]:
            return f"submodules {names}, expected norm, relu, conv, pool"
        why = unfusable_reason(self.conv, self.norm, sync_ok=False)
        if why is not None:
            return why
        if type(self.relu) is not nn.ReLU:
            return f"{type(self.relu).__name__} where a ReLU was expected"
        pool = self.pool
        if (type(pool) is not nn.AvgPool2d or pool.kernel_size not in (2, (2, 2)) or pool.stride not in (2, (2, 2))
                or pool.padding not in (0, (0, 0)) or pool.ceil_mode or pool.divisor_override is not None):
            return f"pool {pool} is not a 2x2, stride-2 AvgPool2d"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        why = self._fallback_reason()
        if why is not None:
            _warn_once((name, why), f"fusedres: {name} runs the unfused reference forward: {why}")
            return super().forward(x)
        check_block_input(x, self.conv, name, "norm", source="")
        if x.numel() == 0:  # an empty batch: exactly what the reference does with one
            return super().forward(x)
        return bn_relu_conv_pool(x, bn_args(self.norm), conv_args(self.conv), pool=2)

    @classmethod
    def from_module(cls, transition: nn.Module) -> "FusedTransition":
        """A FusedTransition sharing `transition`'s submodules (torchvision's _Transition)."""
        missing = [n for n in ("norm", "relu", "conv", "pool") if not hasattr(transition, n)]
        if missing:
            raise TypeError(f"{cls.__name__}.from_module: {type(transition).__name__} lacks {', '.join(missing)}")
        fused = cls.__new__(cls)
        nn.Sequential.__init__(fused)
        for n in ("norm", "relu", "conv", "pool"):
            fused.add_module(n, getattr(transition, n))
        fused.training = transition.training  # its own flag only: a frozen (eval) BN inside stays frozen
        return fused
