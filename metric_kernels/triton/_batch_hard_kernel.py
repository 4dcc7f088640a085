"""Triton kernel of batch-hard mining: per query, the farthest positive and the nearest negative reference.

The same tiled walk as the log-sum-exp engine (raw rows, 16-bit operands, the whole of D per tile, references split
across programs when the row blocks are few), with a running max / argmax and min / argmin of the squared distance
as its epilogue:

    d_ij^2 = (||x_i|| r_i)^2 + (||y_j|| r_j)^2 - 2 (x_i . y_j) r_i r_j,

with r = 1 / max(||row||, eps) when normalising, else 1.

Only the two indices (and their distances, for the merge of splits) per row leave the chip; the loss and its O(N D)
backward are computed from the chosen pairs (metric_kernels/_row_epilogues.py). With tf32 products two candidates
whose distances differ by less than tf32's error can swap, so there each side also keeps its runner-up, and the
caller chooses between the two on exact distances (_row_epilogues.hardest_triplet_losses).
"""
import triton
import triton.language as tl

from ._lse_kernels import _column_range, _dot_tile, _load_rows, _pair_masks, _query_block, _row_scales


@triton.jit
def _keep_best_two(best, best_at, second, second_at, tile_best, tile_best_at, tile_second, tile_second_at,
                   LARGER: tl.constexpr, RUNNERS_UP: tl.constexpr):
    """The running best (and, when RUNNERS_UP, second best) of a row with a later tile's own best two folded in.
    The running ones hold lower indices, so only a strictly better value replaces one: ties go to the lowest index,
    as torch.argmax's do; an entry of the tile masked to -inf / +inf is never better."""
    better = tile_best > best if LARGER else tile_best < best
    if RUNNERS_UP:
        # a new best pushes the old one to second place unless the tile's own second beats it; otherwise the
        # tile's best may still take second place
        tile_second_better = tile_second > best if LARGER else tile_second < best
        tile_best_second = tile_best > second if LARGER else tile_best < second
        second_pick = tl.where(better, tl.where(tile_second_better, tile_second, best),
                               tl.where(tile_best_second, tile_best, second))
        second_at = tl.where(better, tl.where(tile_second_better, tile_second_at, best_at),
                             tl.where(tile_best_second, tile_best_at, second_at))
        second = second_pick
    best = tl.where(better, tile_best, best)
    best_at = tl.where(better, tile_best_at, best_at)
    return best, best_at, second, second_at


@triton.jit
def _best_two_of_tile(squared, candidates, n0, BLOCK_N: tl.constexpr, LARGER: tl.constexpr,
                      RUNNERS_UP: tl.constexpr):
    """Per row of a tile, the best of `squared` among `candidates` and its column (the first of equal values) and,
    when RUNNERS_UP, the best of the others. Masks are formed from squared and the tile's own 32-bit columns, so no
    masked copy or 64-bit index tile stays live beside it."""
    worst = float("-inf") if LARGER else float("inf")
    if LARGER:
        best, best_at = tl.max(tl.where(candidates, squared, worst), axis=1, return_indices=True)
    else:
        best, best_at = tl.min(tl.where(candidates, squared, worst), axis=1, return_indices=True)
    second, second_at = best, best_at
    if RUNNERS_UP:
        others = candidates & (tl.arange(0, BLOCK_N)[None, :] != best_at[:, None])
        if LARGER:
            second, second_at = tl.max(tl.where(others, squared, worst), axis=1, return_indices=True)
        else:
            second, second_at = tl.min(tl.where(others, squared, worst), axis=1, return_indices=True)
    return best, n0 + best_at.to(tl.int64), second, n0 + second_at.to(tl.int64)


@triton.jit
def batch_hard_select(x_ptr, y_ptr, x_norm_ptr, y_norm_ptr, x_labels_ptr, y_labels_ptr, value_ptr, choice_ptr,
                      N, M, D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset, SPLIT,
                      N_BUCKET, M_BUCKET, ALIGNED,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FULL_D: tl.constexpr,
                      ACC: tl.constexpr, PRECISION: tl.constexpr, NORMALIZE: tl.constexpr):
    """value/choice[split, 0, rows]: farthest positive (squared distance, index); [split, 1, rows]: nearest negative,
    over the references of program_id(1)'s split. -1 (and -inf / +inf) where the split holds none. With tf32
    products also [split, 2, rows] and [split, 3, rows]: each side's runner-up."""
    RUNNERS_UP: tl.constexpr = PRECISION == "tf32"
    split = tl.program_id(1)
    rows, dims, x_labels, x_inverse, x_radial, x_length, x_tile = _query_block(
        x_ptr, x_norm_ptr, x_labels_ptr, N, D, stride_xn, stride_xd, BLOCK_M, BLOCK_D, FULL_D, ACC, NORMALIZE)
    far_positive = tl.full((BLOCK_M,), float("-inf"), ACC)
    far_positive_index = tl.full((BLOCK_M,), -1, tl.int64)
    near_negative = tl.full((BLOCK_M,), float("inf"), ACC)
    near_negative_index = tl.full((BLOCK_M,), -1, tl.int64)
    second_positive, second_positive_index = far_positive, far_positive_index
    second_negative, second_negative_index = near_negative, near_negative_index
    start, stop = _column_range(split, M, SPLIT, BLOCK_N)
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        y_labels = tl.load(y_labels_ptr + cols, mask=cols < stop, other=0)
        y_inverse, y_radial, y_length = _row_scales(y_norm_ptr, cols, stop, NORMALIZE)
        y_tile = _load_rows(y_ptr, cols, dims, stop, D, stride_yn, stride_yd) if FULL_D else x_tile
        dot = _dot_tile(x_ptr, y_ptr, x_tile, y_tile, rows, cols, N, stop, D, stride_xn, stride_xd, stride_yn,
                        stride_yd, BLOCK_M, BLOCK_N, BLOCK_D, FULL_D, ACC, PRECISION)
        positive, negative = _pair_masks(x_labels, y_labels, rows, cols, N, stop, self_offset)
        squared = x_length[:, None] + y_length[None, :] - 2 * dot * x_inverse[:, None] * y_inverse[None, :]
        tile = _best_two_of_tile(squared, positive, n0, BLOCK_N, True, RUNNERS_UP)
        far_positive, far_positive_index, second_positive, second_positive_index = _keep_best_two(
            far_positive, far_positive_index, second_positive, second_positive_index, *tile, True, RUNNERS_UP)
        tile = _best_two_of_tile(squared, negative, n0, BLOCK_N, False, RUNNERS_UP)
        near_negative, near_negative_index, second_negative, second_negative_index = _keep_best_two(
            near_negative, near_negative_index, second_negative, second_negative_index, *tile, False, RUNNERS_UP)
    sides = 4 if RUNNERS_UP else 2
    offset = split.to(tl.int64) * sides * N + rows
    tl.store(value_ptr + offset, far_positive, mask=rows < N)
    tl.store(value_ptr + offset + N, near_negative, mask=rows < N)
    tl.store(choice_ptr + offset, far_positive_index, mask=rows < N)
    tl.store(choice_ptr + offset + N, near_negative_index, mask=rows < N)
    if RUNNERS_UP:
        tl.store(value_ptr + offset + 2 * N, second_positive, mask=rows < N)
        tl.store(value_ptr + offset + 3 * N, second_negative, mask=rows < N)
        tl.store(choice_ptr + offset + 2 * N, second_positive_index, mask=rows < N)
        tl.store(choice_ptr + offset + 3 * N, second_negative_index, mask=rows < N)
