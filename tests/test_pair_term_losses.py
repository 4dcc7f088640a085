"""What the angular and lifted structure losses share: one term per positive pair from NCA's per-query statistics,
computed by every fused backend. Each backend against the float64 reference (tests/test_reference_vs_pml.py holds the
reference to PML): ragged sizes, ref_emb and self_offset, fp64 and fp32 at the common tolerances, 16-bit rows no
worse than the eager reference on the same inputs plus 1e-2, every reduction. Each loss's own rules are pinned in
tests/test_angular.py and tests/test_lifted_structure.py.

"triton" runs under Triton's interpreter (tests/conftest.py), "cpu" is the native kernels, "cuda-emulated" the CUDA
kernels on the CPU (csrc/cuda/host_emulation.h): the same kernel sources as backend "cuda"."""
import pytest
import torch

from tests.helpers import fused_backend_param as backend_param
from tests.test_fused import HALF, SIZES, _compare, _pair_inputs

REFS = ["self", "ref_emb", "self_offset"]
SEED_BASE = {"angular": 70, "lifted_structure": 40}
loss_param = pytest.mark.parametrize("loss", list(SEED_BASE))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("refs", REFS)
@pytest.mark.parametrize("size", SIZES, ids=[f"{n}x{m}x{d}" for n, m, d in SIZES])
@backend_param
@loss_param
def test_matches_reference(loss, backend, size, refs, dtype):
    seed = SEED_BASE[loss] + SIZES.index(size) * 3 + REFS.index(refs)
    leaves, labels, y_labels, offset, _ = _pair_inputs(seed, *size, classes=5, refs=refs, dtype=dtype)
    _compare(backend, loss, leaves, labels, y_labels, offset, dtype, reduction="mean")


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "cuda-emulated"], ids=["triton", "cuda_emulated"])
@loss_param
def test_half_precision(loss, backend, dtype):
    """16-bit rows: the kernels read them in their own dtype (the angular loss's pair centres too: tensor-core
    operands on a GPU)."""
    for refs in ("self", "ref_emb"):
        leaves, labels, y_labels, offset, _ = _pair_inputs(5, 45, 70, 24, classes=4, refs=refs, dtype=None)
        _compare(backend, loss, leaves, labels, y_labels, offset, dtype, reduction="mean")


@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean", "sum", "none"])
@backend_param
@loss_param
def test_every_reduction(loss, backend, reduction):
    leaves, labels, y_labels, offset, _ = _pair_inputs(7, 50, 60, 12, classes=4, refs="ref_emb", dtype=None)
    _compare(backend, loss, leaves, labels, y_labels, offset, torch.float32, reduction)
