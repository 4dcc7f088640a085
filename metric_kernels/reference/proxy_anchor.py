"""Proxy-Anchor loss (Kim et al. 2020) per proxy, as pytorch-metric-learning computes it.

Returns the positive and negative term of every proxy; the shared Python layer divides their sums by |P+| and C.
With a distance d (pair_value, metric_kernels/_pairs.py) PML's terms are log(1 + sum exp(alpha (d - margin))) over
the positives and log(1 + sum exp(-alpha (d + margin))) over the negatives: the cosine's formulas on -d with the margin
negated, which the Python layer passes.
"""
import torch
import torch.nn.functional as F

from .._pairs import SIMILARITY
from ._masks import log1p_sum_exp, pair_values


def proxy_anchor_rows(proxies, x, labels, *, margin, alpha, deterministic=False, pair_value=SIMILARITY):
    cos = pair_values(x, proxies, pair_value)  # N x C
    positive = F.one_hot(labels.long(), proxies.shape[0]).bool()
    positive_terms = log1p_sum_exp(-alpha * (cos - margin), positive, dim=0)
    negative_terms = log1p_sum_exp(alpha * (cos + margin), ~positive, dim=0)
    return positive_terms, negative_terms
