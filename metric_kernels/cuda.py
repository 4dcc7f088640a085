"""The "cuda" backend: hand-written CUDA kernels from the native extension metric_kernels._C (csrc/cuda), tiles of
X Y^T on tensor cores (bf16/fp16; tf32 for fp32 rows where torch allows it) or IEEE FMA, extra memory O(N + M).
The backend contract is in metric_kernels/backends.py; the ops' contract in metric_kernels/_fused.py.

It is picked only by name: "auto" leaves it out until a GPU run of tests/test_cuda_gpu.py has passed (the kernels
compile in CI, and their code computes on the CPU there through backend "cuda-emulated", but no GPU has run them yet).
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
    _missing = f"backend 'cuda' needs the native extension metric_kernels._C, which is not built: {error}"
else:
    _missing = None if _build["with_cuda"] else (
        "backend 'cuda' needs the CUDA kernels of metric_kernels._C, which was built without them (they need a CUDA "
        "build of torch and nvcc at install time; see 'Building the native extension' in README.md)")

if _missing is None:
    from ._fused import CLASSIFIER_ROWS, ROW_FUNCTIONS, TRIPLET_MARGIN_ROWS, CudaKernelRows, fused_backend

    fused_backend("cuda", globals(), CudaKernelRows, ROW_FUNCTIONS + (CLASSIFIER_ROWS, TRIPLET_MARGIN_ROWS))


def unavailable_reason(device: torch.device):
    if _missing is not None:
        return _missing
    if device.type != "cuda":
        return f"backend 'cuda' runs on CUDA tensors, not on {device.type}"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:  # the build targets sm_80 and newer (tensor-core WMMA for bf16 and tf32)
            return f"backend 'cuda' needs a GPU of compute capability 8.0 or newer; this one is {major}.{minor}"
    return None
