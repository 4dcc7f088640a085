"""The angular loss (PML's AngularLoss): the module against PML's own, PML's rules pinned (the references are not
normalised, the pairs' order, DoNothingReducer's dictionary, a pair term rounded to 0), what the fused path keeps (the
pairs' centres as NCA's queries, never a P x M matrix), degenerate batches and a memory bank on every backend.
tests/test_pair_term_losses.py holds every backend to the float64 reference, tests/test_reference_vs_pml.py the
reference to PML over 200 random cases and every reducer.

"triton" runs under Triton's interpreter (tests/conftest.py), "cpu" is the native kernels, "cuda-emulated" the CUDA
kernels on the CPU (csrc/cuda/host_emulation.h): the same kernel sources as backend "cuda"."""
import math

import pytest
import torch

import metric_kernels as mk
from metric_kernels import pml
from metric_kernels._pairs import positive_pairs
from tests.helpers import FUSED_BACKENDS as BACKENDS
from tests.helpers import assert_pair_dictionary_equals_pmls, assert_rel_close, fused_backend_param as backend_param
from tests.helpers import grads
from tests.test_fused import _compare, _pair_inputs

TOL = 1e-10

reducers = pytest.importorskip("pytorch_metric_learning.reducers")
losses = pytest.importorskip("pytorch_metric_learning.losses")
distances = pytest.importorskip("pytorch_metric_learning.distances")


@pytest.mark.parametrize("labels", ["one_class", "all_distinct", "single_row"])
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_degenerate_labels(backend, labels):
    """No negative (every pair's loss is 0), no positive pair (no loss at all), one query: 0 with zero gradients,
    as PML."""
    n = 1 if labels == "single_row" else 12
    classes = {"one_class": 1, "all_distinct": 0, "single_row": 3}[labels]
    leaves, lab, _, _, _ = _pair_inputs(3, n, 0, 6, classes=classes, refs="self", dtype=None)
    x = leaves[0].requires_grad_()
    expected = pml.angular_loss(x, lab)
    for reduction in ("mean", "mean_nonzero", "sum"):
        ours = mk.angular_loss(x, lab, backend=backend, reduction=reduction)
        assert ours.item() == 0 and expected.item() == 0
        assert torch.equal(grads(ours, [x])[0], torch.zeros_like(x))
    assert torch.equal(mk.angular_loss(x, lab, backend=backend, reduction="none"), torch.zeros(n, dtype=x.dtype))


@backend_param
def test_small_batch_against_a_memory_bank(backend):
    """A few queries against many references (a memory bank; Triton splits the references over programs)."""
    leaves, labels, y_labels, offset, _ = _pair_inputs(21, 12, 500, 16, classes=6, refs="self_offset", dtype=None)
    for dtype in (torch.float64, torch.float32):
        _compare(backend, "angular", leaves, labels, y_labels, offset, dtype, reduction="mean")


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_the_references_are_not_normalised_as_in_pml(backend):
    """PML's AngularLoss normalises the anchors and positives but takes the references' dot products with the pairs'
    centres as the references are given: scaling a reference changes the loss, in PML and here."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 8, generator=g, dtype=torch.float64)
    y = torch.randn(30, 8, generator=g, dtype=torch.float64)
    labels, y_labels = torch.randint(0, 3, (20,), generator=g), torch.randint(0, 3, (30,), generator=g)
    values = []
    for scale in (1.0, 3.0):
        leaves = [x.clone().requires_grad_(), (y * scale).requires_grad_()]
        expected = pml.angular_loss(leaves[0], labels, leaves[1], y_labels, alpha=35.0)
        ours = mk.angular_loss(leaves[0], labels, leaves[1], y_labels, alpha=35.0, backend=backend)
        assert_rel_close(ours, expected, TOL, f"scale {scale}")
        for a, b in zip(grads(ours, leaves), grads(expected, leaves)):
            assert_rel_close(a, b, TOL, f"scale {scale} gradient", scale_floor=1e-3 * expected.item())
        values.append(ours.item())
    assert abs(values[0] - values[1]) > 0.1 * values[0]


def test_positive_pairs_are_pmls_in_pmls_order():
    """_pairs.positive_pairs lists the pairs torch.where lists PML's match matrix in (query, then reference index),
    without the query's own reference, without forming the N x M matrix."""
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        n = torch.randint(0, 40, (), generator=g).item()
        m = n + torch.randint(0, 20, (), generator=g).item()
        x_labels, y_labels = torch.randint(0, 6, (n,), generator=g), torch.randint(0, 6, (m,), generator=g)
        offset = None if seed % 3 == 0 else torch.randint(0, m - n + 1, (), generator=g).item()
        if offset is not None:
            y_labels[offset:offset + n] = x_labels
        same = x_labels[:, None] == y_labels[None, :]
        if offset is not None:
            same[torch.arange(n), torch.arange(n) + offset] = False
        expected = torch.where(same)
        anchors, positives = positive_pairs(x_labels, y_labels, offset)
        assert torch.equal(anchors, expected[0]) and torch.equal(positives, expected[1]), seed


def test_module_equals_pml_and_its_dictionary():
    """Defaults, values and gradients against PML's module; DoNothingReducer gives PML's P x 1 column of pair losses
    and its (anchor, positive) indices, in PML's order."""
    assert mk.AngularLoss().alpha == 40 and mk.AngularLoss().reduction == "mean"
    assert "alpha=40 degrees" in repr(mk.AngularLoss())
    g = torch.Generator().manual_seed(9)
    x = torch.randn(40, 10, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (40,), generator=g)
    for alpha in (40, 52.5):
        expected = losses.AngularLoss(alpha)(x, labels)
        ours = mk.AngularLoss(alpha, backend="cpu")(x, labels)
        assert_rel_close(ours, expected, TOL, f"alpha={alpha}")
        assert_rel_close(grads(ours, [x])[0], grads(expected, [x])[0], TOL, f"alpha={alpha} gradient")
    assert_pair_dictionary_equals_pmls(mk.AngularLoss(reducer=reducers.DoNothingReducer(), backend="cpu")(x, labels),
                                       losses.AngularLoss(reducer=reducers.DoNothingReducer())(x, labels), [x], TOL)


@pytest.mark.parametrize("reducer", ["AvgNonZeroReducer", "MeanReducer", "SumReducer", "PerAnchorReducer"])
def test_module_reducers_equal_pml(reducer):
    """PML's reducers through the module, with ref_emb. PML's PerAnchorReducer cannot take AngularLoss's P x 1
    column (as TupletMarginLoss's): ours reduces each anchor's mean over its pairs, computed here from PML's
    DoNothingReducer losses."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(45, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels, y_labels = torch.randint(0, 4, (30,), generator=g), torch.randint(0, 4, (45,), generator=g)
    if reducer == "PerAnchorReducer":
        out = losses.AngularLoss(30.0, reducer=reducers.DoNothingReducer())(x, labels, None, y, y_labels)["loss"]
        anchors = out["indices"][0]
        sums = torch.zeros(30, dtype=torch.float64).index_add(0, anchors, out["losses"].squeeze(1))
        counts = torch.zeros(30, dtype=torch.float64).index_add(0, anchors, torch.ones_like(anchors, dtype=torch.float64))
        per_anchor = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
        expected = per_anchor.mean()
        ours = mk.AngularLoss(30.0, reducer=reducers.PerAnchorReducer(reducers.MeanReducer()), backend="cpu")(
            x, labels, None, y, y_labels)
    else:
        expected = losses.AngularLoss(30.0, reducer=getattr(reducers, reducer)())(x, labels, None, y, y_labels)
        ours = mk.AngularLoss(30.0, reducer=getattr(reducers, reducer)(), backend="cpu")(x, labels, None, y, y_labels)
    assert_rel_close(ours, expected, TOL, reducer)
    for a, b in zip(grads(ours, [x, y]), grads(expected, [x, y])):
        assert_rel_close(a, b, TOL, reducer + " gradient")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_a_pair_loss_under_half_an_ulp_of_one_is_zero_as_in_pml(backend, dtype):
    """PML takes log(1 + e^l) as torch.logsumexp([l, 0]): 0 where e^l is under half an ulp of 1, and
    AvgNonZeroReducer leaves those pairs out. Class 0's pairs face negatives far on the other side (e^l about
    1e-26): 0 here too, and the mean over the nonzero pairs is PML's."""
    g = torch.Generator().manual_seed(12)
    near = torch.tensor([1.0, 0.0, 0.0]) + 0.05 * torch.randn(4, 3, generator=g, dtype=torch.float64)
    far = torch.tensor([-10.0, 0.0, 0.0]) + 0.5 * torch.randn(4, 3, generator=g, dtype=torch.float64)
    x = torch.cat([near, far]).to(dtype).requires_grad_()
    labels = torch.tensor([0] * 4 + [1] * 4)
    out = losses.AngularLoss(reducer=reducers.DoNothingReducer())(x, labels)["loss"]["losses"]
    assert (out == 0).any() and (out > 0).any(), "some pair losses underflow to 0 in PML, not all"
    expected = losses.AngularLoss(reducer=reducers.AvgNonZeroReducer())(x, labels)
    ours = mk.angular_loss(x, labels, reduction="mean_nonzero", backend=backend)
    assert_rel_close(ours, expected, TOL if dtype == torch.float64 else 1e-5, "mean over the nonzero pairs")


def test_module_keywords():
    """PML's AngularLoss asserts LpDistance(p=2, power=1, normalize_embeddings=True): that distance only."""
    assert str(mk.AngularLoss(distance=distances.LpDistance()).distance_spec) == str(mk.AngularLoss().distance_spec)
    for distance in (distances.CosineSimilarity(), distances.LpDistance(power=2),
                     distances.LpDistance(normalize_embeddings=False)):
        with pytest.raises(NotImplementedError, match="distance="):
            mk.AngularLoss(distance=distance)
    with pytest.raises(NotImplementedError, match="indices_tuple"):
        mk.AngularLoss()(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), (torch.tensor([0]),) * 3)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (90, ValueError), (-10.0, ValueError), (float("nan"), ValueError),
                                        (float("inf"), ValueError), ("40", TypeError), (True, TypeError)])
def test_alpha_is_an_angle_in_degrees_below_90(bad, error):
    x, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(error, match="alpha"):
        mk.angular_loss(x, labels, alpha=bad)
    with pytest.raises(error, match="alpha"):
        mk.AngularLoss(alpha=bad)


def test_the_fused_path_gives_nca_the_pairs_centres(monkeypatch):
    """The fused backends compute the sum over the negatives with nca_rows on P centres against the M references (P
    the positive pairs): the largest tensor the loss forms is P x D, not P x M."""
    from metric_kernels import backends
    cpu = backends.resolve("cpu", torch.device("cpu"))
    calls = []
    original = cpu.nca_rows

    def recording(x, y, *args, **kwargs):
        calls.append((tuple(x.shape), tuple(y.shape), kwargs["softmax_scale"]))
        return original(x, y, *args, **kwargs)

    monkeypatch.setattr(cpu, "nca_rows", recording)
    g = torch.Generator().manual_seed(2)
    x, labels = torch.randn(50, 7, generator=g), torch.randint(0, 5, (50,), generator=g)
    mk.angular_loss(x, labels, alpha=40.0, backend="cpu")
    pairs = positive_pairs(labels, labels, 0)[0].shape[0]
    assert calls == [((pairs, 7), (50, 7), pytest.approx(4 * math.tan(math.radians(40.0)) ** 2))]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compiles(backend):
    """torch.compile traces the loss (the pairs' count is data-dependent: a graph break, not an error)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(24, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (24,), generator=g)
    compiled = torch.compile(lambda x, labels: mk.angular_loss(x, labels, backend=backend))
    value = compiled(x, labels)
    expected = mk.angular_loss(x, labels, backend=backend)
    assert_rel_close(value, expected, 1e-6, "compiled")
    assert_rel_close(grads(value, [x])[0], grads(expected, [x])[0], 1e-5, "compiled gradient")
