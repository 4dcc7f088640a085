"""The "cpu" backend: fused CPU kernels from the native extension metric_kernels._C (csrc/cpu), OpenMP over row
blocks, extra memory O(block x M) at most. The backend contract is in metric_kernels/backends.py."""
import torch

from . import _native

# The pair values the lse ops compute (metric_kernels/_pairs.py): the dot product and both Euclidean distances.
PAIR_VALUES = (0, 1, 2)

try:
    _native.load()  # registers torch.ops.metric_kernels.cpu_*
except ImportError as error:  # not built: no compiler at install time, or METRIC_KERNELS_SKIP_EXT=1
    _missing = str(error)
else:
    from ._fused import CLASSIFIER_ROWS, ROW_FUNCTIONS, TRIPLET_MARGIN_ROWS, fused_backend

    _missing = None
    fused_backend("cpu", globals(), names=ROW_FUNCTIONS + (CLASSIFIER_ROWS, TRIPLET_MARGIN_ROWS))


def unavailable_reason(device: torch.device):
    if _missing is not None:
        return ("the native extension metric_kernels._C is not built, which backend 'cpu' needs (install with "
                f"`pip install --no-build-isolation -e .` where a C++ compiler and cmake are available): {_missing}")
    if device.type != "cpu":
        return f"backend 'cpu' runs on CPU tensors, not on {device.type}"
    return None
