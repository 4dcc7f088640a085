"""What the angular and lifted structure losses share: one term per positive pair from NCA's per-query statistics,
computed by every fused backend. Each backend against the float64 reference (tests/test_reference_vs_pml.py holds the
reference to PML): ragged sizes, ref_emb and self_offset, fp64 and fp32 at the common tolerances, 16-bit rows no
worse than the eager reference on the same inputs plus 1e-2, every reduction. Each loss's own rules are pinned in
tests/test_angular.py and tests/test_lifted_structure.py.

"triton" runs under Triton's interpreter (tests/conftest.py), "cpu" is the native kernels, "cuda-emulated" the CUDA
kernels on the CPU (csrc/cuda/host_emulation.h): the same kernel sources as backend "cuda"."""
import pytest
import torch

import metric_kernels as mk
from metric_kernels._pairs import positive_pairs
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


@pytest.mark.parametrize("refs", ["self", "ref_emb"])
@loss_param
def test_the_graph_keeps_no_row_sized_copy(loss, refs):
    """Through a backend that reads the raw rows (triton), what autograd keeps for the backward holds no rows (a
    tensor of D columns and N or more rows) but the inputs themselves and the angular loss's P x D pair centres
    (NCA's queries): the pairs' own terms save the raw rows, not a normalised copy."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(40, 16, generator=g, requires_grad=True)
    y = torch.randn(50, 16, generator=g, requires_grad=True)
    labels, y_labels = torch.randint(0, 4, (40,), generator=g), torch.randint(0, 4, (50,), generator=g)
    refs_args = () if refs == "self" else (y, y_labels)
    pairs = positive_pairs(labels, labels if refs == "self" else y_labels, 0 if refs == "self" else None)[0].numel()
    inputs = {x.data_ptr(), y.data_ptr()}
    large = []

    def pack(tensor):
        if tensor.dim() == 2 and tensor.shape[1] == 16 and tensor.shape[0] >= 40 and tensor.data_ptr() not in inputs:
            large.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        value = getattr(mk, f"{loss}_loss")(x, labels, *refs_args, backend="triton")
    value.backward()
    allowed = {(pairs, 16)} if loss == "angular" else set()
    assert set(large) <= allowed, large
