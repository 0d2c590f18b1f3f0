"""fusedres.fuse on hand-written forwards that are neither a residual block nor a unit chain:
FusedGraph (the module's own forward traced with its children as leaves, each run of conv -> BN
(-> ReLU ...) a FusedUnits view, the residual add after a run in its epilogue, a norm -> ReLU with
no conv before it a FusedNormReLU), and timm's BatchNormAct2d with an activation other than ReLU
(its activation runs after the fused unit). Models written here in the styles of timm's SE-ResNet,
EfficientNet / MobileNetV3 and pre-activation ResNet v2 blocks and torchvision's ResNet forward;
the real ones: tests/test_real_models.py. Float64 train steps and eval against the original on
every CPU backend, then state: pickling, deep copies, unfuse, fusing twice, replaced children,
mode flips."""
import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedres
from fusedres import FusedGraph, FusedNormReLU, FusedUnits
from helpers import BACKEND_CASES, activation, assert_close_scaled, backend, compare_train_then_eval, randomize_bn


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d's structure and forward (BatchNorm, then `drop`, then `act`),
    under timm's module name, as fusedres recognizes it; timm itself need not be installed."""

    def __init__(self, c, act=None):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


BatchNormAct2d.__module__ = "timm.layers.norm_act"


class SqueezeExcite(nn.Module):
    def __init__(self, c, act=nn.ReLU):
        super().__init__()
        self.conv_reduce = nn.Conv2d(c, 4, 1)
        self.act1 = act(inplace=True)
        self.conv_expand = nn.Conv2d(4, c, 1)

    def forward(self, x):
        return x * self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True)))).sigmoid()


class SEBottleneck(nn.Module):
    """timm's ResNet Bottleneck with `se`: the gate between bn3 and the add."""

    def __init__(self, c, planes):
        super().__init__()
        self.conv1 = nn.Conv2d(c, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.se = SqueezeExcite(c)
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x):
        shortcut = x
        x = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        x = self.se(self.bn3(self.conv3(x)))
        x += shortcut
        return self.act3(x)


class InvertedResidual(nn.Module):
    """timm's EfficientNet / MobileNetV3 InvertedResidual: norms with SiLU / Hardswish inside
    (inplace), a gate, the projection's norm with nothing inside, then `+ shortcut`."""

    def __init__(self, c, hidden, act=nn.SiLU):
        super().__init__()
        self.conv_pw = nn.Conv2d(c, hidden, 1, bias=False)
        self.bn1 = BatchNormAct2d(hidden, act(inplace=True))
        self.conv_dw = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False)
        self.bn2 = BatchNormAct2d(hidden, act(inplace=True))
        self.aa = nn.Identity()
        self.se = SqueezeExcite(hidden, act)
        self.conv_pwl = nn.Conv2d(hidden, c, 1, bias=False)
        self.bn3 = BatchNormAct2d(c)
        self.drop_path = nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.bn1(self.conv_pw(x))
        x = self.se(self.aa(self.bn2(self.conv_dw(x))))
        x = self.bn3(self.conv_pwl(x))
        return self.drop_path(x) + shortcut


class PreActBottleneck(nn.Module):
    """timm's ResNet v2 PreActBottleneck: norm1 (ReLU inside) feeds the downsample and conv1."""

    def __init__(self, cin, cout, planes, downsample=False):
        super().__init__()
        self.norm1 = BatchNormAct2d(cin, nn.ReLU(inplace=True))
        self.downsample = nn.Conv2d(cin, cout, 1, bias=False) if downsample else None
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.norm2 = BatchNormAct2d(planes, nn.ReLU(inplace=True))
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.norm3 = BatchNormAct2d(planes, nn.ReLU(inplace=True))
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)

    def forward(self, x):
        x_preact = self.norm1(x)
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x_preact)
        x = self.conv1(x_preact)
        x = self.conv2(self.norm2(x))
        x = self.conv3(self.norm3(x))
        return x + shortcut


class Net(nn.Module):
    """torchvision's ResNet forward style: the stem unit in the model's own forward, a norm ->
    ReLU before the head (ResNet v2's), methods and attributes a user calls."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.blocks = nn.Sequential(SEBottleneck(12, 6), InvertedResidual(12, 24),
                                    InvertedResidual(12, 16, nn.Hardswish),
                                    PreActBottleneck(12, 16, 8, downsample=True), PreActBottleneck(16, 16, 8))
        self.norm = BatchNormAct2d(16, nn.ReLU(inplace=True))
        self.fc = nn.Linear(16, 5)
        self.num_classes = 5

    def forward_features(self, x):
        return self.norm(self.blocks(self.maxpool(self.relu(self.bn1(self.conv1(x))))))

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.forward_features(x), 1), 1))


def _compare(original, fused, x, tol, steps=2):
    """test_fuse's train steps then eval, then an eval forward + backward (frozen BN fine-tuning)."""
    compare_train_then_eval(original, fused, x, tol, steps)
    xo, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    original(xo).square().sum().backward()
    fused(xf).square().sum().backward()
    assert_close_scaled(xf.grad, xo.grad, tol, msg="eval input gradient")


def _net():
    torch.manual_seed(0)
    return randomize_bn(Net()).double()


def test_every_batchnorm_is_fused_and_the_report_says_how():
    model = _net()
    fused = fusedres.fuse(model)
    report = fusedres.fuse_report(fused)
    assert report.bn_fused == len(report.batchnorms) == 17, str(report)
    assert isinstance(fused, FusedGraph) and isinstance(fused, Net) and fused.num_classes == 5
    by_path = {e.path: e for e in report.batchnorms}
    assert "in (model) [FusedGraph[Net]]" in by_path["bn1"].detail
    alone = {p for p, e in by_path.items() if "no conv fused" in e.detail}
    # norm1 of the first pre-activation block feeds two convs; the second's feeds conv1, which
    # starts the conv1 -> norm2 -> conv2 -> norm3 run; the model's last norm feeds the head
    assert alone == {"blocks.3.norm1", "blocks.4.norm1", "norm"}, alone
    runs = {i: [(s.units, s.final_relu, s.join) for s in fused.blocks[i]._fusedres_programs[True][1]
                if not hasattr(s, "norm")] for i in range(5)}
    assert runs[0] == [((("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")), False, False)]  # the gate, then the add
    # SiLU between bn1 and conv_dw inside the run (the kernels apply it), after bn2 the gate ends it; the add joins
    assert runs[1] == [((("conv_pw", "bn1"), ("conv_dw", "bn2")), False, False), ((("conv_pwl", "bn3"),), False, True)]
    between = [s.between for s in fused.blocks[1]._fusedres_programs[True][1] if not hasattr(s, "norm")]
    assert between == [(None,), ()], between  # (None: bn1's own SiLU, which the kernels apply)
    assert runs[3] == [((("conv1", "norm2"), ("conv2", "norm3")), True, False)]
    assert list(fused.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize("device,name", BACKEND_CASES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
def test_graph_units_train_and_eval_like_the_original(device, name, memory_format):
    model = _net().to(device, memory_format=memory_format)
    fused = fusedres.fuse(model)
    x = activation((3, 3, 17, 15), torch.float64, device, memory_format)
    with backend(name, device):
        _compare(model, fused, x, 1e-9)


def test_the_fused_paths_run_not_the_originals():
    """Counts, not values: no norm and no conv of a unit is called as a module on the fused path
    (their forward hooks would fire), in eval without gradients (where nothing is measured)."""
    fused = fusedres.fuse(_net())
    # (a gate's own convs, squeeze-excitation's, run as they are: not units)
    in_units = [m for v in fused.modules() if isinstance(v, FusedGraph) for view in v.views()
                for m in ([m for unit in view._units() for m in unit] if isinstance(view, FusedUnits)
                          else view.modules()) if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    assert len({id(m) for m in in_units if isinstance(m, nn.BatchNorm2d)}) == 17
    calls = []
    for m in in_units:
        m.register_forward_hook(lambda mod, i, o: calls.append(type(mod).__name__))
    fused.eval()
    with torch.no_grad():
        fused(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert calls == [], calls


def test_state_survives_pickling_copies_unfuse_and_fusing_again():
    model = _net()
    # (the stand-in BatchNormAct2d cannot be pickled by its timm name: blocks of plain modules)
    model.blocks = nn.Sequential(SEBottleneck(12, 6), nn.Conv2d(12, 16, 1)).double()
    model.norm = nn.BatchNorm2d(16).double()
    fused = fusedres.fuse(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    fused.train()
    fused(x)  # builds the programs and views, counts a batch
    fused.eval()
    with torch.no_grad():
        expected = fused(x)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(fused) and isinstance(loaded, Net)
    copied = copy.deepcopy(fused)
    for other in (loaded, copied):
        assert other.blocks[0] is not fused.blocks[0]
        with torch.no_grad():
            torch.testing.assert_close(other(x), expected)
    plain = fusedres.unfuse(fused)
    assert type(plain) is Net and type(plain.blocks[0]) is SEBottleneck
    assert not any(isinstance(m, FusedGraph) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), expected)
    again = fusedres.fuse(fused, inplace=True)
    assert again is fused and len(fusedres.fuse_report(again).swapped) == 0


def test_a_replaced_child_and_a_mode_flip_are_seen():
    torch.manual_seed(0)
    model = _net()
    fused = fusedres.fuse(model).eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        fused(x)
        fused.bn1 = model.bn1 = randomize_bn(nn.BatchNorm2d(12)).double().eval()  # a new stem norm
        fused.blocks[1].conv_pwl = model.blocks[1].conv_pwl = nn.Conv2d(24, 12, 1, bias=False).double()
        torch.testing.assert_close(fused(x), model.eval()(x))
    fused.train()
    assert all(v.training for v in fused.derived_holders())
    fused(x)
    model.train()(x)
    fused.eval()
    assert not any(v.training for v in fused.derived_holders())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model.eval()(x))


def test_a_join_whose_other_operand_does_not_fit_runs_the_reference_add():
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, 1, 1, bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + x.mean((2, 3), keepdim=True)  # broadcast over H, W

    torch.manual_seed(0)
    model = randomize_bn(Broadcast()).double()
    fused = fusedres.fuse(model)
    assert isinstance(fused, FusedGraph) and fused._fusedres_programs[True][1][0].join
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    _compare(model, fused, x, 1e-9, steps=1)


def test_a_unit_view_with_a_join_takes_exactly_its_residual():
    fused = fusedres.fuse(_net())
    view = next(v for v in fused.blocks[1].views() if isinstance(v, FusedUnits) and v.join)
    x = torch.randn(2, 24, 8, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="expects the residual"):
        view(x)
    norm_relu = next(v for v in fused.views() if isinstance(v, FusedNormReLU))
    assert norm_relu._fallback_reason() is None


ACTIVATIONS = [nn.SiLU(inplace=True), nn.Hardswish(), nn.ReLU6(inplace=True), nn.Hardtanh(-1.0, 2.0), nn.GELU(),
               nn.GELU(approximate="tanh"), nn.LeakyReLU(0.2)]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: repr(a))
@pytest.mark.parametrize("where", ["sequential", "norm_act"])
def test_activations_after_a_unit_are_the_convs_post_op_in_inference(act, where):
    """Issue 24's item 5 on the CPU: an activation other than ReLU after a unit (a Sequential's next
    child, timm's BatchNormAct2d's `act`) is the BN-folded conv's oneDNN post-op in inference (the
    module is not called: counts, not values) and its module in training; values equal stock's."""
    torch.manual_seed(0)
    if where == "sequential":
        model = nn.Sequential(nn.Conv2d(5, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), act, nn.Conv2d(8, 6, 1))
    else:
        model = nn.Sequential(nn.Conv2d(5, 8, 3, 1, 1, bias=False), BatchNormAct2d(8, act), nn.Conv2d(8, 6, 1))
    model = randomize_bn(model)
    fused = fusedres.fuse(model)
    assert fusedres.fuse_report(fused).bn_fused == 1
    calls = []
    act.register_forward_hook(lambda *a: calls.append(1))
    x = activation((2, 5, 9, 7), torch.float32, "cpu", torch.channels_last)
    for m in (model, fused):
        m.eval()
    with backend("cpu", "cpu"), torch.no_grad():
        expected = model(x)
        del calls[:]
        got = fused(x)
    assert calls == [], "the activation ran as a module, not as the conv's post-op"
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)
    for m in (model, fused):
        m.train()
    with backend("cpu", "cpu"):
        xo, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        del calls[:]
        yo, yf = model(xo), fused(xf)
        # (the fused units apply it inside their BatchNorm ops, or as its function: no module call)
        assert len(calls) == 1, "stock's activation module ran once"
        torch.testing.assert_close(yf, yo, rtol=2e-5, atol=2e-5)
        yo.square().sum().backward()
        yf.square().sum().backward()
        torch.testing.assert_close(xf.grad, xo.grad, rtol=2e-4, atol=2e-4)


# aten's own ops for each activation, forward and backward: none may run where the unit applies it
ATEN_ACTIVATION_OPS = {"silu", "silu_backward", "hardswish", "hardswish_backward", "hardtanh", "hardtanh_backward",
                       "hardtanh_", "gelu", "gelu_backward", "leaky_relu", "leaky_relu_backward", "leaky_relu_",
                       "silu_", "hardswish_", "sigmoid", "relu", "relu_", "threshold_backward", "clamp", "clamp_"}


class _AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten ops (overload packets' names) run under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device,name", BACKEND_CASES)
@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: repr(a))
@pytest.mark.parametrize("where", ["sequential", "norm_act"])
def test_activations_after_a_unit_run_inside_its_batchnorm_ops_in_training(device, name, act, where):
    """Issue 24's item 2: in training (and eval with gradients) the unit's activation, forward and
    backward, is inside its normalize pass and its backward passes on every backend (no aten
    activation op runs: counted; the reference backend's passes are plain PyTorch), values and
    gradients in float64 equal stock's through train steps and eval. A Hardtanh other than ReLU6's 0..6 is not one of the kernels' activations: it
    runs as its own op after the unit. (The C++ CPU kernels call ATen's SiLU and GELU from inside
    their op: not seen here, as the op is one dispatch.)"""
    torch.manual_seed(0)
    act = copy.deepcopy(act)
    if where == "sequential":
        model = nn.Sequential(nn.Conv2d(5, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), act, nn.Conv2d(8, 6, 1))
    else:
        model = nn.Sequential(nn.Conv2d(5, 8, 3, 1, 1, bias=False), BatchNormAct2d(8, act), nn.Conv2d(8, 6, 1))
    model = randomize_bn(model).double()
    fused = fusedres.fuse(copy.deepcopy(model))
    x = activation((2, 5, 9, 7), torch.float64, device, torch.channels_last) * 2
    inside = not (isinstance(act, nn.Hardtanh) and not isinstance(act, nn.ReLU6))
    with backend(name, device):
        xf = x.clone().requires_grad_(True)
        with _AtenOps() as seen:  # (on a copy: this step's statistics and gradients stay out of the comparison)
            copy.deepcopy(fused)(xf).square().sum().backward()
    ran = ATEN_ACTIVATION_OPS & set(seen.names)
    if name != "reference":  # (the reference backend is plain PyTorch: its activation is aten's)
        assert not ran if inside else ran, sorted(ran)
    with backend(name, device):
        compare_train_then_eval(model, fused, x, 1e-10, steps=2)


class FunctionalTails(nn.Module):
    """Units whose activation a hand-written forward calls as a functional (and one module)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(6, 6, 3, 1, 1, bias=False) for _ in range(7))
        self.bns = nn.ModuleList(nn.BatchNorm2d(6) for _ in range(7))
        self.act = nn.SiLU()

    def forward(self, x):
        c, b = self.convs, self.bns
        x = F.silu(b[0](c[0](x)), inplace=True)
        x = F.hardswish(b[1](c[1](x)))
        x = F.relu6(b[2](c[2](x)))
        x = F.leaky_relu(b[3](c[3](x)), 0.2)
        x = F.gelu(b[4](c[4](x)), approximate="tanh")
        x = self.act(b[5](c[5](x)))
        return F.hardtanh(b[6](c[6](x)), -1.0, 2.0)  # not one of the kernels': after the unit


@pytest.mark.parametrize("device,name", BACKEND_CASES)
def test_functional_activations_between_units_run_inside_one_run(device, name):
    """F.silu / F.hardswish / F.relu6 / F.leaky_relu / F.gelu (and an activation module) between
    units in a traced forward keep them one run, each inside the BatchNorm passes on every backend
    (counted: no aten activation op but the last Hardtanh's, which is not one of the kernels':
    after the run); values and gradients in float64 equal the original's through train steps and
    eval; pickling keeps them."""
    torch.manual_seed(0)
    model = randomize_bn(FunctionalTails()).double()
    fused = fusedres.fuse(copy.deepcopy(model))
    assert isinstance(fused, FusedGraph) and fusedres.fuse_report(fused).bn_fused == 7
    specs = fused.__dict__["_fusedres_programs"][True][1]
    assert len(specs) == 1 and len(specs[0].units) == 7 and specs[0].tail is None, specs  # (F.hardtanh: not a tail)
    assert [op.name for op in specs[0].between] == ["silu", "hardswish", "hardtanh", "leaky_relu", "gelu", "silu"]
    x = activation((2, 6, 7, 5), torch.float64, device, torch.channels_last) * 2
    with backend(name, device):
        xf = x.clone().requires_grad_(True)
        with _AtenOps() as seen:  # (on a copy: this step's statistics and gradients stay out of the comparison)
            copy.deepcopy(fused)(xf).square().sum().backward()
    ran = ATEN_ACTIVATION_OPS & set(seen.names)
    expected = {"hardtanh", "hardtanh_backward"}
    if name != "reference":
        assert ran == expected, sorted(ran)
    with backend(name, device):
        compare_train_then_eval(model, fused, x, 1e-10, steps=2)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert again.__dict__["_fusedres_programs"][True][1] == specs
    with torch.no_grad():
        torch.testing.assert_close(again(x), fused(x), rtol=0, atol=0)
