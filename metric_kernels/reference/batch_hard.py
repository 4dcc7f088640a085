"""Batch-hard triplet loss (Hermans et al. 2017), as PML's BatchHardMiner + TripletMarginLoss computes it."""
import torch
import torch.nn.functional as F

from ._masks import pair_masks


def batch_hard_rows(x, y, x_labels, y_labels, self_offset, *, margin, soft, deterministic=False):
    positive, negative = pair_masks(x_labels, y_labels, self_offset)
    with torch.no_grad():  # the full matrix only chooses the pairs; the chosen distances are recomputed below
        # Direct differences, not |x|^2 + |y|^2 - 2 x.y: that form loses all precision for close pairs, which are
        # exactly the hardest negatives.
        distances = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
        hardest_positive = distances.masked_fill(~positive, float("-inf")).argmax(dim=1)
        hardest_negative = distances.masked_fill(~negative, float("inf")).argmin(dim=1)
    # Recomputing ||x_i - y_j|| for the chosen pairs keeps backward O(N D) and gives gradient 0 at distance 0.
    positive_distance = torch.linalg.vector_norm(x - y[hardest_positive], dim=1)
    negative_distance = torch.linalg.vector_norm(x - y[hardest_negative], dim=1)
    violation = positive_distance - negative_distance + margin
    losses = F.softplus(violation) if soft else torch.relu(violation)
    valid = positive.any(dim=1) & negative.any(dim=1)
    return torch.where(valid, losses, torch.zeros_like(losses))
