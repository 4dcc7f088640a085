"""Contrastive loss (Hadsell et al. 2006), per query, as pytorch-metric-learning's ContrastiveLoss computes it.

PML has one loss per positive pair, relu(d_ij - pos_margin), and one per negative pair, relu(neg_margin - d_ik), on its
distance d (default: the Euclidean distance of L2-normalised rows); with a similarity s (CosineSimilarity) they are
relu(pos_margin - s_ij) and relu(s_ik - neg_margin). On the pair value v (metric_kernels/_pairs.py, -d for a
distance) both read relu(a - v) over positives and relu(v - b) over negatives, with (a, b) the margins for a
similarity and the negated margins for a distance (the Python layer passes them so).

A row of the fused contract is, per query, the sum of its positive pairs' losses, the sum of its negative pairs'
losses, and how many of each are nonzero (AvgNonZeroReducer averages each side over those).
"""
import torch

from .._pairs import SIMILARITY
from ._masks import pair_masks, pair_values


def contrastive_rows(x, y, x_labels, y_labels, self_offset, *, pos_margin, neg_margin, deterministic=False,
                     pair_value=SIMILARITY):
    """(positive sums, negative sums, nonzero positive pairs, nonzero negative pairs), one entry per query."""
    values = pair_values(x, y, pair_value)
    positive, negative = pair_masks(x_labels, y_labels, self_offset)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    positive_losses = torch.where(positive, torch.relu(pos_margin - values), zero)
    negative_losses = torch.where(negative, torch.relu(values - neg_margin), zero)
    return (positive_losses.sum(dim=1), negative_losses.sum(dim=1), (positive_losses > 0).sum(dim=1),
            (negative_losses > 0).sum(dim=1))
