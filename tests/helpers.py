"""Shared test helpers: device/backend cases, inputs, per-dtype tolerances, comparisons."""
import contextlib
import os

import pytest
import torch

import fusedres
from fusedres.ops.registry import resolve

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _cases():
    cases = [pytest.param("cpu", "reference", id="cpu-reference"), pytest.param("cpu", "cpu", id="cpu-cpp")]
    if INTERPRETED:
        cases.append(pytest.param("cpu", "triton", id="cpu-triton-interpreted"))
    for b in ("reference", "cuda", "triton"):
        cases.append(pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.needs_cuda))
    return cases


# (device, backend) pairs every op test runs over; every backend is compared with the same
# float64 reference, so they are also checked against each other.
BACKEND_CASES = _cases()
FAST_BACKENDS = [c for c in BACKEND_CASES if c.values[1] != "reference"]

@pytest.fixture(autouse=True, params=["cpu-isa-auto", "cpu-isa-baseline"])
def both_cpu_builds(request, monkeypatch):
    """The C++ CPU kernels are built twice (baseline x86-64, and AVX2 where the CPU has AVX2 and FMA:
    csrc/cpu/isa.h): a test module that takes this fixture (`cpu_isa = both_cpu_builds`) runs every
    test with the build this CPU picks and with the baseline one forced."""
    if request.param == "cpu-isa-baseline":
        monkeypatch.setenv("FUSEDRES_CPU_ISA", "baseline")
    else:
        monkeypatch.delenv("FUSEDRES_CPU_ISA", raising=False)
    return request.param


OPS = ("bn_stats", "bn_act_forward", "bn_act_backward_reduce", "bn_act_backward_elementwise", "bn_backward_finalize")


@contextlib.contextmanager
def backend(name: str, device: str):
    """Select `name` and fail (rather than silently test the fallback) if it cannot run on `device`."""
    with fusedres.use_backend(name):
        for op in OPS:
            chosen, _ = resolve(op, torch.device(device))
            assert chosen == name, f"{op}: backend {name} did not run on {device} (got {chosen})"
        yield


f64, f32, f16, bf16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
# The suite's one table of tolerances: by what is compared, then the result dtype. Every entry is
# against a float64 reference of the same inputs.
TOLERANCE = {
    # one BatchNorm op, elementwise (atol = rtol): float32 a few ulps, half types one rounding of
    # the output (fp16 2^-11, bf16 2^-8)
    "op": {f64: 1e-10, f32: 2e-5, f16: 2e-3, bf16: 1.6e-2},
    # a conv kernel's result, max error over the result's largest magnitude (assert_close_scaled):
    # float32 sums of up to a few thousand products, half types one rounding of the output
    "conv": {f64: 1e-12, f32: 2e-6, f16: 2e-3, bf16: 1.6e-2},
    # fused modules against the reference ones over SGD steps (scaled): errors compound through
    # several convs, the BatchNorm statistics and the optimizer steps
    "block": {f64: 1e-10, f32: 2e-5, f16: 2e-2, bf16: 8e-2},
    # hypothesis's random shapes and values (scaled): channels of one value, extreme scales
    "property": {f64: 1e-9, f32: 2e-5, f16: 5e-3, bf16: 3e-2},
    # per-channel bookkeeping ([C] vectors from sums of ~100 values; rtol, with atol a tenth of it)
    "channel": {f64: 1e-12, f32: 1e-5},
}
# (atol, rtol) of one op's activation-sized result, by result dtype
TOL = {dtype: (t, t) for dtype, t in TOLERANCE["op"].items()}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FORMATS = [torch.contiguous_format, torch.channels_last]


def activation(shape, dtype=torch.float32, device="cpu", memory_format=torch.contiguous_format, spread=1.0):
    """Random activation with a non-zero mean that differs per channel."""
    n, c = shape[0], shape[1]
    per_channel = torch.randn(c, dtype=torch.float64) * 2 + 0.5
    x = torch.randn(shape, dtype=torch.float64) * spread + per_channel.view(1, c, 1, 1)
    return x.to(dtype=dtype, device=device).contiguous(memory_format=memory_format)


def assert_close(actual, expected, dtype=None, atol=None, rtol=None, msg=""):
    """Per-dtype tolerances; NaN/Inf must sit at the same positions."""
    dtype = dtype or actual.dtype
    a, r = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol if atol is not None else a,
                               rtol=rtol if rtol is not None else r, equal_nan=False, msg=lambda m: f"{msg}\n{m}")


def same_format(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.stride() == b.stride()


def assert_close_scaled(actual, expected, tol, msg=""):
    """|actual - expected| <= tol * (max|expected| + |expected|): for results of whole blocks and
    models, whose rounding (e.g. BN folded into weights vs applied after the conv) scales with
    the largest value rather than with each element."""
    scale = expected.detach().double().abs().max().item()
    assert_close(actual, expected, atol=tol * scale + 1e-12, rtol=tol, msg=msg)


def randomize_bn(module):
    """Non-trivial BatchNorm affine parameters and running statistics, and conv biases, so every
    term of a fused block is exercised (a fresh BatchNorm is the identity at init)."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            if m.weight is not None:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0.0, 0.5)
            if m.running_mean is not None:
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
            m.bias.data.normal_()
    return module


class SmallResNet(torch.nn.Module):
    """Stem conv-BN-ReLU, a BasicBlock, a grouped Bottleneck with a strided downsample (5x5 -> 3x3),
    and a linear head when `classes` is given: every kind of fused block, at interpreter sizes."""

    def __init__(self, classes=None):
        super().__init__()
        from fusedres.models import resnet

        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = resnet.BasicBlock(8, 8)
        down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.block2 = resnet.Bottleneck(8, 4, stride=2, downsample=down, groups=2, base_width=32)
        self.head = nn.Linear(16, classes) if classes else None

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.head(x.mean((2, 3))) if self.head is not None else x


def compare_train_then_eval(original, fused, x, tol, steps=2):
    """Train steps (outputs, gradients, then parameters and buffers), then eval outputs."""
    opt_o = torch.optim.SGD(original.parameters(), lr=0.05)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.05)
    original.train()
    fused.train()
    for step in range(steps):
        xo, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        torch.manual_seed(step)  # the same random numbers for blocks left alone (drop path)
        yo = original(xo)
        torch.manual_seed(step)
        yf = fused(xf)
        assert_close_scaled(yf, yo, tol, msg=f"step {step} output")
        g = torch.randn_like(yo)
        yo.backward(g)
        yf.backward(g)
        assert_close_scaled(xf.grad, xo.grad, tol, msg=f"step {step} input gradient")
        for (name, pf), po in zip(fused.named_parameters(), original.parameters()):
            assert_close_scaled(pf.grad, po.grad, tol, msg=f"step {step} {name}")
        opt_o.step()
        opt_f.step()
        opt_o.zero_grad()
        opt_f.zero_grad()
    for (key, vf), vo in zip(fused.state_dict().items(), original.state_dict().values()):
        assert_close_scaled(vf.double(), vo.double(), tol, msg=key)
    original.eval()
    fused.eval()
    with torch.no_grad():
        assert_close_scaled(fused(x), original(x), tol, msg="eval")
