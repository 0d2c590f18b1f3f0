"""Bad input gets a clear error naming the argument; bad configuration likewise."""
import os
import warnings

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres import FusedBasicBlock, FusedBottleneck, ops
from fusedres.models import densenet
from helpers import activation


def test_op_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"x must be 4-D \[N, C, H, W\], got 3-D"):
        ops.bn_stats(torch.randn(2, 3, 4))


def test_op_rejects_integer_input():
    with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16, got torch.int64"):
        ops.bn_act_forward(torch.ones(2, 3, 4, 4, dtype=torch.long), None, None, torch.zeros(3))


def test_op_rejects_wrong_channel_vector():
    x = activation((2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"shift must have shape \[3\]"):
        ops.bn_act_forward(x, None, None, torch.zeros(4))
    with pytest.raises(ValueError, match=r"running_mean must have shape \[3\]"):
        ops.bn_stats(x, 1e-5, torch.zeros(5), torch.ones(5))
    with pytest.raises(ValueError, match="given together"):
        ops.bn_stats(x, 1e-5, torch.zeros(3), None)


def test_op_rejects_mismatched_residual():
    x = activation((2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"residual must have the input's shape \(2, 3, 4, 4\), got \(2, 3, 2, 2\)"):
        ops.bn_act_forward(x, None, None, torch.zeros(3), activation((2, 3, 2, 2)))


def test_op_rejects_running_stats_with_one_value_per_channel():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.bn_stats(activation((1, 3, 1, 1)), 1e-5, torch.zeros(3), torch.ones(3))


def test_cpp_kernel_checks_its_own_arguments():
    """Called directly through the dispatcher, the C++ ops still name the bad argument."""
    x = activation((2, 3, 4, 4))
    with pytest.raises(RuntimeError, match="shift must be a 1-D tensor of 3 per-channel values"):
        torch.ops.fusedres_kernels.bn_act_forward(x, None, None, torch.zeros(5), None, 1, 0.0)
    with pytest.raises(RuntimeError, match="residual must have the same memory format as input"):
        torch.ops.fusedres_kernels.bn_act_forward(x, None, None, torch.zeros(3),
                                          x.contiguous(memory_format=torch.channels_last), 1, 0.0)
    with pytest.raises(RuntimeError, match="input must be contiguous in NCHW or channels_last"):
        torch.ops.fusedres_kernels.bn_stats(x.transpose(2, 3), 1e-5, None, None, 0.1)


@pytest.mark.parametrize("block", [FusedBasicBlock(4, 4), FusedBottleneck(16, 4)])
def test_block_rejects_wrong_rank(block):
    with pytest.raises(ValueError, match=r"expected a 4-D input \[N, C, H, W\], got 3-D"):
        block(torch.randn(block.conv1.in_channels, 5, 5))


@pytest.mark.parametrize("block", [FusedBasicBlock(4, 4), FusedBottleneck(16, 4)])
def test_block_rejects_channel_mismatch(block):
    with pytest.raises(ValueError, match=r"input has 3 channels but the block expects \d+"):
        block(torch.randn(2, 3, 5, 5))


def test_block_rejects_integer_input():
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        FusedBasicBlock(4, 4)(torch.ones(2, 4, 5, 5, dtype=torch.int32))


@pytest.mark.parametrize("make,ref", [(lambda: FusedBasicBlock(4, 4), lambda: nn.BatchNorm2d(4)),
                                      (lambda: FusedBottleneck(16, 4), lambda: nn.BatchNorm2d(4))])
def test_block_batch_of_one_value_per_channel_matches_nn_message(make, ref):
    block = make()
    x = torch.randn(1, block.conv1.in_channels, 1, 1)
    with pytest.raises(ValueError) as ours:
        block(x)
    with pytest.raises(ValueError) as theirs:
        ref()(torch.randn(1, 4, 1, 1))
    assert str(ours.value) == str(theirs.value)
    block.eval()
    with torch.no_grad():
        assert block(x).shape[0] == 1  # fine in eval, as in nn


def test_constructor_errors_match_torchvision():
    with pytest.raises(ValueError, match="BasicBlock only supports groups=1 and base_width=64"):
        FusedBasicBlock(4, 4, groups=2)
    with pytest.raises(NotImplementedError, match="Dilation > 1 not supported in BasicBlock"):
        FusedBasicBlock(4, 4, dilation=2)


def test_backend_names_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        fusedres.set_backend("cudnn")
    monkeypatch.setenv("FUSEDRES_BACKEND", "fast")
    with pytest.raises(ValueError, match="FUSEDRES_BACKEND must be one of"):
        fusedres.get_backend()


def test_unavailable_backend_falls_back_to_reference_and_warns_once(lenient):
    x = activation((2, 3, 4, 4))
    with fusedres.use_backend("cuda"):
        with pytest.warns(RuntimeWarning, match="backend 'cuda' unavailable .*using the reference PyTorch path"):
            mean, _ = ops.bn_stats(x)
    torch.testing.assert_close(mean, x.double().mean((0, 2, 3)).float())


def test_the_suite_runs_strict():
    """conftest sets FUSEDRES_STRICT=1 for the whole suite, so a test that asks for a backend which
    cannot run fails instead of passing on the reference path; this keeps it from being dropped."""
    from fusedres.ops.registry import strict

    assert os.environ.get("FUSEDRES_STRICT") == "1"
    assert strict()


def test_strict_mode_raises_instead_of_falling_back(monkeypatch):
    """FUSEDRES_STRICT=1: a requested backend that cannot run the call raises, naming op, backend
    and reason; without it the same call falls back (the default a user gets)."""
    x = activation((2, 3, 4, 4))
    monkeypatch.setenv("FUSEDRES_STRICT", "1")
    with fusedres.use_backend("cuda"):
        with pytest.raises(RuntimeError, match=r"bn_stats: backend 'cuda' cannot run this call \(.*\), and "
                                               r"FUSEDRES_STRICT=1 forbids"):
            ops.bn_stats(x)
    monkeypatch.setenv("FUSEDRES_STRICT", "0")
    with fusedres.use_backend("cuda"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ops.bn_stats(x)


BLOCKS = {
    "FusedBasicBlock": lambda: FusedBasicBlock(4, 4),
    "FusedBottleneck": lambda: FusedBottleneck(16, 4),
    "FusedDenseBlock": lambda: fusedres.fuse(densenet.DenseNet(growth_rate=4, block_config=(2,), num_init_features=4,
                                                               bn_size=2)).features.denseblock1,
    "FusedTransition": lambda: fusedres.FusedTransition(4, 2),
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_every_fused_module_names_its_bad_input(name):
    """The README's error table, module rows: each case raises with the module's name and what
    was expected."""
    block = BLOCKS[name]()
    c = 16 if name == "FusedBottleneck" else 4
    cases = [
        (torch.randn(c, 5, 5), ValueError, r"expected a 4-D input \[N, C, H, W\], got 3-D"),
        (torch.randn(2, c + 1, 5, 5), ValueError, rf"input has {c + 1} channels but .* expects {c}"),
        (torch.ones(2, c, 5, 5, dtype=torch.int64), TypeError, "input must be a floating-point tensor"),
        (torch.randn(2, c, 5, 5, dtype=torch.float64), TypeError, "input is torch.float64 but the block's weights are "
                                                                   "torch.float32"),
        (torch.randn(2, c, 5, 5, device="meta"), ValueError, "input is on meta but the block's weights are on cpu"),
        ([1.0], TypeError, "input must be a torch.Tensor"),
    ]
    for x, error, message in cases:
        with pytest.raises(error, match=message) as info:
            block(x)
        assert type(block).__name__ in str(info.value)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a dtype other than the weights' is fine under autocast
        block(torch.randn(2, c, 5, 5))


def test_fuse_names_its_bad_arguments():
    with pytest.raises(TypeError, match="model must be an nn.Module, got list"):
        fusedres.fuse([nn.Conv2d(3, 3, 3)])
    with pytest.raises(TypeError, match="sync_bn must be a bool"):
        fusedres.fuse(nn.Conv2d(3, 3, 3), sync_bn=1)
    with pytest.raises(ValueError, match="fuse_report: this model did not come from fusedres.fuse"):
        fusedres.fuse_report(nn.Conv2d(3, 3, 3))
    with pytest.raises(TypeError, match="fusedres.refresh: model must be an nn.Module, got dict"):
        fusedres.refresh({})


def test_conv_op_names_mismatched_weight():
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"weight .*torch.float64.* must match x .*torch.float32"):
        fusedres.ops.conv2d_forward(x, torch.randn(3, 4, 1, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"weight \(3, 2, 1, 1\) with groups=1 expects 2 input channels, got x with 4"):
        fusedres.ops.conv2d_forward(x, torch.randn(3, 2, 1, 1))
    with pytest.raises(ValueError, match=r"in_scale must have shape \[4\]"):
        fusedres.ops.conv2d_forward(x, torch.randn(3, 4, 1, 1), in_mean=torch.zeros(4), in_scale=torch.ones(3),
                                    in_shift=torch.zeros(4))


def test_sync_batchnorm_rejects_an_empty_batch_while_synchronizing(monkeypatch):
    """An empty batch on one process while synchronizing: a clear error, not a hang later."""
    from fusedres import batchnorm

    monkeypatch.setattr(batchnorm, "sync_group", lambda group: fusedres.ops.SyncGroup(group))
    bn = fusedres.SyncBatchNorm2d(4)
    with pytest.raises(ValueError, match="SyncBatchNorm2d: an empty batch"):
        bn(torch.randn(0, 4, 3, 3))


def test_versions_are_compared_as_versions():
    from fusedres import _versions

    assert _versions.at_least("2.13.0+cpu", "2.4") and _versions.at_least("2.11.0a0+git1234", "2.4")
    assert _versions.at_least("2.10.0", "2.4"), "as strings, '2.10.0' < '2.4'"
    assert not _versions.at_least("2.3.1", "2.4")
    assert _versions.triton_too_old("2.3.0") and not _versions.triton_too_old("3.6.0")
    with pytest.raises(ImportError, match="fusedres needs torch >= 2.4"):
        _versions.check_torch("2.3.1")


def test_triton_interpreter_numpy_clash_is_a_named_reason(monkeypatch):
    """triton < 3.7's interpreter cannot run with numpy >= 2.4 (triton-lang/triton#9171): the triton
    backend then says so, by name, instead of failing inside a kernel with numpy's TypeError."""
    from fusedres import _versions
    from fusedres.ops import registry

    clash = _versions.triton_interpreter_clash
    assert "numpy<2.4" in clash("3.6.0", "2.4.6") and "triton-lang/triton#9171" in clash("3.6.0", "2.4.0")
    assert not clash("3.6.0", "2.3.5") and not clash("3.7.0", "2.4.6") and not clash("3.9.0", "2.4.6")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_versions, "INTERPRETER_NUMPY_FIXED_IN", "99.0")  # every installed triton "has" the bug
    import numpy

    registry._find_triton_interpreter_clash.cache_clear()
    try:
        why = registry.unavailable_reason("triton", torch.device("cpu"))
        if _versions.at_least(numpy.__version__, "2.4"):
            assert "numpy<2.4" in why
        else:
            assert why is None
    finally:
        monkeypatch.undo()
        registry._find_triton_interpreter_clash.cache_clear()


def test_unit_functions_name_their_bad_arguments():
    """fusedres.conv_bn_act and conv_bias_act_inference check their conv arguments as the ops do."""
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(3, 4, 3, 3)
    bn = (torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match=r"x must be 4-D \[N, C, H, W\], got 3-D"):
        fusedres.conv_bn_act(x[0], w, None, *bn)
    with pytest.raises(ValueError, match=r"expects 4 input channels, got x with 5"):
        fusedres.conv_bn_act(torch.randn(2, 5, 5, 5), w, None, *bn)
    with pytest.raises(ValueError, match=r"weight \(torch.float64, cpu\) must match x \(torch.float32, cpu\)"):
        fusedres.conv_bias_act_inference(x, w.double(), torch.zeros(3))
    with pytest.raises(ValueError, match=r"groups=3 must be a positive int dividing"):
        fusedres.conv_bias_act_inference(x, w, torch.zeros(3), groups=3)
