"""A fused model equals stock under any sequence of what users do to a model (issue 22).

`ModelsMachine` is a hypothesis RuleBasedStateMachine holding three copies of one model: the
fused one (fusedres.fuse), the stock one it came from, and a float64 twin of the stock one. Each
rule does one thing a user does to a model, to all three alike: eval forward (under no_grad or
inference_mode); eval forward + backward (every BatchNorm frozen); train forward + backward
without a step (gradients accumulate); train-mode forward without gradients (BatchNorm
recalibration, under no_grad or inference_mode); an optimizer step (SGD with momentum, or
AdamW); freezing and unfreezing parameters; one BatchNorm put in eval inside a training model
(frozen-BN fine-tuning); momentum=None and back; saving and loading a state_dict (its own earlier
one, or the twin's); `.to(memory_format)`; `.double()` / `.float()`; deepcopy or pickle of model
and optimizer together; autocast on and off. Modes change through model.train() / eval(), or
(drawn per sequence) by setting every module's flag, which keeps the fused modules' caches
across mode changes so that only their keys can tell what changed.

After every rule the fused model's state (running statistics, parameters, gradients) must be as
close to the float64 twin as stock's is, and so must an eval forward's output (and each rule's
own outputs): per tensor,
    err(fused) <= RATIO * err(stock) + FLOOR[dtype],  err(a) = ||a - twin|| / ||twin||
(once the state has seen half precision, root-sum-square errors over each group; see
check_group), and num_batches_tracked equal. The twin never autocasts: it is what a
low-precision run approximates. The bug of issue 22 (a BatchNorm fold cached across a training
forward) gave an eval output 0.6-0.9 relative off; float32 rounding gives ~1e-6.

Subclasses (tests/test_stateful.py, tests/test_real_models.py) say which model, input and path;
`run` drives one with a bounded budget: FUSEDRES_STATEFUL_EXAMPLES sequences (default per test)
of at most FUSEDRES_STATEFUL_STEPS rules (default 12), derandomized (the same sequences each run)
unless FUSEDRES_STATEFUL_RANDOM=1. A failure shrinks to a minimal sequence, which hypothesis
prints as code.
"""
import contextlib
import copy
import inspect
import io
import os
import pickle
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import hypothesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import fusedres

f32, f64 = torch.float32, torch.float64
RATIO = 2.0  # "at most ~2x stock's own error" (DEVELOPERS.md)
# L2-relative: float32 rounding of a whole-network result (2^-24 per op, summed over depth, as
# tests/test_real_models.py), float64's, and float16 / bfloat16's once a model has run under
# autocast (its running statistics and weights keep that error)
FLOOR = {f32: 2e-5, f64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# BatchNorm biases are shifted by this first, so that few ReLU inputs lie within a rounding of
# zero: one flipped mask moves every earlier gradient by ~1e-3 relative, in stock and fused alike
# but at random places (tests/test_real_models.py measured up to 400x between two stock runs)
BN_BIAS_SHIFT = 3.0
NAMES = ("fused", "stock", "twin")


def norm(t: torch.Tensor) -> float:
    return t.detach().double().cpu().norm().item()


def rss_error(actual, twin, scale: Optional[float] = None) -> float:
    """sqrt(sum ||a - twin||^2) over lists of tensors, relative to `scale` (default: the twins'
    sqrt(sum ||twin||^2))."""
    diff = sum((a.detach().double().cpu() - t.detach().double().cpu()).pow(2).sum().item()
               for a, t in zip(actual, twin))
    if scale is None:
        scale = sum(norm(t) ** 2 for t in twin) ** 0.5
    return diff ** 0.5 / scale if scale > 0 else diff ** 0.5


# A tensor's error is relative to its own norm, or to this fraction of the largest norm in its
# group where its own is smaller: a gradient that is zero in exact arithmetic (a BatchNorm's bias
# whose only path runs into a later training-mode BatchNorm, which removes it) is float32 noise in
# stock and fused alike, ~1e-7-1e-6 of the group's largest gradient, which against 1e-3 of that
# largest still failed 2x stock by chance (a ResNeXt block's bn2.bias: 3.3e-4 against 1.3e-4)
TINY = 0.1


class ModelsMachine(RuleBasedStateMachine):
    """Set by subclasses: make_stock() (a float32 model, the stock one), input_shape, the group of
    parameters freezing works on (prefixes of parameter names), and backend (fusedres.use_backend)."""

    make_stock: Callable[[], nn.Module] = None
    input_shape: Tuple[int, ...] = None
    freeze_groups: Tuple[str, ...] = ()
    backend_name = "auto"
    autocast_dtype = torch.bfloat16
    memory_format = torch.contiguous_format  # the models' and inputs' format at the start
    stats: Dict[str, int] = None  # counts over the whole test run (what the rules exercised), per subclass

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        stock = type(self).make_stock().float()
        with torch.no_grad():
            for m in stock.modules():
                if isinstance(m, nn.BatchNorm2d) and m.bias is not None:
                    m.bias.add_(BN_BIAS_SHIFT)
        fused = fusedres.fuse(stock)  # a deep copy: same values, its own tensors
        twin = copy.deepcopy(stock).double()
        self.models = {"fused": fused, "stock": stock, "twin": twin}
        for model in self.models.values():
            model.to(memory_format=self.memory_format)
        self.dtype = f32  # fused and stock (the twin is float64 throughout)
        self.autocast = False
        # the floor of the lowest precision the models' state (running statistics, weights, the
        # optimizer's buffers) has been computed in; it never goes back down
        self.coarsest = FLOOR[f64]
        self.frozen_bns = set()
        self.switch = "train()"  # how modes change (set_mode)
        self.checkpoint: Optional[Dict[str, dict]] = None
        self.opts = {}
        self.input_grads = {}
        self.bn_names = [n for n, m in stock.named_modules() if isinstance(m, nn.BatchNorm2d)]
        self.stats = type(self).stats

    # -- plumbing ------------------------------------------------------------------------------
    def count(self, what: str) -> None:
        """One more run of the calling rule (stats[its name]) and of `what` it did."""
        rule_name = inspect.currentframe().f_back.f_code.co_name
        for key in {rule_name, what}:
            self.stats[key] = self.stats.get(key, 0) + 1

    def backend(self):
        return fusedres.use_backend(self.backend_name)

    def inputs(self, seed: int) -> Dict[str, torch.Tensor]:
        """One random input, non-zero mean per channel, in the models' dtype and memory format (the
        twin's in float64, from the same values)."""
        g = torch.Generator().manual_seed(seed)
        shape = self.input_shape
        x = torch.randn(shape, generator=g, dtype=f64) + torch.randn(shape[1], generator=g, dtype=f64).view(1, -1, 1, 1)
        x = x.contiguous(memory_format=self.memory_format)
        return {"fused": x.to(self.dtype), "stock": x.to(self.dtype), "twin": x.clone()}

    def context(self, name: str, grad: str):
        """grad: "grad", "no_grad" or "inference_mode"; autocast for fused and stock only."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.backend())
        stack.enter_context({"grad": contextlib.nullcontext, "no_grad": torch.no_grad,
                             "inference_mode": torch.inference_mode}[grad]())
        if self.autocast and name != "twin":
            stack.enter_context(torch.autocast("cpu", dtype=self.autocast_dtype))
        return stack

    def set_mode(self, training: bool) -> None:
        """model.train(training), frozen norms then put back in eval; or, with the "flags" switch,
        every module's flag set directly, so the fused modules' caches are not dropped by a mode
        flip (CachesDerivedValues) and only their keys can tell a change (DerivedCache)."""
        for model in self.models.values():
            if self.switch == "train()":
                model.train(training)
            else:
                for m in model.modules():
                    m.training = training
            if training:
                for name in self.frozen_bns:
                    model.get_submodule(name).eval()

    def coarsen(self, dtype) -> None:
        self.coarsest = max(self.coarsest, FLOOR[dtype])

    def floor(self) -> float:
        return max(self.coarsest, FLOOR[self.dtype])

    def check(self, label: str, tensors: Dict[str, Optional[torch.Tensor]]) -> None:
        self.check_group(label, {label: tensors})

    def check_group(self, label: str, group: Dict[str, Dict[str, Optional[torch.Tensor]]]) -> None:
        """fused as close to the twin as stock, within RATIO and the floor: per tensor (relative to
        its norm, or TINY of its group's largest) while the models' state is float32 / float64;
        over the whole group (root-sum-square errors) once it has seen half precision, where a few
        ReLU masks flipped by a rounding (a handful of elements of a small test tensor) decide one
        tensor's error, the same flips in stock and fused but not at the same elements."""
        present = {}
        for key, tensors in group.items():
            missing = [n for n in NAMES if tensors[n] is None]
            assert not missing or len(missing) == len(NAMES), f"{key}: present in fused, stock, twin but {missing}"
            if not missing:
                assert tensors["fused"].shape == tensors["stock"].shape == tensors["twin"].shape, \
                    f"{key}: shapes {[tuple(tensors[n].shape) for n in NAMES]}"
                present[key] = tensors
        if self.coarsest < FLOOR[torch.float16]:
            largest = max((norm(t["twin"]) for t in present.values()), default=0.0)
            for key, tensors in present.items():
                scale = max(norm(tensors["twin"]), TINY * largest)
                self.assert_within(key, *(rss_error([tensors[name]], [tensors["twin"]], scale)
                                          for name in ("fused", "stock")))
        elif present:
            self.assert_within(f"{label} (root-sum-square over {len(present)} tensors)",
                               *(rss_error([t[name] for t in present.values()], [t["twin"] for t in present.values()])
                                 for name in ("fused", "stock")))

    def assert_within(self, label: str, err_fused: float, err_stock: float) -> None:
        assert err_fused <= RATIO * err_stock + self.floor(), (
            f"{label}: fused is {err_fused:.3g} relative off the float64 twin, stock {err_stock:.3g} "
            f"(allowed {RATIO} x stock + {self.floor():g}); dtype {self.dtype}, autocast {self.autocast}, "
            f"memory format {self.memory_format}, frozen norms {sorted(self.frozen_bns)}")

    def forward(self, seed: int, training: bool, grad: str, backward: bool) -> None:
        self.coarsen(self.autocast_dtype if self.autocast and self.dtype != f64 else self.dtype)
        # (autocast leaves float64 as it is)
        self.set_mode(training)
        xs = self.inputs(seed)
        outs = {}
        for name, model in self.models.items():
            x = xs[name].requires_grad_(backward)
            with self.context(name, grad):
                out = model(x)
            if backward:
                g = torch.Generator().manual_seed(seed + 1)
                weights = torch.randn(out.shape, generator=g, dtype=f64).to(out.dtype)
                (out * weights).sum().backward()
                self.input_grads[name] = x.grad
            outs[name] = out
        self.check("output", outs)
        if backward:
            self.check("input gradient", self.input_grads)

    # -- rules ---------------------------------------------------------------------------------
    @initialize(optimizer=st.sampled_from(["sgd", "adamw"]), switch=st.sampled_from(["train()", "flags"]))
    def make_optimizers(self, optimizer: str, switch: str) -> None:
        self.switch = switch
        for name, model in self.models.items():
            if optimizer == "sgd":
                self.opts[name] = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
            else:
                # eps 1e-3, not 1e-8: Adam's first step moves every weight by +-lr whatever its
                # gradient's size, so a gradient within float32's rounding of zero flips a weight
                # by 2 lr, in stock as in fused but at other weights (a small DenseNet's eval
                # output then differs from the twin's by 5e-4 in stock, 2e-3 in fused, by chance)
                self.opts[name] = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-3, weight_decay=0.01)

    @rule(seed=st.integers(0, 2**30), grad=st.sampled_from(["no_grad", "inference_mode"]))
    def eval_forward(self, seed: int, grad: str) -> None:
        self.forward(seed, training=False, grad=grad, backward=False)
        self.count(f"eval forward ({grad})")

    @rule(seed=st.integers(0, 2**30))
    def train_forward_backward(self, seed: int) -> None:
        """Gradients accumulate until optimizer_step: a validation pass may come in between."""
        self.forward(seed, training=True, grad="grad", backward=True)
        self.count("train forward + backward")

    @rule(seed=st.integers(0, 2**30))
    def eval_forward_backward(self, seed: int) -> None:
        """Fine-tuning with every BatchNorm frozen (the whole model in eval, gradients flowing)."""
        self.forward(seed, training=False, grad="grad", backward=True)
        self.count("eval forward + backward")

    @rule(seed=st.integers(0, 2**30), grad=st.sampled_from(["no_grad", "inference_mode"]))
    def train_forward_without_grad(self, seed: int, grad: str) -> None:
        """BatchNorm recalibration / test-time adaptation: running statistics move, weights do not."""
        self.forward(seed, training=True, grad=grad, backward=False)
        self.count(f"train forward ({grad})")

    @rule()
    def optimizer_step(self) -> None:
        self.coarsen(self.dtype)
        for opt in self.opts.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.count("optimizer step")

    @rule(group=st.integers(0, 7), requires_grad=st.booleans())
    def freeze_parameters(self, group: int, requires_grad: bool) -> None:
        prefix = self.freeze_groups[group % len(self.freeze_groups)]
        for model in self.models.values():
            for name, p in model.named_parameters():
                if name.startswith(prefix):
                    p.requires_grad_(requires_grad)
        self.count("freeze" if not requires_grad else "unfreeze")

    @rule(index=st.integers(0, 10**6), frozen=st.booleans())
    def freeze_batchnorm(self, index: int, frozen: bool) -> None:
        """One BatchNorm in eval inside a training model (detection backbones' frozen BN)."""
        name = self.bn_names[index % len(self.bn_names)]
        (self.frozen_bns.add if frozen else self.frozen_bns.discard)(name)
        self.count("freeze one BatchNorm")

    @rule(momentum=st.sampled_from([None, 0.1, 0.3]))
    def set_momentum(self, momentum: Optional[float]) -> None:
        for model in self.models.values():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.momentum = momentum
        self.count(f"momentum {momentum}")

    @rule(load=st.booleans())
    def checkpoint(self, load: bool) -> None:
        """Save each model's state_dict, or load the one it saved last (the first call saves)."""
        if load and self.checkpoint is not None:
            for name, model in self.models.items():
                model.load_state_dict(self.checkpoint[name], strict=True)
            self.count("load own state_dict")
        else:
            self.checkpoint = {name: copy.deepcopy(model.state_dict()) for name, model in self.models.items()}
            self.count("save state_dict")

    @rule()
    def load_twins_state(self) -> None:
        """A checkpoint from elsewhere: fused and stock load the twin's values (cast on load)."""
        state = self.models["twin"].state_dict()
        for name in ("fused", "stock"):
            self.models[name].load_state_dict(state, strict=True)
        self.coarsen(self.dtype)  # the twin's values, rounded once to the models' dtype
        self.count("load the twin's state_dict")

    @rule(memory_format=st.sampled_from([torch.channels_last, torch.contiguous_format]))
    def to_memory_format(self, memory_format) -> None:
        self.memory_format = memory_format
        for model in self.models.values():
            model.to(memory_format=memory_format)
        self.count(f"to {memory_format}")

    @rule(dtype=st.sampled_from([f32, f64]))
    def to_dtype(self, dtype) -> None:
        """The model converted, and its optimizer's state with it (Optimizer.load_state_dict casts
        the state to the parameters' dtype; AdamW cannot step float32 moments into float64
        weights: stock raises as fused does)."""
        self.dtype = dtype
        self.coarsen(dtype)
        for name in ("fused", "stock"):
            self.models[name].to(dtype)
            self.opts[name].load_state_dict(self.opts[name].state_dict())
        self.count(f"to {dtype}")

    @rule()
    def copy_models(self) -> None:
        """Model and optimizer deep-copied together (so the copy's optimizer holds the copy's
        parameters), then the copy pickled and unpickled; the twin too (a copied parameter drops
        its .grad)."""
        for name in NAMES:
            pair = copy.deepcopy((self.models[name], self.opts[name]))
            buffer = io.BytesIO()
            pickle.dump(pair, buffer)
            self.models[name], self.opts[name] = pickle.loads(buffer.getvalue())
        self.count("deepcopy")
        self.count("pickle")

    @rule(on=st.booleans())
    def set_autocast(self, on: bool) -> None:
        self.autocast = on
        self.count(f"autocast {'on' if on else 'off'}")

    # -- after every rule ----------------------------------------------------------------------
    @invariant()
    def same_state(self) -> None:
        """State compared, then an eval forward (what a stale cache would get wrong right after the
        rule that made it stale; it also leaves a fresh cache for the next rule to invalidate)."""
        if not self.opts:  # before initialize
            return
        self.compare_state()
        self.forward(12345, training=False, grad="no_grad", backward=False)
        self.count("eval forward (after every rule)")

    def compare_state(self) -> None:
        named = {name: dict(model.named_parameters()) for name, model in self.models.items()}
        params = {key: {name: named[name][key] for name in NAMES} for key in named["twin"]}
        self.check_group("parameters", params)
        self.check_group("gradients", {key: {name: t.grad for name, t in p.items()} for key, p in params.items()})
        buffers = {name: dict(model.named_buffers()) for name, model in self.models.items()}
        running = {}
        for key in buffers["twin"]:
            b = {name: buffers[name][key] for name in NAMES}
            if key.endswith("num_batches_tracked"):
                assert b["fused"].item() == b["stock"].item() == b["twin"].item(), \
                    f"{key}: {[b[n].item() for n in NAMES]}"
            else:
                running[key] = b
        self.check_group("running statistics", running)


RULES = ("eval_forward", "eval_forward_backward", "train_forward_backward", "train_forward_without_grad",
         "optimizer_step", "freeze_parameters", "freeze_batchnorm", "set_momentum", "checkpoint", "load_twins_state",
         "to_memory_format", "to_dtype", "copy_models", "set_autocast")


def assert_exercised(stats, rules=RULES) -> None:
    """Every rule in `rules` (by name) ran in some sequence (`stats` from run): the test tested them.
    (Which variant each ran, stats also counts: a derandomized run's choices are skewed, so no
    variant is required.)"""
    missing = [r for r in rules if r not in stats]
    assert not missing, f"rules never run: {missing}; ran {stats}"


def eval_after_train_forwards(stock: nn.Module):
    """Issue 22's sequence, on `stock` and on fusedres.fuse(stock): a validation pass, two train
    forwards + backward with no optimizer step, eval again. Returns both final eval outputs (a
    fold cached by the first eval and kept across the running statistics' update gave 0.6-0.9
    relative off stock)."""
    torch.manual_seed(0)
    fused = fusedres.fuse(stock)
    x = torch.randn(4, 3, 64, 64)
    outs = []
    for m in (stock, fused):
        m.eval()
        with torch.no_grad():
            m(x)
        for _ in range(2):
            m.train()
            m(x).sum().backward()
        m.eval()
        with torch.no_grad():
            outs.append(m(x))
    return outs


SEED = 20261204  # the derandomized runs' seed (run)


def run(machine: type, examples: int, steps: int = 12) -> Dict[str, int]:
    """Drives `machine` over `examples` sequences of up to `steps` rules (FUSEDRES_STATEFUL_EXAMPLES,
    FUSEDRES_STATEFUL_STEPS and FUSEDRES_STATEFUL_RANDOM override) and returns what they exercised."""
    machine.stats = {}
    examples = int(os.environ.get("FUSEDRES_STATEFUL_EXAMPLES", examples))
    steps = int(os.environ.get("FUSEDRES_STATEFUL_STEPS", steps))
    derandomize = os.environ.get("FUSEDRES_STATEFUL_RANDOM", "0") != "1"
    if derandomize:
        # A fixed seed, not hypothesis's derandomized one: that is a digest of the machine class's
        # source as inspect finds it, which earlier tests in the same process could change (seen:
        # a whole-suite worker drew a sequence that never chose one rule; the file alone did)
        hypothesis.seed(SEED)(machine)
    run_state_machine_as_test(machine, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, derandomize=derandomize, database=None,
        suppress_health_check=list(HealthCheck)))
    return machine.stats

