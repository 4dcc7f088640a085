"""The Triton backend: fused, tiled kernels whose extra memory is O(N + M), never O(N M).

On CUDA tensors it compiles the kernels; on CPU tensors it runs them under Triton's interpreter when TRITON_INTERPRET=1
(how the CPU test suite checks them). The backend contract is in metric_kernels/backends.py.
"""
import importlib.util

import torch

# The kernels read the raw rows in their own dtype and normalise inside (metric_kernels/triton/ops.py).
FOLDS_NORMALIZATION = True
PAIR_VALUES = (0, 1, 2)  # the dot product and both Euclidean distances (metric_kernels/_pairs.py)

_installed = importlib.util.find_spec("triton") is not None
if _installed:
    from .._fused import CLASSIFIER_ROWS, ROW_FUNCTIONS, TRIPLET_MARGIN_ROWS, RawRows, fused_backend
    from . import margin_softmax_ops  # noqa: F401  (defines the metric_kernels::triton_margin_softmax_* ops)
    from .ops import interpreting, selection_rows, triplet_distances  # defines the metric_kernels::triton_* ops

    class _TritonRows(RawRows):
        _triplet_distances = staticmethod(triplet_distances)

        @staticmethod
        def selection_rows(x, *options) -> int:
            return selection_rows(x.dtype)

    fused_backend("triton", globals(), _TritonRows, names=ROW_FUNCTIONS + (CLASSIFIER_ROWS, TRIPLET_MARGIN_ROWS))


def unavailable_reason(device: torch.device):
    if not _installed:
        return "Triton is not installed, which the 'triton' backend needs (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return (f"the 'triton' kernels run on CUDA devices (or on the CPU under TRITON_INTERPRET=1), "
            f"not on {device.type}")
