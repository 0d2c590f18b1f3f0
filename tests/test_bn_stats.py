"""bn_stats: every backend against the float64 reference, both memory formats, every dtype."""
import pytest
import torch
import torch.nn.functional as F

from fusedres import ops
from fusedres.ops.bn_stats import bn_stats_reference
from helpers import BACKEND_CASES, DTYPES, FORMATS, activation, assert_close, backend, both_cpu_builds

cpu_isa = both_cpu_builds  # every test twice: the C++ CPU kernels' AVX2 build and the baseline one
SHAPES = [(2, 5, 7, 9), (3, 13, 1, 1), (1, 3, 5, 5), (4, 17, 3, 5), (2, 70, 4, 3), (2, 3, 23, 29)]


@pytest.mark.parametrize("device,name", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
def test_matches_float64_reference(device, name, dtype, shape, fmt):
    x = activation(shape, dtype, device, fmt, spread=1.5)
    with backend(name, device):
        mean, invstd = ops.bn_stats(x, 1e-5)
    ref_mean, ref_invstd = bn_stats_reference(x.double(), 1e-5)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == acc and invstd.dtype == acc
    # Statistics accumulate in float32 whatever the input dtype: float32 tolerance for all.
    assert_close(mean, ref_mean, acc)
    assert_close(invstd, ref_invstd, acc)


@pytest.mark.parametrize("device,name", BACKEND_CASES)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
def test_stable_when_mean_dwarfs_spread(device, name, fmt):
    """1e3 + N(0, 1): sum(x^2)/n - mean^2 in float32 would lose the variance (relative error ~1e-1)."""
    x = (1e3 + torch.randn(8, 6, 16, 16, dtype=torch.float64)).float().to(device).contiguous(memory_format=fmt)
    with backend(name, device):
        mean, invstd = ops.bn_stats(x, 1e-5)
    ref_mean, ref_invstd = bn_stats_reference(x.double(), 1e-5)
    assert_close(mean, ref_mean, torch.float32, rtol=1e-6, atol=0)
    assert_close(invstd, ref_invstd, torch.float32, rtol=1e-4, atol=0)
    naive_var = (x * x).mean((0, 2, 3)) - x.mean((0, 2, 3)) ** 2  # what the test guards against
    assert ((naive_var + 1e-5).rsqrt() - ref_invstd.float()).abs().max() > 1e-3


@pytest.mark.parametrize("device,name", BACKEND_CASES)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float16], ids=str)
def test_running_stats_match_batch_norm(device, name, fmt, buffer_dtype):
    """Several steps, changing momentum, against F.batch_norm's own update (unbiased running var)."""
    c = 7
    rm, rv = torch.zeros(c, device=device, dtype=buffer_dtype), torch.ones(c, device=device, dtype=buffer_dtype)
    ref_rm, ref_rv = rm.clone().float(), rv.clone().float()
    for step, momentum in enumerate([0.1, 0.3, 1.0 / 3, 0.05]):
        x = activation((3, c, 5, 4), torch.float32, device, fmt, spread=1 + step)
        with backend(name, device):
            ops.bn_stats(x, 1e-5, rm, rv, momentum)
        F.batch_norm(x, ref_rm, ref_rv, training=True, momentum=momentum, eps=1e-5)
    tol = 2e-3 if buffer_dtype == torch.float16 else 2e-6
    assert_close(rm.float(), ref_rm, torch.float32, atol=tol, rtol=tol)
    assert_close(rv.float(), ref_rv, torch.float32, atol=tol, rtol=tol)


@pytest.mark.parametrize("device,name", [c for c in BACKEND_CASES if c.values[1] == "triton"])
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
def test_triton_many_splits(device, name, fmt, monkeypatch):
    """Force several row splits so the cross-program Chan merge is exercised at small sizes."""
    from fusedres.kernels import tiles

    original = tiles.reduce_launch_shape

    def split_more(outer, channels, inner, dev):
        block_c, _, _, _ = original(outer, channels, inner, dev)
        block_r = 16
        outer_per_split = max(1, outer // 5)
        return block_c, block_r, outer_per_split, -(-outer // outer_per_split)

    monkeypatch.setattr("fusedres.kernels.bn_stats_triton.reduce_launch_shape", split_more)
    monkeypatch.setattr("fusedres.kernels.bn_act_triton.reduce_launch_shape", split_more)
    x = activation((6, 9, 9, 7), torch.float32, device, fmt) * 10 + 100
    with backend(name, device):
        mean, invstd = ops.bn_stats(x, 1e-5)
        g = torch.randn_like(x)
        sums = ops.bn_act_backward_reduce(g, x, mean, invstd, torch.zeros_like(mean), None, act=True)
    ref_mean, ref_invstd = bn_stats_reference(x.double(), 1e-5)
    assert_close(mean, ref_mean, torch.float32)
    assert_close(invstd, ref_invstd, torch.float32)
    with backend("reference", device):
        ref_sums = ops.bn_act_backward_reduce(g.double(), x.double(), mean.double(), invstd.double(),
                                              torch.zeros_like(mean).double(), None, act=True)
    assert_close(sums[0], ref_sums[0], torch.float32, atol=1e-4)
    assert_close(sums[1], ref_sums[1], torch.float32, atol=1e-3)
