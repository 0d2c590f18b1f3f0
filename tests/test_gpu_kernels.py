"""Every kernel family on the GPU at real ResNet shapes (stage 1 of benchmarks/gpu_check.sh).

The rest of the suite checks odd shapes at small sizes; here the launches are the ones a ResNet-50
makes: many tiles in both directions, split-K weight gradients, the bf16 and tf32 tensor-core
paths (and exact float32), a tensor on a non-default GPU, and a CUDA graph capture with autotuning
on. Each result is judged against float64 and, for the convs, against cuDNN's own error on the
same inputs (at most ~2x it). Launch grids are recorded, so a case that meant to cross tiles or
split K fails if it did not.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fusedres
from fusedres import common, ops
from helpers import FORMATS, TOLERANCE, activation, backend

pytestmark = pytest.mark.needs_cuda
bf16 = torch.bfloat16


@contextlib.contextmanager
def launch_log():
    """Within: (kernel name, grid) of every Triton launch, the launches still run."""
    log, real = [], common._launch

    def logged(kernel, grid, device, args, kwargs):
        log.append((getattr(kernel, "fn", kernel).__name__, tuple(grid)))
        return real(kernel, grid, device, args, kwargs)

    common._launch = logged
    try:
        yield log
    finally:
        common._launch = real


@contextlib.contextmanager
def tf32(enabled: bool):
    """cuDNN's tf32 switch, which the fused conv kernels follow for float32 (conftest turns it off)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def scaled_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


# -------------------------------------------------------------------------------------------------
# BatchNorm kernels: statistics, normalize-activate forward, its backward reduction and elementwise
# pass, at a ResNet-50 layer1 activation (32 x 256 x 56 x 56, 25.7 M values).
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_bn_kernels_at_resnet_shape(name, fmt):
    torch.manual_seed(0)
    x = activation((32, 256, 56, 56), bf16, "cuda", fmt)
    grad = torch.randn_like(x)
    scale = torch.rand(256, device="cuda") + 0.5
    shift = torch.randn(256, device="cuda")
    with backend(name, "cuda"), launch_log() as log:
        mean, invstd = ops.bn_stats(x)
        y = ops.bn_act_forward(x, mean, scale, shift, None, True)
        sum_dz, sum_dz_xmu, _ = ops.bn_act_backward_reduce(grad, x, mean, scale, shift, None, True)
        coef_xmu = -scale * invstd * invstd * sum_dz_xmu / x[:, 0].numel()
        coef_c = -scale * sum_dz / x[:, 0].numel() - coef_xmu * mean
        dx = ops.bn_act_backward_elementwise(grad, x, mean, scale, shift, coef_xmu, coef_c, True)
    if name == "triton":
        assert {k for k, _ in log} >= {"_bn_stats_partial_kernel", "_bn_act_forward_kernel"}, log
    x64, g64 = x.double(), grad.double()
    var64, mean64 = torch.var_mean(x64, dim=(0, 2, 3), unbiased=False)
    rtol = 1e-4  # float32 sums of 25 M values, merged per tile
    torch.testing.assert_close(mean.double(), mean64, rtol=rtol, atol=rtol * mean64.abs().max().item())
    torch.testing.assert_close(invstd.double(), (var64 + 1e-5).rsqrt(), rtol=rtol, atol=0)
    with fusedres.use_backend("reference"):
        y64 = ops.bn_act_forward(x64, mean.double(), scale.double(), shift.double(), None, True)
        s64, sx64, _ = ops.bn_act_backward_reduce(g64, x64, mean.double(), scale.double(), shift.double(), None, True)
        dx64 = ops.bn_act_backward_elementwise(g64, x64, mean.double(), scale.double(), shift.double(),
                                               coef_xmu.double(), coef_c.double(), True)
    tol = TOLERANCE["op"][bf16]
    assert scaled_error(y, y64) < tol
    assert scaled_error(sum_dz, s64) < 1e-4 and scaled_error(sum_dz_xmu, sx64) < 1e-4
    assert scaled_error(dx, dx64) < tol


# -------------------------------------------------------------------------------------------------
# Conv kernels with BatchNorm fused at both ends: the forward with the input's BN-ReLU prologue and
# the output's statistics, the input gradient with the BN epilogue, the weight gradient.
# -------------------------------------------------------------------------------------------------
CONVS = {
    # (N, C_in, H, W), (C_out, C_in/groups, kh, kw), stride, padding, groups
    "resnet50 layer3 3x3 256": ((64, 256, 14, 14), (256, 256, 3, 3), 1, 1, 1),
    "resnet50 layer1 3x3 64 (split-K wgrad)": ((32, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1),
    "resnet50 layer2 downsample 1x1 s2": ((32, 256, 56, 56), (512, 256, 1, 1), 2, 0, 1),
    "resnet50 layer4 1x1 2048->512": ((64, 2048, 7, 7), (512, 2048, 1, 1), 1, 0, 1),
    "resnext50 layer2 3x3 g32 s2": ((32, 256, 56, 56), (256, 8, 3, 3), 2, 1, 32),
    "resnext50 layer1 3x3 g32x4": ((32, 128, 56, 56), (128, 4, 3, 3), 1, 1, 32),
}
PRECISIONS = {"bf16": (bf16, False), "tf32": (torch.float32, True), "fp32": (torch.float32, False)}


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("conv", list(CONVS))
def test_conv_kernels_at_resnet_shape(conv, precision):
    x_shape, w_shape, stride, padding, groups = CONVS[conv]
    dtype, allow_tf32 = PRECISIONS[precision]
    torch.manual_seed(1)
    x = activation(x_shape, dtype, "cuda", torch.channels_last)
    c_in = x_shape[1]
    weight = (torch.randn(w_shape, device="cuda") / (w_shape[1] * w_shape[2] * w_shape[3]) ** 0.5).to(dtype)
    weight = weight.contiguous(memory_format=torch.channels_last)
    mean = x.float().mean((0, 2, 3))
    scale = torch.rand(c_in, device="cuda") + 0.5
    shift = torch.randn(c_in, device="cuda") * 0.5
    bn = dict(in_mean=mean, in_scale=scale, in_shift=shift, in_act=True)
    conv_args = (stride, padding, 1, groups)
    with tf32(allow_tf32):
        with backend("triton", "cuda"), launch_log() as log:
            y, moments = ops.conv2d_forward(x, weight, None, *conv_args, stats=True, **bn)
            grad_y = torch.randn_like(y)
            du, sum_du, sum_du_xmu = ops.conv2d_input_grad(grad_y, weight, x, *conv_args, **bn)
            dw = ops.conv2d_weight_grad(grad_y, x, weight, *conv_args, **bn)
        # cuDNN on the same normalized input (rounded to dtype as the kernels round it)
        a = torch.relu((x.float() - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)
                       + shift.view(1, -1, 1, 1)).to(dtype)
        y_cudnn = F.conv2d(a, weight, None, stride, padding, 1, groups)
        da_cudnn, dw_cudnn, _ = torch.ops.aten.convolution_backward(
            grad_y, a, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], groups, [True, True, False])
    grids = {name: grid for name, grid in log}
    assert grids["_conv_fwd_kernel"][0] > 1, "the forward should cover several tiles"
    if "split-K" in conv:
        assert grids["_conv_wgrad_kernel"][2] > 1, "the weight gradient should split its pixel reduction"

    a64, w64, g64 = a.double(), weight.double(), grad_y.double()
    y64 = F.conv2d(a64, w64, None, stride, padding, 1, groups)
    da64 = torch.nn.grad.conv2d_input(a64.shape, w64, g64, stride, padding, 1, groups)
    dw64 = torch.nn.grad.conv2d_weight(a64, w64.shape, g64, stride, padding, 1, groups)
    mask = (a64 > 0)
    du64 = da64 * mask
    # the kernel's ReLU mask comes from one fused multiply-add, the test's from float64: where the
    # pre-activation is within rounding of 0 either side is right (float32 inputs: ~1 in 2e8)
    xmu64 = x.double() - mean.double().view(1, -1, 1, 1)
    u64 = xmu64 * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    undecided = u64.abs() <= 1e-6 * (xmu64.abs() * scale.double().view(1, -1, 1, 1) + shift.double().abs().view(
        1, -1, 1, 1))
    du, du64 = du.masked_fill(undecided, 0), du64.masked_fill(undecided, 0)
    du_cudnn = (da_cudnn * mask).masked_fill(undecided, 0)
    # floors: one rounding of the result (bf16); tf32 truncates its operands in Triton (about 2x
    # the error of rounding ones: 7.5e-4 emulated at K = 576-2304); float32 FMA chains over
    # K ~ 2304 (1.5e-6 emulated)
    floor = {"bf16": 2e-3, "tf32": 1.5e-3, "fp32": 4e-6}[precision]
    for what, ours, cudnn, ref in (("forward", y, y_cudnn, y64), ("input grad", du, du_cudnn, du64),
                                   ("weight grad", dw, dw_cudnn, dw64)):
        err, stock = scaled_error(ours, ref), scaled_error(cudnn, ref)
        assert err <= max(2 * stock, floor), f"{what}: error {err:.2e}, cuDNN's {stock:.2e}"
        if precision == "tf32":
            # tf32 keeps 10 mantissa bits: sums of hundreds of products land near 1e-4, an exact
            # float32 product far below; an error this small means the tf32 path did not run
            assert err > 1e-5, f"{what}: error {err:.2e} is float32's, not tf32's"
    # the epilogue's statistics and the BN sums against float64
    torch.testing.assert_close(moments.mean.double(), y64.mean((0, 2, 3)), rtol=0,
                               atol=10 * floor * y64.abs().max().item())
    xmu = x.double() - mean.double().view(1, -1, 1, 1)
    torch.testing.assert_close(sum_du.double(), du64.sum((0, 2, 3)), rtol=0,
                               atol=10 * floor * du64.abs().sum((0, 2, 3)).max().item())
    torch.testing.assert_close(sum_du_xmu.double(), (du64 * xmu).sum((0, 2, 3)), rtol=0,
                               atol=10 * floor * (du64 * xmu).abs().sum((0, 2, 3)).max().item())


# -------------------------------------------------------------------------------------------------
# A tensor on a GPU other than the current one, and a CUDA graph capture with autotuning on.
# -------------------------------------------------------------------------------------------------
def test_kernels_on_a_non_current_gpu():
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    torch.cuda.set_device(0)
    x = activation((8, 64, 28, 28), bf16, "cuda:1", torch.channels_last)
    weight = (torch.randn(64, 64, 3, 3, device="cuda:1") * 0.05).to(bf16).contiguous(memory_format=torch.channels_last)
    with backend("triton", "cuda"):
        y, _ = ops.conv2d_forward(x, weight, None, 1, 1)
        mean, invstd = ops.bn_stats(x)
    assert torch.cuda.current_device() == 0
    assert scaled_error(y, F.conv2d(x.double(), weight.double(), None, 1, 1)) < 2e-2
    torch.testing.assert_close(mean.double(), x.double().mean((0, 2, 3)), rtol=1e-4, atol=1e-4)


def test_conv_first_met_inside_a_cuda_graph_capture(monkeypatch):
    """Autotuning times candidates (a device synchronize), which a capture forbids: a conv first
    met while capturing runs the default configuration, and the graph replays it correctly."""
    from fusedres.kernels import conv_triton

    monkeypatch.setenv("FUSEDRES_AUTOTUNE", "1")
    x = activation((16, 96, 20, 20), bf16, "cuda", torch.channels_last)  # a geometry no other test uses
    weight = (torch.randn(96, 96, 3, 3, device="cuda") * 0.05).to(bf16).contiguous(memory_format=torch.channels_last)
    # the kernel is compiled and loaded once outside the capture (loading a module while a stream
    # captures is not permitted); untuned, so the key stays first met inside the capture
    monkeypatch.setenv("FUSEDRES_AUTOTUNE", "0")
    with backend("triton", "cuda"):
        ops.conv2d_forward(x, weight, None, 1, 1)
    torch.cuda.synchronize()
    monkeypatch.setenv("FUSEDRES_AUTOTUNE", "1")
    keys_before = set(conv_triton.tuned_configs())
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with backend("triton", "cuda"), torch.cuda.stream(stream), torch.cuda.graph(graph):
        y, _ = ops.conv2d_forward(x, weight, None, 1, 1)
    assert set(conv_triton.tuned_configs()) == keys_before, "nothing may be tuned while capturing"
    graph.replay()
    torch.cuda.synchronize()
    assert scaled_error(y, F.conv2d(x.double(), weight.double(), None, 1, 1)) < 2e-2
