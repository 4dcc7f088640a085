"""Triton kernel of batch-hard mining: per query, the farthest positive and the nearest negative reference.

The same tiled walk as the log-sum-exp engine (raw rows, 16-bit operands, the whole of D per tile, references split
across programs when the row blocks are few), with a running max / argmax and min / argmin of the squared distance
as its epilogue:

    d_ij^2 = (||x_i|| r_i)^2 + (||y_j|| r_j)^2 - 2 (x_i . y_j) r_i r_j,

with r = 1 / max(||row||, eps) when normalising, else 1.

Only the two indices (and their distances, for the merge of splits) per row leave the chip; the loss and its O(N D)
backward are computed from the chosen pairs (metric_kernels/_row_epilogues.py).
"""
import triton
import triton.language as tl

from ._lse_kernels import _column_range, _dot_tile, _load_rows, _pair_masks, _row_scales


@triton.jit
def batch_hard_select(x_ptr, y_ptr, x_norm_ptr, y_norm_ptr, x_labels_ptr, y_labels_ptr, value_ptr, choice_ptr,
                      N, M, D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset, SPLIT,
                      N_BUCKET, M_BUCKET, ALIGNED,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FULL_D: tl.constexpr,
                      ACC: tl.constexpr, PRECISION: tl.constexpr, NORMALIZE: tl.constexpr):
    """value/choice[split, 0, rows]: farthest positive (squared distance, index); [split, 1, rows]: nearest negative,
    over the references of program_id(1)'s split. -1 (and -inf / +inf) where the split holds none."""
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    x_labels = tl.load(x_labels_ptr + rows, mask=rows < N, other=0)
    x_inverse, x_radial, x_length = _row_scales(x_norm_ptr, rows, N, NORMALIZE)
    x_tile = _load_rows(x_ptr, rows, dims, N, D, stride_xn, stride_xd) if FULL_D else tl.zeros((1, 1), ACC)
    far_positive = tl.full((BLOCK_M,), float("-inf"), ACC)
    far_positive_index = tl.full((BLOCK_M,), -1, tl.int64)
    near_negative = tl.full((BLOCK_M,), float("inf"), ACC)
    near_negative_index = tl.full((BLOCK_M,), -1, tl.int64)
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
        # Within a tile tl.argmax / argmin take the first of equal values; across tiles only a strictly better value
        # replaces the running one, so ties go to the lowest index, as torch.argmax does.
        tile_far, tile_far_at = tl.max(tl.where(positive, squared, float("-inf")), axis=1, return_indices=True)
        better = tile_far > far_positive  # masked entries are -inf and never better
        far_positive = tl.where(better, tile_far, far_positive)
        far_positive_index = tl.where(better, n0 + tile_far_at.to(tl.int64), far_positive_index)
        tile_near, tile_near_at = tl.min(tl.where(negative, squared, float("inf")), axis=1, return_indices=True)
        better = tile_near < near_negative
        near_negative = tl.where(better, tile_near, near_negative)
        near_negative_index = tl.where(better, n0 + tile_near_at.to(tl.int64), near_negative_index)
    offset = split.to(tl.int64) * 2 * N + rows
    tl.store(value_ptr + offset, far_positive, mask=rows < N)
    tl.store(value_ptr + offset + N, near_negative, mask=rows < N)
    tl.store(choice_ptr + offset, far_positive_index, mask=rows < N)
    tl.store(choice_ptr + offset + N, near_negative_index, mask=rows < N)
