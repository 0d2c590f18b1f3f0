"""Dense blocks (DenseNet) over one feature buffer: no torch.cat, no copy of earlier features.

A block of L layers with growth k over an input of C0 channels owns one buffer
[N, C0 + L*k, H, W]. The input is copied into channels [0, C0) once; layer j reads the prefix
[0, C_j), C_j = C0 + j*k, and writes its k new channels straight into [C_j, C_j + k). The block
returns the whole buffer: it is torch.cat(features) without ever concatenating.

Each layer is a short chain of pre-activation units BN -> ReLU -> conv (bottleneck: norm1-conv1
1x1, norm2-conv2 3x3; plain: norm1-conv1 3x3 with bias). In training, every later layer's norm1
normalizes the same channels of the same batch, so each slice's batch mean and variance are
taken once, when the slice is written (in the writing conv's epilogue where the fused conv
kernels run), and shared: each layer applies its own gamma, beta and eps and updates its own
running statistics exactly as its nn.BatchNorm2d would.

Forward, per layer, where the fused conv kernels run (GPU channels_last, or the triton backend):
  conv1  norm1 + relu1 in its prologue over the buffer prefix, statistics of z1 in its epilogue
  conv2  norm2 + relu2 in its prologue over z1, output into the buffer slice, the slice's
         statistics in its epilogue
so the normalized concatenation never exists. Elsewhere (CPU, NCHW on CUDA) each unit is one
normalize-activate pass (transient, not saved) and aten's conv, the slice copied into place.

Backward writes one gradient buffer G of the buffer's shape (a copy of the output's gradient)
and goes through the layers last to first; layer j's slice gradient is complete when its turn
comes, as every later reader of the slice has added into it. BatchNorm's input gradient over
the prefix is linear per channel,
  dx = scale * dU + (x - mean) * coef_xmu + coef_c,
so each layer adds scale * dU into G's prefix in place (the conv's input-gradient kernel does it
in its epilogue, with the ReLU mask and BatchNorm's two sums) and the per-channel coefficients
coef_xmu, coef_c of every layer are summed into two [C] vectors, applied once per slice when its
gradient is read. Saved: the buffer, each layer's z1 (4k channels), per-channel statistics and
any dropout mask; nothing of the prefix size per layer.
"""
import contextlib
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import ops
from ..ops import direct
from ..common import dense, memory_format, new_scratch, per_channel, stats_dtype
from ..ops.direct import BatchNormStats
from .chain import BNArgs, ConvArgs, Unit, bn_relu_conv
from .units import (autocast_dtype, backward_bookkeeping, batch_count, batchnorm_stats, bn_act, bn_scale_shift,
                    conv_backward, running_stats, tracing)

# A channel-statistics record left on a dense block's output for the transition after it:
# (tensor version when written, mean [C], biased var [C], values per channel).
STATS_ATTR = "_fusedres_channel_stats"


class DenseLayerArgs(NamedTuple):
    """One dense layer: its BN -> ReLU -> conv units (1 plain, 2 bottleneck; each a Unit(conv, bn),
    bn the norm before the conv) and dropout."""
    units: Tuple[Unit, ...]
    drop_rate: float  # applied only when dropout is on (the layer module is in training mode)


class _Plan(NamedTuple):
    """What the autograd Function needs besides the tensors it differentiates."""
    bns: Tuple[Tuple[BNArgs, ...], ...]  # per layer, per unit; no tensors (those are the Function's arguments)
    convs: Tuple[Tuple[tuple, ...], ...]  # per layer, per unit: (stride, padding, dilation, groups)
    drop_rates: Tuple[float, ...]
    growth: int
    fused: bool  # the fused conv kernels run every conv


def _unit_stats(bn: BNArgs, mean_var: Optional[Tuple[torch.Tensor, torch.Tensor]], count: int, ref: torch.Tensor):
    """(mean, invstd) a unit's BatchNorm uses: the shared batch statistics (running ones updated)
    or its running statistics."""
    if bn.batch_stats:
        mean, var = mean_var
        ops.running_update(bn.running_mean, bn.running_var, mean, var, count, bn.momentum)
        return mean, (var + bn.eps).rsqrt()
    return running_stats(bn.running_mean, bn.running_var, bn.eps, ref)


def _dropout(z: torch.Tensor, p: float, out: torch.Tensor) -> torch.Tensor:
    """out = F.dropout(z, p, training=True), drawing the random numbers exactly as F.dropout does
    on this device (so a seeded run matches the reference); returns what backward needs."""
    if z.is_cuda:
        y, mask = torch.native_dropout(z, p, True)
        out.copy_(y)
        return mask
    noise = torch.empty_like(z).bernoulli_(1 - p)  # aten's CPU dropout: noise in z's dtype, divided
    noise.div_(1 - p)
    torch.mul(z, noise, out=out)
    return noise


def _dropout_backward(grad: torch.Tensor, saved: torch.Tensor, p: float) -> torch.Tensor:
    if saved.dtype == torch.bool:
        return torch.ops.aten.native_dropout_backward(grad, saved, 1.0 / (1 - p))
    return grad * saved


def _prologue_conv(h, weight, bias, conv_args, mean, scale, shift, fused, stats, out=None):
    """z = conv(relu((h - mean) * scale + shift)) (into `out` if given), with the ChannelMoments
    of z when stats and fused."""
    if fused:
        return ops.conv2d_forward(h, weight, bias, *conv_args, in_mean=mean, in_scale=scale, in_shift=shift,
                                  in_act=True, stats=stats, out=out)
    a = ops.bn_act_forward(h, mean, scale, shift, None, True)
    z = F.conv2d(a, weight, bias, *conv_args)
    if out is not None:
        out.copy_(z)
        z = out
    return z, None


def _dense_forward(x: torch.Tensor, plan: _Plan, params: Sequence[Optional[torch.Tensor]],
                   running: Sequence[Optional[torch.Tensor]], training_dropout, dtype: torch.dtype):
    """The block's forward with its convs in `dtype`. Returns (buffer, mean [C], var [C] or None,
    saved per layer)."""
    n, c0, h, w = x.shape
    k = plan.growth
    total = c0 + len(plan.bns) * k
    fmt = memory_format(x)
    buffer = new_scratch((n, total, h, w), dtype, x.device, memory_format=fmt)
    buffer[:, :c0].copy_(x)
    x = buffer[:, :c0]
    acc = stats_dtype(x)
    count = n * h * w
    shared = any(bns[0].batch_stats for bns in plan.bns)  # slice statistics are needed
    mean_all = var_all = None
    if shared:
        batch_count(x)  # nn.BatchNorm2d's own error for one value per channel
        mean_all = torch.empty(total, dtype=acc, device=x.device)
        var_all = torch.empty(total, dtype=acc, device=x.device)
        var_all[:c0], mean_all[:c0] = ops.channel_var_mean(buffer[:, :c0])
    saved = []
    it = iter(params)
    running_it = iter(running)
    for j, (bns, convs, p) in enumerate(zip(plan.bns, plan.convs, plan.drop_rates)):
        cj = c0 + j * k
        dst = buffer[:, cj:cj + k]
        dropout = training_dropout[j] and p > 0
        h_in = buffer[:, :cj]
        layer_saved = []
        mean_var = (mean_all[:cj], var_all[:cj]) if shared else None
        for u, (bn, conv_args) in enumerate(zip(bns, convs)):
            gamma, beta, weight, bias = next(it), next(it), next(it), next(it)
            bn = bn._replace(running_mean=next(running_it), running_var=next(running_it))
            last = u == len(bns) - 1
            mean, invstd = _unit_stats(bn, mean_var, count, x)
            scale, shift = bn_scale_shift(invstd, gamma, beta)
            next_batch = bns[u + 1].batch_stats if not last else (shared and not dropout)
            z, moments = _prologue_conv(h_in, weight, bias, conv_args, mean, scale, shift, plan.fused,
                                        stats=next_batch and plan.fused,
                                        out=dst if last and not dropout else None)
            layer_saved += [mean, invstd, scale, shift]  # then z (units before the last) or dropout's mask
            if not last:
                mean_var = None
                if next_batch:
                    if plan.fused:
                        mean_var = tuple(moments)
                    else:
                        var, mean_z = ops.channel_var_mean(z)
                        mean_var = (mean_z, var)
                layer_saved.append(z)
                h_in = z
                continue
            if dropout:
                layer_saved.append(_dropout(z, p, dst))
            else:
                layer_saved.append(None)
            if shared:
                if plan.fused and not dropout:
                    mean_all[cj:cj + k], var_all[cj:cj + k] = moments
                else:
                    var_all[cj:cj + k], mean_all[cj:cj + k] = ops.channel_var_mean(dst)
        saved.append(layer_saved)
    return buffer, mean_all, var_all, saved


class DenseBlockFunction(torch.autograd.Function):
    """buffer = the dense block's output over x; see the module docstring. params: per layer, per
    unit, (bn weight, bn bias, conv weight, conv bias), None where absent, then per unit its
    (running_mean, running_var), updated in place (torch.compile sees every tensor as an argument,
    none hidden in `plan`; the running statistics are not saved for backward). Also returns the
    buffer's per-channel batch mean and biased variance (not differentiable; empty in eval)."""

    @staticmethod
    def forward(ctx, x, plan, training_dropout, dtype, *params_and_running):
        num_params = 4 * sum(len(bns) for bns in plan.bns)
        params, running = params_and_running[:num_params], params_and_running[num_params:]
        buffer, mean_all, var_all, saved = _dense_forward(x, plan, params, running, training_dropout, dtype)
        ctx.x_dtype = x.dtype
        output = buffer
        if torch.promote_types(x.dtype, dtype) != dtype:
            # as torch.cat of a float32 input and autocast's bfloat16 layer outputs: float32, the
            # input's channels unrounded
            output = buffer.to(torch.promote_types(x.dtype, dtype))
            output[:, :x.shape[1]].copy_(x)
        ctx.plan = plan
        ctx.dtypes = [None if t is None else t.dtype for t in params]
        tensors = [buffer, mean_all, var_all]
        ctx.layout = []
        for layer_saved in saved:
            ctx.layout.append(len(layer_saved))
            tensors.extend(layer_saved)
        ctx.save_for_backward(*tensors, *params)
        ctx.num_params = len(params)
        if mean_all is None or output is not buffer:
            mean_all, var_all = (x.new_empty(0, dtype=stats_dtype(buffer)) for _ in range(2))
        ctx.mark_non_differentiable(mean_all, var_all)
        ctx.set_materialize_grads(False)  # the statistics outputs get no gradient: no zeros made for them
        return output, mean_all, var_all

    @staticmethod
    def backward(ctx, grad_buffer, *_unused):
        if grad_buffer is None:  # the block's output reached no loss
            return (None,) * (4 + ctx.num_params + 2 * (ctx.num_params // 4))
        plan = ctx.plan
        saved = list(ctx.saved_tensors)
        params = saved[len(saved) - ctx.num_params:]
        buffer, mean_all, var_all = saved[:3]
        flat = saved[3:len(saved) - ctx.num_params]
        per_layer = []
        for n in ctx.layout:
            per_layer.append(flat[:n])
            flat = flat[n:]
        k = plan.growth
        total = buffer.shape[1]
        c0 = total - len(plan.bns) * k
        count = buffer.numel() // total
        acc = stats_dtype(buffer)
        fused = plan.fused
        # G, in the buffer's memory format, float32 for half types: each slice's gradient is a sum
        # of many layers' terms, BatchNorm's large scale * dU parts cancelling against the deferred
        # (x - mean) * coef_xmu + coef_c parts, so the sum is kept unrounded until it is read
        grad = torch.empty(buffer.shape, dtype=acc, device=buffer.device,
                           memory_format=memory_format(buffer))
        grad.copy_(grad_buffer)
        coef_xmu_all = torch.zeros(total, dtype=acc, device=buffer.device)
        coef_c_all = torch.zeros(total, dtype=acc, device=buffer.device)
        deferred = [False] * total  # whether a later layer left coefficients on these channels
        grads: List[Optional[torch.Tensor]] = [None] * ctx.num_params
        units_per_layer = [len(b) for b in plan.bns]
        starts = [0]
        for n in units_per_layer:
            starts.append(starts[-1] + 4 * n)

        def complete(lo, hi):
            """The gradient of buffer[:, lo:hi] in the buffer's dtype: G's slice plus the summed
            deferred BN terms, added in float32 and rounded once. A few passes over k channels."""
            g = grad[:, lo:hi]
            if deferred[lo]:
                xmu = buffer[:, lo:hi].to(acc) - per_channel(mean_all[lo:hi], g)
                g = g + xmu * per_channel(coef_xmu_all[lo:hi], g) + per_channel(coef_c_all[lo:hi], g)
            return g.to(buffer.dtype)

        for j in reversed(range(len(plan.bns))):
            cj = c0 + j * k
            bns, convs = plan.bns[j], plan.convs[j]
            layer_saved = per_layer[j]
            g = complete(cj, cj + k)
            drop = layer_saved[-1]  # 5 entries per unit: mean, invstd, scale, shift, z or dropout mask
            if drop is not None:
                g = _dropout_backward(g, drop, plan.drop_rates[j])
            for u in reversed(range(len(bns))):
                bn, conv_args = bns[u], convs[u]
                mean, invstd, scale, shift = layer_saved[5 * u:5 * u + 4]
                h_in = buffer[:, :cj] if u == 0 else layer_saved[5 * u - 1]
                base = starts[j] + 4 * u
                gamma_t, beta_t, weight, bias = params[base:base + 4]
                need_w = ctx.needs_input_grad[4 + base + 2]
                need_b = bias is not None and ctx.needs_input_grad[4 + base + 3]
                into = grad[:, :cj] if u == 0 else None
                if fused:
                    pro = dict(in_mean=mean, in_scale=scale, in_shift=shift, in_act=True)
                    if into is not None:
                        _, sum_du, sum_du_xmu = ops.conv2d_input_grad(g, weight, h_in, *conv_args, **pro, out=into,
                                                                      out_scale=scale)
                        du = None
                    else:
                        du, sum_du, sum_du_xmu = ops.conv2d_input_grad(g, weight, h_in, *conv_args, **pro)
                    if need_w:
                        grads[base + 2] = ops.conv2d_weight_grad(g, h_in, weight, *conv_args, **pro)
                    if need_b:
                        grads[base + 3] = g.sum((0, 2, 3), dtype=acc).to(ctx.dtypes[base + 3])
                    mask_in_elementwise = False
                else:
                    # the BN ops read dense tensors: one copy of the prefix serves the three of them
                    h_in = dense(h_in)
                    a = ops.bn_act_forward(h_in, mean, scale, shift, None, True)  # recomputed, never saved
                    da, dw, db = conv_backward(g, a, weight, bias is not None, *conv_args, (True, need_w, need_b))
                    del a
                    grads[base + 2], grads[base + 3] = dw, db
                    sum_du, sum_du_xmu, _ = ops.bn_act_backward_reduce(da, h_in, mean, scale, shift, None, act=True)
                    du, mask_in_elementwise = da, True
                grad_gamma, grad_beta, coef_xmu, coef_c = backward_bookkeeping(sum_du, sum_du_xmu, invstd, scale, count,
                                                                               bn.batch_stats)
                if ctx.needs_input_grad[4 + base]:
                    grads[base] = grad_gamma.to(ctx.dtypes[base])
                if ctx.needs_input_grad[4 + base + 1]:
                    grads[base + 1] = grad_beta.to(ctx.dtypes[base + 1])
                if u > 0:
                    g = ops.bn_act_backward_elementwise(du, h_in, mean, scale, shift, coef_xmu, coef_c,
                                                        act=mask_in_elementwise)
                    continue
                if du is not None:  # not accumulated by the kernel: add scale * relu'(U) * dA now
                    if h_in.dtype == acc:  # one elementwise pass, then the add
                        zero = torch.zeros_like(scale)
                        into.add_(ops.bn_act_backward_elementwise(du, h_in, mean, scale, shift, zero, zero, act=True))
                    else:  # half types: in float32, unrounded (it is cancelled by the deferred terms)
                        u_pre = (h_in.to(acc) - per_channel(mean, h_in)) * per_channel(scale, h_in) \
                            + per_channel(shift, h_in)
                        into.add_(torch.where(u_pre > 0, du.to(acc) * per_channel(scale, h_in), 0))
                        del u_pre
                if bn.batch_stats:
                    coef_xmu_all[:cj] += coef_xmu
                    coef_c_all[:cj] += coef_c
                    deferred[:cj] = [True] * cj
        # a view of G where no BatchNorm read the input with batch statistics (autograd copies it
        # into x.grad with x's strides if need be)
        grad_x = complete(0, c0).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return (grad_x, None, None, None, *grads, *([None] * 2 * (ctx.num_params // 4)))


def _cast(t: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    return t if t is None or dtype is None else t.to(dtype)


def dense_block_unsupported_reason(x: torch.Tensor, layers: Sequence[DenseLayerArgs]) -> Optional[str]:
    """None if every conv of the block runs on the fused conv kernels, else why not (the block then
    runs aten's convs with the BatchNorm ops, still over one buffer)."""
    dtype = autocast_dtype(x)
    for layer in layers:
        for conv in (unit.conv for unit in layer.units):
            why = ops.kernel_unsupported_reason(x, conv.weight, dtype)
            if why is not None:
                return why
    return None


def dense_block(x: torch.Tensor, layers: Sequence[DenseLayerArgs], dropout: Sequence[bool] = ()) -> torch.Tensor:
    """The output of a DenseNet dense block, torch.cat([x, y_1, ..., y_L], 1), built in one buffer.

    Args:
        x (Tensor[N, C0, H, W]): the block input.
        layers: per layer, its units ((BNArgs, ConvArgs) of norm1/conv1[, norm2/conv2]) and drop
            rate. Every layer's last conv has the same out_channels (the growth rate) and keeps H, W.
        dropout: per layer, whether its dropout is on (its module is training); default off.
    Under autocast the convs run in the autocast dtype, as F.conv2d would; BatchNorm math stays
    float32. The returned tensor carries its per-channel batch statistics for a following
    transition (see channel_stats).
    """
    if not layers:
        raise ValueError("fusedres: dense_block needs at least one layer")
    growth = layers[0].units[-1].conv.weight.shape[0]
    c = x.shape[1]
    for i, layer in enumerate(layers):
        first = layer.units[0].conv
        if first.weight.shape[1] * first.groups != c:
            raise ValueError(f"fusedres: dense layer {i + 1} expects {first.weight.shape[1] * first.groups} "
                             f"input channels but the buffer prefix it reads has {c}")
        if layer.units[-1].conv.weight.shape[0] != growth:
            raise ValueError(f"fusedres: dense layer {i + 1} adds {layer.units[-1].conv.weight.shape[0]} channels, "
                             f"layer 1 adds {growth}: every layer of a block adds the same growth rate")
        c += growth
    dropout = tuple(bool(d) for d in dropout) or (False,) * len(layers)
    dtype = autocast_dtype(x)
    fused = dense_block_unsupported_reason(x, layers) is None
    params, running = [], []
    for layer in layers:
        for bn, conv in ((unit.bn, unit.conv) for unit in layer.units):
            params += [bn.weight, bn.bias, _cast(conv.weight, dtype), _cast(conv.bias, dtype)]
            running += [bn.running_mean, bn.running_var]
    no_tensors = dict(weight=None, bias=None, running_mean=None, running_var=None)
    plan = _Plan(tuple(tuple(unit.bn._replace(**no_tensors) for unit in layer.units) for layer in layers),
                 tuple(tuple(unit.conv.spec for unit in layer.units) for layer in layers),
                 tuple(float(layer.drop_rate) for layer in layers), growth, fused)
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        buffer, mean, var = DenseBlockFunction.apply(x, plan, dropout, dtype or x.dtype, *params, *running)
    # a compiled graph recomputes the transition's statistics; an inference tensor (under
    # torch.inference_mode) has no version counter to say it is unchanged
    if mean.numel() and not tracing() and not buffer.is_inference():
        setattr(buffer, STATS_ATTR, (buffer._version, mean, var, buffer.numel() // buffer.shape[1]))
    return buffer


def channel_stats(x: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor, int]]:
    """(mean, biased var, count) a dense block recorded for its output x, if x is unchanged since."""
    if tracing():
        return None
    record = getattr(x, STATS_ATTR, None)
    if record is None or x.is_inference() or record[0] != x._version:
        return None
    return record[1:]


def bn_relu_conv_inference(x: torch.Tensor, stats: BatchNormStats, conv: ConvArgs) -> torch.Tensor:
    """conv(relu((x - mean) * scale + shift)) without autograd (eval, no gradients): BN + ReLU in
    the conv's prologue where the fused conv kernels run, else one normalize-activate pass, then
    aten's conv. Two launches per unit where stock eager takes three (BN, ReLU, conv)."""
    if ops.kernel_unsupported_reason(x, conv.weight) is None:
        return direct.conv2d_forward_unchecked(x, conv.weight, conv.bias, *conv.spec, stats.mean, stats.scale,
                                               stats.shift, 1, 0.0, None, 0, 0.0, False, None)[0]
    x = dense(x)
    a = direct.bn_act_forward(x, stats.mean, stats.scale, stats.shift, None, True)
    return F.conv2d(a, conv.weight, conv.bias, *conv.spec)


def bn_relu_conv_pool(x: torch.Tensor, bn: BNArgs, conv: ConvArgs, pool: Optional[int] = 2) -> torch.Tensor:
    """avg_pool2d(conv(relu(BN(x))), pool): DenseNet's transition (pool None: no pooling, a
    dense layer's unit).

    In training it reuses the per-channel statistics a dense block recorded on x (channel_stats)
    instead of reading x again. Where the fused conv kernels run, BN + ReLU is the conv's
    prologue (the normalized input never exists, forward or backward); elsewhere one
    normalize-activate pass, then aten's conv.
    """
    dtype = autocast_dtype(x)
    weight, bias = _cast(conv.weight, dtype), _cast(conv.bias, dtype)
    conv_dtype = weight.dtype
    recorded = channel_stats(x) if bn.batch_stats else None
    # a float32 input under autocast is normalized in float32, as stock BatchNorm does; only the
    # conv runs in the autocast dtype (the kernels' prologue reads the conv's dtype)
    fused = x.dtype == conv_dtype and ops.kernel_unsupported_reason(x, conv.weight, dtype) is None
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        if recorded is not None:
            mean, var, count = recorded
            mean, invstd = _unit_stats(bn, (mean, var), count, x)
            stats = BatchNormStats(mean, invstd, *bn_scale_shift(invstd, bn.weight, bn.bias))
        else:
            # detached: the gradient through the batch statistics is the Functions' own (batch_stats)
            stats, _ = batchnorm_stats(x.detach(), bn.batch_stats, bn.eps, bn.running_mean, bn.running_var,
                                       bn.momentum, bn.weight, bn.bias)
        if fused:
            z = bn_relu_conv(x, ConvArgs(weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups), bn,
                             stats, want_stats=False)[0]
        else:
            a = bn_act(x, bn.weight, bn.bias, stats, batch_stats=bn.batch_stats, act=True)
            z = F.conv2d(a.to(conv_dtype), weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return z if pool is None else F.avg_pool2d(z, pool, pool)
