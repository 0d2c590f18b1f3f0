"""What every fused module's forward shares: which submodules can be fused (and why not), the
input checks, the fallback to the reference forward (its reason found once per set of
submodules, warned once), whether gradients are needed, the conv's arguments, and on the CPU in
training the choice between the fused units and the stock forward (measured once per shape).
"""
import contextlib
import os
import threading
import time
import weakref
from typing import Callable, Dict, NamedTuple, Optional

import torch
import torch.nn as nn

from .autograd import BatchNormStats, ConvArgs, bn_scale_shift, running_stats
from .batchnorm import SyncBatchNorm2d
from .common import tracing, warn_once
from .ops import PostOp


def cached_per_submodules(module: nn.Module, name: str, compute: Callable[[], object]):
    """compute(), found once per set of `module`'s submodules (replacing one finds it again), not
    on every forward; kept in module.__dict__[name]. The key: the children and grandchildren (a
    block's convs and norms, a downsample's; a dense block's layers and theirs), by identity."""
    key = []
    for child in module._modules.values():
        key.append(child)
        if child is not None:
            key.extend(child._modules.values())
    key = tuple(key)
    cached = module.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = (key, compute())
        module.__dict__[name] = cached
    return cached[1]


def cached_fallback_reason(module: nn.Module, fallback_reason: Callable[[], Optional[str]]) -> Optional[str]:
    """fallback_reason(), found once per set of `module`'s submodules (cached_per_submodules)."""
    return cached_per_submodules(module, "_fusedres_fallback", fallback_reason)


def runs_reference(x: torch.Tensor, module: nn.Module, owner: str, fallback_reason: Callable[[], Optional[str]],
                   known: Optional[tuple] = None) -> bool:
    """Whether a fused module's forward runs its reference (stock) forward instead: for an empty
    batch (exactly what the reference does with one), or where a submodule cannot be fused
    (fallback_reason() says why, found once per set of submodules, or `known`: (the reason,)
    found when a view was built; warned once per owner and reason)."""
    if x.numel() == 0:
        return True
    why = known[0] if known is not None else cached_fallback_reason(module, fallback_reason)
    if why is not None:
        warn_once((owner, why), f"fusedres: {owner} runs the unfused reference forward: {why}")
        return True
    return False


def inference(x: torch.Tensor, *modules: nn.Module) -> bool:
    """Eval without gradients and without autocast: the modules' no-autograd path."""
    return (not any(m.training for m in modules) and not grad_needed(x, None, *modules)
            and not torch.is_autocast_enabled(x.device.type))


class DerivedCache:
    """Values derived from a module's tensors (a BatchNorm folded into its conv, with the fold's
    oneDNN packs; a BatchNorm's eval statistics), each kept until anything it came from may have
    changed, so an eval forward pays no per-channel ops and no weight-sized fold.

    A value is reused only while every tensor it came from is the same tensor object (its id),
    on the same storage (alive: a weak reference; an id can only be reused once its object died,
    and a new tensor over the same live storage at the same address with the same version holds
    what the old one did) at the same address, with the same version counter, and the plain
    arguments (eps, the conv's geometry, ...) are equal. What changes a value, and what tells:
      - an in-place write, an optimizer step, load_state_dict (copy_): the version counter;
      - load_state_dict(assign=True), a parameter or buffer replaced: another tensor object;
      - `param.data = other` (the same object and version, new memory): the address, or, where
        the new memory sits where the old did (a caching allocator hands a freed block of the
        same size straight back: `p.data = p.data.half().float()` on a GPU), the old storage's
        death; module moves (.to, .double, .cuda, ...) also drop the cache (CachesDerivedValues);
      - a training forward: aten's BatchNorm writes the running statistics through their pointers
        without bumping their versions, but nn.BatchNorm2d.forward counts each batch it adds to
        them in num_batches_tracked (an in-place add_, which bumps), so callers pass that tensor
        too (bn_state_tensors); fusedres's own kernels bump the statistics' versions as well
        (ops.mark_running_written). A norm with running statistics but no num_batches_tracked is
        not cached (`cacheable=False`: computed on every call).
    Not seen: writes through `.data` (PyTorch's version counters do not count them, by design);
    a mode change (train() / eval()) of the fused module drops the cache, and fusedres.refresh
    drops it on demand. Inference tensors (made under torch.inference_mode) have no version
    counter: never cached.

    A lookup costs ~0.5 us per tensor (version, address, id, a weak reference): a fold's ~6 us in
    all, against ~3.5 us when it was keyed on versions and addresses alone. A deep copy or a
    pickle gets an empty cache (the values are derived, and rebuilt on first use)."""

    __slots__ = ("_entries",)
    # values reused and computed, over every cache of the process (tests check that eval forwards
    # reuse folds, so the invalidation is exercised rather than bypassed)
    counts = {"reused": 0, "computed": 0}

    def __init__(self) -> None:
        self._entries = {}

    def get(self, key, tensors, extra, compute: Callable[[], object], cacheable: bool = True):
        """compute(), or what it returned for `key` while `tensors` (a list, no None: the caller
        leaves out absent ones) and `extra` were as they are now. Not while tracing: the caller
        computes in the graph itself."""
        if not cacheable:
            return compute()
        try:
            state = [(t._version, t.data_ptr()) for t in tensors]
        except RuntimeError:  # an inference tensor: no version counter says it is unchanged
            return compute()
        entry = self._entries.get(key)
        if (entry is not None and entry[1] == state and entry[2] == extra and entry[0] == list(map(id, tensors))
                and None not in [ref() for ref in entry[3]]):
            DerivedCache.counts["reused"] += 1
            return entry[4]
        DerivedCache.counts["computed"] += 1
        value = compute()
        self._entries[key] = (list(map(id, tensors)), state, extra,
                              [weakref.ref(t.untyped_storage()) for t in tensors], value)
        return value

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def __deepcopy__(self, memo) -> "DerivedCache":
        return DerivedCache()

    def __reduce__(self):
        return (DerivedCache, ())


def drop_derived(module: nn.Module) -> None:
    """Empties every DerivedCache `module` holds, and those of the modules it keeps outside its
    submodules (derived_holders(): a FusedSequential's per-run views)."""
    for value in module.__dict__.values():
        if isinstance(value, DerivedCache):
            value.clear()
    holders = getattr(module, "derived_holders", None)
    if holders is not None:
        for holder in holders():
            drop_derived(holder)


class CachesDerivedValues:
    """Mixin of the fused modules that keep DerivedCaches: a change of mode (train() / eval() that
    flips the module's flag; a repeated model.eval() per request keeps the cache) and a move
    (.to, .double, .cuda, ...: nn.Module._apply) drop them, so even writes that PyTorch does not
    count (through `.data`) are seen by the next validation after training."""

    def train(self, mode: bool = True):
        if bool(mode) != self.training:
            drop_derived(self)
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        drop_derived(self)
        return super()._apply(fn, *args, **kwargs)


def derived_cache(owner: nn.Module, name: str) -> DerivedCache:
    """owner's DerivedCache called `name` (kept in owner.__dict__, not a submodule or state)."""
    cache = owner.__dict__.get(name)
    if not isinstance(cache, DerivedCache):  # (a module pickled by an older fusedres held a dict)
        cache = owner.__dict__[name] = DerivedCache()
    return cache


def bn_state_tensors(bn: nn.Module) -> tuple:
    """(weight, bias, running_mean, running_var, num_batches_tracked) of a BatchNorm (None where
    absent): what its eval result derives from, with what tells a training forward's update of
    the running statistics (DerivedCache); and whether a cache keyed on them can see every change
    (False: running statistics without num_batches_tracked)."""
    params, buffers = bn._parameters, bn._buffers
    running_mean, tracked = buffers.get("running_mean"), buffers.get("num_batches_tracked")
    tensors = (params.get("weight"), params.get("bias"), running_mean, buffers.get("running_var"), tracked)
    return tensors, running_mean is None or tracked is not None


def eval_bn_stats(owner: nn.Module, bn: nn.BatchNorm2d, x: torch.Tensor) -> BatchNormStats:
    """`bn` with its running statistics as (mean, invstd, scale, shift) in x's statistics dtype,
    cached on `owner` until anything involved changes (DerivedCache): no per-channel ops per eval
    forward. Recomputed while tracing."""
    tensors, cacheable = bn_state_tensors(bn)

    def compute():
        with torch.no_grad():
            mean, invstd = running_stats(tensors[2], tensors[3], bn.eps, x)
            return BatchNormStats(mean, invstd, *bn_scale_shift(invstd, tensors[0], tensors[1]))

    if tracing():
        return compute()
    return derived_cache(owner, "_eval_bn_cache").get(id(bn), [t for t in tensors if t is not None],
                                                      (bn.eps, x.dtype == torch.float64), compute, cacheable)


def _is_plain(module: nn.Module, cls) -> bool:
    return isinstance(module, cls) and type(module).forward is cls.forward


def _timm_norm_act(norm: nn.Module) -> bool:
    """timm.layers.BatchNormAct2d: its own forward is F.batch_norm with nn.BatchNorm2d's arguments
    and bookkeeping, then `drop`, then `act` (two modules)."""
    cls = type(norm)
    return cls.__name__ == "BatchNormAct2d" and cls.__module__.startswith("timm.") and isinstance(norm, nn.BatchNorm2d)


def norm_with_relu(norm: nn.Module) -> bool:
    """Whether `norm` is BatchNorm followed by a ReLU in one module, as timm writes its DenseNet:
    timm's BatchNormAct2d with `drop` an nn.Identity and `act` an nn.ReLU."""
    return (_timm_norm_act(norm) and type(norm._modules.get("act")) is nn.ReLU
            and type(norm._modules.get("drop")) is nn.Identity)


def norm_is_plain_inside(norm: nn.Module) -> bool:
    """Whether `norm` is timm's BatchNormAct2d with nothing after the BatchNorm (`drop` and `act`
    nn.Identity: timm's `apply_act=False`, a block's last norm before the residual add)."""
    return (_timm_norm_act(norm) and type(norm._modules.get("act")) is nn.Identity
            and type(norm._modules.get("drop")) is nn.Identity)


def norm_with_tail(norm: nn.Module) -> bool:
    """Whether `norm` is timm's BatchNormAct2d with an activation (or dropout) the fused kernels do
    not apply (SiLU, Hardswish, ReLU6, GELU, ...): a unit ending in it runs conv -> BatchNorm fused
    and then the norm's own `drop` and `act` modules (norm_tail)."""
    return _timm_norm_act(norm) and not norm_with_relu(norm) and not norm_is_plain_inside(norm)


def norm_tail(norm: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """`out` through what timm's BatchNormAct2d applies after its BatchNorm (`drop`, then `act`),
    skipping nn.Identity; `out` itself for any other norm."""
    if not _timm_norm_act(norm):
        return out
    for name in ("drop", "act"):
        module = norm._modules.get(name)
        if module is not None and type(module) is not nn.Identity:
            out = module(out)
    return out


def post_op_of(module: Optional[nn.Module]):
    """The ops.PostOp that computes `module` (an activation other than ReLU: nn.SiLU, nn.Hardswish,
    nn.ReLU6, nn.Hardtanh, nn.GELU, nn.LeakyReLU, by exact type; `inplace` changes no value), or
    None: a BN-folded conv applies it as oneDNN's post-op in inference."""
    cls = type(module)
    if cls is nn.SiLU:
        return PostOp("silu")
    if cls is nn.Hardswish:
        return PostOp("hardswish")
    if cls is nn.ReLU6:
        return PostOp("hardtanh", (0.0, 6.0))
    if cls is nn.Hardtanh:
        return PostOp("hardtanh", (float(module.min_val), float(module.max_val)))
    if cls is nn.GELU:
        return PostOp("gelu", (), module.approximate)
    if cls is nn.LeakyReLU:
        return PostOp("leaky_relu", (float(module.negative_slope),))
    return None


def kernel_post_op(module: Optional[nn.Module]):
    """post_op_of(module) where it is one of the kernels' activations (common.ACTIVATIONS: ReLU6,
    SiLU, Hardswish, LeakyReLU, GELU), applied inside a run's BatchNorm passes; else None."""
    op = post_op_of(module)
    return op if op is not None and op.activation is not None else None


def norm_post_op(norm: nn.Module):
    """The ops.PostOp of the activation inside timm's BatchNormAct2d (norm_with_tail) where it is
    one of the kernels' activations and nothing else is inside (`drop` an nn.Identity), else None."""
    if not norm_with_tail(norm) or type(norm._modules.get("drop")) is not nn.Identity:
        return None
    return kernel_post_op(norm._modules.get("act"))


def unfusable_reason(conv: nn.Module, bn: nn.Module, sync_ok: bool = True, relu_inside_ok: bool = False,
                     tail_ok: bool = False) -> Optional[str]:
    """None if conv -> bn can run as a fused unit, else why not. sync_ok: a synchronized norm
    (SyncBatchNorm2d, nn.SyncBatchNorm) is fused with its statistics synchronized, rather than
    left to its own forward. relu_inside_ok: where a ReLU follows the norm anyway (the dense
    layers' BN -> ReLU -> conv), a norm with that ReLU inside (norm_with_relu) is fused too.
    tail_ok: where the unit ends a chain, a norm with another activation inside (norm_with_tail)
    is fused too, its activation run after it. timm's BatchNormAct2d with nothing inside after
    the BatchNorm is a plain BatchNorm."""
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.padding_mode != "zeros":
        return f"conv padding_mode={conv.padding_mode!r} (only 'zeros' is fused)"
    if isinstance(conv.padding, str):
        return f"conv padding={conv.padding!r} (only explicit padding is fused)"
    return norm_unfusable_reason(bn, sync_ok, relu_inside_ok, tail_ok)


def norm_unfusable_reason(bn: nn.Module, sync_ok: bool = True, relu_inside_ok: bool = False,
                          tail_ok: bool = False) -> Optional[str]:
    """unfusable_reason's verdict on the norm alone (the arguments mean the same): also what a
    BatchNorm -> ReLU with no conv (FusedNormReLU) takes, with relu_inside_ok."""
    if sync_ok and (_is_plain(bn, SyncBatchNorm2d) or _is_plain(bn, nn.SyncBatchNorm)):
        return None
    if norm_is_plain_inside(bn) or (relu_inside_ok and norm_with_relu(bn)) or (tail_ok and norm_with_tail(bn)):
        return None
    if norm_with_relu(bn):
        return f"{type(bn).__name__} with a ReLU inside where the unit ends without one"
    if _timm_norm_act(bn):
        act = type(bn._modules.get("act")).__name__
        return (f"{type(bn).__name__} with {act} inside where the chain goes on (an activation other than "
                f"ReLU ends a unit chain)")
    if not _is_plain(bn, nn.BatchNorm2d):
        return f"{type(bn).__name__} is not a plain nn.BatchNorm2d" + (" or a synchronized one" if sync_ok else "")
    return None


def norm_relu_conv_reason(norm: nn.Module, relu: Optional[nn.Module], conv: nn.Module) -> Optional[str]:
    """None if norm -> relu -> conv (a dense layer's unit, a transition) can run fused, else why
    not: `relu` an nn.ReLU, or an nn.Identity (or nothing) after a norm with its ReLU inside."""
    why = unfusable_reason(conv, norm, sync_ok=False, relu_inside_ok=True)
    relu_ok = type(relu) is nn.ReLU or (norm_with_relu(norm) and type(relu) in (type(None), nn.Identity))
    return why if why is not None or relu_ok else f"{type(relu).__name__} where a ReLU was expected"


def check_block_input(x, conv: nn.Conv2d, owner: str, reader: str = "the block", source: str = "conv1") -> None:
    """Clear errors for a fused module's input: a 4-D floating tensor with the channel count that
    `reader` (the block, a dense layer's norm1, ...) expects, on the device of `conv`, the first
    conv that reads it (named `source` in the message where it differs from the reader)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{owner}: expected a 4-D input [N, C, H, W], got {x.dim()}-D input of shape {tuple(x.shape)}")
    if x.shape[1] != conv.in_channels:
        where = f" ({source}.in_channels)" if source else ""
        raise ValueError(f"{owner}: input has {x.shape[1]} channels but {reader} expects {conv.in_channels}{where}; "
                         f"input shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: input must be a floating-point tensor (float32, float64, float16 or bfloat16), "
                        f"got {x.dtype}")
    if x.device != conv.weight.device:
        raise ValueError(f"{owner}: input is on {x.device} but the block's weights are on {conv.weight.device}")
    if x.dtype != conv.weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{owner}: input is {x.dtype} but the block's weights are {conv.weight.dtype}; convert one "
                        f"(block.to(dtype) or x.to(dtype)) or run under torch.autocast")


def grad_needed(x, residual, *modules) -> bool:
    """Whether autograd will want gradients of this forward: of x, the residual or a parameter."""
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad or (residual is not None and residual.requires_grad):
        return True
    return any(p is not None and p.requires_grad for m in modules for p in m._parameters.values())


def conv_args(conv: nn.Conv2d) -> ConvArgs:
    params = conv._parameters
    return ConvArgs(params["weight"], params.get("bias"), conv.stride, conv.padding, conv.dilation, conv.groups)


# ---------------------------------------------------------------------------------------------
# Training on the CPU: the fused units or the stock forward, whichever measured faster per shape.
# ---------------------------------------------------------------------------------------------
TRAIN_PATHS = ("measure", "fused", "stock")


class TrainPathChoice(NamedTuple):
    path: str  # "fused" or "stock"
    fused_ms: Optional[float]  # medians of forward + backward, None where not measured
    stock_ms: Optional[float]
    why: str


_train_choices: Dict[tuple, TrainPathChoice] = {}
_choice_lock = threading.Lock()


_forced_path = threading.local()


@contextlib.contextmanager
def forced_train_path(path: Optional[str]):
    """Within the block, cpu_train_path() is `path` on this thread (None: as set outside):
    memory_report's way to show either path without touching the environment."""
    if path is not None and path not in TRAIN_PATHS:
        raise ValueError(f"fusedres: train_path must be one of {TRAIN_PATHS} or None, got {path!r}")
    before = getattr(_forced_path, "path", None)
    _forced_path.path = path if path is not None else before
    try:
        yield
    finally:
        _forced_path.path = before


def cpu_train_path() -> str:
    """FUSEDRES_CPU_TRAIN_PATH: "measure" (default) times the fused and the stock forward +
    backward of each distinct block once (per block structure, input shape, dtype, memory format)
    and keeps the faster (within train_slowdown_allowed() where the fused units keep less);
    "fused" / "stock" force one (the tests run "fused"). forced_train_path overrides it."""
    forced = getattr(_forced_path, "path", None)
    if forced is not None:
        return forced
    value = os.environ.get("FUSEDRES_CPU_TRAIN_PATH", "measure") or "measure"
    if value not in TRAIN_PATHS:
        raise ValueError(f"fusedres: FUSEDRES_CPU_TRAIN_PATH must be one of {TRAIN_PATHS}, got {value!r}")
    return value


DEFAULT_TRAIN_SLOWDOWN = 0.05


def train_slowdown_allowed() -> float:
    """FUSEDRES_CPU_TRAIN_SLOWDOWN (default 0.05): how much slower than stock (a fraction of its
    forward + backward time) the measured choice still takes the fused units where they keep less
    for backward than stock (a run of two or more units: the lean units keep no activation between
    them). 0 takes whichever is faster."""
    value = os.environ.get("FUSEDRES_CPU_TRAIN_SLOWDOWN", "")
    if not value:
        return DEFAULT_TRAIN_SLOWDOWN
    try:
        allowed = float(value)
    except ValueError:
        allowed = -1.0
    if not allowed >= 0.0:
        raise ValueError(f"fusedres: FUSEDRES_CPU_TRAIN_SLOWDOWN must be a number >= 0, got {value!r}")
    return allowed


def train_choices() -> Dict[tuple, TrainPathChoice]:
    """Every CPU training-path choice made so far: {key: TrainPathChoice}."""
    return dict(_train_choices)


def _structure(module: nn.Module) -> tuple:
    """(what a block computes besides its input: its convs' and norms' types and arguments; its
    norm layers), found once per set of submodules (cached_per_submodules)."""
    def compute():
        parts, norms = [type(module).__name__], []
        original = module.__dict__.get("original")  # FusedResidual: its original block and wiring
        if original is not None:
            parts.append((type(original).__qualname__, getattr(module, "unit_names", None),
                          getattr(module, "shortcut_names", None), getattr(module, "shortcut_pools", None),
                          getattr(module, "_final_relu", None), getattr(module, "between", None)))
        for name, m in module.named_modules():
            if isinstance(m, nn.Conv2d):
                parts.append((name, tuple(m.weight.shape), m.stride, m.padding, m.dilation, m.groups,
                              m.bias is not None))
            elif isinstance(m, nn.modules.batchnorm._NormBase):
                parts.append((name, type(m).__name__, m.track_running_stats, m.affine))
                norms.append(m)
        return tuple(parts), tuple(norms)

    return cached_per_submodules(module, "_fusedres_structure", compute)


def _same(t):
    return t


def _median_ms(times) -> float:
    times = sorted(times)
    return times[len(times) // 2] * 1e3


def uses_fused_training(module: nn.Module, x: torch.Tensor, fused: Callable[[torch.Tensor], torch.Tensor],
                        stock: Callable[[torch.Tensor], torch.Tensor], repeats: int = 3,
                        slowdown: float = 0.0) -> bool:
    """For a CPU forward that autograd will differentiate (training, or eval with gradients):
    whether `fused` (the fused units) or `stock` (the reference forward, aten's native BatchNorm)
    runs. On the CPU aten's conv dominates either way and aten's channels_last BatchNorm is one
    vectorized pass, so the fused units do not always win (ResNet-50, batch 8, 112x112, 2 cores:
    0.81x stock in all, when first measured). Chosen by measurement, once per block structure,
    input shape, dtype, memory format and autocast state: `repeats` interleaved forward +
    backward timings of each (after one untimed run of each), gradients through
    torch.autograd.grad (nothing accumulates into .grad) and the norm layers' buffers restored
    afterwards (the measuring runs do not count as batches). Not measured: while tracing (the
    traced graph decides), under a synchronized norm in a distributed run (every process must
    take the same path), under torch.use_deterministic_algorithms(True) (the fused units: a
    choice by timing could differ between runs), with hooks on the block's modules or parameters
    (the stock forward, which calls them), re-entered while measuring (the fused units), past
    MAX_MEASURED_SHAPES shapes of one structure (its last choice), or where
    FUSEDRES_CPU_TRAIN_PATH forces one. `slowdown`: the fused units run while their median is at
    most (1 + slowdown) x stock's (the caller's allowance where they save memory,
    train_slowdown_allowed(); inf: always, without measuring, as with memory_efficient)."""
    if x.device.type != "cpu" or tracing():
        return True
    forced = cpu_train_path()
    if forced != "measure":
        return forced == "fused"
    if torch.are_deterministic_algorithms_enabled():  # a choice by timing could differ between runs
        return True
    if getattr(_measuring, "active", False):  # re-entered while measuring (e.g. a checkpoint's recompute)
        return True
    autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    structure, norms = _structure(module)
    key = (structure, tuple(n.training for n in norms), tuple(x.shape), x.dtype, x.stride(), autocast,
           x.requires_grad, torch.is_grad_enabled(), slowdown)
    choice = _train_choices.get(key)
    if choice is None:
        with _choice_lock:  # (held while measuring: two threads measure one block once, not twice at once)
            choice = _train_choices.get(key)
            if choice is None:
                choice = _train_choices[key] = _choose(module, (structure, slowdown), x, fused, stock, repeats,
                                                       slowdown)
    return choice.path == "fused"


_measuring = threading.local()
_measured_per_structure: Dict[tuple, list] = {}
MAX_MEASURED_SHAPES = 4  # per block structure; then its last choice is reused (variable input sizes)


def _has_hooks(module: nn.Module) -> bool:
    """Whether hooks would observe the measuring runs (or tell the paths apart: the fused units
    call no child module, so children's hooks fire on the stock forward only)."""
    from torch.nn.modules import module as module_globals

    if any(getattr(module_globals, name, None) for name in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks")):
        return True
    for m in module.modules():
        if m is not module and (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                                or getattr(m, "_backward_pre_hooks", None)):
            return True
    return any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in module.parameters())


def _choose(module, structure, x, fused, stock, repeats, slowdown) -> TrainPathChoice:
    if _has_hooks(module):
        return TrainPathChoice("stock", None, None, "hooks on the block's modules or parameters: the stock "
                                                    "forward, which calls them, not measured")
    if _synchronized(module):
        return TrainPathChoice("fused", None, None, "synchronized norm in a distributed run: not measured")
    if slowdown == float("inf"):
        return TrainPathChoice("fused", None, None, "memory_efficient: the fused units, not measured")
    earlier = _measured_per_structure.setdefault(structure, [])
    if len(earlier) >= MAX_MEASURED_SHAPES:
        last = earlier[-1]
        return TrainPathChoice(last.path, None, None, f"reused: {MAX_MEASURED_SHAPES} shapes of this block "
                                                      f"already measured")
    _measuring.active = True
    try:
        choice = _measure(module, x, fused, stock, repeats, slowdown)
    finally:
        _measuring.active = False
    earlier.append(choice)
    return choice


def _synchronized(module: nn.Module) -> bool:
    dist = torch.distributed
    return (dist.is_available() and dist.is_initialized()
            and any(isinstance(m, (nn.SyncBatchNorm, SyncBatchNorm2d)) for m in module.modules()))


def _measure(module: nn.Module, x: torch.Tensor, fused, stock, repeats: int, slowdown: float) -> TrainPathChoice:
    """Times fused and stock on copies of x. Tensors are saved for backward plainly (no enclosing
    saved-tensor hooks: a non-reentrant checkpoint's would recompute the block from inside it),
    each run gets its own copy of x (a stock forward may add into its input in place), and the
    buffers are restored whatever happens."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    params = [p for p in module.parameters() if p.requires_grad]
    times = {"fused": [], "stock": []}
    try:
        for i in range(repeats + 1):
            for name, fn in (("fused", fused), ("stock", stock)):
                probe = x.detach().clone().requires_grad_(x.requires_grad)
                inputs = params + ([probe] if probe.requires_grad else [])
                start = time.perf_counter()
                with torch.autograd.graph.saved_tensors_hooks(_same, _same):
                    y = fn(probe)
                if inputs and y.requires_grad:
                    torch.autograd.grad(y, inputs, torch.ones_like(y), allow_unused=True)
                if i:  # the first round is a warm-up (allocator, oneDNN primitive caches)
                    times[name].append(time.perf_counter() - start)
                del y
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    fused_ms, stock_ms = _median_ms(times["fused"]), _median_ms(times["stock"])
    path = "fused" if fused_ms <= stock_ms * (1.0 + slowdown) else "stock"
    allowed = f" (fused allowed up to {1.0 + slowdown:.2f}x: it keeps less for backward)" if slowdown else ""
    return TrainPathChoice(path, fused_ms, stock_ms, f"measured forward + backward: fused {fused_ms:.2f} ms, "
                                                     f"stock {stock_ms:.2f} ms{allowed}")
