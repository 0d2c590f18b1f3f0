"""bn_act forward / backward-reduce / backward-elementwise: every backend against float64."""
import itertools

import pytest
import torch

import torch.nn.functional as F

from fusedres import ops
from fusedres.common import ACTIVATIONS, Activation
from fusedres.ops.bn_act import (bn_act_backward_elementwise_reference, bn_act_backward_reduce_reference,
                                 bn_act_forward_reference)
from helpers import (BACKEND_CASES, DTYPES, FAST_BACKENDS, FORMATS, activation, assert_close, backend, both_cpu_builds,
                     same_format)

SHAPES = [(2, 5, 7, 9), (3, 13, 1, 1), (1, 3, 5, 5), (2, 70, 4, 3)]


cpu_isa = both_cpu_builds  # every test twice: the C++ CPU kernels' AVX2 build and the baseline one
VARIANTS = list(itertools.product([True, False], [True, False], [True, False]))  # (normalize, residual, relu)


def _channel_params(c, device):
    mean = torch.randn(c, device=device) + 0.5
    scale = torch.rand(c, device=device) + 0.5
    shift = torch.randn(c, device=device)
    return mean, scale, shift


@pytest.mark.parametrize("device,name", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("normalize,with_residual,relu", VARIANTS)
def test_forward(device, name, dtype, shape, fmt, normalize, with_residual, relu):
    x = activation(shape, dtype, device, fmt)
    mean, scale, shift = _channel_params(shape[1], device)
    if not normalize:  # the folded-conv epilogue: act(x + bias + residual)
        mean = scale = None
    residual = activation(shape, dtype, device, fmt) if with_residual else None
    with backend(name, device):
        y = ops.bn_act_forward(x, mean, scale, shift, residual, relu)
    expected = bn_act_forward_reference(x.double(), None if mean is None else mean.double(),
                                        None if scale is None else scale.double(), shift.double(),
                                        None if residual is None else residual.double(), relu)
    assert y.dtype == dtype and same_format(y, x)
    assert_close(y, expected, dtype)


@pytest.mark.parametrize("device,name", BACKEND_CASES)
def test_forward_mixed_residual_dtype_and_format(device, name):
    """An fp32 NCHW residual into a bf16 channels_last activation (autocast's first block)."""
    x = activation((2, 6, 5, 5), torch.bfloat16, device, torch.channels_last)
    residual = activation((2, 6, 5, 5), torch.float32, device)
    mean, scale, shift = _channel_params(6, device)
    with backend(name, device):
        y = ops.bn_act_forward(x, mean, scale, shift, residual, True)
    expected = bn_act_forward_reference(x.double(), mean.double(), scale.double(), shift.double(),
                                        residual.to(torch.bfloat16).double(), True)
    assert y.dtype == torch.bfloat16 and same_format(y, x)
    assert_close(y, expected, torch.bfloat16)


@pytest.mark.parametrize("device,name", BACKEND_CASES)
def test_forward_propagates_nan_and_inf(device, name):
    x = activation((2, 3, 4, 4), torch.float32, device)
    x[0, 1, 2, 2] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    x[1, 0, 3, 3] = -float("inf")
    mean, scale, shift = _channel_params(3, device)
    with backend(name, device):
        y = ops.bn_act_forward(x, mean, scale, shift, None, True)
    expected = torch.relu((x - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    torch.testing.assert_close(y, expected, equal_nan=True)
    assert torch.isnan(y[0, 1, 2, 2]) and torch.isinf(y[1, 2, 0, 0]) and y[1, 0, 3, 3] == 0


@pytest.mark.parametrize("device,name", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("mask_from", ["none", "input", "output"])
def test_backward_reduce(device, name, dtype, shape, fmt, mask_from):
    x = activation(shape, dtype, device, fmt)
    grad = activation(shape, dtype, device, fmt)
    mean, scale, shift = _channel_params(shape[1], device)
    relu = mask_from != "none"
    output = None
    if mask_from == "output":  # the residual unit: the mask comes from the saved output
        residual = activation(shape, dtype, device, fmt)
        output = bn_act_forward_reference(x, mean, scale, shift, residual, True)
    with backend(name, device):
        sum_dz, sum_dz_xmu, grad_z = ops.bn_act_backward_reduce(grad, x, mean, scale, shift, output, relu,
                                                                write_grad_z=relu)
    ref = bn_act_backward_reduce_reference(grad.double(), x.double(), mean.double(), scale.double(),
                                           shift.double(), None if output is None else output.double(), relu, 0.0,
                                           relu)
    # Sums of count terms of size ~1: float32 accumulation, tolerance scaled by sqrt(count).
    count = x.numel() // x.shape[1]
    assert_close(sum_dz, ref[0], torch.float32, atol=2e-5 * count ** 0.5)
    assert_close(sum_dz_xmu, ref[1], torch.float32, atol=2e-5 * count ** 0.5 * 4)
    if relu:
        assert same_format(grad_z, x)
        assert_close(grad_z, ref[2], dtype)
    else:
        assert grad_z.numel() == 0


@pytest.mark.parametrize("device,name", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("relu", [True, False])
def test_backward_elementwise(device, name, dtype, shape, fmt, relu):
    x = activation(shape, dtype, device, fmt)
    grad = activation(shape, dtype, device, fmt)
    mean, scale, shift = _channel_params(shape[1], device)
    coef_xmu, coef_c = torch.randn(shape[1], device=device), torch.randn(shape[1], device=device)
    with backend(name, device):
        dx = ops.bn_act_backward_elementwise(grad, x, mean, scale, shift, coef_xmu, coef_c, relu)
    ref = bn_act_backward_elementwise_reference(grad.double(), x.double(), mean.double(), scale.double(),
                                                shift.double(), coef_xmu.double(), coef_c.double(), relu)
    assert dx.dtype == dtype and same_format(dx, x)
    assert_close(dx, ref, dtype)


@pytest.mark.parametrize("device,name", BACKEND_CASES)
def test_non_dense_input_is_accepted(device, name):
    """A sliced (non-contiguous) activation is made dense first, not misread."""
    big = activation((2, 8, 6, 6), torch.float32, device)
    x = big[:, 1:6]
    mean, scale, shift = _channel_params(5, device)
    with backend(name, device):
        y = ops.bn_act_forward(x, mean, scale, shift, None, True)
        m, s = ops.bn_stats(x, 1e-5)
    assert_close(y, bn_act_forward_reference(x.double(), mean.double(), scale.double(), shift.double(), None, True))
    assert_close(m, x.double().mean((0, 2, 3)), torch.float32)


@pytest.mark.parametrize("device,name", BACKEND_CASES)
def test_spatial_one_gradient_with_other_strides(device, name):
    """[N, C, 1, 1]: a channels_last activation and a gradient with NCHW strides index memory alike
    (found by the small-ResNet test: autograd handed back such a gradient)."""
    x = torch.empty_strided((4, 6, 1, 1), (6, 1, 6, 6), device=device).copy_(activation((4, 6, 1, 1), device=device))
    grad = activation((4, 6, 1, 1), torch.float32, device).contiguous()
    assert x.stride() != grad.stride()
    mean, scale, shift = _channel_params(6, device)
    with backend(name, device):
        sums = ops.bn_act_backward_reduce(grad, x, mean, scale, shift, None, True)
        dx = ops.bn_act_backward_elementwise(grad, x, mean, scale, shift, scale, shift, True)
    ref_sums = bn_act_backward_reduce_reference(grad.double(), x.double(), mean.double(), scale.double(),
                                                shift.double(), None, True, 0.0, False)
    ref_dx = bn_act_backward_elementwise_reference(grad.double(), x.double(), mean.double(), scale.double(),
                                                   shift.double(), scale.double(), shift.double(), True)
    assert_close(sums[0], ref_sums[0], torch.float32)
    assert_close(sums[1], ref_sums[1], torch.float32)
    assert_close(dx, ref_dx, torch.float32)


# Every activation of common.ACTIVATIONS (LeakyReLU with a slope of its own), in every pass.
ACTS = [Activation(name, 0.2 if name == "leaky_relu" else 0.0) for name in ACTIVATIONS]
ACT_IDS = [a.name for a in ACTS]


@pytest.mark.parametrize("device,name", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_activations_forward_and_backward(device, name, dtype, fmt, act):
    """y = act(BN(x) + residual), the reduction (with dz written) and the elementwise pass, per
    activation, against float64. x spans u in about [-7, 7]: every piece of every activation."""
    shape = (2, 7, 5, 6)
    x = activation(shape, dtype, device, fmt) * 3
    grad = activation(shape, dtype, device, fmt)
    residual = activation(shape, dtype, device, fmt)
    mean, scale, shift = _channel_params(shape[1], device)
    coef_xmu, coef_c = torch.randn(shape[1], device=device), torch.randn(shape[1], device=device)
    with backend(name, device):
        y = ops.bn_act_forward(x, mean, scale, shift, residual, act)
        sum_dz, sum_dz_xmu, grad_z = ops.bn_act_backward_reduce(grad, x, mean, scale, shift, None, act,
                                                                write_grad_z=True)
        dx = ops.bn_act_backward_elementwise(grad, x, mean, scale, shift, coef_xmu, coef_c, act)
    d = [t.double() for t in (x, grad, mean, scale, shift, residual, coef_xmu, coef_c)]
    x64, g64, m64, s64, sh64, r64, kx64, kc64 = d
    assert_close(y, bn_act_forward_reference(x64, m64, s64, sh64, r64, act), dtype)
    ref = bn_act_backward_reduce_reference(g64, x64, m64, s64, sh64, None, act, write_grad_z=True)
    count = x.numel() // x.shape[1]
    assert_close(sum_dz, ref[0], torch.float32, atol=4e-5 * count ** 0.5)
    assert_close(sum_dz_xmu, ref[1], torch.float32, atol=4e-5 * count ** 0.5 * 8)
    assert same_format(grad_z, x)
    assert_close(grad_z, ref[2], dtype)
    assert_close(dx, bn_act_backward_elementwise_reference(g64, x64, m64, s64, sh64, kx64, kc64, act), dtype)


def _torch_activation(act: Activation, u):
    """The activation as the modules users have compute it (nn's functionals)."""
    return {"none": lambda v: v, "relu": torch.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish,
            "leaky_relu": lambda v: F.leaky_relu(v, act.alpha), "gelu": F.gelu,
            "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}[act.name](u)


@pytest.mark.parametrize("device,name", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_activations_match_torch_at_their_kinks(device, name, dtype, act):
    """At the points where an activation's pieces meet (0, -3, 3, 6), past them and at NaN,
    forward and gradient equal torch's own functional and its autograd: the same side of each
    kink, NaN passed on forward. u = x exactly (no mean or scale, zero shift). (At +-inf torch's own
    kernels disagree with each other: CPU GELU(inf) is NaN, its formula's value inf.)"""
    points = [0.0, -0.0, -3.0, 3.0, 6.0, -6.0, 1e-3, -1e-3, 2.5, -2.5, 6.5, -3.5, 20.0, -20.0,
              float("nan")]
    x = torch.tensor(points, dtype=dtype, device=device).repeat(2, 1).view(2, 1, 1, -1).expand(2, 3, 1, -1)
    x = x.contiguous()
    grad = torch.full_like(x, 1.5)
    zero = torch.zeros(3, device=device)
    one = torch.ones(3, device=device)
    with backend(name, device):
        y = ops.bn_act_forward(x, None, None, zero, None, act)
        dz = ops.bn_act_backward_elementwise(grad, x, zero, one, zero, zero, zero, act)
    xr = x.clone().requires_grad_(True)
    expected = _torch_activation(act, xr)
    (expected_grad,) = torch.autograd.grad(expected, xr, grad)
    torch.testing.assert_close(y, expected.detach(), equal_nan=True, atol=1e-6, rtol=1e-6)
    known = ~torch.isnan(x)  # at NaN, BatchNorm's own (x - mean) * coef_xmu term is NaN anyway
    torch.testing.assert_close(dz[known], expected_grad[known], atol=1e-6, rtol=1e-6)


def test_activation_arguments_are_checked():
    """A bad activation names what is expected; output (the ReLU mask's source) only with ReLU."""
    x = activation((2, 3, 4, 4))
    mean, scale, shift = _channel_params(3, "cpu")
    with pytest.raises(ValueError, match="activation must be"):
        ops.bn_act_forward(x, mean, scale, shift, None, "swish")
    with pytest.raises(ValueError, match="only with act = ReLU"):
        ops.bn_act_backward_reduce(x, x, mean, scale, shift, x, Activation("silu"))
    with pytest.raises(RuntimeError, match="activation code"):
        torch.ops.fusedres_kernels.bn_act_forward(x, mean, scale, shift, None, 9, 0.0)


# The kinks of the piecewise activations (where a slope jumps). SiLU and the GELUs are smooth:
# a rounding difference there moves the gradient by a rounding, not by a slope.
KINKS = {"relu": (0.0,), "leaky_relu": (0.0,), "relu6": (0.0, 6.0), "hardswish": (-3.0, 3.0)}
KINKED = [a for a in ACTS if a.name in KINKS]
ULPS = 8  # inputs from 8 ulps below each kink's x to 8 above


def _near_kinks(act: Activation, mean, scale, shift, dtype, fmt, device):
    """x [2, C, kinks, 2 * ULPS + 1]: per channel and kink, the x whose u = (x - mean) * scale +
    shift is the kink (in float64, rounded to dtype), and its ULPS neighbours each side (stepped
    through the bit pattern), so u lands within a few roundings of the kink: the forward's
    rounding and a recompute's decide the side."""
    kinks = torch.tensor(KINKS[act.name], dtype=torch.float64)
    centre = (kinks[None, :] - shift.double()[:, None]) / scale.double()[:, None] + mean.double()[:, None]
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[dtype]
    steps = torch.arange(-ULPS, ULPS + 1, dtype=bits)
    x = (centre.to(dtype).view(bits)[:, :, None] + steps).view(dtype)  # [C, kinks, 2 * ULPS + 1]
    return x[None].expand(2, -1, -1, -1).to(device).contiguous(memory_format=fmt)


def _slope_agrees_with_forward(act: Activation, y, slope, dtype):
    """Per element, whether backward's slope belongs to the piece the forward's own output y
    lies on (ReLU: y > 0 slope 1, else 0; LeakyReLU: 1 or alpha; ReLU6: 1 inside (0, 6), else 0;
    Hardswish: 1 from y = 3, 0 at y = 0 from below -3, the middle piece's u / 3 + 1/2 between).
    Where a bfloat16 output rounded onto a kink's value (ReLU6's 6, Hardswish's 3) it no longer
    tells the side: both slopes are taken."""
    y, s = y.double(), slope.double()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # (a bfloat16 dx = scale * dz, divided by scale again)
    one, zero = (s - 1).abs() < tol, s.abs() < tol
    rounded_onto = (lambda v: y == v) if dtype == torch.bfloat16 else (lambda v: torch.zeros_like(y, dtype=torch.bool))
    if act.name == "relu":
        return torch.where(y > 0, one, zero)
    if act.name == "leaky_relu":
        return torch.where(y > 0, one, (s - act.alpha).abs() < tol)
    if act.name == "relu6":
        return torch.where((y > 0) & (y < 6), one, zero) | (rounded_onto(6.0) & (one | zero))
    middle = ~one & ~zero & (s > -0.51) & (s < 1.51)  # u / 3 + 1/2 within a few ulps of -3 or 3
    return torch.where(y >= 3, one, torch.where(y == 0, zero, middle)) | (rounded_onto(3.0) & (one | middle))


@pytest.mark.parametrize("device,name", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("act", KINKED, ids=[a.name for a in KINKED])
def test_backward_takes_the_slope_of_the_side_the_forward_computed(device, name, dtype, fmt, act):
    """Issue 32: backward recomputes u from x; an element a few ulps from a kink must get the slope
    of the piece the forward's own value is on, in the reduction (dz written) and in the
    elementwise pass. Inputs step through the bit patterns around each kink's x, so u falls on
    both sides of it by roundings; the check must see both sides taken (the inputs straddle it)."""
    channels = 7
    torch.manual_seed(3)
    mean = (torch.randn(channels) * 2 + 0.5).to(device)
    scale = (torch.rand(channels) + 0.5).to(device)
    shift = torch.randn(channels).to(device)
    x = _near_kinks(act, mean, scale, shift, dtype, fmt, device)
    grad = torch.ones_like(x)
    zero = torch.zeros(channels, device=device)
    with backend(name, device):
        y = ops.bn_act_forward(x, mean, scale, shift, None, act)
        _, _, grad_z = ops.bn_act_backward_reduce(grad, x, mean, scale, shift, None, act, write_grad_z=True)
        dx = ops.bn_act_backward_elementwise(grad, x, mean, scale, shift, zero, zero, act)
    for what, slope in (("reduce's dz", grad_z), ("elementwise dz", dx.double() / scale.double().view(1, -1, 1, 1))):
        agree = _slope_agrees_with_forward(act, y, slope, dtype)
        assert bool(agree.all()), (f"{what}: {int((~agree).sum())} of {agree.numel()} elements take the other "
                                   f"slope than the forward's value (y {y[~agree][:4].tolist()}, slope "
                                   f"{slope[~agree][:4].tolist()})")
    for kink in range(len(KINKS[act.name])):  # the inputs do reach both sides of every kink
        pieces = torch.unique(grad_z[:, :, kink].double().round(decimals=2))
        assert pieces.numel() >= 2, f"kink {KINKS[act.name][kink]}: one slope only ({pieces.tolist()})"
