"""FusedBasicBlock / FusedBottleneck against the reference torchvision blocks, and a small ResNet."""
import copy
import functools
import warnings

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres import FusedBasicBlock, FusedBottleneck
from fusedres.models import BasicBlock, Bottleneck, resnet18, resnet50
from helpers import BACKEND_CASES, FORMATS, activation, assert_close, assert_close_scaled, backend

# (reference block, fused block, constructor kwargs, input channels)
BLOCK_CONFIGS = {
    "basic": (BasicBlock, FusedBasicBlock, dict(inplanes=6, planes=6), 6),
    "basic-stride2-downsample": (BasicBlock, FusedBasicBlock, dict(inplanes=5, planes=7, stride=2, downsample=True), 5),
    "bottleneck": (Bottleneck, FusedBottleneck, dict(inplanes=12, planes=3), 12),
    "bottleneck-stride2-downsample": (Bottleneck, FusedBottleneck, dict(inplanes=6, planes=3, stride=2, downsample=True), 6),
    "resnext-groups2": (Bottleneck, FusedBottleneck, dict(inplanes=10, planes=8, groups=2, base_width=16,
                                                          stride=2, downsample=True), 10),
    "bottleneck-dilation2": (Bottleneck, FusedBottleneck, dict(inplanes=12, planes=3, dilation=2), 12),
}


def _make_pair(config, norm_layer=None, dtype=torch.float32, fmt=torch.contiguous_format):
    ref_cls, fused_cls, kwargs, _ = BLOCK_CONFIGS[config]
    kwargs = dict(kwargs)
    if kwargs.pop("downsample", False):
        out = kwargs["planes"] * ref_cls.expansion
        nl = norm_layer or nn.BatchNorm2d
        kwargs["downsample"] = nn.Sequential(nn.Conv2d(kwargs["inplanes"], out, 1, kwargs["stride"], bias=False), nl(out))
    ref = ref_cls(**kwargs, norm_layer=norm_layer)
    for m in ref.modules():  # non-trivial affine parameters and running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ref = ref.to(dtype=dtype, memory_format=fmt)
    fused = fused_cls(**{k: (copy.deepcopy(v) if k == "downsample" else v) for k, v in kwargs.items()},
                      norm_layer=norm_layer).to(dtype=dtype, memory_format=fmt)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _compare_grads_and_step(fused, ref, optimizers, tol, msg):
    """Parameter gradients of fused and ref agree; then one optimizer step for both."""
    for (pn, p), pr in zip(fused.named_parameters(), ref.parameters()):
        assert_close_scaled(p.grad, pr.grad, tol, msg=f"{msg} grad {pn}")
    for opt in optimizers:
        opt.step()
        opt.zero_grad()


def _compare_state(fused, ref, dtype, msg):
    ref_state = ref.state_dict()
    for key, value in fused.state_dict().items():
        if value.is_floating_point():
            assert_close(value, ref_state[key], dtype, atol=5e-4, rtol=5e-4, msg=f"{msg}: {key}")
        else:
            assert torch.equal(value, ref_state[key]), f"{msg}: {key}"


@pytest.mark.parametrize("device,name", BACKEND_CASES)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("config", list(BLOCK_CONFIGS))
def test_training_steps_then_eval(device, name, fmt, config):
    """3 SGD steps on fresh inputs: outputs, input and parameter gradients, running statistics;
    then eval without gradients (folded BN) and with gradients (constant statistics)."""
    ref, fused = _make_pair(config, fmt=fmt)
    ref, fused = ref.to(device), fused.to(device)
    cin = BLOCK_CONFIGS[config][3]
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    opt_fused = torch.optim.SGD(fused.parameters(), lr=0.01, momentum=0.9)
    with backend(name, device):
        for step in range(3):
            x = activation((3, cin, 9, 7), torch.float32, device, fmt).requires_grad_()
            xr = x.detach().clone().requires_grad_()
            y, yr = fused(x), ref(xr)
            assert_close_scaled(y, yr, 1e-4, msg=f"step {step} output")
            assert y.stride() == yr.stride()
            g = torch.randn_like(yr)
            y.backward(g)
            yr.backward(g)
            assert_close_scaled(x.grad, xr.grad, 2e-4, msg=f"step {step} input grad")
            _compare_grads_and_step(fused, ref, (opt_fused, opt_ref), 5e-4, f"step {step}")
        _compare_state(fused, ref, torch.float32, "after training")

        fused.eval()
        ref.eval()
        x = activation((1, cin, 5, 5), torch.float32, device, fmt)  # batch 1 in eval
        with torch.no_grad():
            assert_close_scaled(fused(x), ref(x), 1e-4, msg="eval, no grad (folded)")
        x = x.requires_grad_()
        xr = x.detach().clone().requires_grad_()
        y, yr = fused(x), ref(xr)
        assert_close_scaled(y, yr, 1e-4, msg="eval with grad")
        y.sum().backward()
        yr.sum().backward()
        assert_close_scaled(x.grad, xr.grad, 2e-4, msg="eval input grad")
        for (pn, p), pr in zip(fused.named_parameters(), ref.parameters()):
            assert_close_scaled(p.grad, pr.grad, 5e-4, msg=f"eval grad {pn}")
        _compare_state(fused, ref, torch.float32, "eval leaves running statistics alone")


@pytest.mark.parametrize("device,name", BACKEND_CASES)
@pytest.mark.parametrize("config", ["basic-stride2-downsample", "bottleneck-stride2-downsample"])
def test_float64_tight(device, name, config):
    ref, fused = _make_pair(config, dtype=torch.float64)
    ref, fused = ref.to(device), fused.to(device)
    x = activation((2, BLOCK_CONFIGS[config][3], 7, 7), torch.float64, device).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    with backend(name, device):
        y = fused(x)
        y.backward(torch.ones_like(y))
    yr = ref(xr)
    yr.backward(torch.ones_like(yr))
    assert_close(y, yr, torch.float64, atol=1e-9, rtol=1e-9)
    assert_close(x.grad, xr.grad, torch.float64, atol=1e-9, rtol=1e-9)
    _compare_state(fused, ref, torch.float64, "float64 running stats")


def _error(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("device,name", BACKEND_CASES)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("config", ["basic-stride2-downsample", "bottleneck"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_autocast_bfloat16_within_2x_of_stock(device, name, fmt, config, train):
    """Under autocast, our error against a float64 run is at most ~2x the stock block's own error."""
    ref, fused = _make_pair(config, fmt=fmt)
    ref, fused = ref.to(device).train(train), fused.to(device).train(train)
    ref64 = copy.deepcopy(ref).double()
    x = activation((2, BLOCK_CONFIGS[config][3], 8, 8), torch.float32, device, fmt)
    with backend(name, device), torch.autocast(device, dtype=torch.bfloat16):
        y = fused(x)
        yr = ref(x)
    y64 = ref64(x.double())
    assert y.dtype == yr.dtype == torch.bfloat16
    assert y.stride() == yr.stride()
    assert _error(y, y64) <= 2 * _error(yr, y64) + 1e-2


@pytest.mark.parametrize("device,name", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_model_within_2x_of_stock(device, name, dtype):
    """A model converted with .half() / .bfloat16() (BN buffers too) trains as the stock one does."""
    ref, fused = _make_pair("basic-stride2-downsample", dtype=dtype)
    ref, fused = ref.to(device), fused.to(device)
    ref64 = copy.deepcopy(ref).double()
    x = activation((2, 5, 8, 8), dtype, device)
    with backend(name, device):
        y = fused(x)
    yr = ref(x)
    y64 = ref64(x.double())
    assert y.dtype == dtype
    assert _error(y, y64) <= 2 * _error(yr, y64) + 1e-2
    rm = fused.bn1.running_mean.double()
    assert _error(rm, ref.bn1.running_mean) <= 2 * _error(ref.bn1.running_mean, ref64.bn1.running_mean) + 1e-2


def test_state_dict_keys_match_torchvision_both_ways():
    for ref_cls, fused_cls, kwargs, _ in BLOCK_CONFIGS.values():
        kwargs = dict(kwargs)
        if kwargs.pop("downsample", False):
            out = kwargs["planes"] * ref_cls.expansion
            kwargs["downsample"] = nn.Sequential(nn.Conv2d(kwargs["inplanes"], out, 1, kwargs["stride"], bias=False),
                                                 nn.BatchNorm2d(out))
        ref = ref_cls(**kwargs)
        fused = fused_cls(**{k: copy.deepcopy(v) for k, v in kwargs.items()})
        assert list(ref.state_dict()) == list(fused.state_dict())
        fused.load_state_dict(ref.state_dict(), strict=True)
        ref.load_state_dict(fused.state_dict(), strict=True)
        if "downsample" in kwargs:
            assert {"downsample.0.weight", "downsample.1.running_var"} <= set(fused.state_dict())


def test_resnet_state_dict_keys_match():
    ref = resnet50(base_planes=4, num_classes=3)
    fused = resnet50(block=FusedBottleneck, base_planes=4, num_classes=3)
    assert list(ref.state_dict()) == list(fused.state_dict())
    assert "layer1.0.conv3.weight" in fused.state_dict() and "layer2.0.downsample.1.num_batches_tracked" in fused.state_dict()


@pytest.mark.parametrize("config", ["basic-stride2-downsample", "bottleneck-stride2-downsample"])
def test_from_module_shares_weights(config):
    ref, _ = _make_pair(config)
    fused_cls = BLOCK_CONFIGS[config][1]
    fused = fused_cls.from_module(ref)
    assert fused.conv1.weight is ref.conv1.weight and fused.downsample is ref.downsample
    x = activation((2, BLOCK_CONFIGS[config][3], 6, 6))
    ref_copy = copy.deepcopy(ref)
    assert_close_scaled(fused(x), ref_copy(x), 1e-4)
    assert torch.equal(ref.bn1.num_batches_tracked, ref_copy.bn1.num_batches_tracked)  # shared buffers updated
    assert ref.bn1.num_batches_tracked.item() == 1


def test_from_module_rejects_other_modules():
    with pytest.raises(TypeError, match="lacks"):
        FusedBottleneck.from_module(BasicBlock(4, 4))


def test_zero_init_last_bn_and_bn_hyperparameters():
    """zero-init of the last BN (torchvision's zero_init_residual), eps and momentum=None honoured."""
    norm = functools.partial(nn.BatchNorm2d, eps=1e-3, momentum=None)
    ref, fused = _make_pair("bottleneck-stride2-downsample", norm_layer=norm)
    nn.init.zeros_(ref.bn3.weight)
    nn.init.zeros_(fused.bn3.weight)
    for step in range(3):
        x = activation((2, 6, 7, 7), spread=1 + step)
        assert_close_scaled(fused(x), ref(x), 1e-4)
    assert fused.bn1.eps == 1e-3 and fused.bn1.momentum is None
    _compare_state(fused, ref, torch.float32, "momentum=None cumulative average")


class _CustomNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 0.5


def test_unsupported_norm_layer_falls_back_and_warns_once():
    ref, fused = _make_pair("basic", norm_layer=_CustomNorm)
    x = activation((2, 6, 5, 5))
    with pytest.warns(RuntimeWarning, match="reference forward: _CustomNorm"):
        y = fused(x)
    assert_close(y, ref(x), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused(x)  # said once only


def test_custom_downsample_module_is_called_as_is():
    down = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6))
    ref = BasicBlock(6, 6, stride=2, downsample=down)
    fused = FusedBasicBlock(6, 6, stride=2, downsample=copy.deepcopy(down))
    fused.load_state_dict(ref.state_dict())
    x = activation((2, 6, 8, 8))
    assert_close_scaled(fused(x), ref(x), 1e-4)


def test_folded_weights_cache_follows_weight_updates():
    ref, fused = _make_pair("basic")
    ref.eval()
    fused.eval()
    x = activation((2, 6, 5, 5))
    with torch.no_grad():
        fused(x)
        for m in (ref, fused):
            m.conv1.weight.mul_(1.5)
            m.bn2.running_var.mul_(2.0)
        assert_close_scaled(fused(x), ref(x), 1e-4)


def test_spatial_size_one_eval_and_train():
    ref, fused = _make_pair("bottleneck")
    x = activation((2, 12, 1, 1))
    assert_close_scaled(fused(x), ref(x), 1e-4)  # train: N*H*W = 2
    ref.eval()
    fused.eval()
    with torch.no_grad():
        assert_close_scaled(fused(x[:1]), ref(x[:1]), 1e-4)


SMALL_RESNETS = {
    "resnet18": (lambda **k: resnet18(base_planes=8, **k), FusedBasicBlock),
    "resnet50": (lambda **k: resnet50(base_planes=4, **k), FusedBottleneck),
}


def _small_resnet_cases(interpreted):
    """(device, backend, format, arch) for every backend, format and architecture, except that the
    Triton interpreter (3 minutes a model) runs only the (arch, format) pairs in `interpreted`:
    the blocks of both architectures in both formats are checked on it one by one in
    test_training_steps_then_eval, and the two model tests below each take a different pair."""
    cases = []
    for c in BACKEND_CASES:
        for arch in SMALL_RESNETS:
            for fmt_id, fmt in zip(("nchw", "channels_last"), FORMATS):
                if c.values == ("cpu", "triton") and (arch, fmt_id) not in interpreted:
                    continue
                cases.append(pytest.param(*c.values, fmt, arch, id=f"{arch}-{fmt_id}-{c.id}", marks=c.marks))
    return cases


@pytest.mark.parametrize("device,name,fmt,arch", _small_resnet_cases({("resnet50", "channels_last")}))
def test_small_resnet_sgd_steps_float64(device, name, fmt, arch):
    """A narrow ResNet of torchvision's architecture: 3 SGD steps, then eval, fused vs stock, in
    float64. zero_init_residual=True (torchvision's recipe option) keeps the tiny net well
    conditioned: without it, batch 4 leaves layer4's BN 4 values per channel and SGD amplifies
    rounding ~100x per step (float64 gradients then agree to only 3e-10, 4e-7, 3e-6)."""
    make, block = SMALL_RESNETS[arch]
    ref = make(num_classes=5, zero_init_residual=True).to(device=device, dtype=torch.float64, memory_format=fmt)
    fused = make(num_classes=5, block=block).to(device=device, dtype=torch.float64, memory_format=fmt)
    fused.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_fused = torch.optim.SGD(fused.parameters(), lr=0.1)
    with backend(name, device):
        for step in range(3):
            x = activation((4, 3, 32, 32), torch.float64, device, fmt)
            target = torch.randint(0, 5, (4,), device=device)
            loss = nn.functional.cross_entropy(fused(x), target)
            loss_ref = nn.functional.cross_entropy(ref(x), target)
            assert_close_scaled(loss, loss_ref, 1e-9, msg=f"step {step} loss")
            loss.backward()
            loss_ref.backward()
            _compare_grads_and_step(fused, ref, (opt_fused, opt_ref), 1e-9, f"step {step}")
        _compare_state(fused, ref, torch.float64, "after SGD")
        fused.eval()
        ref.eval()
        x = activation((2, 3, 32, 32), torch.float64, device, fmt)
        with torch.no_grad():
            assert_close_scaled(fused(x), ref(x), 1e-9)


@pytest.mark.parametrize("device,name,fmt,arch", _small_resnet_cases({("resnet18", "nchw")}))
def test_small_resnet_float32_within_2x_of_stock(device, name, fmt, arch):
    """float32 forward + backward, judged as STYLE.md #7 says: our error against a float64 run at
    most 2x the stock float32 model's. (The narrow ResNet-50 is so ill-conditioned at init that
    stock float32 gradients are ~0.2 relative off float64, so fused-vs-stock would test nothing.)"""
    make, block = SMALL_RESNETS[arch]
    ref = make(num_classes=5).to(device=device, memory_format=fmt)
    fused = make(num_classes=5, block=block).to(device=device, memory_format=fmt)
    fused.load_state_dict(ref.state_dict())
    ref64 = copy.deepcopy(ref).double()
    x = activation((4, 3, 32, 32), torch.float32, device, fmt)
    target = torch.randint(0, 5, (4,), device=device)
    with backend(name, device):
        losses = [nn.functional.cross_entropy(m(x.to(m.fc.weight.dtype)), target) for m in (fused, ref, ref64)]
        for loss in losses:
            loss.backward()
    assert _error(losses[0], losses[2]) <= 2 * _error(losses[1], losses[2]) + 1e-4

    def flat(model):
        return torch.cat([p.grad.double().flatten() for p in model.parameters()])

    g64 = flat(ref64)
    ours = (flat(fused) - g64).norm() / g64.norm()
    stock = (flat(ref) - g64).norm() / g64.norm()
    # Norm-wise over all gradients: per-tensor maxima of an ill-conditioned net are a coin toss
    # (the pure-PyTorch reference backend lands 2.4x over stock on single tensors too).
    assert ours <= 2 * stock + 1e-6, (ours.item(), stock.item())
    _compare_state(fused, ref, torch.float32, "running statistics")
