"""The margin-softmax classifiers' row statistics (ArcFace, CosFace, SubCenterArcFace, NormalizedSoftmax,
LargeMarginSoftmax, SphereFace, SoftTriple), plainly.

Materialises the N x (C K) cosines of the rows to W's columns (K = sub_centers), takes each class's largest
sub-centre cosine as PML's SubCenterArcFaceLoss does (view(N, C, K).max(2)), and returns per row the log-sum-exp of
scale * cosine over the classes other than the label and the label's cosine. The Python layer
(metric_kernels/functional.py) applies each loss's margin to the label's cosine and finishes the cross-entropy.
normalize_x / normalize_w False leave the rows / W's columns as they are (LargeMarginSoftmax: both raw, the
similarity is x . w; SphereFace: raw rows, unit columns): "cosine" above is then that similarity. pool_scale > 0
pools a class's sub-centres by the softmax-weighted mean of their similarities, weights softmax(pool_scale * s), as
PML's SoftTripleLoss.get_logits does, instead of taking the largest.
"""
import torch
import torch.nn.functional as F

from .._row_epilogues import stats_dtype


def margin_softmax_rows(x, weight, labels, *, scale, sub_centers, deterministic=False, normalize_x=True,
                        normalize_w=True, pool_scale=0.0):
    dtype = stats_dtype(x.dtype)
    x, weight = x.to(dtype), weight.to(dtype)
    cosine = ((F.normalize(x, dim=1) if normalize_x else x)
              @ (F.normalize(weight, dim=0) if normalize_w else weight))  # N x (C K)
    cosine = cosine.view(x.shape[0], -1, sub_centers)
    if pool_scale:
        cosine = (F.softmax(cosine * pool_scale, dim=2) * cosine).sum(dim=2)  # N x C
    else:
        cosine = cosine.max(dim=2).values  # N x C
    target = F.one_hot(labels.long(), cosine.shape[1]).bool()
    # -inf at the label: an all-masked row (C = 1) gives -inf, and masked_fill zeroes its (NaN) gradient.
    lse_other = torch.logsumexp((scale * cosine).masked_fill(target, float("-inf")), dim=1)
    target_cosine = cosine.gather(1, labels.long()[:, None]).squeeze(1)
    return lse_other, target_cosine
