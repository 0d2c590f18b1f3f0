"""Tile addressing shared by the Triton per-channel reduction kernels.

The activation is a dense [outer, C, inner] array (see fusedres/common.py). A program owns
BLOCK_C channels and a split of the outer rows [o_begin, o_end) and walks it in tiles of
[BLOCK_R, BLOCK_C] values:
  channels_last (inner == 1): BLOCK_R consecutive rows, contiguous along C;
  NCHW (inner > 1):           BLOCK_R consecutive positions of one plane per channel, contiguous
                              along the plane, so loads stay coalesced without a per-element
                              division by H*W.
"""
import triton
import triton.language as tl

from .. import common


@triton.jit
def tile_count(o_begin, o_end, inner, BLOCK_R: tl.constexpr, INNER_IS_ONE: tl.constexpr):
    """Number of tiles in the split."""
    if INNER_IS_ONE:
        return tl.cdiv(o_end - o_begin, BLOCK_R)
    else:
        return (o_end - o_begin) * tl.cdiv(inner, BLOCK_R)


@triton.jit
def tile_offsets(t, o_begin, o_end, C, inner, cols, cmask, BLOCK_R: tl.constexpr, INNER_IS_ONE: tl.constexpr):
    """(offsets [BLOCK_R, BLOCK_C] int64, mask, row mask [BLOCK_R]) of tile t of the split."""
    r = tl.arange(0, BLOCK_R)
    if INNER_IS_ONE:
        rows = o_begin + t * BLOCK_R + r
        rmask = rows < o_end
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    else:
        k_tiles = tl.cdiv(inner, BLOCK_R)
        o = o_begin + t // k_tiles
        k = (t % k_tiles) * BLOCK_R + r
        rmask = k < inner
        offs = (o.to(tl.int64) * C + cols[None, :]) * inner + k[:, None]
    return offs, rmask[:, None] & cmask[None, :], rmask


def tl_acc(dtype):
    """The accumulation type of a kernel over `dtype` values: float64 for float64, else float32."""
    import torch

    return tl.float64 if dtype == torch.float64 else tl.float32


def reduce_launch_shape(outer: int, channels: int, inner: int, device) -> tuple:
    """(BLOCK_C, BLOCK_R, outer_per_split, splits) for a per-channel reduction.

    About 4 programs per multiprocessor keep every SM streaming (132 SMs on H100); each split keeps
    at least 8 tiles so the per-program merge and partial write stay small against the reads.
    """
    if inner == 1:
        block_c = min(64, triton.next_power_of_2(channels))
        block_r = max(16, 4096 // block_c)
        tiles_per_outer = 1 / block_r
    else:
        block_c = min(8, triton.next_power_of_2(channels))
        block_r = min(512, max(16, triton.next_power_of_2(inner)))
        tiles_per_outer = triton.cdiv(inner, block_r)
    c_blocks = triton.cdiv(channels, block_c)
    target_programs = max(2, 4 * common.sm_count(device))  # the interpreter (CPU): 2 large programs
    splits = max(1, min(triton.cdiv(target_programs, c_blocks), int(outer * tiles_per_outer) // 8, outer))
    outer_per_split = triton.cdiv(outer, splits)
    splits = triton.cdiv(outer, outer_per_split)
    return block_c, block_r, outer_per_split, splits
