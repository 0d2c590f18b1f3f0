"""fuse() never raises on a user's model and never gives a wrong one (issue 32): the blocks that
crashed it, a forward with optional arguments (traced at their defaults, any other call runs the
module's own forward), a rewrite that fails (the module left as it was, the reason reported;
FUSEDRES_STRICT=1 raises), and the traced program checked before it replaces a forward."""
import copy
import importlib
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres.modules import FusedGraph
from helpers import compare_train_then_eval, randomize_bn

fuse_module = importlib.import_module("fusedres.fuse")  # (fusedres.fuse is also the function)
TOL = 1e-10  # float64 throughout: the fused model equals stock


def _conv_bn(c_in, c_out, k=3, track=True):
    return nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out, track_running_stats=track)


class PreActivation(nn.Module):
    """bn0 -> conv1 -> bn1 -> relu -> conv2 -> bn2 (+ x): the norm before the first run has the
    run as its only user (the rewrite once looked that run up as a module: AttributeError
    '_fusedres_run0')."""

    def __init__(self, c=6):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(c)
        self.conv1, self.bn1 = _conv_bn(c, c)
        self.conv2, self.bn2 = _conv_bn(c, c, 1)

    def forward(self, x):
        y = self.bn0(x)
        y = torch.relu(self.bn1(self.conv1(y)))
        return self.bn2(self.conv2(y)) + x * 0.5


class OptionalShortcut(nn.Module):
    """forward(x, shortcut=None) with `if shortcut is not None`: a trace with a proxy for
    shortcut took the add (the fused model then raised TypeError on forward(x))."""

    def __init__(self, c=6):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c, c)

    def forward(self, x, shortcut=None, scale: float = 1.0):
        y = self.bn1(self.conv1(x))
        if shortcut is not None:
            y = y + shortcut
        return torch.relu(y) * scale


class NoRunningStats(nn.Module):
    """A residual block whose norms keep no running statistics, inside a traced forward (a gate
    between the units keeps it off the FusedResidual path)."""

    def __init__(self, c=6):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c, c, track=False)
        self.conv2, self.bn2 = _conv_bn(c, c, track=False)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x * torch.sigmoid(x.mean((2, 3), keepdim=True)))))
        return torch.relu(self.bn2(self.conv2(y)) + x)


def _model(block):
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), block, nn.BatchNorm2d(6))).double()


@pytest.mark.parametrize("block", [PreActivation, OptionalShortcut, NoRunningStats], ids=lambda b: b.__name__)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_blocks_that_crashed_fuse_now_fuse_and_equal_stock(block, fmt):
    stock = _model(block())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back
        fused = fusedres.fuse(stock)
        report = fusedres.fuse_report(fused)
        assert not report.left, str(report)
        assert report.bn_fused >= 1, str(report)
        x = (torch.randn(2, 3, 7, 9, dtype=torch.float64) + 0.5).contiguous(memory_format=fmt)
        compare_train_then_eval(stock, fused, x, TOL, steps=2)


def test_a_call_the_trace_did_not_follow_runs_the_modules_own_forward():
    """The optional arguments were traced at their defaults: a call passing them (a shortcut
    tensor, another scale) runs OptionalShortcut's own forward, says so once, equals stock; the
    default call, by position or keyword, runs the fused program."""
    torch.manual_seed(0)
    stock = randomize_bn(OptionalShortcut()).double()
    fused = fusedres.fuse(stock)
    assert isinstance(fused, FusedGraph)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    shortcut = torch.randn_like(x)
    for module in (stock, fused):
        module.eval()
    calls = []
    program = fused._program(False)
    program.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        for args, kwargs in (((x,), {}), ((x, None), {}), ((x,), {"shortcut": None, "scale": 1.0})):
            torch.testing.assert_close(fused(*args, **kwargs), stock(*args, **kwargs), rtol=TOL, atol=TOL)
        assert len(calls) == 3, "the default calls must run the fused program"
        with pytest.warns(RuntimeWarning, match="not traced for") as caught:
            for args, kwargs in (((x, shortcut), {}), ((x,), {"scale": 2.0}), ((x,), {"shortcut": shortcut})):
                # (the module's own forward: bitwise stock's)
                torch.testing.assert_close(fused(*args, **kwargs), stock(*args, **kwargs), rtol=0, atol=0)
        assert len([w for w in caught if "not traced for" in str(w.message)]) == 1, "said once"
        assert len(calls) == 3, "a call the trace did not follow must not run the program"


class VarArgs(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c, c)

    def forward(self, x, *rest):
        return torch.relu(self.bn1(self.conv1(x))) * 2


def test_a_forward_a_trace_cannot_follow_is_left_with_the_reason():
    fused = fusedres.fuse(nn.Sequential(VarArgs()))
    report = fusedres.fuse_report(fused)
    assert not isinstance(fused[0], FusedGraph)
    assert "takes *rest" in str(report), str(report)


def test_a_rewrite_that_raises_leaves_the_module_as_it_was(monkeypatch):
    """Any failure inside one module's rewrite: that module runs as it was (its children still
    fused), the report names the module and the error; under FUSEDRES_STRICT=1 fuse raises."""
    stock = _model(PreActivation())

    def broken(*args, **kwargs):
        raise RuntimeError("a rewrite bug")

    monkeypatch.setattr(fuse_module.FusedGraph, "adopt", broken)
    monkeypatch.setenv("FUSEDRES_STRICT", "0")
    fused = fusedres.fuse(stock)
    report = fusedres.fuse_report(fused)
    left = [e for e in report.left if e.path == "1"]
    assert left and "could not rewrite it (RuntimeError: a rewrite bug)" in left[0].detail, str(report)
    assert type(fused[1]) is PreActivation
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64) + 0.5
    compare_train_then_eval(stock, fused, x, TOL, steps=1)
    monkeypatch.setenv("FUSEDRES_STRICT", "1")
    with pytest.raises(RuntimeError, match="a rewrite bug"):
        fusedres.fuse(stock)


def test_a_program_whose_runs_take_the_wrong_arguments_is_refused():
    """program_problem: a run called with other arguments than its spec takes (here: a join's
    run called with its input alone) is named, and graph_programs refuses the module."""
    block = PreActivation()
    programs, arguments, why = fuse_module.graph_programs(block)
    assert programs is not None, why
    graph, specs = programs[True]
    graph = copy.deepcopy(graph)
    run = next(n for n in graph.nodes if n.op == "call_module" and n.target == specs[0].target)
    run.args = run.args + (run.args[0],)
    problem = fuse_module.program_problem(block, graph, specs, arguments)
    assert problem is not None and specs[0].target in problem


class ReadsAttributes(nn.Module):
    """A forward whose trace reads plain attributes (timm's GhostNet: `F.dropout(x, self.drop_rate,
    self.training)`): each is a constant in the traced graph, so setting one must trace again."""

    def __init__(self, c=6):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c, c)
        self.scale = 1.0
        self.gated = False
        self.mode = "traceable"

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x))) * self.scale
        if self.gated:
            y = y * torch.sigmoid(y.mean((2, 3), keepdim=True))
        if self.mode == "data-dependent" and bool(x.sum() > 0):  # a branch torch.fx cannot trace
            y = y + 1
        return y


def test_setting_an_attribute_the_trace_read_traces_again():
    """After fuse, a user sets attributes the traced forward read: the fused model follows them
    (traced again, so still the fused program) and equals stock; one whose forward then no
    longer traces runs its own forward, says so once, and equals stock."""
    torch.manual_seed(0)
    stock = randomize_bn(ReadsAttributes()).double()
    fused = fusedres.fuse(stock)
    assert isinstance(fused, FusedGraph)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64) + 0.5
    for name, value in (("scale", 0.25), ("gated", True), ("scale", 0.25)):
        setattr(stock, name, value)
        setattr(fused, name, value)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the fused program runs: nothing falls back
            compare_train_then_eval(stock, fused, x, TOL, steps=1)
        assert fused.__dict__["_fusedres_arguments"] is not None
        assert fused._program(False)  # (the eval program built for the new attributes)
    with pytest.warns(RuntimeWarning, match="no longer traces") as caught:
        stock.mode = fused.mode = "data-dependent"
    assert len([w for w in caught if "no longer traces" in str(w.message)]) == 1
    compare_train_then_eval(stock, fused, x, TOL, steps=1)  # its own forward
    unfused = fusedres.unfuse(fused)
    assert type(unfused) is ReadsAttributes and unfused.mode == "data-dependent"


class MakesAConstant(nn.Module):
    """A forward that makes a tensor constant (torch.fx keeps it as `_tensor_constant0` on the
    traced module, as in torchvision's MaxViT: fuse once crashed building the program)."""

    def __init__(self, c=6):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c, c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return y * torch.tensor([0.5, 2.0, -1.0]).repeat(2).view(1, 6, 1, 1).to(x.dtype)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_a_traced_tensor_constant_is_kept_by_the_program_and_left_out_by_unfuse(fmt):
    stock = _model(MakesAConstant())
    fused = fusedres.fuse(stock)
    assert isinstance(fused[1], FusedGraph), str(fusedres.fuse_report(fused))
    x = (torch.randn(2, 3, 7, 9, dtype=torch.float64) + 0.5).contiguous(memory_format=fmt)
    compare_train_then_eval(stock, fused, x, TOL, steps=2)
    for copied in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        with torch.no_grad():
            torch.testing.assert_close(copied(x), fused(x), rtol=0, atol=0)
    unfused = fusedres.unfuse(fused)
    assert type(unfused[1]) is MakesAConstant
    assert not [k for k in vars(unfused[1]) if "constant" in k], sorted(vars(unfused[1]))
    assert not [k for k in vars(stock[1]) if "constant" in k], "fuse must leave the user's model as it was"
