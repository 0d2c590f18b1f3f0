"""conv_bn_act (one unit of ConvBNUnits): gradcheck in float64 and agreement with the nn reference (conv -> BN -> add -> ReLU)."""
import pytest
import torch
import torch.nn.functional as F

import fusedres
from helpers import BACKEND_CASES, FORMATS, activation, assert_close, backend

UNIT_VARIANTS = [  # (batch_stats, residual, relu)
    (True, False, True), (True, True, True), (True, False, False), (True, True, False),
    (False, False, True), (False, True, True),
]


def _unit_inputs(device, dtype, fmt, stride=1, cin=3, cout=5, hw=(7, 6), k=3, requires_grad=True):
    x = activation((2, cin, *hw), dtype, device, fmt).requires_grad_(requires_grad)
    w = (torch.randn(cout, cin, k, k, dtype=dtype, device=device) * 0.3).requires_grad_(requires_grad)
    gamma = (torch.rand(cout, dtype=dtype, device=device) + 0.5).requires_grad_(requires_grad)
    beta = torch.randn(cout, dtype=dtype, device=device).requires_grad_(requires_grad)
    rm = torch.randn(cout, dtype=torch.float32, device=device) * 0.1
    rv = torch.rand(cout, dtype=torch.float32, device=device) + 0.5
    ho = (hw[0] + 2 * (k // 2) - k) // stride + 1
    wo = (hw[1] + 2 * (k // 2) - k) // stride + 1
    res = activation((2, cout, ho, wo), dtype, device, fmt).requires_grad_(requires_grad)
    return x, w, gamma, beta, rm, rv, res


def _reference(x, w, gamma, beta, rm, rv, res, stride, batch_stats, relu, momentum=0.1, eps=1e-5):
    z = F.conv2d(x, w, None, stride, 1)
    y = F.batch_norm(z, rm, rv, gamma, beta, training=batch_stats, momentum=momentum, eps=eps)
    if res is not None:
        y = y + res
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("device,name", BACKEND_CASES)
@pytest.mark.parametrize("batch_stats,with_residual,relu", UNIT_VARIANTS)
def test_gradcheck_float64(device, name, batch_stats, with_residual, relu):
    x, w, gamma, beta, rm, rv, res = _unit_inputs(device, torch.float64, torch.contiguous_format, hw=(4, 5), cout=3)
    res = res if with_residual else None
    rm, rv = rm.double(), rv.double()

    def unit(x, w, gamma, beta, *maybe_res):
        return fusedres.conv_bn_act(x, w, None, gamma, beta, rm.clone(), rv.clone(), maybe_res[0] if maybe_res else None,
                                    padding=(1, 1), batch_stats=batch_stats, relu=relu)

    inputs = (x, w, gamma, beta) + ((res,) if res is not None else ())
    with backend(name, device):
        assert torch.autograd.gradcheck(unit, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=name == "triton")


@pytest.mark.parametrize("device,name", BACKEND_CASES)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("batch_stats,with_residual,relu", UNIT_VARIANTS)
def test_matches_nn_reference_float32(device, name, fmt, stride, batch_stats, with_residual, relu):
    """Outputs, all five gradients and running statistics; odd sizes (7x6, stride 2), C = 3 and 5."""
    inputs = _unit_inputs(device, torch.float32, fmt, stride=stride)
    x, w, gamma, beta, rm, rv, res = inputs
    ref_inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    res = res if with_residual else None
    rx, rw, rg, rb, rrm, rrv, rres = ref_inputs
    rres = rres if with_residual else None
    with backend(name, device):
        y = fusedres.conv_bn_act(x, w, None, gamma, beta, rm, rv, res, stride=(stride, stride), padding=(1, 1),
                                 batch_stats=batch_stats, relu=relu)
    expected = _reference(rx, rw, rg, rb, rrm, rrv, rres, stride, batch_stats, relu)
    assert_close(y, expected, torch.float32, atol=1e-4, rtol=1e-4)
    assert y.stride() == expected.stride()
    grad = torch.randn_like(expected)
    with backend(name, device):
        y.backward(grad)
    expected.backward(grad)
    for got, want, what in [(x.grad, rx.grad, "x"), (w.grad, rw.grad, "weight"), (gamma.grad, rg.grad, "gamma"),
                            (beta.grad, rb.grad, "beta")] + ([(res.grad, rres.grad, "residual")] if res is not None else []):
        assert_close(got, want, torch.float32, atol=2e-4, rtol=2e-4, msg=f"grad of {what}")
    assert_close(rm, rrm, torch.float32, msg="running_mean")
    assert_close(rv, rrv, torch.float32, msg="running_var")


@pytest.mark.parametrize("with_residual,relu", [(False, True), (True, True), (True, False)])
def test_saves_no_normalized_activation(with_residual, relu):
    """Saved for backward: x, weight, the pre-BN z, per-channel vectors, and the output only for
    residual + ReLU. Anything else activation-sized would be the normalized activation."""
    x, w, gamma, beta, rm, rv, res = _unit_inputs("cpu", torch.float32, torch.contiguous_format)
    res = res if with_residual else None
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fusedres.conv_bn_act(x, w, None, gamma, beta, rm, rv, res, padding=(1, 1), relu=relu)
    big = [t for t in saved if t.dim() == 4 and t.shape[0] == x.shape[0]]
    expected = 2 + (1 if (with_residual and relu) else 0)  # x, z (+ y)
    assert len(big) == expected, [tuple(t.shape) for t in big]
    assert any(t is x for t in big)
    if with_residual and relu:
        assert any(t.data_ptr() == y.data_ptr() for t in big)


def test_batch_of_one_value_per_channel_raises_like_nn():
    x, w, gamma, beta, rm, rv, _ = _unit_inputs("cpu", torch.float32, torch.contiguous_format, hw=(1, 1), k=1)
    x = x[:1].detach()
    with pytest.raises(ValueError) as ours:
        fusedres.conv_bn_act(x, w, None, gamma, beta, rm, rv)
    with pytest.raises(ValueError) as theirs:
        F.batch_norm(F.conv2d(x, w), rm, rv, gamma, beta, training=True)
    assert str(ours.value) == str(theirs.value)
