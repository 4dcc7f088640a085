"""The reference backend equals pytorch-metric-learning in float64 (1e-10 relative, values and gradients).

200 seeded random cases per loss: sizes 1..300, dims 1..128, few and many classes, with and without ref_emb, and with
self_offset (which PML lacks: emulated through PML's own indices_tuple, or a per-query loop for batch-hard).
"""
import contextlib
import math

import pytest
import torch

import metric_kernels as mk
from metric_kernels import pml
from metric_kernels.pml import exact_cdist
from metric_kernels.reference import ntxent_rows
from tests.helpers import assert_grads_close, assert_rel_close, random_pair_case

CASES_PER_LOSS = 200
BLOCKS = 10
TOL = 1e-10
SEED_BASE = {"circle": 0, "supcon": 100_000, "batch_hard_triplet": 200_000, "multi_similarity": 300_000,
             "ntxent": 400_000, "contrastive": 500_000, "generalized_lifted_structure": 700_000,
             "tuplet_margin": 800_000, "triplet_margin": 900_000, "angular": 1_000_000,
             "lifted_structure": 1_100_000}
PAIR_LOSSES = ["circle", "supcon", "multi_similarity", "batch_hard_triplet", "ntxent", "tuplet_margin", "contrastive",
               "generalized_lifted_structure", "triplet_margin", "angular", "lifted_structure"]
# PML's default reducer for each loss: AvgNonZeroReducer, except MeanReducer for these (they keep the base class's)
MEAN_REDUCER_LOSSES = ("multi_similarity", "ntxent", "tuplet_margin", "generalized_lifted_structure", "angular",
                       "lifted_structure")
# PML's TupletMarginLoss takes each pair loss log(1 + e^x) as torch.logsumexp([x, 0]), the log of the rounded 1 + e^x:
# an absolute error up to about an ulp of 1 (2.2e-16), which a pair loss of 1e-7 sees as 2e-9 relative. Ours is
# log1p-accurate, so its values are judged against max(|PML's|, this floor) (4 ulps of 1 at TOL).
VALUE_FLOOR = {"tuplet_margin": 4 * torch.finfo(torch.float64).eps / TOL}


def _pairs_without_self(labels, ref_labels, self_offset):
    """PML's (a1, p, a2, n) indices_tuple of every pair except query i with reference i + self_offset."""
    same = labels[:, None] == ref_labels[None, :]
    allowed = torch.ones_like(same)
    rows = torch.arange(labels.shape[0])
    allowed[rows, rows + self_offset] = False
    a1, p = torch.where(same & allowed)
    a2, n = torch.where(~same & allowed)
    return a1, p, a2, n


def _random_params(seed, loss):
    g = torch.Generator().manual_seed(10_000 + seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()
    if loss == "circle":
        return dict(m=u(0.1, 0.5), gamma=u(10, 300))
    if loss in ("supcon", "ntxent"):
        return dict(temperature=u(0.03, 1.0))
    if loss == "tuplet_margin":
        return dict(margin=u(-10.0, 30.0), scale=u(2.0, 80.0))
    if loss == "contrastive":
        return dict(pos_margin=u(0.0, 0.6), neg_margin=u(0.4, 1.6))
    if loss == "triplet_margin":
        return dict(margin=u(-0.2, 0.6), smooth_loss=bool(torch.rand((), generator=g) < 0.5))
    if loss == "angular":
        return dict(alpha=u(10.0, 60.0))
    if loss in ("generalized_lifted_structure", "lifted_structure"):
        return dict(pos_margin=u(-0.5, 0.6), neg_margin=u(0.0, 2.5))
    if loss == "multi_similarity":
        return dict(alpha=u(0.5, 10.0), beta=u(5.0, 80.0), base=u(-0.2, 0.9))
    if loss == "batch_hard_triplet":
        return dict(margin=u(0.0, 0.5), soft=bool(torch.rand((), generator=g) < 0.5),
                    normalize_embeddings=bool(torch.rand((), generator=g) < 0.7))
    return dict(margin=u(0.0, 0.3), alpha=u(1.0, 64.0))


def _pml_value(loss, case, params):
    """PML's value; batch-hard with exact distances, as our batch-hard reference computes them (the other references
    form their distances with torch.cdist as PML does)."""
    with exact_cdist() if loss == "batch_hard_triplet" else contextlib.nullcontext():
        return _pml_value_exact(loss, case, params)


def _pml_value_exact(loss, case, params):
    if loss == "batch_hard_triplet" and case.self_offset is not None:
        # One PML call per query, with the query's own row removed from the references.
        total = case.x.new_zeros(())
        for i in range(case.x.shape[0]):
            keep = torch.arange(case.y.shape[0]) != i + case.self_offset
            total = total + pml.batch_hard_triplet_loss(case.x[i:i + 1], case.labels[i:i + 1], case.y[keep],
                                                        case.y_labels[keep], **params)
        return total, "sum"
    kwargs = {}
    if case.self_offset is not None:
        kwargs["indices_tuple"] = _pairs_without_self(case.labels, case.y_labels, case.self_offset)
    fn = getattr(pml, f"{loss}_loss")
    reduction = "mean" if loss in MEAN_REDUCER_LOSSES else "mean_nonzero"
    return fn(case.x, case.labels, case.y, case.y_labels, **params, **kwargs), reduction


@pytest.mark.parametrize("block", range(BLOCKS))
@pytest.mark.parametrize("loss", PAIR_LOSSES)
def test_pair_losses_equal_pml(loss, block):
    per_block = CASES_PER_LOSS // BLOCKS
    for seed in range(block * per_block, (block + 1) * per_block):
        # PML's NT-Xent and LiftedStructureLoss hold a (positive pairs) x (negative pairs) matrix, its
        # TripletMarginLoss every triplet's indices: 100 rows keep them under 200 MB
        rows = 100 if loss in ("ntxent", "tuplet_margin", "triplet_margin", "lifted_structure") else 300
        case = random_pair_case(SEED_BASE[loss] + seed, max_rows=rows,
                                max_offset_rows=40 if loss == "batch_hard_triplet" else rows)
        params = _random_params(seed, loss)
        expected, reduction = _pml_value(loss, case, params)
        ours = getattr(mk, f"{loss}_loss")(case.x, case.labels, case.y, case.y_labels, self_offset=case.self_offset,
                                           reduction=reduction, backend="reference", **params)
        what = f"{loss} seed={seed} N={case.x.shape[0]} D={case.x.shape[1]} " \
               f"M={None if case.y is None else case.y.shape[0]} offset={case.self_offset} {params}"
        assert ours.dtype == torch.float64
        assert_rel_close(ours, expected, TOL, what + " value", scale_floor=VALUE_FLOOR.get(loss, 0.0))
        _assert_grads_close_to_pml(loss, case, ours, expected, what)


def _assert_grads_close_to_pml(loss, case, ours, expected, what):
    """Gradients equal PML's; except the tuplet margin loss on 1-D rows, whose normalised rows are +-1 (every cosine
    is +-1, where PML's acos makes the gradient NaN, test_tuplet_margin_of_a_parallel_positive_pair_is_finite...):
    there ours are 0, as every gradient through the normalisation of a 1-D row is."""
    if loss == "tuplet_margin" and case.x.shape[1] == 1:
        for leaf in case.inputs:
            (grad,) = torch.autograd.grad(ours, leaf, retain_graph=True, allow_unused=True)
            assert grad is None or torch.equal(grad, torch.zeros_like(grad)), what
        return
    assert_grads_close(ours, expected, case.inputs, TOL, what)


@pytest.mark.parametrize("block", range(BLOCKS))
def test_proxy_anchor_equals_pml(block):
    per_block = CASES_PER_LOSS // BLOCKS
    for seed in range(block * per_block, (block + 1) * per_block):
        g = torch.Generator().manual_seed(seed)
        n = torch.randint(1, 301, (), generator=g).item()
        dim = torch.randint(1, 129, (), generator=g).item()
        classes = torch.randint(1, 60, (), generator=g).item()
        used = torch.randint(1, classes + 1, (), generator=g).item()  # few or many of the classes present
        x = torch.randn(n, dim, generator=g, dtype=torch.float64, requires_grad=True)
        proxies = torch.randn(classes, dim, generator=g, dtype=torch.float64, requires_grad=True)
        labels = torch.randperm(classes, generator=g)[:used][torch.randint(0, used, (n,), generator=g)]
        params = _random_params(seed, "proxy_anchor")
        ours = mk.proxy_anchor_loss(x, labels, proxies, backend="reference", **params)
        expected = pml.proxy_anchor_loss(x, labels, proxies, **params)
        what = f"proxy_anchor seed={seed} N={n} D={dim} C={classes} used={used} {params}"
        assert_rel_close(ours, expected, TOL, what + " value")
        assert_grads_close(ours, expected, [x, proxies], TOL, what)


def _pml_rows(loss, x, labels, y, y_labels, **params):
    """PML's per-query losses (DoNothingReducer), scattered to one entry per query."""
    with exact_cdist():
        return _pml_rows_exact(loss, x, labels, y, y_labels, **params)


def _pml_rows_exact(loss, x, labels, y, y_labels, **params):
    from pytorch_metric_learning import distances, losses, miners, reducers
    reducer = reducers.DoNothingReducer()
    if loss == "batch_hard_triplet":
        distance = distances.LpDistance(normalize_embeddings=params["normalize_embeddings"])
        triplets = miners.BatchHardMiner(distance=distance)(x, labels, y, y_labels)
        out = losses.TripletMarginLoss(margin=params["margin"], smooth_loss=params["soft"], distance=distance,
                                       reducer=reducer)(x, labels, triplets, y, y_labels)
    else:
        cls = {"circle": losses.CircleLoss, "supcon": losses.SupConLoss,
               "multi_similarity": losses.MultiSimilarityLoss,
               "generalized_lifted_structure": losses.GeneralizedLiftedStructureLoss}[loss]
        out = cls(**params, reducer=reducer)(x, labels, None, y, y_labels)
    rows = x.new_zeros(x.shape[0])
    info = out["loss"]
    if info["reduction_type"] == "already_reduced":
        return rows + info["losses"]
    index = info["indices"][0] if isinstance(info["indices"], tuple) else info["indices"]
    return rows.index_add(0, index, info["losses"].reshape(-1))


@pytest.mark.parametrize("loss", ["circle", "supcon", "multi_similarity", "generalized_lifted_structure",
                                  "batch_hard_triplet"])
def test_every_reduction_matches_pml_rows(loss):
    """'none' equals PML's unreduced losses; 'sum', 'mean' and 'mean_nonzero' reduce exactly those rows."""
    for seed in range(30):
        case = random_pair_case(50_000 + seed, max_rows=80, allow_self_offset=False)
        params = _random_params(seed, loss)
        expected = _pml_rows(loss, case.x, case.labels, case.y, case.y_labels, **params)
        fn = getattr(mk, f"{loss}_loss")
        call = lambda reduction: fn(case.x, case.labels, case.y, case.y_labels, reduction=reduction,
                                    backend="reference", **params)
        rows = call("none")
        assert_rel_close(rows, expected, TOL, f"{loss} seed={seed} rows")
        assert_rel_close(call("sum"), expected.sum(), TOL, "sum")
        assert_rel_close(call("mean"), expected.mean(), TOL, "mean")
        positive = expected[expected > 0]
        assert_rel_close(call("mean_nonzero"), positive.mean() if positive.numel() else expected.sum() * 0, TOL,
                         "mean_nonzero")
        assert_grads_close(call("sum"), expected.sum(), case.inputs, TOL, f"{loss} seed={seed} sum")


@pytest.mark.parametrize("loss", ["circle", "supcon", "multi_similarity", "ntxent", "tuplet_margin", "contrastive",
                                  "generalized_lifted_structure"])
def test_pml_generic_pair_rule_is_followed(loss):
    """PML's GenericPairLoss returns 0 when the batch has at most one positive and at most one negative pair, even
    though such a batch has a defined loss; SPEC.md does not say so, PML does, and we follow PML."""
    x = torch.randn(1, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    labels, y_labels = torch.tensor([0]), torch.tensor([0, 1])  # one positive pair, one negative pair
    fn = getattr(mk, f"{loss}_loss")
    assert getattr(pml, f"{loss}_loss")(x, labels, y, y_labels).item() == 0
    assert fn(x, labels, y, y_labels).item() == 0
    rows = fn(x, labels, y, y_labels, reduction="none")
    assert rows.shape == (1,) and rows.item() == 0
    # One more pair of either kind and both compute a positive loss again.
    for more_labels in (torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1])):
        y3 = torch.randn(3, 8, dtype=torch.float64)
        theirs = getattr(pml, f"{loss}_loss")(x, labels, y3, more_labels)
        ours = fn(x, labels, y3, more_labels)
        assert ours.item() > 0
        assert_rel_close(ours, theirs, TOL, "three references", scale_floor=VALUE_FLOOR.get(loss, 0.0))


def test_ref_emb_is_never_paired_with_itself_by_identity():
    """PML drops the diagonal whenever ref_labels *is* labels (the same Python object); we follow SPEC.md: with
    ref_emb nothing is left out unless self_offset says so, whatever objects are passed. self_offset=0 gives PML's."""
    x = torch.randn(12, 8, dtype=torch.float64)
    labels = torch.randint(0, 3, (12,))
    ours = mk.circle_loss(x, labels, x, labels)
    pml_same_object = pml.circle_loss(x, labels, x, labels)
    pml_copy = pml.circle_loss(x, labels, x, labels.clone())
    assert_rel_close(ours, pml_copy, TOL, "no pair left out")
    assert_rel_close(mk.circle_loss(x, labels, x, labels, self_offset=0), pml_same_object, TOL, "self_offset=0")
    assert_rel_close(mk.circle_loss(x, labels, x, labels, self_offset=0), mk.circle_loss(x, labels), TOL, "no ref")


def test_multi_similarity_default_reduction_is_pmls_mean_reducer():
    """SPEC.md lists reduction="mean_nonzero" for Multi-Similarity, but PML's MultiSimilarityLoss keeps the base
    class's MeanReducer (it does not override get_default_reducer as CircleLoss and SupConLoss do): we follow PML,
    in the functional default and the module's. The batch has rows that are exactly 0, so the two means differ."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(24, 16, generator=g, dtype=torch.float64, requires_grad=True)
    # the first 12 rows in pairs, the other 12 alone: a row without a positive whose negatives' term rounds to 0
    labels = torch.cat([torch.arange(12) // 2, torch.arange(12) + 100])
    expected = pml.multi_similarity_loss(x, labels, alpha=2.0, beta=200.0, base=1.0)
    rows = mk.multi_similarity_loss(x, labels, alpha=2.0, beta=200.0, base=1.0, reduction="none")
    assert (rows == 0).any() and (rows > 0).any()
    for ours in (mk.multi_similarity_loss(x, labels, alpha=2.0, beta=200.0, base=1.0),
                 mk.MultiSimilarityLoss(2.0, 200.0, 1.0)(x, labels)):
        assert_rel_close(ours, expected, TOL, "default reduction")
        assert_rel_close(ours, rows.mean(), TOL, "the mean over every query")
    assert mk.MultiSimilarityLoss().reduction == "mean"


def _pml_pair_reduced(loss, case, params, reducer):
    from pytorch_metric_learning import reducers
    with exact_cdist():
        return getattr(pml, f"{loss}_loss")(case.x, case.labels, case.y, case.y_labels, **params,
                                            reducer=getattr(reducers, reducer)())


def _pml_query_sums(loss, case, params):
    """PML's per-pair losses (DoNothingReducer) added up per query: our reduction="none"."""
    out = _pml_pair_reduced(loss, case, params, "DoNothingReducer")
    rows = case.x.new_zeros(case.x.shape[0])
    for info in out.values():
        if info["reduction_type"] == "already_reduced" or not torch.is_tensor(info["losses"]):
            rows = rows + info["losses"]
        else:
            rows = rows.index_add(0, info["indices"][0], info["losses"].reshape(-1))
    return rows


@pytest.mark.parametrize("loss", ["ntxent", "tuplet_margin", "contrastive", "triplet_margin", "angular",
                                  "lifted_structure"])
def test_pair_reduced_losses_match_every_pml_reducer(loss):
    """NT-Xent and Contrastive are reduced per pair in PML, TripletMarginLoss per triplet: AvgNonZeroReducer
    ("mean_nonzero"), MeanReducer ("mean") and SumReducer ("sum") over the pairs (triplets), each of Contrastive's
    two sides apart; DoNothingReducer's per-pair (per-triplet) losses added up per query are reduction="none"."""
    for seed in range(40):
        case = random_pair_case(60_000 + seed, max_rows=80)
        params = _random_params(seed, loss)
        what = f"{loss} seed={seed} N={case.x.shape[0]} offset={case.self_offset} {params}"
        if case.self_offset is not None:
            continue  # PML has no self_offset; the seeded cases above cover it through indices_tuple
        fn = getattr(mk, f"{loss}_loss")
        call = lambda reduction: fn(case.x, case.labels, case.y, case.y_labels, reduction=reduction,
                                    backend="reference", **params)
        for reduction, reducer in (("mean_nonzero", "AvgNonZeroReducer"), ("mean", "MeanReducer"),
                                   ("sum", "SumReducer")):
            expected = _pml_pair_reduced(loss, case, params, reducer)
            ours = call(reduction)
            assert_rel_close(ours, expected, TOL, f"{what} {reduction}", scale_floor=VALUE_FLOOR.get(loss, 0.0))
            _assert_grads_close_to_pml(loss, case, ours, expected, f"{what} {reduction}")
        assert_rel_close(call("none"), _pml_query_sums(loss, case, params), TOL, f"{what} none")


def test_ntxent_default_reduction_is_pmls_mean_reducer():
    """SPEC.md lists reduction="mean_nonzero" for NT-Xent, but PML's NTXentLoss keeps the base class's MeanReducer:
    we follow PML. The batch's embeddings are well separated, so that PML rounds some pair losses to exactly 0 and
    the two means differ."""
    x, labels = _separated_and_overlapping(torch.float64)
    x.requires_grad_()
    expected = pml.ntxent_loss(x, labels, temperature=0.01)
    for ours in (mk.ntxent_loss(x, labels, temperature=0.01), mk.NTXentLoss(0.01)(x, labels)):
        assert_rel_close(ours, expected, TOL, "default reduction")
        assert_grads_close(ours, expected, [x], TOL, "default reduction")
    assert mk.NTXentLoss().reduction == "mean"
    nonzero = mk.ntxent_loss(x, labels, temperature=0.01, reduction="mean_nonzero")
    assert_rel_close(nonzero, pml.ntxent_loss(x, labels, temperature=0.01, reducer=_reducer("AvgNonZeroReducer")),
                     TOL, "mean_nonzero")
    assert nonzero.item() > 1.5 * expected.item()  # the pairs PML rounds to 0 are left out of this mean


def _separated_and_overlapping(dtype):
    """Four tight classes around distinct centres (their pair losses round to 0 in PML) and two classes around one
    centre (pair losses of order 1)."""
    g = torch.Generator().manual_seed(3)
    centres = torch.nn.functional.normalize(torch.randn(5, 32, generator=g, dtype=dtype), dim=1)
    labels = torch.arange(36) % 6
    noise = torch.where(labels[:, None] < 4, 0.01, 0.5).to(dtype)
    x = centres[labels.clamp(max=4)] + noise * torch.randn(36, 32, generator=g, dtype=dtype)
    return x, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ntxent_nonzero_pairs_are_pmls(dtype):
    """AvgNonZeroReducer averages over the pair losses PML does not round to 0 (the ratio of exponentials rounds to 1
    when the negatives are far below the positive): our count is PML's, in fp32 and fp64."""
    from pytorch_metric_learning import reducers
    x, labels = _separated_and_overlapping(dtype)
    counts = set()
    for temperature in (0.005, 0.01, 0.03, 0.1):
        out = pml.ntxent_loss(x, labels, temperature=temperature, reducer=reducers.DoNothingReducer())
        pml_nonzero = int((out["loss"]["losses"] > 0).sum())
        _, nonzero = ntxent_rows(torch.nn.functional.normalize(x, dim=1),
                                              torch.nn.functional.normalize(x, dim=1), labels, labels, 0,
                                              temperature=temperature)
        assert int(nonzero.sum()) == pml_nonzero, f"t={temperature}"
        counts.add(pml_nonzero)
    assert len(counts) > 1  # the temperatures round different numbers of pairs to 0


def _reducer(name):
    from pytorch_metric_learning import reducers
    return getattr(reducers, name)()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tuplet_margin_nonzero_pairs_are_pmls(dtype):
    """PML's TupletMarginLoss rounds a pair loss to exactly 0 where its logsumexp of the negatives' terms and 0 is 0
    (1 + exp(x) rounds to 1): AvgNonZeroReducer's count is PML's, in fp32 and fp64."""
    from pytorch_metric_learning import reducers
    x, labels = _separated_and_overlapping(dtype)
    counts = set()
    # PML adds each negative's exp(x_n) and the 1 of its appended 0 in torch's own order, so a pair whose exp(x)
    # lies between half an ulp of 1 and that times the number of terms rounds either way: the scales here leave no
    # pair in that band (checked below), and the count is then the rule's.
    for scale in (20.0, 64.0, 300.0 if dtype == torch.float32 else 400.0):
        assert not _tuplet_pairs_in_the_rounding_band(x, labels, scale, 3.0, dtype), f"scale={scale}"
        out = pml.tuplet_margin_loss(x, labels, margin=3.0, scale=scale, reducer=reducers.DoNothingReducer())
        pml_nonzero = int((out["loss"]["losses"] > 0).sum())
        u = torch.nn.functional.normalize(x, dim=1)
        _, nonzero = ntxent_rows(u, u, labels, labels, 0, temperature=1.0 / scale, angular_margin=math.radians(3.0))
        assert int(nonzero.sum()) == pml_nonzero, f"scale={scale}"
        for backend in ("cpu", "cuda-emulated"):
            ours = mk.tuplet_margin_loss(x, labels, margin=3.0, scale=scale, reduction="mean_nonzero", backend=backend)
            expected = pml.tuplet_margin_loss(x, labels, margin=3.0, scale=scale,
                                              reducer=reducers.AvgNonZeroReducer())
            assert_rel_close(ours, expected, 1e-5 if dtype == torch.float32 else TOL, f"{backend} scale={scale}")
        counts.add(pml_nonzero)
    assert len(counts) > 1  # the scales round different numbers of pairs to 0


def _tuplet_pairs_in_the_rounding_band(x, labels, scale, margin, dtype):
    """The positive pairs whose exp(x) (x = A - scale cos(theta - margin), in float64) lies within [eps / 2,
    (negatives + 1) eps / 2] of the dtype, with a little room: PML's rounding of their loss to 0 depends on its
    summation order."""
    u = torch.nn.functional.normalize(x.double(), dim=1)
    s = u @ u.T
    half_ulp = torch.finfo(dtype).eps / 2
    found = []
    for row in range(x.shape[0]):
        negative = labels != labels[row]
        lse = torch.logsumexp(scale * s[row, negative], 0)
        for col in range(x.shape[0]):
            if col != row and labels[col] == labels[row]:
                excess = float(lse - scale * torch.cos(torch.acos(s[row, col]) - math.radians(margin)))
                if math.log(half_ulp) - 0.01 < excess < math.log((int(negative.sum()) + 1) * half_ulp) + 0.01:
                    found.append((row, col))
    return found


def test_tuplet_margin_of_a_parallel_positive_pair_is_finite_where_pmls_is_nan():
    """A positive pair at angle 0 (a duplicated embedding): PML's acos has an infinite slope there and its gradient
    is NaN; ours takes the angle's gradient as 0, as torch.cdist's at distance 0 (SPEC's rule for batch-hard), and
    its value is PML's. Pinned: every backend gives the reference's finite value and gradients."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    x[1] = 2 * x[0]  # parallel rows of one class
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 3])
    leaf = x.clone().requires_grad_()
    theirs = pml.tuplet_margin_loss(leaf, labels, margin=6.0, scale=16.0)
    (their_grad,) = torch.autograd.grad(theirs, leaf)
    assert torch.isfinite(theirs) and not torch.isfinite(their_grad).all()
    expected, expected_grad = None, None
    for backend in ("reference", "cpu", "cuda-emulated"):
        leaf = x.clone().requires_grad_()
        ours = mk.tuplet_margin_loss(leaf, labels, margin=6.0, scale=16.0, backend=backend)
        (grad,) = torch.autograd.grad(ours, leaf)
        assert_rel_close(ours, theirs, TOL, f"{backend} value")
        assert torch.isfinite(grad).all(), backend
        if expected is None:
            expected, expected_grad = ours, grad
        assert_rel_close(grad, expected_grad, 1e-10, f"{backend} grad")
