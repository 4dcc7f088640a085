"""The Triton backend: fused, tiled kernels whose extra memory is O(N + M), never O(N M).

On CUDA tensors it compiles the kernels; on CPU tensors it runs them under Triton's interpreter when TRITON_INTERPRET=1
(how the CPU test suite checks them). The backend contract is in metric_kernels/backends.py.
"""
import importlib.util

import torch

if importlib.util.find_spec("triton") is not None:
    from . import ops
    from .ops import interpreting
else:  # pragma: no cover - exercised only where Triton is absent
    ops = None

from .._pairs import pair_counts
from .._row_epilogues import (batch_hard_from_choices, circle_from_stats, proxy_anchor_from_stats,
                              supcon_from_stats)

_KIND = {"circle": 0, "supcon": 1, "proxy_anchor": 2}


def unavailable_reason(device: torch.device):
    if ops is None:
        return "Triton is not installed, which the 'triton' backend needs (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return (f"the 'triton' kernels run on CUDA devices (or on the CPU under TRITON_INTERPRET=1), "
            f"not on {device.type}")


def _offset(self_offset):
    return -1 if self_offset is None else self_offset


def _references(x, y):
    """None when the references are the queries: the op then writes a single gradient."""
    return None if y is x else y


def circle_rows(x, y, x_labels, y_labels, self_offset, *, m, gamma, deterministic):
    stats = ops.lse_rows(x, _references(x, y), x_labels, y_labels, _offset(self_offset), _KIND["circle"], m, gamma, deterministic)
    positives, negatives = pair_counts(x_labels, y_labels, self_offset)
    return circle_from_stats(stats[0], stats[1], positives, negatives)


def supcon_rows(x, y, x_labels, y_labels, self_offset, *, temperature, deterministic):
    stats = ops.lse_rows(x, _references(x, y), x_labels, y_labels, _offset(self_offset), _KIND["supcon"], 0.0, 1.0 / temperature,
                         deterministic)
    positives, _ = pair_counts(x_labels, y_labels, self_offset)
    return supcon_from_stats(stats[1], stats[2], positives, temperature)


def batch_hard_rows(x, y, x_labels, y_labels, self_offset, *, margin, soft, deterministic):
    choices = ops.batch_hard_select(x.detach(), y.detach(), x_labels, y_labels, _offset(self_offset))
    return batch_hard_from_choices(x, y, choices[0], choices[1], margin, soft)


def proxy_anchor_rows(proxies, x, labels, *, margin, alpha, deterministic):
    proxy_labels = torch.arange(proxies.shape[0], device=proxies.device)
    stats = ops.lse_rows(proxies, x, proxy_labels, labels, -1, _KIND["proxy_anchor"], margin, alpha, deterministic)
    return proxy_anchor_from_stats(stats[0], stats[1])
