"""Robustness: NaN and Inf propagate as in the reference, empty batches behave as the reference,
results are the same run to run (deterministic mode turns autotuning off), and the extension
loading and the fused modules are safe from several threads at once (the autotune cache's
thread safety: test_conv.py)."""
import copy
import subprocess
import sys
import threading

import pytest
import torch

import fusedres
from fusedres.kernels import conv_triton
from fusedres.models import densenet, resnet
from helpers import BACKEND_CASES, assert_close_scaled, randomize_bn

MODULE_CASES = [c for c in BACKEND_CASES if c.values[1] != "reference"]
FORMATS = [pytest.param(torch.contiguous_format, id="nchw"), pytest.param(torch.channels_last, id="channels_last")]


def _blocks():
    torch.manual_seed(0)
    down = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, stride=2, bias=False), torch.nn.BatchNorm2d(16))
    return {
        "basic": randomize_bn(resnet.BasicBlock(8, 8)),
        "bottleneck": randomize_bn(resnet.Bottleneck(8, 4, stride=2, downsample=down, groups=2, base_width=32)),
        "dense": randomize_bn(densenet.DenseNet(growth_rate=4, block_config=(2,), num_init_features=8, bn_size=2,
                                                num_classes=3).features[4:6]),
    }


def _pair(kind, fmt, device):
    ref = _blocks()[kind].to(device).to(memory_format=fmt)
    fused = fusedres.fuse(copy.deepcopy(ref))
    assert fusedres.fuse_report(fused).swapped, fusedres.fuse_report(fused)
    return ref, fused


def _same_nonfinite(got, expected, msg, leaks_across_groups=False):
    """NaN where the reference has NaN, +-Inf where it has +-Inf; finite values close.
    leaks_across_groups: a grouped conv on the Triton kernels multiplies each tile's inputs by a
    block-diagonal weight tile, so a non-finite input times a 0 off the diagonal is NaN in the
    other groups of its tile too (a known divergence, see the README): there the reference's
    non-finite values must be non-finite here, and values finite in both must agree."""
    if leaks_across_groups:
        assert (~got.isfinite())[~expected.isfinite()].all(), f"{msg}: a non-finite value became finite"
        both = got.isfinite() & expected.isfinite()
        if both.any():  # (in training a leaked NaN reaches the batch statistics: all is NaN)
            assert_close_scaled(got[both], expected[both], 1e-5, msg=msg)
        return
    assert torch.equal(got.isnan(), expected.isnan()), f"{msg}: NaN positions differ"
    assert torch.equal(got.isposinf(), expected.isposinf()) and torch.equal(got.isneginf(), expected.isneginf()), \
        f"{msg}: Inf positions differ"
    finite = expected.isfinite()
    if finite.any():
        assert_close_scaled(got[finite], expected[finite], 1e-5, msg=msg)


@pytest.mark.parametrize("kind", ["basic", "bottleneck", "dense"])
@pytest.mark.parametrize("device,name", MODULE_CASES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_and_inf_propagate_as_in_the_reference(kind, device, name, fmt, training):
    ref, fused = _pair(kind, fmt, device)
    ref.train(training), fused.train(training)
    x = (torch.randn(2, 8, 5, 5, device=device) + 0.5).contiguous(memory_format=fmt)
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    x[1, 5, 4, 4] = -float("inf")
    with fusedres.use_backend(name), torch.no_grad():
        expected, got = ref(x), fused(x)
    assert not expected.isfinite().all(), "the case exercises non-finite values"
    grouped_triton = kind == "bottleneck" and name == "triton"
    _same_nonfinite(got, expected, f"{kind} {'train' if training else 'eval'}", leaks_across_groups=grouped_triton)


@pytest.mark.parametrize("kind", ["basic", "bottleneck", "dense"])
@pytest.mark.parametrize("device,name", MODULE_CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_behaves_as_the_reference(kind, device, name, training):
    """An [0, C, H, W] batch: the reference's output shape, gradients and BatchNorm bookkeeping
    (num_batches_tracked counts it; the running statistics are left as they are)."""
    ref, fused = _pair(kind, torch.channels_last, device)
    ref.train(training), fused.train(training)
    x_ref = torch.empty(0, 8, 5, 5, device=device, requires_grad=True)
    x_fused = x_ref.detach().clone().requires_grad_()
    with fusedres.use_backend(name):
        expected, got = ref(x_ref), fused(x_fused)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        expected.sum().backward(), got.sum().backward()
    assert x_fused.grad.shape == x_ref.grad.shape
    for (n, b_ref), b in zip(ref.named_buffers(), fused.buffers()):
        assert torch.equal(b, b_ref), n
    for (n, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
        assert (p.grad is None) == (p_ref.grad is None) and (p.grad is None or torch.equal(p.grad, p_ref.grad)), n


@pytest.mark.parametrize("kind", ["basic", "bottleneck", "dense"])
@pytest.mark.parametrize("device,name", MODULE_CASES)
def test_same_input_gives_bitwise_the_same_result(kind, device, name):
    """No atomics in any kernel: a training step's output and gradients repeat bit for bit."""
    _, fused = _pair(kind, torch.channels_last, device)
    x = (torch.randn(3, 8, 5, 5, device=device) + 0.5).contiguous(memory_format=torch.channels_last)
    runs = []
    for _ in range(2):
        xi = x.clone().requires_grad_()
        with fusedres.use_backend(name):
            y = fused(xi)
            (y * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum().backward()
        runs.append([y.detach(), xi.grad] + [p.grad.clone() for p in fused.parameters()])
        fused.zero_grad()
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_deterministic_mode_turns_conv_autotuning_off(monkeypatch):
    """Autotuning picks a tile configuration by timing, per process; under
    torch.use_deterministic_algorithms(True) the fixed default runs instead."""
    monkeypatch.setattr(conv_triton, "triton_interpreted", lambda: False)
    monkeypatch.setenv("FUSEDRES_AUTOTUNE", "1")
    cuda = torch.device("cuda")
    assert conv_triton.autotune_enabled(cuda)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not conv_triton.autotune_enabled(cuda)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_extension_loading_and_first_calls_from_two_threads():
    """A fresh interpreter: two threads import fusedres and run its first ops at the same time."""
    code = (
        "import threading, torch\n"
        "errors = []\n"
        "barrier = threading.Barrier(2)\n"
        "def work():\n"
        "    try:\n"
        "        barrier.wait()\n"
        "        import fusedres\n"
        "        x = torch.randn(4, 3, 5, 5) + 1\n"
        "        m, s = fusedres.ops.bn_stats(x)\n"
        "        assert torch.allclose(m, x.mean((0, 2, 3)), atol=1e-5)\n"
        "        assert fusedres.extension_loaded()\n"
        "    except Exception as e:\n"
        "        errors.append(repr(e))\n"
        "ts = [threading.Thread(target=work) for _ in range(2)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "assert not errors, errors\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.parametrize("device,name", MODULE_CASES)
def test_fused_modules_from_two_threads_match_one_thread(device, name):
    """Two threads train their own fused block and share one eval block (its fold cache); each
    gets what it gets alone. The backend choice is per thread (use_backend)."""
    _, train_a = _pair("bottleneck", torch.channels_last, device)
    train_b = copy.deepcopy(train_a)
    _, shared = _pair("basic", torch.channels_last, device)
    shared.eval()
    xs = [(torch.randn(3, 8, 5, 5, device=device) + 0.5).contiguous(memory_format=torch.channels_last)
          for _ in range(2)]

    def run(block, x):
        with fusedres.use_backend(name):
            y = block(x.clone().requires_grad_())
            y.sum().backward()
            with torch.no_grad():
                return y.detach(), shared(x), [p.grad.clone() for p in block.parameters()]

    alone = [run(copy.deepcopy(train_a), xs[0]), run(copy.deepcopy(train_b), xs[1])]
    results = [None, None]
    barrier = threading.Barrier(2)

    def worker(i, block):
        barrier.wait()
        results[i] = run(block, xs[i])

    threads = [threading.Thread(target=worker, args=(i, b)) for i, b in enumerate((train_a, train_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert results[i] is not None, f"thread {i} failed"
        for a, b in zip(results[i][:2] + tuple(results[i][2]), alone[i][:2] + tuple(alone[i][2])):
            assert torch.equal(a, b)
