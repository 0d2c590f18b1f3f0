"""The CPU's own paths: inference convs as single oneDNN primitives (BN folded, bias + residual +
ReLU as post-ops, weights prepacked per input shape), and in training the fused units or the
stock forward, whichever measured faster."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedres
from fusedres import block_plumbing
from fusedres.kernels import conv_onednn
from fusedres.models import resnet
from fusedres.modules import FusedBasicBlock, FusedBottleneck, PackedWeights
from fusedres.ops import conv_inference
from fusedres.ops.registry import implementations

from helpers import activation, assert_close_scaled, randomize_bn

CL = torch.channels_last
ONEDNN = conv_onednn.missing_reason() is None
needs_onednn = pytest.mark.skipif(not ONEDNN, reason=f"oneDNN ops missing: {conv_onednn.missing_reason()}")


def test_onednn_backend_is_listed_with_its_reason():
    table = fusedres.backends()
    assert "onednn" in table
    assert table["onednn"]["cpu"] is True if ONEDNN else table["onednn"]["cpu"] == conv_onednn.missing_reason()
    if torch.cuda.is_available():
        assert "CPU tensors" in table["onednn"]["cuda"]


def test_onednn_disabled_is_the_reason(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert "disabled" in fusedres.backends()["onednn"]["cpu"]


def test_onednn_choice_runs_cpu_kernels_for_the_other_ops():
    """use_backend("onednn") means the C++ kernels for every op oneDNN does not implement."""
    from fusedres.ops.registry import resolve

    with fusedres.use_backend("onednn"):
        assert resolve("bn_act_forward", torch.device("cpu"))[0] == "cpu"
        assert resolve(conv_inference.OP, torch.device("cpu"))[0] == ("onednn" if ONEDNN else "reference")


CONVS = [  # (C_in, C_out, kernel, stride, padding, dilation, groups, H, W)
    (8, 16, 1, 1, 0, 1, 1, 7, 5),
    (6, 10, 3, 1, 1, 1, 1, 9, 7),
    (8, 12, 3, 2, 1, 1, 4, 11, 6),
    (4, 6, 3, 1, 2, 2, 2, 8, 9),
    (3, 8, 7, 2, 3, 1, 1, 13, 13),
    (16, 8, 1, 2, 0, 1, 1, 9, 9),
]


@needs_onednn
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_onednn_conv_bias_act_matches_float64(conv, residual, relu, packed):
    """The onednn backend against float64 (and the reference backend against it too), float32
    channels_last, odd sizes, groups, strides, dilation, with and without residual and ReLU."""
    c_in, c_out, k, s, p, d, g, h, w = conv
    x = activation((3, c_in, h, w), memory_format=CL)
    weight = torch.randn(c_out, c_in // g, k, k) / (c_in // g * k * k) ** 0.5
    bias = torch.randn(c_out)
    out_hw = F.conv2d(x, weight, None, s, p, d, g).shape[2:]
    res = activation((3, c_out, *out_hw), memory_format=CL) if residual else None
    expected = F.conv2d(x.double(), weight.double(), bias.double(), s, p, d, g)
    if res is not None:
        expected = expected + res.double()
    expected = torch.relu(expected) if relu else expected
    pack = conv_inference.pack_weight(weight, (s, s), (p, p), (d, d), g, x.shape) if packed else None
    for name, impl in implementations(conv_inference.OP).items():
        y = impl(x, weight, bias, res, (s, s), (p, p), (d, d), g, relu, pack)
        assert y.dtype == torch.float32 and y.is_contiguous(memory_format=CL), name
        assert_close_scaled(y, expected, 2e-6, msg=name)
        if relu:
            assert (y >= 0).all(), name


POST_OPS = [(conv_inference.PostOp("silu"), F.silu), (conv_inference.PostOp("hardswish"), F.hardswish),
            (conv_inference.PostOp("hardtanh", (0.0, 6.0)), F.relu6),
            (conv_inference.PostOp("hardtanh", (-1.0, 2.0)), lambda z: F.hardtanh(z, -1.0, 2.0)),
            (conv_inference.PostOp("gelu", (), "none"), F.gelu),
            (conv_inference.PostOp("gelu", (), "tanh"), lambda z: F.gelu(z, approximate="tanh")),
            (conv_inference.PostOp("leaky_relu", (0.2,)), lambda z: F.leaky_relu(z, 0.2))]


@needs_onednn
@pytest.mark.parametrize("post_op,function", POST_OPS, ids=lambda p: getattr(p, "name", ""))
@pytest.mark.parametrize("residual", [False, True])
def test_onednn_post_ops_match_float64(post_op, function, residual):
    """Each activation as the inference conv's post-op, on both backends against float64 (issue
    24's item 5): oneDNN's eltwise post-op and the reference's torch function."""
    c_in, c_out, k, s, p, d, g, h, w = CONVS[2]
    x = activation((3, c_in, h, w), memory_format=CL)
    weight = torch.randn(c_out, c_in // g, k, k) / (c_in // g * k * k) ** 0.5
    bias = torch.randn(c_out)
    z = F.conv2d(x.double(), weight.double(), bias.double(), s, p, d, g)
    res = activation((3, c_out, *z.shape[2:]), memory_format=CL) if residual else None
    expected = function(z + res.double() if res is not None else z)
    pack = conv_inference.pack_weight(weight, (s, s), (p, p), (d, d), g, x.shape)
    for name, impl in implementations(conv_inference.OP).items():
        y = impl(x, weight, bias, res, (s, s), (p, p), (d, d), g, False, pack, post_op)
        assert y.dtype == torch.float32 and y.is_contiguous(memory_format=CL), name
        assert_close_scaled(y, expected, 4e-6, msg=name)


@needs_onednn
def test_onednn_takes_only_channels_last_float32():
    x, w = torch.randn(2, 4, 5, 5).contiguous(memory_format=CL), torch.randn(6, 4, 3, 3)
    assert conv_onednn.unsupported_reason(x, w) is None
    assert "NCHW" in conv_onednn.unsupported_reason(x.contiguous(), w)
    assert "NCHW" in conv_onednn.unsupported_reason(torch.randn(2, 4, 1, 1), w)  # both formats: aten's NCHW
    assert "float32" in conv_onednn.unsupported_reason(x.double(), w.double())
    assert "float32" in conv_onednn.unsupported_reason(x.bfloat16(), w.bfloat16())
    with fusedres.use_backend("cpu"):
        assert "not chosen" in conv_inference.onednn_unsupported_reason(x, w)


def _blocks():
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    return [resnet.BasicBlock(8, 8), resnet.Bottleneck(8, 4, stride=2, downsample=down, groups=2, base_width=32)]


def _fused(block):
    cls = FusedBasicBlock if isinstance(block, resnet.BasicBlock) else FusedBottleneck
    return cls.from_module(copy.deepcopy(block))


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts oneDNN primitive calls and weight packs."""
    calls = {"conv": 0, "pack": 0}
    conv, pack = conv_onednn.conv_bias_act, conv_onednn.pack_weight

    def counted_conv(*args):
        calls["conv"] += 1
        return conv(*args)

    def counted_pack(*args):
        calls["pack"] += 1
        return pack(*args)

    monkeypatch.setattr(conv_onednn, "conv_bias_act", counted_conv)
    monkeypatch.setattr(conv_onednn, "pack_weight", counted_pack)
    return calls


@needs_onednn
@pytest.mark.parametrize("index", [0, 1], ids=["basic", "bottleneck_downsample"])
def test_fused_inference_runs_onednn_and_matches_stock(index, onednn_calls):
    """Eval without gradients, float32 channels_last on the CPU: every conv of the block is one
    oneDNN call (the downsample's too), the result is stock's within float32 rounding (judged
    against float64), channels_last; packs are made once per conv and input shape and reused."""
    block = randomize_bn(_blocks()[index]).eval().to(memory_format=CL)
    fused = _fused(block).eval()
    convs = sum(isinstance(m, nn.Conv2d) for m in block.modules())
    x = activation((3, 8, 9, 7), memory_format=CL)
    with torch.no_grad():
        expected = copy.deepcopy(block).double()(x.double())
        y = fused(x)
        assert onednn_calls == {"conv": convs, "pack": convs}
        assert y.is_contiguous(memory_format=CL)
        assert_close_scaled(y, expected, 2e-6)
        assert_close_scaled(block(x), expected, 2e-6)  # stock's own float32 error: the same bound
        fused(activation((3, 8, 9, 7), memory_format=CL))
        assert onednn_calls == {"conv": 2 * convs, "pack": convs}  # same shape: packs reused
        fused(activation((1, 8, 9, 7), memory_format=CL))
        assert onednn_calls == {"conv": 3 * convs, "pack": 2 * convs}  # new shape: new packs
        # a weight changed in place (bumps its version): folded and packed again
        block_conv = fused.conv1
        block_conv.weight.mul_(1.5)
        block.conv1.weight.mul_(1.5)
        assert_close_scaled(fused(x), copy.deepcopy(block).double()(x.double()), 2e-6)
        assert onednn_calls["pack"] == 2 * convs + 1


@needs_onednn
def test_packs_per_fold_are_bounded():
    weight = torch.randn(4, 3, 3, 3)
    packs = PackedWeights()
    spec = ((1, 1), (1, 1), (1, 1), 1)
    for n in range(1, 7):
        packs.get(weight, spec, torch.Size((n, 3, 5, 5)))
    assert len(packs) == PackedWeights.MAX_SHAPES


@needs_onednn
def test_oneDNN_switched_off_after_use_is_honoured(onednn_calls):
    block = _fused(randomize_bn(_blocks()[0])).eval().to(memory_format=CL)
    x = activation((2, 8, 5, 5), memory_format=CL)
    with torch.no_grad():
        expected = block(x)
        assert onednn_calls["conv"] == 2
        with torch.backends.mkldnn.flags(enabled=False):
            assert_close_scaled(block(x), expected, 2e-6)
        assert onednn_calls["conv"] == 2


@needs_onednn
def test_block_copies_and_pickles_after_packing():
    """Packs are opaque oneDNN tensors: copies and pickles of a block that has packed get none
    (packed again on first use) and compute the same."""
    import io
    import pickle

    block = _fused(randomize_bn(_blocks()[1])).eval().to(memory_format=CL)
    x = activation((2, 8, 9, 7), memory_format=CL)
    with torch.no_grad():
        expected = block(x)
        buffer = io.BytesIO()
        torch.save(block, buffer)
        for other in (copy.deepcopy(block), pickle.loads(pickle.dumps(block)),
                      torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
            torch.testing.assert_close(other(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["nchw", "float64"])
def test_fused_inference_without_onednn_keeps_aten(case, onednn_calls):
    """NCHW (oneDNN's fused conv writes channels_last) and float64 take aten's conv + one
    epilogue pass, with stock's output format."""
    block = randomize_bn(_blocks()[1]).eval()
    x = activation((2, 8, 9, 7))
    if case == "float64":
        block, x = block.double().to(memory_format=CL), x.double().contiguous(memory_format=CL)
    fused = _fused(block).eval()
    with torch.no_grad():
        y = fused(x)
        expected = block(x)
    assert onednn_calls["conv"] == 0
    assert y.stride() == expected.stride()
    assert_close_scaled(y, expected, 2e-6 if case == "nchw" else 1e-12)


# ---------------------------------------------------------------------------------------------
# Training: the measured choice between the fused units and the stock forward.
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def measure(monkeypatch):
    monkeypatch.setenv("FUSEDRES_CPU_TRAIN_PATH", "measure")
    monkeypatch.setattr(block_plumbing, "_train_choices", {})


@pytest.mark.parametrize("slower", ["fused", "stock"])
def test_measured_choice_takes_the_faster_and_leaves_no_trace(measure, monkeypatch, slower):
    """The slower path (made slower here on a fake clock) is not chosen; measuring leaves the
    running statistics, num_batches_tracked and every .grad as they were; the forward that
    measured gives the chosen path's result and counts one batch, as stock does."""
    clock = [0.0]

    class FakeTime:
        @staticmethod
        def perf_counter():
            clock[0] += 1e-3
            return clock[0]

    monkeypatch.setattr(block_plumbing, "time", FakeTime)
    block = randomize_bn(_blocks()[1]).train().to(memory_format=CL)
    fused = _fused(block).train()
    original = {"fused": fused._core_forward, "stock": fused._reference_forward}

    def slowed(name):
        def run(x, *args):
            if name == slower:
                clock[0] += 1.0
            return original[name](x, *args)
        return run

    monkeypatch.setattr(fused, "_core_forward", slowed("fused"))
    monkeypatch.setattr(fused, "_reference_forward", slowed("stock"))
    x = activation((2, 8, 9, 7), memory_format=CL).requires_grad_()
    y = fused(x)
    expected = block(x)
    chosen = [c for c in block_plumbing.train_choices().values()]
    assert len(chosen) == 1 and chosen[0].path != slower, chosen
    assert chosen[0].fused_ms is not None and chosen[0].stock_ms is not None
    assert_close_scaled(y, expected, 2e-5)
    for (n, a), b in zip(fused.named_buffers(), block.buffers()):
        assert_close_scaled(a.double(), b.double(), 1e-6, msg=n)  # one batch counted, not five
    assert all(p.grad is None for p in fused.parameters())
    fused(x)
    assert len(block_plumbing.train_choices()) == 1  # chosen once per shape


def test_measured_choice_is_per_shape_and_never_while_forced(measure, monkeypatch):
    block = _fused(_blocks()[0]).train().to(memory_format=CL)
    block(activation((2, 8, 5, 5), memory_format=CL))
    block(activation((2, 8, 5, 5), memory_format=CL))
    block(activation((3, 8, 5, 5), memory_format=CL))
    block(activation((3, 8, 5, 5)))  # NCHW: another choice
    assert len(block_plumbing.train_choices()) == 3
    for forced, runs in (("fused", "_core_forward"), ("stock", "_reference_forward")):
        monkeypatch.setenv("FUSEDRES_CPU_TRAIN_PATH", forced)
        ran = []
        monkeypatch.setattr(block, runs, lambda x, *a, ran=ran, f=getattr(block, runs): ran.append(1) or f(x, *a))
        block(activation((4, 8, 5, 5), memory_format=CL))
        assert ran == [1], forced
    assert len(block_plumbing.train_choices()) == 3
    monkeypatch.setenv("FUSEDRES_CPU_TRAIN_PATH", "measure")
    ran = []
    monkeypatch.setattr(block, "_core_forward", lambda x, *a, f=block._core_forward: ran.append(1) or f(x, *a))
    torch.use_deterministic_algorithms(True)
    try:
        block(activation((5, 8, 5, 5), memory_format=CL))  # deterministic: the fused units, not measured
    finally:
        torch.use_deterministic_algorithms(False)
    assert ran == [1] and len(block_plumbing.train_choices()) == 3
    monkeypatch.setenv("FUSEDRES_CPU_TRAIN_PATH", "fastest")
    with pytest.raises(ValueError, match="FUSEDRES_CPU_TRAIN_PATH"):
        block(activation((4, 8, 5, 5), memory_format=CL))


def test_measured_path_trains_like_stock(measure):
    """Three SGD steps under the measured choice: outputs, gradients and running statistics as
    stock's (whichever path each block took)."""
    torch.manual_seed(0)
    from helpers import SmallResNet

    stock = randomize_bn(SmallResNet(classes=5)).to(memory_format=CL)
    fused = fusedres.fuse(stock)
    opt_s, opt_f = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (stock, fused))
    for step in range(3):
        x = activation((4, 3, 9, 9), memory_format=CL)
        ys, yf = stock(x), fused(x)
        assert_close_scaled(yf, ys, 2e-5, msg=f"step {step}")
        ys.square().sum().backward(), yf.square().sum().backward()
        for (n, a), b in zip(fused.named_parameters(), stock.parameters()):
            assert_close_scaled(a.grad, b.grad, 2e-4, msg=f"step {step} {n}")
        opt_s.step(), opt_f.step(), opt_s.zero_grad(), opt_f.zero_grad()
    for (n, a), b in zip(fused.named_buffers(), stock.buffers()):
        assert_close_scaled(a.double(), b.double(), 2e-5, msg=n)
    assert len(block_plumbing.train_choices()) == 3  # the stem's unit and the two blocks, one shape each


def test_traced_cpu_graph_has_no_opaque_ops():
    """Under torch.compile on the CPU the fused blocks hand inductor the stock forward's plain
    aten ops, in training and in eval (inductor fuses BatchNorm, add and ReLU itself; a fold in
    the graph would rewrite every weight on every call)."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    block = _fused(randomize_bn(_blocks()[1])).to(memory_format=CL)
    x = activation((2, 8, 9, 7), memory_format=CL)
    for mode in ("train", "eval"):
        block.train(mode == "train")
        backend = EagerAndRecordGraphs()
        torch._dynamo.reset()
        with torch.no_grad() if mode == "eval" else torch.enable_grad():
            torch.compile(block, backend=backend, fullgraph=True)(x)
        code = "\n".join(g.code for g in backend.graphs)
        assert "torch.ops.fusedres" not in code, mode
        assert code.count("batch_norm(") == 4, mode  # the block's three and the downsample's


def test_measuring_inside_a_checkpoint_returns(measure):
    """Under torch.utils.checkpoint (non-reentrant), measuring's backward must not recompute the
    block through the checkpoint's hooks (that re-entered the choice and deadlocked)."""
    import threading

    from torch.utils.checkpoint import checkpoint

    stock = randomize_bn(_blocks()[1]).train().to(memory_format=CL)
    fused = _fused(stock).train()
    x = activation((2, 8, 9, 7), memory_format=CL).requires_grad_()
    result = {}

    def run():
        y = checkpoint(fused, x, use_reentrant=False)
        y.sum().backward()
        result["y"] = y

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "measuring under checkpoint did not return"
    assert_close_scaled(result["y"], stock(x.detach()), 2e-5)


def test_hooks_take_the_stock_forward_unmeasured(measure):
    """Hooks on a child would fire during measuring (and on the stock path only): the block takes
    its stock forward, which calls them, without measuring."""
    block = _fused(_blocks()[0]).train().to(memory_format=CL)
    fired = []
    block.bn1.register_forward_hook(lambda *a: fired.append(1))
    block(activation((2, 8, 5, 5), memory_format=CL).requires_grad_())
    (choice,) = block_plumbing.train_choices().values()
    assert choice.path == "stock" and choice.fused_ms is None and "hooks" in choice.why
    assert fired == [1]


def test_measurements_per_structure_are_capped(measure, monkeypatch):
    monkeypatch.setattr(block_plumbing, "_measured_per_structure", {})
    monkeypatch.setattr(block_plumbing, "MAX_MEASURED_SHAPES", 2)
    block = _fused(_blocks()[0]).train().to(memory_format=CL)
    for n in (1, 2, 3, 4):
        block(activation((n, 8, 5, 5), memory_format=CL))
    measured = [c for c in block_plumbing.train_choices().values() if c.fused_ms is not None]
    reused = [c for c in block_plumbing.train_choices().values() if c.why.startswith("reused")]
    assert len(measured) == 2 and len(reused) == 2


def test_forced_stock_runs_the_original_blocks_and_trains_like_stock(monkeypatch):
    """FUSEDRES_CPU_TRAIN_PATH=stock: a fuse()d model's blocks run their original forward
    (FusedResidual._stock_forward), with stock's outputs, gradients and running statistics."""
    from helpers import SmallResNet

    from fusedres.modules import FusedResidual

    monkeypatch.setenv("FUSEDRES_CPU_TRAIN_PATH", "stock")
    stock = randomize_bn(SmallResNet(classes=5)).to(memory_format=CL)
    fused = fusedres.fuse(stock)
    ran = []
    original = FusedResidual._stock_forward
    monkeypatch.setattr(FusedResidual, "_stock_forward", lambda self, x: ran.append(1) or original(self, x))
    opt_s, opt_f = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (stock, fused))
    for step in range(2):
        x = activation((4, 3, 9, 9), memory_format=CL)
        ys, yf = stock(x), fused(x)
        torch.testing.assert_close(yf, ys, rtol=0, atol=0)
        ys.square().sum().backward(), yf.square().sum().backward()
        for (n, a), b in zip(fused.named_parameters(), stock.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=n)
        opt_s.step(), opt_f.step(), opt_s.zero_grad(), opt_f.zero_grad()
    # two blocks on both steps, and the stem's unit view on the first: on the second its remembered
    # choice runs the original forward straight away (FusedUnits._remembered_stock)
    assert len(ran) == 5
    views = [m for m in fused.modules() if isinstance(m, fusedres.FusedSequential)]
    assert views and all(v._views()[0].__dict__.get("_fusedres_stock_memo") for v in views)
    for (n, a), b in zip(fused.named_buffers(), stock.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
