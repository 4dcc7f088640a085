"""The papers' own code paths, transcribed from their published formulas, as independent oracles.

SupContrast (HobbitLong/SupContrast, losses.py, current version with the mask_pos_pairs guard) and the batch-hard triplet
loss of fast-reid (fastreid/modeling/losses/triplet_loss.py) / Hermans et al. These are re-statements of those functions
for testing, written against their documented behaviour.
"""
import torch
import torch.nn.functional as F


def supcontrast_loss(features, labels=None, temperature=0.07, base_temperature=0.07, contrast_mode="all"):
    """features: [bsz, n_views, D], already L2-normalised as SupContrast expects. Mean over anchors."""
    batch_size, contrast_count = features.shape[0], features.shape[1]
    if labels is None:
        mask = torch.eye(batch_size, dtype=features.dtype)
    else:
        labels = labels.view(-1, 1)
        mask = torch.eq(labels, labels.T).to(features.dtype)
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    if contrast_mode == "one":
        anchor_feature, anchor_count = features[:, 0], 1
    else:
        anchor_feature, anchor_count = contrast_feature, contrast_count
    logits = anchor_feature @ contrast_feature.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size * anchor_count).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mask_pos_pairs = mask.sum(1)
    mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, torch.ones_like(mask_pos_pairs), mask_pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, batch_size).mean()


def _euclidean_dist(x, y):
    xx = x.pow(2).sum(1, keepdim=True).expand(x.shape[0], y.shape[0])
    yy = y.pow(2).sum(1, keepdim=True).expand(y.shape[0], x.shape[0]).t()
    return (xx + yy - 2 * x @ y.t()).clamp(min=1e-12).sqrt()


def fastreid_triplet_loss(embedding, targets, margin, norm_feat=False):
    """Batch-hard triplet loss, mean over anchors; margin 0 means the soft margin (softplus)."""
    if norm_feat:
        embedding = F.normalize(embedding, dim=1)
    dist_mat = _euclidean_dist(embedding, embedding)
    n = dist_mat.size(0)
    is_pos = targets.view(n, 1).expand(n, n).eq(targets.view(n, 1).expand(n, n).t()).to(dist_mat.dtype)
    is_neg = targets.view(n, 1).expand(n, n).ne(targets.view(n, 1).expand(n, n).t()).to(dist_mat.dtype)
    dist_ap, _ = torch.max(dist_mat * is_pos, dim=1)
    dist_an, _ = torch.min(dist_mat * is_neg + is_pos * 1e9, dim=1)
    y = torch.ones_like(dist_an)
    if margin > 0:
        return F.margin_ranking_loss(dist_an, dist_ap, y, margin=margin)
    return F.soft_margin_loss(dist_an - dist_ap, y)
