"""fusedres.fuse / fuse_report / unfuse: blocks found by what they compute (torch.fx), in the
package's reference architectures and in hand-written block styles; outputs, gradients and
running statistics against the original model; state_dict unchanged; exact report counts;
unrecognized blocks left alone with a reason; fusing twice changes nothing. Real torchvision and
timm models: tests/test_real_models.py."""

import importlib.util
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedres
from fusedres import FusedGraph, FusedResidual, models
from helpers import BACKEND_CASES, activation, assert_close_scaled, backend, compare_train_then_eval, randomize_bn


# ---------------------------------------------------------------------------------------------
# Hand-written blocks, in the styles people write them.
# ---------------------------------------------------------------------------------------------
class ShortcutBlock(nn.Module):
    """CIFAR-repo style: `shortcut` an empty nn.Sequential for the identity, F.relu, a + b."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.b1(self.c1(x)))
        out = self.b2(self.c2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class ExtraBottleneck(nn.Module):
    """Convs with bias, torch.relu, `out += self.extra(x)`, no ReLU after the add, stride on the
    first conv, BatchNorm with its own eps and momentum."""

    def __init__(self, cin, mid, cout, stride=1):
        super().__init__()
        self.conv_a = nn.Conv2d(cin, mid, 1, stride, bias=True)
        self.bn_a = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self.conv_b = nn.Conv2d(mid, mid, 3, 1, 1, bias=True)
        self.bn_b = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self.conv_c = nn.Conv2d(mid, cout, 1, bias=True)
        self.bn_c = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)
        self.extra = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn_a(self.conv_a(x)))
        out = torch.relu(self.bn_b(self.conv_b(out)))
        out = self.bn_c(self.conv_c(out))
        out += self.extra(x)
        return out


class D2LResidual(nn.Module):
    """d2l.ai style: a 1x1 `conv3` shortcut (a conv alone) selected by a flag, Y += X."""

    def __init__(self, cin, cout, use_1x1conv=False, strides=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(cout, cout, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(cin, cout, kernel_size=1, stride=strides) if use_1x1conv else None
        self.bn1 = nn.BatchNorm2d(cout)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, X):
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3:
            X = self.conv3(X)
        Y += X
        return F.relu(Y)


class MethodBlock(nn.Module):
    """Tensor.relu(), torch.add, the shortcut first in the add."""

    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleDict(dict(conv1=nn.Conv2d(c, c, 3, 1, 1, bias=False), bn1=nn.BatchNorm2d(c),
                                         conv2=nn.Conv2d(c, c, 3, 1, 1, bias=False), bn2=nn.BatchNorm2d(c)))

    def forward(self, x):
        y = self.layers["bn1"](self.layers["conv1"](x)).relu()
        y = self.layers["bn2"](self.layers["conv2"](y))
        return torch.add(x, y).relu()


class TutorialBlock(nn.Module):
    """As popular tutorials write it: stateless modules constructed and called inside forward
    (`nn.ReLU(inplace=True)(x)`, `nn.Identity()(x)`, `nn.ReLU()(x)`), F.relu(x, False)."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = nn.ReLU(inplace=True)(self.bn1(self.conv1(x)))
        out = F.relu(nn.Identity()(self.bn2(self.conv2(out))), False)
        return nn.ReLU()(self.bn3(self.conv3(out)) + x)


class PoolShortcutBlock(nn.Module):
    """timm's `d` variants (ResNet-D): the shortcut average-pools before its 1x1 conv + BN."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                                        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.downsample(x))


class SigmoidInline(TutorialBlock):
    """A module constructed inside forward that is not a ReLU: traced through, then left."""

    def forward(self, x):
        out = nn.Sigmoid()(self.bn1(self.conv1(x)))
        out = nn.ReLU()(self.bn2(self.conv2(out)))
        return nn.ReLU()(self.bn3(self.conv3(out)) + x)


class DropPath(nn.Module):
    """timm's DropPath: random per-sample drop in training when drop_prob > 0."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(1 - self.drop_prob)
        return x * keep / (1 - self.drop_prob)


class TimmStyleBottleneck(nn.Module):
    """timm.models.resnet.Bottleneck's attribute names and forward: act1..act3, aa, se,
    drop_block, drop_path."""

    def __init__(self, cin, planes, stride=1, downsample=None, drop_path=0.0, se=False):
        super().__init__()
        out = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.drop_block = nn.Identity()
        self.act2 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(out, out, 1), nn.Sigmoid()) if se else None
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = x * self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act3(x)
        return x


class TwiceBN(nn.Module):
    """Uses one BatchNorm twice: not the pattern."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn(self.conv2(F.relu(self.bn(self.conv1(x))))) + x)


def _down(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def hand_written_model():
    """(model, swapped, left): every style above in one network."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        ShortcutBlock(8, 8), ShortcutBlock(8, 12, stride=2),
        ExtraBottleneck(12, 6, 16, stride=2),
        D2LResidual(16, 16), D2LResidual(16, 10, use_1x1conv=True, strides=2),
        MethodBlock(10),
        TimmStyleBottleneck(10, 4, downsample=_down(10, 16, 1)),
        TimmStyleBottleneck(16, 4),
        TimmStyleBottleneck(16, 4, drop_path=0.1),  # drop path in training: a FusedGraph, its units fused
        TimmStyleBottleneck(16, 4, se=True),  # squeeze-excitation: a FusedGraph, the units around the gate fused
        TwiceBN(16),  # left
        TutorialBlock(16),
        PoolShortcutBlock(16, 12),
        SigmoidInline(12),  # a FusedGraph: conv1 -> bn1, then the sigmoid, then the rest with its join
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))
    return model, 14, 1  # 13 blocks and the model itself (a FusedSequential: its stem unit)


_compare = compare_train_then_eval


@pytest.mark.parametrize("device,name", BACKEND_CASES)
def test_hand_written_styles_are_swapped_and_match(device, name):
    torch.manual_seed(0)
    model, swapped, left = hand_written_model()
    model = randomize_bn(model).double().to(device)
    fused = fusedres.fuse(model)
    report = fusedres.fuse_report(fused)
    assert (len(report.swapped), len(report.left), len(report.already_fused)) == (swapped, left, 0), str(report)
    assert list(fused.state_dict()) == list(model.state_dict())
    for key, value in fused.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    left_paths = {e.path: e.detail for e in report.left}
    assert set(left_paths) == {"13"}, left_paths
    assert "used more than once" in left_paths["13"]
    for k in (11, 12, 16):  # the module itself, its class made a FusedGraph of its own class
        assert isinstance(fused[k], FusedGraph) and isinstance(fused[k], type(model[k])), k
    assert [(s.units, s.final_relu, s.join) for s in fused[16]._fusedres_programs[True][1]] == [
        ((("conv1", "bn1"),), False, False), ((("conv2", "bn2"), ("conv3", "bn3")), True, True)]
    assert [bn for bn in report.batchnorms if bn.status != "fused"] == report.bn_left and len(report.bn_left) == 1
    assert fused[15].shortcut_pools == ("downsample.0",) and fused[15].shortcut_names == ("downsample.1",
                                                                                         "downsample.2")
    assert isinstance(fused[3], FusedResidual) and not isinstance(fused[11], FusedResidual)
    assert fused[5]._final_relu is False, "no ReLU after the add in ExtraBottleneck"
    assert fused[7].shortcut_names == ("conv3",), "the d2l shortcut is a conv alone"
    x = activation((2, 3, 12, 11), torch.float64, device, torch.channels_last)
    with backend(name, device):
        _compare(model, fused, x, 1e-9)


def test_fusing_twice_changes_nothing_and_unfuse_restores_plain_modules():
    model, swapped, _ = hand_written_model()
    fused = fusedres.fuse(model)
    again = fusedres.fuse(fused, inplace=True)
    assert again is fused
    report = fusedres.fuse_report(again)
    assert len(report.swapped) == 0 and len(report.already_fused) == swapped
    plain = fusedres.unfuse(fused)
    assert not any(isinstance(m, FusedResidual) for m in plain.modules())
    assert [type(m) for m in plain.modules()] == [type(m) for m in model.modules()]
    assert list(plain.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 12, 11)
    for m in (model, plain):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))


def test_inplace_shares_parameters_so_an_existing_optimizer_keeps_working():
    model, _, _ = hand_written_model()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    types = [type(m) for m in model.modules()]
    fused = fusedres.fuse(model, inplace=True)
    assert fused is model and list(fused.parameters())[0] is params[0]
    assert isinstance(model, fusedres.FusedSequential), "the model itself (its stem unit) fused in place"
    plain = fusedres.unfuse(fusedres.fuse(model))  # a copy: the original kept by the in-place fuse is whole
    assert [type(m) for m in plain.modules()] == types
    before = params[0].detach().clone()
    fused(torch.randn(2, 3, 12, 11)).sum().backward()
    opt.step()
    assert not torch.equal(params[0], before)
    copied = fusedres.fuse(model)  # inplace=False: a deep copy, the original untouched
    assert copied is not model and list(copied.parameters())[0] is not params[0]


def test_frozen_batchnorm_inside_a_training_block_stays_frozen():
    block = ShortcutBlock(6, 6)
    block.b1.eval()  # a frozen BN in a training model
    fused = fusedres.fuse(nn.Sequential(block))
    assert fused[0].training and not fused[0].b1.training


def test_reasons_for_blocks_left_alone():
    class SyncLike(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x)

    block = ShortcutBlock(6, 6)
    block.b2 = SyncLike(6)
    report = fusedres.fuse_report(fusedres.fuse(nn.Sequential(block)))
    # not the residual pattern (a norm of its own forward): the units that can be fused are, in a graph
    assert not report.left and [e.path for e in report.bn_left] == ["0.b2"], str(report)
    assert "SyncLike has its own forward" in report.bn_left[0].detail, str(report)

    class Gated(ShortcutBlock):
        def forward(self, x):
            out = F.relu(self.b1(self.c1(x)))
            out = self.b2(self.c2(out)) * 0.5
            return F.relu(out + self.shortcut(x))

    # not a residual block (a scale before the add): its own forward rewritten, both units fused
    report = fusedres.fuse_report(fusedres.fuse(nn.Sequential(Gated(6, 6))))
    assert not report.left and not report.bn_left, str(report)
    assert "FusedGraph (its own forward, runs fused: c1 -> b1 -> relu -> c2 -> b2)" in str(report), str(report)

    class DataDependent(ShortcutBlock):
        def forward(self, x):
            if x.sum() > 0:
                return super().forward(x)
            return x

    report = fusedres.fuse_report(fusedres.fuse(nn.Sequential(DataDependent(6, 6))))
    assert len(report.left) == 1 and "torch.fx cannot trace" in report.left[0].detail
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fusedres.fuse("resnet50")
    with pytest.raises(ValueError, match="did not come from fusedres.fuse"):
        fusedres.fuse_report(nn.Linear(2, 2))


# (architecture, modules swapped: residual blocks and the model itself (its stem unit, in its own
# forward: a FusedGraph), or dense blocks + transitions + the stem's Sequential)
ZOO = [("resnet18", 9), ("resnet34", 17), ("resnet50", 17), ("resnet101", 34), ("resnet152", 51),
       ("resnext50_32x4d", 17), ("resnext101_32x8d", 34), ("wide_resnet50_2", 17),
       ("densenet121", 8), ("densenet169", 8), ("densenet201", 8)]  # + DenseNet's `features` (its stem unit)


@pytest.mark.parametrize("arch,count", ZOO)
def test_zoo_architectures_fuse_completely_with_unchanged_keys(arch, count):
    model = getattr(models, arch)()
    fused = fusedres.fuse(model)
    report = fusedres.fuse_report(fused)
    assert len(report.swapped) == count and not report.left, str(report)
    if arch.startswith("res") or arch.startswith("wide"):
        assert isinstance(fused, FusedGraph) and isinstance(fused, type(model)) and report.bn_left == [], str(report)
    assert list(fused.state_dict()) == list(model.state_dict())
    plain = fusedres.unfuse(fused)
    assert [type(m) for m in plain.modules()] == [type(m) for m in model.modules()]


# whole full-width models under the Triton interpreter take minutes each (resnet18: 8 min); the
# interpreted kernels are covered by the hand-written model above and the block tests
ZOO_CASES = [c for c in BACKEND_CASES if c.values[1] != "triton" or c.values[0] == "cuda"]
# Numerics of every architecture against the real torchvision model: tests/test_real_models.py
# (stage 2). Here, against the references: one of each block kind (basic, grouped bottleneck, dense).
ZOO_NUMERICS = ("resnet18", "resnext50_32x4d", "densenet121")


def _zoo_cases():
    return [pytest.param(*c.values, arch, id=f"{arch}-{c.id}", marks=c.marks) for c in ZOO_CASES
            for arch in ZOO_NUMERICS]


@pytest.mark.parametrize("device,name,arch", _zoo_cases())
def test_zoo_fused_model_trains_like_the_original(device, name, arch):
    """float64, one SGD step, train and eval. 1e-6: batch 2 at 48x48 leaves 2-4 values per channel
    for the last BatchNorms, which amplify float64 rounding differences a million-fold."""
    torch.manual_seed(0)
    model = randomize_bn(getattr(models, arch)(num_classes=7)).double().to(device, memory_format=torch.channels_last)
    fused = fusedres.fuse(model)
    size = 64 if arch.startswith("densenet") else 48  # densenets' last block: 2x2, not 1x1
    x = activation((2, 3, size, size), torch.float64, device, torch.channels_last)
    with backend(name, device):
        _compare(model, fused, x, 1e-6, steps=1)


def _command_line_fuse(capsys):
    from fusedres.__main__ import main

    assert main(["fuse", "--arch", "resnet18", "--batch", "2", "--size", "32", "--device", "cpu",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    # 8 basic blocks and the model's own forward (its stem unit) in either resnet18
    assert "fusedres.fuse: 9 swapped, 0 left, 0 already fused" in out
    assert "largest output difference" in out and "forward + backward: original" in out
    return out


def test_command_line_fuses_torchvisions_model_where_it_imports(capsys):
    """Holds in both environments: torchvision's resnet18 where torchvision imports (the GPU machine,
    test stages 2 and 3), else the package's own."""
    source = "torchvision" if importlib.util.find_spec("torchvision") is not None else "fusedres.models"
    assert f"resnet18 ({source}) on cpu" in _command_line_fuse(capsys)


def test_command_line_falls_back_to_the_package_models_without_torchvision(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` raises ImportError
    assert "resnet18 (fusedres.models) on cpu" in _command_line_fuse(capsys)


def test_dense_blocks_are_recognized_by_what_they_compute():
    """A dense block is swapped when its traced forward concatenates as DenseNet's does
    (memory_efficient and dropout included); a look-alike that computes something else is left."""
    model = models.DenseNet(growth_rate=3, block_config=(2, 2), num_init_features=6, bn_size=2, drop_rate=0.2,
                            num_classes=4, memory_efficient=True)
    fused = fusedres.fuse(model)
    report = fusedres.fuse_report(fused)
    assert len(report.swapped) == 4 and not report.left, str(report)  # 2 dense blocks, transition, stem
    assert all(layer.memory_efficient for layer in model.features.denseblock1.values()), "flag restored"
    x = activation((2, 3, 16, 16), torch.float64)
    model, fused = model.double().eval(), fused.double().eval()
    with torch.no_grad():
        assert_close_scaled(fused(x), model(x), 1e-10, msg="eval")

    class LastOnly(models.DenseBlock):
        def forward(self, init_features):  # each layer reads only the previous output
            out = init_features
            feats = [out]
            for layer in self.values():
                out = layer([out])
                feats.append(out)
            return torch.cat(feats, 1)

    report = fusedres.fuse_report(fusedres.fuse(nn.Sequential(LastOnly(2, 4, 2, 4, 0.0))))
    assert len(report.left) == 1 and "concatenation of the input and every earlier" in report.left[0].detail, \
        str(report)


# ---------------------------------------------------------------------------------------------
# Units everywhere: conv -> BN (-> ReLU) outside residual blocks.
# ---------------------------------------------------------------------------------------------
class BasicConv2d(nn.Module):
    """GoogLeNet's / Inception's: a hand-written conv -> BN -> functional in-place ReLU."""

    def __init__(self, cin, cout, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Gate(nn.Module):
    """A squeeze-excitation gate: stays as it is between fused units."""

    def __init__(self, c):
        super().__init__()
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class InvertedResidual(nn.Module):
    """MobileNetV2's (with a gate): expand (ReLU6), depthwise, gate, project, add."""

    def __init__(self, c, hidden):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)),
            nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                          nn.ReLU(inplace=True)),
            Gate(hidden),
            nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.conv(x)


def units_model():
    """(model, number of BatchNorm layers): conv -> BN units in the places they stand in real
    models, every one of them fusable."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),  # a stem
        nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),  # VGG-BN
        BasicConv2d(8, 12, kernel_size=3, padding=1),
        InvertedResidual(12, 20),
        nn.Sequential(nn.Conv2d(12, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),  # two units, one Function
                      nn.Conv2d(12, 10, 3, 1, 1, bias=False), nn.BatchNorm2d(10)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 5))
    return model, 8


@pytest.mark.parametrize("device,name", BACKEND_CASES)
def test_units_everywhere_are_fused_and_match(device, name):
    torch.manual_seed(0)
    model, bns = units_model()
    model = randomize_bn(model).double().to(device)
    fused = fusedres.fuse(model)
    report = fusedres.fuse_report(fused)
    assert len(report.batchnorms) == bns and report.bn_fused == bns, str(report)
    assert isinstance(fused, fusedres.FusedSequential) and isinstance(fused[7], fusedres.FusedUnits)
    assert [r.units for r in fused.runs] == [(("0", "1"), ("3", "4"))]  # one run: ReLU between the units
    assert fused[9].runs[0].units == (("0", "1"), ("3", "4")) and fused[9].runs[0].final_relu is False
    # the expand and depthwise Sequentials (conv, norm, act) are one run of the outer Sequential,
    # ReLU6 between them inside the kernels; the gate ends it
    assert isinstance(fused[8].conv, fusedres.FusedSequential)
    assert fused[8].conv.runs[0][:3] == (0, 2, (("0.0", "0.1"), ("1.0", "1.1")))
    assert fused[8].conv.runs[0].between[0].name == "hardtanh" and fused[8].conv.runs[0].final_relu
    assert type(fused[8].conv[0]) is nn.Sequential
    assert list(fused.state_dict()) == list(model.state_dict())
    x = activation((2, 3, 13, 11), torch.float64, device, torch.channels_last)
    with backend(name, device):
        _compare(model, fused, x, 1e-9)
    plain = fusedres.unfuse(fused)
    assert [type(m) for m in plain.modules()] == [type(m) for m in model.modules()]


def test_a_replaced_child_of_a_fused_sequential_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    fused = fusedres.fuse(model).eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        fused(x)
        fused[0] = nn.Conv2d(3, 4, 3, bias=False)
        model[0] = fused[0]
        torch.testing.assert_close(fused(x), model.eval()(x))


def test_fuse_report_lists_every_batchnorm_once_with_what_fused_it_or_why_not():
    model, _, _ = hand_written_model()
    report = fusedres.fuse_report(fusedres.fuse(model))
    norms = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert [e.path for e in report.batchnorms] == norms
    by_path = {e.path: e for e in report.batchnorms}
    assert by_path["1"].status == "fused" and "(model) [FusedSequential]" in by_path["1"].detail
    assert by_path["3.b1"].status == "fused" and "in 3 [FusedResidual]" in by_path["3.b1"].detail
    left = {e.path.split(".")[0] for e in report.bn_left}
    assert left == {"13"}, str(report)
    assert "used more than once" in by_path["13.bn"].detail and "in 13, left" in by_path["13.bn"].detail
    assert by_path["12.bn1"].status == "fused" and "in 12 [FusedGraph[TimmStyleBottleneck]]" in by_path["12.bn1"].detail
    assert report.bn_fused == len(norms) - len(report.bn_left)
    assert f"BatchNorm layers fused: {report.bn_fused} of {len(norms)}" in str(report)
