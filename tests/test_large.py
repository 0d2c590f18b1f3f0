"""Indexing past 2^31 elements (a GPU with the memory for it): offsets are 64-bit in every kernel,
so the last image of a tensor larger than 2^31 elements is computed as the reference computes it."""
import pytest
import torch
import torch.nn.functional as F

import fusedres
from fusedres import ops

BIG = 2 ** 31 + 2 ** 20  # elements: just past int32
SHAPE = (BIG // (64 * 128 * 128) + 1, 64, 128, 128)  # [N, C, H, W], N * C * H * W > 2^31


def _need(bytes_):
    free, _ = torch.cuda.mem_get_info()
    if free < bytes_:
        pytest.skip(f"needs {bytes_ / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


def _big_input():
    x = torch.empty(SHAPE, dtype=torch.bfloat16, device="cuda").contiguous(memory_format=torch.channels_last)
    assert x.numel() > 2 ** 31
    x.normal_(0.5, 1.0)
    return x


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bn_ops_past_2_pow_31(backend):
    _need(5 * 2 * BIG)
    x = _big_input()
    with fusedres.use_backend(backend):
        mean, invstd = ops.bn_stats(x)
        scale = torch.rand(64, device="cuda") + 0.5
        shift = torch.randn(64, device="cuda")
        y = ops.bn_act_forward(x, mean, scale, shift, None, True)
    last = x[-1:].float()
    ref_mean = x[:, :8].float().mean((0, 2, 3))  # statistics over every image (first channels)
    torch.testing.assert_close(mean[:8], ref_mean, rtol=1e-3, atol=1e-3)
    expected = torch.relu((last - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    torch.testing.assert_close(y[-1:].float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.needs_cuda
def test_fused_conv_past_2_pow_31():
    """A 1x1 conv with BatchNorm + ReLU in its prologue over > 2^31 input and output elements."""
    _need(5 * 2 * BIG)
    x = _big_input()
    weight = (torch.randn(64, 64, 1, 1, device="cuda") * 0.1).to(torch.bfloat16)
    mean = torch.full((64,), 0.5, device="cuda")
    scale = torch.rand(64, device="cuda") + 0.5
    shift = torch.randn(64, device="cuda")
    with fusedres.use_backend("triton"):
        y, _ = ops.conv2d_forward(x, weight, in_mean=mean, in_scale=scale, in_shift=shift, in_act=True)
    last = x[-1:].float()
    a = torch.relu((last - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    expected = F.conv2d(a.to(torch.bfloat16).float(), weight.float())
    torch.testing.assert_close(y[-1:].float(), expected, rtol=2e-2, atol=2e-2)
