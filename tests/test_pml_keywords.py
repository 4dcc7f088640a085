"""PML's constructor keywords (issue 12 item 1, the keywords): every module built the ways PML users build it equals
PML's class built the same way, values and gradients, in float64 (1e-10) and float32 (1e-5 values, 1e-4 gradients,
against PML in float64 on the same rounded inputs). Each keyword value the fused kernels cannot honour raises
NotImplementedError naming the keyword, the value and the module; each intended difference from PML is pinned with
its reason.

What PML does with each reducer (pytorch-metric-learning 2.x), and how it maps:
  Circle, SupCon (one "element" loss per query): AvgNonZero -> "mean_nonzero", Mean -> "mean", Sum -> "sum",
    DoNothing -> PML's loss dictionary (Circle's losses an N x 1 column, SupCon's a vector), PerAnchor(R) -> R.
  Batch-hard (PML: BatchHardMiner + TripletMarginLoss, one "triplet" loss per query with a positive and a negative):
    AvgNonZero -> "mean_nonzero", Sum -> "sum", Mean -> the mean over those queries (not our "mean", which averages
    over all queries); PML's PerAnchorReducer raises NotImplementedError and DoNothing returns mined triplet indices:
    both NotImplementedError here.
  Proxy-Anchor (two per-proxy "element" sub-losses with divisors): None / Divisor -> sum/|P+| + sum/C; any other
    reducer reduces each sub-loss and adds the two (PML's MultipleReducers); DoNothing -> PML's loss dictionary.
"""
import subprocess
import sys

import pytest
import torch
from pytorch_metric_learning import distances, losses, miners, reducers
from pytorch_metric_learning.utils import common_functions as c_f

import metric_kernels as mk
from metric_kernels import _pml_keywords as keywords
from metric_kernels.pml import exact_cdist
from tests.helpers import assert_rel_close, grads

TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}  # (value, gradients) against PML in fp64
DTYPES = [torch.float64, torch.float32]

REDUCERS = {
    "default": lambda: None,
    "AvgNonZero": reducers.AvgNonZeroReducer,
    "Mean": reducers.MeanReducer,
    "Sum": reducers.SumReducer,
    "ThresholdLow0": lambda: reducers.ThresholdReducer(low=0),  # exactly AvgNonZeroReducer
    "DoNothing": reducers.DoNothingReducer,
    "PerAnchorAvgNonZero": lambda: reducers.PerAnchorReducer(reducers.AvgNonZeroReducer()),
    "PerAnchorMean": reducers.PerAnchorReducer,
    "PerAnchorSum": lambda: reducers.PerAnchorReducer(reducers.SumReducer()),
}
TRIPLET_REDUCERS = ["default", "AvgNonZero", "Mean", "Sum", "ThresholdLow0"]  # PML's PerAnchor / DoNothing: below
PAIR_REDUCERS = TRIPLET_REDUCERS
DISTANCES = {
    "implicit": lambda: None,
    "cosine": distances.CosineSimilarity,
    "lp": distances.LpDistance,  # PML's LpDistance(): normalize_embeddings=True, p=2, power=1
    "lp_raw": lambda: distances.LpDistance(normalize_embeddings=False),
    "dot": distances.DotProductSimilarity,  # PML's DotProductSimilarity(): normalize_embeddings=True, the cosine
    "dot_raw": lambda: distances.DotProductSimilarity(normalize_embeddings=False),
    "lp2": lambda: distances.LpDistance(power=2),
    "lp2_raw": lambda: distances.LpDistance(normalize_embeddings=False, power=2),
}
# The log-sum-exp losses' other distances (the engine's pair values), with the reducers that reduce differently.
OTHER_DISTANCES = ("dot_raw", "lp", "lp_raw", "lp2", "lp2_raw")
PAIR_CASES = ([("circle", r, d) for r in REDUCERS for d in ("implicit", "cosine")]
              + [("supcon", r, d) for r in REDUCERS for d in ("implicit", "cosine", "dot")]
              + [("supcon", r, d) for r in ("default", "Mean", "DoNothing") for d in OTHER_DISTANCES]
              + [("multi_similarity", r, d) for r in REDUCERS for d in ("implicit", "cosine")]
              # (not AvgNonZero here: with a distance, rows of 1e-20 in fp64 are 0 in fp32, and its count of
              # nonzero rows, so its mean, differs between fp32 and the fp64 oracle in PML as much as here)
              + [("multi_similarity", r, d) for r in ("default", "Sum") for d in OTHER_DISTANCES]
              + [("batch_hard", r, d) for r in TRIPLET_REDUCERS for d in ("implicit", "lp", "lp_raw")]
              # the losses PML reduces per pair: its reducers over pairs (DoNothing and PerAnchor: UNSUPPORTED)
              + [(loss, r, d) for loss in ("ntxent", "tuplet_margin", "contrastive") for r in PAIR_REDUCERS
                 for d in ("implicit", "cosine")]
              # (NT-Xent's AvgNonZero: as Multi-Similarity's above, the pairs rounded to 0 differ in fp32 and fp64)
              + [("ntxent", r, d) for r in ("default", "Sum") for d in ("dot",) + OTHER_DISTANCES]
              + [("contrastive", r, d) for r in PAIR_REDUCERS for d in ("dot", "dot_raw", "lp_raw", "lp2", "lp2_raw")]
              # TripletMarginLoss without a miner: every triplet, reduced per triplet
              + [("triplet_margin", r, d) for r in TRIPLET_REDUCERS for d in ("implicit", "cosine")]
              + [("triplet_margin", r, d) for r in ("default", "Sum") for d in ("dot",) + OTHER_DISTANCES]
              + [("generalized_lifted_structure", r, d) for r in REDUCERS for d in ("implicit", "cosine", "lp2")]
              + [("generalized_lifted_structure", r, d) for r in ("default", "Sum") for d in OTHER_DISTANCES]
              + [("nca", r, d) for r in REDUCERS for d in ("implicit", "cosine")]
              + [("nca", r, d) for r in ("default", "Sum") for d in ("dot",) + OTHER_DISTANCES])


def _keywords(reducer, distance):
    kw = {}
    if REDUCERS[reducer]() is not None:
        kw["reducer"] = REDUCERS[reducer]()
    if DISTANCES[distance]() is not None:
        kw["distance"] = DISTANCES[distance]()
    return kw


def _pair_modules(loss, reducer, distance, backend="reference"):
    """(ours, theirs): our module and PML's built with the same keywords, both called in PML's forward order
    (embeddings, labels, indices_tuple=None, ref_emb, ref_labels)."""
    kw = _keywords(reducer, distance)
    if loss == "circle":
        ours, pml_loss = mk.CircleLoss(m=0.3, gamma=60, backend=backend, **kw), losses.CircleLoss(m=0.3, gamma=60, **kw)
    elif loss == "supcon":
        ours, pml_loss = mk.SupConLoss(0.2, backend=backend, **kw), losses.SupConLoss(0.2, **kw)
    elif loss == "multi_similarity":
        ours = mk.MultiSimilarityLoss(2, 30, 0.4, backend=backend, **kw)
        pml_loss = losses.MultiSimilarityLoss(2, 30, 0.4, **kw)
    elif loss == "ntxent":
        ours, pml_loss = mk.NTXentLoss(0.3, backend=backend, **kw), losses.NTXentLoss(0.3, **kw)
    elif loss == "tuplet_margin":
        ours, pml_loss = mk.TupletMarginLoss(9.0, 5, backend=backend, **kw), losses.TupletMarginLoss(9.0, 5, **kw)
        if reducer.startswith("PerAnchor"):
            # PML's TupletMarginLoss returns its pair losses as a P x 1 column, which PML's PerAnchorReducer cannot
            # index (a RuntimeError); ours gives what that reducer makes of them as the vector they are.
            unreduced = losses.TupletMarginLoss(9.0, 5, reducer=reducers.DoNothingReducer(), **_keywords(
                "default", distance))

            def theirs(x, labels, indices_tuple, y, y_labels):
                entry = unreduced(x, labels, indices_tuple, y, y_labels)["loss"]
                flat = dict(entry, losses=entry["losses"].reshape(-1))
                return kw["reducer"]({"loss": flat}, x, labels)
            with pytest.raises(RuntimeError):
                g = torch.Generator().manual_seed(0)
                pml_loss(torch.randn(8, 4, generator=g), torch.arange(8) % 3)
            return ours, theirs
    elif loss == "generalized_lifted_structure":
        ours = mk.GeneralizedLiftedStructureLoss(1.1, 0.2, backend=backend, **kw)
        pml_loss = losses.GeneralizedLiftedStructureLoss(1.1, 0.2, **kw)
    elif loss == "nca":
        ours, pml_loss = mk.NCALoss(2.0, backend=backend, **kw), losses.NCALoss(2.0, **kw)
    elif loss in ("contrastive", "triplet_margin"):
        if loss == "contrastive":
            ours = mk.ContrastiveLoss(0.2, 1.1, backend=backend, **kw)
            pml_loss = losses.ContrastiveLoss(0.2, 1.1, **kw)
        else:
            ours = mk.TripletMarginLoss(0.15, smooth_loss=True, backend=backend, **kw)
            pml_loss = losses.TripletMarginLoss(0.15, smooth_loss=True, **kw)

        def theirs(x, labels, indices_tuple, y, y_labels):
            with exact_cdist():
                return pml_loss(x, labels, indices_tuple, y, y_labels)
        return ours, theirs
    else:
        ours = mk.BatchHardTripletLoss(margin=0.1, backend=backend, **kw)
        pml_loss = losses.TripletMarginLoss(margin=0.1, **kw)
        miner = miners.BatchHardMiner(**{k: v for k, v in kw.items() if k == "distance"})

        def theirs(x, labels, indices_tuple, y, y_labels):
            assert indices_tuple is None
            with exact_cdist():
                return pml_loss(x, labels, miner(x, labels, y, y_labels), y, y_labels)
        return ours, theirs
    return ours, pml_loss


def _pair_inputs(seed, refs):
    """Float64 rows with a query that has no positive (query 0's label is used nowhere else), so that "mean" and
    "mean_nonzero", and PML's MeanReducer over triplets and our "mean", all differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 12, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (20,), generator=g)
    labels[0] = 5
    if not refs:
        return [x], labels, None
    y = torch.randn(27, 12, generator=g, dtype=torch.float64)
    return [x, y], labels, torch.randint(0, 5, (27,), generator=g)


def _flatten(out):
    """A loss, or PML's loss dictionary: {name: (losses, the rest of the entry)}."""
    if isinstance(out, dict):
        return {name: (entry["losses"], {k: v for k, v in entry.items() if k != "losses"})
                for name, entry in out.items()}
    return {"": (out, {})}


def _assert_matches(ours, our_leaves, theirs, their_leaves, dtype, what):
    """Same structure; values and the gradients of their sum within TOLERANCE[dtype]."""
    ours, theirs = _flatten(ours), _flatten(theirs)
    assert ours.keys() == theirs.keys(), what
    value_tol, grad_tol = TOLERANCE[dtype]
    for name, ((value, rest), (expected, expected_rest)) in zip(ours, zip(ours.values(), theirs.values())):
        assert rest.keys() == expected_rest.keys(), f"{what} {name}"
        for key in rest:
            same = torch.equal if torch.is_tensor(rest[key]) else (lambda a, b: a == b)
            assert same(rest[key], expected_rest[key]), f"{what} {name} {key}"
        assert value.dtype == dtype, f"{what} {name}: dtype {value.dtype}"
        assert_rel_close(value, expected, value_tol, f"{what} {name} value")
    total = sum(value.sum() for value, _ in ours.values())
    expected_total = sum(value.sum() for value, _ in theirs.values())
    floor = 1e-3 * abs(expected_total.item())
    for index, (a, b) in enumerate(zip(grads(total, our_leaves), grads(expected_total, their_leaves))):
        assert_rel_close(a, b, grad_tol, f"{what} grad {index}", scale_floor=floor)


def _compare_pair(loss, reducer, distance, refs, dtype, backend, seed):
    leaves64, labels, y_labels = _pair_inputs(seed, refs)
    ours_fn, theirs_fn = _pair_modules(loss, reducer, distance, backend)
    mine = [t.to(dtype).requires_grad_() for t in leaves64]
    pml = [t.to(dtype).double().requires_grad_() for t in leaves64]  # PML in fp64 on the same rounded inputs
    call = lambda fn, leaves: fn(leaves[0], labels, None, leaves[1] if refs else None, y_labels)
    what = f"{loss} reducer={reducer} distance={distance} refs={refs} {dtype} {backend}"
    _assert_matches(call(ours_fn, mine), mine, call(theirs_fn, pml), pml, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("refs", [False, True], ids=["self", "ref_emb"])
@pytest.mark.parametrize("loss,reducer,distance", PAIR_CASES)
def test_pair_modules_with_pml_keywords_equal_pml(loss, reducer, distance, refs, dtype):
    _compare_pair(loss, reducer, distance, refs, dtype, "reference", seed=PAIR_CASES.index((loss, reducer, distance)))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("reducer", ["PerAnchorAvgNonZero", "PerAnchorMean", "PerAnchorSum"])
@pytest.mark.parametrize("loss", ["ntxent", "tuplet_margin", "contrastive"])
def test_per_anchor_reducer_on_the_losses_reduced_per_pair(loss, reducer, dtype):
    """PML's PerAnchorReducer on per-pair losses: each query's mean over its pairs (its sub-losses apart), then the
    inner reducer over the queries (PML indexes a batch x batch array, so without ref_emb)."""
    _compare_pair(loss, reducer, "implicit", False, dtype, "reference", seed=7)
    _compare_pair(loss, reducer, "cosine", False, dtype, "auto", seed=8)


@pytest.mark.parametrize("loss,reducer", [(loss, r) for loss, r, d in PAIR_CASES if d == "implicit"])
def test_pair_modules_with_pml_keywords_on_the_auto_backend(loss, reducer):
    distance = "lp" if loss == "batch_hard" else "cosine"
    for seed, refs in ((1, False), (2, True)):
        _compare_pair(loss, reducer, distance, refs, torch.float32, "auto", seed)


PROXY_REDUCERS = ["default", "Divisor", "AvgNonZero", "Mean", "Sum", "DoNothing", "PerAnchorAvgNonZero",
                  "PerAnchorMean"]


def _proxy_modules(reducer, distance, backend="reference", seed=0, classes=7, dim=12):
    kw = {}
    if reducer == "Divisor":
        kw["reducer"] = reducers.DivisorReducer()
    elif REDUCERS[reducer]() is not None:
        kw["reducer"] = REDUCERS[reducer]()
    if distance != "implicit":
        kw["distance"] = DISTANCES[distance]()
    torch.manual_seed(seed)
    ours = mk.ProxyAnchorLoss(classes, dim, margin=0.2, alpha=16, backend=backend, **kw)
    torch.manual_seed(seed)
    theirs = losses.ProxyAnchorLoss(classes, dim, margin=0.2, alpha=16, **kw)
    assert torch.equal(ours.proxies, theirs.proxies)
    return ours, theirs


def _compare_proxy(reducer, distance, dtype, backend, labels, seed):
    ours, theirs = _proxy_modules(reducer, distance, backend, seed)
    ours.to(dtype), theirs.double()
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(labels.shape[0], 12, generator=g, dtype=torch.float64)
    x, x_pml = x64.to(dtype).requires_grad_(), x64.to(dtype).double().requires_grad_()
    what = f"proxy_anchor reducer={reducer} distance={distance} {dtype} {backend}"
    _assert_matches(ours(x, labels), [x, ours.proxies], theirs(x_pml, labels), [x_pml, theirs.proxies], dtype, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("reducer,distance", [(r, d) for r in PROXY_REDUCERS for d in ("implicit", "cosine", "dot")]
                         + [(r, d) for r in ("default", "Sum") for d in OTHER_DISTANCES])
def test_proxy_anchor_with_pml_keywords_equals_pml(reducer, distance, dtype):
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 4, 5, 5, 1, 0, 4, 4, 2, 1, 5])  # classes 3 and 6 have no row
    _compare_proxy(reducer, distance, dtype, "reference", labels, seed=3)
    _compare_proxy(reducer, distance, dtype, "auto", labels, seed=4)


def test_proxy_anchor_avg_non_zero_leaves_out_zero_terms_as_pml():
    """With one class in the batch, that class's negative term is 0 (no negative): PML's AvgNonZeroReducer averages
    the negative terms over the other C - 1 proxies, where the default DivisorReducer divides by C. We follow PML."""
    labels = torch.full((9,), 3)
    _compare_proxy("AvgNonZero", "implicit", torch.float64, "reference", labels, seed=5)
    ours, _ = _proxy_modules("AvgNonZero", "implicit")
    default, _ = _proxy_modules("default", "implicit")
    x = torch.randn(9, 12)
    assert not torch.allclose(ours(x, labels), default(x, labels))


def test_batch_hard_mean_reducer_averages_over_the_mined_triplets():
    """SPEC's "mean" averages over all queries; PML's MeanReducer on TripletMarginLoss averages over the mined
    triplets, one per query that has a positive and a negative. reducer=MeanReducer() follows PML."""
    x = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5])  # queries 5, 8 and 9 have no positive
    ours, theirs = _pair_modules("batch_hard", "Mean", "implicit")
    value = ours(x, labels, None, None, None)
    assert_rel_close(value, theirs(x, labels, None, None, None), 1e-10, "MeanReducer")
    rows = mk.BatchHardTripletLoss(margin=0.1, reduction="none")(x, labels)
    assert_rel_close(value, rows.sum() / 7, 1e-10, "sum over the 7 mined triplets / 7")
    assert not torch.allclose(value, mk.BatchHardTripletLoss(margin=0.1, reduction="mean")(x, labels))


# Intended differences from PML, each with its reason. ----------------------------------------------------------------
@pytest.mark.parametrize("loss", ["circle", "supcon"])
def test_do_nothing_reducer_gives_zeros_where_pml_gives_a_constant(loss):
    """For a batch PML's GenericPairLoss skips (at most one positive and one negative pair) PML returns
    {"losses": 0, "indices": None, "reduction_type": "already_reduced"}, a constant without a graph; ours keeps the
    per-query shape (zeros connected to the graph, SPEC: a loss of 0 keeps the graph). Summed, both are 0."""
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1])  # two positive pairs (0, 1) and (1, 0): GenericPairLoss's rule
    ours, theirs = _pair_modules(loss, "DoNothing", "implicit")
    pml_entry = losses.CircleLoss(reducer=reducers.DoNothingReducer())(x[:1], labels[:1])["loss"]
    assert pml_entry == {"losses": 0, "indices": None, "reduction_type": "already_reduced"}
    entry = ours(x[:1], labels[:1], None, None, None)["loss"]
    assert entry["reduction_type"] == "element" and torch.equal(entry["indices"], torch.tensor([0]))
    assert not entry["losses"].any() and entry["losses"].requires_grad
    # And where PML does compute, the same dictionary (N x 1 losses for Circle, as PML's CircleLoss keeps them).
    _assert_matches(ours(x, labels, None, None, None), [x], theirs(x, labels, None, None, None), [x], torch.float64, loss)
    assert ours(x, labels, None, None, None)["loss"]["losses"].shape == ((3, 1) if loss == "circle" else (3,))


def test_triplet_reducers_pml_cannot_map():
    """PML's PerAnchorReducer raises NotImplementedError for triplet losses (when called); ours raises at
    construction. PML's DoNothingReducer returns per-triplet losses with the mined (anchor, positive, negative)
    indices, which the fused kernels do not expose: NotImplementedError, pointing to reduction="none"."""
    x, labels = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    triplets = miners.BatchHardMiner()(x, labels)
    with pytest.raises(NotImplementedError, match="Triplet reduction not supported"):
        losses.TripletMarginLoss(reducer=reducers.PerAnchorReducer())(x, labels, triplets)
    with pytest.raises(NotImplementedError, match=r"reducer=PerAnchorReducer\(reducer=MeanReducer\(\)\) .*"
                                                  r"BatchHardTripletLoss"):
        mk.BatchHardTripletLoss(reducer=reducers.PerAnchorReducer())
    assert losses.TripletMarginLoss(reducer=reducers.DoNothingReducer())(x, labels, triplets)["loss"][
        "reduction_type"] == "triplet"
    with pytest.raises(NotImplementedError, match=r"reducer=DoNothingReducer\(\) .*reduction='none'"):
        mk.BatchHardTripletLoss(reducer=reducers.DoNothingReducer())


@pytest.mark.parametrize("build", [mk.CircleLoss, mk.SupConLoss, mk.BatchHardTripletLoss])
def test_divisor_reducer_on_pair_losses(build):
    """PML's DivisorReducer needs a divisor that only Proxy-Anchor's losses carry: PML fails with KeyError when called,
    ours raises NotImplementedError at construction."""
    with pytest.raises(KeyError):
        losses.CircleLoss(reducer=reducers.DivisorReducer())(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
    with pytest.raises(NotImplementedError, match=rf"reducer=DivisorReducer\(\) is not supported by {build.__name__}"):
        build(reducer=reducers.DivisorReducer())


def test_circle_with_another_distance():
    """PML's CircleLoss asserts a CosineSimilarity (AssertionError); ours raises NotImplementedError, saying so."""
    with pytest.raises(AssertionError):
        losses.CircleLoss(distance=distances.LpDistance())
    with pytest.raises(NotImplementedError, match="PML's CircleLoss accepts only CosineSimilarity too"):
        mk.CircleLoss(distance=distances.LpDistance())


def test_circle_with_dot_product_similarity():
    """DotProductSimilarity() computes CosineSimilarity's matrix, but it is not a CosineSimilarity, which PML's
    CircleLoss asserts: ours raises NotImplementedError there too, saying so."""
    with pytest.raises(AssertionError):
        losses.CircleLoss(distance=distances.DotProductSimilarity())
    with pytest.raises(NotImplementedError, match=r"distance=DotProductSimilarity\(normalize_embeddings=True, p=2, "
                                                  r"power=1\) is not supported by CircleLoss.*accepts only "
                                                  r"CosineSimilarity"):
        mk.CircleLoss(distance=distances.DotProductSimilarity())


@pytest.mark.parametrize("build", [mk.SupConLoss, lambda **kw: mk.ProxyAnchorLoss(4, 6, **kw)],
                         ids=["supcon", "proxy_anchor"])
def test_normalized_dot_product_is_the_cosine(build):
    """PML's DotProductSimilarity() normalises the rows by default, so it is the cosine: accepted (recorded as
    NORMALIZED_DOT), the same values as CosineSimilarity(); normalize_embeddings=False raises (above)."""
    torch.manual_seed(0)
    dot = build(distance=distances.DotProductSimilarity(), backend="reference")
    torch.manual_seed(0)
    cosine = build(distance=distances.CosineSimilarity(), backend="reference")
    assert dot.distance_spec == keywords.NORMALIZED_DOT and cosine.distance_spec == keywords.COSINE
    x, labels = torch.randn(10, 6, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 2, 0])
    assert torch.equal(dot.double()(x, labels), cosine.double()(x, labels))


def test_unset_keywords_read_none_where_pml_holds_its_default_objects():
    """PML fills `distance` and `reducer` with its default objects; ours keep what was given (None), so that
    metric_kernels never imports PML, and `distance_spec` says what is computed."""
    loss = mk.SupConLoss()
    assert loss.distance is None and loss.reducer is None and loss.distance_spec == keywords.COSINE
    assert isinstance(losses.SupConLoss().distance, distances.CosineSimilarity)
    cosine, mean = distances.CosineSimilarity(), reducers.MeanReducer()
    loss = mk.SupConLoss(distance=cosine, reducer=mean)
    assert loss.distance is cosine and loss.reducer is mean and loss.reduction == "mean"


def test_metric_kernels_does_not_import_pml():
    code = ("import sys, torch, metric_kernels as mk; mk.CircleLoss(); mk.ProxyAnchorLoss(3, 4); "
            "mk.BatchHardTripletLoss(reducer=None, distance=None); "
            "assert 'pytorch_metric_learning' not in sys.modules, 'imported PML'")
    subprocess.run([sys.executable, "-c", code], check=True)


# What is accepted, what raises. -------------------------------------------------------------------------------------
def test_pml_default_keyword_values_are_accepted():
    for build in (mk.CircleLoss, mk.SupConLoss, mk.BatchHardTripletLoss):
        build(embedding_regularizer=None, embedding_reg_weight=1, collect_stats=False, reducer=None, distance=None)
    mk.ProxyAnchorLoss(3, 4, embedding_regularizer=None, weight_regularizer=None, weight_reg_weight=1,
                       collect_stats=None, reducer=reducers.DivisorReducer(), distance=distances.CosineSimilarity())
    xbm = mk.CrossBatchMemory(mk.CircleLoss(), 4, memory_size=8, miner=None)
    assert xbm.miner is None


def test_batch_hard_distance_and_normalize_embeddings():
    """LpDistance(normalize_embeddings=b) is normalize_embeddings=b; both given must agree."""
    raw = mk.BatchHardTripletLoss(distance=distances.LpDistance(normalize_embeddings=False))
    assert raw.normalize_embeddings is False and raw.distance_spec == keywords.DistanceSpec("lp", 1, False)
    assert mk.BatchHardTripletLoss().normalize_embeddings is True
    assert mk.BatchHardTripletLoss(normalize_embeddings=False).distance_spec.normalize is False
    mk.BatchHardTripletLoss(normalize_embeddings=True, distance=distances.LpDistance())
    with pytest.raises(ValueError, match=r"normalize_embeddings=True conflicts with "
                                         r"distance=LpDistance\(normalize_embeddings=False"):
        mk.BatchHardTripletLoss(normalize_embeddings=True, distance=distances.LpDistance(normalize_embeddings=False))


@pytest.mark.parametrize("build", [mk.CircleLoss, mk.SupConLoss, mk.BatchHardTripletLoss])
def test_reduction_and_reducer_must_agree(build):
    build(reducer=reducers.SumReducer(), reduction="sum")
    with pytest.raises(ValueError, match=r"reduction='mean_nonzero' conflicts with reducer=SumReducer\(\)"):
        build(reducer=reducers.SumReducer(), reduction="mean_nonzero")
    if build is not mk.BatchHardTripletLoss:
        x, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
        out = build(reducer=reducers.DoNothingReducer(), reduction="none", backend="reference")(x, labels)
        assert isinstance(out, dict)  # the reducer decides what comes back, as in PML
        assert build(reduction="none", backend="reference")(x, labels).shape == (6,)
    else:
        with pytest.raises(ValueError, match=r"reduction='mean' conflicts with reducer=MeanReducer\(\)"):
            build(reducer=reducers.MeanReducer(), reduction="mean")


class _MyCosine(distances.CosineSimilarity):
    """A subclass may compute anything: not recognised."""


UNSUPPORTED = [
    (mk.CircleLoss, "distance", lambda: distances.LpDistance(power=2),
     "distance=LpDistance(normalize_embeddings=True, p=2, power=2) is not supported by CircleLoss"),
    (mk.TupletMarginLoss, "distance", distances.DotProductSimilarity,
     "PML's TupletMarginLoss accepts only CosineSimilarity too"),
    (mk.TupletMarginLoss, "reducer", reducers.DoNothingReducer,
     "reducer=DoNothingReducer() is not supported by TupletMarginLoss yet: PML's DoNothingReducer returns the per-pair"),
    (mk.SupConLoss, "distance", lambda: distances.CosineSimilarity(power=2),
     "distance=CosineSimilarity(normalize_embeddings=True, p=2, power=2) is not supported by SupConLoss"),
    (mk.SupConLoss, "distance", lambda: distances.LpDistance(p=1),
     "distance=LpDistance(normalize_embeddings=True, p=1, power=1) is not supported by SupConLoss"),
    (mk.SupConLoss, "distance", lambda: distances.LpDistance(power=3),
     "distance=LpDistance(normalize_embeddings=True, p=2, power=3) is not supported by SupConLoss"),
    (mk.SupConLoss, "distance", distances.SNRDistance, "distance=SNRDistance("),
    (mk.SupConLoss, "distance", _MyCosine, "distance=_MyCosine("),
    (mk.BatchHardTripletLoss, "distance", lambda: distances.LpDistance(p=1),
     "distance=LpDistance(normalize_embeddings=True, p=1, power=1) is not supported by BatchHardTripletLoss"),
    (mk.BatchHardTripletLoss, "distance", lambda: distances.LpDistance(power=2), "power=2) is not supported"),
    (mk.BatchHardTripletLoss, "distance", distances.CosineSimilarity, "distance=CosineSimilarity("),
    (mk.CircleLoss, "reducer", lambda: reducers.ThresholdReducer(low=0.1),
     "reducer=ThresholdReducer(low=0.1, high=None) is not supported by CircleLoss"),
    (mk.SupConLoss, "reducer", lambda: reducers.AvgNonZeroReducer(high=5),
     "reducer=AvgNonZeroReducer(low=0, high=5) is not supported by SupConLoss"),
    (mk.SupConLoss, "reducer", lambda: reducers.ClassWeightedReducer(torch.ones(3)),
     "reducer=ClassWeightedReducer() is not supported"),
    (mk.CircleLoss, "reducer", lambda: reducers.MultipleReducers({"loss": reducers.MeanReducer()}),
     "reducer=MultipleReducers() is not supported"),
    (mk.CircleLoss, "reducer", lambda: reducers.PerAnchorReducer(reducers.ThresholdReducer(high=3)),
     "reducer=PerAnchorReducer(reducer=ThresholdReducer(low=None, high=3)) is not supported"),
    (mk.SupConLoss, "reducer", lambda: "mean", "reducer='mean' is not supported"),
    (mk.BatchHardTripletLoss, "embedding_regularizer", lambda: torch.nn.Identity(),
     "embedding_regularizer=Identity() is not supported by BatchHardTripletLoss yet: the modules call PML's"),
    (mk.CircleLoss, "collect_stats", lambda: True, "collect_stats=True is not supported by CircleLoss"),
    (lambda **kw: mk.ProxyAnchorLoss(3, 4, **kw), "weight_regularizer", lambda: "RegularFace",
     "weight_regularizer='RegularFace' is not supported by ProxyAnchorLoss yet"),
    (lambda **kw: mk.ProxyAnchorLoss(3, 4, **kw), "distance", lambda: distances.LpDistance(p=3),
     "distance=LpDistance(normalize_embeddings=True, p=3, power=1) is not supported by ProxyAnchorLoss"),
    (mk.SupConLoss, "distance", lambda: distances.DotProductSimilarity(power=2),
     "distance=DotProductSimilarity(normalize_embeddings=True, p=2, power=2) is not supported by SupConLoss"),
    (mk.BatchHardTripletLoss, "distance", distances.DotProductSimilarity,
     "distance=DotProductSimilarity(normalize_embeddings=True, p=2, power=1) is not supported by "
     "BatchHardTripletLoss"),
    (lambda **kw: mk.ProxyAnchorLoss(3, 4, **kw), "reducer", lambda: reducers.ThresholdReducer(low=1),
     "reducer=ThresholdReducer(low=1, high=None) is not supported by ProxyAnchorLoss"),
    (mk.NTXentLoss, "reducer", reducers.DoNothingReducer,
     "reducer=DoNothingReducer() is not supported by NTXentLoss yet: PML's DoNothingReducer returns the per-pair"),
    (mk.ContrastiveLoss, "reducer", lambda: reducers.PerAnchorReducer(aggregation_func=lambda x, n: x.sum(dim=1)),
     "only PerAnchorReducer's default aggregation_func"),
    (mk.NTXentLoss, "reducer", lambda: reducers.PerAnchorReducer(reducers.DoNothingReducer()),
     "PML's DoNothingReducer returns the per-pair losses"),
    (mk.ContrastiveLoss, "distance", lambda: distances.LpDistance(p=1),
     "distance=LpDistance(normalize_embeddings=True, p=1, power=1) is not supported by ContrastiveLoss"),
    (mk.TripletMarginLoss, "reducer", reducers.DoNothingReducer,
     "PML's TripletMarginLoss reduces per triplet: its DoNothingReducer returns the O(N M^2) triplet losses"),
    (mk.TripletMarginLoss, "reducer", reducers.PerAnchorReducer,
     "its PerAnchorReducer raises for triplets"),
    (mk.TripletMarginLoss, "distance", lambda: distances.LpDistance(p=1),
     "distance=LpDistance(normalize_embeddings=True, p=1, power=1) is not supported by TripletMarginLoss"),
    (lambda **kw: mk.CrossBatchMemory(mk.SupConLoss(), 4, **kw), "miner", miners.MultiSimilarityMiner,
     "miner=MultiSimilarityMiner("),
    (lambda **kw: mk.CrossBatchMemory(mk.BatchHardTripletLoss(), 4, **kw), "miner", miners.BatchHardMiner,
     "batch-hard mining is BatchHardTripletLoss itself"),
]


@pytest.mark.parametrize("build,keyword,value,message", UNSUPPORTED,
                         ids=[f"{i}-{case[1]}" for i, case in enumerate(UNSUPPORTED)])
def test_unsupported_keyword_values_raise_naming_them(build, keyword, value, message):
    with pytest.raises(NotImplementedError) as error:
        build(**{keyword: value()})
    assert message in str(error.value)


def test_cross_batch_memory_supported_losses_mirror_pmls():
    """PML's supported_losses() is a static method returning class names (strings); ours names our classes."""
    assert all(isinstance(name, str) for name in losses.CrossBatchMemory.supported_losses())
    assert mk.CrossBatchMemory.supported_losses() == ["CircleLoss", "SupConLoss", "MultiSimilarityLoss",
                                                      "NTXentLoss", "TupletMarginLoss", "ContrastiveLoss",
                                                      "TripletMarginLoss", "GeneralizedLiftedStructureLoss",
                                                      "MarginLoss", "NCALoss", "AngularLoss", "BatchHardTripletLoss"]
    # every one PML's takes too (batch-hard as PML's TripletMarginLoss with its BatchHardMiner)
    ours = set(mk.CrossBatchMemory.supported_losses()) - {"BatchHardTripletLoss"}
    assert ours <= set(losses.CrossBatchMemory.supported_losses())
    xbm = mk.CrossBatchMemory(mk.SupConLoss(), 4)
    assert xbm.supported_losses() == mk.CrossBatchMemory.supported_losses()
    mk.CrossBatchMemory.check_loss_support("CircleLoss")
    with pytest.raises(TypeError, match="ProxyAnchorLoss"):
        mk.CrossBatchMemory.check_loss_support("ProxyAnchorLoss")


def test_proxy_anchor_weight_init_func_as_pml():
    init = c_f.TorchInitWrapper(torch.nn.init.normal_, std=0.5)
    torch.manual_seed(11)
    ours = mk.ProxyAnchorLoss(5, 6, weight_init_func=init)
    torch.manual_seed(11)
    assert torch.equal(ours.proxies, losses.ProxyAnchorLoss(5, 6, weight_init_func=init).proxies)
    with pytest.raises(TypeError, match="weight_init_func"):
        mk.ProxyAnchorLoss(5, 6, weight_init_func="normal")
