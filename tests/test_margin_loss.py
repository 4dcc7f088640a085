"""MarginLoss over all triplets: the reference (the whole functional and module path) equals pytorch-metric-learning's
MarginLoss in float64 (1e-10 relative, values and gradients, beta's gradient too), with every reducer it takes and
the distances; the modules' keywords and errors. The fused backends are checked against the reference in
tests/test_fused.py."""
import copy

import pytest
import torch

import metric_kernels as mk
from tests.helpers import assert_rel_close, grads, random_pair_case

TOL = 1e-10
losses = pytest.importorskip("pytorch_metric_learning.losses")
reducers = pytest.importorskip("pytorch_metric_learning.reducers")
distances = pytest.importorskip("pytorch_metric_learning.distances")
lmu = pytest.importorskip("pytorch_metric_learning.utils.loss_and_miner_utils")

REDUCERS = {"divisor": None, "mean_nonzero": reducers.AvgNonZeroReducer, "mean": reducers.MeanReducer,
            "sum": reducers.SumReducer}


def _params(seed):
    g = torch.Generator().manual_seed(50_000 + seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()  # noqa: E731
    return dict(margin=u(0.0, 0.5), beta=u(0.4, 1.6), nu=u(0.0, 0.3))


def _triplets_without_self(labels, ref_labels, self_offset):
    """Every (anchor, positive, negative) of the queries against the references, less query i's own row i + k."""
    a, p, n = lmu.get_all_triplets_indices(labels, ref_labels)
    own = a + self_offset
    keep = (p != own) & (n != own)
    return a[keep], p[keep], n[keep]


@pytest.mark.parametrize("reduction", list(REDUCERS))
@pytest.mark.parametrize("block", range(2))
def test_margin_loss_equals_pml(block, reduction):
    """Random sizes, dims, classes, with and without ref_emb and self_offset (PML: its own triplets without the
    query's row), beta learned (its gradient compared) with PML's regularizer."""
    for seed in range(block * 15, (block + 1) * 15):
        case = random_pair_case(800_000 + seed, max_rows=60)
        params = _params(seed)
        pml_reducer = REDUCERS[reduction]
        theirs = losses.MarginLoss(margin=params["margin"], nu=params["nu"], beta=params["beta"], learn_beta=True,
                                   **({} if pml_reducer is None else dict(reducer=pml_reducer()))).double()
        beta = theirs.beta.detach().clone().requires_grad_()
        indices = None
        if case.self_offset is not None:
            indices = _triplets_without_self(case.labels, case.y_labels, case.self_offset)
        expected = theirs(case.x, case.labels, indices, case.y, case.y_labels)
        ours = mk.margin_loss(case.x, case.labels, case.y, case.y_labels, margin=params["margin"], beta=beta,
                              nu=params["nu"], self_offset=case.self_offset, reduction=reduction,
                              backend="reference")
        what = f"margin seed={seed} N={case.x.shape[0]} offset={case.self_offset} {reduction} {params}"
        assert_rel_close(ours, expected, TOL, what + " value")
        if not expected.requires_grad:  # PML's zero_losses: no triplet
            assert ours.item() == 0
            continue
        floor = 1e-3 * abs(expected.item())
        for index, (a, b) in enumerate(zip(grads(ours, case.inputs + [beta]),
                                           grads(expected, case.inputs + [theirs.beta]))):
            assert_rel_close(a, b, TOL, f"{what} grad {index}", scale_floor=floor)


@pytest.mark.parametrize("distance", ["cosine", "dot", "lp2", "lp_raw"])
def test_margin_loss_distances_equal_pml(distance):
    make, options, beta = {
        "cosine": (distances.CosineSimilarity, dict(distance="cosine"), 0.3),
        "dot": (lambda: distances.DotProductSimilarity(normalize_embeddings=False),
                dict(distance="dot", normalize_embeddings=False), 0.5),
        "lp2": (lambda: distances.LpDistance(power=2), dict(distance="squared_euclidean"), 1.5),
        "lp_raw": (lambda: distances.LpDistance(normalize_embeddings=False),
                   dict(distance="euclidean", normalize_embeddings=False), 4.0),
    }[distance]
    for seed in range(6):
        case = random_pair_case(810_000 + seed, max_rows=50, allow_self_offset=False)
        theirs = losses.MarginLoss(margin=0.2, beta=beta, learn_beta=True, distance=make()).double()
        ours = mk.MarginLoss(margin=0.2, beta=beta, learn_beta=True, distance=make(), backend="reference").double()
        expected = theirs(case.x, case.labels, None, case.y, case.y_labels)
        value = ours(case.x, case.labels, None, case.y, case.y_labels)
        assert_rel_close(value, expected, TOL, f"{distance} seed={seed}")
        if expected.requires_grad:
            for a, b in zip(grads(value, case.inputs + [ours.beta]), grads(expected, case.inputs + [theirs.beta])):
                assert_rel_close(a, b, TOL, f"{distance} seed={seed} gradient", scale_floor=1e-3 * expected.item())


@pytest.mark.parametrize("learn_beta", [False, True])
@pytest.mark.parametrize("reducer", [None, "AvgNonZeroReducer", "MeanReducer", "SumReducer", "DivisorReducer"])
def test_margin_module_equals_pml(reducer, learn_beta):
    """The module with PML's keywords; the same beta; nu's regularizer only with learn_beta, as PML's."""
    make = (lambda: {}) if reducer is None else (lambda: dict(reducer=getattr(reducers, reducer)()))
    theirs = losses.MarginLoss(0.3, 0.2, 0.9, learn_beta=learn_beta, **make()).double()
    ours = mk.MarginLoss(0.3, 0.2, 0.9, learn_beta=learn_beta, backend="reference", **make()).double()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (40,), generator=g)
    expected, value = theirs(x, labels), ours(x, labels)
    assert_rel_close(value, expected, TOL, "value")
    inputs_ours, inputs_theirs = [x] + list(ours.parameters()), [x] + list(theirs.parameters())
    assert len(inputs_ours) == len(inputs_theirs) == 1 + learn_beta
    for a, b in zip(grads(value, inputs_ours), grads(expected, inputs_theirs)):
        assert_rel_close(a, b, TOL, "gradient", scale_floor=1e-3 * expected.item())


def test_margin_without_triplets_is_zero_as_pml():
    """PML returns zero losses (and no regularizer) when there is no triplet: one class, or all labels distinct."""
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    for labels in (torch.zeros(6, dtype=torch.long), torch.arange(6)):
        theirs = losses.MarginLoss(nu=0.5, learn_beta=True).double()
        ours = mk.MarginLoss(nu=0.5, learn_beta=True).double()
        assert theirs(x, labels).item() == 0
        value = ours(x, labels)
        assert value.item() == 0
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads(value, [x, ours.beta]))


def test_margin_module_defaults_keywords_and_errors():
    module = mk.MarginLoss()
    assert (module.margin, module.nu, float(module.beta), module.learn_beta) == (0.2, 0.0, pytest.approx(1.2), False)
    assert module.reduction == "divisor" and list(module.parameters()) == []
    assert isinstance(mk.MarginLoss(learn_beta=True).beta, torch.nn.Parameter)
    assert mk.MarginLoss(reduction="mean").reduction == "mean"
    assert mk.MarginLoss(reducer=reducers.MeanReducer()).reduction == "mean"
    with pytest.raises(NotImplementedError, match="num_classes"):
        mk.MarginLoss(num_classes=4)
    with pytest.raises(NotImplementedError, match="triplets_per_anchor"):
        mk.MarginLoss(triplets_per_anchor=5)
    for reducer in (reducers.DoNothingReducer(), reducers.PerAnchorReducer()):
        with pytest.raises(NotImplementedError, match="reducer="):
            mk.MarginLoss(reducer=reducer)
    with pytest.raises(ValueError, match="conflicts"):
        mk.MarginLoss(reduction="sum", reducer=reducers.MeanReducer())
    with pytest.raises(ValueError, match="reduction"):
        mk.MarginLoss(reduction="bogus")
    x, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="reduction"):
        mk.margin_loss(x, labels, reduction="bogus")
    with pytest.raises(TypeError, match="beta"):
        mk.margin_loss(x, labels, beta=torch.ones(2))
    with pytest.raises(TypeError, match="beta"):
        mk.margin_loss(x, labels, beta="1")
    with pytest.raises(ValueError, match="beta"):
        mk.margin_loss(x, labels, beta=float("nan"))
    with pytest.raises((TypeError, ValueError), match="margin"):
        mk.margin_loss(x, labels, margin=None)
    with pytest.raises((TypeError, ValueError), match="nu"):
        mk.margin_loss(x, labels, nu=float("inf"))


def test_margin_none_reduction_is_each_querys_triplet_sum():
    """reduction="none": query i's sum over its triplets; their sum is reduction="sum" without the regularizer."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(25, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (25,), generator=g)
    theirs = losses.MarginLoss(reducer=reducers.SumReducer())
    beta = float(theirs.beta)  # PML keeps beta in a float32 tensor
    rows = mk.margin_loss(x, labels, beta=beta, reduction="none", backend="reference")
    for i in (0, 7, 24):
        a, p, n = lmu.get_all_triplets_indices(labels)
        keep = a == i
        one = theirs(x, labels, (a[keep], p[keep], n[keep])) if keep.any() else x.new_zeros(())
        assert_rel_close(rows[i], one, TOL, f"query {i}")
    assert_rel_close(rows.sum(), mk.margin_loss(x, labels, beta=beta, reduction="sum", backend="reference"), TOL,
                     "sum")
    assert copy.deepcopy(mk.MarginLoss(learn_beta=True)).beta.requires_grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_margin_regularizer_with_a_number_beta(dtype):
    """nu * beta is added in the loss's dtype (a float beta too), and only where there is a triplet."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, 4, (20,), generator=g)
    with_nu, without = mk.margin_loss(x, labels, beta=1.1, nu=0.3), mk.margin_loss(x, labels, beta=1.1)
    assert with_nu.dtype == dtype
    assert_rel_close(with_nu - without, torch.tensor(0.3 * 1.1, dtype=dtype), 1e-12 if dtype == torch.float64 else 1e-6,
                     "nu * beta")
    assert mk.margin_loss(x, torch.arange(20), beta=1.1, nu=0.3).item() == 0
