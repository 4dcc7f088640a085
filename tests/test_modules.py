"""The nn.Module losses are drop-in replacements for PML's classes: same constructor defaults, same forward order,
and one optimisation step of a PML-style training loop gives the same parameters."""
import copy
import math

import pytest
import torch
from pytorch_metric_learning import distances, losses, miners, reducers
from pytorch_metric_learning.utils import common_functions as c_f

import metric_kernels as mk
from metric_kernels.pml import exact_cdist
from tests.helpers import assert_rel_close, class_weights

TOL = 1e-10


class BatchHardPML(torch.nn.Module):
    """PML's batch-hard triplet loss as users write it: a BatchHardMiner feeding TripletMarginLoss."""

    def __init__(self):
        super().__init__()
        self.miner, self.loss = miners.BatchHardMiner(), losses.TripletMarginLoss()

    def forward(self, embeddings, labels):
        return self.loss(embeddings, labels, self.miner(embeddings, labels))


def _pairs():
    return {
        "circle": (mk.CircleLoss(), losses.CircleLoss()),
        "supcon": (mk.SupConLoss(), losses.SupConLoss()),
        "batch_hard": (mk.BatchHardTripletLoss(), BatchHardPML()),
        "tuplet_margin": (mk.TupletMarginLoss(), losses.TupletMarginLoss()),
        "triplet_margin": (mk.TripletMarginLoss(margin=0.3), losses.TripletMarginLoss(margin=0.3)),
        "angular": (mk.AngularLoss(alpha=45), losses.AngularLoss(alpha=45)),
        "lifted_structure": (mk.LiftedStructureLoss(0.9, 0.1), losses.LiftedStructureLoss(0.9, 0.1)),
    }


def _one_step(model, loss_fn, data, labels, extra_params=()):
    optimizer = torch.optim.SGD(list(model.parameters()) + list(extra_params), lr=0.5, momentum=0.9)
    optimizer.zero_grad()
    loss = loss_fn(model(data), labels)
    loss.backward()
    optimizer.step()
    return loss


@pytest.mark.parametrize("name", ["circle", "supcon", "batch_hard", "tuplet_margin", "triplet_margin", "angular",
                                  "lifted_structure"])
def test_one_training_step_matches_pml(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).double()
    twin, initial = copy.deepcopy(model), copy.deepcopy(model)
    data, labels = torch.randn(48, 20, dtype=torch.float64), torch.randint(0, 6, (48,))
    ours, theirs = _pairs()[name]
    with exact_cdist():
        expected_loss = _one_step(twin, theirs, data, labels)
    our_loss = _one_step(model, ours, data, labels)
    assert_rel_close(our_loss, expected_loss, TOL, "loss")
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert_rel_close(a, b, TOL, key)
    assert not torch.equal(model[0].weight, initial[0].weight)  # the loss had a gradient: the step moved the model


def test_constructor_defaults_are_pmls():
    assert (mk.CircleLoss().m, mk.CircleLoss().gamma) == (losses.CircleLoss().m, losses.CircleLoss().gamma)
    assert mk.SupConLoss().temperature == losses.SupConLoss().temperature
    triplet = losses.TripletMarginLoss()
    ours = mk.BatchHardTripletLoss()
    assert (ours.margin, ours.soft, ours.normalize_embeddings) == (triplet.margin, triplet.smooth_loss, True)
    pa, pml_pa = mk.ProxyAnchorLoss(3, 4), losses.ProxyAnchorLoss(3, 4)
    assert (pa.margin, pa.alpha, pa.num_classes) == (pml_pa.margin, pml_pa.alpha, pml_pa.num_classes)
    assert all(module.reduction == "mean_nonzero" for module in (mk.CircleLoss(), mk.SupConLoss(), ours))
    tuplet, pml_tuplet = mk.TupletMarginLoss(), losses.TupletMarginLoss()
    assert (tuplet.margin, tuplet.scale) == (pml_tuplet.margin, pml_tuplet.scale)  # the margin in radians, as PML's
    assert tuplet.margin == math.radians(5.73) and tuplet.reduction == "mean"
    assert mk.TupletMarginLoss(10, 32).margin == losses.TupletMarginLoss(10, 32).margin
    assert "margin=10 degrees" in repr(mk.TupletMarginLoss(10, 32))
    every, pml_every = mk.TripletMarginLoss(), losses.TripletMarginLoss()
    assert (every.margin, every.swap, every.smooth_loss, every.triplets_per_anchor) == (
        pml_every.margin, pml_every.swap, pml_every.smooth_loss, pml_every.triplets_per_anchor)
    assert every.reduction == "mean_nonzero" and "smooth_loss=False" in repr(every)


@pytest.mark.parametrize("name", ["circle", "supcon", "batch_hard", "tuplet_margin", "triplet_margin", "angular",
                                  "lifted_structure"])
def test_module_forward_order_with_references(name):
    """forward(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None), positionally, as PML."""
    ours, theirs = _pairs()[name]
    x, y = torch.randn(10, 8, dtype=torch.float64), torch.randn(14, 8, dtype=torch.float64)
    labels, y_labels = torch.randint(0, 3, (10,)), torch.randint(0, 3, (14,))
    if name == "batch_hard":
        with exact_cdist():
            theirs_value = theirs.loss(x, labels, theirs.miner(x, labels, y, y_labels), y, y_labels)
    else:
        theirs_value = theirs(x, labels, None, y, y_labels)
    assert_rel_close(ours(x, labels, None, y, y_labels), theirs_value, TOL, name)


def test_modules_pass_their_options_through():
    x, labels = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))
    assert_rel_close(mk.CircleLoss(m=0.25, gamma=128, reduction="sum")(x, labels),
                     mk.circle_loss(x, labels, m=0.25, gamma=128, reduction="sum"), 0, "circle")
    assert_rel_close(mk.SupConLoss(0.07, base_temperature=0.07, reduction="mean")(x, labels),
                     mk.supcon_loss(x, labels, temperature=0.07, base_temperature=0.07, reduction="mean"), 0, "supcon")
    assert_rel_close(mk.BatchHardTripletLoss(0.2, True, False, reduction="none")(x, labels),
                     mk.batch_hard_triplet_loss(x, labels, margin=0.2, soft=True, normalize_embeddings=False,
                                                reduction="none"), 0, "batch hard")
    y = torch.randn(20, 8, dtype=torch.float64)
    y[3:19] = x
    y_labels = torch.randint(0, 3, (20,))
    y_labels[3:19] = labels
    assert_rel_close(mk.CircleLoss()(x, labels, None, y, y_labels, self_offset=3),
                     mk.circle_loss(x, labels, y, y_labels, self_offset=3), 0, "self_offset")
    assert_rel_close(mk.TupletMarginLoss(12.0, 20, reduction="sum")(x, labels, None, y, y_labels),
                     mk.tuplet_margin_loss(x, labels, y, y_labels, margin=12.0, scale=20, reduction="sum"), 0, "tuplet")
    assert_rel_close(mk.TripletMarginLoss(0.3, smooth_loss=True, reduction="none")(x, labels, None, y, y_labels,
                                                                                  self_offset=3),
                     mk.triplet_margin_loss(x, labels, y, y_labels, margin=0.3, smooth_loss=True, self_offset=3,
                                            reduction="none"), 0, "triplet")
    pa = mk.ProxyAnchorLoss(3, 8, margin=0.2, alpha=16).double()
    assert_rel_close(pa(x, labels), mk.proxy_anchor_loss(x, labels, pa.proxies, margin=0.2, alpha=16), 0, "proxy")


def test_modules_work_under_deterministic_algorithms():
    x, labels = torch.randn(16, 8), torch.randint(0, 3, (16,))
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = mk.CircleLoss()(x, labels), mk.CircleLoss(deterministic=True)(x, labels)
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(first, second)


# --- the margin-softmax classifiers ---------------------------------------------------------------------------------

CLASSIFIERS = {  # name -> (our class, PML's class, constructor keywords both take)
    "arcface": (mk.ArcFaceLoss, losses.ArcFaceLoss, dict(margin=20.0, scale=32)),
    "cosface": (mk.CosFaceLoss, losses.CosFaceLoss, dict(margin=0.2, scale=32)),
    "subcenter_arcface": (mk.SubCenterArcFaceLoss, losses.SubCenterArcFaceLoss,
                          dict(margin=20.0, scale=32, sub_centers=2)),
    "normalized_softmax": (mk.NormalizedSoftmaxLoss, losses.NormalizedSoftmaxLoss, dict(temperature=0.1)),
    "large_margin_softmax": (mk.LargeMarginSoftmaxLoss, losses.LargeMarginSoftmaxLoss, dict(margin=3, scale=0.5)),
    "sphereface": (mk.SphereFaceLoss, losses.SphereFaceLoss, dict(margin=2, scale=3.0)),
    "soft_triple": (mk.SoftTripleLoss, losses.SoftTripleLoss, dict(centers_per_class=3, la=10, gamma=0.2, margin=0.05)),
}


def _classifier_pair(name, classes=10, dim=16, **keywords):
    """Ours (reference backend) and PML's, built from the same seed (so with the same W), and the same keywords."""
    ours_cls, pml_cls, params = CLASSIFIERS[name]
    torch.manual_seed(5)
    ours = ours_cls(num_classes=classes, embedding_size=dim, **params, backend="reference", **keywords)
    torch.manual_seed(5)
    theirs = pml_cls(num_classes=classes, embedding_size=dim, **params, **keywords)
    return ours, theirs


@pytest.mark.parametrize("name", ["proxy_anchor", "proxy_anchor_lp", "proxy_nca", "proxy_nca_cosine", *CLASSIFIERS])
def test_weight_modules_match_pml_init_logits_and_step(name):
    """Proxy-Anchor and ProxyNCA (on backend "auto"; get_logits is PML's distance matrix, whichever distance) and the
    classifiers: the same weights from the same seed (PML's init), the same get_logits, and one optimisation step of
    the model and the weights gives the same parameters."""
    if name.startswith("proxy_"):
        from pytorch_metric_learning import distances
        distance = {"proxy_anchor_lp": lambda: distances.LpDistance(power=2),
                    "proxy_nca_cosine": lambda: distances.CosineSimilarity()}.get(name, lambda: None)
        ours_cls, pml_cls = ((mk.ProxyNCALoss, losses.ProxyNCALoss) if name.startswith("proxy_nca")
                             else (mk.ProxyAnchorLoss, losses.ProxyAnchorLoss))
        options = {} if distance() is None else dict(distance=distance())
        torch.manual_seed(5)
        ours = ours_cls(10, 16, **options)
        options = {} if distance() is None else dict(distance=distance())
        torch.manual_seed(5)
        theirs = pml_cls(10, 16, **options)
        weights = "proxies"
    else:
        (ours, theirs), weights = _classifier_pair(name), "fc" if name == "soft_triple" else "W"
    assert torch.equal(getattr(ours, weights), getattr(theirs, weights))  # the same draw
    assert isinstance(getattr(ours, weights), torch.nn.Parameter) and list(ours.state_dict()) == [weights]
    ours.double(), theirs.double()
    torch.manual_seed(1)
    model = torch.nn.Linear(12, 16).double()
    twin = copy.deepcopy(model)
    data, labels = torch.randn(40, 12, dtype=torch.float64), torch.randint(0, 10, (40,))
    assert_rel_close(ours.get_logits(model(data)), theirs.get_logits(model(data)), TOL, "get_logits")
    our_loss = _one_step(model, ours, data, labels, [getattr(ours, weights)])
    expected_loss = _one_step(twin, theirs, data, labels, [getattr(theirs, weights)])
    assert_rel_close(our_loss, expected_loss, TOL, "loss")
    assert_rel_close(getattr(ours, weights), getattr(theirs, weights), TOL, f"{weights} after the step")
    assert_rel_close(model.weight, twin.weight, TOL, "weights after the step")


def test_classifier_constructor_defaults_and_attributes_are_pmls():
    for ours, theirs in ((mk.ArcFaceLoss(3, 4), losses.ArcFaceLoss(3, 4)),
                         (mk.CosFaceLoss(3, 4), losses.CosFaceLoss(3, 4)),
                         (mk.SubCenterArcFaceLoss(num_classes=3, embedding_size=4),
                          losses.SubCenterArcFaceLoss(num_classes=3, embedding_size=4))):
        assert (ours.num_classes, ours.margin, ours.scale) == (theirs.num_classes, theirs.margin, theirs.scale)
        assert ours.W.shape == theirs.W.shape
    assert mk.ArcFaceLoss(3, 4).margin == losses.ArcFaceLoss(3, 4).margin == math.radians(28.6)  # radians, as PML
    assert mk.SubCenterArcFaceLoss(3, 4).sub_centers == 3 and mk.SubCenterArcFaceLoss(3, 4).W.shape == (4, 9)
    assert mk.SubCenterArcFaceLoss(3, 4, 10.0, 8, 2).sub_centers == 2  # every argument by position too
    ours, theirs = mk.SoftTripleLoss(3, 4), losses.SoftTripleLoss(3, 4)
    assert (ours.num_classes, ours.centers_per_class, ours.la, ours.gamma, ours.margin) == \
        (theirs.num_classes, theirs.centers_per_class, theirs.la, theirs.gamma, theirs.margin)
    assert ours.fc.shape == theirs.fc.shape == (4, 30) and not hasattr(ours, "W")
    for ours, theirs in ((mk.LargeMarginSoftmaxLoss(3, 4), losses.LargeMarginSoftmaxLoss(3, 4)),
                         (mk.SphereFaceLoss(3, 4), losses.SphereFaceLoss(3, 4))):
        assert (ours.num_classes, ours.margin, ours.scale) == (theirs.num_classes, theirs.margin, theirs.scale)
        assert isinstance(ours.margin, int) and ours.W.shape == theirs.W.shape
    ours, theirs = mk.NormalizedSoftmaxLoss(3, 4), losses.NormalizedSoftmaxLoss(3, 4)
    assert ours.temperature == theirs.temperature and ours.W.shape == theirs.W.shape
    assert (ours.num_classes, ours.embedding_size) == (3, 4)  # PML's class leaves both attributes 0


def test_classifier_weight_init_func_as_pml():
    init = c_f.TorchInitWrapper(torch.nn.init.uniform_, a=-0.5, b=0.5)
    for name in CLASSIFIERS:
        ours, theirs = _classifier_pair(name, weight_init_func=init)
        weights = class_weights(ours)
        assert torch.equal(weights, class_weights(theirs)) and weights.abs().max() <= 0.5, name
        assert ours.weight_init_func is init


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_modules_pass_their_options_through(name):
    ours, _ = _classifier_pair(name, classes=5, dim=8)
    ours.double()
    x, labels = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 5, (16,))
    params = dict(CLASSIFIERS[name][2])
    assert_rel_close(ours(x, labels), getattr(mk, f"{name}_loss")(x, labels, class_weights(ours), backend="reference",
                                                                  **params), 0, name)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_forward_leaves_w_in_its_dtype(name):
    """PML's forward casts W.data to the embeddings' dtype in place; ours computes in the promoted dtype instead."""
    ours, _ = _classifier_pair(name, classes=5, dim=8)
    x, labels = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 5, (16,))
    value = ours(x, labels)
    assert class_weights(ours).dtype == torch.float32 and value.dtype == torch.float64
    params = dict(CLASSIFIERS[name][2])
    assert_rel_close(value, getattr(mk, f"{name}_loss")(x, labels, class_weights(ours).double(),
                                                        backend="reference", **params), 0, "promoted")
    assert ours(x.half(), labels).dtype == torch.float32
    assert ours.get_logits(x).dtype == torch.float64 and class_weights(ours).dtype == torch.float32


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_supported_distances_equal_pml(name):
    distance_list = [distances.CosineSimilarity()]
    if name in ("normalized_softmax", "soft_triple"):
        distance_list.append(distances.DotProductSimilarity())
    if name == "soft_triple":  # PML's asserts only an inverted distance: raw products too
        distance_list.append(distances.DotProductSimilarity(normalize_embeddings=False))
    x, labels = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 5, (16,))
    for distance in distance_list:
        ours, theirs = _classifier_pair(name, classes=5, dim=8, distance=distance)
        ours.double(), theirs.double()
        assert_rel_close(ours(x, labels), theirs(x, labels), TOL, f"{name} {distance}")
        assert ours.distance is distance


UNSUPPORTED_CLASSIFIER_KEYWORDS = [
    ("distance", lambda: distances.LpDistance(), "LpDistance"),
    ("distance", lambda: distances.DotProductSimilarity(normalize_embeddings=False), "DotProductSimilarity"),
    ("distance", lambda: distances.CosineSimilarity(power=2), "CosineSimilarity"),
    ("reducer", lambda: reducers.DivisorReducer(), "DivisorReducer"),
    ("weight_regularizer", lambda: torch.nn.Identity(), "Identity"),  # not a PML regularizer
    ("embedding_regularizer", lambda: (lambda x: x.norm()), "lambda"),
    ("collect_stats", lambda: True, "True"),
]


# (SoftTriple takes raw dot products: test_classifier_supported_distances_equal_pml)
UNSUPPORTED_CLASSIFIER_CASES = [pytest.param(name, keyword, value, text, id=f"{name}-{keyword}-{text}")
                                for name in CLASSIFIERS for keyword, value, text in UNSUPPORTED_CLASSIFIER_KEYWORDS
                                if not (name == "soft_triple" and text == "DotProductSimilarity")]


@pytest.mark.parametrize("name,keyword,value,text", UNSUPPORTED_CLASSIFIER_CASES)
def test_classifier_unsupported_keywords_raise_naming_them(name, keyword, value, text):
    ours_cls, _, params = CLASSIFIERS[name]
    with pytest.raises(NotImplementedError, match=rf"{keyword}=.*{text}.*{ours_cls.__name__}"):
        ours_cls(5, 8, **params, **{keyword: value()})


def test_arcface_with_dot_product_similarity_is_refused_as_pml_refuses_it():
    with pytest.raises(AssertionError):
        losses.ArcFaceLoss(5, 8, distance=distances.DotProductSimilarity())
    with pytest.raises(NotImplementedError, match="PML's ArcFaceLoss accepts only CosineSimilarity"):
        mk.ArcFaceLoss(5, 8, distance=distances.DotProductSimilarity())


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_rejects_miners_and_references_as_pml(name):
    ours, theirs = _classifier_pair(name, classes=5, dim=8)
    x, labels = torch.randn(16, 8), torch.randint(0, 5, (16,))
    with pytest.raises(NotImplementedError, match="indices_tuple"):
        ours(x, labels, (torch.arange(3),) * 3)
    for module in (ours, theirs):
        with pytest.raises(ValueError, match="ref_emb is not supported for this loss function"):
            module(x, labels, None, x[:4].clone(), labels[:4].clone())
