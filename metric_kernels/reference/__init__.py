"""The pure-PyTorch reference backend: plainly correct, and O(N M) in memory on purpose.

Each loss materialises the full similarity (or distance) matrix and its label masks, so it reads like the formulas in
docs/losses/ and can be checked against pytorch-metric-learning line by line. Every fused backend is tested against it.
"""
from .batch_hard import batch_hard_rows
from .circle import circle_rows
from .contrastive import contrastive_rows
from .lifted_structure import generalized_lifted_structure_rows
from .margin_softmax import margin_softmax_rows
from .multi_similarity import multi_similarity_rows
from .nca import nca_rows
from .ntxent import ntxent_rows
from .proxy_anchor import proxy_anchor_rows
from .supcon import supcon_rows
from .triplet_margin import triplet_margin_rows


PAIR_VALUES = (0, 1, 2)  # the dot product and both Euclidean distances (metric_kernels/_pairs.py)


def unavailable_reason(device):
    return None  # plain torch ops: runs wherever torch does


__all__ = ["PAIR_VALUES", "batch_hard_rows", "circle_rows", "contrastive_rows", "generalized_lifted_structure_rows",
           "margin_softmax_rows",
           "multi_similarity_rows", "nca_rows", "ntxent_rows", "proxy_anchor_rows", "supcon_rows",
           "triplet_margin_rows", "unavailable_reason"]
