"""The triplet margin loss over every triplet (PML's TripletMarginLoss without a miner): the fused backends against
the float64 reference (tests/test_reference_vs_pml.py holds the reference to PML), the module against PML's own, and
what the fused kernels keep: a table of each anchor's positives (N x the largest class), never the triplets.

"triton" runs under Triton's interpreter (tests/conftest.py), "cpu" is the native kernels, "cuda-emulated" the CUDA
kernels on the CPU (csrc/cuda/host_emulation.h): the same kernel sources as backend "cuda"."""
import pytest
import torch

import metric_kernels as mk
from metric_kernels._pairs import positive_slots
from metric_kernels.reference._masks import pair_masks, pair_values
from tests.helpers import FUSED_BACKENDS as BACKENDS
from tests.helpers import PAIR_DISTANCES as DISTANCES
from tests.helpers import assert_rel_close, fused_backend_param as backend_param
from tests.helpers import grads
from tests.test_fused import HALF, SIZES, _compare, _pair_inputs
REFS = ["self", "ref_emb", "self_offset"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("refs", REFS)
@pytest.mark.parametrize("size", SIZES, ids=[f"{n}x{m}x{d}" for n, m, d in SIZES])
@backend_param
def test_matches_reference(backend, size, refs, dtype):
    seed = 40 + SIZES.index(size) * 3 + REFS.index(refs)
    leaves, labels, y_labels, offset, _ = _pair_inputs(seed, *size, classes=5, refs=refs, dtype=dtype)
    _compare(backend, "triplet_margin", leaves, labels, y_labels, offset, dtype)


@pytest.mark.parametrize("smooth_loss", [False, True])
@pytest.mark.parametrize("distance", DISTANCES, ids=[f"{d}-{int(n)}" for d, n in DISTANCES])
@backend_param
def test_every_distance_and_the_smooth_loss(backend, distance, smooth_loss):
    name, normalize = distance
    leaves, labels, y_labels, offset, _ = _pair_inputs(11, 45, 70, 9, classes=4, refs="self_offset", dtype=None)
    for dtype in (torch.float64, torch.float32):
        _compare(backend, "triplet_margin", leaves, labels, y_labels, offset, dtype, smooth_loss=smooth_loss,
                 distance=name, normalize_embeddings=normalize)


@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean", "sum", "none"])
@backend_param
def test_every_reduction(backend, reduction):
    leaves, labels, y_labels, offset, _ = _pair_inputs(7, 70, 80, 12, classes=4, refs="ref_emb", dtype=None)
    _compare(backend, "triplet_margin", leaves, labels, y_labels, offset, torch.float32, reduction)


@pytest.mark.parametrize("labels", ["one_class", "all_distinct", "single_row", "one_large_class"])
@backend_param
def test_degenerate_labels(backend, labels):
    """No negative, no positive, one query, and a class holding most references (a wide positive table)."""
    n = 1 if labels == "single_row" else 40
    classes = {"one_class": 1, "all_distinct": 0, "single_row": 3, "one_large_class": 5}[labels]
    for seed, refs in ((3, "self"), (4, "ref_emb")):
        leaves, lab, y_labels, offset, _ = _pair_inputs(seed, n, 50, 8, classes=classes, refs=refs, dtype=None)
        if labels == "one_large_class":
            lab = torch.where(torch.arange(n) % 5 == 0, lab, torch.zeros_like(lab))
            y_labels = None if y_labels is None else torch.where(torch.arange(50) % 7 == 0, y_labels, 0)
        for smooth_loss in (False, True):
            _compare(backend, "triplet_margin", leaves, lab, y_labels, offset, torch.float64,
                     smooth_loss=smooth_loss)


@backend_param
def test_small_batch_against_a_memory_bank(backend):
    """A few queries against many references: Triton splits the references over programs (5 splits here, under the
    interpreter's stand-in SM count) and adds their partial sums and weights."""
    leaves, labels, y_labels, offset, _ = _pair_inputs(21, 20, 600, 16, classes=6, refs="self_offset", dtype=None)
    for smooth_loss in (False, True):
        _compare(backend, "triplet_margin", leaves, labels, y_labels, offset, torch.float64, smooth_loss=smooth_loss)
    _compare(backend, "triplet_margin", leaves, labels, y_labels, offset, torch.float32)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("smooth_loss", [False, True])
def test_a_violation_of_exactly_zero_is_pmls(backend, smooth_loss):
    """A positive and a negative at the same point with margin 0: that triplet's violation is exactly 0, where
    torch.relu's slope is 0 (and the softplus's 1/2). Equal to PML, values and gradients, in float64."""
    from pytorch_metric_learning import losses
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64)
    x[2] = x[1]
    labels = torch.tensor([0, 0, 1, 1, 2, 0, 2, 1, 2])
    leaf = x.clone().requires_grad_()
    ours = mk.triplet_margin_loss(leaf, labels, margin=0.0, smooth_loss=smooth_loss, distance="dot",
                                  normalize_embeddings=False, reduction="sum", backend=backend)
    (ours_grad,) = torch.autograd.grad(ours, leaf)
    from pytorch_metric_learning import distances, reducers
    theirs_leaf = x.clone().requires_grad_()
    theirs = losses.TripletMarginLoss(margin=0.0, smooth_loss=smooth_loss, reducer=reducers.SumReducer(),
                                      distance=distances.DotProductSimilarity(normalize_embeddings=False))(
        theirs_leaf, labels)
    (theirs_grad,) = torch.autograd.grad(theirs, theirs_leaf)
    assert_rel_close(ours, theirs, 1e-12, "value")
    assert_rel_close(ours_grad, theirs_grad, 1e-12, "gradient")


@pytest.mark.parametrize("dtype", HALF)
@backend_param
def test_half_inputs(backend, dtype):
    if backend == "cpu":  # the cpu backend computes half inputs in float32: the float32 cases cover it
        dtype = torch.float32
    leaves, labels, y_labels, offset, _ = _pair_inputs(5, 90, 70, 24, classes=6, refs="ref_emb", dtype=None)
    _compare(backend, "triplet_margin", leaves, labels, y_labels, offset, dtype)


@pytest.mark.parametrize("refs", ["self", "ref_emb"])
@backend_param
def test_deterministic_and_atomic_backward_agree(backend, refs):
    leaves, labels, y_labels, offset, _ = _pair_inputs(9, 100, 90, 20, classes=4, refs=refs, dtype=None)
    results = []
    for deterministic in (True, False):
        inputs = [t.detach().float().requires_grad_() for t in leaves]
        references = (inputs[1], y_labels) if refs == "ref_emb" else (None, None)
        value = mk.triplet_margin_loss(inputs[0], labels, *references, smooth_loss=True, backend=backend,
                                       deterministic=deterministic)
        results.append((value, grads(value, inputs)))
    (v1, g1), (v2, g2) = results
    assert torch.equal(v1, v2)
    for a, b in zip(g1, g2):
        assert_rel_close(a, b, 1e-6, "atomic vs deterministic")


@backend_param
def test_float64_gradcheck(backend):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(14, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(17, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels, y_labels = torch.randint(0, 3, (14,), generator=g), torch.randint(0, 3, (17,), generator=g)
    for smooth_loss, distance in ((True, "euclidean"), (False, "cosine")):
        torch.autograd.gradcheck(lambda a, b: mk.triplet_margin_loss(
            a, labels, b, y_labels, margin=0.4, smooth_loss=smooth_loss, distance=distance, backend=backend),
            (x, y))


def _op(backend):
    return getattr(torch.ops.metric_kernels, f"{backend.replace('-', '_')}_triplet_margin_rows")


# The options the backend's ops take after `deterministic`: triton's `normalize`, the CUDA kernels' `normalize` and
# `allow_tf32`; the cpu op takes normalised rows.
OP_OPTIONS = {"triton": (True,), "cpu": (), "cuda-emulated": (True, False)}


def _op_args(backend, x, y, labels, y_labels, self_offset, pair_value, margin, smooth, deterministic=True):
    slots, rank = positive_slots(labels, labels if y is None else y_labels)
    options = OP_OPTIONS[backend]
    return (x, y, labels, labels if y is None else y_labels, self_offset, pair_value, margin, smooth, slots, rank,
            deterministic) + options


@pytest.mark.parametrize("references", ["the_queries", "given"])
@backend_param
def test_positive_table_is_the_largest_class_wide(backend, references):
    """The op's table: margin - v_ap at [a, rank of p among its label's references], -inf where no positive is (the
    anchor's own slot, slots past its class's size); N x the largest class of the references, whatever M is."""
    g = torch.Generator().manual_seed(12)
    x = torch.nn.functional.normalize(torch.randn(23, 6, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([0] * 9 + [1] * 3 + [2] * 11)[torch.randperm(23, generator=g)]
    y, y_labels = (None, labels) if references == "the_queries" else (x, labels)
    offset = 0  # query i is reference i
    stats, table, weights = _op(backend)(*_op_args(backend, x, y, labels, y_labels, offset, 0, 0.25, False))
    assert torch.all(weights[table.isinf()] == 0)
    assert table.shape == weights.shape == (23, 11) and stats.shape == (2, 23)
    _, rank = positive_slots(labels, y_labels)
    positive, _ = pair_masks(labels, y_labels, 0)
    expected = torch.full((23, 11), float("-inf"), dtype=torch.float64)
    a, p = torch.where(positive)
    expected[a, rank[p]] = 0.25 - pair_values(x, x, 0)[a, p]
    filled = expected.isfinite()
    assert torch.equal(table.isfinite(), filled) and torch.all(table[~filled] == float("-inf"))
    assert_rel_close(table[filled], expected[filled], 1e-12, "table")


@backend_param
def test_opcheck(backend):
    """The fake implementation (a table of data-dependent width), the autograd formula and torch.compile's
    requirements, through torch.library.opcheck."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 6, generator=g, requires_grad=True)
    y = torch.randn(30, 6, generator=g, requires_grad=True)
    labels, y_labels = torch.randint(0, 3, (20,), generator=g), torch.randint(0, 3, (30,), generator=g)
    torch.library.opcheck(_op(backend), _op_args(backend, x, y, labels, y_labels, -1, 0, 0.2, False))
    torch.library.opcheck(_op(backend), _op_args(backend, x, None, labels, None, 0, 2, 0.2, True, False))


@backend_param
def test_torch_compile_fullgraph(backend):
    """A compiled step traces the op's data-dependent table width without a graph break; values and gradients equal
    eager."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 8, generator=g, requires_grad=True)
    y = torch.randn(50, 8, generator=g, requires_grad=True)
    labels, y_labels = torch.randint(0, 4, (40,), generator=g), torch.randint(0, 4, (50,), generator=g)
    fn = lambda a, b: mk.triplet_margin_loss(a, labels, b, y_labels, self_offset=3, smooth_loss=True,  # noqa: E731
                                             backend=backend)
    torch._dynamo.reset()
    got, want = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, y), fn(x, y)
    assert_rel_close(got, want, 1e-6, "compiled value")
    # one backward each: the compiled backward donates its saved buffers (the table), so it cannot retain its graph
    for a, b in zip(torch.autograd.grad(got, [x, y]), torch.autograd.grad(want, [x, y])):
        assert_rel_close(a, b, 1e-6, "compiled grad")


def test_cuda_and_cuda_emulated_compute_it():
    """Both backends of the CUDA kernels have the row function where their module is built ("cuda" needs a CUDA
    build of torch and nvcc; "cuda-emulated" is built wherever the extension is)."""
    from metric_kernels import backends
    for name in ("cuda", "cuda-emulated"):
        module, _ = backends._load(name)
        if module is not None and module._missing is None:
            assert hasattr(module, "triplet_margin_rows"), name
