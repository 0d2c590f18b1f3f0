"""Issue 32: a fused model's backward takes, at every element, the slope of the activation piece its
forward computed, also where the element's pre-activation lies within a rounding of a kink and
backward recomputes it (the saved pre-BN z, or, memory_efficient, the z of a 1x1 conv run again).
A gradient that does not belong to the function the forward evaluated is wrong, however rarely.

Inputs and weights are small integers, so the conv's z is exact and repeats; each channel's beta is
set so that its most frequent z normalizes onto a kink (float64 batch statistics): the float32
forward then puts those elements a rounding to one side or the other. With the loss sum(y * G), G
small integers, each BatchNorm beta's gradient is sum(G * slope), the slope read off the forward's
own output (a wrong side moves it by 0.5 or more; the float32 sums round by 1e-5). The op-level
version, every backend and bfloat16: tests/test_bn_act.py::test_backward_takes_the_slope_of_the_side_the_forward_computed."""
import warnings

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres.modules import FusedSequential

# (module, its kinks, slope(u) of each piece as the forward's output y tells the piece)
ACTS = {
    "relu": (nn.ReLU, (0.0,)),
    "leaky_relu": (lambda: nn.LeakyReLU(0.2), (0.0,)),
    "relu6": (nn.ReLU6, (0.0, 6.0)),
    "hardswish": (nn.Hardswish, (-3.0, 3.0)),
}
CHANNELS = 16


def _slope_from_forward(name: str, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The slope of the piece the forward's output y lies on, at u (float64, for the value of a
    non-constant piece: Hardswish's u / 3 + 1/2)."""
    if name == "relu":
        return (y > 0).double()
    if name == "leaky_relu":
        return torch.where(y > 0, 1.0, 0.2).double()
    if name == "relu6":
        return ((y > 0) & (y < 6)).double()
    return torch.where(y >= 3, 1.0, torch.where(y == 0, 0.0, u / 3 + 0.5)).double()


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("kernel", [1, 3], ids=["1x1", "3x3"])
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["keeps_z", "memory_efficient"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_beta_gradient_takes_the_forwards_side_of_each_kink(act, kernel, memory_efficient, fmt):
    make, kinks = ACTS[act]
    torch.manual_seed(5)
    conv = nn.Conv2d(5, CHANNELS, kernel, padding=kernel // 2, bias=False)
    bn = nn.BatchNorm2d(CHANNELS)
    with torch.no_grad():
        conv.weight.copy_(torch.randint(-1, 2, conv.weight.shape).float())
    x = torch.randint(0, 3, (3, 5, 7, 9)).float().contiguous(memory_format=fmt)
    with torch.no_grad():  # z exact (small integers); its float64 batch statistics
        z = conv(x).double()
        mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
        invstd = (var + bn.eps).rsqrt()
        gamma = torch.rand(CHANNELS, dtype=torch.float64) + 0.5
        z0 = torch.mode(z.permute(1, 0, 2, 3).reshape(CHANNELS, -1), dim=1).values
        kink = torch.tensor([kinks[c % len(kinks)] for c in range(CHANNELS)], dtype=torch.float64)
        bn.weight.copy_(gamma.float())
        bn.bias.copy_((kink - (z0 - mean) * invstd * gamma).float())  # the most frequent z onto the kink
        u = (z - mean[None, :, None, None]) * (invstd * bn.weight.double())[None, :, None, None] \
            + bn.bias.double()[None, :, None, None]
    model = fusedres.fuse(nn.Sequential(conv, bn, make()), memory_efficient=memory_efficient)
    assert isinstance(model, FusedSequential), fusedres.fuse_report(model)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused path runs (a fallback says so)
        y = model(x)
    weight_g = torch.randint(1, 4, y.shape).float()
    y.backward(weight_g)
    slope = _slope_from_forward(act, y.detach().double(), u)
    expected = (weight_g.double() * slope).sum((0, 2, 3))
    got = model[1].bias.grad.double()  # (fuse's copy of bn)
    near = (u - kink[None, :, None, None]).abs() < 1e-4
    assert int(near.sum()) > 100, "the inputs must put many elements at a kink"
    sides = (y.detach().double() > kink[None, :, None, None].clamp_min(0))[near] if act != "hardswish" else None
    if sides is not None:
        assert bool(sides.any()) and bool((~sides).any()), "the elements at a kink fall on one side only"
    torch.testing.assert_close(got, expected, rtol=0, atol=0.05,
                               msg=lambda m: f"beta's gradient is not sum(G * the forward's slope): {m}")
