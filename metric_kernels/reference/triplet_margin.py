"""Triplet margin loss over every triplet, per query, as pytorch-metric-learning's TripletMarginLoss computes it
without a miner (triplets_per_anchor="all").

PML forms every triplet (a, p, n) with p a positive and n a negative of anchor a, and its loss
relu(d_ap - d_an + margin) on its distance d (default: the Euclidean distance of L2-normalised rows), softplus of the
same with smooth_loss; with a similarity s (CosineSimilarity) the violation is s_an - s_ap + margin. On the pair value
v (metric_kernels/_pairs.py, -d for a distance) both read v_an - v_ap + margin.

A row of the fused contract is, per query, the sum of its triplets' losses and how many of them are nonzero
(AvgNonZeroReducer averages over those). The triplets are formed a block of queries at a time (B x M x M entries),
never N x M x M at once.
"""
import torch
import torch.nn.functional as F

from .._pairs import SIMILARITY
from ._masks import pair_masks, pair_values

_TRIPLETS_PER_BLOCK = 1 << 22


def triplet_margin_rows(x, y, x_labels, y_labels, self_offset, *, margin, smooth, deterministic=False,
                        pair_value=SIMILARITY):
    """(sum of the query's triplet losses, how many are nonzero), one entry per query."""
    values = pair_values(x, y, pair_value)
    positive, negative = pair_masks(x_labels, y_labels, self_offset)
    block = max(1, _TRIPLETS_PER_BLOCK // max(values.shape[1] ** 2, 1))
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    sums, nonzero = [], []
    for start in range(0, values.shape[0], block):
        v = values[start:start + block]
        triplets = positive[start:start + block, :, None] & negative[start:start + block, None, :]
        violation = v[:, None, :] - v[:, :, None] + margin  # [anchor, positive, negative]
        losses = torch.where(triplets, F.softplus(violation) if smooth else torch.relu(violation), zero)
        sums.append(losses.sum(dim=(1, 2)))
        nonzero.append((losses > 0).sum(dim=(1, 2)))
    return torch.cat(sums), torch.cat(nonzero)
