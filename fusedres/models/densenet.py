"""torchvision.models.densenet's architecture, written out: same module names (so the same
state_dict keys), the same initialization, `memory_efficient` checkpointing and the loading of
legacy checkpoints whose layers were saved as `norm.1` instead of `norm1`.

Also the plain (non-bottleneck) DenseNet of Huang et al. 2017: `bottleneck=False` layers are
BN-ReLU-conv3x3 (with bias) only. `dense_block=` and `transition=` accept the fused modules.

A reference: it imports nothing from fusedres (the fused dense modules subclass these, never the
reverse), so a test that checks the fused code against it is not checking that code against itself.
"""
import re
from collections import OrderedDict
from typing import Any, Dict, List, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp


# torchvision's pattern: "denselayer1.norm.1.weight" was saved by versions before 0.2; now "norm1"
LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def rename_legacy_keys(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of state_dict with legacy DenseNet keys (`denselayerN.norm.1.weight`) renamed as
    torchvision renames them (`denselayerN.norm1.weight`); other keys unchanged."""
    out = OrderedDict()
    for key, value in state_dict.items():
        m = LEGACY_KEY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        out._metadata = meta
    return out


def rename_legacy_keys_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                            error_msgs):
    """load_state_dict pre-hook of a dense layer: legacy keys (`norm.1.weight`) renamed in place to
    `norm1.weight`, as torchvision renames them, so old checkpoints load with strict=True."""
    for kind in ("norm", "relu", "conv"):
        for i in ("1", "2"):
            for name in ("weight", "bias", "running_mean", "running_var"):
                old = f"{prefix}{kind}.{i}.{name}"
                if old in state_dict:
                    state_dict[f"{prefix}{kind}{i}.{name}"] = state_dict.pop(old)


class DenseLayer(nn.Module):
    """torchvision's _DenseLayer: norm1-relu1-conv1 (1x1 to bn_size * growth_rate) over the
    concatenated earlier features, then norm2-relu2-conv2 (3x3 to growth_rate), then dropout.
    bottleneck=False: norm1-relu1-conv1 (3x3 with bias, to growth_rate) only."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float,
                 memory_efficient: bool = False, *, bottleneck: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        if bottleneck:
            self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
            self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        else:  # the plain DenseNet layer: BN-ReLU-conv3x3 with bias
            self.conv1 = nn.Conv2d(num_input_features, growth_rate, kernel_size=3, stride=1, padding=1, bias=True)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient
        self.bottleneck = bottleneck
        self._register_load_state_dict_pre_hook(rename_legacy_keys_hook, with_module=True)

    def bn_function(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def forward(self, input: Union[torch.Tensor, List[torch.Tensor]]) -> torch.Tensor:
        prev_features = [input] if isinstance(input, torch.Tensor) else list(input)
        if self.memory_efficient and any(t.requires_grad for t in prev_features):
            out = cp.checkpoint(lambda *inputs: self.bn_function(list(inputs)), *prev_features, use_reentrant=False)
        else:
            out = self.bn_function(prev_features)
        if self.bottleneck:
            out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class DenseBlock(nn.ModuleDict):
    """torchvision's _DenseBlock: layers `denselayer1` ... `denselayerL`; each reads the
    concatenation of the block input and every earlier layer's output; returns all of it."""

    _version = 2
    layer_class: Type[nn.Module] = DenseLayer  # what each layer is built as (a subclass may change it)

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int, drop_rate: float,
                 memory_efficient: bool = False, *, bottleneck: bool = True) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = self.layer_class(num_input_features + i * growth_rate, growth_rate=growth_rate, bn_size=bn_size,
                                     drop_rate=drop_rate, memory_efficient=memory_efficient, bottleneck=bottleneck)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """torchvision's _Transition: norm-relu-conv (1x1, no bias)-pool (2x2 average)."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(num_input_features))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1,
                                          bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class DenseNet(nn.Module):
    """torchvision's DenseNet-BC (Huang et al., "Densely Connected Convolutional Networks")."""

    def __init__(self, growth_rate: int = 32, block_config: Tuple[int, ...] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0, num_classes: int = 1000,
                 memory_efficient: bool = False, *, bottleneck: bool = True,
                 dense_block: Type[nn.Module] = DenseBlock, transition: Type[nn.Module] = Transition) -> None:
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        plain = {} if bottleneck else {"bottleneck": False}  # torchvision's own block takes no such argument
        for i, num_layers in enumerate(block_config):
            block = dense_block(num_layers=num_layers, num_input_features=num_features, bn_size=bn_size,
                                growth_rate=growth_rate, drop_rate=drop_rate, memory_efficient=memory_efficient,
                                **plain)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = transition(num_input_features=num_features, num_output_features=num_features // 2)
                self.features.add_module(f"transition{i + 1}", trans)
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


def _densenet(growth_rate: int, block_config: Tuple[int, ...], num_init_features: int, **kwargs: Any) -> DenseNet:
    return DenseNet(growth_rate, block_config, num_init_features, **kwargs)


def densenet121(**kwargs: Any) -> DenseNet:
    return _densenet(32, (6, 12, 24, 16), 64, **kwargs)


def densenet161(**kwargs: Any) -> DenseNet:
    return _densenet(48, (6, 12, 36, 24), 96, **kwargs)


def densenet169(**kwargs: Any) -> DenseNet:
    return _densenet(32, (6, 12, 32, 32), 64, **kwargs)


def densenet201(**kwargs: Any) -> DenseNet:
    return _densenet(32, (6, 12, 48, 32), 64, **kwargs)
