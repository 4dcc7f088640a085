"""Label masks and masked reductions shared by the reference losses."""
from typing import Optional, Tuple

import torch


def pair_masks(x_labels: torch.Tensor, y_labels: torch.Tensor,
               self_offset: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) N x M boolean masks; the pair (i, i + self_offset) is in neither."""
    same = x_labels[:, None] == y_labels[None, :]
    allowed = torch.ones_like(same)
    if self_offset is not None:
        rows = torch.arange(x_labels.shape[0], device=x_labels.device)
        allowed[rows, rows + self_offset] = False
    return same & allowed, ~same & allowed


def masked_logsumexp(values: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """logsumexp over the entries where mask is True; 0 where there are none.

    Masked entries are set to the dtype's lowest finite value rather than -inf, so an empty row has a finite
    logsumexp and its (unused) gradient stays finite instead of NaN.
    """
    filled = values.masked_fill(~mask, torch.finfo(values.dtype).min)
    out = torch.logsumexp(filled, dim=dim)
    return out.masked_fill(~mask.any(dim=dim), 0)


def log1p_sum_exp(values: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """log(1 + sum of exp over the masked entries) = softplus(logsumexp), computed stably with an extra 0 entry."""
    filled = values.masked_fill(~mask, torch.finfo(values.dtype).min)
    zero_shape = list(filled.shape)
    zero_shape[dim] = 1
    return torch.logsumexp(torch.cat([filled, filled.new_zeros(zero_shape)], dim=dim), dim=dim)
