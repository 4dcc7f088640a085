"""Label bookkeeping and the pair values, shared by the Python layer and every backend."""
from typing import Optional, Tuple

import torch

# What the engine folds for a pair (query i, reference j), as computed on the rows a backend is given (normalised or
# not): a similarity, larger for closer pairs, so every loss reads all three the same way.
#   SIMILARITY         s_ij = x_i . y_j                       (PML's CosineSimilarity, DotProductSimilarity)
#   SQUARED_EUCLIDEAN  -||x_i - y_j||^2                       (PML's LpDistance(power=2) with the sign flipped)
#   EUCLIDEAN          -||x_i - y_j||                         (PML's LpDistance())
# The distances are formed from the dot product and the row norms, q = |x_i|^2 + |y_j|^2 - 2 x_i . y_j clamped at 0,
# as torch.cdist does for all but the smallest inputs; the gradient of ||x_i - y_j|| is 0 where it is 0.
SIMILARITY, SQUARED_EUCLIDEAN, EUCLIDEAN = 0, 1, 2
PAIR_VALUES = {"similarity": SIMILARITY, "squared_euclidean": SQUARED_EUCLIDEAN, "euclidean": EUCLIDEAN}


def pair_counts(x_labels: torch.Tensor, y_labels: torch.Tensor,
                self_offset: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per query, the number of positive and of negative references, in O((N + M) log M) without an N x M mask."""
    sorted_labels = torch.sort(y_labels).values
    same = (torch.searchsorted(sorted_labels, x_labels, right=True)
            - torch.searchsorted(sorted_labels, x_labels, right=False))
    different = y_labels.shape[0] - same
    if self_offset is not None:
        self_same = (y_labels[self_offset:self_offset + x_labels.shape[0]] == x_labels).long()
        same = same - self_same
        different = different - (1 - self_same)
    return same, different


def _label_ranges(x_labels: torch.Tensor, y_labels: torch.Tensor):
    """(sorted reference labels, order, start, count): the references sorted stably by label (order[k] is the k-th's
    index), and for each query where its label's references start in that order and how many there are."""
    sorted_labels, order = torch.sort(y_labels, stable=True)
    start = torch.searchsorted(sorted_labels, x_labels, right=False)
    count = torch.searchsorted(sorted_labels, x_labels, right=True) - start
    return sorted_labels, order, start, count


def positive_slots(x_labels: torch.Tensor, y_labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(slots [N], rank [M]) of the all-triplets losses' positive table: rank[j] numbers reference j among the
    references with its label (in index order), slots[i] counts the references with query i's label (its own
    reference among them where self_offset says so), so that query i's positives fill slots rank[j] < slots[i] of its
    row of a table max(slots) wide. O((N + M) log M), no N x M mask, no host sync."""
    sorted_labels, order, _, slots = _label_ranges(x_labels, y_labels)
    group_start = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=order.device) - group_start
    return slots, rank


def positive_pairs(x_labels: torch.Tensor, y_labels: torch.Tensor,
                   self_offset: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(anchors, positives): every positive pair (query i, reference j with its label, j != i + self_offset), in the
    order torch.where lists PML's match matrix (by query, then reference index). O((N + M) log M + P) without an
    N x M mask; P, the pairs' count, is read back to size the result."""
    _, order, start, count = _label_ranges(x_labels, y_labels)
    anchors = torch.repeat_interleave(torch.arange(x_labels.shape[0], device=x_labels.device), count)
    first = torch.cumsum(count, 0) - count  # each query's first pair
    within = torch.arange(anchors.shape[0], device=anchors.device) - first[anchors]
    positives = order[start[anchors] + within]
    if self_offset is not None:
        keep = positives != anchors + self_offset
        anchors, positives = anchors[keep], positives[keep]
    return anchors, positives
