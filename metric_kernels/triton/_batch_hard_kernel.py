"""Triton kernel of batch-hard mining: per query, the farthest positive and the nearest negative reference.

The same tiled walk as the log-sum-exp engine, with a running max / argmax and min / argmin of the squared distance
||x_i||^2 + ||y_j||^2 - 2 s_ij as its epilogue. Only the two indices per row leave the chip; the loss and its O(N D)
backward are computed from the chosen pairs (metric_kernels/_row_epilogues.py).
"""
import triton
import triton.language as tl

from ._lse_kernels import _pair_masks, _similarity_tile


@triton.jit
def batch_hard_select(x_ptr, y_ptr, x_sq_ptr, y_sq_ptr, x_labels_ptr, y_labels_ptr, choice_ptr,
                      N, M, D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    x_labels = tl.load(x_labels_ptr + rows, mask=rows < N, other=0)
    x_sq = tl.load(x_sq_ptr + rows, mask=rows < N, other=0.0)
    far_positive = tl.full((BLOCK_M,), float("-inf"), ACC)
    far_positive_index = tl.full((BLOCK_M,), -1, tl.int64)
    near_negative = tl.full((BLOCK_M,), float("inf"), ACC)
    near_negative_index = tl.full((BLOCK_M,), -1, tl.int64)
    for n0 in range(0, M, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        y_labels = tl.load(y_labels_ptr + cols, mask=cols < M, other=0)
        y_sq = tl.load(y_sq_ptr + cols, mask=cols < M, other=0.0)
        s = _similarity_tile(x_ptr, y_ptr, rows, cols, N, M, D, stride_xn, stride_xd, stride_yn, stride_yd,
                             BLOCK_M, BLOCK_N, BLOCK_D, ACC, UPCAST, PRECISION)
        positive, negative = _pair_masks(x_labels, y_labels, rows, cols, N, M, self_offset)
        squared = x_sq[:, None] + y_sq[None, :] - 2 * s
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
    tl.store(choice_ptr + rows, far_positive_index, mask=rows < N)
    tl.store(choice_ptr + N + rows, near_negative_index, mask=rows < N)
