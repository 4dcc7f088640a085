"""The lifted structure loss (PML's LiftedStructureLoss): the module against PML's own, PML's rules pinned (the
negatives of a positive pair are those of its anchor and of the query whose index is the positive's, with ref_emb too;
a pair without any negative keeps its positive term; the batch rule), every distance and a near-duplicate fp32 pair
on every backend. tests/test_pair_term_losses.py holds every backend to the float64 reference,
tests/test_reference_vs_pml.py the reference to PML over 200 random cases and every reducer.

"triton" runs under Triton's interpreter (tests/conftest.py), "cpu" is the native kernels, "cuda-emulated" the CUDA
kernels on the CPU (csrc/cuda/host_emulation.h): the same kernel sources as backend "cuda"."""
import pytest
import torch

import metric_kernels as mk
from metric_kernels import pml
from tests.helpers import FUSED_BACKENDS as BACKENDS
from tests.helpers import PAIR_DISTANCES as DISTANCES
from tests.helpers import assert_pair_dictionary_equals_pmls, assert_rel_close, fused_backend_param as backend_param
from tests.helpers import grads
from tests.test_fused import _compare, _error, _pair_inputs
TOL = 1e-10

reducers = pytest.importorskip("pytorch_metric_learning.reducers")
losses = pytest.importorskip("pytorch_metric_learning.losses")
distances = pytest.importorskip("pytorch_metric_learning.distances")


@backend_param
def test_a_near_duplicate_pair_in_fp32(backend):
    """A Euclidean pair at distance 4e-3 of unit rows in D = 3 (these inputs hold one): fp32 forms it from the dot
    product, as torch.cdist does (1 - s loses about 3 digits there), and the fused backward's dS Y - c x cancels the
    pair's large slope 1 / d, where the eager backward takes the rows' difference. The gradients then miss the float64
    reference by about 1e-4, beyond the 1e-4 the other fp32 cases meet, where the eager fp32 reference misses it by
    6e-5: they stay within twice the eager error (docs/backends.md, "Close Euclidean pairs in fp32")."""
    leaves64, labels, y_labels, offset, _ = _pair_inputs(100, 130, 63, 3, classes=5, refs="ref_emb", dtype=None)
    unit = [torch.nn.functional.normalize(t, dim=1) for t in leaves64]
    assert torch.cdist(*unit).min() < 5e-3

    def run(backend, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in leaves64]
        value = mk.lifted_structure_loss(leaves[0], labels, leaves[1], y_labels, backend=backend)
        return value, grads(value, leaves)

    exact, exact_grads = run("reference", torch.float64)
    eager, eager_grads = run("reference", torch.float32)
    ours, our_grads = run(backend, torch.float32)
    floor = 1e-3 * exact.abs().item()
    assert_rel_close(ours, exact, 1e-5, "value")
    for index, (a, b, c) in enumerate(zip(our_grads, eager_grads, exact_grads)):
        ours_error, eager_error = _error(a, c, floor), _error(b, c, floor)
        assert eager_error > 3e-5, "the case is not the ill-conditioned one"
        assert ours_error <= 2 * eager_error, f"grad {index}: {ours_error:.2e} > 2 x {eager_error:.2e}"


@pytest.mark.parametrize("distance", DISTANCES, ids=[f"{d}-{int(n)}" for d, n in DISTANCES])
@backend_param
def test_every_distance(backend, distance):
    name, normalize = distance
    leaves, labels, y_labels, offset, _ = _pair_inputs(13, 40, 50, 9, classes=4, refs="self_offset", dtype=None)
    for dtype in (torch.float64, torch.float32):
        _compare(backend, "lifted_structure", leaves, labels, y_labels, offset, dtype, reduction="mean",
                 distance=name, normalize_embeddings=normalize)


def _against_pml(x, labels, y=None, y_labels=None, backend="reference", **params):
    inputs = [x] if y is None else [x, y]
    refs = () if y is None else (y, y_labels)
    expected = pml.lifted_structure_loss(x, labels, *refs, **params)
    ours = mk.lifted_structure_loss(x, labels, *refs, backend=backend, **params)
    assert_rel_close(ours, expected, TOL, "value")
    floor = 1e-3 * abs(expected.item())
    for a, b in zip(grads(ours, inputs), grads(expected, inputs)):
        assert_rel_close(a, b, TOL, "gradient", scale_floor=floor)
    return ours


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_a_positive_references_negatives_are_those_of_the_query_with_its_index(backend):
    """PML takes a pair (a, p)'s negatives as the negative pairs whose query index equals a or p, with ref_emb too,
    where p indexes the references: the negatives of query p, a sample unrelated to reference p. Relabelling query 1
    (no pair of which involves reference 1's class change) changes the loss through the pairs with p = 1, in PML and
    here; a pair with p = a counts a's negatives once."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 0, 2, 0])
    y_labels = torch.tensor([0, 0, 1, 1, 0, 2, 0, 1, 2])
    first = _against_pml(x, labels, y, y_labels, backend, neg_margin=1.2, pos_margin=0.1)
    relabelled = labels.clone()
    relabelled[1] = 1  # query 1 now has other negatives
    second = _against_pml(x, relabelled, y, y_labels, backend, neg_margin=1.2, pos_margin=0.1)
    assert abs(first.item() - second.item()) > 1e-6


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_a_pair_without_any_negative_keeps_its_positive_term(backend):
    """PML's log-sum-exp over no negative pair is 0, so such a pair's term is relu(d_ap - pos_margin)^2 / 2: queries
    0 and 1 (class 0) meet only references of class 0; query 2 (class 1) gives the batch its negative pairs."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels, y_labels = torch.tensor([0, 0, 1]), torch.zeros(6, dtype=torch.long)
    value = _against_pml(x, labels, y, y_labels, backend, pos_margin=0.05)
    assert value.item() > 0


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_pmls_batch_rule(backend):
    """At most one positive and one negative pair, or none of either: 0 (PML's GenericPairLoss)."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for labels in (torch.tensor([0, 0, 1])[:2], torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0])):
        rows = x[:labels.shape[0]]
        assert pml.lifted_structure_loss(rows, labels).item() == 0
        ours = mk.lifted_structure_loss(rows, labels, backend=backend)
        assert ours.item() == 0
        assert torch.equal(grads(ours, [x])[0], torch.zeros_like(x))
    y = torch.randn(2, 4, dtype=torch.float64)
    one_each = (x[:1], torch.tensor([0]), y, torch.tensor([0, 1]))  # one positive pair, one negative pair
    assert pml.lifted_structure_loss(*one_each).item() == 0
    assert mk.lifted_structure_loss(*one_each, backend=backend).item() == 0


def test_module_equals_pml_and_its_dictionary():
    assert (mk.LiftedStructureLoss().neg_margin, mk.LiftedStructureLoss().pos_margin) == (1, 0)
    assert mk.LiftedStructureLoss().reduction == "mean"
    assert "neg_margin=0.8" in repr(mk.LiftedStructureLoss(0.8))
    g = torch.Generator().manual_seed(9)
    x = torch.randn(40, 10, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (40,), generator=g)
    for distance in (None, distances.CosineSimilarity(), distances.LpDistance(power=2, normalize_embeddings=False)):
        kw = {} if distance is None else dict(distance=distance)
        expected = losses.LiftedStructureLoss(0.8, 0.1, **kw)(x, labels)
        ours = mk.LiftedStructureLoss(0.8, 0.1, backend="cpu", **kw)(x, labels)
        assert_rel_close(ours, expected, TOL, f"distance={distance}")
        assert_rel_close(grads(ours, [x])[0], grads(expected, [x])[0], TOL, f"distance={distance} gradient")
    assert_pair_dictionary_equals_pmls(
        mk.LiftedStructureLoss(reducer=reducers.DoNothingReducer(), backend="cpu")(x, labels),
        losses.LiftedStructureLoss(reducer=reducers.DoNothingReducer())(x, labels), [x], TOL)


@pytest.mark.parametrize("reducer", ["AvgNonZeroReducer", "SumReducer", "PerAnchorReducer"])
def test_module_reducers_equal_pml(reducer):
    """PML's reducers through the module, with ref_emb; PerAnchorReducer from PML's DoNothingReducer losses (PML's
    own cannot take the P x 1 column)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(45, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels, y_labels = torch.randint(0, 4, (30,), generator=g), torch.randint(0, 4, (45,), generator=g)
    if reducer == "PerAnchorReducer":
        out = losses.LiftedStructureLoss(reducer=reducers.DoNothingReducer())(x, labels, None, y, y_labels)["loss"]
        anchors = out["indices"][0]
        sums = torch.zeros(30, dtype=torch.float64).index_add(0, anchors, out["losses"].squeeze(1))
        counts = torch.zeros(30, dtype=torch.float64).index_add(0, anchors, torch.ones(len(anchors), dtype=torch.float64))
        expected = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums)).sum()
        ours = mk.LiftedStructureLoss(reducer=reducers.PerAnchorReducer(reducers.SumReducer()), backend="cpu")(
            x, labels, None, y, y_labels)
    else:
        expected = losses.LiftedStructureLoss(reducer=getattr(reducers, reducer)())(x, labels, None, y, y_labels)
        ours = mk.LiftedStructureLoss(reducer=getattr(reducers, reducer)(), backend="cpu")(x, labels, None, y, y_labels)
    assert_rel_close(ours, expected, TOL, reducer)
    for a, b in zip(grads(ours, [x, y]), grads(expected, [x, y])):
        assert_rel_close(a, b, TOL, reducer + " gradient")


def test_module_keywords_and_errors():
    with pytest.raises(TypeError, match="LiftedStructureLoss"):
        mk.CrossBatchMemory(mk.LiftedStructureLoss(), 4)
    with pytest.raises(NotImplementedError, match="distance=LpDistance.*p=3"):
        mk.LiftedStructureLoss(distance=distances.LpDistance(p=3))
    with pytest.raises(NotImplementedError, match="indices_tuple"):
        mk.LiftedStructureLoss()(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), (torch.tensor([0]),) * 3)
    for bad, error in ((float("nan"), ValueError), ("1", TypeError)):
        for name in ("neg_margin", "pos_margin"):
            with pytest.raises(error, match=name):
                mk.LiftedStructureLoss(**{name: bad})
            with pytest.raises(error, match=name):
                mk.lifted_structure_loss(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), **{name: bad})
