"""Triplet margin loss over every triplet, per query, as pytorch-metric-learning's TripletMarginLoss computes it
without a miner (triplets_per_anchor="all").

PML forms every triplet (a, p, n) with p a positive and n a negative of anchor a, and its loss
relu(d_ap - d_an + margin) on its distance d (default: the Euclidean distance of L2-normalised rows), softplus of the
same with smooth_loss; with a similarity s (CosineSimilarity) the violation is s_an - s_ap + margin. On the pair value
v (metric_kernels/_pairs.py, -d for a distance) both read v_an - v_ap + margin.

A row of the fused contract is, per query, the sum of its triplets' losses and how many of them are nonzero
(AvgNonZeroReducer averages over those). The triplets are formed a block of queries at a time (B x M x M entries),
and each block's are formed again in its backward (_TripletBlock), so that autograd keeps O(N M), not the N x M x M
triplets.
"""
import torch
import torch.nn.functional as F

from .._pairs import SIMILARITY
from ._masks import pair_masks, pair_values

_TRIPLETS_PER_BLOCK = 1 << 22


def _block_violations(v, positive, negative, margin: float):
    """(violations, triplets) of a block of queries' rows of pair values: [anchor, positive, negative]."""
    return v[:, None, :] - v[:, :, None] + margin, positive[:, :, None] & negative[:, None, :]


class _TripletBlock(torch.autograd.Function):
    """(sum of each query's triplet losses, how many are nonzero) of a block of queries. Its backward forms the
    block's triplets again (rather than autograd keeping them) and takes the hinge's or the softplus's slope s of each:
    dL/dv_aj = sum over a's positives p of s(a, p, j) (j a negative) - sum over a's negatives n of s(a, j, n) (j a
    positive)."""

    @staticmethod
    def forward(ctx, v, positive, negative, margin, smooth):
        ctx.save_for_backward(v, positive, negative)
        ctx.margin, ctx.smooth = margin, smooth
        violations, triplets = _block_violations(v, positive, negative, margin)
        losses = F.softplus(violations) if smooth else torch.relu(violations)
        losses = torch.where(triplets, losses, torch.zeros((), dtype=v.dtype, device=v.device))
        nonzero = (losses > 0).sum(dim=(1, 2))
        ctx.mark_non_differentiable(nonzero)
        return losses.sum(dim=(1, 2)), nonzero

    @staticmethod
    def backward(ctx, grad_sums, grad_nonzero):
        v, positive, negative = ctx.saved_tensors
        violations, triplets = _block_violations(v, positive, negative, ctx.margin)
        if ctx.smooth:  # torch's softplus: linear above its threshold of 20
            slopes = torch.where(violations > 20, torch.ones_like(violations), torch.sigmoid(violations))
        else:
            slopes = (violations > 0).to(v.dtype)  # torch.relu's: 0 at 0 and at NaN
        slopes = torch.where(triplets, slopes, torch.zeros((), dtype=v.dtype, device=v.device))
        return grad_sums[:, None] * (slopes.sum(dim=1) - slopes.sum(dim=2)), None, None, None, None


def triplet_margin_rows(x, y, x_labels, y_labels, self_offset, *, margin, smooth, deterministic=False,
                        pair_value=SIMILARITY):
    """(sum of the query's triplet losses, how many are nonzero), one entry per query."""
    values = pair_values(x, y, pair_value)
    positive, negative = pair_masks(x_labels, y_labels, self_offset)
    block = max(1, _TRIPLETS_PER_BLOCK // max(values.shape[1] ** 2, 1))
    # written into buffers made before the blocks: small results kept between the blocks' large temporaries
    # fragmented the allocator's heap (4.5 GB resident at N = M = 1024 where a block takes 100 MB)
    sums = values.new_zeros(values.shape[0])
    nonzero = torch.zeros(values.shape[0], dtype=torch.long, device=values.device)
    for start in range(0, values.shape[0], block):
        rows = slice(start, start + block)
        sums[rows], nonzero[rows] = _TripletBlock.apply(values[rows], positive[rows], negative[rows], margin, smooth)
    return sums, nonzero
