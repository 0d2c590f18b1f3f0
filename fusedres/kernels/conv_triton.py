"""Implicit-GEMM 2-D convolution in Triton with BatchNorm fused at both ends: forward, input
gradient (dgrad) and weight gradient (wgrad).

GEMM views (M rows x N columns, reduced over K), x [N, C_in, H, W] -> y [N, C_out, P, Q]:
  forward  M = N*P*Q output pixels, N = C_out,          K = KH*KW taps x C_in/groups
           (a 1x1 stride-1 conv is compiled as a plain GEMM: no tap loop, no bounds checks)
  dgrad    M = N*H*W input pixels,  N = C_in,           K = KH*KW taps x C_out/groups
  wgrad    M = C_out,               N = C_in/groups x tap, K = N*P*Q output pixels (split across programs)
Tensors are addressed through their strides, so NCHW and channels_last both work; channels_last is
the fast layout (a K step reads BLOCK_K contiguous channels of each pixel).

Groups: a program owning output channels [n0, n0 + BLOCK_N) reduces only over the input channels
of the groups those channels belong to, against a dense block-diagonal weight slice built per tile
(grouped_weight_tiles), so one program covers several small groups (ResNeXt's 32 groups of 4..32
channels) and its tensor-core tiles stay full. The price is the off-diagonal products: about
(groups per tile) x the useful ones, so the default tiles hold ~4 groups. Known deviation: an Inf
or NaN input channel turns the outputs of the other groups in its tile NaN (0 * Inf), where
per-group convolution keeps them finite.
Software pipelining needs vectorizable loads: tests/test_sm90_compile.py compiles every variant a
fused ResNet-50, ResNeXt-50 and DenseNet-121 launch for sm_90, with each launch's specialization,
and checks wgmma, 16-byte cp.async operand copies, no spills and shared memory for two programs
per SM.

Fusions:
  forward prologue  a = act((x - mean[c]) * scale[c] + shift[c]) as each input tile is loaded (act:
                    any of common.ACTIVATIONS, kernels/activation_triton.py);
                    padded positions are 0 after it (padding belongs to the normalized activation)
  forward epilogue  + bias, per-tile channel sum and centered sum of squares (BatchNorm
                    statistics of the stored output), + residual, act
  dgrad epilogue    with the forward prologue's BN: dU = dA * act'(U), U recomputed from the saved
                    pre-BN input, and per-tile sums of dU and dU * (x - mean) for BatchNorm's backward
  wgrad prologue    the forward prologue recomputed from the saved pre-BN input, so the
                    normalized activation is never stored, forward or backward
Strided dgrad is split into stride_h * stride_w phases (input pixels with the same h % s and
w % s): within a phase a tap either hits every pixel or none, so no tap is computed and thrown
away (a 3x3 stride-2 dgrad does 9/4 taps per pixel on average, not 9).
Partial results (statistics, split-K weight gradients) go to per-program rows that the caller
sums in float32: deterministic, no atomics.
"""
import os
import threading
import weakref
from typing import Dict, NamedTuple, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import common
from .activation_triton import activate, activation_backward
from ..common import launch as launch_kernel, new_scratch, stats_dtype, triton_interpreted


@triton.jit
def _act_prologue(a, amask, rc, cmask, mean_ptr, scale_ptr, shift_ptr, ACT: tl.constexpr, ALPHA: tl.constexpr,
                  ACC: tl.constexpr):
    """act((a - mean) * scale + shift) on a loaded input tile, 0 where the tile is masked (padding)."""
    mu = tl.load(mean_ptr + rc, mask=cmask, other=0.0)
    sc = tl.load(scale_ptr + rc, mask=cmask, other=0.0)
    sf = tl.load(shift_ptr + rc, mask=cmask, other=0.0)
    u = (a.to(ACC) - mu[None, :]) * sc[None, :] + sf[None, :]
    u = activate(u, ACT, ALPHA)
    return tl.where(amask, u, 0.0).to(a.dtype)


@triton.jit
def _mma(acc, a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    if UPCAST:  # the interpreter's bf16 tl.dot is wrong; products of bf16 are exact in fp32
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc=acc, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _tap_offset(kh, kw, swh, sww, KH: tl.constexpr, KW: tl.constexpr):
    """The weight offset of tap (kh, kw); none for a 1x1 conv. A 1x1 weight made channels_last from
    NCHW keeps its (C, 1, 1, 1) strides, and tap * 1 (the tap a loop value) would cost the weight
    loads their 16-byte alignment: sm_90, bf16, 128x128 tiles, 32 scalar 2-byte loads per thread
    per step outside the cp.async pipeline (forward and input grad); with no offset, every operand
    copy is a 16-byte cp.async (tests/test_sm90_compile.py)."""
    if KH * KW == 1:
        return 0
    else:
        return kh * swh + kw * sww


@triton.jit
def _reduction_span(tile, BLOCK: tl.constexpr, C_this, C_other, per_group_this, per_group_other,
                    GROUPED: tl.constexpr, SPAN_ALIGN: tl.constexpr, SPAN_STEP: tl.constexpr):
    """[begin, end) of the other side's channels that the groups of this side's channels
    [tile * BLOCK, tile * BLOCK + BLOCK) read: all of them without groups."""
    if GROUPED:
        if SPAN_STEP > 0:  # whole groups per tile: a compile-time stride, so the compiler sees alignment
            begin = tile * SPAN_STEP
            end = tl.minimum(begin + SPAN_STEP, C_other)
        else:
            first = tile * BLOCK
            last = tl.minimum(first + BLOCK, C_this) - 1
            begin = tl.multiple_of((first // per_group_this) * per_group_other, SPAN_ALIGN)
            end = (last // per_group_this + 1) * per_group_other
    else:
        begin = 0
        end = C_other
    return begin, end


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, y_ptr, bias_ptr, res_ptr, mean_ptr, scale_ptr, shift_ptr, psum_ptr, pm2_ptr,
                     N, H, W, C_in, P, Q, C_out, cin_g, cout_g, w_span,
                     sxn, sxc, sxh, sxw, swo, swi, swh, sww, syn, syc, syh, syw, srn, src, srh, srw,
                     stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                     KH: tl.constexpr, KW: tl.constexpr, GROUPED: tl.constexpr, SPAN_ALIGN: tl.constexpr,
                     SPAN_STEP: tl.constexpr, PLAIN_GEMM: tl.constexpr,
                     PROLOGUE: tl.constexpr, PROLOGUE_ACT: tl.constexpr, PROLOGUE_ALPHA: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, ALPHA: tl.constexpr,
                     STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr):
    M = N * P * Q
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(C_out, BLOCK_N)
    # GROUP_M row tiles share each weight tile while it is in L2
    pid = tl.program_id(0)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    img = rm // (P * Q)
    oh = (rm % (P * Q)) // Q
    ow = rm % Q
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < C_out
    rk = tl.arange(0, BLOCK_K)
    c_begin, c_end = _reduction_span(pid_n, BLOCK_N, C_out, C_in, cout_g, cin_g, GROUPED, SPAN_ALIGN, SPAN_STEP)
    x_img = img.to(tl.int64) * sxn
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    # one flat loop over (tap, channel block), so Triton pipelines loads across taps too (a 3x3
    # conv over 64 channels would otherwise be 9 loops of one unpipelined step)
    c_blocks = tl.cdiv(c_end - c_begin, BLOCK_K)
    for step in range(0, KH * KW * c_blocks):
        tap = step // c_blocks
        kh = tap // KW
        kw = tap % KW
        rc = c_begin + (step % c_blocks) * BLOCK_K + rk
        if PLAIN_GEMM:  # 1x1, stride 1, no padding: output pixel m reads input pixel m, no bounds
            valid = mmask
            x_row = x_img + oh * sxh + ow * sxw
        else:
            ih = oh * stride_h - pad_h + kh * dil_h
            iw = ow * stride_w - pad_w + kw * dil_w
            valid = mmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_row = x_img + ih * sxh + iw * sxw
        cmask = rc < c_end
        amask = valid[:, None] & cmask[None, :]
        a = tl.load(x_ptr + x_row[:, None] + rc[None, :] * sxc, mask=amask, other=0.0)
        if PROLOGUE:
            a = _act_prologue(a, amask, rc, cmask, mean_ptr, scale_ptr, shift_ptr, PROLOGUE_ACT, PROLOGUE_ALPHA, ACC)
        if GROUPED:  # this tile's dense block-diagonal weight slice (see grouped_weight_tiles)
            kl = (step % c_blocks) * BLOCK_K + rk
            b = tl.load(w_ptr + ((pid_n * (KH * KW) + tap) * w_span + kl)[:, None] * BLOCK_N
                        + tl.arange(0, BLOCK_N)[None, :])
        else:
            b = tl.load(w_ptr + rn[None, :] * swo + rc[:, None] * swi + _tap_offset(kh, kw, swh, sww, KH, KW),
                        mask=cmask[:, None] & nmask[None, :], other=0.0)
        acc = _mma(acc, a, b, UPCAST, PRECISION, ACC)

    omask = mmask[:, None] & nmask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(ACC)[None, :]
    if STATS:
        # statistics of the values as stored (rounded to y's dtype), as BatchNorm would see them
        v = tl.where(omask, acc.to(y_ptr.dtype.element_ty).to(ACC), 0.0)
        rows = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(ACC)
        t_sum = tl.sum(v, axis=0)
        d = tl.where(omask, v - (t_sum / rows)[None, :], 0.0)
        # partial rows of C_out + 1 values: the channels' sums, then the tile's row count
        tl.store(psum_ptr + pid_m * (C_out + 1) + rn, t_sum, mask=nmask)
        tl.store(pm2_ptr + pid_m * (C_out + 1) + rn, tl.sum(d * d, axis=0), mask=nmask)
        if pid_n == 0:
            tl.store(psum_ptr + pid_m * (C_out + 1) + C_out, rows)
    if HAS_RES:
        r_off = (img.to(tl.int64) * srn + oh * srh + ow * srw)[:, None] + rn[None, :] * src
        acc += tl.load(res_ptr + r_off, mask=omask, other=0.0).to(ACC)
    acc = activate(acc, ACT, ALPHA)
    y_off = (img.to(tl.int64) * syn + oh * syh + ow * syw)[:, None] + rn[None, :] * syc
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _conv_dgrad_kernel(dy_ptr, w_ptr, dx_ptr, x_ptr, mean_ptr, scale_ptr, shift_ptr, part_ptr, oscale_ptr,
                       N, H, W, C_in, P, Q, C_out, cin_g, cout_g, w_span,
                       sdn, sdc, sdh, sdw, swo, swi, swh, sww, sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
                       stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, num_m, part_rows,
                       KH: tl.constexpr, KW: tl.constexpr, GROUPED: tl.constexpr, SPAN_ALIGN: tl.constexpr,
                       SPAN_STEP: tl.constexpr, TAP_CHECK: tl.constexpr,
                       EPILOGUE_BN: tl.constexpr, ACCUMULATE: tl.constexpr,
                       EPILOGUE_ACT: tl.constexpr, EPILOGUE_ALPHA: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    num_n = tl.cdiv(C_in, BLOCK_N)
    pid = tl.program_id(0)
    phase = tl.program_id(1)
    pid_m = pid // num_n
    pid_n = pid % num_n
    ph = phase // stride_w
    pw = phase % stride_w
    Hp = tl.cdiv(H - ph, stride_h)
    Wp = tl.cdiv(W - pw, stride_w)
    plane = tl.maximum(Hp * Wp, 1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < N * Hp * Wp
    img = rm // plane
    h = ph + ((rm % plane) // tl.maximum(Wp, 1)) * stride_h
    w = pw + (rm % tl.maximum(Wp, 1)) * stride_w
    rc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = rc < C_in
    rk = tl.arange(0, BLOCK_K)
    k_begin, k_end = _reduction_span(pid_n, BLOCK_N, C_in, C_out, cin_g, cout_g, GROUPED, SPAN_ALIGN, SPAN_STEP)
    dy_img = img.to(tl.int64) * sdn
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    # Taps this phase reads: kh with (ph + pad_h - kh * dil_h) % stride_h == 0. With dilation 1
    # (every strided ResNet conv) they are kh0, kh0 + stride_h, ..., so only those are visited;
    # otherwise every tap is visited and the others masked. One flat loop over (tap, channel
    # block), as in the forward, so loads pipeline across taps.
    kh0 = tl.where(dil_h == 1, (ph + pad_h) % stride_h, 0)
    kh_step = tl.where(dil_h == 1, stride_h, 1)
    kw0 = tl.where(dil_w == 1, (pw + pad_w) % stride_w, 0)
    kw_step = tl.where(dil_w == 1, stride_w, 1)
    n_kh = tl.maximum(tl.cdiv(KH - kh0, kh_step), 0)
    n_kw = tl.maximum(tl.cdiv(KW - kw0, kw_step), 0)
    k_blocks = tl.cdiv(k_end - k_begin, BLOCK_K)
    for step in range(0, n_kh * n_kw * k_blocks):
        tap = step // k_blocks
        kh = kh0 + (tap // n_kw) * kh_step
        kw = kw0 + (tap % n_kw) * kw_step
        ko = k_begin + (step % k_blocks) * BLOCK_K + rk
        th = h + pad_h - kh * dil_h  # = p * stride_h for the output row p this tap reads
        tw = w + pad_w - kw * dil_w
        p = th // stride_h
        q = tw // stride_w
        valid = mmask & (th >= 0) & (p < P) & (tw >= 0) & (q < Q)
        if TAP_CHECK:  # stride and dilation both > 1: not every visited tap hits this phase
            valid = valid & ((th % stride_h) == 0) & ((tw % stride_w) == 0)
        kmask = ko < k_end
        a = tl.load(dy_ptr + (dy_img + p * sdh + q * sdw)[:, None] + ko[None, :] * sdc,
                    mask=valid[:, None] & kmask[None, :], other=0.0)
        if GROUPED:  # this tile's dense block-diagonal weight slice (see grouped_weight_tiles)
            kl = (step % k_blocks) * BLOCK_K + rk
            b = tl.load(w_ptr + ((pid_n * (KH * KW) + kh * KW + kw) * w_span + kl)[:, None] * BLOCK_N
                        + tl.arange(0, BLOCK_N)[None, :])
        else:
            b = tl.load(w_ptr + ko[:, None] * swo + rc[None, :] * swi + _tap_offset(kh, kw, swh, sww, KH, KW),
                        mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = _mma(acc, a, b, UPCAST, PRECISION, ACC)

    omask = mmask[:, None] & cmask[None, :]
    if EPILOGUE_BN:
        # dU = dA * act'(U), U = (x - mean) * scale + shift recomputed exactly as the forward prologue did
        x_off = (img.to(tl.int64) * sxn + h * sxh + w * sxw)[:, None] + rc[None, :] * sxc
        mu = tl.load(mean_ptr + rc, mask=cmask, other=0.0)
        xmu = tl.load(x_ptr + x_off, mask=omask, other=0.0).to(ACC) - mu[None, :]
        if EPILOGUE_ACT != 0:
            sc = tl.load(scale_ptr + rc, mask=cmask, other=0.0)
            sf = tl.load(shift_ptr + rc, mask=cmask, other=0.0)
            acc = activation_backward(acc, xmu * sc[None, :] + sf[None, :], EPILOGUE_ACT, EPILOGUE_ALPHA)
        acc = tl.where(omask, acc, 0.0)
        if not ACCUMULATE:
            # the sums of dU as stored (rounded to dx's dtype): BatchNorm's backward subtracts their
            # means from that stored dU, and its result can be far smaller than dU, so sums of the
            # unrounded values would leave a rounding-sized error uncancelled (bf16: 5x stock's)
            acc = acc.to(dx_ptr.dtype.element_ty).to(ACC)
        row = phase * num_m + pid_m
        tl.store(part_ptr + row * C_in + rc, tl.sum(acc, axis=0), mask=cmask)
        tl.store(part_ptr + (part_rows + row) * C_in + rc, tl.sum(acc * tl.where(omask, xmu, 0.0), axis=0),
                 mask=cmask)
    g_off = (img.to(tl.int64) * sgn + h * sgh + w * sgw)[:, None] + rc[None, :] * sgc
    if ACCUMULATE:
        # dx += out_scale * dU in place: every (pixel, channel) belongs to one (phase, tile), so
        # the read-modify-write needs no atomics (a dense block adding into its gradient buffer)
        osc = tl.load(oscale_ptr + rc, mask=cmask, other=0.0).to(ACC)
        acc = tl.load(dx_ptr + g_off, mask=omask, other=0.0).to(ACC) + acc * osc[None, :]
    tl.store(dx_ptr + g_off, acc.to(dx_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _conv_wgrad_kernel(dy_ptr, x_ptr, ws_ptr, mean_ptr, scale_ptr, shift_ptr,
                       N, H, W, C_in, P, Q, C_out, cin_g, cout_g,
                       sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw,
                       stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, m_per_split, num_c,
                       KH: tl.constexpr, KW: tl.constexpr, GROUPED: tl.constexpr, SPAN_ALIGN: tl.constexpr,
                       SPAN_STEP: tl.constexpr, PROLOGUE: tl.constexpr,
                       PROLOGUE_ACT: tl.constexpr, PROLOGUE_ALPHA: tl.constexpr, BLOCK_O: tl.constexpr,
                       BLOCK_C: tl.constexpr,
                       BLOCK_M: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    pid_o = pid // num_c
    pid_c = pid % num_c
    kh = tap // KW
    kw = tap % KW
    ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = ro < C_out
    c_begin, c_end = _reduction_span(pid_o, BLOCK_O, C_out, C_in, cout_g, cin_g, GROUPED, SPAN_ALIGN, SPAN_STEP)
    rc = c_begin + pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = rc < c_end
    M = N * P * Q
    m_begin = split * m_per_split
    m_end = tl.minimum(m_begin + m_per_split, M)
    acc = tl.zeros([BLOCK_O, BLOCK_C], ACC)
    for m0 in range(m_begin, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mmask = rm < m_end
        img = rm // (P * Q)
        oh = (rm % (P * Q)) // Q
        ow = rm % Q
        g_off = (img.to(tl.int64) * sdn + oh * sdh + ow * sdw)[None, :] + ro[:, None] * sdc
        g = tl.load(dy_ptr + g_off, mask=omask[:, None] & mmask[None, :], other=0.0)  # [BLOCK_O, BLOCK_M]
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        valid = mmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        amask = valid[:, None] & cmask[None, :]
        a_off = (img.to(tl.int64) * sxn + ih * sxh + iw * sxw)[:, None] + rc[None, :] * sxc
        a = tl.load(x_ptr + a_off, mask=amask, other=0.0)
        if PROLOGUE:
            a = _act_prologue(a, amask, rc, cmask, mean_ptr, scale_ptr, shift_ptr, PROLOGUE_ACT, PROLOGUE_ALPHA, ACC)
        acc = _mma(acc, g, a, UPCAST, PRECISION, ACC)
    # rows [split, o, tap, c - first channel of o's group]: only the block diagonal is a real weight
    if GROUPED:
        cl = rc[None, :] - ((ro // cout_g) * cin_g)[:, None]
        smask = omask[:, None] & cmask[None, :] & (cl >= 0) & (cl < cin_g)
    else:
        cl = rc[None, :] + ro[:, None] * 0
        smask = omask[:, None] & cmask[None, :]
    ws_off = ((split * C_out + ro[:, None]).to(tl.int64) * (KH * KW) + tap) * cin_g + cl
    tl.store(ws_ptr + ws_off, acc, mask=smask)


# ---------------------------------------------------------------------------------------------
# Host side: geometry, launch configurations, autotuning.
# ---------------------------------------------------------------------------------------------
class ConvGeometry(NamedTuple):
    N: int
    C_in: int
    H: int
    W: int
    C_out: int
    P: int
    Q: int
    KH: int
    KW: int
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int

    @property
    def cin_g(self) -> int:
        return self.C_in // self.groups

    @property
    def cout_g(self) -> int:
        return self.C_out // self.groups

    @property
    def is_plain_gemm(self) -> bool:
        """1x1, stride 1, no padding: the forward is a plain GEMM over pixels."""
        return (self.KH, self.KW, self.stride, self.padding) == (1, 1, (1, 1), (0, 0))

    @property
    def flat(self) -> tuple:
        return (self.N, self.H, self.W, self.C_in, self.P, self.Q, self.C_out, self.cin_g, self.cout_g)

    @property
    def conv_scalars(self) -> tuple:
        return (*self.stride, *self.padding, *self.dilation)


def geometry(x_shape, w_shape, stride, padding, dilation, groups) -> ConvGeometry:
    N, C_in, H, W = x_shape
    C_out, _, KH, KW = w_shape
    P = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    Q = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    return ConvGeometry(N, C_in, H, W, C_out, P, Q, KH, KW, tuple(stride), tuple(padding), tuple(dilation), groups)


def _nchw_strides(t: torch.Tensor) -> tuple:
    return tuple(t.stride())  # (n, c, h, w) whatever the memory format


def _dot_flags(dtype: torch.dtype, device: torch.device):
    """(ACC, UPCAST, PRECISION): fp32 accumulation (fp64 for fp64); for fp32 operands tf32 where
    cuDNN would use it (torch.backends.cudnn.allow_tf32, on by default for convs), else exact
    ("ieee"); None (Triton's default, unused) for the other dtypes."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    upcast = triton_interpreted() and dtype == torch.bfloat16
    precision = None
    if dtype == torch.float32:
        precision = "tf32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "ieee"
    return acc, upcast, precision


def _span(block: int, channels: int, per_group_this: int, per_group_other: int, grouped: bool) -> int:
    """Most channels of the other side that one block of `block` channels needs (see _reduction_span)."""
    if not grouped:
        return channels * per_group_other // per_group_this  # every channel of the other side
    most = 0
    for first in range(0, channels, block):
        last = min(first + block, channels) - 1
        most = max(most, (last // per_group_this - first // per_group_this + 1) * per_group_other)
    return most


def _span_step(block: int, per_group_this: int, per_group_other: int) -> int:
    """Other-side channels per tile when a tile holds whole groups (block % per_group_this == 0),
    else 0: tile t then spans [t * step, (t + 1) * step), a constant stride the compiler can see."""
    return (block // per_group_this) * per_group_other if block % per_group_this == 0 else 0


def _span_constexprs(block: int, channels: int, per_group_this: int, per_group_other: int, grouped: bool) -> dict:
    """SPAN_ALIGN and SPAN_STEP of _reduction_span for tiles of `block` of `channels`."""
    return dict(SPAN_ALIGN=_span_align(block, channels, per_group_this, per_group_other),
                SPAN_STEP=_span_step(block, per_group_this, per_group_other) if grouped else 0)


def _span_align(block: int, channels: int, per_group_this: int, per_group_other: int) -> int:
    """Largest power of two (at most 16) dividing the first other-side channel of every tile's span,
    as tl.multiple_of tells the compiler (e.g. 64-wide tiles of ResNeXt's 4-channel groups start
    at multiples of 64)."""
    align = 16
    for first in range(0, channels, block):
        begin = (first // per_group_this) * per_group_other
        while align > 1 and begin % align:
            align //= 2
    return align


def grouped_weight_tiles(weight: torch.Tensor, geo: ConvGeometry, block_n: int, block_k: int, dgrad: bool):
    """The weight of a grouped conv as dense per-tile block-diagonal slices [tiles, taps, span, block_n].

    A program owns block_n channels of its output side (forward: output channels; dgrad: input
    channels) and reduces over the `span` channels of the other side that their groups read;
    slice[t, tap, j, i] is the weight between other-side channel (first of tile t's span) + j and
    tile-side channel t * block_n + i, 0 off the groups' diagonal blocks. Contiguous, unmasked
    loads of it let Triton vectorize and pipeline them (a load of the raw [C_out, C_in/groups, ...]
    weight at a group's offset is neither). Size ~ channels x taps x block_n: 0.6 M values for
    ResNeXt-50's widest conv (1024 channels, 32 groups, 64-wide tiles), built per call in a few
    small tensor ops."""
    C_tile, C_other = (geo.C_in, geo.C_out) if dgrad else (geo.C_out, geo.C_in)
    pg_tile, pg_other = (geo.cin_g, geo.cout_g) if dgrad else (geo.cout_g, geo.cin_g)
    taps = geo.KH * geo.KW
    tiles = triton.cdiv(C_tile, block_n)
    span = triton.cdiv(_span(block_n, C_tile, pg_tile, pg_other, True), block_k) * block_k
    dev = weight.device
    tile_ch = torch.arange(tiles * block_n, device=dev).view(tiles, 1, block_n)
    first_other = (torch.arange(tiles, device=dev) * block_n // pg_tile * pg_other).view(tiles, 1, 1)
    other_ch = first_other + torch.arange(span, device=dev).view(1, span, 1)
    group = tile_ch // pg_tile
    valid = (group == other_ch // pg_other) & (tile_ch < C_tile) & (other_ch < C_other)
    out_ch, in_ch = (other_ch, tile_ch) if dgrad else (tile_ch, other_ch)
    within = in_ch - group * geo.cin_g  # index into the weight's C_in/groups axis
    w = weight.permute(0, 2, 3, 1).reshape(geo.C_out, taps, geo.cin_g)
    vals = w[torch.where(valid, out_ch, 0), :, torch.where(valid, within, 0)]  # [tiles, span, block_n, taps]
    vals = torch.where(valid[..., None], vals, torch.zeros((), dtype=vals.dtype, device=dev))
    return vals.permute(0, 3, 1, 2).contiguous(), span


# Forms of each weight tensor the kernels read (grouped tiles, a transposed copy), while it lives:
# {key: (version, data_ptr, weak reference to the storage, form)}. A weight changes once per
# optimizer step (its version counter moves), so a train step builds its forward and
# input-gradient forms once, not once per call and again per autotuning candidate; eval builds
# them once. A move (`.half().float()`) swaps the weight's storage without a version bump, and the
# new one can land where the old one was: a form whose storage died is not reused.
_weight_forms = None


def cached_weight_form(weight: torch.Tensor, key, build):
    """build(), a function of the weight's values, kept until the weight changes."""
    global _weight_forms
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor has no version counter: nothing says it is unchanged
        return build()
    if _weight_forms is None:
        from torch.utils.weak import WeakTensorKeyDictionary

        _weight_forms = WeakTensorKeyDictionary()
    forms = _weight_forms.get(weight)
    if forms is None:
        forms = _weight_forms[weight] = {}
    hit = forms.get(key)
    if hit is not None and hit[0] == version and hit[1] == weight.data_ptr() and hit[2]() is not None:
        return hit[3]
    with torch.no_grad():  # a copy with autograd history would keep the weight (the weak key) alive
        form = build()
    forms[key] = (version, weight.data_ptr(), weakref.ref(weight.untyped_storage()), form)
    return form


def cached_grouped_weight_tiles(weight: torch.Tensor, geo: "ConvGeometry", block_n: int, block_k: int, dgrad: bool):
    """grouped_weight_tiles, rebuilt only when the weight's values may have changed."""
    return cached_weight_form(weight, ("grouped", geo, block_n, block_k, dgrad),
                              lambda: grouped_weight_tiles(weight, geo, block_n, block_k, dgrad))


def _k_major_dgrad_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight [C_out, C_in, kh, kw] with C_out contiguous (memory [kh, kw, C_in, C_out])."""
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def _dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """channels_last weights ([C_out, kh, kw, C_in] in memory), so a weight tile is read along
    contiguous channels; a copy only for NCHW weights with kh*kw > 1 (a few MB at most)."""
    return weight.contiguous(memory_format=torch.channels_last)


# Shared memory for a kernel's software pipeline (stages x one stage's operand tiles): at most
# 96 KB, so two programs fit on an SM (H100/H200: 228 KB per SM, 227 KB per block). The weight
# gradient's 128x128 tiles with 128-pixel steps in 3 bf16 stages took 192 KB (one program per SM,
# nothing to hide its prologue and epilogue behind).
PIPELINE_BYTES = 96 * 1024


def _fit_stages(stages: int, stage_bytes: int) -> int:
    """num_stages capped so the pipeline fits PIPELINE_BYTES, never below 2 (one tile loads while
    one is multiplied) unless asked (the interpreter's 1)."""
    return min(stages, max(2, PIPELINE_BYTES // stage_bytes))


def _wgrad_pixel_step(stages: int, tile_cols: int, element_size: int, input_cols: int, warps: int,
                      prologue: bool) -> int:
    """The weight gradient's reduction step (pixels per step): 128 unless
      - its pipeline would outgrow PIPELINE_BYTES (bf16 128x128 tiles in 3 stages: 64 pixels,
        96 KB; float32: 32), or
      - with the BN prologue, which normalizes the input tile in registers, a thread would hold
        more than 32 of its values (sm_90, bf16, DenseNet's 3x3 32x64 tiles on 4 warps: 64 per
        thread took 255 registers and spilled 32 bytes; 32 per thread, 145 registers)."""
    step = 128
    while step > 16 and (_fit_stages(stages, step * tile_cols * element_size) * step * tile_cols * element_size
                         > PIPELINE_BYTES or (prologue and step * input_cols > 32 * 32 * warps)):
        step //= 2
    return step


def _k_block(span: int, dtype: torch.dtype) -> int:
    cap = 32 if dtype in (torch.float32, torch.float64) else 64
    return max(16, min(cap, triton.next_power_of_2(span)))


# Configurations: (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_K follows the reduction span.
# 128x64 runs 8 warps: with 4, the bf16 forward with the BN-ReLU prologue needs 255 registers and
# spills (sm_90, the 3x3 64->64 conv of ResNet-50's layer1 and ResNeXt's grouped 3x3); with 8, 174.
_FWD_CONFIGS = [(128, 128, 8, 3), (128, 64, 8, 4), (64, 128, 4, 4), (128, 128, 4, 4), (64, 64, 4, 4),
                (256, 128, 8, 3), (128, 32, 4, 4), (64, 32, 4, 5), (256, 32, 8, 3), (128, 16, 4, 4)]
_WGRAD_CONFIGS = [(128, 128, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4), (32, 64, 4, 4),
                  (64, 32, 4, 4), (32, 32, 4, 4), (16, 16, 2, 4)]
_INTERPRETER_CONFIG = (32, 16, 1, 1)  # small tiles so the tests cross tile edges at tiny shapes


def _default_config(rows: int, cols: int, table, per_group: int = 0, group_rows: bool = False) -> tuple:
    """Autotuning off: the first configuration (largest tiles first) whose tile fits the problem
    (BLOCK_N <= the columns, BLOCK_M <= the rows, rounded up to powers of two, at least 16).
    Grouped convs (per_group = channels per group on the tile's side; group_rows when the rows
    are channels too, as in wgrad) take about 4 groups per tile: every group more in a tile
    multiplies the block-diagonal tile's wasted products (32 groups of 4 in a 128-wide tile would
    compute 32x the useful work)."""
    if triton_interpreted():
        return _INTERPRETER_CONFIG
    if per_group:
        cols = min(cols, 4 * triton.next_power_of_2(per_group))
        if group_rows:
            rows = min(rows, 4 * triton.next_power_of_2(per_group))
    for cfg in table:
        if cfg[1] <= max(16, triton.next_power_of_2(cols)) and cfg[0] <= max(16, triton.next_power_of_2(rows)):
            return cfg
    return table[-1]


def autotune_enabled(device: torch.device) -> bool:
    """FUSEDRES_AUTOTUNE=1|0; on by default on CUDA, never under the interpreter (tests never tune),
    never under torch.use_deterministic_algorithms(True): the tile configuration changes the
    order of the float sums, and timing picks it per process, so two processes could differ in
    the last bits; the fixed default configuration makes every run bitwise the same."""
    if device.type != "cuda" or triton_interpreted() or torch.are_deterministic_algorithms_enabled():
        return False
    return os.environ.get("FUSEDRES_AUTOTUNE", "1") == "1"


# Why not triton.autotune: its key is a list of kernel arguments and its candidates must share one
# grid and one launch, while here a candidate changes the launch itself (the grid, the grouped
# weight tiles built for its BLOCK_N, the partial-statistics buffers sized by BLOCK_M), the key is
# the conv's geometry and strides, and tuning must be switchable off (FUSEDRES_AUTOTUNE=0, the
# interpreter, deterministic mode) with a fixed default instead.
_tuned: Dict[tuple, tuple] = {}
_tune_lock = threading.Lock()


def _choose(key: tuple, device, candidates: Sequence[tuple], default: tuple, run) -> tuple:
    """The fastest of `candidates` for `key` (timed once per process with do_bench), or `default`."""
    if not autotune_enabled(device):
        return default
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # timing synchronizes the device, which a CUDA graph capture forbids: a key first met
        # while capturing (e.g. a backward captured before any eager step) runs the default
        return _tuned.get(key, default)
    with _tune_lock:  # one thread tunes a key; the others wait and reuse its answer
        hit = _tuned.get(key)
        if hit is None:
            from triton.runtime.errors import OutOfResources
            from triton.testing import do_bench

            best, best_ms = default, float("inf")
            for cfg in candidates:
                try:
                    ms = do_bench(lambda: run(cfg), warmup=5, rep=20)
                except OutOfResources:  # shared memory or registers for this tile size: not a candidate
                    continue
                if ms < best_ms:
                    best, best_ms = cfg, ms
            _tuned[key] = hit = best
        return hit


def tuned_configs() -> Dict[tuple, tuple]:
    """Every configuration chosen so far in this process (for the benchmark notes)."""
    with _tune_lock:
        return dict(_tuned)


# ---------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------
def conv_forward(x, weight, bias, geo: ConvGeometry, *, in_mean=None, in_scale=None, in_shift=None, in_act=0,
                 in_alpha=0.0, residual=None, act=0, alpha=0.0, stats=False, out_format=torch.contiguous_format,
                 out=None):
    """y [N, C_out, P, Q] in x's dtype and `out_format` (or written into `out`, any strides: a
    channel slice of a larger buffer), and, when `stats`, the float partial statistics of y (before
    residual and activation) as (rows [T], sum [T, C_out], m2 [T, C_out]): tile t summarizes rows[t]
    values per channel (views of [T, C_out + 1] buffers whose last column the kernel fills with
    the tile's row count: no host-side tensor op)."""
    N, P, Q, C_out = geo.N, geo.P, geo.Q, geo.C_out
    y = out if out is not None else new_scratch((N, C_out, P, Q), x.dtype, x.device, memory_format=out_format)
    M = N * P * Q
    acc_dtype, upcast, precision = _dot_flags(x.dtype, x.device)
    grouped = geo.groups > 1
    dummy = y
    res = residual if residual is not None else dummy

    dense_w = None if grouped else _dense_weight(weight)

    def launch(cfg, psum, pm2):
        bm, bn, warps, stages = cfg
        bk = _k_block(_span(bn, C_out, geo.cout_g, geo.cin_g, grouped), x.dtype)
        stages = _fit_stages(stages, (bm + bn) * bk * x.element_size())
        w, w_span = cached_grouped_weight_tiles(weight, geo, bn, bk, dgrad=False) if grouped else (dense_w, 0)
        grid = (triton.cdiv(M, bm) * triton.cdiv(C_out, bn),)
        launch_kernel(_conv_fwd_kernel, grid, x.device,
            x, w, y, bias if bias is not None else dummy, res,
            in_mean if in_mean is not None else dummy, in_scale if in_scale is not None else dummy,
            in_shift if in_shift is not None else dummy, psum, pm2,
            *geo.flat, w_span, *_nchw_strides(x), *_nchw_strides(weight if grouped else w), *_nchw_strides(y),
            *_nchw_strides(res),
            *geo.conv_scalars,
            KH=geo.KH, KW=geo.KW, GROUPED=grouped, **_span_constexprs(bn, C_out, geo.cout_g, geo.cin_g, grouped),
            PLAIN_GEMM=geo.is_plain_gemm, PROLOGUE=in_scale is not None,
            PROLOGUE_ACT=int(in_act), PROLOGUE_ALPHA=float(in_alpha),
            HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=int(act), ALPHA=float(alpha), STATS=stats,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, ACC=acc_dtype, UPCAST=upcast, PRECISION=precision,
            num_warps=warps, num_stages=stages)

    def partial_buffers(cfg):
        rows = triton.cdiv(M, cfg[0]) if stats else 1
        return (new_scratch((rows, C_out + 1), stats_dtype(x), x.device),
                new_scratch((rows, C_out + 1), stats_dtype(x), x.device))

    key = ("fwd", geo, x.dtype, tuple(x.stride()), tuple(y.stride()), in_scale is not None, residual is not None,
           stats)
    cfg = _choose(key, x.device, _FWD_CONFIGS, _default_config(M, C_out, _FWD_CONFIGS, geo.cout_g * grouped),
                  lambda c: launch(c, *partial_buffers(c)))
    psum, pm2 = partial_buffers(cfg)
    launch(cfg, psum, pm2)
    if not stats:
        return y, None
    return y, (psum[:, C_out], psum[:, :C_out], pm2[:, :C_out])


def conv_input_grad(grad_y, weight, geo: ConvGeometry, *, x=None, in_mean=None, in_scale=None, in_shift=None,
                    in_act=0, in_alpha=0.0, out_format=torch.contiguous_format, out=None, out_scale=None,
                    reduce_sums=True):
    """dA [N, C_in, H, W] = the gradient of the conv's input. With the forward prologue's BN given
    (x, in_mean, in_scale, in_shift): dU = dA * act'(U) instead, with float per-channel sums
    sum(dU) and sum(dU * (x - mean)). With `out` (any strides) and `out_scale` [C_in]:
    out += out_scale * dU in place, and out is returned. reduce_sums=False: the sums as [T, C_in]
    per-tile rows, left for BatchNorm's backward bookkeeping kernel to add up (one launch fewer)."""
    N, C_in, H, W = geo.N, geo.C_in, geo.H, geo.W
    accumulate = out is not None
    dx = out if accumulate else new_scratch((N, C_in, H, W), grad_y.dtype, grad_y.device, memory_format=out_format)
    acc_dtype, upcast, precision = _dot_flags(grad_y.dtype, grad_y.device)
    grouped = geo.groups > 1
    sh, sw = geo.stride
    phases = sh * sw
    rows_per_phase = N * triton.cdiv(H, sh) * triton.cdiv(W, sw)
    epilogue = in_scale is not None
    xs = x if epilogue else dx
    acc = stats_dtype(grad_y)

    if grouped:
        dense_w = None
    elif precision == "tf32":
        # tf32 wgmma reads both operands from shared memory K-major, and the input gradient's K is
        # the output channel: with channels_last weights (C_in contiguous) every weight copy was
        # 4 bytes wide (sm_90: 48 of 60 cp.async per step); C_out-contiguous ones copy 16 bytes
        dense_w = cached_weight_form(weight, "k-major dgrad", lambda: _k_major_dgrad_weight(weight))
    else:
        dense_w = _dense_weight(weight)

    def launch(cfg, part, target):
        bm, bn, warps, stages = cfg
        bk = _k_block(_span(bn, C_in, geo.cin_g, geo.cout_g, grouped), grad_y.dtype)
        stages = _fit_stages(stages, (bm + bn) * bk * grad_y.element_size())
        w, w_span = cached_grouped_weight_tiles(weight, geo, bn, bk, dgrad=True) if grouped else (dense_w, 0)
        num_m = triton.cdiv(rows_per_phase, bm)
        launch_kernel(_conv_dgrad_kernel, (num_m * triton.cdiv(C_in, bn), phases), grad_y.device,
            grad_y, w, target, xs, in_mean if epilogue else target, in_scale if epilogue else target,
            in_shift if epilogue else target, part, out_scale if accumulate else target,
            *geo.flat, w_span, *_nchw_strides(grad_y), *_nchw_strides(weight if grouped else w),
            *_nchw_strides(target), *_nchw_strides(xs),
            *geo.conv_scalars, num_m, num_m * phases,
            KH=geo.KH, KW=geo.KW, GROUPED=grouped, **_span_constexprs(bn, C_in, geo.cin_g, geo.cout_g, grouped),
            EPILOGUE_BN=epilogue, ACCUMULATE=accumulate, EPILOGUE_ACT=int(in_act), EPILOGUE_ALPHA=float(in_alpha),
            TAP_CHECK=any(s > 1 and d > 1 for s, d in zip(geo.stride, geo.dilation)),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ACC=acc_dtype, UPCAST=upcast, PRECISION=precision,
            num_warps=warps, num_stages=stages)

    def part_buffer(cfg):
        rows = triton.cdiv(rows_per_phase, cfg[0]) * phases if epilogue else 1
        return new_scratch((2, rows, C_in), acc, grad_y.device)

    def tuning_target():
        # candidates are timed on a scratch copy of the strides: an accumulating launch run more
        # than once would add its result more than once
        return torch.empty_strided(dx.shape, dx.stride(), dtype=dx.dtype, device=dx.device) if accumulate else dx

    # Tiles of at most 128x64 values where the epilogue is heavy (sm_90, 128x128 on 8 warps):
    # - accumulating (a dense block's float32 gradient buffer read, added to, written): 254
    #   registers and 88 bytes spilled (bf16, triton 3.9);
    # - the BN epilogue of a strided conv (the phase's index arithmetic on top): 255 registers and
    #   16-24 bytes spilled with triton 3.6 (bf16 and tf32; 214 registers with 3.9).
    # At 128x64: 128-185 registers, no spill.
    heavy_epilogue = accumulate or (epilogue and phases > 1)
    configs = [c for c in _FWD_CONFIGS if c[0] * c[1] <= 128 * 64] if heavy_epilogue else _FWD_CONFIGS
    key = ("dgrad", geo, grad_y.dtype, tuple(grad_y.stride()), tuple(dx.stride()), tuple(xs.stride()), epilogue,
           accumulate)
    cfg = _choose(key, grad_y.device, configs,
                  _default_config(rows_per_phase, C_in, configs, geo.cin_g * grouped),
                  lambda c: launch(c, part_buffer(c), tuning_target()))
    part = part_buffer(cfg)
    launch(cfg, part, dx)
    if not epilogue:
        return dx, None, None
    if not reduce_sums:
        return dx, part[0], part[1]
    sums = part.sum(1)
    return dx, sums[0], sums[1]


def conv_weight_grad(grad_y, x, geo: ConvGeometry, *, in_mean=None, in_scale=None, in_shift=None, in_act=0,
                     in_alpha=0.0):
    """dW [C_out, C_in/groups, KH, KW] as float32 (float64 for float64), from the conv's output
    gradient and its pre-prologue input x (the prologue is recomputed)."""
    M = geo.N * geo.P * geo.Q
    acc_dtype, upcast, precision = _dot_flags(x.dtype, x.device)
    acc = stats_dtype(x)
    grouped = geo.groups > 1
    taps = geo.KH * geo.KW
    prologue = in_scale is not None
    target_programs = 4 * max(2, common.sm_count(x.device))

    def plan(cfg):
        bo, bc, _, stages = cfg
        num_c = triton.cdiv(_span(bo, geo.C_out, geo.cout_g, geo.cin_g, grouped), bc)
        tiles = triton.cdiv(geo.C_out, bo) * num_c * taps
        bm = 16 if triton_interpreted() else _wgrad_pixel_step(stages, bo + bc, x.element_size(), bc, cfg[2],
                                                               prologue)
        # split the pixel reduction until the device has ~4 programs per SM, keeping >= 8 steps each
        splits = max(1, min(triton.cdiv(target_programs, tiles), M // (8 * bm)))
        m_per_split = triton.cdiv(triton.cdiv(M, splits), bm) * bm
        splits = triton.cdiv(M, m_per_split)
        return num_c, tiles // taps, bm, splits, m_per_split

    def launch(cfg, ws):
        bo, bc, warps, stages = cfg
        num_c, tiles, bm, splits, m_per_split = plan(cfg)
        stages = _fit_stages(stages, bm * (bo + bc) * x.element_size())
        launch_kernel(_conv_wgrad_kernel, (tiles, taps, splits), x.device,
            grad_y, x, ws, in_mean if prologue else ws, in_scale if prologue else ws, in_shift if prologue else ws,
            *geo.flat, *_nchw_strides(grad_y), *_nchw_strides(x), *geo.conv_scalars, m_per_split, num_c,
            KH=geo.KH, KW=geo.KW, GROUPED=grouped, **_span_constexprs(bo, geo.C_out, geo.cout_g, geo.cin_g, grouped),
            PROLOGUE=prologue, PROLOGUE_ACT=int(in_act), PROLOGUE_ALPHA=float(in_alpha),
            BLOCK_O=bo, BLOCK_C=bc, BLOCK_M=bm, ACC=acc_dtype, UPCAST=upcast, PRECISION=precision,
            num_warps=warps, num_stages=stages)

    def workspace(cfg):
        return new_scratch((plan(cfg)[3], geo.C_out, taps, geo.cin_g), acc, x.device)

    key = ("wgrad", geo, x.dtype, tuple(x.stride()), tuple(grad_y.stride()), prologue)
    cfg = _choose(key, x.device, _WGRAD_CONFIGS,
                  _default_config(geo.C_out, geo.C_in, _WGRAD_CONFIGS, geo.cout_g * grouped, group_rows=True),
                  lambda c: launch(c, workspace(c)))
    ws = workspace(cfg)
    launch(cfg, ws)
    dw = ws.sum(0) if ws.shape[0] > 1 else ws[0]
    return dw.view(geo.C_out, geo.KH, geo.KW, geo.cin_g).permute(0, 3, 1, 2)
