"""What a fused training forward keeps for backward (counted in bytes, never timed), memory_efficient's
recompute, and fusedres.memory_report.

The lean units keep per unit its pre-BN conv output z and per-channel statistics, plus the block
input and (ReLU after a residual) the block output; stock keeps z and the activation per unit.
Budgets below are those tensors' exact bytes, plus a per-channel allowance for the statistics."""
import copy
import io

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres.memory import REST, saved_bytes_by_path
from fusedres.models import resnet
from fusedres.autograd.units import ConvArgs, recomputed_units

FLOAT = 4


def _stats_allowance(model: nn.Module) -> int:
    """Bytes of per-channel tensors a forward may keep: 8 float64 vectors per BatchNorm channel."""
    return sum(8 * 8 * m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def _saved(model: nn.Module, x: torch.Tensor) -> int:
    return saved_bytes_by_path(model, x, [])[REST]


def _block(kind: str, downsample: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "basic":
        block = resnet.BasicBlock(8, 8) if not downsample else resnet.BasicBlock(
            6, 8, stride=2, downsample=nn.Sequential(resnet.conv1x1(6, 8, 2), nn.BatchNorm2d(8)))
    else:
        block = resnet.Bottleneck(16, 4) if not downsample else resnet.Bottleneck(
            8, 4, stride=2, downsample=nn.Sequential(resnet.conv1x1(8, 16, 2), nn.BatchNorm2d(16)))
    return block.train()


# (block kind, downsample, memory_efficient) -> activation-sized tensors kept, in channels at the
# block's output resolution (conv1 of a strided torchvision block runs at the input's: counted so)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("kind,downsample,efficient", [
    ("basic", False, False), ("basic", True, False), ("bottleneck", False, False), ("bottleneck", True, False),
    ("bottleneck", False, True), ("bottleneck", True, True), ("basic", True, True)])
def test_fused_block_keeps_pre_bn_outputs_only(kind, downsample, efficient, fmt):
    block = _block(kind, downsample)
    n, h = 3, 10
    c_in = block.conv1.in_channels
    x = (torch.randn(n, c_in, h, h) + 0.5).contiguous(memory_format=fmt)
    fused = fusedres.fuse(nn.Sequential(block), memory_efficient=efficient)
    stock_bytes, fused_bytes = _saved(block, x), _saved(fused, x)
    h_out = h // 2 if downsample else h
    width = block.conv1.out_channels
    out = block.bn2.num_features if kind == "basic" else block.bn3.num_features
    in_res = n * h * h * FLOAT  # bytes per channel at the input's resolution
    out_res = n * h_out * h_out * FLOAT
    if kind == "basic":
        # z1, z2, the block output (ReLU mask); a downsample's z; stock adds the activation between
        kept = width * out_res + out * out_res + out * out_res + (out * out_res if downsample else 0)
        stock_kept = kept + width * out_res
        if efficient and downsample:  # the downsample's 1x1 is recomputed (conv1, conv2 are 3x3)
            kept -= out * out_res
    else:
        # z1 (input resolution), z2, z3, output; downsample z; stock: + h1, h2
        kept = width * in_res + width * out_res + 2 * out * out_res + (out * out_res if downsample else 0)
        stock_kept = kept + width * in_res + width * out_res
        if efficient:  # conv3 (the expanding 1x1) and the downsample recomputed
            kept -= out * out_res + (out * out_res if downsample else 0)
    allowance = _stats_allowance(block)
    assert kept <= fused_bytes <= kept + allowance, (fused_bytes, kept)
    assert stock_kept <= stock_bytes <= stock_kept + allowance, (stock_bytes, stock_kept)


@pytest.mark.parametrize("efficient", [False, True], ids=["lean", "memory_efficient"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_lean_and_memory_efficient_models_train_like_stock(arch, efficient):
    """Three float64 SGD steps of the fused model (lean units; memory_efficient recomputing its
    convs in backward) end with stock's parameters, running statistics and loss."""
    torch.manual_seed(3)
    stock = getattr(resnet, arch)(num_classes=5).double()
    fused = fusedres.fuse(stock, memory_efficient=efficient)
    assert efficient == any(getattr(m, "fusedres_memory_efficient", False) for m in fused.modules())
    opts = [torch.optim.SGD(m.parameters(), lr=0.002, momentum=0.9) for m in (stock, fused)]
    for step in range(3):
        x = torch.randn(2, 3, 40 + step, 36, dtype=torch.float64) + 0.3
        losses = []
        for m, opt in zip((stock, fused), opts):
            opt.zero_grad()
            loss = m(x).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        # (a ResNet-50 at 40x36 normalizes 2-4 values per channel in layer4: float64 rounding grows
        # to ~1e-9 in three steps, for the code before the lean units too)
        assert losses[0] == pytest.approx(losses[1], rel=1e-7)
    fused_state = fused.state_dict()
    for key, value in stock.state_dict().items():
        torch.testing.assert_close(fused_state[key], value, rtol=1e-6, atol=1e-8, msg=key)


def test_recomputed_units_are_pointwise_widening_or_last_never_two_in_a_row():
    def conv(c_out, c_in, k=1, groups=1):
        return ConvArgs(torch.empty(c_out, c_in // groups, k, k), None, (1, 1), (0, 0), (1, 1), groups)

    assert recomputed_units([conv(4, 16), conv(4, 4, 3), conv(16, 4)]) == (False, False, True)  # bottleneck
    assert recomputed_units([conv(24, 4), conv(24, 24, 3, 24), conv(4, 24)]) == (True, False, True)  # inverted
    assert recomputed_units([conv(16, 8)]) == (True,)  # a downsample
    assert recomputed_units([conv(8, 8, 3), conv(8, 8, 3)]) == (False, False)  # basic block
    assert recomputed_units([conv(16, 8), conv(32, 16), conv(8, 32)]) == (True, False, True)
    assert recomputed_units([conv(8, 8, 1, 2)]) == (False,)  # grouped


def test_memory_report_rows_totals_and_chart(tmp_path):
    torch.manual_seed(0)
    model = resnet.resnet18(num_classes=4)
    x = torch.randn(2, 3, 48, 48) + 0.2
    report = fusedres.memory_report(model, x)
    assert model.training and not any(isinstance(m, fusedres.FusedBasicBlock) for m in model.modules())
    paths = [r.path for r in report.rows]
    assert "layer1.0" in paths and "layer4.1" in paths and paths[-1] == REST
    assert report.stock_bytes == sum(r.stock_bytes for r in report.rows) > 0
    assert 0.5 < report.ratio < 0.95
    identity = [r for r in report.rows if r.path == "layer1.1"][0]  # 3 of stock's 4 tensors, + statistics
    assert 0.75 <= identity.ratio < 0.77, identity
    text = str(report)
    assert "layer2.1" in text and "total" in text and f"{report.ratio:.3f}x" in text
    assert report.as_dict()["fused_bytes"] == report.fused_bytes
    efficient = fusedres.memory_report(model, x, memory_efficient=True)
    assert efficient.memory_efficient and efficient.fused_bytes < report.fused_bytes
    again = fusedres.memory_report(fusedres.fuse(model), x)  # a fused model: its stock form from unfuse
    assert again.stock_bytes == report.stock_bytes and again.fused_bytes == report.fused_bytes
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="matplotlib"):
            report.save_png(str(tmp_path / "m.png"))
    else:
        path = report.save_png(str(tmp_path / "m.png"))
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_memory_arguments_are_checked():
    with pytest.raises(TypeError, match="memory_efficient must be a bool"):
        fusedres.fuse(resnet.resnet18(), memory_efficient="yes")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fusedres.memory_report("resnet18", torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="train_path"):
        fusedres.memory_report(resnet.resnet18(), torch.randn(2, 3, 32, 32), train_path="fastest")


def test_memory_efficient_setting_reaches_views_built_before_and_after():
    seq = nn.Sequential(nn.Conv2d(4, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 4, 1, bias=False), nn.BatchNorm2d(4))
    fused = fusedres.fuse(seq)
    fused(torch.randn(2, 4, 5, 5))  # views built
    views = fused.derived_holders()
    assert views and not any(v.fusedres_memory_efficient for v in views)
    assert fusedres.set_memory_efficient(fused, True) == 1
    assert all(v.fusedres_memory_efficient for v in fused.derived_holders())
    x = torch.randn(2, 4, 5, 5)
    assert _saved(fused, x) < _saved(seq, x)


class SqueezeExcitation(nn.Module):
    """torchvision's SqueezeExcitation (its forward is `scale * input`), written here."""

    def __init__(self, c, squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.activation = nn.SiLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class ConvNormActivation(nn.Sequential):
    """torchvision's Conv2dNormActivation: an nn.Sequential subclass of conv, norm[, activation]."""

    def __init__(self, cin, cout, k=1, groups=1, act=nn.ReLU6):
        layers = [nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


def inverted_residual(c, hidden, act=nn.ReLU6, se=False):
    """MobileNetV2's (se=False) or EfficientNet's (SiLU, se=True) block body as torchvision nests it."""
    layers = [ConvNormActivation(c, hidden, act=act), ConvNormActivation(hidden, hidden, 3, hidden, act=act)]
    if se:
        layers.append(SqueezeExcitation(hidden, 4))
    layers.append(ConvNormActivation(hidden, c, act=None))
    return nn.Sequential(*layers)


@pytest.mark.parametrize("se", [False, True], ids=["mobilenet_v2", "efficientnet"])
def test_inverted_residual_keeps_its_pre_bn_outputs_and_trains_like_stock(se):
    """One run through the nested Sequentials (ReLU6 / SiLU between units inside the kernels); with
    a squeeze-excitation before the projection, the gate joins the projection's run: the gated
    product is kept by neither. Kept: z of each unit, the SE's input (the gated run's input):
    stock keeps each activation besides (and the product)."""
    torch.manual_seed(1)
    n, c, hidden, size = 2, 8, 24, 9
    block = inverted_residual(c, hidden, nn.SiLU if se else nn.ReLU6, se).train()
    fused = fusedres.fuse(block)
    runs = fused.runs
    assert runs[0].units[:2] == (("0.0", "0.1"), ("1.0", "1.1")) and runs[0].between[0].name == (
        "silu" if se else "hardtanh")
    if se:  # the gate ends the first run and starts the projection's
        assert len(runs) == 2 and runs[1].gate == "2" and runs[1].units == (("3.0", "3.1"),)
    else:  # one run of three units
        assert len(runs) == 1 and runs[0].units[2] == ("2.0", "2.1") and runs[0].gate is None
    x = torch.randn(n, c, size, size).contiguous(memory_format=torch.channels_last)
    plane = n * size * size * FLOAT
    small = n * hidden * 8 * FLOAT  # the gate's [N, C, 1, 1] tensors
    allowance = _stats_allowance(block) + small
    # fused: z1, z2, z3, and with the gate its run's input (the depthwise unit's output); stock keeps
    # at least each unit's activation besides (and the gated product)
    kept = ((3 if se else 2) * hidden + c) * plane
    fused_bytes, stock_bytes = _saved(fused, x), _saved(block, x)
    assert kept <= fused_bytes <= kept + allowance, (fused_bytes, kept)
    assert stock_bytes >= fused_bytes + 2 * hidden * plane, (stock_bytes, fused_bytes)
    # float64: values, every gradient and the running statistics, two steps
    stock64, fused64 = copy.deepcopy(block).double(), fusedres.fuse(copy.deepcopy(block).double())
    for step in range(2):
        x64 = (torch.randn(n, c, size, size, dtype=torch.float64) + 0.2).requires_grad_()
        outs = []
        for m in (stock64, fused64):
            xi = x64.detach().clone().requires_grad_()
            y = m(xi)
            y.square().sum().backward()
            outs.append((y, xi.grad))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-9, atol=1e-11)
    for (name, p), q in zip(stock64.named_parameters(), fused64.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-10 * max(1.0, p.grad.abs().max().item()),
                                   msg=name)
    for (name, b), q in zip(stock64.named_buffers(), fused64.buffers()):
        torch.testing.assert_close(q, b, rtol=1e-12, atol=1e-12, msg=name)
    buffer = io.BytesIO()  # a gate's split program lives beside the module: pickling is unaffected
    torch.save(fused64, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x.double()), stock64.eval()(x.double()), rtol=1e-10, atol=1e-12)


def test_a_stem_pool_keeps_indices_not_its_input():
    """conv -> BN -> ReLU -> max pool: the pool's indices and the unit's z are kept; stock keeps the
    ReLU output (the pool's input) too. Values and gradients as stock's in float64."""
    torch.manual_seed(2)
    stem = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, 2, 1)).train()
    fused = fusedres.fuse(stem)
    assert fused.runs[0].pool == "3" and fused.runs[0].stop == 4
    x = torch.randn(2, 3, 31, 29)
    full = 2 * 8 * 16 * 15 * FLOAT  # the conv's output: 16x15
    pooled = 2 * 8 * 8 * 8 * 8  # int64 indices of the 8x8 output
    allowance = _stats_allowance(stem)
    assert full + pooled <= _saved(fused, x) <= full + pooled + allowance
    assert 2 * full + pooled <= _saved(stem, x) <= 2 * full + pooled + allowance
    stem64, fused64 = copy.deepcopy(stem).double(), fusedres.fuse(copy.deepcopy(stem).double())
    x64 = torch.randn(2, 3, 31, 29, dtype=torch.float64)
    for m in (stem64, fused64):
        m(x64).square().sum().backward()
    for p, q in zip(stem64.parameters(), fused64.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-11)
    fused64.eval(), stem64.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused64(x64), stem64(x64), rtol=1e-12, atol=1e-12)


def test_train_slowdown_allowance_is_read_and_checked(monkeypatch):
    from fusedres.block_plumbing import train_slowdown_allowed

    monkeypatch.delenv("FUSEDRES_CPU_TRAIN_SLOWDOWN", raising=False)
    assert train_slowdown_allowed() == 0.05
    monkeypatch.setenv("FUSEDRES_CPU_TRAIN_SLOWDOWN", "0.2")
    assert train_slowdown_allowed() == 0.2
    for bad in ("-1", "fast", "nan"):
        monkeypatch.setenv("FUSEDRES_CPU_TRAIN_SLOWDOWN", bad)
        with pytest.raises(ValueError, match="FUSEDRES_CPU_TRAIN_SLOWDOWN"):
            train_slowdown_allowed()


def test_only_a_product_x_times_f_of_x_is_a_gate_and_finding_one_touches_nothing():
    from fusedres.modules import gate_program

    norm = nn.BatchNorm2d(4).train()
    assert gate_program(norm) is None and norm.num_batches_tracked.item() == 0  # (its forward never ran)
    assert gate_program(nn.Sequential(nn.Conv2d(4, 4, 1))) is None
    assert gate_program(nn.SiLU()) is None  # x * sigmoid(x) inside one op: no product in its graph
    se = SqueezeExcitation(6, 2)
    program = gate_program(se)
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(x * program(x), se(x), rtol=0, atol=0)
    assert tuple(program(x).shape) == (2, 6, 1, 1)
