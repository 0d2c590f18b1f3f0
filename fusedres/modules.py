"""Drop-in fused residual blocks with torchvision's constructor signatures and state_dict keys.

FusedBasicBlock and FusedBottleneck hold the same submodules as torchvision's BasicBlock and
Bottleneck (conv1, bn1, conv2, bn2[, conv3, bn3], relu, downsample), so checkpoints load both
ways with strict=True; only forward differs.

Where the fused conv kernels run (GPU, channels_last, not float64; or the triton backend under the
interpreter), training and eval with gradients run the block's conv -> BN -> ReLU units as one
fusedres.autograd.conv_bn_chain: BN statistics in each conv's epilogue, BN + ReLU in the next
conv's prologue, BN + residual + ReLU of the last unit in one pass. Elsewhere each
conv -> BN -> (add) -> ReLU runs as one core unit (aten's conv, then the BN ops):
  training                       batch statistics, running statistics updated as nn does
  eval, gradients needed         running statistics as constants, full backward
  eval, no gradients (inference) BN folded into the conv weights (cached until they change),
                                 then bias + residual + ReLU in the conv's epilogue (fused conv
                                 kernels) or in one pass after aten's conv
Synchronized norm layers (sync_bn=True, which makes them SyncBatchNorm2d; or nn.SyncBatchNorm,
e.g. from nn.SyncBatchNorm.convert_sync_batchnorm, which works on GPUs only) are fused too: in
training under torch.distributed their batch statistics are those of every process's batch, one
all-reduce per BatchNorm forward and one backward (ops.distributed). A block whose convs or norm
layers are not plain nn.Conv2d / nn.BatchNorm2d / SyncBatchNorm2d / nn.SyncBatchNorm (a custom
norm_layer, FrozenBatchNorm2d, padding_mode other than zeros) runs the reference torchvision
forward instead and says so once.
"""
import threading
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn

from .autograd import (BNArgs, ConvArgs, chain_unsupported_reason, conv_bias_act_inference, conv_bn_act, conv_bn_chain,
                       sync_batch_norm, tracing)
from .models.resnet import BasicBlock, Bottleneck
from .ops import fold_bn, sync_group

_warned = set()
_warned_lock = threading.Lock()


def _warn_once(key, message):
    with _warned_lock:  # two threads hitting one fallback at once warn once
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def runs_reference(x: torch.Tensor, owner: str, fallback_reason: Callable[[], Optional[str]]) -> bool:
    """Whether a fused module's forward runs its reference (stock) forward instead: for an empty
    batch (exactly what the reference does with one), or where a submodule cannot be fused
    (fallback_reason() says why; warned once per owner and reason)."""
    if x.numel() == 0:
        return True
    why = fallback_reason()
    if why is not None:
        _warn_once((owner, why), f"fusedres: {owner} runs the unfused reference forward: {why}")
        return True
    return False


def _is_plain(module: nn.Module, cls) -> bool:
    return isinstance(module, cls) and type(module).forward is cls.forward


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode batch statistics are those of every process's batch,
    like nn.SyncBatchNorm, on any device (nn.SyncBatchNorm, and DistributedDataParallel holding
    one, accept only CUDA modules), with nn.BatchNorm2d's state_dict keys.

    It synchronizes, as nn.SyncBatchNorm does, only in training mode under an initialized
    torch.distributed with more than one process in `process_group` (None: the default group);
    otherwise it is nn.BatchNorm2d. Fused blocks fuse it, synchronized; standalone it is one
    all-reduce of per-channel count, sum and sum of squares forward and one of BatchNorm's two
    sums backward."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Optional[object] = None, device=None,
                 dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sync = sync_group(self.process_group) if self.training else None
        if sync is None:
            return super().forward(x)
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm2d: input has {x.shape[1]} channels, expected {self.num_features}")
        if x.numel() == 0:
            raise ValueError("SyncBatchNorm2d: an empty batch on one process while synchronizing statistics "
                             "(every process needs at least one sample per step)")
        b = bn_args(self)
        return sync_batch_norm(x, b.weight, b.bias, b.running_mean, b.running_var, b.eps, b.momentum, b.sync)

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, process_group: Optional[object] = None
                       ) -> "SyncBatchNorm2d":
        """A SyncBatchNorm2d sharing bn's parameters and buffers (and its training flag)."""
        sync = cls.__new__(cls)
        nn.Module.__init__(sync)
        sync.__dict__.update({k: v for k, v in bn.__dict__.items()
                              if k not in ("_parameters", "_buffers", "_modules")})
        sync._parameters = bn._parameters
        sync._buffers = bn._buffers
        sync._modules = bn._modules
        sync.process_group = process_group
        return sync


def convert_sync_batchnorm(module: nn.Module, process_group: Optional[object] = None) -> nn.Module:
    """module with every nn.BatchNorm2d / nn.SyncBatchNorm in it replaced, in place, by a
    SyncBatchNorm2d over process_group sharing its parameters and buffers (so state_dict keys and
    optimizers are unchanged). Returns module, or the replacement if module itself is one."""
    if type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return SyncBatchNorm2d.from_batchnorm(module, process_group)
    for name, child in module._modules.items():
        if child is not None:
            module._modules[name] = convert_sync_batchnorm(child, process_group)
    return module


def norm_with_relu(norm: nn.Module) -> bool:
    """Whether `norm` is BatchNorm followed by a ReLU in one module, as timm writes its DenseNet:
    timm.layers.BatchNormAct2d (its own forward: F.batch_norm with nn.BatchNorm2d's arguments, then
    `drop`, then `act`) with `drop` an nn.Identity and `act` an nn.ReLU."""
    cls = type(norm)
    return (cls.__name__ == "BatchNormAct2d" and cls.__module__.startswith("timm.")
            and isinstance(norm, nn.BatchNorm2d) and type(getattr(norm, "act", None)) is nn.ReLU
            and type(getattr(norm, "drop", None)) is nn.Identity)


def unfusable_reason(conv: nn.Module, bn: nn.Module, sync_ok: bool = True, relu_inside_ok: bool = False
                     ) -> Optional[str]:
    """None if conv -> bn can run as a fused unit, else why not. sync_ok: a synchronized norm
    (SyncBatchNorm2d, nn.SyncBatchNorm) is fused with its statistics synchronized, rather than
    left to its own forward. relu_inside_ok: where a ReLU follows the norm anyway (the dense
    layers' BN -> ReLU -> conv), a norm with that ReLU inside (norm_with_relu) is fused too."""
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.padding_mode != "zeros":
        return f"conv padding_mode={conv.padding_mode!r} (only 'zeros' is fused)"
    if isinstance(conv.padding, str):
        return f"conv padding={conv.padding!r} (only explicit padding is fused)"
    if sync_ok and (_is_plain(bn, SyncBatchNorm2d) or _is_plain(bn, nn.SyncBatchNorm)):
        return None
    if relu_inside_ok and norm_with_relu(bn):
        return None
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


def _grad_needed(x, residual, *modules) -> bool:
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad or (residual is not None and residual.requires_grad):
        return True
    return any(p.requires_grad for m in modules for p in m.parameters(recurse=False))


def bn_args(bn: nn.BatchNorm2d) -> BNArgs:
    """BatchNorm's arguments for this forward, with nn.BatchNorm2d.forward's own bookkeeping
    (num_batches_tracked counted, momentum=None as a cumulative average)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    # nn.SyncBatchNorm synchronizes only in training mode, under an initialized process group of > 1
    sync = (sync_group(bn.process_group) if isinstance(bn, (SyncBatchNorm2d, nn.SyncBatchNorm)) and bn.training
            else None)
    return BNArgs(bn.weight, bn.bias, bn.running_mean if track else None, bn.running_var if track else None,
                  bn.eps, momentum, batch_stats, sync)


def conv_args(conv: nn.Conv2d) -> ConvArgs:
    return ConvArgs(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class _FusedBlockBase(nn.Module):
    """forward() plumbing shared by the fused blocks; subclasses define `_units()` (the main path's
    (conv, bn) units, ReLU between them) and may override `_shortcut_units()` and `_final_relu`."""

    _bn_args = staticmethod(bn_args)
    _conv_args = staticmethod(conv_args)
    _final_relu = True  # ReLU after the residual add

    def _conv_bn(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor,
                 residual: Optional[torch.Tensor] = None, relu: bool = True) -> torch.Tensor:
        """act(bn(conv(x)) + residual) as one core unit: aten's conv, then the BatchNorm ops."""
        b = self._bn_args(bn)
        conv_args = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
        if not b.batch_stats and not _grad_needed(x, residual, conv, bn):
            weight, bias = self._folded(conv, bn)
            return conv_bias_act_inference(x, weight, bias, residual, relu=relu, **conv_args)
        return conv_bn_act(x, conv.weight, conv.bias, b.weight, b.bias, b.running_mean, b.running_var, residual,
                           eps=b.eps, momentum=b.momentum, batch_stats=b.batch_stats, relu=relu, sync=b.sync,
                           **conv_args)

    def _chain(self, units, x: torch.Tensor, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
        """The units as one conv_bn_chain on the fused conv kernels."""
        return conv_bn_chain(x, [(self._conv_args(c), self._bn_args(b)) for c, b in units], residual, relu)

    def _use_chain(self, x: torch.Tensor) -> bool:
        """Training, or eval with gradients, where every conv runs on the fused conv kernels. Eval
        without gradients keeps BN folded into the weights (per-unit path, whose conv uses the
        kernels' bias + residual + ReLU epilogue where they run)."""
        units = list(self._units())
        if not any(bn.training for _, bn in units) and not _grad_needed(x, None, *[m for u in units for m in u]):
            return False
        convs = [self._conv_args(c) for c, _ in units]
        ds = self._fusable_downsample()
        if ds is not None:
            convs.append(self._conv_args(ds[0]))
        return chain_unsupported_reason(x, convs) is None

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        units = list(self._units())
        if self._use_chain(x):
            identity = self._shortcut(x, chain=True)
            return self._chain(units, x, identity, relu=self._final_relu)
        identity = self._shortcut(x)
        out = x
        for i, (conv, bn) in enumerate(units):
            last = i == len(units) - 1
            out = self._conv_bn(conv, bn, out, residual=identity if last else None,
                                relu=self._final_relu if last else True)
        return out

    def _folded(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        """BN folded into conv, cached until any of the tensors involved changes (in-place updates bump _version);
        recomputed in a traced graph (torch.compile / export), where the fold is part of the graph."""
        if tracing():
            return fold_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
        tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None for t in tensors)
        key += (bn.eps,)
        cache = self.__dict__.setdefault("_fold_cache", {})
        hit = cache.get(id(conv))
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, fold_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                    bn.eps))
            cache[id(conv)] = hit
        return hit[1]

    def _fusable_downsample(self):
        ds = self.downsample
        if (isinstance(ds, nn.Sequential) and len(ds) == 2 and type(ds).forward is nn.Sequential.forward
                and unfusable_reason(ds[0], ds[1]) is None):
            return ds
        return None

    def _shortcut(self, x: torch.Tensor, chain: bool = False) -> torch.Tensor:
        if self.downsample is None:
            return x
        ds = self._fusable_downsample()
        if ds is None:
            return self.downsample(x)
        if chain:
            return self._chain([(ds[0], ds[1])], x, None, relu=False)
        return self._conv_bn(ds[0], ds[1], x, relu=False)

    def _fallback_reason(self) -> Optional[str]:
        for conv, bn in self._units():
            why = unfusable_reason(conv, bn)
            if why is not None:
                return why
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        check_block_input(x, self.conv1, name)
        if runs_reference(x, name, self._fallback_reason):
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
        return ((self.conv1, self.bn1), (self.conv2, self.bn2))

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
        return ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3))

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


def check_sync_args(sync_bn: bool, process_group: Optional[object], owner: str) -> None:
    """The sync_bn / process_group arguments of fuse and the blocks (errors name `owner`)."""
    if not isinstance(sync_bn, bool):
        raise TypeError(f"{owner}: sync_bn must be a bool, got {type(sync_bn).__name__}")
    if process_group is not None and not sync_bn:
        raise ValueError(f"{owner}: process_group is the group sync_bn=True synchronizes over; "
                         "give sync_bn=True with it")


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
        return tuple((self.get_submodule(c), self.get_submodule(b)) for c, b in self.unit_names)

    def _fusable_downsample(self):
        if len(self.shortcut_names) == 2:
            conv, bn = (self.get_submodule(n) for n in self.shortcut_names)
            if unfusable_reason(conv, bn) is None:
                return conv, bn
        return None

    def _shortcut(self, x: torch.Tensor, chain: bool = False) -> torch.Tensor:
        x = self._run_modules(self.shortcut_pools, x)
        pair = self._fusable_downsample()
        if pair is None:  # the identity, a conv alone (or a pair changed since fusing): their own forward
            return self._run_modules(self.shortcut_names, x)
        if chain:
            return self._chain([pair], x, None, relu=False)
        return self._conv_bn(pair[0], pair[1], x, relu=False)

    def _run_modules(self, names, x: torch.Tensor) -> torch.Tensor:
        for name in names:
            x = self.get_submodule(name)(x)
        return x

    def _reference_shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_modules(self.shortcut_pools + self.shortcut_names, x)

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
        if runs_reference(x, name, self._fallback_reason):
            return self._reference_forward(x)
        return self._fused_forward(x)

    def unfused(self) -> nn.Module:
        """The original block, with any child replaced since fusing carried over."""
        original = self.original
        for name, child in self._modules.items():
            original._modules[name] = child
        original.training = self.training
        return original

    def extra_repr(self) -> str:
        units = ", ".join(f"{c}->{b}" for c, b in self.unit_names)
        shortcut = "->".join(self.shortcut_pools + self.shortcut_names) or "identity"
        return f"original={type(self.original).__name__}, units=[{units}], shortcut={shortcut}, relu={self._final_relu}"
