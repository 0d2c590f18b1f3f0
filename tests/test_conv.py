"""The fused conv ops (fusedres.ops.conv2d_*) and the conv-BN-ReLU chain against float64 references.

Every backend is compared with a float64 ground truth built from torch.nn.functional.conv2d, so
the Triton kernels (interpreted on the CPU, compiled on a GPU) and the reference path are also
checked against each other. Shapes are tiny and odd on the CPU (the interpreter runs every
program in Python): C not a multiple of 16, odd H and W, N = 1, H*W = 1, several groups per tile.
"""
import copy
import os
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedres
from fusedres import ops
from fusedres.autograd import BNArgs, ConvArgs, chain, conv_bn_chain
from fusedres.common import ACTIVATIONS, Activation
from fusedres.ops.registry import resolve
from helpers import FORMATS, HAS_CUDA, INTERPRETED, TOLERANCE, assert_close_scaled

# (kernel, stride, padding, dilation, groups, C_in, C_out, N, H, W)
GEOMETRIES = {
    "3x3": (3, 1, 1, 1, 1, 5, 7, 2, 7, 6),
    "3x3-stride2-odd": (3, 2, 1, 1, 1, 5, 7, 2, 7, 5),
    "1x1": (1, 1, 0, 1, 1, 13, 20, 2, 5, 3),
    "1x1-stride2": (1, 2, 0, 1, 1, 13, 20, 1, 5, 5),
    "7x7-stem": (7, 2, 3, 1, 1, 3, 16, 1, 11, 9),
    "3x3-groups4-of3": (3, 2, 1, 1, 4, 12, 8, 2, 5, 5),
    "3x3-groups8-of4": (3, 1, 1, 1, 8, 32, 32, 1, 4, 5),  # 4 groups per 16-channel tile
    "3x3-depthwise": (3, 2, 1, 1, 6, 6, 6, 2, 5, 5),
    "3x3-dilation2": (3, 1, 2, 2, 2, 6, 10, 1, 6, 7),
    "3x3-stride2-dilation2": (3, 2, 2, 2, 1, 6, 10, 1, 7, 8),
    "3x3-hw1": (3, 2, 1, 1, 1, 5, 7, 3, 1, 1),
}


def _cases():
    cases = [pytest.param("cpu", "reference", id="cpu-reference")]
    if INTERPRETED:
        cases.append(pytest.param("cpu", "triton", id="cpu-triton-interpreted"))
    for b in ("reference", "triton"):
        cases.append(pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.needs_cuda))
    return cases


CONV_CASES = _cases()
# tolerance of a whole result against float64, relative to its largest value: one rounding of the
# output for half types, a few ulps of the sums for float32 (tf32 off in these tests)
SCALED_TOL = TOLERANCE["conv"]


def _conv_backend(name, device):
    """Select `name`; fail rather than test the reference fallback by accident."""
    ctx = fusedres.use_backend(name)
    ctx.__enter__()
    for op in ops.CONV_OPS:
        assert resolve(op, torch.device(device))[0] == name, f"{op} did not run on {name}"
    return ctx


def _tensor(shape, dtype, device, fmt=torch.contiguous_format, mean=0.5):
    t = torch.randn(shape, dtype=torch.float64) + mean
    return t.to(dtype=dtype, device=device).contiguous(memory_format=fmt) if len(shape) == 4 else t.to(dtype=dtype, device=device)


def _problem(geo, dtype, device, fmt, prologue=True, in_act=True):
    k, s, p, d, g, cin, cout, n, h, w = geo
    x = _tensor((n, cin, h, w), dtype, device, fmt)
    weight = _tensor((cout, cin // g, k, k), dtype, device, mean=0.0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    pro = {}
    if prologue:
        # a positive shift on some channels: relu(shift) != 0, so padding done before the prologue shows
        pro = dict(in_mean=torch.randn(cin, dtype=acc, device=device), in_scale=torch.rand(cin, dtype=acc, device=device)
                   + 0.5, in_shift=torch.randn(cin, dtype=acc, device=device) + 0.5, in_act=in_act)
    return x, weight, dict(stride=(s, s), padding=(p, p), dilation=(d, d), groups=g), pro


def _activated64(x, pro):
    """The prologue's output in float64, from x's stored values, rounded as the kernels round it."""
    if not pro:
        return x.double()
    u = (x.double() - pro["in_mean"].double().view(1, -1, 1, 1)) * pro["in_scale"].double().view(1, -1, 1, 1) \
        + pro["in_shift"].double().view(1, -1, 1, 1)
    u = torch.relu(u) if pro["in_act"] else u
    return u.to(x.dtype).double()


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device,name", CONV_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geo", list(GEOMETRIES))
def test_forward_with_every_fusion(device, name, dtype, geo):
    fmt = torch.channels_last if geo != "1x1" else torch.contiguous_format
    x, weight, conv, pro = _problem(GEOMETRIES[geo], dtype, device, fmt)
    bias = _tensor((weight.shape[0],), dtype, device)
    a64 = _activated64(x, pro)
    z64 = F.conv2d(a64, weight.double(), bias.double(), **conv)
    residual = _tensor(z64.shape, dtype, device, fmt, mean=-0.5)
    ctx = _conv_backend(name, device)
    try:
        y, moments = ops.conv2d_forward(x, weight, bias, **conv, **pro, residual=residual, act=True, stats=True)
        stored, _ = ops.conv2d_forward(x, weight, bias, **conv, **pro)
    finally:
        ctx.__exit__(None, None, None)
    assert y.dtype == dtype and y.shape == z64.shape
    assert y.is_contiguous(memory_format=fmt), "output keeps the input's memory format"
    expected = torch.relu(z64 + residual.double())
    assert expected.abs().max() > 0
    assert_close_scaled(y, expected, SCALED_TOL[dtype], msg=f"{geo} {dtype}")
    # statistics are of the stored conv output (before residual and ReLU)
    var, mean = torch.var_mean(stored.double(), dim=(0, 2, 3), unbiased=False)
    got_mean, got_invstd = moments.mean, (moments.var + 1e-5).rsqrt()
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got_mean.double().cpu(), mean.cpu(), atol=tol * (1 + mean.abs().max().item()), rtol=tol)
    torch.testing.assert_close(got_invstd.double().cpu(), (var + 1e-5).rsqrt().cpu(), atol=0, rtol=10 * tol)


@pytest.mark.parametrize("device,name", CONV_CASES)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("fusions", ["plain", "bias", "relu", "residual", "prologue-no-relu", "prologue-relu"])
def test_forward_fusion_combinations(device, name, fmt, fusions):
    x, weight, conv, pro = _problem(GEOMETRIES["3x3-stride2-odd"], torch.float64, device, fmt,
                                    prologue=fusions.startswith("prologue"), in_act=fusions == "prologue-relu")
    bias = _tensor((weight.shape[0],), torch.float64, device) if fusions == "bias" else None
    expected = F.conv2d(_activated64(x, pro), weight, bias, **conv)
    residual = _tensor(expected.shape, torch.float64, device, fmt) if fusions == "residual" else None
    if residual is not None:
        expected = expected + residual
    if fusions == "relu":
        expected = torch.relu(expected)
    ctx = _conv_backend(name, device)
    try:
        y, moments = ops.conv2d_forward(x, weight, bias, **conv, **pro, residual=residual, act=fusions == "relu")
    finally:
        ctx.__exit__(None, None, None)
    assert moments is None
    assert_close_scaled(y, expected, 1e-12, msg=fusions)


@pytest.mark.parametrize("device,name", CONV_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geo", list(GEOMETRIES))
@pytest.mark.parametrize("prologue", [True, False], ids=["bn-relu-fused", "plain"])
def test_input_and_weight_gradients(device, name, dtype, geo, prologue):
    fmt = torch.channels_last if geo != "3x3-stride2-odd" else torch.contiguous_format
    x, weight, conv, pro = _problem(GEOMETRIES[geo], dtype, device, fmt, prologue=prologue)
    a64 = _activated64(x, pro).requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    z64 = F.conv2d(a64, w64, None, **conv)
    grad_y = _tensor(z64.shape, dtype, device, fmt, mean=0.2)
    z64.backward(grad_y.double())
    ctx = _conv_backend(name, device)
    try:
        dx, sum_du, sum_du_xmu = ops.conv2d_input_grad(grad_y, weight, x, **conv, **pro)
        dw = ops.conv2d_weight_grad(grad_y, x, weight, **conv, **pro)
    finally:
        ctx.__exit__(None, None, None)
    tol = SCALED_TOL[dtype]
    assert dw.dtype == dtype and dw.shape == weight.shape
    assert w64.grad.abs().max() > 0
    assert_close_scaled(dw, w64.grad, tol, msg="weight gradient")
    assert dx.is_contiguous(memory_format=fmt)
    da = a64.grad
    if not prologue:
        assert sum_du is None and sum_du_xmu is None
        assert_close_scaled(dx, da, tol, msg="input gradient")
        return
    u = (x.double() - pro["in_mean"].double().view(1, -1, 1, 1)) * pro["in_scale"].double().view(1, -1, 1, 1) \
        + pro["in_shift"].double().view(1, -1, 1, 1)
    du = torch.where(u > 0, da, 0)
    assert du.abs().max() > 0 and (du == 0).any(), "the ReLU mask must matter"
    assert_close_scaled(dx, du, tol, msg="masked input gradient dU")
    xmu = x.double() - pro["in_mean"].double().view(1, -1, 1, 1)
    sum_tol = {torch.float64: 1e-12, torch.float32: 2e-5}.get(dtype, SCALED_TOL[dtype])
    assert_close_scaled(sum_du, du.sum((0, 2, 3)), sum_tol, msg="sum dU")
    assert_close_scaled(sum_du_xmu, (du * xmu).sum((0, 2, 3)), sum_tol, msg="sum dU (x - mean)")
    # and exactly of dU as stored (BatchNorm's backward subtracts their means from it): float32 sums
    stored_tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert_close_scaled(sum_du, dx.double().sum((0, 2, 3)), stored_tol, msg="sum of stored dU")
    assert_close_scaled(sum_du_xmu, (dx.double() * xmu).sum((0, 2, 3)), stored_tol, msg="sum of stored dU (x - mean)")


CONV_ACTS = [Activation(name, 0.2 if name == "leaky_relu" else 0.0) for name in ACTIVATIONS if name != "none"]


@pytest.mark.parametrize("device,name", CONV_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("act", CONV_ACTS, ids=[a.name for a in CONV_ACTS])
def test_every_activation_in_prologue_epilogue_and_gradients(device, name, dtype, act):
    """Each activation of common.ACTIVATIONS as the forward prologue's (after the input's BN) and
    the epilogue's (after the residual), the dgrad epilogue's act'(U) and the wgrad prologue's
    recomputation, against float64 autograd through torch's own functions (a grouped, strided,
    channels_last conv: the prologue also meets padding)."""
    geo = GEOMETRIES["3x3-groups4-of3"]
    fmt = torch.channels_last
    x, weight, conv, pro = _problem(geo, dtype, device, fmt)
    x = (x.double() * 2.5).to(dtype)  # u over about [-8, 8]: every piece of every activation
    pro["in_act"] = act
    u64 = (x.double() - pro["in_mean"].double().view(1, -1, 1, 1)) * pro["in_scale"].double().view(1, -1, 1, 1) \
        + pro["in_shift"].double().view(1, -1, 1, 1)
    u64.requires_grad_(True)
    a64 = act.apply(u64)
    w64 = weight.double().requires_grad_(True)
    z64 = F.conv2d(a64.to(dtype).double() if dtype != torch.float64 else a64, w64, None, **conv)
    residual = _tensor(z64.shape, dtype, device, fmt, mean=-0.5)
    expected = act.apply(z64.detach() + residual.double())
    grad_y = _tensor(z64.shape, dtype, device, fmt, mean=0.2)
    du64, dw64 = torch.autograd.grad(z64, (u64, w64), grad_y.double())
    ctx = _conv_backend(name, device)
    try:
        y, _ = ops.conv2d_forward(x, weight, None, **conv, **pro, residual=residual, act=act)
        du, sum_du, _ = ops.conv2d_input_grad(grad_y, weight, x, **conv, **pro)
        dw = ops.conv2d_weight_grad(grad_y, x, weight, **conv, **pro)
    finally:
        ctx.__exit__(None, None, None)
    tol = SCALED_TOL[dtype] * (1 if dtype == torch.float64 else 10)  # float32: exp / erf in the prologue
    assert_close_scaled(y, expected, tol, msg=f"forward {act.name}")
    assert_close_scaled(du, du64, tol, msg=f"dU {act.name}")
    assert_close_scaled(sum_du, du64.sum((0, 2, 3)), tol, msg=f"sum dU {act.name}")
    assert_close_scaled(dw, dw64, tol, msg=f"weight gradient {act.name}")


def _buffer_slice(shape, lo, total, dtype, device, fmt):
    """A [N, C, H, W] channel slice [lo, lo + C) of a wider [N, total, H, W] buffer (its strides
    are the buffer's), and the buffer, filled with a sentinel to show stray writes."""
    n, c, h, w = shape
    buffer = torch.full((n, total, h, w), 7.0, dtype=dtype, device=device).contiguous(memory_format=fmt)
    return buffer[:, lo:lo + c], buffer


@pytest.mark.parametrize("device,name", CONV_CASES)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geo", ["3x3", "1x1", "3x3-stride2-odd"])
def test_forward_writes_into_a_channel_slice_and_reads_one(device, name, fmt, dtype, geo):
    """A dense block's layers read a channel prefix of the feature buffer and write their growth
    channels into their own slice of it: only that slice changes, and the result is the conv's."""
    x_full, weight, conv, pro = _problem(GEOMETRIES[geo], dtype, device, fmt)
    x_in, x_buffer = _buffer_slice(x_full.shape, 2, x_full.shape[1] + 5, dtype, device, fmt)
    x_in.copy_(x_full)
    expected = F.conv2d(_activated64(x_full, pro), weight.double(), None, **conv)
    out, buffer = _buffer_slice(expected.shape, 3, expected.shape[1] + 7, dtype, device, fmt)
    before = buffer.clone()
    ctx = _conv_backend(name, device)
    try:
        y, moments = ops.conv2d_forward(x_in, weight, None, **conv, **pro, stats=True, out=out)
    finally:
        ctx.__exit__(None, None, None)
    assert y.data_ptr() == out.data_ptr()
    assert_close_scaled(out, expected, SCALED_TOL[dtype], msg="conv written into a slice")
    untouched = torch.ones(buffer.shape[1], dtype=torch.bool)
    untouched[3:3 + expected.shape[1]] = False
    assert torch.equal(buffer[:, untouched], before[:, untouched]), "wrote outside its slice"
    var, mean = torch.var_mean(out.double(), dim=(0, 2, 3), unbiased=False)
    got_mean = moments.mean
    assert_close_scaled(got_mean, mean, 2e-5 if dtype != torch.float64 else 1e-12, msg="stats of the slice")


@pytest.mark.parametrize("device,name", CONV_CASES)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geo", ["1x1", "3x3-stride2-odd", "3x3-groups4-of3"])
@pytest.mark.parametrize("prologue", [True, False], ids=["bn-relu-fused", "plain"])
def test_input_grad_accumulates_scaled_into_a_slice(device, name, fmt, dtype, geo, prologue):
    """out += out_scale * dU in place over a strided slice of a gradient buffer, the other channels
    untouched; the sums are those of dU, unscaled."""
    x, weight, conv, pro = _problem(GEOMETRIES[geo], dtype, device, fmt, prologue=prologue)
    a64 = _activated64(x, pro).requires_grad_(True)
    z64 = F.conv2d(a64, weight.double(), None, **conv)
    grad_y = _tensor(z64.shape, dtype, device, fmt, mean=0.2)
    z64.backward(grad_y.double())
    du = a64.grad
    if prologue:
        u = (x.double() - pro["in_mean"].double().view(1, -1, 1, 1)) * pro["in_scale"].double().view(1, -1, 1, 1) \
            + pro["in_shift"].double().view(1, -1, 1, 1)
        du = torch.where(u > 0, du, 0)
    out, buffer = _buffer_slice(x.shape, 1, x.shape[1] + 4, dtype, device, fmt)
    out.copy_(_tensor(x.shape, dtype, device, fmt, mean=-1.0))
    start, before = out.double().clone(), buffer.clone()
    out_scale = torch.rand(x.shape[1], dtype=torch.float64) + 0.5
    ctx = _conv_backend(name, device)
    try:
        got, sum_du, sum_du_xmu = ops.conv2d_input_grad(grad_y, weight, x, **conv, **pro, out=out,
                                                        out_scale=out_scale.to(device))
    finally:
        ctx.__exit__(None, None, None)
    assert got.data_ptr() == out.data_ptr()
    expected = start + out_scale.to(device).view(1, -1, 1, 1) * du
    assert_close_scaled(out, expected, SCALED_TOL[dtype], msg="accumulated input gradient")
    untouched = torch.ones(buffer.shape[1], dtype=torch.bool)
    untouched[1:1 + x.shape[1]] = False
    assert torch.equal(buffer[:, untouched], before[:, untouched]), "wrote outside its slice"
    if prologue:
        sum_tol = {torch.float64: 1e-12, torch.float32: 2e-5}.get(dtype, SCALED_TOL[dtype])
        assert_close_scaled(sum_du, du.sum((0, 2, 3)), sum_tol, msg="sum dU")
    else:
        assert sum_du is None and sum_du_xmu is None


def test_slice_output_arguments_are_checked():
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="out must be a \\(2, 6, 5, 5\\)"):
        ops.conv2d_forward(x, w, None, padding=1, out=torch.empty(2, 6, 4, 4))
    with pytest.raises(ValueError, match="overlapping"):
        ops.conv2d_forward(x, w, None, padding=1, out=torch.empty(1, 6, 1, 1).expand(2, 6, 5, 5))
    with pytest.raises(ValueError, match="give out too"):
        ops.conv2d_input_grad(torch.randn(2, 6, 5, 5), w, x, padding=1, out_scale=torch.ones(4))
    with pytest.raises(ValueError, match="out_scale must have shape \\[4\\]"):
        ops.conv2d_input_grad(torch.randn(2, 6, 5, 5), w, x, padding=1, out=torch.zeros(2, 4, 5, 5),
                              out_scale=torch.ones(3))


@pytest.mark.parametrize("device,name", CONV_CASES)
def test_large_mean_statistics_do_not_cancel(device, name):
    """1e3 + N(0, 1) conv outputs: the merged centered sums keep the variance, where
    sum(x^2) - n * mean^2 in float32 would lose it."""
    x = _tensor((2, 4, 9, 9), torch.float32, device, torch.channels_last, mean=0.0)
    weight = torch.zeros(6, 4, 1, 1, device=device)
    weight[:, 0] = 1.0
    bias = torch.full((6,), 1e3, device=device)
    ctx = _conv_backend(name, device)
    try:
        y, moments = ops.conv2d_forward(x, weight, bias, stats=True)
    finally:
        ctx.__exit__(None, None, None)
    var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), unbiased=False)
    invstd = moments.var.rsqrt()
    torch.testing.assert_close(invstd.double().cpu(), var.rsqrt().cpu(), rtol=1e-4, atol=0)


def test_tf32_follows_cudnn_flag():
    from fusedres.kernels.conv_triton import _dot_flags

    cuda = torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = True
    assert _dot_flags(torch.float32, cuda)[2] == "tf32"
    torch.backends.cudnn.allow_tf32 = False
    assert _dot_flags(torch.float32, cuda)[2] == "ieee"
    assert _dot_flags(torch.bfloat16, cuda)[2] is None


def test_no_autotuning_in_tests_or_on_cpu():
    from fusedres.kernels.conv_triton import autotune_enabled

    assert not autotune_enabled(torch.device("cpu"))
    if HAS_CUDA:
        assert os.environ.get("FUSEDRES_AUTOTUNE") == "0", "tests run the fixed default configurations"
        assert not autotune_enabled(torch.device("cuda"))


# ---------------------------------------------------------------------------------------------
# The conv-BN-ReLU chain (autograd).
# ---------------------------------------------------------------------------------------------
def _chain_params(device, dtype, groups=1):
    torch.manual_seed(3)
    convs = [nn.Conv2d(4, 6, 1, bias=False), nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=groups, bias=False),
             nn.Conv2d(6, 5, 1, bias=True)]
    bns = [nn.BatchNorm2d(6), nn.BatchNorm2d(6), nn.BatchNorm2d(5, momentum=None)]
    for bn in bns:
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    return nn.ModuleList(convs + bns).to(device=device, dtype=dtype)


def _run_chain(mods, x, residual, train):
    mods.train(train)
    units = []
    for conv, bn in zip(mods[:3], mods[3:]):
        momentum = bn.momentum
        if train:
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        units.append((ConvArgs(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups),
                      BNArgs(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, momentum, train)))
    return conv_bn_chain(x, units, residual, act=True)


def _run_nn(mods, x, residual, train):
    mods.train(train)
    h = x
    for i, (conv, bn) in enumerate(zip(mods[:3], mods[3:])):
        h = bn(conv(h))
        if i < 2:
            h = torch.relu(h)
    return torch.relu(h + residual)


@pytest.mark.parametrize("train", [True, False], ids=["batch-stats", "running-stats"])
def test_chain_gradcheck_float64(train):
    """The chain's backward (through batch statistics, prologue ReLU masks, the epilogue sums) is
    the derivative of its forward: numerical gradcheck on the reference ops."""
    mods = _chain_params("cpu", torch.float64)
    convs, bns = mods[:3], mods[3:]
    x = _tensor((2, 4, 5, 5), torch.float64, "cpu").requires_grad_(True)
    residual = _tensor((2, 5, 3, 3), torch.float64, "cpu").requires_grad_(True)
    weights = [c.weight.detach().clone().requires_grad_(True) for c in convs]
    bias3 = convs[2].bias.detach().clone().requires_grad_(True)
    affine = [t.detach().clone().requires_grad_(True) for bn in bns for t in (bn.weight, bn.bias)]

    def run(x, residual, w1, w2, w3, b3, *gamma_beta):
        units = []
        for i, (conv, bn, w, b) in enumerate(zip(convs, bns, (w1, w2, w3), (None, None, b3))):
            g, be = gamma_beta[2 * i], gamma_beta[2 * i + 1]
            running = (None, None) if train else (bn.running_mean, bn.running_var)
            units.append((ConvArgs(w, b, conv.stride, conv.padding, conv.dilation, conv.groups),
                          BNArgs(g, be, *running, bn.eps, 0.1, train)))
        return conv_bn_chain(x, units, residual, act=True)

    with fusedres.use_backend("reference"):
        assert torch.autograd.gradcheck(run, [x, residual, *weights, bias3, *affine], eps=1e-6, atol=1e-6,
                                        rtol=1e-5)


@pytest.mark.parametrize("device,name", CONV_CASES)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval-with-grad"])
@pytest.mark.parametrize("groups", [1, 3], ids=["dense", "groups3"])
def test_chain_matches_nn_over_sgd_steps(device, name, fmt, train, groups):
    """Three SGD steps of the chain against nn.Conv2d / nn.BatchNorm2d / ReLU in float64: outputs,
    every gradient, and the running statistics (momentum and momentum=None)."""
    ours = _chain_params(device, torch.float64, groups)
    ref = _chain_params(device, torch.float64, groups)
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    calls = []
    real_apply = chain.BNReLUConv.apply
    with fusedres.use_backend(name), mock.patch.object(chain.BNReLUConv, "apply",
                                                      side_effect=lambda *a: calls.append(1) or real_apply(*a)):
        for step in range(3):
            x = _tensor((2, 4, 7, 5), torch.float64, device, fmt).requires_grad_(True)
            x_ref = x.detach().clone().requires_grad_(True)
            residual = _tensor((2, 5, 4, 3), torch.float64, device, fmt)
            y = _run_chain(ours, x, residual, train)
            y_ref = _run_nn(ref, x_ref, residual, train)
            assert_close_scaled(y, y_ref, 1e-12, msg=f"step {step} output")
            grad = _tensor(y.shape, torch.float64, device, fmt)
            y.backward(grad)
            y_ref.backward(grad)
            assert_close_scaled(x.grad, x_ref.grad, 1e-11, msg=f"step {step} input gradient")
            for (pn, p), pr in zip(ours.named_parameters(), ref.parameters()):
                assert_close_scaled(p.grad, pr.grad, 1e-11, msg=f"step {step} grad {pn}")
            for o in (opt, opt_ref):
                o.step()
                o.zero_grad()
        for (bn_name, b), b_ref in zip(ours.named_buffers(), ref.buffers()):
            if b.is_floating_point():
                assert_close_scaled(b, b_ref, 1e-12, msg=f"buffer {bn_name}")
            else:
                assert torch.equal(b, b_ref), bn_name
    assert len(calls) == 9, "every conv ran through the fused chain"


def test_blocks_use_the_chain_only_where_the_kernels_run():
    """Under the triton backend a training bottleneck runs its 3 convs and the projection through
    the chain; on the C++ CPU backend (no conv kernel) it keeps the core path."""
    block = fusedres.FusedBottleneck(8, 2, stride=2, downsample=nn.Sequential(nn.Conv2d(8, 8, 1, 2, bias=False),
                                                                               nn.BatchNorm2d(8)))
    x = torch.randn(2, 8, 5, 5)
    cases = [("cpu", False, 0)] + ([("triton", False, 4), ("triton", True, 4)] if INTERPRETED else [])
    for name, autocast, expected in cases:
        with fusedres.use_backend(name), mock.patch.object(chain.BNReLUConv, "apply",
                                                          wraps=chain.BNReLUConv.apply) as spy:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = block(x)
            assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
            y.float().sum().backward()
        assert spy.call_count == expected, (name, autocast)


def test_conv_op_errors_name_the_argument():
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="weight must be a 4-D"):
        ops.conv2d_forward(x, w[0])
    with pytest.raises(ValueError, match="groups=3"):
        ops.conv2d_forward(x, w, groups=3)
    with pytest.raises(ValueError, match="expects 8 input channels"):
        ops.conv2d_forward(x, torch.randn(6, 8, 3, 3))
    with pytest.raises(ValueError, match=r"weight \(torch.float64"):
        ops.conv2d_forward(x, w.double())
    with pytest.raises(ValueError, match="given together"):
        ops.conv2d_forward(x, w, in_mean=torch.zeros(4))
    with pytest.raises(ValueError, match="in_scale must have shape"):
        ops.conv2d_forward(x, w, in_mean=torch.zeros(4), in_scale=torch.ones(5), in_shift=torch.zeros(4))
    with pytest.raises(ValueError, match="stride"):
        ops.conv2d_forward(x, w, stride=(0, 1))
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        ops.conv2d_forward(x, w, residual=torch.randn(1, 6, 5, 5))
    with pytest.raises(TypeError, match="x must be float32"):
        ops.conv2d_forward(x.long(), w)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [
    (256, 64, 1, 1, 1, 56), (64, 64, 3, 1, 1, 56), (128, 128, 3, 2, 1, 56), (1024, 512, 1, 2, 1, 28),
    (3, 64, 7, 2, 1, 112), (128, 128, 3, 1, 32, 56), (256, 256, 3, 2, 32, 56), (1024, 1024, 3, 1, 32, 14)],
    ids=lambda s: f"cin{s[0]}-cout{s[1]}-k{s[2]}-s{s[3]}-g{s[4]}-hw{s[5]}")
def test_real_resnet_shapes_on_gpu(dtype, shape):
    """ResNet-50 / ResNeXt-50 conv shapes at batch 4 in channels_last: forward with prologue and
    statistics, both gradients, against float64 on the same GPU."""
    cin, cout, k, s, g, hw = shape
    geo = (k, s, k // 2, 1, g, cin, cout, 4, hw, hw)
    x, weight, conv, pro = _problem(geo, dtype, "cuda", torch.channels_last, prologue=cin > 3)
    weight = (weight / (weight.shape[1] * k * k) ** 0.5).to(dtype)
    with fusedres.use_backend("triton"):
        y, moments = ops.conv2d_forward(x, weight, None, **conv, **pro, stats=True)
        grad_y = torch.randn_like(y)
        dx, _, _ = ops.conv2d_input_grad(grad_y, weight, x, **conv, **pro)
        dw = ops.conv2d_weight_grad(grad_y, x, weight, **conv, **pro)
    a64 = _activated64(x, pro).requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    z64 = F.conv2d(a64, w64, None, **conv)
    z64.backward(grad_y.double())
    tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}[dtype]
    assert_close_scaled(y, z64, tol, msg="forward")
    assert_close_scaled(dw, w64.grad, tol, msg="weight gradient")
    if not pro:
        assert_close_scaled(dx, a64.grad, tol, msg="input gradient")


@pytest.mark.parametrize("device,name", [c for c in CONV_CASES if c.values[1] == "triton"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_torch_compile_traces_the_fused_conv_chain(device, name, train):
    """torch.compile captures the block in one graph holding the fused conv ops (the chain, not
    aten's convs), and gives eager's results bitwise."""
    torch._dynamo.reset()
    block = fusedres.FusedBottleneck(8, 2, stride=2, downsample=nn.Sequential(
        nn.Conv2d(8, 8, 1, 2, bias=False), nn.BatchNorm2d(8))).to(device).train(train)
    compiled_block = copy.deepcopy(block)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))  # with the autograd Functions' subgraphs
        return gm.forward

    compiled = torch.compile(compiled_block, backend=capture, fullgraph=True)
    x = torch.randn(2, 8, 5, 5, device=device).to(memory_format=torch.channels_last).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    with fusedres.use_backend(name):
        y = block(x)
        y2 = compiled(x2)
        y.sum().backward()
        y2.sum().backward()
    assert len(graphs) == 1 and "fusedres.conv2d_forward" in graphs[0], graphs
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
    for b, b2 in zip(block.buffers(), compiled_block.buffers()):
        assert torch.equal(b, b2)


def test_autotuner_times_each_candidate_once_per_key_and_keeps_the_fastest(monkeypatch):
    """The tuner's bookkeeping, with do_bench faked: the fastest candidate wins, a failing one is
    skipped, each key is timed once per process even with two threads asking at once, and with
    autotuning off the default is used untimed."""
    import threading

    import triton.testing

    from fusedres.kernels import conv_triton

    timings = {"a": 3.0, "b": 1.0, "c": 2.0}
    timed = []

    def fake_do_bench(fn, **kwargs):
        return fn()

    from triton.runtime.errors import OutOfResources

    def run(cfg):
        timed.append(cfg)
        if cfg == "broken":  # what a launch raises for a tile past the shared memory (other errors propagate)
            raise OutOfResources(300000, 232448, "shared memory")
        return timings[cfg]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(conv_triton, "autotune_enabled", lambda device: True)
    monkeypatch.setattr(conv_triton, "_tuned", {})
    key = ("test-key",)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        conv_triton._choose(key, torch.device("cpu"), ["a", "broken", "b", "c"], "a", run))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["b", "b"]
    assert sorted(timed) == ["a", "b", "broken", "c"], "each candidate timed once, by one thread"
    assert conv_triton.tuned_configs() == {key: "b"}
    monkeypatch.setattr(conv_triton, "autotune_enabled", lambda device: False)
    assert conv_triton._choose(("other",), torch.device("cpu"), ["a", "b"], "c", run) == "c"
    assert len(timed) == 4
