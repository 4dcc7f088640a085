"""NCA (Goldberger et al. 2004) and ProxyNCA (Movshovitz-Attias et al. 2017): the two log-sum-exps of a query's row.

With v_ij the pair value (metric_kernels/_pairs.py: the dot product, or minus the squared or plain Euclidean distance)
and s = softmax_scale, per query i

    lse_positive_i = log sum over positives j of exp(s v_ij)        (-inf without a positive)
    lse_negative_i = log sum over negatives k of exp(s v_ik)        (-inf without a negative)

PML's per-query loss, -log(sum over positives of softmax_j(s v_i.)), is lse_all_i - lse_positive_i with lse_all_i the
log-sum-exp of the two; the Python layer (metric_kernels/_row_epilogues.py, nca_from_stats) finishes it, so that every
backend leaves out the queries PML leaves out in the same way.
"""
import torch

from .._pairs import SIMILARITY
from ._masks import pair_masks, pair_values


def _logsumexp_or_minus_infinity(values, mask):
    """logsumexp over the masked entries of each row, -inf for a row without any. The empty rows go through the
    dtype's lowest finite value first, so that their (unused) gradient is 0 rather than NaN."""
    filled = values.masked_fill(~mask, torch.finfo(values.dtype).min)
    return torch.logsumexp(filled, dim=1).masked_fill(~mask.any(dim=1), float("-inf"))


def nca_rows(x, y, x_labels, y_labels, self_offset, *, softmax_scale, deterministic=False, pair_value=SIMILARITY):
    logits = softmax_scale * pair_values(x, y, pair_value)
    positive, negative = pair_masks(x_labels, y_labels, self_offset)
    return _logsumexp_or_minus_infinity(logits, positive), _logsumexp_or_minus_infinity(logits, negative)
