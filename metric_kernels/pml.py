"""pytorch-metric-learning's equivalent of each metric_kernels loss, called the way PML's users call it.

Used as the oracle by the parity report and the tests, and as the "pml" provider by the benchmark. Needs
pytorch-metric-learning installed (`pip install pytorch-metric-learning`); importing this module does not.
"""
from __future__ import annotations

import contextlib

import torch


def _pml():
    try:
        import pytorch_metric_learning.losses as losses
        import pytorch_metric_learning.miners as miners
        import pytorch_metric_learning.distances as distances
    except ImportError as error:  # pragma: no cover - exercised only where PML is absent
        raise ImportError("pytorch-metric-learning is not installed: pip install pytorch-metric-learning") from error
    return losses, miners, distances


def is_available() -> bool:
    try:
        _pml()
    except ImportError:
        return False
    return True


def circle_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, m=0.4, gamma=80.0, indices_tuple=None):
    losses, _, _ = _pml()
    return losses.CircleLoss(m=m, gamma=gamma)(embeddings, labels, indices_tuple, ref_emb, ref_labels)


def supcon_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, temperature=0.1, indices_tuple=None):
    losses, _, _ = _pml()
    return losses.SupConLoss(temperature=temperature)(embeddings, labels, indices_tuple, ref_emb, ref_labels)


def multi_similarity_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, alpha=2.0, beta=50.0, base=0.5,
                          indices_tuple=None):
    losses, _, _ = _pml()
    return losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)(embeddings, labels, indices_tuple, ref_emb,
                                                                         ref_labels)


def ntxent_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, temperature=0.07, indices_tuple=None,
                reducer=None):
    losses, _, _ = _pml()
    return losses.NTXentLoss(temperature=temperature, reducer=reducer)(embeddings, labels, indices_tuple, ref_emb,
                                                                       ref_labels)


def tuplet_margin_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, margin=5.73, scale=64.0,
                       indices_tuple=None, reducer=None):
    losses, _, _ = _pml()
    return losses.TupletMarginLoss(margin=margin, scale=scale, reducer=reducer)(embeddings, labels, indices_tuple,
                                                                                ref_emb, ref_labels)


def lifted_structure_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, neg_margin=1.0, pos_margin=0.0,
                          indices_tuple=None, reducer=None, distance=None):
    losses, _, _ = _pml()
    kwargs = {} if distance is None else dict(distance=distance)
    return losses.LiftedStructureLoss(neg_margin=neg_margin, pos_margin=pos_margin, reducer=reducer, **kwargs)(
        embeddings, labels, indices_tuple, ref_emb, ref_labels)


def angular_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, alpha=40.0, indices_tuple=None, reducer=None):
    losses, _, _ = _pml()
    return losses.AngularLoss(alpha=alpha, reducer=reducer)(embeddings, labels, indices_tuple, ref_emb, ref_labels)


def contrastive_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, pos_margin=0.0, neg_margin=1.0,
                     indices_tuple=None, reducer=None):
    losses, _, _ = _pml()
    return losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin, reducer=reducer)(
        embeddings, labels, indices_tuple, ref_emb, ref_labels)


def triplet_margin_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, margin=0.05, smooth_loss=False,
                        indices_tuple=None, distance=None, reducer=None):
    losses, _, _ = _pml()
    kwargs = {} if distance is None else dict(distance=distance)
    return losses.TripletMarginLoss(margin=margin, smooth_loss=smooth_loss, reducer=reducer, **kwargs)(
        embeddings, labels, indices_tuple, ref_emb, ref_labels)


def generalized_lifted_structure_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, neg_margin=1.0,
                                      pos_margin=0.0, indices_tuple=None, distance=None, reducer=None):
    losses, _, _ = _pml()
    kwargs = {} if distance is None else dict(distance=distance)
    return losses.GeneralizedLiftedStructureLoss(neg_margin=neg_margin, pos_margin=pos_margin, reducer=reducer,
                                                 **kwargs)(embeddings, labels, indices_tuple, ref_emb, ref_labels)


def margin_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, margin=0.2, beta=1.2, nu=0.0, indices_tuple=None,
                distance=None, reducer=None):
    """PML's MarginLoss over all triplets, with beta exactly `beta` (PML stores it in a float32 tensor)."""
    losses, _, _ = _pml()
    kwargs = {} if distance is None else dict(distance=distance)
    loss = losses.MarginLoss(margin=margin, nu=nu, beta=beta, reducer=reducer, **kwargs)
    loss.beta = torch.tensor([float(beta)], dtype=torch.float64)
    return loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)


def nca_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, softmax_scale=1.0, distance=None, reducer=None,
             indices_tuple=None):
    losses, _, _ = _pml()
    kwargs = {} if distance is None else dict(distance=distance)
    return losses.NCALoss(softmax_scale=softmax_scale, reducer=reducer, **kwargs)(embeddings, labels, indices_tuple,
                                                                                   ref_emb, ref_labels)


def batch_hard_triplet_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, margin=0.05, soft=False,
                            normalize_embeddings=True):
    """BatchHardMiner + TripletMarginLoss, both on LpDistance(normalize_embeddings), smooth_loss=soft."""
    losses, miners, distances = _pml()
    distance = distances.LpDistance(normalize_embeddings=normalize_embeddings)
    miner = miners.BatchHardMiner(distance=distance)
    loss = losses.TripletMarginLoss(margin=margin, smooth_loss=soft, distance=distance)
    triplets = miner(embeddings, labels, ref_emb, ref_labels)
    return loss(embeddings, labels, triplets, ref_emb, ref_labels)


def proxy_anchor_loss(embeddings, labels, proxies, *, margin=0.1, alpha=32.0):
    """PML's ProxyAnchorLoss with its proxies replaced by `proxies`, so the result is differentiable in them."""
    losses, _, _ = _pml()
    loss = losses.ProxyAnchorLoss(proxies.shape[0], proxies.shape[1], margin=margin, alpha=alpha)
    del loss.proxies  # a plain tensor attribute instead of the module's own Parameter
    loss.proxies = proxies.to(embeddings.dtype)
    return loss(embeddings, labels)


def proxy_nca_loss(embeddings, labels, proxies, *, softmax_scale=1.0, distance=None, reducer=None):
    """PML's ProxyNCALoss with its proxies replaced by `proxies`, so the result is differentiable in them."""
    losses, _, _ = _pml()
    kwargs = {} if distance is None else dict(distance=distance)
    loss = losses.ProxyNCALoss(proxies.shape[0], proxies.shape[1], softmax_scale=softmax_scale, reducer=reducer,
                               **kwargs)
    del loss.proxies  # a plain tensor attribute instead of the module's own Parameter
    loss.proxies = proxies.to(embeddings.dtype)
    return loss(embeddings, labels)


def _classifier(module, weight, classes, embeddings, labels):
    """A PML classifier loss module, built with a 1 x 1 W (so that building it allocates nothing of the case's size),
    given `weight` and its number of classes, so the result is differentiable in the weight."""
    del module.W  # a plain tensor attribute instead of the module's own Parameter
    module.W = weight.to(embeddings.dtype)
    module.num_classes = classes
    return module(embeddings, labels)


def arcface_loss(embeddings, labels, weight, *, margin=28.6, scale=64.0):
    losses, _, _ = _pml()
    return _classifier(losses.ArcFaceLoss(1, 1, margin=margin, scale=scale), weight, weight.shape[1], embeddings,
                       labels)


def cosface_loss(embeddings, labels, weight, *, margin=0.35, scale=64.0):
    losses, _, _ = _pml()
    return _classifier(losses.CosFaceLoss(1, 1, margin=margin, scale=scale), weight, weight.shape[1], embeddings,
                       labels)


def subcenter_arcface_loss(embeddings, labels, weight, *, sub_centers=3, margin=28.6, scale=64.0):
    losses, _, _ = _pml()
    module = losses.SubCenterArcFaceLoss(num_classes=1, embedding_size=1, margin=margin, scale=scale,
                                         sub_centers=sub_centers)
    return _classifier(module, weight, weight.shape[1] // sub_centers, embeddings, labels)


def large_margin_softmax_loss(embeddings, labels, weight, *, margin=4, scale=1.0):
    losses, _, _ = _pml()
    return _classifier(losses.LargeMarginSoftmaxLoss(1, 1, margin=margin, scale=scale), weight, weight.shape[1],
                       embeddings, labels)


def sphereface_loss(embeddings, labels, weight, *, margin=4, scale=1.0):
    losses, _, _ = _pml()
    return _classifier(losses.SphereFaceLoss(1, 1, margin=margin, scale=scale), weight, weight.shape[1], embeddings,
                       labels)


def soft_triple_loss(embeddings, labels, weight, *, centers_per_class=10, la=20.0, gamma=0.1, margin=0.01):
    losses, _, _ = _pml()
    module = losses.SoftTripleLoss(1, 1, centers_per_class=centers_per_class, la=la, gamma=gamma, margin=margin)
    del module.fc  # a plain tensor attribute instead of the module's own Parameter
    module.fc = weight.to(embeddings.dtype)
    module.num_classes = weight.shape[1] // centers_per_class
    return module(embeddings, labels)


def normalized_softmax_loss(embeddings, labels, weight, *, temperature=0.05):
    losses, _, _ = _pml()
    return _classifier(losses.NormalizedSoftmaxLoss(1, 1, temperature=temperature), weight, weight.shape[1],
                       embeddings, labels)


@contextlib.contextmanager
def exact_cdist():
    """Within this block torch.cdist (which PML's LpDistance calls) uses direct differences instead of the
    |x|^2 + |y|^2 - 2 x.y expansion, whose rounding error grows as 1/d^2 for close pairs. PML's batch-hard values and
    gradients then reflect its semantics rather than that rounding, and compare with ours at 1e-10 in float64."""
    original = torch.cdist

    def cdist(x1, x2, p=2.0, compute_mode=None):
        return original(x1, x2, p=p, compute_mode="donot_use_mm_for_euclid_dist")

    torch.cdist = cdist
    try:
        yield
    finally:
        torch.cdist = original
