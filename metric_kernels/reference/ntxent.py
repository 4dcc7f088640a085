"""NT-Xent (Sohn 2016's N-pair / SimCLR's normalised-temperature cross entropy), per query, as pytorch-metric-learning
computes it.

PML's NTXentLoss has one loss per positive pair (i, p): with A_i the logsumexp of s_ik / t over i's negatives k,

    l_ip = -log(exp(s_ip / t) / (exp(s_ip / t) + sum_k exp(s_ik / t))) = log(1 + exp(A_i - s_ip / t)),

0 when i has no negative. A row of the fused contract is the sum of its query's pair losses plus, for the reductions
over pairs, how many of them PML counts as nonzero: PML's ratio exp(s_ip / t) / (...) rounds to exactly 1 (its loss
to exactly 0) when 1 + exp(A_i - s_ip / t) rounds to 1 in the loss's dtype, and AvgNonZeroReducer leaves those pairs
out. With a distance d PML uses -d / t: the pair value (metric_kernels/_pairs.py) is -d already.

PML's TupletMarginLoss is the same per positive pair with 1 / t = scale and the positive's cosine s_ip replaced by
cos(acos(s_ip) - margin) (angular_margin, in radians): log(1 + sum_k exp(scale (s_ik - cos(acos(s_ip) - margin)))),
rounded to 0 by PML's logsumexp where 1 + exp(x) rounds to 1, as above. Computed as s cos(margin) +
sqrt(1 - s^2) sin(margin): where 1 - s^2 <= 0 (a parallel pair, or |s| just above 1 by rounding) the angle is 0 or pi
and its term and gradient are 0, as torch.cdist's gradient at distance 0, where PML's acos gives NaN.
"""
import math

import torch

from .._pairs import SIMILARITY
from ._masks import pair_masks, pair_values


def ntxent_rows(x, y, x_labels, y_labels, self_offset, *, temperature, angular_margin=0.0, deterministic=False,
                pair_value=SIMILARITY):
    """(sum over each query's positives of its pair losses, how many of them are nonzero as PML rounds them)."""
    values = pair_values(x, y, pair_value)
    logits = values / temperature
    positive, negative = pair_masks(x_labels, y_labels, self_offset)
    lowest = torch.finfo(logits.dtype).min
    negatives_lse = torch.logsumexp(logits.masked_fill(~negative, lowest), dim=1, keepdim=True)
    has_negative = negative.any(dim=1, keepdim=True)
    if angular_margin != 0:
        sine2 = (1 - values) * (1 + values)
        inside = sine2 > 0
        sine = torch.where(inside, torch.sqrt(torch.where(inside, sine2, torch.ones_like(sine2))), 0)
        margined = values * math.cos(angular_margin) + sine * math.sin(angular_margin)
        logits = torch.where(positive, margined / temperature, logits)
    excess = negatives_lse - logits  # A_i - s_ip / t
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    counted = positive & has_negative
    pair_losses = torch.where(counted, torch.logaddexp(excess, zero), zero)
    nonzero = counted & (1 + torch.exp(excess.detach()) > 1)
    return pair_losses.sum(dim=1), nonzero.sum(dim=1)
