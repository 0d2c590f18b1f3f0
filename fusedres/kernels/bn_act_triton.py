"""Normalize-activate in Triton: y = act((x - mean[c]) * scale[c] + shift[c] + residual) and its backward.

Forward: one elementwise pass (read x, residual; write y). Backward: one reduction pass that also
writes dz = grad * act'(u) when the residual needs it, and one elementwise pass. act: the code of
fusedres.common.ACTIVATIONS (kernels/activation_triton.py), alpha LeakyReLU's slope.
Elementwise kernels index the flat storage and find the channel as (i // inner) % C.
"""
import torch
import triton
import triton.language as tl

from ..common import channel_view, launch, new_output_like, new_scratch, stats_dtype
from .activation_triton import activate, activation_backward
from .tiles import reduce_launch_shape, tile_count, tile_offsets, tl_acc

ELEMENTWISE_BLOCK = 1024
INT32_MAX = 2**31 - 1


def needs_int64_offsets(numel: int, block: int) -> bool:
    """Whether the flat offsets pid * block + [0, block) of the last program pass INT32_MAX (they
    would wrap negative and pass the mask): the grid covers cdiv(numel, block) * block offsets,
    not numel. With block 1024, which divides 2^31, that is numel > 2^31 as before; the condition
    is stated on the grid so it holds for any block."""
    return triton.cdiv(numel, block) * block - 1 > INT32_MAX


@triton.jit
def _flat_offsets(numel, BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    if INDEX_64:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:  # 32-bit division below is several times cheaper than 64-bit
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < numel


@triton.jit
def _bn_act_forward_kernel(x_ptr, residual_ptr, y_ptr, mean_ptr, scale_ptr, shift_ptr, numel, C, inner,
                           HAS_MEAN: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                           ACT: tl.constexpr, ALPHA: tl.constexpr, BLOCK: tl.constexpr, INDEX_64: tl.constexpr,
                           ACC: tl.constexpr):
    offs, mask = _flat_offsets(numel, BLOCK, INDEX_64)
    c = (offs // inner) % C
    z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    if HAS_MEAN:
        z = z - tl.load(mean_ptr + c, mask=mask, other=0.0)
    if HAS_SCALE:
        z = z * tl.load(scale_ptr + c, mask=mask, other=0.0)
    z = z + tl.load(shift_ptr + c, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        z = z + tl.load(residual_ptr + offs, mask=mask, other=0.0).to(ACC)
    z = activate(z, ACT, ALPHA)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_act_backward_reduce_kernel(grad_ptr, x_ptr, output_ptr, grad_z_ptr, mean_ptr, scale_ptr, shift_ptr, part_ptr,
                                   outer, C, inner, outer_per_split, splits,
                                   HAS_OUTPUT: tl.constexpr, ACT: tl.constexpr, ALPHA: tl.constexpr,
                                   WRITE_GRAD_Z: tl.constexpr,
                                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INNER_IS_ONE: tl.constexpr,
                                   ACC: tl.constexpr):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    sc = tl.load(scale_ptr + cols, mask=cmask, other=0.0)
    sf = tl.load(shift_ptr + cols, mask=cmask, other=0.0)
    o_begin = split * outer_per_split
    o_end = tl.minimum(o_begin + outer_per_split, outer)
    sum_dz = tl.zeros([BLOCK_C], ACC)
    sum_dz_xmu = tl.zeros([BLOCK_C], ACC)
    for t in range(0, tile_count(o_begin, o_end, inner, BLOCK_R, INNER_IS_ONE)):
        offs, mask, rmask = tile_offsets(t, o_begin, o_end, C, inner, cols, cmask, BLOCK_R, INNER_IS_ONE)
        xmu = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - mu[None, :]
        dz = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
        if HAS_OUTPUT:  # ReLU after a residual add: its mask from the output (u is not z's alone)
            dz = tl.where(tl.load(output_ptr + offs, mask=mask, other=0.0).to(ACC) > 0.0, dz, 0.0)
        else:
            dz = activation_backward(dz, xmu * sc[None, :] + sf[None, :], ACT, ALPHA)
        if WRITE_GRAD_Z:
            tl.store(grad_z_ptr + offs, dz.to(grad_z_ptr.dtype.element_ty), mask=mask)
        dz = tl.where(mask, dz, 0.0)
        sum_dz += tl.sum(dz, axis=0)
        sum_dz_xmu += tl.sum(dz * tl.where(mask, xmu, 0.0), axis=0)
    tl.store(part_ptr + split * C + cols, sum_dz, mask=cmask)
    tl.store(part_ptr + (splits + split) * C + cols, sum_dz_xmu, mask=cmask)


@triton.jit
def _bn_act_backward_elementwise_kernel(grad_ptr, x_ptr, grad_input_ptr, mean_ptr, scale_ptr, shift_ptr,
                                        coef_xmu_ptr, coef_c_ptr, numel, C, inner, ACT: tl.constexpr,
                                        ALPHA: tl.constexpr, BLOCK: tl.constexpr, INDEX_64: tl.constexpr,
                                        ACC: tl.constexpr):
    offs, mask = _flat_offsets(numel, BLOCK, INDEX_64)
    c = (offs // inner) % C
    sc = tl.load(scale_ptr + c, mask=mask, other=0.0)
    xmu = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - tl.load(mean_ptr + c, mask=mask, other=0.0)
    dz = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
    dz = activation_backward(dz, xmu * sc + tl.load(shift_ptr + c, mask=mask, other=0.0), ACT, ALPHA)
    dx = sc * dz + xmu * tl.load(coef_xmu_ptr + c, mask=mask, other=0.0) + tl.load(coef_c_ptr + c, mask=mask, other=0.0)
    tl.store(grad_input_ptr + offs, dx.to(grad_input_ptr.dtype.element_ty), mask=mask)


def _elementwise_grid(numel):
    return (max(1, triton.cdiv(numel, ELEMENTWISE_BLOCK)),)


def bn_act_forward_triton(x, mean, scale, shift, residual, act, alpha):
    """y [same shape/strides as x] = act((x - mean) * scale + shift + residual)."""
    _, channels, inner = channel_view(x)
    y = new_output_like(x)
    if x.numel() == 0:
        return y
    launch(_bn_act_forward_kernel, _elementwise_grid(x.numel()), x.device,
        x, residual if residual is not None else x, y,
        mean if mean is not None else shift, scale if scale is not None else shift, shift,
        x.numel(), channels, inner,
        HAS_MEAN=mean is not None, HAS_SCALE=scale is not None, HAS_RESIDUAL=residual is not None, ACT=act, ALPHA=alpha,
        BLOCK=ELEMENTWISE_BLOCK, INDEX_64=needs_int64_offsets(x.numel(), ELEMENTWISE_BLOCK), ACC=tl_acc(x.dtype))
    return y


def bn_act_backward_reduce_triton(grad_output, x, mean, scale, shift, output, act, alpha, write_grad_z,
                                  reduce_sums=True):
    """(sum dz, sum dz*(x - mean), dz or empty) with dz = grad_output * act'(u), u recomputed from x
    (output given: ReLU's mask output > 0, the only activation after a residual). reduce_sums=False:
    the sums as [splits, C] rows, left for BatchNorm's backward bookkeeping kernel to add up."""
    outer, channels, inner = channel_view(x)
    acc = stats_dtype(x)
    grad_z = new_output_like(grad_output) if write_grad_z else grad_output.new_empty(0)
    if outer * inner == 0:
        zeros = torch.zeros(channels, dtype=acc, device=x.device)
        return zeros, zeros.clone(), grad_z
    block_c, block_r, outer_per_split, splits = reduce_launch_shape(outer, channels, inner, x.device)
    part = new_scratch((2, splits, channels), acc, x.device)
    launch(_bn_act_backward_reduce_kernel, (triton.cdiv(channels, block_c), splits), x.device,
        grad_output, x, output if output is not None else x, grad_z if write_grad_z else x,
        mean, scale, shift, part, outer, channels, inner, outer_per_split, splits,
        HAS_OUTPUT=output is not None, ACT=act, ALPHA=alpha, WRITE_GRAD_Z=write_grad_z,
        BLOCK_R=block_r, BLOCK_C=block_c, INNER_IS_ONE=inner == 1, ACC=tl_acc(x.dtype))
    if not reduce_sums:
        return part[0], part[1], grad_z
    sums = part.sum(1)  # fixed-order: deterministic, unlike atomics
    return sums[0], sums[1], grad_z


def bn_act_backward_elementwise_triton(grad, x, mean, scale, shift, coef_xmu, coef_c, act, alpha):
    """grad_input = scale * dz + (x - mean) * coef_xmu + coef_c, dz = grad * act'(u)."""
    _, channels, inner = channel_view(x)
    grad_input = new_output_like(x)
    if x.numel() == 0:
        return grad_input
    launch(_bn_act_backward_elementwise_kernel, _elementwise_grid(x.numel()), x.device,
        grad, x, grad_input, mean, scale, shift, coef_xmu, coef_c, x.numel(), channels, inner, ACT=act, ALPHA=alpha,
        BLOCK=ELEMENTWISE_BLOCK, INDEX_64=needs_int64_offsets(x.numel(), ELEMENTWISE_BLOCK), ACC=tl_acc(x.dtype))
    return grad_input
