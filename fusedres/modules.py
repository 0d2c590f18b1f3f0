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
import threading
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn

from .autograd import (Unit, autocast_dtype, chain_unsupported_reason, conv_bias_act_inference_unchecked, conv_bn_chain,
                       conv_bn_units)
from .batchnorm import bn_args, check_sync_args, convert_sync_batchnorm
from .block_plumbing import (CachesDerivedValues, bn_state_tensors, cached_per_submodules, check_block_input, conv_args,
                             derived_cache, drop_derived, grad_needed, runs_reference, unfusable_reason,
                             uses_fused_training)
from .common import tracing
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


class _FusedBlockBase(CachesDerivedValues, nn.Module):
    """forward() plumbing shared by the fused blocks; subclasses define `_units()` (the main path's
    (conv, bn) units, ReLU between them) and may override `_shortcut()` and `_final_relu`."""

    _final_relu = True  # ReLU after the residual add

    def _core_units(self, units, x: torch.Tensor, residual: Optional[torch.Tensor], relu: bool,
                    conv_kernels: Optional[bool] = None) -> torch.Tensor:
        """act(bn_n(conv_n(... relu(bn_1(conv_1(x))) ...)) + residual) on the core path: in training
        or with gradients one ConvBNUnits Function for all the units (aten's conv, the BatchNorm
        ops); in eval without gradients, per unit BN folded into the conv (cached) and bias +
        residual + act in the conv's epilogue (fused conv kernels) or one pass after aten's conv.
        conv_kernels: whether the fused conv kernels run the inference convs (found once per
        block forward; None: asked per conv)."""
        bns = [bn_args(bn) for _, bn in units]  # once per BatchNorm per forward: it counts batches
        if any(b.batch_stats for b in bns) or grad_needed(x, residual, *[m for unit in units for m in unit]):
            return conv_bn_units(x, [Unit(conv_args(conv), b) for (conv, _), b in zip(units, bns)], residual, relu)
        out = x
        last = len(units) - 1
        for i, (conv, bn) in enumerate(units):
            weight, bias, packs = self._folded(conv, bn)
            out = conv_bias_act_inference_unchecked(out, weight, bias, residual if i == last else None,
                                                    conv_args(conv).spec, relu if i == last else True, conv_kernels,
                                                    packs.get if packs is not None else None)
        return out

    def _chain(self, units, x: torch.Tensor, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
        """The units as one conv_bn_chain on the fused conv kernels."""
        return conv_bn_chain(x, [Unit(conv_args(c), bn_args(b)) for c, b in units], residual, relu)

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

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        units = self._units()
        # training, or eval with gradients: autograd differentiates this forward
        differentiated = (any(bn.training for _, bn in units)
                          or grad_needed(x, None, *[m for u in units for m in u]))
        if self._use_chain(x, units, differentiated):
            identity = self._shortcut(x, chain=True)
            return self._chain(units, x, identity, relu=self._final_relu)
        if tracing() and self._traced_on_aten(x, units):
            # aten's convs either way: the stock forward, whose BatchNorm, add and ReLU inductor
            # fuses into one pass after each conv itself (an opaque op would stop it; a fold in
            # the graph would rewrite every weight per call: ResNet-50 batch 1, 111 ms compiled
            # against 97.5 for stock compiled)
            return self._reference_forward(x)
        if x.device.type == "cpu" and differentiated:
            if not uses_fused_training(self, x, self._core_forward, self._stock_forward):
                return self._stock_forward(x)
        return self._core_forward(x, units)

    def _stock_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stock block's own forward (in-place ReLU and add included), for the CPU's measured
        training choice."""
        return self._reference_forward(x)

    @staticmethod
    def _traced_on_aten(x: torch.Tensor, units) -> bool:
        """Whether this block's convs run on aten's conv (not the fused conv kernels)."""
        return kernel_unsupported_reason(x, units[0][0].weight, autocast_dtype(x)) is not None

    def _core_forward(self, x: torch.Tensor, units=None) -> torch.Tensor:
        """The block on the core path: aten's convs with the BatchNorm ops (or folded, in inference)."""
        units = units or self._units()
        conv_kernels = None
        if not torch.is_autocast_enabled(x.device.type):  # every conv of the block alike: ask once
            conv_kernels = kernel_unsupported_reason(x, units[0][0].weight) is None
        identity = self._shortcut(x, conv_kernels=conv_kernels)
        return self._core_units(units, x, identity, self._final_relu, conv_kernels)

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

    def _stock_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The original block's own forward, over this module's children (in-place ReLU and add
        as its code writes them: the generic _reference_forward allocates a tensor per op, 3%
        slower on a ResNet-50 CPU train step at batch 8, 112x112: 592 ms against 573)."""
        return self.unfused().forward(x)

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
    """Any module that fusedres.fuse proved to compute a chain of conv -> BN units with no residual,

        act(bn_n(conv_n(relu(... relu(bn_1(conv_1(x))) ...))))

    act a ReLU or nothing (GoogLeNet's and Inception's BasicConv2d, a ResNet-D stem's units, a
    run of nn.Sequential's children): the unit chain of FusedResidual without the join, on the
    same paths (the fused conv kernels' chain, the core path's one ConvBNUnits Function, BN folded
    into the convs in inference, the CPU's measured training choice). The original module's
    children under their own names; the original itself, unregistered, for fusedres.unfuse."""

    def __init__(self, block: nn.Module, units, final_relu: bool = True) -> None:
        super().__init__(block, units, (), final_relu, ())

    def _fusable_downsample(self):
        return None

    def _shortcut(self, x: torch.Tensor, chain: bool = False, conv_kernels: Optional[bool] = None) -> None:
        return None

    def _fallback_reason(self) -> Optional[str]:
        units = self._units()
        for k, (conv, bn) in enumerate(units):
            # a norm with its ReLU inside (timm's BatchNormAct2d) where a ReLU follows it anyway
            why = unfusable_reason(conv, bn, relu_inside_ok=k < len(units) - 1 or self._final_relu)
            if why is not None:
                return why
        return None

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        units = self._units()
        out = x
        for i, (conv, bn) in enumerate(units):
            out = bn(conv(out))
            if i < len(units) - 1 or self._final_relu:
                out = torch.relu(out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = f"FusedUnits({type(self.original).__name__})"
        check_block_input(x, self._units()[0][0], name, reader="the unit", source=self.unit_names[0][0])
        if runs_reference(x, self, name, self._fallback_reason):
            return self._reference_forward(x)
        return self._fused_forward(x)

    def extra_repr(self) -> str:
        units = ", ".join(f"{c}->{b}" for c, b in self.unit_names)
        return f"original={type(self.original).__name__}, units=[{units}], relu={self._final_relu}"


class SequentialRun(NamedTuple):
    """Children start..stop-1 of an nn.Sequential: conv -> BN (-> ReLU -> conv -> BN)* (-> ReLU)."""
    start: int
    stop: int
    units: tuple  # ((conv name, bn name), ...)
    final_relu: bool


class FusedSequential(nn.Sequential):
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
                views[run.start] = FusedUnits(part, run.units, run.final_relu)
            return views

        return cached_per_submodules(self, "_fusedres_views", build)

    def derived_holders(self):
        """The modules whose DerivedCaches belong to this one (block_plumbing.drop_derived)."""
        cached = self.__dict__.get("_fusedres_views")
        return list(cached[1].values()) if cached is not None else []

    def train(self, mode: bool = True):
        for view in self.derived_holders():
            view.train(mode)
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        for view in self.derived_holders():
            drop_derived(view)
        return super()._apply(fn, *args, **kwargs)

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
