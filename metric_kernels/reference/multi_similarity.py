"""Multi-Similarity loss (Wang et al. 2019), per query, as pytorch-metric-learning computes it (without its miner).

With s_ij the pair value (metric_kernels/_pairs.py) and the shift `base`:

    L_i = (1 / alpha) log(1 + sum over positives of exp(-alpha (s_ij - base)))
        + (1 / beta)  log(1 + sum over negatives of exp( beta (s_ij - base)))

an empty side contributing 0. With a distance d PML's terms are these on s = -d with the shift negated, which the
Python layer passes (as for Proxy-Anchor).
"""
import torch

from .._pairs import SIMILARITY
from ._masks import pair_masks, pair_values


def _log_one_plus_sum_exp(values, mask):
    """log(1 + sum over the masked entries of exp), computed as PML's logsumexp with an added 0 (so that rows PML
    rounds to exactly 0 are 0 here too: AvgNonZeroReducer counts the rows that are not); 0 for an empty mask."""
    filled = values.masked_fill(~mask, torch.finfo(values.dtype).min)
    with_one = torch.cat([filled, torch.zeros_like(filled[:, :1])], dim=1)
    return torch.logsumexp(with_one, dim=1).masked_fill(~mask.any(dim=1), 0)


def multi_similarity_rows(x, y, x_labels, y_labels, self_offset, *, alpha, beta, base, deterministic=False,
                          pair_value=SIMILARITY):
    s = pair_values(x, y, pair_value)
    positive, negative = pair_masks(x_labels, y_labels, self_offset)
    positive_part = _log_one_plus_sum_exp(-alpha * (s - base), positive) / alpha
    negative_part = _log_one_plus_sum_exp(beta * (s - base), negative) / beta
    return positive_part + negative_part
