"""Proxy-Anchor loss (Kim et al. 2020) per proxy, as pytorch-metric-learning computes it.

Returns the positive and negative term of every proxy; the shared Python layer divides their sums by |P+| and C.
"""
import torch
import torch.nn.functional as F

from ._masks import log1p_sum_exp


def proxy_anchor_rows(proxies, x, labels, *, margin, alpha, deterministic=False):
    cos = x @ proxies.T  # N x C
    positive = F.one_hot(labels.long(), proxies.shape[0]).bool()
    positive_terms = log1p_sum_exp(-alpha * (cos - margin), positive, dim=0)
    negative_terms = log1p_sum_exp(alpha * (cos + margin), ~positive, dim=0)
    return positive_terms, negative_terms
