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
    from .._fused import CLASSIFIER_ROWS, ROW_FUNCTIONS, FusedRows, fused_backend
    from .._row_epilogues import triplet_losses
    from . import margin_softmax_ops  # noqa: F401  (defines the metric_kernels::triton_margin_softmax_* ops)
    from .ops import interpreting, triplet_distances  # defines the metric_kernels::triton_* ops

    class _RawRows(FusedRows):
        """The fused per-row functions on raw rows: batch-hard normalises (when asked) inside its kernels too, and
        its chosen distances come from a kernel rather than N x D temporaries."""

        def batch_hard_rows(self, x, y, x_labels, y_labels, self_offset, *, margin, soft, deterministic, normalize):
            choices = self._select(x.detach(), y.detach(), x_labels, y_labels, self._offset(self_offset), normalize)
            distances = triplet_distances(x, None if y is x else y, choices[0].clamp(min=0), choices[1].clamp(min=0),
                                          normalize)
            return triplet_losses(distances[0], distances[1], choices[0], choices[1], margin, soft)

    fused_backend("triton", globals(), _RawRows, names=ROW_FUNCTIONS + (CLASSIFIER_ROWS,))


def unavailable_reason(device: torch.device):
    if not _installed:
        return "Triton is not installed, which the 'triton' backend needs (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return (f"the 'triton' kernels run on CUDA devices (or on the CPU under TRITON_INTERPRET=1), "
            f"not on {device.type}")
