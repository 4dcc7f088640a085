"""metric_kernels: fused deep-metric-learning losses for PyTorch.

Circle, SupCon, Multi-Similarity, NT-Xent, tuplet margin, angular, Contrastive, lifted structure, generalized lifted
structure, margin, NCA, batch-hard triplet, triplet margin, Proxy-Anchor, ProxyNCA and the margin-softmax classifiers
(ArcFace, CosFace, SubCenterArcFace, SphereFace, LargeMarginSoftmax, NormalizedSoftmax, SoftTriple) with
pytorch-metric-learning's semantics, computed by a choice of backends ("reference" pure PyTorch; fused "triton",
"cuda" and "cpu" kernels where built). See README.md and docs/.
"""
from ._version import __version__
from .backends import BackendUnavailableError, available_backends
from .functional import (angular_loss, arcface_loss, batch_hard_triplet_loss, circle_loss, contrastive_loss,
                         cosface_loss, generalized_lifted_structure_loss, large_margin_softmax_loss,
                         lifted_structure_loss, margin_loss, multi_similarity_loss, multiview, nca_loss,
                         normalized_softmax_loss, ntxent_loss, proxy_anchor_loss, proxy_nca_loss, soft_triple_loss,
                         sphereface_loss, subcenter_arcface_loss, supcon_loss, triplet_margin_loss,
                         tuplet_margin_loss)
from .modules import (AngularLoss, ArcFaceLoss, BatchHardTripletLoss, CircleLoss, ContrastiveLoss, CosFaceLoss,
                      GeneralizedLiftedStructureLoss, LargeMarginSoftmaxLoss, LiftedStructureLoss, MarginLoss,
                      MultiSimilarityLoss, NCALoss, NormalizedSoftmaxLoss, NTXentLoss, ProxyAnchorLoss, ProxyNCALoss,
                      SoftTripleLoss, SphereFaceLoss, SubCenterArcFaceLoss, SupConLoss, TripletMarginLoss,
                      TupletMarginLoss)
from .distributed import DistributedLoss
from .cross_batch_memory import CrossBatchMemory

__all__ = [
    "AngularLoss",
    "ArcFaceLoss",
    "BackendUnavailableError",
    "BatchHardTripletLoss",
    "CircleLoss",
    "ContrastiveLoss",
    "CosFaceLoss",
    "CrossBatchMemory",
    "DistributedLoss",
    "GeneralizedLiftedStructureLoss",
    "LargeMarginSoftmaxLoss",
    "LiftedStructureLoss",
    "MarginLoss",
    "MultiSimilarityLoss",
    "NCALoss",
    "NTXentLoss",
    "NormalizedSoftmaxLoss",
    "ProxyAnchorLoss",
    "ProxyNCALoss",
    "SoftTripleLoss",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
    "SupConLoss",
    "TripletMarginLoss",
    "TupletMarginLoss",
    "angular_loss",
    "arcface_loss",
    "available_backends",
    "batch_hard_triplet_loss",
    "circle_loss",
    "contrastive_loss",
    "cosface_loss",
    "generalized_lifted_structure_loss",
    "large_margin_softmax_loss",
    "lifted_structure_loss",
    "margin_loss",
    "multi_similarity_loss",
    "multiview",
    "nca_loss",
    "normalized_softmax_loss",
    "ntxent_loss",
    "proxy_anchor_loss",
    "proxy_nca_loss",
    "soft_triple_loss",
    "sphereface_loss",
    "subcenter_arcface_loss",
    "supcon_loss",
    "triplet_margin_loss",
    "tuplet_margin_loss",
    "__version__",
]
