"""Drop-in fused residual blocks with torchvision's constructor signatures and state_dict keys.

FusedBasicBlock and FusedBottleneck hold the same submodules as torchvision's BasicBlock and
Bottleneck (conv1, bn1, conv2, bn2[, conv3, bn3], relu, downsample), so checkpoints load both
ways with strict=True; only forward differs.

Where the fused conv kernels run (GPU, channels_last, not float64; or the triton backend under the
interpreter), training and eval with gradients run the block's conv -> BN -> ReLU units as one
fusedres.autograd.conv_bn_chain: BN statistics in each conv's epilogue, BN + ReLU in the next
conv's prologue, BN + residual + ReLU of the last unit in one pass. Elsewhere the units run on
the core path (aten's conv, then the BN ops), all of a block's main path as ONE autograd Function
(fusedres.autograd.conv_bn_units; the downsample another), so the block pays Python autograd's
per-Function cost once, not per unit:
  training                       batch statistics, running statistics updated as nn does
  eval, gradients needed         running statistics as constants, full backward
  eval, no gradients (inference) BN folded into the conv weights (cached until they change),
                                 then bias + residual + ReLU in the conv's epilogue (fused conv
                                 kernels), as oneDNN post-ops of one primitive with the weight
                                 prepacked (CPU, float32, channels_last; ops.conv_inference), or
                                 in one pass after aten's conv
Synchronized norm layers (sync_bn=True, which makes them SyncBatchNorm2d; or nn.SyncBatchNorm,
e.g. from nn.SyncBatchNorm.convert_sync_batchnorm, which works on GPUs only) are fused too: in
training under torch.distributed their batch statistics are those of every process's batch, one
all-reduce per BatchNorm forward and one backward (ops.distributed). A block whose convs or norm
layers are not plain nn.Conv2d / nn.BatchNorm2d / SyncBatchNorm2d / nn.SyncBatchNorm (a custom
norm_layer, FrozenBatchNorm2d, padding_mode other than zeros) runs the reference torchvision
forward instead and says so once.
"""
import collections
import copy
import functools
import inspect
import operator
import threading
import weakref
from typing import Callable, NamedTuple, Optional

import torch
import torch.fx
import torch.nn as nn

from .autograd import (PoolSpec, Unit, autocast_dtype, bn_relu, bn_relu_inference, chain_unsupported_reason,
                       conv_bias_act_inference_unchecked, conv_bn_chain, conv_bn_units)
from .batchnorm import bn_args, check_sync_args, convert_sync_batchnorm
from .block_plumbing import (CachesDerivedValues, bn_state_tensors, cached_per_submodules, check_block_input, conv_args,
                             derived_cache, drop_derived, eval_bn_stats, grad_needed, inference, norm_tail,
                             norm_post_op, norm_unfusable_reason, norm_with_tail, post_op_of, runs_reference,
                             unfusable_reason,
                             train_slowdown_allowed, uses_fused_training, cpu_train_path)
from .common import tracing, warn_once
from .models.resnet import BasicBlock, Bottleneck
from .ops import fold_bn, kernel_unsupported_reason, pack_weight


class PackedWeights:
    """A folded weight prepacked for oneDNN (ops.pack_weight), one pack per input shape: a pack
    is fast for its own shape only (kernels/conv_onednn.py). At most MAX_SHAPES kept, least
    recently used dropped first (serving alternates a few batch sizes; each pack is the weight's
    size again). Packs are opaque oneDNN tensors, which cannot be copied or pickled: a deep copy
    or a pickle of a block gets an empty PackedWeights (packed again on first use)."""

    MAX_SHAPES = 4

    def __init__(self) -> None:
        self._packs = collections.OrderedDict()
        self._lock = threading.Lock()  # inference threads may share a model

    def get(self, weight: torch.Tensor, conv, input_shape) -> torch.Tensor:
        """weight, the fold this object belongs to, packed for conv (a ConvSpec) and input_shape."""
        with self._lock:
            packed = self._packs.get(input_shape)
            if packed is not None:
                self._packs.move_to_end(input_shape)
                return packed
        packed = pack_weight(weight, *conv, input_shape)
        with self._lock:
            self._packs[input_shape] = packed
            while len(self._packs) > self.MAX_SHAPES:
                self._packs.popitem(last=False)
        return packed

    def __len__(self) -> int:
        return len(self._packs)

    def __deepcopy__(self, memo) -> "PackedWeights":
        return PackedWeights()

    def __reduce__(self):
        return (PackedWeights, ())


def pool_spec(pool: nn.MaxPool2d) -> PoolSpec:
    """An nn.MaxPool2d's arguments as pairs (autograd.PoolSpec)."""
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return PoolSpec(pair(pool.kernel_size), pair(stride), pair(pool.padding), pair(pool.dilation),
                    bool(pool.ceil_mode))


class _ChildrenAsLeaves(torch.fx.Tracer):
    proxy_buffer_attributes = True  # (a buffer read while tracing is a graph node, never touched)

    def __init__(self, root: Optional[nn.Module] = None) -> None:
        super().__init__()
        self._root = root

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self._root


_GATE_PROGRAMS = weakref.WeakKeyDictionary()  # gate module -> (its children, gate_program(module))


def gate_program(module: nn.Module) -> Optional[torch.fx.GraphModule]:
    """For a module whose forward is `x * f(x)` (a squeeze-excitation: timm's SqueezeExcite,
    torchvision's SqueezeExcitation, traced with its children as leaves), a GraphModule computing
    f(x) alone (the gate, run on the module's own children); None for any other module. f must
    read x once, and not through the product. A module with buffers is none (tracing runs its
    Python: a norm's forward would count a batch)."""
    if any(True for _ in module.buffers()) or isinstance(module, nn.modules.batchnorm._NormBase):
        return None
    try:
        graph = _ChildrenAsLeaves(module).trace(module)
    except Exception:  # noqa: BLE001 - not traceable: not a gate fusedres can split
        return None
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    output = nodes[-1]
    if len(inputs) != 1 or output.op != "output" or not isinstance(output.args[0], torch.fx.Node):
        return None
    x, product = inputs[0], output.args[0]
    is_mul = (product.op == "call_function" and product.target in (operator.mul, torch.mul)) or (
        product.op == "call_method" and product.target == "mul")
    if not is_mul or len(product.args) != 2 or product.kwargs or x not in product.args or len(x.users) != 2:
        return None
    gate = product.args[1] if product.args[0] is x else product.args[0]
    if not isinstance(gate, torch.fx.Node) or gate is x:
        return None
    output.args = (gate,)
    graph.erase_node(product)
    graph.lint()
    return torch.fx.GraphModule(module, graph, class_name="FusedresGate")


def is_plain_max_pool(module: nn.Module) -> bool:
    """An nn.MaxPool2d (exactly) that returns no indices: what a unit run may end with."""
    return type(module) is nn.MaxPool2d and not module.return_indices


def with_between(bns, between) -> list:
    """BNArgs of each unit with the activation after it (between[k], an ops.PostOp, None for ReLU)
    for all but the last (whose activation the caller passes)."""
    return [b if k >= len(between) or between[k] is None else b._replace(act=between[k].activation)
            for k, b in enumerate(bns)]


class _FusedBlockBase(CachesDerivedValues, nn.Module):
    """forward() plumbing shared by the fused blocks; subclasses define `_units()` (the main path's
    (conv, bn) units, ReLU between them) and may override `_shortcut()` and `_final_relu`."""

    _final_relu = True  # ReLU after the residual add
    # fuse(model, memory_efficient=True): recompute the cheapest convs in backward too
    # (autograd.recomputed_units), and take the fused units on the CPU without measuring
    fusedres_memory_efficient = False

    def _core_units(self, units, x: torch.Tensor, residual: Optional[torch.Tensor], relu: bool,
                    conv_kernels: Optional[bool] = None, post_op=None, pool: Optional[nn.Module] = None,
                    gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """act(bn_n(conv_n(... relu(bn_1(conv_1(x))) ...)) + residual) on the core path: in training
        or with gradients one ConvBNUnits Function for all the units (aten's conv, the BatchNorm
        ops); in eval without gradients, per unit BN folded into the conv (cached) and bias +
        residual + act in the conv's epilogue (fused conv kernels) or one pass after aten's conv.
        conv_kernels: whether the fused conv kernels run the inference convs (found once per
        block forward; None: asked per conv). post_op: an activation other than ReLU after the
        last unit (relu False): in training the last unit's own activation inside the BatchNorm
        ops where it is one of theirs (PostOp.activation), in inference the last conv's oneDNN
        post-op or the kernels' epilogue; else applied after. pool: an nn.MaxPool2d after it all
        (a stem's; inside the one Function in training, which keeps its indices, not its input).
        gate: an [N, C, 1, 1] tensor x is multiplied by first (inside the Function in training)."""
        bns = [bn_args(bn) for _, bn in units]  # once per BatchNorm per forward: it counts batches
        between = self._between_post_ops(units)
        if any(b.batch_stats for b in bns) or grad_needed(x, residual, *[m for unit in units for m in unit]):
            bns = with_between(bns, between)
            inside = post_op.activation if post_op is not None else None
            pool_inside = pool is not None and (post_op is None or inside is not None)
            out = conv_bn_units(x, [Unit(conv_args(conv), b) for (conv, _), b in zip(units, bns)], residual,
                                relu if inside is None else inside, self.fusedres_memory_efficient,
                                pool_spec(pool) if pool_inside else None, gate)
            out = out if post_op is None or inside is not None else post_op.apply(out)
            return out if pool is None or pool_inside else pool(out)
        out = x if gate is None else x * gate
        last = len(units) - 1
        for i, (conv, bn) in enumerate(units):
            weight, bias, packs = self._folded(conv, bn)
            out = conv_bias_act_inference_unchecked(out, weight, bias, residual if i == last else None,
                                                    conv_args(conv).spec, relu if i == last else between[i] is None,
                                                    conv_kernels, packs.get if packs is not None else None,
                                                    post_op if i == last else between[i])
        return out if pool is None else pool(out)

    def _chain(self, units, x: torch.Tensor, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
        """The units as one conv_bn_chain on the fused conv kernels."""
        bns = with_between([bn_args(b) for _, b in units], self._between_post_ops(units))
        return conv_bn_chain(x, [Unit(conv_args(c), b) for (c, _), b in zip(units, bns)], residual, relu)

    def _between_post_ops(self, units) -> tuple:
        """Per unit but the last, the activation after it as an ops.PostOp, None for ReLU (a
        residual block's units: ReLU between every two)."""
        return (None,) * (len(units) - 1)

    def _use_chain(self, x: torch.Tensor, units, differentiated: bool) -> bool:
        """Training, or eval with gradients (`differentiated`), where every conv runs on the fused
        conv kernels. Eval without gradients keeps BN folded into the weights (per-unit path,
        whose conv uses the kernels' bias + residual + ReLU epilogue where they run)."""
        if not differentiated:
            return False
        convs = [c for c, _ in units]
        ds = self._fusable_downsample()
        if ds is not None:
            convs.append(ds[0])
        # every conv of the block alike (device, format, dtype): the kernels are asked once, for the
        # first, and the other weights only checked for the same dtype
        if chain_unsupported_reason(x, [conv_args(convs[0])]) is not None:
            return False
        dtype = convs[0].weight.dtype
        return torch.is_autocast_enabled(x.device.type) or all(c.weight.dtype == dtype for c in convs)

    def _fused_forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The fused forward; `residual`: the tensor the join adds, where a caller passes it (a
        FusedUnits view with a join), else the block's own shortcut of x."""
        units = self._units()
        # training, or eval with gradients: autograd differentiates this forward
        differentiated = (any(bn.training for _, bn in units)
                          or grad_needed(x, residual, *[m for u in units for m in u]))
        if self._use_chain(x, units, differentiated):
            identity = self._shortcut(x, chain=True) if residual is None else residual
            return self._chain(units, x, identity, relu=self._final_relu)
        if tracing() and self._traced_on_aten(x, units):
            # aten's convs either way: the stock forward, whose BatchNorm, add and ReLU inductor
            # fuses into one pass after each conv itself (an opaque op would stop it; a fold in
            # the graph would rewrite every weight per call: ResNet-50 batch 1, 111 ms compiled
            # against 97.5 for stock compiled)
            return self._reference_forward(x) if residual is None else self._reference_forward(x, residual)
        if x.device.type == "cpu" and differentiated:
            if residual is None:
                fused, stock = self._core_forward, self._stock_forward
            else:
                fused = functools.partial(self._core_forward, residual=residual)
                def stock(t: torch.Tensor) -> torch.Tensor:
                    return self._stock_forward(t, residual)
            if not uses_fused_training(self, x, fused, stock, slowdown=self._train_slowdown(units)):
                self._stock_chosen(x, residual)
                return stock(x)
        return self._core_forward(x, units, residual)

    def _train_slowdown(self, units) -> float:
        """How much slower than stock the CPU's measured choice still takes the fused units: any
        with memory_efficient; block_plumbing.train_slowdown_allowed() where they keep less for
        backward than stock (two or more units: no activation kept between them); else 0."""
        if self.fusedres_memory_efficient:
            return float("inf")
        return train_slowdown_allowed() if len(units) > 1 or self._keeps_less_alone() else 0.0

    def _keeps_less_alone(self) -> bool:
        """Whether a single unit keeps less than stock all the same (FusedUnits: a max pool after
        it, or an activation other than ReLU inside it)."""
        return False

    def _stock_chosen(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> None:
        """Told when the CPU's measured choice ran the stock forward (FusedUnits views remember it)."""

    def _stock_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stock block's own forward (in-place ReLU and add included), for the CPU's measured
        training choice."""
        return self._reference_forward(x)

    @staticmethod
    def _traced_on_aten(x: torch.Tensor, units) -> bool:
        """Whether this block's convs run on aten's conv (not the fused conv kernels)."""
        return kernel_unsupported_reason(x, units[0][0].weight, autocast_dtype(x)) is not None

    def _core_forward(self, x: torch.Tensor, units=None, residual: Optional[torch.Tensor] = None,
                      post_op=None, pool=None, gate=None) -> torch.Tensor:
        """The block on the core path: aten's convs with the BatchNorm ops (or folded, in inference);
        post_op, pool, gate: _core_units'."""
        units = units or self._units()
        conv_kernels = None
        if not torch.is_autocast_enabled(x.device.type):  # every conv of the block alike: ask once
            conv_kernels = kernel_unsupported_reason(x, units[0][0].weight) is None
        identity = self._shortcut(x, conv_kernels=conv_kernels) if residual is None else residual
        return self._core_units(units, x, identity, self._final_relu, conv_kernels, post_op, pool, gate)

    def _folded(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        """(weight, bias, packs): BN folded into conv, cached until anything it derives from changes
        (block_plumbing.DerivedCache: the conv's and the norm's tensors, num_batches_tracked for a
        training forward's update of the running statistics, eps, the conv's geometry), with the
        folded weight's oneDNN packs (PackedWeights, dropped with the fold); recomputed in a traced
        graph (torch.compile / export), where the fold is part of the graph and nothing is packed
        (packs None)."""
        c = conv._parameters
        bn_tensors, cacheable = bn_state_tensors(bn)
        gamma, beta, running_mean, running_var, _ = bn_tensors
        if tracing():
            return (*fold_bn(c["weight"], c.get("bias"), gamma, beta, running_mean, running_var, bn.eps), None)

        def compute():
            with torch.no_grad():
                return (*fold_bn(c["weight"], c.get("bias"), gamma, beta, running_mean, running_var, bn.eps),
                        PackedWeights())

        tensors = [t for t in (c["weight"], c.get("bias"), *bn_tensors) if t is not None]
        extra = (bn.eps, conv.stride, conv.padding, conv.dilation, conv.groups)
        return derived_cache(self, "_fold_cache").get(id(conv), tensors, extra, compute, cacheable)

    def _fusable_downsample(self):
        ds = self._modules.get("downsample")
        if (isinstance(ds, nn.Sequential) and len(ds) == 2 and type(ds).forward is nn.Sequential.forward
                and unfusable_reason(ds[0], ds[1]) is None):
            return ds
        return None

    def _shortcut(self, x: torch.Tensor, chain: bool = False, conv_kernels: Optional[bool] = None) -> torch.Tensor:
        downsample = self._modules.get("downsample")
        if downsample is None:
            return x
        ds = self._fusable_downsample()
        if ds is None:
            return downsample(x)
        if chain:
            return self._chain([(ds[0], ds[1])], x, None, relu=False)
        return self._core_units([(ds[0], ds[1])], x, None, False, conv_kernels)

    def _fallback_reason(self) -> Optional[str]:
        for conv, bn in self._units():
            why = unfusable_reason(conv, bn)
            if why is not None:
                return why
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        check_block_input(x, self._modules["conv1"], name)
        if runs_reference(x, self, name, self._fallback_reason):
            return self._reference_forward(x)
        return self._fused_forward(x)


class FusedBasicBlock(_FusedBlockBase, BasicBlock):
    """torchvision.models.resnet.BasicBlock, fused: conv-BN-ReLU, then conv-BN-add-ReLU. The reference
    BasicBlock's constructor and submodules; only forward differs (its own forward is the fallback)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, *, sync_bn: bool = False,
                 process_group: Optional[object] = None) -> None:
        BasicBlock.__init__(self, inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)
        _convert_block_norms(self, sync_bn, process_group)

    def _units(self):
        m = self._modules
        return ((m["conv1"], m["bn1"]), (m["conv2"], m["bn2"]))

    _reference_forward = BasicBlock.forward

    @classmethod
    def from_module(cls, block: nn.Module) -> "FusedBasicBlock":
        """A FusedBasicBlock sharing `block`'s submodules (and so its parameters and buffers)."""
        return _adopt(cls, block, ("conv1", "bn1", "relu", "conv2", "bn2", "downsample"))


class FusedBottleneck(_FusedBlockBase, Bottleneck):
    """torchvision.models.resnet.Bottleneck (ResNet v1.5: stride on the 3x3), fused. The reference
    Bottleneck's constructor and submodules; only forward differs (its own forward is the fallback)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, *, sync_bn: bool = False,
                 process_group: Optional[object] = None) -> None:
        Bottleneck.__init__(self, inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)
        _convert_block_norms(self, sync_bn, process_group)

    def _units(self):
        m = self._modules
        return ((m["conv1"], m["bn1"]), (m["conv2"], m["bn2"]), (m["conv3"], m["bn3"]))

    _reference_forward = Bottleneck.forward

    @classmethod
    def from_module(cls, block: nn.Module) -> "FusedBottleneck":
        """A FusedBottleneck sharing `block`'s submodules (and so its parameters and buffers)."""
        return _adopt(cls, block, ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample"))


def _convert_block_norms(block: nn.Module, sync_bn: bool, process_group: Optional[object]) -> None:
    """A fused block's sync_bn / process_group constructor arguments: checked, then (sync_bn=True)
    its norm layers, the downsample's too, made SyncBatchNorm2d."""
    check_sync_args(sync_bn, process_group, type(block).__name__)
    if sync_bn:
        convert_sync_batchnorm(block, process_group)


def _adopt(cls, block: nn.Module, names) -> nn.Module:
    missing = [n for n in names if not hasattr(block, n)]
    if missing:
        raise TypeError(f"{cls.__name__}.from_module: {type(block).__name__} lacks {', '.join(missing)}; "
                        f"expected a torchvision-style {cls.__name__[len('Fused'):]}")
    fused = cls.__new__(cls)
    nn.Module.__init__(fused)
    for n in names:
        setattr(fused, n, getattr(block, n))
    fused.stride = getattr(block, "stride", fused.conv2.stride[0])
    fused.training = block.training  # its own flag only: a frozen (eval) BN inside stays frozen
    return fused


def restore_original(fused: nn.Module) -> nn.Module:
    """The original module a fuse()d module keeps (`fused.original`), with the fused module's
    children (any replaced since fusing carried over) and its mode."""
    original = fused.original
    for name, child in fused._modules.items():
        original._modules[name] = child
    original.training = fused.training
    return original


class FusedResidual(_FusedBlockBase):
    """Any residual block that fusedres.fuse proved to compute

        act(bn_n(conv_n(relu(... relu(bn_1(conv_1(x))) ...))) + shortcut(x))

    with shortcut the identity, conv + bn or a conv alone (after pooling layers, which run as
    they are), and act a ReLU or nothing, however its code names or writes them. It holds the
    original block's children under their own names (so state_dict keys, parameters and buffers
    are the original's) and the original block itself, unregistered, for fusedres.unfuse.

    Args:
        block: the original block.
        units: (conv name, bn name) of each main-path unit, in order (dotted paths into block).
        shortcut: () for the identity, (conv name,) or (conv name, bn name).
        final_relu: whether a ReLU follows the add.
        shortcut_pools: names of the pooling modules the shortcut applies first, in order.
    """

    def __init__(self, block: nn.Module, units, shortcut=(), final_relu: bool = True, shortcut_pools=()) -> None:
        super().__init__()
        for name, child in block._modules.items():
            self._modules[name] = child
        object.__setattr__(self, "original", block)  # not a submodule: no duplicate keys
        self.unit_names = tuple(tuple(u) for u in units)
        self.shortcut_names = tuple(shortcut)
        self.shortcut_pools = tuple(shortcut_pools)
        self._final_relu = bool(final_relu)
        self.training = block.training

    def _units(self):
        def resolve():
            return tuple((self.get_submodule(c), self.get_submodule(b)) for c, b in self.unit_names)

        if max(name.count(".") for unit in self.unit_names for name in unit) > 1:
            return resolve()  # deeper than a grandchild: cached_per_submodules would not see it replaced
        return cached_per_submodules(self, "_fusedres_units", resolve)  # ~3 us, against ~8 resolved per call

    def _fusable_downsample(self):
        if len(self.shortcut_names) == 2:
            conv, bn = (self.get_submodule(n) for n in self.shortcut_names)
            if unfusable_reason(conv, bn) is None:
                return conv, bn
        return None

    def _shortcut(self, x: torch.Tensor, chain: bool = False, conv_kernels: Optional[bool] = None) -> torch.Tensor:
        x = self._run_modules(self.shortcut_pools, x)
        pair = self._fusable_downsample()
        if pair is None:  # the identity, a conv alone (or a pair changed since fusing): their own forward
            return self._run_modules(self.shortcut_names, x)
        if chain:
            return self._chain([pair], x, None, relu=False)
        # (pooled: a smaller input than the block's, so whether the conv kernels run is asked anew)
        return self._core_units([pair], x, None, False, None if self.shortcut_pools else conv_kernels)

    def _run_modules(self, names, x: torch.Tensor) -> torch.Tensor:
        for name in names:
            x = self.get_submodule(name)(x)
        return x

    def _reference_shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_modules(self.shortcut_pools + self.shortcut_names, x)

    def _stock_forward(self, x: torch.Tensor, *residual: torch.Tensor) -> torch.Tensor:
        """The original block's own forward, over this module's children (in-place ReLU and add
        as its code writes them: the generic _reference_forward allocates a tensor per op, 3%
        slower on a ResNet-50 CPU train step at batch 8, 112x112: 592 ms against 573)."""
        return self.unfused().forward(x, *residual)

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        units = self._units()
        out = x
        for i, (conv, bn) in enumerate(units):
            out = bn(conv(out))
            if i < len(units) - 1:
                out = torch.relu(out)
        out = out + self._reference_shortcut(x)
        return torch.relu(out) if self._final_relu else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = f"FusedResidual({type(self.original).__name__})"
        check_block_input(x, self._units()[0][0], name, source=self.unit_names[0][0])
        if runs_reference(x, self, name, self._fallback_reason):
            return self._reference_forward(x)
        return self._fused_forward(x)

    def unfused(self) -> nn.Module:
        """The original block, with any child replaced since fusing carried over."""
        return restore_original(self)

    def extra_repr(self) -> str:
        units = ", ".join(f"{c}->{b}" for c, b in self.unit_names)
        shortcut = "->".join(self.shortcut_pools + self.shortcut_names) or "identity"
        return f"original={type(self.original).__name__}, units=[{units}], shortcut={shortcut}, relu={self._final_relu}"



class FusedUnits(FusedResidual):
    """Any module that fusedres.fuse proved to compute a chain of conv -> BN units,

        act(bn_n(conv_n(relu(... relu(bn_1(conv_1(x))) ...))) [+ residual])

    act a ReLU, nothing, or (where the last norm is timm's BatchNormAct2d with another activation
    inside: SiLU, Hardswish, ...) that norm's own activation modules, run after the fused units;
    `join`: a residual that the caller passes (forward(x, residual)) is added before act, in the
    last unit's epilogue (an inverted residual's projection + skip). GoogLeNet's and Inception's
    BasicConv2d, a ResNet-D stem's units, a run of nn.Sequential's children, timm's ConvNormAct,
    a run inside a hand-written forward (FusedGraph): the unit chain of FusedResidual with the
    join's other operand given, on the same paths (the fused conv kernels' chain, the core path's
    one ConvBNUnits Function, BN folded into the convs in inference, the CPU's measured training
    choice). The original module's children under their own names; the original itself,
    unregistered, for fusedres.unfuse."""

    def __init__(self, block: nn.Module, units, final_relu: bool = True, join: bool = False, view: bool = False,
                 tail: Optional[str] = None, tail_post_op=None, between=None, pool: Optional[str] = None,
                 gate: Optional[str] = None) -> None:
        super().__init__(block, units, (), final_relu, ())
        self.join = bool(join)
        # a squeeze-excitation child whose output x * f(x) is the first conv's input (gate_program)
        self.gate_name = gate
        self.pool_name = pool  # an nn.MaxPool2d child after the last unit's ReLU (a stem's), or None
        # per unit but the last, the activation after it: an ops.PostOp one of the kernels' activations
        # (ReLU6, SiLU, Hardswish, ... child or functional), None for a ReLU; a norm with its own
        # activation inside (timm's BatchNormAct2d) stands for that one
        self.between = tuple(between) if between else (None,) * (len(self.unit_names) - 1)
        self.tail_name = tail  # an activation child run after the units (a Sequential's SiLU, ReLU6, ...)
        self.tail_post_op = tail_post_op  # or an ops.PostOp that a traced forward called after them
        if view:
            # a view (FusedSequential's, FusedGraph's): its owner builds a new one whenever a child
            # changes, so its units and fallback reason are found once, not per call (~3 us each,
            # 3-4 times per forward: 15% of a lone unit's host time)
            self.__dict__["_fixed_units"] = super()._units()
            self.__dict__["_fixed_fallback"] = (self._fallback_reason(),)

    def _units(self):
        fixed = self.__dict__.get("_fixed_units")
        return fixed if fixed is not None else super()._units()

    def _fusable_downsample(self):
        return None

    def _shortcut(self, x: torch.Tensor, chain: bool = False, conv_kernels: Optional[bool] = None) -> None:
        return None

    def _between_post_ops(self, units) -> tuple:
        ops = []
        for (_, bn), between in zip(units, self.between):
            ops.append(norm_post_op(bn) if norm_with_tail(bn) else between)
        return tuple(ops)

    def _apply_between(self, k: int, bn: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """The stock activation after unit k (not the last) on out = bn(conv(...)): a norm with
        its own inside applied it already."""
        if norm_with_tail(bn):
            return out
        between = self.between[k]
        return torch.relu(out) if between is None else between.apply(out)

    def _fallback_reason(self) -> Optional[str]:
        units = self._units()
        last = len(units) - 1
        for k, (conv, bn) in enumerate(units):
            # a norm with its ReLU inside (timm's BatchNormAct2d) where a ReLU follows it anyway;
            # with another activation inside, as the last unit (its activation runs after it) or
            # between units where the kernels apply it
            relu_after = (k < last and self.between[k] is None) or (k == last and self._final_relu)
            tail_ok = (k == last and not self._final_relu and not self.join) or (
                k < last and norm_with_tail(bn) and norm_post_op(bn) is not None)
            why = unfusable_reason(conv, bn, relu_inside_ok=relu_after, tail_ok=tail_ok)
            if why is not None:
                return why
        return None

    def _with_tail(self, out: torch.Tensor) -> torch.Tensor:
        """out through the activation after the last unit that the kernels did not apply: the
        tail child, or the last norm's own activation (timm's BatchNormAct2d)."""
        if self._final_relu or self.join:
            return out
        if self.tail_name is not None:
            return self.get_submodule(self.tail_name)(out)
        if self.tail_post_op is not None:
            return self.tail_post_op.apply(out)
        return norm_tail(self._units()[-1][1], out)

    def _tail_post_op(self):
        """The tail as an ops.PostOp where it is one activation oneDNN applies (else None)."""
        if self._final_relu or self.join:
            return None
        if self.tail_name is not None:
            return post_op_of(self.get_submodule(self.tail_name))
        if self.tail_post_op is not None:
            return self.tail_post_op
        norm = self._units()[-1][1]
        if norm_with_tail(norm) and type(norm._modules.get("drop")) is nn.Identity:
            return post_op_of(norm._modules.get("act"))
        return None

    def _keeps_less_alone(self) -> bool:
        # the pool's input is not kept (its indices are); nor the gated product; nor a smooth activation's input
        post_op = self._tail_post_op()
        return self.pool_name is not None or self.gate_name is not None or (
            post_op is not None and post_op.activation is not None and post_op.name not in ("hardtanh", "leaky_relu"))

    def _pool(self) -> Optional[nn.Module]:
        return self.get_submodule(self.pool_name) if self.pool_name is not None else None

    def _pooled(self, out: torch.Tensor) -> torch.Tensor:
        pool = self._pool()
        return out if pool is None else pool(out)

    def _gate(self) -> Optional[nn.Module]:
        return self.get_submodule(self.gate_name) if self.gate_name is not None else None

    def _gate_factor(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """f(x) of the gate child x * f(x), where it is an [N, C, 1, 1] tensor; else None (then
        the caller runs the child itself)."""
        module = self._gate()
        key = tuple(module._modules.values())
        cached = _GATE_PROGRAMS.get(module)
        if cached is None or cached[0] != key:  # (kept beside the module, not in it: never pickled with it)
            cached = _GATE_PROGRAMS[module] = (key, gate_program(module))
        program = cached[1]
        if program is None:
            return None
        factor = program(x)
        n, c = x.shape[:2]
        if not isinstance(factor, torch.Tensor) or tuple(factor.shape) != (n, c, 1, 1):
            return None
        return factor

    def _chain(self, units, x: torch.Tensor, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
        if self.gate_name is not None:  # (the gate runs as its module before the chain)
            x = self._gate()(x)
        post_op = self._tail_post_op()
        inside = post_op.activation if post_op is not None else None
        if inside is not None:  # inside the last unit's BatchNorm passes
            return self._pooled(super()._chain(units, x, residual, inside))
        return self._pooled(self._with_tail(super()._chain(units, x, residual, relu)))

    def _core_forward(self, x: torch.Tensor, units=None, residual: Optional[torch.Tensor] = None,
                      post_op=None, pool=None, gate=None) -> torch.Tensor:
        if self.gate_name is not None:
            # (while torch.compile traces, the child as it is: its graph is inductor's to fuse)
            gate = None if tracing() else self._gate_factor(x)
            if gate is None:  # not the [N, C, 1, 1] factor expected: the child as it is
                x = self._gate()(x)
        post_op = self._tail_post_op()
        nothing_after = self._final_relu or self.join or (self.tail_name is None and self.tail_post_op is None
                                                          and not norm_with_tail(self._units()[-1][1]))
        if post_op is not None or nothing_after:
            # the tail on every core path (in inference the last conv's post-op), and the pool
            # inside the units' Function where nothing else runs between them
            return super()._core_forward(x, units, residual, post_op, self._pool(), gate)
        return self._pooled(self._with_tail(super()._core_forward(x, units, residual, gate=gate)))

    MEMO_SIZE = 8  # inputs remembered per view

    def _memo_key(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> tuple:
        """What the CPU's measured choice depends on for a view (whose children never change):
        the input's shape, strides and dtype, gradient and autocast state, the norms' modes,
        FUSEDRES_CPU_TRAIN_PATH and the deterministic flag, a residual's presence."""
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        return (x.shape, x.stride(), x.dtype, x.requires_grad, torch.is_grad_enabled(), autocast,
                tuple(bn.training for _, bn in self._units()), cpu_train_path(),
                torch.are_deterministic_algorithms_enabled(), residual is None,
                self._train_slowdown(self._units()))

    def _stock_chosen(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> None:
        if "_fixed_units" not in self.__dict__:  # (not a view: its children may change)
            return
        memo = self.__dict__.setdefault("_fusedres_stock_memo", set())
        if len(memo) >= self.MEMO_SIZE:
            memo.clear()
        memo.add(self._memo_key(x, residual))

    def _remembered_stock(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
        """Whether the CPU's measured choice ran stock for this view and input before: then the
        stock forward runs straight away (~25 us of checks per call less: a lone unit's host
        time is a few percent of a small model's training step)."""
        memo = self.__dict__.get("_fusedres_stock_memo")
        if not memo or x.device.type != "cpu" or tracing():
            return False
        units = self._units()
        if not (any(bn.training for _, bn in units) or grad_needed(x, residual, *[m for u in units for m in u])):
            return False  # not differentiated: inference, never the measured choice
        return self._memo_key(x, residual) in memo

    def _reference_forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        units = self._units()
        out = x if self.gate_name is None else self._gate()(x)
        for i, (conv, bn) in enumerate(units):
            out = bn(conv(out))  # (a norm's own activation inside: applied here)
            if i < len(units) - 1:
                out = self._apply_between(i, bn, out)
        if residual is not None:
            out = out + residual
        if self.tail_name is not None:
            out = self.get_submodule(self.tail_name)(out)
        elif self.tail_post_op is not None:
            out = self.tail_post_op.apply(out)
        return self._pooled(torch.relu(out) if self._final_relu else out)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        name = f"FusedUnits({type(self.original).__name__})"
        check_block_input(x, self._units()[0][0], name, reader="the unit", source=self.unit_names[0][0])
        if (residual is None) == self.join:
            raise TypeError(f"{name}: " + ("expects the residual to add (forward(x, residual))" if self.join else
                                           "takes no residual (it has no join)"))
        if runs_reference(x, self, name, self._fallback_reason, self.__dict__.get("_fixed_fallback")) or (
                residual is not None and not self._residual_fits(x, residual)):
            return self._reference_forward(x, residual)
        if self._remembered_stock(x, residual):  # (a view's original holds exactly its children)
            return self.original.forward(x) if residual is None else self.original.forward(x, residual)
        return self._fused_forward(x, residual)

    def _residual_fits(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        """Whether `residual` is exactly the units' output's shape, dtype and device (the epilogue
        adds it element for element; broadcasting or type promotion: the reference add)."""
        if not isinstance(residual, torch.Tensor) or residual.device != x.device or residual.dtype != x.dtype:
            return False
        n, _, h, w = x.shape
        for conv, _ in self._units():
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
            h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return tuple(residual.shape) == (n, self._units()[-1][0].out_channels, h, w)

    def extra_repr(self) -> str:
        units = ", ".join(f"{c}->{b}" for c, b in self.unit_names)
        return (f"original={type(self.original).__name__}, units=[{units}]{', + residual' if self.join else ''}, "
                f"relu={self._final_relu}")


class SequentialRun(NamedTuple):
    """Children start..stop-1 of an nn.Sequential: conv -> BN (-> ReLU -> conv -> BN)* (-> ReLU)."""
    start: int
    stop: int
    units: tuple  # ((conv name, bn name), ...)
    final_relu: bool
    tail: Optional[str] = None  # the run's last child: an activation other than ReLU (ops.PostOp), run after
    between: tuple = ()  # per unit but the last: the ops.PostOp after it, None for ReLU (or the norm's own)
    pool: Optional[str] = None  # an nn.MaxPool2d after the run's ReLU (a stem's), run last
    gate: Optional[str] = None  # a squeeze-excitation x * f(x) whose output is the run's input, run first


class HoldsViews:
    """Mixin of the modules that run unregistered FusedUnits views over their children
    (FusedSequential, FusedGraph; derived_holders(): the views built so far): a mode flip reaches
    the views, a move drops their caches, fusedres_memory_efficient reaches the views (set_memory_efficient)."""

    fusedres_memory_efficient = False

    def train(self, mode: bool = True):
        for view in self.derived_holders():
            view.train(mode)
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        for view in self.derived_holders():
            drop_derived(view)
        return super()._apply(fn, *args, **kwargs)


class FusedSequential(HoldsViews, nn.Sequential):
    """An nn.Sequential (torchvision's Conv2dNormActivation, VGG's features, MNASNet's and
    ShuffleNetV2's layers, a MobileNetV2 block's convs, ...) whose runs of conv -> BN (-> ReLU)
    children run as FusedUnits; every other child runs as it is (and was fused itself where
    fusedres.fuse could). The same children under the same names (state_dict keys unchanged,
    indexing and len as before); the original, unregistered, for fusedres.unfuse.

    Each run's FusedUnits is a view over this module's children, not a submodule (no duplicate
    keys): rebuilt when a child is replaced; a mode flip, a move and fusedres.refresh reach its
    caches through this module."""

    def __init__(self, sequential: nn.Sequential, runs) -> None:
        super().__init__()
        for name, child in sequential._modules.items():
            self._modules[name] = child
        object.__setattr__(self, "original", sequential)
        self.runs = tuple(SequentialRun(*r) for r in runs)
        self.training = sequential.training

    def _views(self):
        """{start index: FusedUnits over that run's children}, per set of children."""
        def build():
            names = list(self._modules)
            views = {}
            for run in self.runs:
                part = nn.Sequential(collections.OrderedDict((n, self._modules[n]) for n in names[run.start:run.stop]))
                part.training = self.training
                views[run.start] = FusedUnits(part, run.units, run.final_relu, view=True, tail=run.tail,
                                              between=run.between, pool=run.pool, gate=run.gate)
                views[run.start].fusedres_memory_efficient = self.fusedres_memory_efficient
            return views

        return cached_per_submodules(self, "_fusedres_views", build)

    def derived_holders(self):
        """The modules whose DerivedCaches belong to this one (block_plumbing.drop_derived)."""
        cached = self.__dict__.get("_fusedres_views")
        return list(cached[1].values()) if cached is not None else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = self._views()
        stops = {r.start: r.stop for r in self.runs}
        children = list(self._modules.values())
        i = 0
        while i < len(children):
            if i in stops:
                x = views[i](x)
                i = stops[i]
            else:
                x = children[i](x)
                i += 1
        return x

    def unfused(self) -> nn.Sequential:
        """The original Sequential, with any child replaced since fusing carried over."""
        return restore_original(self)

    def extra_repr(self) -> str:
        names = list(self._modules)
        runs = "; ".join(" -> ".join(names[r.start:r.stop]) for r in self.runs)
        return f"original={type(self.original).__name__}, fused runs=[{runs}]"


class UnitRun(nn.Module):
    """The stock computation of a run of units that fusedres.fuse found in a traced forward
    (FusedGraph): conv -> norm (-> ReLU -> conv -> norm)* [+ residual] (-> ReLU), with the run's
    convs and norms as children (their paths in the traced module, '.' written '__'). What a
    FusedUnits view over the run falls back to."""

    def __init__(self, modules, units, final_relu: bool, join: bool, tail=None, between=None,
                 pool: Optional[str] = None, gate: Optional[str] = None) -> None:
        super().__init__()
        for name, module in modules.items():
            self._modules[name] = module
        self.units = tuple(tuple(u) for u in units)
        self.final_relu = bool(final_relu)
        self.join = bool(join)
        self.tail = tail  # an ops.PostOp after the last unit (the traced forward's activation call)
        # per unit but the last: the ops.PostOp after it, None for ReLU or the norm's own activation
        self.between = tuple(between) if between else (None,) * (len(self.units) - 1)
        self.pool = pool  # the name of an nn.MaxPool2d child run last, or None
        self.gate = gate  # the name of a gate child (x * f(x)) run first, or None

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.gate is not None:
            x = self._modules[self.gate](x)
        for i, (conv, bn) in enumerate(self.units):
            norm = self._modules[bn]
            x = norm(self._modules[conv](x))
            if i < len(self.units) - 1 and not norm_with_tail(norm):
                x = torch.relu(x) if self.between[i] is None else self.between[i].apply(x)
        if residual is not None:
            x = x + residual
        if self.tail is not None:
            x = self.tail.apply(x)
        x = torch.relu(x) if self.final_relu else x
        return x if self.pool is None else self._modules[self.pool](x)


def set_memory_efficient(model: nn.Module, enabled: bool) -> int:
    """Sets fusedres_memory_efficient on every fused module of `model` and its views (built before
    or later); returns how many modules it set."""
    count = 0
    for m in model.modules():
        if isinstance(m, (_FusedBlockBase, HoldsViews)):
            m.fusedres_memory_efficient = bool(enabled)
            count += 1
            if isinstance(m, HoldsViews):
                for view in m.derived_holders():
                    view.fusedres_memory_efficient = bool(enabled)
    return count


class FusedNormReLU(CachesDerivedValues, nn.Module):
    """relu(norm(x)) for a BatchNorm that a ReLU follows but no fusable conv precedes (a
    pre-activation ResNet's norm1, the norm before a head): its statistics, then normalize + ReLU
    in one pass (autograd.bn_relu; stock takes BatchNorm's pass and then ReLU's); in inference one
    pass with the running statistics (cached). The CPU's measured training choice applies, as for
    the units. `norm` is the only child (a view: FusedGraph holds it unregistered)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.training = norm.training

    def _fallback_reason(self) -> Optional[str]:
        return norm_unfusable_reason(self._modules["norm"], relu_inside_ok=True)

    def _stock_forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self._modules["norm"](x))

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        return bn_relu(x, bn_args(self._modules["norm"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self._modules["norm"]
        name = f"FusedNormReLU({type(norm).__name__})"
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != norm.num_features:
            return self._stock_forward(x)  # (the norm's own error for a wrong input)
        if runs_reference(x, self, name, self._fallback_reason):
            return self._stock_forward(x)
        if tracing():
            return self._stock_forward(x)  # (inductor fuses BatchNorm and ReLU itself)
        if inference(x, norm):
            return bn_relu_inference(x, eval_bn_stats(self, norm, x))
        if x.device.type == "cpu" and not uses_fused_training(self, x, self._fused, self._stock_forward):
            return self._stock_forward(x)
        return self._fused(x)


class RunSpec(NamedTuple):
    """A run of units in a FusedGraph's traced forward, called there as `target`."""
    target: str  # the call_module target in the rewritten graph
    units: tuple  # ((conv path, norm path), ...) in the traced module
    final_relu: bool
    join: bool  # a residual add after the last unit (its other operand the call's second argument)
    tail: Optional[object] = None  # an ops.PostOp activation after the last unit (a module or a functional)
    between: tuple = ()  # per unit but the last: the ops.PostOp after it, None for ReLU (or the norm's own)
    pool: Optional[str] = None  # an nn.MaxPool2d after the run's ReLU (a stem's), run last
    gate: Optional[str] = None  # a squeeze-excitation x * f(x) whose output is the run's input, run first


class NormReLUSpec(NamedTuple):
    """A BatchNorm -> ReLU with no conv fused, called in a FusedGraph's traced forward as `target`."""
    target: str
    norm: str  # its path in the traced module


class ProgramArguments(NamedTuple):
    """The parameters of a module's forward as its traced program takes them: `required` (no
    default: tensors in the trace), then `optional` ((name, default) pairs, each traced at its
    default by torch.fx's concrete_args, so a branch on `arg is None` took the default's side)."""
    required: tuple
    optional: tuple

    def traced_inputs(self, forward, module, args, kwargs) -> Optional[tuple]:
        """The program's inputs for forward(module, *args, **kwargs) (the required arguments), or
        None where the call is not one the trace followed: a required argument that is no tensor,
        an optional one given another value than its default."""
        try:
            bound = inspect.signature(forward).bind(module, *args, **kwargs).arguments
        except TypeError:
            return None
        values = [bound.get(name) for name in self.required]
        if not all(isinstance(v, torch.Tensor) for v in values):
            return None
        for name, default in self.optional:
            if name in bound:
                value = bound[name]
                if not (value is default or (type(value) is type(default) and value == default)):
                    return None
        return tuple(values)


class FusedGraph(HoldsViews, CachesDerivedValues, nn.Module):
    """A module whose forward fusedres.fuse traced (torch.fx, its own children as leaves) and
    rewrote: each run of conv -> BN (-> ReLU -> conv -> BN)* (-> ReLU) among its submodules, with
    the residual add (and ReLU) right after it where there is one, runs as a FusedUnits view;
    every other op runs as the original forward computes it (squeeze-excitation gates, pooling,
    drop path, the head). A timm SE-ResNeXt bottleneck, an EfficientNet inverted residual, a
    ResNet's stem inside the model's own forward.

    Not a wrapper: fuse() gives the module itself a class made for its class (FusedGraph first,
    then the original class: fused_graph_class), so its attributes, methods, isinstance, hooks and
    state_dict keys are the module's own; only forward differs. The traced forward is specialized
    to the module's own `training` flag (the graph for each mode is kept, chosen per call) and to
    its other attributes as they were when traced: setting one (GhostNet's `drop_rate`, a
    `grad_checkpointing` flag) traces the forward again (where it then no longer traces, the
    original forward runs, said once). unfused() gives back an object of the original
    class. The views are not submodules (no duplicate keys): rebuilt when a child is replaced; a
    mode flip, a move and fusedres.refresh reach their caches through this module."""

    _fusedres_original_class = nn.Module  # set on each class fused_graph_class makes

    @classmethod
    def adopt(cls, module: nn.Module, programs, arguments: "ProgramArguments", retrace: Callable) -> nn.Module:
        """`module` itself, its class made fused_graph_class(type(module)), running `programs`:
        {training flag: (torch.fx.Graph, (RunSpec, ...))}, traced for the calls `arguments` covers.
        retrace(module of its original class) -> (programs, arguments, why), programs None where its
        forward no longer traces: called when an attribute the trace may have read is set
        (fuse's graph_programs; a module-level function, so the module stays picklable)."""
        module.__class__ = fused_graph_class(type(module))
        module.__dict__["_fusedres_programs"] = dict(programs)
        module.__dict__["_fusedres_arguments"] = arguments
        module.__dict__["_fusedres_retrace"] = retrace
        # the plain attributes a trace may have read: the module's own when fused (not nn.Module's
        # bookkeeping; torch sets others on it, such as torch.compile's _is_torch_compile)
        module.__dict__["_fusedres_traced_attributes"] = frozenset(
            name for name in module.__dict__ if name not in _NOT_READ_BY_TRACES and not name.startswith("_fusedres_"))
        return module

    def __setattr__(self, name: str, value) -> None:
        stale = (name in self.__dict__.get("_fusedres_traced_attributes", ()) and not isinstance(value, nn.Module)
                 and not _same_value(self.__dict__.get(name, _MISSING), value))
        super().__setattr__(name, value)
        if stale:
            self._retrace(name)

    def _retrace(self, changed: str) -> None:
        """The programs traced again for the attributes as they are now (`changed` was set)."""
        fused_class = type(self)
        drop_derived(self)
        for training in (0, 1):
            self.__dict__.pop(f"_fusedres_program_{training}", None)
        object.__setattr__(self, "__class__", self._fusedres_original_class)  # torch.fx traces type(root).forward
        try:
            programs, arguments, _ = self.__dict__["_fusedres_retrace"](self)
        finally:
            object.__setattr__(self, "__class__", fused_class)
        self.__dict__["_fusedres_programs"] = None if programs is None else dict(programs)
        self.__dict__["_fusedres_arguments"] = arguments
        if programs is None:
            warn_once(("graph-retrace", self._fusedres_original_class, changed),
                      f"fusedres: {self._fusedres_original_class.__name__}.{changed} was set and its forward "
                      f"no longer traces into a fused program: it runs its own forward")

    def _program(self, training: bool):
        """The GraphModule that runs the rewritten forward for this mode, built once per set of
        children (its call_module targets resolved to them and to the views)."""
        def build():
            graph, specs = self.__dict__["_fusedres_programs"][training]
            root = nn.Module()
            for name, child in self._modules.items():
                root._modules[name] = child
            for node in graph.nodes:  # the tensor constants its trace made (fuse._trace)
                if node.op == "get_attr" and node.target.startswith("_fusedres_constant_"):
                    setattr(root, node.target, self.__dict__[node.target])
            views = []
            for spec in specs:
                if isinstance(spec, NormReLUSpec):
                    view = FusedNormReLU(self.get_submodule(spec.norm))
                    view.training = self.training
                    root._modules[spec.target] = view
                    views.append(view)
                    continue
                names = {path: path.replace(".", "__") for unit in spec.units for path in unit}
                for extra in (spec.pool, spec.gate):
                    if extra is not None:
                        names[extra] = extra.replace(".", "__")
                part = UnitRun({names[p]: self.get_submodule(p) for p in names},
                               [(names[c], names[b]) for c, b in spec.units], spec.final_relu, spec.join, spec.tail,
                               spec.between, names.get(spec.pool), names.get(spec.gate))
                view = FusedUnits(part, part.units, spec.final_relu, spec.join, view=True, tail_post_op=spec.tail,
                                  between=spec.between, pool=names.get(spec.pool), gate=names.get(spec.gate))
                view.training = self.training
                view.fusedres_memory_efficient = self.fusedres_memory_efficient
                root._modules[spec.target] = view
                views.append(view)
            # (a copy: a GraphModule owns its graph; the kept one stays unowned, picklable)
            program = torch.fx.GraphModule(root, copy.deepcopy(graph), class_name="FusedGraphProgram")
            return program, views

        return cached_per_submodules(self, f"_fusedres_program_{int(training)}", build)[0]

    def derived_holders(self):
        """The views whose DerivedCaches belong to this module (block_plumbing.drop_derived)."""
        views = []
        for training in (0, 1):
            cached = self.__dict__.get(f"_fusedres_program_{training}")
            if cached is not None:
                views.extend(cached[1][1])
        return views

    def views(self):
        """The FusedUnits views of both modes' programs (built if need be)."""
        for training in self.__dict__["_fusedres_programs"] or ():
            self._program(training)
        return self.derived_holders()

    def forward(self, *args, **kwargs):
        arguments = self.__dict__["_fusedres_arguments"]
        if arguments is None:  # retraced after an attribute was set, and it no longer traces
            return self._fusedres_original_class.forward(self, *args, **kwargs)
        if kwargs or len(args) != len(arguments.required) or not all(isinstance(a, torch.Tensor) for a in args):
            traced = arguments.traced_inputs(self._fusedres_original_class.forward, self, args, kwargs)
            if traced is None:  # a call the trace did not follow: the module's own forward, said once
                warn_once(("graph-call", self._fusedres_original_class),
                          f"fusedres: {self._fusedres_original_class.__name__}.forward was called with arguments its "
                          f"fused program was not traced for (tensors for {', '.join(arguments.required)}, the "
                          f"defaults for the rest): such calls run its own forward")
                return self._fusedres_original_class.forward(self, *args, **kwargs)
            args = traced
        return self._program(self.training)(*args)

    def unfused(self) -> nn.Module:
        """This module as an object of its original class (the same children, parameters,
        buffers, attributes and hooks; the fused programs left out)."""
        original = self._fusedres_original_class.__new__(self._fusedres_original_class)
        original.__dict__.update(_unfused_state(self.__dict__))
        return original

    def __reduce_ex__(self, protocol):
        # the class is made at run time (not importable by name): pickled as the original class's
        # name and this state, rebuilt by fused_graph_class (programs' GraphModules rebuilt on use)
        return (_rebuild_fused_graph, (self._fusedres_original_class,), _picklable_state(self.__dict__))

    def __setstate__(self, state) -> None:
        nn.Module.__setstate__(self, state)
        # the programs rebuilt now, not on the first call: that may be inside torch.compile's
        # tracing (a deep copy, then compile), where building a GraphModule is a graph break
        self.views()


# nn.Module's own bookkeeping (hooks, the compiled call, the mode: the programs exist per mode):
# setting these changes nothing a traced forward read
_NOT_READ_BY_TRACES = frozenset(nn.Module().__dict__) | {"_is_full_backward_hook", "_compiled_call_impl"}
_MISSING = object()


def _same_value(old, new) -> bool:
    """Whether setting `new` over `old` leaves what a trace read as it was (the same object, or an
    equal number, string, flag or tuple of them)."""
    if old is new:
        return True
    plain = (bool, int, float, str, type(None), tuple)
    if type(old) is not type(new) or not isinstance(old, plain):
        return False
    try:
        return bool(old == new)
    except Exception:
        return False


def _unfused_state(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("_fusedres_")}


def _picklable_state(state: dict) -> dict:
    """A FusedGraph's __dict__ for pickling and deep copies: without the built programs (their
    views and caches are derived; rebuilt on first use)."""
    return {k: v for k, v in state.items() if not k.startswith("_fusedres_program_")
            and k != "_fusedres_structure"}


_GRAPH_CLASSES = {}
_GRAPH_CLASSES_LOCK = threading.Lock()


def fused_graph_class(cls: type) -> type:
    """The class a FusedGraph of a `cls` module has: FusedGraph's methods first, then cls's (one
    per original class, made once)."""
    if issubclass(cls, FusedGraph):
        return cls
    with _GRAPH_CLASSES_LOCK:
        made = _GRAPH_CLASSES.get(cls)
        if made is None:
            made = _GRAPH_CLASSES[cls] = type(f"FusedGraph[{cls.__name__}]", (FusedGraph, cls),
                                              {"_fusedres_original_class": cls, "__module__": __name__})
        return made


def _rebuild_fused_graph(cls: type) -> nn.Module:
    made = fused_graph_class(cls)
    return made.__new__(made)
