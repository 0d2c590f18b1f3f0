"""Property-based tests: ops and fused blocks against the reference over random shapes, strides,
groups, dtypes and memory formats (hypothesis). The budget is fixed by FUSEDRES_PROPERTY_EXAMPLES
(default 25 per property here; benchmarks/gpu_check.sh runs 200 on the GPU). Where hypothesis is
not installed (an offline GPU machine), the same properties run over as many seeded random draws."""
import copy
import os
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedres
from fusedres import ops
from fusedres.models import resnet
from helpers import BACKEND_CASES, HAS_CUDA, INTERPRETED, TOLERANCE, assert_close_scaled, randomize_bn

try:
    import hypothesis
    from hypothesis import strategies as st
except ImportError:  # the fallback below draws the same spaces with random.Random
    hypothesis = None

EXAMPLES = int(os.environ.get("FUSEDRES_PROPERTY_EXAMPLES", "25"))
DEVICE = "cuda" if HAS_CUDA else "cpu"
# backends that run on this machine's device, the reference excluded (it is what they are checked against)
BACKENDS = [c.values[1] for c in BACKEND_CASES if c.values[0] == DEVICE and c.values[1] != "reference"]
FORMATS = (torch.contiguous_format, torch.channels_last)
TOL = TOLERANCE["property"]


class _HypothesisDraw:
    def __init__(self, data):
        self.data = data

    def integer(self, lo, hi):
        return self.data.draw(st.integers(lo, hi))

    def choice(self, options):
        return self.data.draw(st.sampled_from(list(options)))


class _RandomDraw:
    def __init__(self, seed):
        self.rng = random.Random(seed)

    def integer(self, lo, hi):
        return self.rng.randint(lo, hi)

    def choice(self, options):
        return self.rng.choice(list(options))


def _property(check):
    """A test running check(draw) over EXAMPLES examples."""
    if hypothesis is not None:
        @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(st.data())
        def test(data):
            check(_HypothesisDraw(data))
    else:
        @pytest.mark.parametrize("seed", range(EXAMPLES))
        def test(seed):
            check(_RandomDraw(seed))
    test.__doc__ = check.__doc__
    return test


def _dtypes(matmul):
    """Dtypes to draw: every one, except bfloat16 matmuls under the Triton interpreter (they return
    garbage there, not on GPUs). float64 on CUDA too: the kernels run it, and the modules' decision
    to leave it to aten (kernel_unsupported_reason) is checked."""
    if DEVICE != "cuda" and matmul:
        return (torch.float64, torch.float32, torch.float16)
    return tuple(TOL)


def _activation(draw, shape, dtype, with_format=False):
    """Non-zero mean; dense in either format, or a non-dense view (a channel slice of a wider tensor).
    with_format: (x, the drawn memory format)."""
    fmt = draw.choice(FORMATS)
    layout = draw.choice(("dense", "channel-slice"))
    n, c, h, w = shape
    extra = 3 if layout == "channel-slice" else 0
    base = (torch.randn(n, c + extra, h, w, device=DEVICE, dtype=torch.float64) * 1.5 + 0.7).to(dtype)
    x = base.contiguous(memory_format=fmt)[:, extra:]
    return (x, fmt) if with_format else x


def _expected_unsupported(x, fmt, dtype, weight):
    """What ops.kernel_unsupported_reason must answer under the triton backend for x (drawn in
    `fmt`) and `weight` of x's dtype: None on the CPU (the interpreter takes every conv); on CUDA
    the fused conv kernels take channels_last input only (a single pixel is either; an input that
    is also NCHW-contiguous, e.g. one channel, counts as NCHW), no float64, no depthwise conv and
    no ungrouped conv whose input pixel is not whole 16-byte vectors (those go to cuDNN)."""
    if DEVICE != "cuda":
        return None
    if dtype == torch.float64:
        return "float64 convolutions run in aten on CUDA"
    nchw = fmt == torch.contiguous_format or x.is_contiguous()
    if nchw and x.shape[2] * x.shape[3] > 1:
        return "NCHW input: the fused conv kernels are channels_last implicit GEMMs (use channels_last)"
    cin, cin_per_group, cout = x.shape[1], weight.shape[1], weight.shape[0]
    if cin_per_group == 1 and cout > 1 and cin > 1:
        return "depthwise conv: cuDNN's depthwise kernels, then the fused BatchNorm ops"
    if cin_per_group == cin and (cin * x.element_size()) % 16 != 0:
        return f"{cin} input channels ({cin * x.element_size()} bytes per pixel, not a multiple of 16): cuDNN's conv"
    return None


def _bn_ops(draw):
    """bn_stats and bn_act_forward (+ residual, ReLU) on any backend equal the float64 reference."""
    shape = (draw.integer(1, 3), draw.integer(1, 13), draw.integer(1, 7), draw.integer(1, 7))
    if shape[0] * shape[2] * shape[3] < 2:
        shape = (2,) + shape[1:]
    dtype = draw.choice(_dtypes(matmul=False))
    x = _activation(draw, shape, dtype)
    residual = _activation(draw, shape, dtype) if draw.choice((True, False)) else None
    relu = draw.choice((True, False))
    c = shape[1]
    scale = torch.rand(c, device=DEVICE, dtype=torch.float64) + 0.5
    shift = torch.randn(c, device=DEVICE, dtype=torch.float64)
    x64 = x.double()
    var, mean = torch.var_mean(x64, (0, 2, 3), unbiased=False)
    expected = (x64 - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    if residual is not None:
        expected = expected + residual.double()
    if relu:
        expected = torch.relu(expected)
    with fusedres.use_backend(draw.choice(BACKENDS)):
        got_mean, got_invstd = ops.bn_stats(x, eps=1e-5)
        y = ops.bn_act_forward(x, mean, scale, shift, residual, relu)
    tol = TOL[dtype] if dtype != torch.float32 else 1e-5
    assert_close_scaled(got_mean, mean, max(tol, 1e-6), msg=f"mean {shape} {dtype}")
    assert_close_scaled(got_invstd, (var + 1e-5).rsqrt(), max(tol, 1e-5) * 10, msg=f"invstd {shape} {dtype}")
    assert y.dtype == dtype and y.shape == x.shape
    assert_close_scaled(y, expected, TOL[dtype], msg=f"bn_act {shape} {dtype}")


def _conv(draw):
    """conv2d_forward (prologue BN + ReLU, bias, residual, ReLU, statistics) on the fused conv
    kernels equals the reference, over kernel sizes, strides, padding, dilation and groups."""
    groups = draw.choice((1, 1, 2, 3))
    cin = groups * draw.integer(1, 5)
    cout = groups * draw.integer(1, 5)
    k = draw.choice((1, 3))
    stride, padding, dilation = draw.choice((1, 2)), draw.integer(0, k // 2 + 1), draw.choice((1, 2))
    h, w = draw.integer(1, 7), draw.integer(1, 7)
    if (h + 2 * padding - dilation * (k - 1) - 1) < 0 or (w + 2 * padding - dilation * (k - 1) - 1) < 0:
        padding = dilation * (k - 1)
    dtype = draw.choice(_dtypes(matmul=True))
    x, x_format = _activation(draw, (draw.integer(1, 3), cin, h, w), dtype, with_format=True)
    weight = (torch.randn(cout, cin // groups, k, k, device=DEVICE) * 0.4).to(dtype)
    bias = torch.randn(cout, device=DEVICE).to(dtype) if draw.choice((True, False)) else None
    pro = {}
    if draw.choice((True, False)):
        pro = dict(in_mean=torch.randn(cin, device=DEVICE) * 0.3, in_scale=torch.rand(cin, device=DEVICE) + 0.5,
                   in_shift=torch.randn(cin, device=DEVICE) * 0.3, in_act=draw.choice((True, False)))
    relu = draw.choice((True, False))
    geo = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    a = x.double()
    if pro:
        a = (a - pro["in_mean"].double().view(1, -1, 1, 1)) * pro["in_scale"].double().view(1, -1, 1, 1) \
            + pro["in_shift"].double().view(1, -1, 1, 1)
        a = (torch.relu(a) if pro["in_act"] else a).to(dtype).double()  # the kernels round it as they load it
    z = F.conv2d(a, weight.double(), None if bias is None else bias.double(), **geo)
    residual = _activation(draw, tuple(z.shape), dtype) if draw.choice((True, False)) else None
    expected = z + (residual.double() if residual is not None else 0)
    expected = torch.relu(expected) if relu else expected
    with fusedres.use_backend("triton"):
        assert ops.kernel_unsupported_reason(x, weight) == _expected_unsupported(x, x_format, dtype, weight)
        y, moments = ops.conv2d_forward(x, weight, bias, **geo, **pro, residual=residual, act=relu, stats=True)
    msg = f"{tuple(x.shape)} w{tuple(weight.shape)} {geo} {dtype} pro={bool(pro)} res={residual is not None}"
    assert y.shape == expected.shape and y.dtype == dtype, msg
    assert_close_scaled(y, expected, TOL[dtype] * 2, msg=msg)
    var, mean = torch.var_mean(z, (0, 2, 3), unbiased=False)
    assert_close_scaled(moments.mean, mean, TOL[dtype] * 2, msg="mean " + msg)


def _block(draw):
    """A fused BasicBlock / Bottleneck (groups, stride, downsample) equals the stock block in
    training (output, input and parameter gradients, running statistics) and in eval."""
    kind = draw.choice(("basic", "bottleneck"))
    inplanes = draw.integer(1, 9)
    stride = draw.choice((1, 2))
    torch.manual_seed(draw.integer(0, 2 ** 16))
    if kind == "basic":
        planes = draw.integer(1, 9)
        out = planes
        block_cls, kwargs = resnet.BasicBlock, {}
    else:
        groups = draw.choice((1, 2))
        planes = draw.integer(1, 4)
        out = planes * 4
        block_cls, kwargs = resnet.Bottleneck, dict(groups=groups, base_width=draw.choice((64, 96)))
    down = None
    if stride != 1 or inplanes != out:
        down = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
    ref = randomize_bn(block_cls(inplanes, planes, stride=stride, downsample=down, **kwargs)).to(DEVICE)
    fmt = draw.choice(FORMATS)
    ref = ref.to(memory_format=fmt)
    fused = fusedres.fuse(copy.deepcopy(ref))
    h, w = draw.integer(1, 6), draw.integer(1, 6)
    n = draw.integer(1, 3) if h * w > 1 else draw.integer(2, 3)
    if n * ((h - 1) // stride + 1) * ((w - 1) // stride + 1) < 2:
        n = 2
    x = (torch.randn(n, inplanes, h, w, device=DEVICE) + 0.5).contiguous(memory_format=fmt)
    backend = draw.choice(BACKENDS)
    exact = copy.deepcopy(ref).double()
    xr, xf, x64 = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    with fusedres.use_backend(backend):
        yr, yf, y64 = ref(xr), fused(xf), exact(x64)
        g = torch.randn_like(yr)
        yr.backward(g), yf.backward(g), y64.backward(g.double())
    msg = f"{kind} in={inplanes} planes={planes} stride={stride} {kwargs} x={tuple(x.shape)} {fmt} {backend}"
    _as_accurate(yf, yr, y64, "output " + msg)
    # a gradient's rounding is relative to the terms it sums, bounded by the upstream gradient's 1-norm
    floor = 1e-6 * g.abs().sum().item()
    _as_accurate(xf.grad, xr.grad, x64.grad, "input grad " + msg, floor)
    for (name, pr), pf, p64 in zip(ref.named_parameters(), fused.parameters(), exact.parameters()):
        _as_accurate(pf.grad, pr.grad, p64.grad, f"{name}.grad {msg}", floor)
    for (name, br), bf, b64 in zip(ref.named_buffers(), fused.buffers(), exact.buffers()):
        _as_accurate(bf, br, b64, f"{name} {msg}")
    ref.eval(), fused.eval(), exact.eval()
    with fusedres.use_backend(backend), torch.no_grad():
        _as_accurate(fused(x), ref(x), exact(x.double()), "eval " + msg)


def _as_accurate(fused, stock, exact, msg, floor=0.0):
    """The fused result is as close to the float64 result as the stock float32 block's is (within
    4x, plus 1e-5 of the largest value, plus `floor`): small batches make BatchNorm's gradients
    ill-conditioned, and then both are off by rounding of the same order."""
    exact = exact.double()
    err_fused = (fused.double() - exact).abs().max().item() if exact.numel() else 0.0
    err_stock = (stock.double() - exact).abs().max().item() if exact.numel() else 0.0
    scale = exact.abs().max().item() if exact.numel() else 0.0
    assert err_fused <= 4 * err_stock + 1e-5 * scale + floor + 1e-9, (
        f"{msg}: fused error {err_fused:.3g} vs stock {err_stock:.3g} (max |value| {scale:.3g})")


test_bn_ops_property = _property(_bn_ops)
test_block_property = _property(_block)
# (a skip with its reason, not a missing test, where the Triton kernels cannot run)
test_conv_property = pytest.mark.skipif(DEVICE != "cuda" and not INTERPRETED,
                                        reason="the fused conv kernels need a GPU or TRITON_INTERPRET=1")(
    _property(_conv))
