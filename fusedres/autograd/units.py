"""Autograd Functions: conv -> BatchNorm -> (+ residual) -> activation units built on fusedres.ops.

The activation is any of common.ACTIVATIONS (ReLU, ReLU6, SiLU, Hardswish, LeakyReLU, GELU, none),
applied inside the normalize pass and differentiated inside the backward passes from the saved
pre-BN z. After a residual add only ReLU (or none) is inside: its mask is the output's sign,
while a smooth activation there would need the sum itself, so it runs as its torch function
after the unit.

What is saved for backward: the unit's input and conv weight (the conv's own needs), the pre-BN
conv output z, the per-channel mean and inverse std, and, for the residual + ReLU unit only, the
unit's output (its ReLU mask; that tensor is the next unit's input, so autograd keeps it anyway).
The normalized activation is never saved: backward recomputes (z - mean) * scale + shift.

Passes over an activation-sized tensor (read or write), conv excluded:
  forward: statistics 1 + normalize-activate 2 (3 with residual); stock eager: BN 3, ReLU 2, add 3
  backward: reduce 2 (+1 read of the output and +1 write of the residual gradient with a
  residual) + elementwise 3.
"""
import contextlib
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import ops
from ..common import RELU, Activation, as_activation, dense, like, stats_dtype
from ..common import tracing  # noqa: F401  (re-exported for the modules)
from ..ops import direct
from ..ops.conv_inference import conv2d_bias_act_inference_reference
from ..ops.bn_finalize import scale_shift as bn_scale_shift  # noqa: F401  (re-exported)
from ..ops.bn_act import act_args
from ..ops.direct import BatchNormStats


def conv_backward(grad_z, x, weight, has_bias, stride, padding, dilation, groups, needs):
    """aten's conv backward (cuDNN / oneDNN): (grad_x, grad_weight, grad_bias), None where not needed."""
    if not any(needs):
        return None, None, None
    bias_sizes = [weight.shape[0]] if has_bias else None
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward.default(
        grad_z, x, weight, bias_sizes, list(stride), list(padding), list(dilation), False, [0, 0], groups,
        list(needs))
    return grad_x, grad_w, grad_b


def batch_count(z) -> int:
    """Values per channel of z, checked as nn.BatchNorm2d checks a training batch (its own message)."""
    count = z.numel() // z.shape[1]
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {z.size()}")
    return count


def running_stats(running_mean, running_var, eps, z):
    """(mean, invstd) from the running statistics, in z's statistics dtype."""
    acc = stats_dtype(z)
    return running_mean.to(acc), (running_var.to(acc) + eps).rsqrt()


def batchnorm_stats(z, batch_stats, eps, running_mean, running_var, momentum, bn_weight, bn_bias, sync=None):
    """(BatchNormStats, count) of a BatchNorm over z: batch statistics (running ones updated; with
    sync, those of every process's batch, count the whole batch's 0-d tensor), or the running ones."""
    z = dense(z)
    count = z.numel() // z.shape[1]
    if not batch_stats:
        mean, invstd = running_stats(running_mean, running_var, eps, z)
    elif sync is not None:
        mean, invstd, count = synced_batch_stats(z, eps, running_mean, running_var, momentum, sync)
    else:
        batch_count(z)
        mean, invstd = direct.bn_stats(z, eps, running_mean, running_var, momentum)
    return BatchNormStats(mean, invstd, *bn_scale_shift(invstd, bn_weight, bn_bias)), count


def stats_from_moments(mean, var, count, eps, running_mean, running_var, momentum, sync=None):
    """(mean, invstd, count) of BatchNorm from a batch's moments over `count` values per channel,
    running statistics updated. With sync (ops.SyncGroup) the moments are first combined with the
    same BatchNorm's on every process (one all-reduce) and count becomes the whole batch's, a 0-d
    tensor."""
    if sync is not None:
        mean, var, count = ops.all_reduce_moments(mean, var, count, sync)
    mean, invstd = ops.bn_stats_from_moments(mean, var, count, eps, running_mean, running_var, momentum)
    return mean, invstd, count


def synced_batch_stats(z, eps, running_mean, running_var, momentum, sync):
    """(mean, invstd, count) of BatchNorm over z and the same BatchNorm's inputs on every process
    of `sync` (running statistics updated with them); count is the whole batch's, a 0-d tensor."""
    var, mean = ops.channel_var_mean(z)
    return stats_from_moments(mean, var, batch_count(z), eps, running_mean, running_var, momentum, sync)


def backward_bookkeeping(sum_dz, sum_dz_xmu, invstd, scale, count, batch_stats, sync=None):
    """(grad_gamma, grad_beta, coef_xmu, coef_c) of a BatchNorm backward, float32 (float64), from
    its reduction's sums ([C] or [T, C] rows): one small kernel. coef_xmu, coef_c are BatchNorm's
    input gradient scale * dz + (z - mean) * coef_xmu + coef_c, zero with constant (running)
    statistics. With sync (ops.SyncGroup) the sums are all-reduced over its processes for the
    coefficients and `count` is the whole batch's; gamma's and beta's gradients stay local (DDP
    averages them)."""
    if sync is None or not batch_stats:
        return direct.bn_backward_finalize(sum_dz, sum_dz_xmu, invstd, scale, count, batch_stats)
    if sum_dz.dim() == 2:
        sum_dz, sum_dz_xmu = sum_dz.sum(0), sum_dz_xmu.sum(0)
    grad_gamma, grad_beta, _, _ = direct.bn_backward_finalize(sum_dz, sum_dz_xmu, invstd, scale, count, False)
    sum_dz, sum_dz_xmu = ops.all_reduce_sums(sum_dz, sum_dz_xmu, sync)
    _, _, coef_xmu, coef_c = direct.bn_backward_finalize(sum_dz, sum_dz_xmu, invstd, scale, count, True)
    return grad_gamma, grad_beta, coef_xmu, coef_c


class SavedBN(NamedTuple):
    """What a normalize-activate unit's backward reads (save_for_backward order)."""
    z: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    invstd: torch.Tensor
    output: Optional[torch.Tensor]  # the unit's output, for its ReLU mask (residual + ReLU only)


def inside_and_after(act: Activation, residual) -> Tuple[Activation, Optional[Activation]]:
    """(the activation the kernels apply, the one left to run after): with a residual, a smooth
    activation runs after the add as its torch function (see the module docstring)."""
    if residual is None or act.name in ("relu", "none"):
        return act, None
    return Activation("none"), act


def bn_act_forward_save(ctx, z, bn_weight, bn_bias, stats: BatchNormStats, residual, batch_stats, act: Activation,
                        sync=None, count=None):
    """(y, SavedBN): y = act((z - mean) * scale + shift + residual); ctx gets the flags
    bn_act_backward needs (act: ReLU or none with a residual, see inside_and_after). With `sync`
    (ops.SyncGroup), the statistics are of the batch over every process, `count` values per
    channel."""
    if inside_and_after(act, residual)[1] is not None:
        raise ValueError(f"fusedres: a {act.name} after a residual add runs after the unit (inside_and_after)")
    y = direct.bn_act_forward(z, stats.mean, stats.scale, stats.shift, like(residual, z), act)
    ctx.sync = sync if batch_stats else None
    ctx.count = count if count is not None else z.numel() // z.shape[1]
    ctx.batch_stats = batch_stats
    ctx.act = act
    ctx.has_residual = residual is not None
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.bn_dtypes = (None if bn_weight is None else bn_weight.dtype, None if bn_bias is None else bn_bias.dtype)
    mask_source = y if (residual is not None and act.is_relu) else None
    return y, SavedBN(z, stats.mean, stats.scale, stats.shift, stats.invstd, mask_source)


def bn_act_backward(ctx, grad_y, saved: SavedBN, need_z, need_gamma, need_beta, need_residual):
    """(grad_z, grad_gamma, grad_beta, grad_residual) of bn_act_forward_save's y, None where not needed."""
    z, mean, scale, shift, invstd, output = saved
    act = ctx.act
    grad_y = like(grad_y, z)
    if ctx.has_residual and act.is_relu:
        # dz is also the residual's gradient: the reduction pass writes it once.
        sum_dz, sum_dz_xmu, grad_z_act = direct.bn_act_backward_reduce(grad_y, z, mean, scale, shift, output,
                                                                       act=RELU, write_grad_z=True)
        grad_for_bn, act_in_elementwise = grad_z_act, False
        grad_residual = grad_z_act
    else:
        sum_dz, sum_dz_xmu, _ = direct.bn_act_backward_reduce(grad_y, z, mean, scale, shift, None, act=act)
        grad_for_bn, act_in_elementwise = grad_y, act
        grad_residual = grad_y if ctx.has_residual else None
    grad_gamma, grad_beta, coef_xmu, coef_c = backward_bookkeeping(sum_dz, sum_dz_xmu, invstd, scale, ctx.count,
                                                                   ctx.batch_stats and need_z, ctx.sync)
    grad_gamma = grad_gamma.to(ctx.bn_dtypes[0]) if need_gamma else None
    grad_beta = grad_beta.to(ctx.bn_dtypes[1]) if need_beta else None
    grad_z = None
    if need_z:
        grad_z = direct.bn_act_backward_elementwise(grad_for_bn, z, mean, scale, shift, coef_xmu, coef_c,
                                                    act=act_in_elementwise)
    if grad_residual is not None and need_residual:
        grad_residual = grad_residual.to(ctx.residual_dtype)
    else:
        grad_residual = None
    return grad_z, grad_gamma, grad_beta, grad_residual


class ConvSpec(NamedTuple):
    """A conv's arguments besides its tensors (pairs, as ops.check_conv returns them)."""
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int


class BNSpec(NamedTuple):
    """A BatchNorm's arguments besides its tensors, and the activation after it."""
    eps: float
    momentum: float
    batch_stats: bool
    act: Activation
    sync: Optional[ops.SyncGroup] = None


class ConvArgs(NamedTuple):
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int

    @property
    def spec(self) -> ConvSpec:
        return ConvSpec(self.stride, self.padding, self.dilation, self.groups)


class BNArgs(NamedTuple):
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    eps: float
    momentum: float
    batch_stats: bool
    sync: Optional[ops.SyncGroup] = None  # batch statistics over every process of a group (training only)
    act: Activation = RELU  # the activation after this norm where its unit is not a chain's last


class Unit(NamedTuple):
    """One conv -> BatchNorm unit of a chain (a dense layer's unit runs BN -> ReLU -> conv; its
    fields are named alike, so no code depends on an order)."""
    conv: ConvArgs
    bn: BNArgs


class BNAct(torch.autograd.Function):
    """y = act(BN(z) + residual) of a raw conv output z whose statistics were taken elsewhere (a
    conv epilogue; running statistics when not batch_stats): BN(z) = (z - mean) * scale + shift,
    scale = invstd * gamma, shift = beta. Backward includes the path through the batch statistics,
    which are functions of z. With sync (ops.SyncGroup) they are the statistics of every process's
    batch, `count` values per channel in all."""

    @staticmethod
    def forward(ctx, z, bn_weight, bn_bias, mean, invstd, scale, shift, residual, batch_stats, act, sync=None,
                count=None):
        stats = BatchNormStats(mean, invstd, scale, shift)
        y, bn_saved = bn_act_forward_save(ctx, dense(z), bn_weight, bn_bias, stats, residual, batch_stats, act,
                                          sync, count)
        ctx.save_for_backward(*bn_saved)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        needs = ctx.needs_input_grad
        grad_z, grad_gamma, grad_beta, grad_residual = bn_act_backward(
            ctx, grad_y, SavedBN(*ctx.saved_tensors), needs[0], needs[1], needs[2], needs[7])
        return grad_z, grad_gamma, grad_beta, None, None, None, None, grad_residual, None, None, None, None


class ConvBNUnits(torch.autograd.Function):
    """act_n(BN_n(conv_n(... act_1(BN_1(conv_1(x))) ...)) + residual): a block's conv -> BN -> act
    units on aten's conv and the core BatchNorm ops, as ONE autograd Function. A Python Function
    costs ~20 us to apply and ~70 us as a node of the backward engine (measured on the CPU:
    an empty one); one per block instead of one per unit is most of what a block's host time
    can lose to aten's C++ autograd nodes.

    Saved (the lean units): the block input x, per unit its conv weight, the pre-BN z and the
    per-channel statistics, and for a last ReLU after a residual the block output (its mask; the
    next block's input, kept anyway). Nothing else activation-sized: unit k's conv input
    h_k = act(BN_{k-1}(z_{k-1})) is recomputed in backward by one normalize pass, used by the
    conv's backward and freed before the next unit's (stock keeps both z and h per unit: a
    bottleneck 12 widths, this 10; a basic block 4, this 3). A unit whose spec says recompute
    (memory_efficient: a 1x1 conv after a kept z) keeps no z either: backward runs its conv
    again on the recomputed h (its bias saved for that).

    pool (PoolSpec or None): a max pool after the last unit (a ResNet stem's): its indices are kept,
    not its input (stock keeps both); backward recomputes that input.
    gate ([N, C, 1, 1] tensor or None): the first conv's input is x * gate (a squeeze-excitation's
    output): x and the gate are kept, not the product (stock keeps x in the multiply and the product
    in the conv); backward recomputes it and returns both factors' gradients.

    specs: per unit (ConvSpec, BNSpec, recompute_z); tensors: per unit (weight, bias, gamma,
    beta, running_mean, running_var), None where absent."""

    @staticmethod
    def forward(ctx, x, residual, specs, residual_is_x, pool, gate, *tensors):
        # residual_is_x: the identity shortcut, passed as a flag (torch.compile cannot trace a
        # Function given one tensor twice)
        if residual_is_x:
            residual = x
        ctx.residual_is_x = residual_is_x
        h = x if gate is None else gated(x, gate, tensors[0])
        saved, counts = [x], []
        last = len(specs) - 1
        for k, (conv, bn, recompute_z) in enumerate(specs):
            weight, bias, gamma, beta, running_mean, running_var = tensors[6 * k:6 * k + 6]
            z = dense(F.conv2d(h, weight, bias, *conv))
            stats, count = batchnorm_stats(z, bn.batch_stats, bn.eps, running_mean, running_var, bn.momentum, gamma,
                                           beta, bn.sync)
            res = like(residual, z) if k == last and residual is not None else None
            h = direct.bn_act_forward(z, stats.mean, stats.scale, stats.shift, res, bn.act)
            saved += [weight, bias if recompute_z else None, None if recompute_z else z, stats.mean, stats.scale,
                      stats.shift, stats.invstd]
            counts.append(count)
        ctx.specs = specs
        ctx.counts = counts
        ctx.has_residual = residual is not None
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.dtypes = [None if t is None else t.dtype for t in tensors]
        ctx.mask_from_output = residual is not None and specs[-1][1].act.is_relu
        ctx.pool = pool
        if pool is not None:
            h, indices = torch.ops.aten.max_pool2d_with_indices.default(h, *pool)
            ctx.mark_non_differentiable(indices)
            ctx.save_for_backward(*saved, indices, gate)
            return h
        ctx.save_for_backward(*saved, h if ctx.mask_from_output else None, gate)
        return h

    @staticmethod
    def backward(ctx, grad_y):
        saved = ctx.saved_tensors
        x, output, gate = saved[0], saved[-2], saved[-1]
        per_unit = [saved[1 + 7 * k:8 + 7 * k] for k in range(len(ctx.specs))]
        needs = ctx.needs_input_grad
        grads = [None] * len(ctx.dtypes)
        grad_residual = None
        g = grad_y
        last = len(ctx.specs) - 1
        if ctx.pool is not None:  # the pool's input recomputed (one pass), its gradient from the kept indices
            _, _, z_last, mean, scale, shift, _ = per_unit[last]
            pooled_input = direct.bn_act_forward(z_last, mean, scale, shift, None, ctx.specs[last][1].act)
            g = torch.ops.aten.max_pool2d_with_indices_backward.default(g, pooled_input, *ctx.pool, output)
            output = None
            del pooled_input

        def conv_input(k, z_before):
            """h_k: x, or act(BN_{k-1}(z_{k-1})) recomputed (one pass; freed after unit k's conv)."""
            if k == 0:
                return x if gate is None else gated(x, gate, per_unit[0][0])
            _, _, _, mean, scale, shift, _ = per_unit[k - 1]
            return direct.bn_act_forward(z_before, mean, scale, shift, None, ctx.specs[k - 1][1].act)

        def pre_bn(k, h):
            """z_k: kept, or (recompute_z) unit k's conv run again on its recomputed input h_k."""
            weight, bias, z = per_unit[k][:3]
            return z if z is not None else dense(F.conv2d(h, weight, bias, *ctx.specs[k][0]))

        def z_before(k):
            """z_{k-1}, for h_k: kept, or recomputed from its own input (x or a kept z_{k-2}:
            recomputed_units never names two units in a row)."""
            z = per_unit[k - 1][2]
            if z is None:
                z = pre_bn(k - 1, conv_input(k - 1, per_unit[k - 2][2] if k > 1 else None))
            return z

        z_carry = None  # z_k recomputed at unit k + 1's step for h_{k+1}: unit k's own step takes it
        for k in range(last, -1, -1):
            conv, bn, _ = ctx.specs[k]
            weight, _, z, mean, scale, shift, invstd = per_unit[k]
            base = 6 + 6 * k  # needs_input_grad: x, residual, specs, residual_is_x, pool, gate, then the tensors
            need_h = k > 0 or needs[0] or needs[5]
            need_w, need_b = needs[base], needs[base + 1]
            h = None
            if z is None:  # recomputed (memory_efficient): at unit k + 1's step, or here from h_k
                if z_carry is not None:
                    z = z_carry
                else:
                    h = conv_input(k, z_before(k) if k > 0 else None)
                    z = pre_bn(k, h)
            z_carry = None
            g = like(g, z)
            if k == last and ctx.mask_from_output:  # dz is also the residual's gradient: written once
                sum_dz, sum_dz_xmu, g_bn = direct.bn_act_backward_reduce(g, z, mean, scale, shift, output,
                                                                         act=RELU, write_grad_z=True)
                act, grad_residual = False, g_bn
            else:
                sum_dz, sum_dz_xmu, _ = direct.bn_act_backward_reduce(g, z, mean, scale, shift, None, act=bn.act)
                g_bn, act = g, bn.act
                if k == last and ctx.has_residual:
                    grad_residual = g
            grad_gamma, grad_beta, coef_xmu, coef_c = backward_bookkeeping(
                sum_dz, sum_dz_xmu, invstd, scale, ctx.counts[k], bn.batch_stats, bn.sync if bn.batch_stats else None)
            if needs[base + 2]:
                grads[6 * k + 2] = grad_gamma.to(ctx.dtypes[6 * k + 2])
            if needs[base + 3]:
                grads[6 * k + 3] = grad_beta.to(ctx.dtypes[6 * k + 3])
            if not (need_h or need_w or need_b):
                continue
            grad_z = direct.bn_act_backward_elementwise(g_bn, z, mean, scale, shift, coef_xmu, coef_c, act=act)
            del z
            if h is None:
                z_prev = z_before(k) if k > 0 else None
                h = conv_input(k, z_prev)
                if k > 0 and per_unit[k - 1][2] is None:
                    z_carry = z_prev
                del z_prev
            g, grads[6 * k], grads[6 * k + 1] = conv_backward(grad_z, h, weight, ctx.dtypes[6 * k + 1] is not None,
                                                              *conv, (need_h, need_w, need_b))
            del h, grad_z
        grad_gate = None
        if gate is not None and g is not None:  # g: the gradient of x * gate
            if needs[5]:
                grad_gate = (g * x).sum((2, 3), keepdim=True, dtype=stats_dtype(g)).to(gate.dtype)
            g = (g * gate).to(x.dtype) if needs[0] else None
        if ctx.residual_is_x:
            grad_x = None
            if needs[0]:  # the input's gradient: through the units and through the shortcut
                if g is None:
                    grad_x = grad_residual
                else:  # (into conv_backward's fresh tensor: a new one costs its page faults, ~0.6 ms per 3 MB)
                    grad_x = g.add_(like(grad_residual, g).to(g.dtype))
            return (grad_x, None, None, None, None, grad_gate, *grads)
        if grad_residual is not None:
            grad_residual = grad_residual.to(ctx.residual_dtype) if needs[1] else None
        return (g if needs[0] else None, grad_residual, None, None, None, grad_gate, *grads)


def recomputed_units(convs: Sequence[ConvArgs]) -> Tuple[bool, ...]:
    """Per unit, whether memory_efficient recomputes its pre-BN z in backward instead of keeping
    it: a 1x1 conv (not grouped) that is the last unit or widens its input (a bottleneck's
    expanding conv3, a shortcut's downsample, an inverted residual's projection and its
    expansion), where its input is the units' input or one normalize pass from a kept z (never
    two units in a row). Its cost: that conv's forward once more per step (ResNet-50's conv3s and
    downsamples: ~27% of its forward FLOPs, ~9% of a training step's)."""
    flags = []
    last = len(convs) - 1
    for k, conv in enumerate(convs):
        out_channels, in_per_group = conv.weight.shape[:2]
        pointwise = conv.groups == 1 and tuple(conv.weight.shape[2:]) == (1, 1)
        flags.append(pointwise and (k == 0 or not flags[k - 1]) and (k == last or out_channels > in_per_group))
    return tuple(flags)


def gated(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x * gate as the conv takes it: in the weight's dtype (autocast's), laid out as x."""
    return dense((x * gate).to(weight.dtype))


class PoolSpec(NamedTuple):
    """A max pool's arguments as aten.max_pool2d_with_indices takes them (pairs)."""
    kernel_size: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    ceil_mode: bool


def conv_bn_units(x: torch.Tensor, units: Sequence[Unit], residual: Optional[torch.Tensor] = None,
                  act=True, memory_efficient: bool = False, pool: Optional[PoolSpec] = None,
                  gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """act(BN_n(conv_n(act_1(... act_1(BN_1(conv_1(x))) ...))) + residual) on aten's conv and the core
    BatchNorm ops, one autograd Function (ConvBNUnits) for all the units: the fused modules' core
    path in training and eval with gradients. units: Unit(ConvArgs, BNArgs), the modules' own
    (checked when built); unit k < n applies its bn.act, the last `act` (an Activation, or a bool:
    ReLU / none). Under autocast the convs run in the autocast dtype; BN math is float32.
    Backward keeps the pre-BN z of each unit, not its activation (ConvBNUnits); memory_efficient
    also drops the z of the units recomputed_units names, running their conv again in backward.
    pool: a max pool after the last unit's activation (no residual), its indices kept. gate: an
    [N, C, 1, 1] tensor the input is multiplied by first (x * gate kept by neither)."""
    inside, after = inside_and_after(as_activation(act), residual)
    if pool is not None and residual is not None:
        raise ValueError("fusedres: conv_bn_units: a pool after the units takes no residual")
    if after is not None:
        return after.apply(conv_bn_units(x, units, residual, inside, memory_efficient, pool, gate))
    dtype = autocast_dtype(x)
    specs, tensors = [], []
    last = len(units) - 1
    recompute = recomputed_units([u.conv for u in units]) if memory_efficient else (False,) * len(units)
    if pool is not None:  # (the pool's backward recomputes its input from the last z: kept)
        recompute = recompute[:-1] + (False,)
    for k, (conv, bn) in enumerate(units):
        weight, bias = conv.weight, conv.bias
        if dtype is not None:
            weight = weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        specs.append((conv.spec, BNSpec(bn.eps, bn.momentum, bn.batch_stats, inside if k == last else bn.act, bn.sync),
                      recompute[k]))
        tensors += [weight, bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    residual_is_x = residual is x
    if residual_is_x:
        residual = None
    if dtype is None:
        return ConvBNUnits.apply(x, residual, tuple(specs), residual_is_x, pool, gate, *tensors)
    with torch.autocast(x.device.type, enabled=False):
        if gate is not None:  # (the product is cast to the conv's dtype inside: x as it is)
            return ConvBNUnits.apply(x, residual, tuple(specs), residual_is_x, pool, gate, *tensors)
        x_in = x.to(dtype)
        if residual_is_x and x_in is not x:  # the shortcut adds the input as it is, not its autocast copy
            return ConvBNUnits.apply(x_in, x, tuple(specs), False, pool, gate, *tensors)
        return ConvBNUnits.apply(x_in, residual, tuple(specs), residual_is_x, pool, gate, *tensors)


def bn_act(z, bn_weight, bn_bias, stats: BatchNormStats, residual=None, *, batch_stats: bool, act=True,
           sync=None, count=None):
    """BNAct.apply with keywords: act(BN(z) + residual), BN's statistics `stats` (act: an
    Activation, or a bool for ReLU / none; a smooth one after a residual runs after BNAct)."""
    inside, after = inside_and_after(as_activation(act), residual)
    y = BNAct.apply(z, bn_weight, bn_bias, *stats, residual, batch_stats, inside, sync, count)
    return y if after is None else after.apply(y)


def bn_relu(x: torch.Tensor, bn: "BNArgs") -> torch.Tensor:
    """relu(BN(x)) where no conv is fused with the BatchNorm (a pre-activation ResNet's norm whose
    output feeds two convs, the norm before a head): its statistics, then normalize + ReLU in one
    pass (stock: BatchNorm's pass, then ReLU's), one BNAct node. Under autocast the input is
    normalized as it comes, as stock BatchNorm does."""
    enabled = torch.is_autocast_enabled(x.device.type)
    with torch.autocast(x.device.type, enabled=False) if enabled else contextlib.nullcontext():
        # detached: the gradient through the batch statistics is BNAct's own (batch_stats)
        stats, count = batchnorm_stats(x.detach(), bn.batch_stats, bn.eps, bn.running_mean, bn.running_var,
                                       bn.momentum, bn.weight, bn.bias, bn.sync)
        return bn_act(x, bn.weight, bn.bias, stats, batch_stats=bn.batch_stats, act=bn.act, sync=bn.sync,
                      count=count if bn.sync is not None else None)


def bn_relu_inference(x: torch.Tensor, stats: BatchNormStats) -> torch.Tensor:
    """relu((x - mean) * scale + shift), the running statistics' scale and shift: one pass, no autograd."""
    return direct.bn_act_forward(dense(x), stats.mean, stats.scale, stats.shift, None, True)


def sync_batch_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], eps: float,
                    momentum: float, sync: ops.SyncGroup) -> torch.Tensor:
    """Training-mode BatchNorm of x with the batch statistics of every process of `sync` (one
    all-reduce forward, one backward), running statistics updated with them: nn.SyncBatchNorm's
    forward, on any device. The math is float32 (float64 for float64 x); y has x's dtype."""
    stats, count = batchnorm_stats(x.detach(), True, eps, running_mean, running_var, momentum, weight, bias, sync)
    return bn_act(x, weight, bias, stats, batch_stats=True, act=False, sync=sync, count=count)


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast runs convs on x in: None where autocast is off for x's device, or where it
    leaves x as it is (float64, as autocast's own cast does: a float64 model under autocast runs in
    float64)."""
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return None


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                residual: Optional[torch.Tensor] = None, *, stride: Sequence[int] = (1, 1),
                padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1,
                eps: float = 1e-5, momentum: float = 0.1, batch_stats: bool = True, relu: bool = True,
                sync: Optional[ops.SyncGroup] = None, act=None) -> torch.Tensor:
    """act(BatchNorm(conv2d(x)) + residual) with autograd: one unit of ConvBNUnits.

    Args:
        x (Tensor[N, C_in, H, W]); weight (Tensor[C_out, C_in/groups, kh, kw]); bias (Tensor[C_out] or None).
        bn_weight, bn_bias (Tensor[C_out] or None): gamma and beta (None: 1 and 0, affine=False).
        running_mean, running_var (Tensor[C_out] or None): updated when batch_stats, read otherwise.
        residual (Tensor[N, C_out, H', W'] or None): added before the activation.
        sync (ops.SyncGroup or None): batch statistics over every process of its group, as
            nn.SyncBatchNorm (ops.sync_group makes one).
        relu: ReLU last (True) or no activation; act (an Activation or a name of
            fusedres.common.ACTIVATIONS: relu6, silu, hardswish, leaky_relu, gelu, ...), when given,
            is the activation instead.
    Under autocast the conv runs in the autocast dtype, as F.conv2d would; BN math stays float32.
    """
    act = as_activation(relu if act is None else act)
    dtype = autocast_dtype(x)
    stride, padding, dilation = ops.check_conv(x, weight if dtype is None else weight.to(x.dtype), bias, stride,
                                               padding, dilation, groups)
    return conv_bn_act_unchecked(x, ConvArgs(weight, bias, stride, padding, dilation, groups),
                                 BNArgs(bn_weight, bn_bias, running_mean, running_var, eps, momentum, batch_stats, sync),
                                 residual, act)


def conv_bn_act_unchecked(x: torch.Tensor, conv: ConvArgs, bn: BNArgs, residual: Optional[torch.Tensor] = None,
                          act=True) -> torch.Tensor:
    """conv_bn_act without checks: one unit of conv_bn_units (ConvBNUnits)."""
    return conv_bn_units(x, [Unit(conv, bn)], residual, act)


def conv_bias_act_inference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            residual: Optional[torch.Tensor] = None, *, stride: Sequence[int] = (1, 1),
                            padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1,
                            relu: bool = True) -> torch.Tensor:
    """act(conv2d(x, weight) + bias + residual) for a BN-folded conv (see ops.fold_bn); no autograd.

    Where the fused conv kernels run (ops.kernel_unsupported_reason), bias, residual and ReLU are
    the conv's epilogue: one pass. Otherwise aten's conv runs without its bias and bias, residual
    and ReLU are one bn_act_forward pass after it.
    """
    dtype = autocast_dtype(x)
    stride, padding, dilation = ops.check_conv(x, weight if dtype is None else weight.to(x.dtype), None, stride,
                                               padding, dilation, groups)
    if residual is not None:
        ops.validate.activation(residual, "residual")
    return conv_bias_act_inference_unchecked(x, weight, bias.to(stats_dtype(x)).contiguous(), residual,
                                             ConvSpec(stride, padding, dilation, groups), relu)


def conv_bias_act_inference_unchecked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                      residual: Optional[torch.Tensor], conv: ConvSpec, relu: bool,
                                      conv_kernels: Optional[bool] = None,
                                      pack: Optional[Callable[[torch.Tensor, ConvSpec, torch.Size], torch.Tensor]] = None,
                                      post_op: Optional[ops.PostOp] = None) -> torch.Tensor:
    """conv_bias_act_inference for the fused modules (bias from ops.fold_bn: contiguous, the
    statistics dtype): no checks per call. conv_kernels: whether the fused conv kernels run this
    conv, if the caller knows (None: asked here). pack(weight, conv, input shape): the weight
    prepacked for oneDNN (the caller's cache; None: oneDNN reorders the plain weight per call).
    post_op: an activation other than ReLU (relu False): oneDNN's post-op where oneDNN runs the
    conv; elsewhere the kernels' own activation where it is one of common.ACTIVATIONS
    (PostOp.activation), else applied after (ops.PostOp.apply).

    Paths: the fused conv kernels (bias + residual + activation in their epilogue); on the CPU oneDNN
    (one primitive, post-ops fused; ops.conv_inference); else aten's conv + one bn_act_forward
    pass. While torch.compile / export trace, the aten path's epilogue is plain tensor ops, which
    inductor fuses into the conv's consumer itself (an opaque op there would stop it)."""
    dtype = autocast_dtype(x)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        conv_kernels = None
    if conv_kernels is None:
        conv_kernels = ops.kernel_unsupported_reason(x, weight) is None
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        if x.device.type == "cpu" and not conv_kernels and not tracing() and (
                ops.onednn_unsupported_reason(x, weight) is None):
            packed = pack(weight, conv, x.shape) if pack is not None else None
            return direct.conv2d_bias_act_inference(x, weight, bias, residual, *conv, relu, packed, post_op)
        act = post_op.activation if post_op is not None else None
        if tracing() and not conv_kernels:
            y = _conv_bias_act_traced(x, weight, bias, residual, conv, relu)
            return y if post_op is None else post_op.apply(y)
        after = None
        if act is None:
            act = as_activation(relu)
            after = post_op
        else:
            act, after = inside_and_after(act, residual)
        if conv_kernels:
            y = direct.conv2d_forward_unchecked(x, weight, bias, *conv, None, None, None, 0, 0.0, residual,
                                                *act_args(act), False, None)[0]
        else:
            z = dense(F.conv2d(x, weight, None, *conv))
            y = direct.bn_act_forward(z, None, None, bias, like(residual, z), act)
        return y if after is None else after.apply(y)


def _conv_bias_act_traced(x, weight, bias, residual, conv: ConvSpec, relu: bool) -> torch.Tensor:
    """The traced form: the op's reference (aten's conv, then bias, residual and ReLU in the
    statistics dtype, rounded once to x's dtype, as the eager epilogue rounds), as tensor ops for
    inductor to fuse."""
    return conv2d_bias_act_inference_reference(x, weight, bias, residual, *conv, relu)
