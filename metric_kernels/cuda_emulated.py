"""The "cuda-emulated" backend: the CUDA kernels of csrc/cuda compiled for the host (csrc/cuda/host_emulation.h) and
run on CPU tensors, a block's 128 threads as host threads, blocks one after another. It exists to check the CUDA
kernels' code against the reference where no GPU is (CI): the same kernels, launch code and torch glue as backend
"cuda", on the same inputs (raw rows in their own dtype, normalised inside the kernels; fp32 tiles in tf32 where
torch allows tf32 matmuls, as on a GPU). It is slow, and "auto" never picks it. What it cannot show (speed, concurrency between blocks,
the tensor cores' own rounding) needs a GPU: see the README.
The backend contract is in metric_kernels/backends.py; the ops' contract in metric_kernels/_fused.py.
"""
import torch

from . import _native

# The pair values the lse ops compute (metric_kernels/_pairs.py): the dot product and both Euclidean distances.
PAIR_VALUES = (0, 1, 2)
# The kernels take the raw rows (and the classifiers' W) in their own dtype and normalise inside: 16-bit rows reach the
# tensor cores as 16-bit operands, and no normalised or converted copy of the rows is made.
FOLDS_NORMALIZATION = True

try:
    _build = _native.load()
except ImportError as error:  # not built: no compiler at install time, or METRIC_KERNELS_SKIP_EXT=1
    _missing = f"it is not built: {error}"
else:
    _missing = None if _build["with_cuda_emulation"] else (
        "this build of it predates the emulation (reinstall: `pip install --no-build-isolation -e .`)")

if _missing is None:
    from ._fused import CLASSIFIER_ROWS, ROW_FUNCTIONS, TRIPLET_MARGIN_ROWS, CudaKernelRows, fused_backend

    fused_backend("cuda_emulated", globals(), CudaKernelRows, ROW_FUNCTIONS + (CLASSIFIER_ROWS, TRIPLET_MARGIN_ROWS))


def unavailable_reason(device: torch.device):
    if _missing is not None:
        return ("backend 'cuda-emulated' needs the native extension metric_kernels._C with the host emulation of the "
                f"CUDA kernels (built with the package where a C++ compiler and cmake are available): {_missing}")
    if device.type != "cpu":
        return f"backend 'cuda-emulated' runs the CUDA kernels on CPU tensors, not on {device.type}"
    return None
