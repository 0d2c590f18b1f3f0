"""bn_act forward / backward-reduce / backward-elementwise: every backend against float64."""
import itertools

import pytest
import torch

from fusedres import ops
from fusedres.ops.bn_act import (bn_act_backward_elementwise_reference, bn_act_backward_reduce_reference,
                                 bn_act_forward_reference)
from helpers import BACKEND_CASES, DTYPES, FORMATS, activation, assert_close, backend, same_format

SHAPES = [(2, 5, 7, 9), (3, 13, 1, 1), (1, 3, 5, 5), (2, 70, 4, 3)]
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
                                           shift.double(), None if output is None else output.double(), relu, relu)
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
                                                shift.double(), None, True, False)
    ref_dx = bn_act_backward_elementwise_reference(grad.double(), x.double(), mean.double(), scale.double(),
                                                   shift.double(), scale.double(), shift.double(), True)
    assert_close(sums[0], ref_sums[0], torch.float32)
    assert_close(sums[1], ref_sums[1], torch.float32)
    assert_close(dx, ref_dx, torch.float32)
