"""PML's regularizers (embedding_regularizer=, weight_regularizer=): the modules add PML's terms as PML's base classes
do (the regularizer called on the embeddings, on the proxies, on W transposed; times its weight; DoNothingReducer's
dictionary gets PML's "already_reduced" entries). Values and gradients equal PML's in float64 (1e-10 relative), on
every module that takes them; CrossBatchMemory passes them through as PML's does (DistributedLoss: the global
batch's terms, tests/test_distributed.py); reduction="none" and objects that are not PML regularizers raise."""
import pytest
import torch
from pytorch_metric_learning import losses, miners, reducers, regularizers

import metric_kernels as mk
from metric_kernels.pml import exact_cdist
from tests.helpers import assert_rel_close

TOL = 1e-10
DIM, CLASSES = 8, 4


def _embedding_regularizer():
    return regularizers.LpRegularizer(power=2)


class _BatchHardPML(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.miner, self.loss = miners.BatchHardMiner(), losses.TripletMarginLoss(**kwargs)

    def forward(self, embeddings, labels):
        return self.loss(embeddings, labels, self.miner(embeddings, labels))


# name -> (our module class, a builder of PML's, constructor keywords both take)
PAIR = {
    "circle": (mk.CircleLoss, losses.CircleLoss, dict(m=0.3, gamma=40)),
    "supcon": (mk.SupConLoss, losses.SupConLoss, dict(temperature=0.2)),
    "multi_similarity": (mk.MultiSimilarityLoss, losses.MultiSimilarityLoss, dict(alpha=2, beta=20, base=0.3)),
    "ntxent": (mk.NTXentLoss, losses.NTXentLoss, dict(temperature=0.3)),
    "tuplet_margin": (mk.TupletMarginLoss, losses.TupletMarginLoss, dict(margin=8.0, scale=10)),
    "angular": (mk.AngularLoss, losses.AngularLoss, dict(alpha=35)),
    "lifted_structure": (mk.LiftedStructureLoss, losses.LiftedStructureLoss, dict(neg_margin=0.9, pos_margin=0.1)),
    "contrastive": (mk.ContrastiveLoss, losses.ContrastiveLoss, dict(pos_margin=0.1, neg_margin=1.1)),
    "lifted": (mk.GeneralizedLiftedStructureLoss, losses.GeneralizedLiftedStructureLoss,
               dict(neg_margin=0.9, pos_margin=0.1)),
    "margin": (mk.MarginLoss, losses.MarginLoss, dict(margin=0.2, beta=0.9)),
    "nca": (mk.NCALoss, losses.NCALoss, dict(softmax_scale=2.0)),
    "batch_hard": (mk.BatchHardTripletLoss, _BatchHardPML, dict(margin=0.1)),
}
# name -> (our class, PML's class, keywords, the weight regularizer to use)
WEIGHTED = {
    "proxy_anchor": (mk.ProxyAnchorLoss, losses.ProxyAnchorLoss, dict(margin=0.1, alpha=16),
                     regularizers.RegularFaceRegularizer),
    "proxy_nca": (mk.ProxyNCALoss, losses.ProxyNCALoss, dict(softmax_scale=3.0), regularizers.CenterInvariantRegularizer),
    "arcface": (mk.ArcFaceLoss, losses.ArcFaceLoss, dict(margin=20.0, scale=16), regularizers.RegularFaceRegularizer),
    "cosface": (mk.CosFaceLoss, losses.CosFaceLoss, dict(margin=0.2, scale=16), regularizers.CenterInvariantRegularizer),
    "subcenter_arcface": (mk.SubCenterArcFaceLoss, losses.SubCenterArcFaceLoss,
                          dict(margin=20.0, scale=16, sub_centers=2), regularizers.RegularFaceRegularizer),
    "normalized_softmax": (mk.NormalizedSoftmaxLoss, losses.NormalizedSoftmaxLoss, dict(temperature=0.2),
                           regularizers.CenterInvariantRegularizer),
    "large_margin_softmax": (mk.LargeMarginSoftmaxLoss, losses.LargeMarginSoftmaxLoss, dict(margin=3, scale=0.5),
                             regularizers.RegularFaceRegularizer),
    "sphereface": (mk.SphereFaceLoss, losses.SphereFaceLoss, dict(margin=4, scale=2.0),
                   regularizers.CenterInvariantRegularizer),
    "soft_triple": (mk.SoftTripleLoss, losses.SoftTripleLoss, dict(centers_per_class=2, la=8, gamma=0.2),
                    regularizers.RegularFaceRegularizer),
}


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, DIM, generator=g, dtype=torch.float64)
    return x, torch.randint(0, CLASSES, (24,), generator=g)


def _compare(ours, theirs, seed, what, parameters=()):
    x, labels = _batch(seed)
    mine, pmls = x.clone().requires_grad_(), x.clone().requires_grad_()
    with exact_cdist():
        expected = theirs(pmls, labels)
    value = ours(mine, labels)
    assert_rel_close(value, expected, TOL, f"{what} value")
    our_leaves, their_leaves = [mine] + [p for p, _ in parameters], [pmls] + [q for _, q in parameters]
    for a, b in zip(torch.autograd.grad(value, our_leaves), torch.autograd.grad(expected, their_leaves)):
        assert_rel_close(a, b, TOL, f"{what} gradient")
    return value


@pytest.mark.parametrize("weight", [1, 0.25])
@pytest.mark.parametrize("name", PAIR)
def test_embedding_regularizer_equals_pmls(name, weight):
    ours_cls, pml_cls, params = PAIR[name]
    kw = dict(embedding_regularizer=_embedding_regularizer(), embedding_reg_weight=weight)
    ours = ours_cls(**params, backend="reference", **kw)
    theirs = pml_cls(**params, **kw)
    plain = ours_cls(**params, backend="reference")
    value = _compare(ours, theirs, seed=1, what=name)
    x, labels = _batch(1)
    assert value.item() != plain(x, labels).item()  # the term is there (LpRegularizer of random rows is not 0)


def _weighted_pair(name, seed=0, **kw):
    ours_cls, pml_cls, params, _ = WEIGHTED[name]
    torch.manual_seed(seed)
    ours = ours_cls(CLASSES, DIM, **params, backend="reference", **kw).double()
    torch.manual_seed(seed)
    theirs = pml_cls(num_classes=CLASSES, embedding_size=DIM, **params, **kw).double()
    weights = "proxies" if name.startswith("proxy") else "fc" if name == "soft_triple" else "W"
    return ours, theirs, [(getattr(ours, weights), getattr(theirs, weights))]


@pytest.mark.parametrize("name", WEIGHTED)
def test_weight_and_embedding_regularizers_equal_pmls(name):
    regularizer = WEIGHTED[name][3]
    kw = dict(weight_regularizer=regularizer(), weight_reg_weight=0.5, embedding_regularizer=_embedding_regularizer(),
              embedding_reg_weight=0.1)
    ours, theirs, parameters = _weighted_pair(name, **kw)
    _compare(ours, theirs, seed=2, what=name, parameters=parameters)
    # each alone too
    for only in ({"weight_regularizer": regularizer()}, {"embedding_regularizer": _embedding_regularizer()}):
        ours, theirs, parameters = _weighted_pair(name, **only)
        _compare(ours, theirs, seed=3, what=f"{name} {list(only)}", parameters=parameters)


@pytest.mark.parametrize("name", ["circle", "ntxent", "proxy_anchor", "arcface"])
def test_do_nothing_reducer_holds_pmls_regularization_entries(name):
    kw = dict(embedding_regularizer=_embedding_regularizer(), embedding_reg_weight=0.5,
              reducer=reducers.DoNothingReducer() if name != "ntxent" else reducers.SumReducer())
    if name in WEIGHTED:
        ours, theirs, _ = _weighted_pair(name, weight_regularizer=WEIGHTED[name][3](), **kw)
    else:
        ours_cls, pml_cls, params = PAIR[name]
        ours, theirs = ours_cls(**params, backend="reference", **kw), pml_cls(**params, **kw)
    x, labels = _batch(4)
    mine, expected = ours(x, labels), theirs(x, labels)
    if name == "ntxent":  # PML's DoNothingReducer is refused for the per-pair losses: the sum instead
        assert_rel_close(mine, expected, TOL, name)
        return
    assert list(mine) == list(expected)
    for key in ("embedding_reg_loss", "weight_reg_loss"):
        if key in expected:
            assert mine[key]["reduction_type"] == expected[key]["reduction_type"] == "already_reduced"
            assert mine[key]["indices"] is None
            assert_rel_close(mine[key]["losses"], expected[key]["losses"], TOL, f"{name} {key}")


def test_reduction_none_with_a_regularizer_raises_before_any_kernel(monkeypatch):
    import metric_kernels.reference as reference

    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel was called")
    monkeypatch.setattr(reference, "circle_rows", forbidden)
    x, labels = _batch(5)
    loss = mk.CircleLoss(reduction="none", backend="reference", embedding_regularizer=_embedding_regularizer())
    with pytest.raises(ValueError, match="reduction='none'.*embedding regularizer"):
        loss(x, labels)


def test_cross_batch_memory_passes_the_regularizer_on_as_pmls():
    kw = dict(embedding_regularizer=_embedding_regularizer(), embedding_reg_weight=0.3)
    ours = mk.CrossBatchMemory(mk.ContrastiveLoss(0.2, 1.1, backend="reference", **kw), DIM, memory_size=11)
    theirs = losses.CrossBatchMemory(losses.ContrastiveLoss(0.2, 1.1, **kw), DIM, memory_size=11)
    g = torch.Generator().manual_seed(6)
    for step, batch in enumerate((5, 4, 6, 3)):
        x = torch.randn(batch, DIM, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 3, (batch,), generator=g)
        mine, pmls = x.clone().requires_grad_(), x.clone().requires_grad_()
        with exact_cdist():
            expected = theirs(pmls, labels)
        value = ours(mine, labels)
        assert_rel_close(value, expected, TOL, f"step {step}")
        assert_rel_close(torch.autograd.grad(value, mine)[0], torch.autograd.grad(expected, pmls)[0], TOL,
                         f"step {step} gradient")


@pytest.mark.parametrize("value", [lambda: torch.nn.Identity(), lambda: (lambda x: x.norm()), lambda: "lp"])
def test_other_objects_are_not_taken(value):
    with pytest.raises(NotImplementedError, match="embedding_regularizer=.*not supported by CircleLoss"):
        mk.CircleLoss(embedding_regularizer=value())
    with pytest.raises(NotImplementedError, match="weight_regularizer=.*not supported by ProxyAnchorLoss"):
        mk.ProxyAnchorLoss(3, 4, weight_regularizer=value())
