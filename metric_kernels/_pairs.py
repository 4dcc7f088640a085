"""Label bookkeeping shared by the Python layer and the fused backends."""
from typing import Optional, Tuple

import torch


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
