"""metric_kernels: fused deep-metric-learning losses for PyTorch.

Circle, SupCon, Multi-Similarity, NT-Xent, Contrastive, batch-hard triplet and Proxy-Anchor with pytorch-metric-learning's semantics, computed by a choice of
backends ("reference" pure PyTorch; fused "triton", "cuda" and "cpu" kernels where built). See README.md and docs/.
"""
from ._version import __version__
from .backends import BackendUnavailableError, available_backends
from .functional import (batch_hard_triplet_loss, circle_loss, contrastive_loss, multi_similarity_loss, multiview,
                         ntxent_loss, proxy_anchor_loss, supcon_loss)
from .modules import (BatchHardTripletLoss, CircleLoss, ContrastiveLoss, MultiSimilarityLoss, NTXentLoss,
                      ProxyAnchorLoss, SupConLoss)
from .distributed import DistributedLoss
from .cross_batch_memory import CrossBatchMemory

__all__ = [
    "BackendUnavailableError",
    "BatchHardTripletLoss",
    "CircleLoss",
    "ContrastiveLoss",
    "CrossBatchMemory",
    "DistributedLoss",
    "MultiSimilarityLoss",
    "NTXentLoss",
    "ProxyAnchorLoss",
    "SupConLoss",
    "available_backends",
    "batch_hard_triplet_loss",
    "circle_loss",
    "contrastive_loss",
    "multi_similarity_loss",
    "multiview",
    "ntxent_loss",
    "proxy_anchor_loss",
    "supcon_loss",
    "__version__",
]
