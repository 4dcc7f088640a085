"""The Triton backend: fused, tiled kernels whose extra memory is O(N + M), never O(N M).

On CUDA tensors it compiles the kernels; on CPU tensors it runs them under Triton's interpreter when TRITON_INTERPRET=1
(how the CPU test suite checks them). The backend contract is in metric_kernels/backends.py.
"""
import importlib.util

import torch

# The kernels read the raw rows in their own dtype and normalise inside (metric_kernels/triton/ops.py).
FOLDS_NORMALIZATION = True

_installed = importlib.util.find_spec("triton") is not None
if _installed:
    from .._fused import fused_backend
    from .ops import interpreting  # defines the metric_kernels::triton_* ops

    circle_rows, supcon_rows, batch_hard_rows, proxy_anchor_rows = fused_backend("triton")


def unavailable_reason(device: torch.device):
    if not _installed:
        return "Triton is not installed, which the 'triton' backend needs (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return (f"the 'triton' kernels run on CUDA devices (or on the CPU under TRITON_INTERPRET=1), "
            f"not on {device.type}")
