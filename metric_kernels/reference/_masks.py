"""Label masks, pair values and masked reductions shared by the reference losses."""
from typing import Optional, Tuple

import torch

from .._pairs import SIMILARITY, SQUARED_EUCLIDEAN


def pair_values(x: torch.Tensor, y: torch.Tensor, pair_value: int) -> torch.Tensor:
    """The N x M matrix a loss folds (metric_kernels/_pairs.py): x y^T, or minus PML's LpDistance of the rows
    (torch.cdist, squared for power 2), so that larger is closer for all three."""
    if pair_value == SIMILARITY:
        return x @ y.T
    distances = torch.cdist(x, y)
    return -(distances * distances if pair_value == SQUARED_EUCLIDEAN else distances)


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
    """log(1 + sum of exp over the masked entries), i.e. softplus(logsumexp), accurate when the sum is tiny.

    PML computes it as logsumexp over the entries and an extra 0, which rounds 1 + tiny and loses the digits of small
    terms (e.g. a proxy whose only positive is already far inside its margin); logaddexp goes through log1p.
    An empty mask gives the lowest finite logsumexp, whose softplus is exactly 0 with a zero (not NaN) gradient.
    """
    lse = torch.logsumexp(values.masked_fill(~mask, torch.finfo(values.dtype).min), dim=dim)
    return torch.logaddexp(lse, torch.zeros((), dtype=lse.dtype, device=lse.device))
