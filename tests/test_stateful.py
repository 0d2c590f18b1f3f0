"""A fused model equals stock under any sequence of user actions (issue 22): hypothesis state
machines (tests/stateful.py) on the package's reference models, CPU backends and Triton under the
interpreter; real torchvision ResNet-18 in tests/test_real_models.py. Each test also checks that
its sequences exercised what it is about (every rule, cached folds reused, the path it names)."""
import copy

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres import block_plumbing
from fusedres.models import resnet
from fusedres.models.densenet import DenseNet
from helpers import HAS_CUDA, INTERPRETED, SmallResNet, assert_close_scaled, randomize_bn
from stateful import ModelsMachine, assert_exercised, run


class _FoldReuse:
    """How many cached values (BatchNorm folds, eval statistics) were reused and computed inside."""
    def __enter__(self):
        self.before = dict(block_plumbing.DerivedCache.counts)
        return self

    def __exit__(self, *exc):
        after = block_plumbing.DerivedCache.counts
        self.reused = after["reused"] - self.before["reused"]
        self.computed = after["computed"] - self.before["computed"]


def _resnext_block_net():
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    return randomize_bn(nn.Sequential(resnet.Bottleneck(16, 8, stride=2, downsample=down, groups=4, base_width=16)))


class ResNeXtBlock(ModelsMachine):
    make_stock = staticmethod(_resnext_block_net)
    input_shape = (3, 16, 9, 9)
    freeze_groups = ("0.conv1", "0.bn1", "0.conv2", "0.bn2", "0.conv3", "0.bn3", "0.downsample", "0.")


def _small_densenet():
    torch.manual_seed(0)
    return randomize_bn(DenseNet(growth_rate=3, block_config=(2, 3), num_init_features=6, bn_size=2, num_classes=5))


class SmallDenseNet(ModelsMachine):
    make_stock = staticmethod(_small_densenet)
    input_shape = (2, 3, 16, 15)
    freeze_groups = ("features.conv0", "features.norm0", "features.denseblock1", "features.transition1",
                     "features.denseblock2", "features.norm5", "classifier", "features.")


@pytest.mark.parametrize("path", ["fused", "stock", "measure"])
def test_resnext_block_equals_stock_under_any_sequence(path, monkeypatch):
    """The CPU backends (auto: oneDNN's fused inference conv, the C++ BatchNorm kernels) on each
    training path: the fused units, the stock forward (aten's BatchNorm updates the running
    statistics without bumping their versions) and the measured choice between them."""
    monkeypatch.setenv("FUSEDRES_CPU_TRAIN_PATH", path)
    with _FoldReuse() as folds:
        stats = run(ResNeXtBlock, examples=60)
    assert_exercised(stats)
    assert folds.reused > 0 and folds.computed > 0, (folds.reused, folds.computed)


def test_small_densenet_equals_stock_under_any_sequence():
    """Dense blocks over one feature buffer and transitions (C++ kernels), eval statistics cached."""
    with _FoldReuse() as cached:
        stats = run(SmallDenseNet, examples=40)
    assert_exercised(stats)
    assert cached.reused > 0 and cached.computed > 0, (cached.reused, cached.computed)


class TinyTritonResNet(ModelsMachine):
    """SmallResNet (a BasicBlock, a grouped Bottleneck with downsample) on the Triton kernels under
    the interpreter: the fused-conv chain in training, the kernels' epilogue in inference."""
    make_stock = staticmethod(lambda: randomize_bn(SmallResNet(classes=3)))
    input_shape = (2, 3, 6, 5)
    freeze_groups = ("stem", "block1", "block2.conv", "block2.downsample", "head")
    backend_name = "triton"
    autocast_dtype = torch.float16  # (the interpreter's tl.dot on bfloat16 operands returns garbage)


@pytest.mark.skipif(HAS_CUDA or not INTERPRETED, reason="the Triton interpreter runs where no GPU is present")
def test_tiny_model_on_triton_equals_stock_under_any_sequence():
    with _FoldReuse() as folds:
        stats = run(TinyTritonResNet, examples=6, steps=10)
    assert_exercised(stats, rules=("eval forward", "train forward + backward", "optimizer step"))
    assert folds.reused > 0, (folds.reused, folds.computed)


@pytest.mark.parametrize("path", ["fused", "stock", "measure"])
def test_eval_after_a_train_forward_without_a_step_is_stock(path, monkeypatch):
    """Issue 22's sequence on the package's ResNet-18 (tests/test_real_models.py runs it on
    torchvision's): a validation pass, train forwards + backward with no optimizer step, eval
    again. The fold cached by the first eval must not survive the running statistics' update (it
    did: 0.6-0.9 relative off stock), whichever path training took."""
    monkeypatch.setenv("FUSEDRES_CPU_TRAIN_PATH", path)
    torch.manual_seed(0)
    ref = resnet.resnet18()
    fused = fusedres.fuse(copy.deepcopy(ref))
    x = torch.randn(4, 3, 64, 64)
    outs = []
    for m in (ref, fused):
        m.eval()
        with torch.no_grad():
            m(x)
        for _ in range(2):
            m.train()
            m(x).sum().backward()
        m.eval()
        with torch.no_grad():
            outs.append(m(x))
    assert_close_scaled(outs[1], outs[0], 2e-5, msg=f"eval after train forwards, path {path}")
