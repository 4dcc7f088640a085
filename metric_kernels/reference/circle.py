"""Circle loss (Sun et al. 2020), as pytorch-metric-learning computes it."""
import torch
import torch.nn.functional as F

from ._masks import masked_logsumexp, pair_masks


def circle_rows(x, y, x_labels, y_labels, self_offset, *, m, gamma, deterministic=False):
    s = x @ y.T
    positive, negative = pair_masks(x_labels, y_labels, self_offset)
    # The weights relu(...) are detached, as in the paper's reference code and PML.
    positive_logits = -gamma * torch.relu(1 + m - s.detach()) * (s - (1 - m))
    negative_logits = gamma * torch.relu(s.detach() + m) * (s - m)
    lse_sum = masked_logsumexp(positive_logits, positive) + masked_logsumexp(negative_logits, negative)
    valid = positive.any(dim=1) & negative.any(dim=1)
    return torch.where(valid, F.softplus(lse_sum), torch.zeros_like(lse_sum))
