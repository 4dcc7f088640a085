"""The Triton backend: fused, tiled kernels whose extra memory is O(N + M), never O(N M).

On CUDA tensors it compiles the kernels; on CPU tensors it runs them under Triton's interpreter when TRITON_INTERPRET=1
(how the CPU test suite checks them). The backend contract is in metric_kernels/backends.py.
"""
import importlib.util

import torch

if importlib.util.find_spec("triton") is not None:
    from .._fused import FusedRows
    from .ops import interpreting

    _rows = FusedRows("triton")
    circle_rows, supcon_rows = _rows.circle_rows, _rows.supcon_rows
    batch_hard_rows, proxy_anchor_rows = _rows.batch_hard_rows, _rows.proxy_anchor_rows
else:  # pragma: no cover - exercised only where Triton is absent
    _rows = None


def unavailable_reason(device: torch.device):
    if _rows is None:
        return "Triton is not installed, which the 'triton' backend needs (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return (f"the 'triton' kernels run on CUDA devices (or on the CPU under TRITON_INTERPRET=1), "
            f"not on {device.type}")
