"""Supervised contrastive loss (Khosla et al. 2020), per query, as pytorch-metric-learning computes it.

The batch-level rule (no positive pair or no negative pair anywhere -> 0) and base_temperature are applied by the
shared Python layer, not here.
"""
import torch

from .._pairs import SIMILARITY
from ._masks import masked_logsumexp, pair_masks, pair_values


def supcon_rows(x, y, x_labels, y_labels, self_offset, *, temperature, deterministic=False, pair_value=SIMILARITY):
    logits = pair_values(x, y, pair_value) / temperature
    # Shifting by the row max (over every column, as PML does) changes nothing mathematically; it keeps the
    # rounding the same as PML's, which matters because mean_nonzero counts the rows that come out exactly 0.
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    positive, negative = pair_masks(x_labels, y_labels, self_offset)
    log_prob = logits - masked_logsumexp(logits, positive | negative)[:, None]
    positive_count = positive.sum(dim=1).clamp(min=1)
    return -(positive * log_prob).sum(dim=1) / positive_count
