"""BatchNorm's per-channel bookkeeping ops against float64 computed from the raw values: the
forward (partial statistics merged, invstd, scale, shift, running update) on the reference and
Triton backends (the only producers of partials), the backward (grad_gamma, grad_beta and the
input gradient's coefficients from [C] sums or [T, C] per-tile rows) on every backend."""
import pytest
import torch

from fusedres import ops
from fusedres.ops.registry import implementations
from helpers import BACKEND_CASES, TOLERANCE

FORWARD_CASES = [c for c in BACKEND_CASES if c.values[1] in ("reference", "triton")]


def _partials(values: torch.Tensor, tile_rows: int, dtype):
    """rows [T], sum [T, C], m2 [T, C] of values [count, C] cut into tiles of tile_rows rows."""
    tiles = values.split(tile_rows)
    rows = torch.tensor([float(t.shape[0]) for t in tiles], dtype=dtype)
    sums = torch.stack([t.sum(0) for t in tiles]).to(dtype)
    m2 = torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in tiles]).to(dtype)
    return rows, sums, m2


@pytest.mark.parametrize("device,name", FORWARD_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine,running", [(True, True), (False, False), (True, False)])
def test_forward_finalize_matches_float64(device, name, dtype, affine, running):
    torch.manual_seed(0)
    count, channels, tile_rows = 77, 37, 16  # a ragged last tile, odd channel count
    values = torch.randn(count, channels, dtype=torch.float64) * 2 + 5  # mean far from 0
    rows, sums, m2 = (t.to(device) for t in _partials(values, tile_rows, dtype))
    # the conv kernel's layout: rows as the last column of the sum buffer
    buffer = torch.cat([sums, rows[:, None]], 1)
    rows, sums = buffer[:, channels], buffer[:, :channels]
    gamma = torch.rand(channels, device=device) + 0.5 if affine else None
    beta = torch.randn(channels, device=device) if affine else None
    rm = torch.randn(channels, device=device) if running else None
    rv = torch.rand(channels, device=device) + 0.5 if running else None
    rm0, rv0 = (None, None) if not running else (rm.double().clone(), rv.double().clone())
    impl = implementations("bn_forward_finalize")[name]
    mean, var, invstd, scale, shift = impl(rows, sums, m2, count, 1e-5, gamma, beta, rm, rv, 0.3)
    exp_var, exp_mean = torch.var_mean(values, 0, unbiased=False)
    exp_invstd = (exp_var + 1e-5).rsqrt()
    tol = dict(rtol=TOLERANCE["channel"][dtype], atol=TOLERANCE["channel"][dtype] / 10)
    torch.testing.assert_close(mean.double().cpu(), exp_mean, **tol)
    torch.testing.assert_close(var.double().cpu(), exp_var, **tol)
    torch.testing.assert_close(invstd.double().cpu(), exp_invstd, **tol)
    exp_scale = exp_invstd * (gamma.double().cpu() if affine else 1)
    torch.testing.assert_close(scale.double().cpu(), exp_scale, **tol)
    torch.testing.assert_close(shift.double().cpu(), beta.double().cpu() if affine else torch.zeros(channels, dtype=torch.float64),
                               **tol)
    if running:
        torch.testing.assert_close(rm.double().cpu(), 0.7 * rm0.cpu() + 0.3 * exp_mean, rtol=TOLERANCE["channel"][torch.float32], atol=1e-6)
        torch.testing.assert_close(rv.double().cpu(), 0.7 * rv0.cpu() + 0.3 * exp_var * count / (count - 1),
                                   rtol=TOLERANCE["channel"][torch.float32], atol=1e-6)


@pytest.mark.parametrize("device,name", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [0, 5])  # 0: [C] sums
@pytest.mark.parametrize("batch_stats", [True, False])
def test_backward_finalize_matches_float64(device, name, dtype, rows, batch_stats):
    torch.manual_seed(1)
    channels, count = 29, 123
    shape = (rows, channels) if rows else (channels,)
    s1 = (torch.randn(shape, dtype=dtype) + 0.5).to(device)
    s2 = (torch.randn(shape, dtype=dtype) - 0.5).to(device)
    invstd = (torch.rand(channels, dtype=dtype) + 0.5).to(device)
    scale = (torch.randn(channels, dtype=dtype)).to(device)
    impl = implementations("bn_backward_finalize")[name]
    grad_gamma, grad_beta, coef_xmu, coef_c = impl(s1, s2, invstd, scale, float(count), batch_stats)
    a = s1.double().cpu().sum(0) if rows else s1.double().cpu()
    b = s2.double().cpu().sum(0) if rows else s2.double().cpu()
    i, s = invstd.double().cpu(), scale.double().cpu()
    tol = dict(rtol=TOLERANCE["channel"][dtype], atol=TOLERANCE["channel"][dtype] / 10)
    torch.testing.assert_close(grad_gamma.double().cpu(), b * i, **tol)
    torch.testing.assert_close(grad_beta.double().cpu(), a, **tol)
    zero = torch.zeros(channels, dtype=torch.float64)
    torch.testing.assert_close(coef_xmu.double().cpu(), -s * i * i * b / count if batch_stats else zero, **tol)
    torch.testing.assert_close(coef_c.double().cpu(), -s * a / count if batch_stats else zero, **tol)


def test_public_functions_check_their_arguments():
    with pytest.raises(ValueError, match="partials must be rows"):
        ops.bn_forward_finalize(ops.StatsPartials(torch.ones(2), torch.zeros(3, 4), torch.zeros(3, 4)))
    with pytest.raises(ValueError, match=r"sum_dz and sum_dz_xmu must be \[C\] or \[T, C\]"):
        ops.bn_backward_finalize(torch.zeros(5), torch.zeros(5), torch.ones(4), torch.ones(4), 10)
    mean, var, invstd, scale, shift = ops.bn_forward_finalize(
        ops.StatsPartials(torch.tensor([3.0, 2.0]), torch.tensor([[3.0], [4.0]]), torch.tensor([[2.0], [0.0]])))
    # values {0, 1, 2} and {2, 2}: mean 1.4, var ((1.96 + 0.16 + 0.36) + 2 * 0.36) / 5 = 0.64
    torch.testing.assert_close(mean, torch.tensor([1.4]))
    torch.testing.assert_close(var, torch.tensor([0.64]))
