"""Reference models: torchvision's ResNet and DenseNet architectures written out (same state_dict
keys), for tests and benchmarks where torchvision is not installed (where it is, it is the oracle).
They import nothing of fusedres; the fused modules subclass them, never the reverse."""
from .densenet import (DenseBlock, DenseLayer, DenseNet, Transition, densenet121, densenet161,  # noqa: F401
                       densenet169, densenet201, rename_legacy_keys)
from .resnet import (BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet101,  # noqa: F401
                     resnet152, resnext50_32x4d, resnext101_32x8d, wide_resnet50_2)
