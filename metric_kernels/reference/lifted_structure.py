"""The generalized lifted structure loss (Hermans et al. 2017, "In Defense of the Triplet Loss", eq. 4), per query, as
pytorch-metric-learning's GeneralizedLiftedStructureLoss computes it.

With d_ij a distance (PML's default, the Euclidean distance of normalised rows), per query i

    L_i = relu(log sum over positives j of exp(d_ij - pos_margin) + log sum over negatives k of exp(neg_margin - d_ik))

a side without pairs contributing 0 (PML's logsumexp of an empty mask); with a similarity s the terms are
exp(pos_margin - s_ij) and exp(s_ik - neg_margin). On the pair value v (metric_kernels/_pairs.py: s, or -d) both are
exp(a - v_ij) and exp(v_ik - b), with a = pos_margin and b = neg_margin for a similarity and both negated for a
distance: the Python layer passes them so (functional._engine_shift), as for Multi-Similarity's base.
"""
import torch

from .._pairs import SIMILARITY
from ._masks import masked_logsumexp, pair_masks, pair_values


def generalized_lifted_structure_rows(x, y, x_labels, y_labels, self_offset, *, pos_margin, neg_margin,
                                      deterministic=False, pair_value=SIMILARITY):
    v = pair_values(x, y, pair_value)
    positive, negative = pair_masks(x_labels, y_labels, self_offset)
    return torch.relu(masked_logsumexp(pos_margin - v, positive) + masked_logsumexp(v - neg_margin, negative))
