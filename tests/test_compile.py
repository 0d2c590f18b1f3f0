"""torch.library registration: every op passes torch.library.opcheck; fused models compile with no
graph break and give eager's results (training and eval); fused models export in eval."""
import copy

import pytest
import torch

import fusedres
from fusedres.models import densenet
from helpers import BACKEND_CASES, SmallResNet, assert_close_scaled, randomize_bn

# Backends the ops and models are compiled over here: the C++ CPU kernels, and the Triton kernels
# under the interpreter where there is no GPU (on a GPU: the CUDA and Triton kernels).
COMPILE_CASES = [c for c in BACKEND_CASES if c.values[1] != "reference"]


def _x(shape, fmt=torch.contiguous_format, device="cpu", dtype=torch.float32, mean=0.5):
    return (torch.randn(shape, dtype=dtype, device=device) + mean).contiguous(memory_format=fmt)


def _vec(c, device, lo=0.5):
    return torch.rand(c, device=device) + lo


def _op_samples(device):
    """(op, args) covering each op's optional inputs, both memory formats and an odd channel count."""
    samples = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = _x((2, 5, 3, 4), fmt, device)
        c = x.shape[1]
        mean, scale, shift = x.mean((0, 2, 3)), _vec(c, device), _vec(c, device, -0.5)
        samples += [
            ("bn_stats", (x, 1e-5, None, None, 0.1)),
            ("bn_stats", (x, 1e-5, torch.zeros(c, device=device), torch.ones(c, device=device), 0.1)),
            ("bn_act_forward", (x, mean, scale, shift, None, 1, 0.0)),
            ("bn_act_forward", (x, None, None, shift, _x(x.shape, fmt, device), 0, 0.0)),
            ("bn_act_forward", (x, mean, scale, shift, None, 5, 0.2)),  # LeakyReLU, its slope
            ("bn_act_backward_reduce", (_x(x.shape, fmt, device), x, mean, scale, shift, None, 1, 0.0, False)),
            ("bn_act_backward_reduce", (_x(x.shape, fmt, device), x, mean, scale, shift, _x(x.shape, fmt, device),
                                        1, 0.0, True)),
            ("bn_act_backward_reduce", (_x(x.shape, fmt, device), x, mean, scale, shift, None, 3, 0.0, True)),
            ("bn_act_backward_elementwise", (_x(x.shape, fmt, device), x, mean, scale, shift, _vec(c, device),
                                             _vec(c, device), 1, 0.0)),
            ("bn_act_backward_elementwise", (_x(x.shape, fmt, device), x, mean, scale, shift, _vec(c, device),
                                             _vec(c, device), 6, 0.0)),
        ]
        w = _x((6, 5, 3, 3), torch.contiguous_format, device, mean=0.0) * 0.3
        geo = ([2, 1], [1, 1], [1, 1], 1)
        y_shape = (2, 6, 2, 4)
        samples += [
            ("conv2d_forward", (x, w, _vec(6, device), *geo, None, None, None, 0, 0.0, None, 0, 0.0, True, None)),
            ("conv2d_forward", (x, w, None, *geo, mean, scale, shift, 1, 0.0, _x(y_shape, fmt, device), 1, 0.0,
                                True, None)),
            ("conv2d_forward", (x, w, None, *geo, mean, scale, shift, 3, 0.0, None, 4, 0.0, True,
                                torch.empty(y_shape, device=device).contiguous(memory_format=fmt))),
            ("conv2d_input_grad", (_x(y_shape, fmt, device), w, x, *geo, None, None, None, 0, 0.0, None, None)),
            ("conv2d_input_grad", (_x(y_shape, fmt, device), w, x, *geo, mean, scale, shift, 1, 0.0, None, None)),
            ("conv2d_input_grad", (_x(y_shape, fmt, device), w, x, *geo, mean, scale, shift, 2, 0.0,
                                   _x(x.shape, fmt, device), scale)),
            ("conv2d_weight_grad", (_x(y_shape, fmt, device), x, w, *geo, None, None, None, 0, 0.0)),
            ("conv2d_weight_grad", (_x(y_shape, fmt, device), x, w, *geo, mean, scale, shift, 1, 0.0)),
            ("conv2d_weight_grad", (_x(y_shape, fmt, device), x, w, *geo, mean, scale, shift, 5, 0.1)),
        ]
    return samples


ALL_OPS = ("bn_stats", "bn_act_forward", "bn_act_backward_reduce", "bn_act_backward_elementwise",
           "conv2d_forward", "conv2d_input_grad", "conv2d_weight_grad")


def test_every_op_is_a_registered_custom_op():
    for op in ALL_OPS:
        assert hasattr(torch.ops.fusedres, op), op
        packet = getattr(torch.ops.fusedres, op)
        assert packet.default._schema.name == f"fusedres::{op}"
    assert {op for op, _ in _op_samples("cpu")} == set(ALL_OPS), "every op has opcheck samples"


@pytest.mark.parametrize("device,name", BACKEND_CASES)
def test_opcheck_every_op(device, name):
    """Schema (mutations declared), fake implementations (shapes, dtypes, strides against the real
    kernels), and tracing through AOT dispatch with dynamic shapes, on every backend that implements
    the op. The conv ops have no C++ kernels (fusedres/ops/conv.py): on the cpu and cuda backends
    they would run the reference, which the reference case checks (and strict mode forbids)."""
    with fusedres.use_backend(name):
        for op, args in _op_samples(device):
            if name in ("cpu", "cuda") and op in fusedres.ops.CONV_OPS:
                continue
            torch.library.opcheck(getattr(torch.ops.fusedres, op), args)


@pytest.mark.parametrize("device,name", [c for c in BACKEND_CASES if c.values[1] in ("cpu", "cuda")])
def test_opcheck_extension_ops(device, name):
    """The extension's own ops (torch.ops.fusedres_kernels.*) have fakes too."""
    assert fusedres.extension_loaded()
    for op, args in _op_samples(device):
        if op.startswith("bn_"):
            torch.library.opcheck(getattr(torch.ops.fusedres_kernels, op), args)


def _tiny_densenet():
    return densenet.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=5)


def _graph_units_net():
    from test_graph_units import Net  # timm-style blocks: FusedGraph, joins, tails, BN -> ReLU alone

    return Net()


MODELS = {"resnet": lambda: SmallResNet(classes=5), "densenet": _tiny_densenet, "graph": _graph_units_net}
# input size: the graph model's stem and max-pool leave a 5x5 input 2x2 maps, whose batch-statistics
# BatchNorms amplify float32 rounding past the tolerance after one SGD step
SIZE = {"resnet": 5, "densenet": 5, "graph": 12}


def _fused_pair(arch, fmt):
    torch.manual_seed(0)
    model = fusedres.fuse(MODELS[arch]()).to(memory_format=fmt)
    randomize_bn(model)
    report = fusedres.fuse_report(model)
    assert report.swapped and not report.left, report
    return model, copy.deepcopy(model)


def _graph_breaks(model, x):
    explained = torch._dynamo.explain(model)(x)
    return explained.graph_break_count, [b.reason for b in explained.break_reasons]


FORMATS = [pytest.param(torch.contiguous_format, id="nchw"), pytest.param(torch.channels_last, id="channels_last")]


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("device,name", COMPILE_CASES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_compiled_training_matches_eager_with_no_graph_break(arch, device, name, fmt):
    """Two SGD steps, eager and torch.compile(fullgraph=True): same outputs, input and parameter
    gradients, running statistics; and torch._dynamo.explain finds no graph break. (Equal to
    float32 rounding, not bitwise: in a compiled graph a DenseNet transition takes its input's
    statistics again instead of reusing the dense block's record.)"""
    eager, compiled_model = _fused_pair(arch, fmt)
    eager, compiled_model = eager.to(device), compiled_model.to(device)
    x = _x((3, 3, SIZE[arch], SIZE[arch]), fmt, device)
    with fusedres.use_backend(name):
        breaks, reasons = _graph_breaks(copy.deepcopy(eager), x)
        assert breaks == 0, reasons
        compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
        opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
        opt_c = torch.optim.SGD(compiled_model.parameters(), lr=0.1)
        for step in range(2):
            xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
            ye, yc = eager(xe), compiled(xc)
            assert_close_scaled(yc, ye, 1e-5, msg=f"step {step} output")
            (ye * torch.linspace(-1, 1, ye.numel(), device=device).view_as(ye)).sum().backward()
            (yc * torch.linspace(-1, 1, yc.numel(), device=device).view_as(yc)).sum().backward()
            assert_close_scaled(xc.grad, xe.grad, 2e-4, msg=f"step {step} input grad")
            scale = max(p.grad.abs().max().item() for p in eager.parameters())
            for (n, pe), pc in zip(eager.named_parameters(), compiled_model.parameters()):
                if pe.grad.abs().max() < 1e-6 * scale:
                    # zero in exact arithmetic (a BatchNorm bias whose shift the next batch-statistics
                    # BatchNorm removes: the graph model's projections), rounding noise in both runs
                    assert pc.grad.abs().max() <= 1e-5 * scale, f"step {step} {n}.grad"
                else:
                    assert_close_scaled(pc.grad, pe.grad, 2e-4, msg=f"step {step} {n}.grad")
            opt_e.step(), opt_c.step()
            opt_e.zero_grad(), opt_c.zero_grad()
        for (n, be), bc in zip(eager.named_buffers(), compiled_model.buffers()):
            assert_close_scaled(bc.double(), be.double(), 1e-5, msg=n)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("device,name", COMPILE_CASES)
def test_compiled_eval_matches_eager_with_no_graph_break(arch, device, name):
    eager, _ = _fused_pair(arch, torch.channels_last)
    eager = eager.to(device).eval()
    x = _x((2, 3, 5, 5), torch.channels_last, device)
    with fusedres.use_backend(name), torch.no_grad():
        breaks, reasons = _graph_breaks(eager, x)
        assert breaks == 0, reasons
        compiled = torch.compile(eager, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,name", [c for c in COMPILE_CASES if c.values[1] in ("cpu", "cuda")])
def test_inductor_compiles_a_fused_resnet(device, name):
    """The default backend (inductor) too: the fused ops (triton) stay opaque calls inside its
    graph; on aten's conv (cpu, cuda) the blocks hand it the stock ops."""
    eager, compiled_model = _fused_pair("resnet", torch.channels_last)
    eager, compiled_model = eager.to(device), compiled_model.to(device)
    x = _x((2, 3, 5, 5), torch.channels_last, device)
    with fusedres.use_backend(name):
        compiled = torch.compile(compiled_model, fullgraph=True)
        ye, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-4)
        ye.sum().backward(), yc.sum().backward()
        for (n, pe), pc in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-4, msg=n)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("device,name", COMPILE_CASES)
def test_export_in_eval(arch, device, name):
    """torch.export.export of a fused model in eval gives the eager model's output. Where the
    fused conv kernels run (triton), the program holds them as fusedres ops; on aten's conv the
    residual blocks are plain aten ops (the stock forward, which a compiler fuses itself);
    DenseNet keeps its BN + ReLU ops."""
    model, _ = _fused_pair(arch, torch.channels_last)
    model = model.to(device).eval()
    x = _x((2, 3, 5, 5), torch.channels_last, device)
    with fusedres.use_backend(name), torch.no_grad():
        exported = torch.export.export(model, (x,))
        code = exported.graph_module.code
        if arch in ("resnet", "graph") and name != "triton":  # (the conv ops: triton and reference backends only)
            assert "torch.ops.fusedres." not in code
        else:
            assert "torch.ops.fusedres." in code
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)
        other = _x((2, 3, 5, 5), torch.channels_last, device, mean=-1.0)
        torch.testing.assert_close(exported.module()(other), model(other), rtol=1e-5, atol=1e-5)
