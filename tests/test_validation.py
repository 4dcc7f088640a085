"""Bad input (SPEC.md, "Bad input"): a ValueError or TypeError that names the argument, before any kernel runs.

Wrong type or dtype -> TypeError; wrong shape, value, range or device -> ValueError (as metric_kernels._validation
does). Every check asserts the argument's name appears in the message as a whole word, so "labels" is not satisfied by
a message that only names "ref_labels".
"""
from __future__ import annotations

import re

import pytest
import torch

import metric_kernels
import metric_kernels.reference
from metric_kernels import (ArcFaceLoss, BatchHardTripletLoss, CircleLoss, CosFaceLoss, LargeMarginSoftmaxLoss,
                            NormalizedSoftmaxLoss, ProxyAnchorLoss, SoftTripleLoss, SphereFaceLoss,
                            SubCenterArcFaceLoss, SupConLoss, angular_loss, arcface_loss, batch_hard_triplet_loss, circle_loss,
                            contrastive_loss, cosface_loss, generalized_lifted_structure_loss,
                            large_margin_softmax_loss, lifted_structure_loss, margin_loss, multi_similarity_loss, multiview, nca_loss,
                            normalized_softmax_loss, ntxent_loss, proxy_anchor_loss, proxy_nca_loss, soft_triple_loss,
                            sphereface_loss, subcenter_arcface_loss, supcon_loss, triplet_margin_loss,
                            tuplet_margin_loss)

N, M, D, C = 6, 9, 4, 3
NAN = float("nan")

PAIR_LOSSES = [circle_loss, supcon_loss, multi_similarity_loss, ntxent_loss, tuplet_margin_loss, contrastive_loss,
               generalized_lifted_structure_loss, margin_loss, nca_loss, batch_hard_triplet_loss, triplet_margin_loss,
               angular_loss, lifted_structure_loss]
PAIR_IDS = ["circle", "supcon", "multi_similarity", "ntxent", "tuplet_margin", "contrastive",
            "generalized_lifted_structure", "margin", "nca", "batch_hard", "triplet_margin", "angular",
            "lifted_structure"]


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv("METRIC_KERNELS_BACKEND", raising=False)


def names(name: str) -> str:
    """A regex matching `name` as a whole word (not as part of e.g. ref_labels or self_offset_x)."""
    return rf"(?<![\w]){re.escape(name)}(?![\w])"


def raises(exc, name):
    return pytest.raises(exc, match=names(name))


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (N,), generator=g)
    y = torch.randn(M, D, generator=g, dtype=torch.float64)
    y_labels = torch.randint(0, C, (M,), generator=g)
    proxies = torch.randn(C, D, generator=g, dtype=torch.float64)
    return x, labels, y, y_labels, proxies


PROXY_LOSSES = [proxy_anchor_loss, proxy_nca_loss]
PROXY_IDS = ["proxy_anchor", "proxy_nca"]


def _proxy_call(fn):
    """A proxy loss with valid proxies of the embeddings' width (when the width can be read)."""
    def call(x, labels, **kwargs):
        width = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 2 else D
        proxies = kwargs.pop("proxies", torch.randn(C, width, dtype=torch.float64))
        return fn(x, labels, proxies, **kwargs)

    call.__name__ = f"call_{fn.__name__}"
    return call


K = 2  # sub-centres of the subcenter_arcface calls below
CLASSIFIERS = {"arcface": (arcface_loss, 1), "cosface": (cosface_loss, 1),
               "subcenter_arcface": (subcenter_arcface_loss, K), "normalized_softmax": (normalized_softmax_loss, 1),
               "large_margin_softmax": (large_margin_softmax_loss, 1), "sphereface": (sphereface_loss, 1),
               "soft_triple": (soft_triple_loss, K)}


def _classifier_call(name):
    """The classifier loss `name` with a valid weight, D x (C * sub_centers), of the embeddings' width (when it can
    be read) unless weight= is given."""
    fn, sub_centers = CLASSIFIERS[name]

    def call(x, labels, **kwargs):
        width = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 2 else D
        weight = kwargs.pop("weight", torch.randn(width, C * sub_centers, dtype=torch.float64))
        if sub_centers > 1:
            kwargs.setdefault("centers_per_class" if name == "soft_triple" else "sub_centers", sub_centers)
        return fn(x, labels, weight, **kwargs)

    call.__name__ = f"call_{name}"
    return call


CLASSIFIER_CALLS = [_classifier_call(name) for name in CLASSIFIERS]
CLASSIFIER_IDS = list(CLASSIFIERS)
ALL_LOSSES = PAIR_LOSSES + [_proxy_call(fn) for fn in PROXY_LOSSES] + CLASSIFIER_CALLS
ALL_IDS = PAIR_IDS + PROXY_IDS + CLASSIFIER_IDS
proxy_param = pytest.mark.parametrize("proxy_loss", PROXY_LOSSES, ids=PROXY_IDS)


# --- the valid inputs used below are valid: each bad-input test changes exactly one thing -------------------------

@pytest.mark.parametrize("loss", ALL_LOSSES, ids=ALL_IDS)
def test_valid_inputs_do_not_raise(loss):
    x, labels, *_ = make()
    value = loss(x, labels)
    assert value.dim() == 0 and torch.isfinite(value)


@pytest.mark.parametrize("loss", PAIR_LOSSES, ids=PAIR_IDS)
def test_valid_references_and_boundary_self_offsets_do_not_raise(loss):
    x, labels, y, y_labels, _ = make()
    assert torch.isfinite(loss(x, labels, y, y_labels))
    for k in (0, M - N):  # both ends of the valid range 0 <= k, k + N <= M
        assert torch.isfinite(loss(x, labels, y, y_labels, self_offset=k))


# --- embeddings ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ALL_LOSSES, ids=ALL_IDS)
@pytest.mark.parametrize("bad", [[[0.0, 1.0]] * N, 3.0, None], ids=["list", "float", "None"])
def test_embeddings_not_a_tensor(loss, bad):
    _, labels, *_ = make()
    with raises(TypeError, "embeddings"):
        loss(bad, labels)


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_embeddings_not_float(loss, dtype):
    x, labels, *_ = make()
    with raises(TypeError, "embeddings"):
        loss(x.to(dtype), labels)


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=ALL_IDS)
@pytest.mark.parametrize("shape", [(N,), (N, 2, 2), ()], ids=["1d", "3d", "0d"])
def test_embeddings_not_2d(loss, shape):
    _, labels, *_ = make()
    with raises(ValueError, "embeddings"):
        loss(torch.randn(shape, dtype=torch.float64), labels)


# --- labels --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ALL_LOSSES, ids=ALL_IDS)
def test_labels_not_1d(loss):
    x, labels, *_ = make()
    with raises(ValueError, "labels"):
        loss(x, labels.view(N, 1))
    with raises(ValueError, "labels"):
        loss(x, labels[0])  # 0-D


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool, torch.complex64])
def test_labels_not_integer(loss, dtype):
    x, labels, *_ = make()
    with raises(TypeError, "labels"):
        loss(x, (labels % 2).to(dtype))


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=ALL_IDS)
def test_labels_not_a_tensor(loss):
    x, labels, *_ = make()
    with raises(TypeError, "labels"):
        loss(x, labels.tolist())


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=ALL_IDS)
@pytest.mark.parametrize("length", [N - 1, N + 1, 0])
def test_labels_of_another_length(loss, length):
    x, *_ = make()
    with raises(ValueError, "labels"):
        loss(x, torch.zeros(length, dtype=torch.long))


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=ALL_IDS)
def test_labels_on_another_device(loss):
    x, labels, *_ = make()
    with raises(ValueError, "labels"):
        loss(x, labels.to("meta"))


# --- ref_emb / ref_labels -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", PAIR_LOSSES, ids=PAIR_IDS)
def test_ref_emb_without_ref_labels(loss):
    x, labels, y, _, _ = make()
    with raises(ValueError, "ref_labels"):
        loss(x, labels, y)
    with raises(ValueError, "ref_labels"):
        loss(x, labels, ref_emb=y)


@pytest.mark.parametrize("loss", PAIR_LOSSES, ids=PAIR_IDS)
def test_ref_labels_without_ref_emb(loss):
    x, labels, _, y_labels, _ = make()
    with raises(ValueError, "ref_emb"):
        loss(x, labels, None, y_labels)
    with raises(ValueError, "ref_emb"):
        loss(x, labels, ref_labels=y_labels)


@pytest.mark.parametrize("loss", PAIR_LOSSES, ids=PAIR_IDS)
@pytest.mark.parametrize("width", [D - 1, D + 1])
def test_ref_emb_of_another_width(loss, width):
    x, labels, _, y_labels, _ = make()
    with raises(ValueError, "ref_emb"):
        loss(x, labels, torch.randn(M, width, dtype=torch.float64), y_labels)


@pytest.mark.parametrize("loss", PAIR_LOSSES, ids=PAIR_IDS)
def test_ref_emb_bad_type_dtype_or_shape(loss):
    x, labels, y, y_labels, _ = make()
    with raises(TypeError, "ref_emb"):
        loss(x, labels, y.tolist(), y_labels)
    with raises(TypeError, "ref_emb"):
        loss(x, labels, y.long(), y_labels)
    with raises(ValueError, "ref_emb"):
        loss(x, labels, y.reshape(-1), y_labels)


@pytest.mark.parametrize("loss", PAIR_LOSSES, ids=PAIR_IDS)
def test_ref_emb_on_another_device(loss):
    x, labels, y, y_labels, _ = make()
    with raises(ValueError, "ref_emb"):
        loss(x, labels, y.to("meta"), y_labels)


@pytest.mark.parametrize("loss", PAIR_LOSSES, ids=PAIR_IDS)
def test_ref_labels_on_another_device(loss):
    x, labels, y, y_labels, _ = make()
    with raises(ValueError, "ref_labels"):
        loss(x, labels, y, y_labels.to("meta"))


@pytest.mark.parametrize("loss", PAIR_LOSSES, ids=PAIR_IDS)
@pytest.mark.parametrize("length", [M - 1, M + 1, N])
def test_ref_labels_of_another_length(loss, length):
    x, labels, y, _, _ = make()
    with raises(ValueError, "ref_labels"):
        loss(x, labels, y, torch.zeros(length, dtype=torch.long))


@pytest.mark.parametrize("loss", PAIR_LOSSES, ids=PAIR_IDS)
def test_ref_labels_not_integer_or_not_1d(loss):
    x, labels, y, y_labels, _ = make()
    with raises(TypeError, "ref_labels"):
        loss(x, labels, y, y_labels.double())
    with raises(TypeError, "ref_labels"):
        loss(x, labels, y, y_labels > 0)
    with raises(ValueError, "ref_labels"):
        loss(x, labels, y, y_labels.view(M, 1))


# --- proxies -------------------------------------------------------------------------------------------------------

@proxy_param
@pytest.mark.parametrize("width", [D - 1, D + 1])
def test_proxies_of_another_width(proxy_loss, width):
    x, labels, *_ = make()
    with raises(ValueError, "proxies"):
        proxy_loss(x, labels, torch.randn(C, width, dtype=torch.float64))


@proxy_param
def test_proxies_with_zero_rows(proxy_loss):
    x, *_ = make()
    with raises(ValueError, "proxies"):
        proxy_loss(x, torch.zeros(N, dtype=torch.long), torch.empty(0, D, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(C * D,), (C, D, 1), ()], ids=["1d", "3d", "0d"])
@proxy_param
def test_proxies_not_2d(proxy_loss, shape):
    x, labels, *_ = make()
    with raises(ValueError, "proxies"):
        proxy_loss(x, labels, torch.randn(shape, dtype=torch.float64))


@proxy_param
def test_proxies_bad_type_dtype_or_device(proxy_loss):
    x, labels, _, _, proxies = make()
    with raises(TypeError, "proxies"):
        proxy_loss(x, labels, proxies.tolist())
    with raises(TypeError, "proxies"):
        proxy_loss(x, labels, proxies.long())
    with raises(ValueError, "proxies"):
        proxy_loss(x, labels, proxies.to("meta"))


@proxy_param
@pytest.mark.parametrize("bad", [-1, C, C + 5, -100])
def test_proxy_labels_outside_range(proxy_loss, bad):
    x, labels, _, _, proxies = make()
    labels = labels.clone()
    labels[2] = bad
    with raises(ValueError, "labels"):
        proxy_loss(x, labels, proxies)


@proxy_param
def test_proxy_labels_at_range_ends_are_valid(proxy_loss):
    x, _, _, _, proxies = make()
    labels = torch.tensor([0, C - 1] * (N // 2))
    assert torch.isfinite(proxy_loss(x, labels, proxies))


# --- the classifiers' weight and labels ----------------------------------------------------------------------------

@pytest.mark.parametrize("loss", CLASSIFIER_CALLS, ids=CLASSIFIER_IDS)
def test_classifier_weight_bad_type_dtype_shape_or_device(loss):
    x, labels, *_ = make()
    weight = torch.randn(D, C * K, dtype=torch.float64)
    with raises(TypeError, "weight"):
        loss(x, labels, weight=weight.tolist())
    with raises(TypeError, "weight"):
        loss(x, labels, weight=weight.long())
    for shape in [(D * C * K,), (D, C * K, 1), ()]:
        with raises(ValueError, "weight"):
            loss(x, labels, weight=torch.randn(shape, dtype=torch.float64))
    for rows in (D - 1, D + 1):  # the rows of W are the embeddings' width
        with raises(ValueError, "weight"):
            loss(x, labels, weight=torch.randn(rows, C * K, dtype=torch.float64))
    with raises(ValueError, "weight"):
        loss(x, torch.zeros(N, dtype=torch.long), weight=torch.empty(D, 0, dtype=torch.float64))
    with raises(ValueError, "weight"):
        loss(x, labels, weight=weight.to("meta"))


def test_subcenter_weight_columns_not_a_multiple_of_sub_centers():
    x, labels, *_ = make()
    for name in ("weight", "sub_centers"):
        with raises(ValueError, name):
            subcenter_arcface_loss(x, labels, torch.randn(D, 3 * C + 1, dtype=torch.float64), sub_centers=3)


@pytest.mark.parametrize("value,exc", [(0, ValueError), (-1, ValueError), (1.0, TypeError), (True, TypeError),
                                       ("3", TypeError), (None, TypeError)])
def test_sub_centers_not_a_positive_int(value, exc):
    x, labels, *_ = make()
    with raises(exc, "sub_centers"):
        subcenter_arcface_loss(x, labels, torch.randn(D, C * K, dtype=torch.float64), sub_centers=value)


@pytest.mark.parametrize("loss", CLASSIFIER_CALLS, ids=CLASSIFIER_IDS)
@pytest.mark.parametrize("bad", [-1, C, C + 5, -100])
def test_classifier_labels_outside_range(loss, bad):
    x, labels, *_ = make()
    labels = labels.clone()
    labels[2] = bad
    with raises(ValueError, "labels"):
        loss(x, labels)


@pytest.mark.parametrize("loss", CLASSIFIER_CALLS, ids=CLASSIFIER_IDS)
def test_classifier_labels_at_range_ends_are_valid(loss):
    x, *_ = make()
    assert torch.isfinite(loss(x, torch.tensor([0, C - 1] * (N // 2))))


@pytest.mark.parametrize("loss", [arcface_loss, subcenter_arcface_loss], ids=["arcface", "subcenter_arcface"])
@pytest.mark.parametrize("margin", [-1, -1e-9, 180, 180.0, 360, float("inf"), NAN])
def test_arcface_margin_outside_0_to_180_degrees(loss, margin):
    x, labels, *_ = make()
    with raises(ValueError, "margin"):
        loss(x, labels, torch.randn(D, C * 3, dtype=torch.float64), margin=margin)


@pytest.mark.parametrize("distance,normalize,error,name", [
    ("euclidean", True, ValueError, "distance"), ("squared_euclidean", True, ValueError, "distance"),
    ("lp", True, ValueError, "distance"), (None, True, ValueError, "distance"),
    ("cosine", False, ValueError, "normalize_embeddings"), ("dot", "no", TypeError, "normalize_embeddings")])
def test_soft_triple_distance_must_be_a_similarity(distance, normalize, error, name):
    x, labels, *_ = make()
    with raises(error, name):
        _classifier_call("soft_triple")(x, labels, distance=distance, normalize_embeddings=normalize)


@pytest.mark.parametrize("loss", ["large_margin_softmax", "sphereface"])
@pytest.mark.parametrize("margin", [0, -1, 2.5, 0.999, float("inf")])
def test_multiple_angle_margin_not_a_whole_number_from_1(loss, margin):
    with raises(ValueError, "margin"):
        _with_param(loss, "margin", margin)


@pytest.mark.parametrize("loss", [arcface_loss, subcenter_arcface_loss], ids=["arcface", "subcenter_arcface"])
def test_arcface_margin_range_ends_are_valid(loss):
    x, labels, *_ = make()
    for margin in (0, 179.9):
        assert torch.isfinite(loss(x, labels, torch.randn(D, C * 3, dtype=torch.float64), margin=margin))


@pytest.mark.parametrize("loss", CLASSIFIER_CALLS[:3], ids=CLASSIFIER_IDS[:3])
def test_classifier_scale_infinite(loss):
    x, labels, *_ = make()
    with raises(ValueError, "scale"):
        loss(x, labels, scale=float("inf"))


def test_cosface_margin_any_finite_real():
    x, labels, *_ = make()
    weight = torch.randn(D, C, dtype=torch.float64)
    for margin in (-0.5, 0, 2):
        assert torch.isfinite(cosface_loss(x, labels, weight, margin=margin))
    with raises(ValueError, "margin"):
        cosface_loss(x, labels, weight, margin=float("-inf"))


# --- hyper-parameters ----------------------------------------------------------------------------------------------

def _with_param(loss_name, name, value):
    x, labels, _, _, proxies = make()
    if loss_name in PROXY_IDS:
        return PROXY_LOSSES[PROXY_IDS.index(loss_name)](x, labels, proxies, **{name: value})
    if loss_name in CLASSIFIERS:
        return _classifier_call(loss_name)(x, labels, **{name: value})
    return getattr(metric_kernels, f"{loss_name}_loss")(x, labels, **{name: value})


POSITIVE_PARAMS = [("circle", "gamma"), ("supcon", "temperature"), ("supcon", "base_temperature"),
                   ("multi_similarity", "alpha"), ("multi_similarity", "beta"), ("nca", "softmax_scale"),
                   ("ntxent", "temperature"), ("tuplet_margin", "scale"),
                   ("proxy_anchor", "alpha"), ("proxy_nca", "softmax_scale"),
                   ("arcface", "scale"), ("cosface", "scale"), ("subcenter_arcface", "scale"),
                   ("normalized_softmax", "temperature"), ("large_margin_softmax", "scale"), ("sphereface", "scale"),
                   ("soft_triple", "la"), ("soft_triple", "gamma")]


@pytest.mark.parametrize("loss_name,name", POSITIVE_PARAMS)
@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, NAN, float("-inf")])
def test_positive_parameter_not_positive(loss_name, name, value):
    with raises(ValueError, name):
        _with_param(loss_name, name, value)


NOT_NUMBERS = {"numeric-str": "0.1", "str": "abc", "None": None, "bool": True, "tensor": torch.tensor(0.1),
               "list": [0.1]}
NOT_NUMBER_CASES = [pytest.param(loss_name, name, value, id=f"{name}-{vid}")
                    for loss_name, name in POSITIVE_PARAMS for vid, value in NOT_NUMBERS.items()
                    if not (name == "base_temperature" and value is None)]  # None: the default, no scaling


@pytest.mark.parametrize("loss_name,name,value", NOT_NUMBER_CASES)
def test_positive_parameter_not_a_number(loss_name, name, value):
    with raises(TypeError, name):
        _with_param(loss_name, name, value)


@pytest.mark.parametrize("loss_name,name", POSITIVE_PARAMS)
def test_positive_parameter_small_positive_is_valid(loss_name, name):
    assert torch.isfinite(_with_param(loss_name, name, 0.5))


@pytest.mark.parametrize("loss_name,name", [("circle", "m"), ("batch_hard_triplet", "margin"),
                                            ("generalized_lifted_structure", "pos_margin"),
                                            ("generalized_lifted_structure", "neg_margin"), ("margin", "margin"),
                                            ("margin", "beta"), ("margin", "nu"), ("tuplet_margin", "margin"),
                                            ("contrastive", "pos_margin"), ("contrastive", "neg_margin"),
                                            ("proxy_anchor", "margin"), ("arcface", "margin"),
                                            ("cosface", "margin"), ("subcenter_arcface", "margin"),
                                            ("large_margin_softmax", "margin"), ("sphereface", "margin"),
                                            ("soft_triple", "margin"), ("triplet_margin", "margin")])
def test_real_parameter_nan_or_not_a_number(loss_name, name):
    with raises(ValueError, name):
        _with_param(loss_name, name, NAN)
    with raises(TypeError, name):
        _with_param(loss_name, name, "0.1")


# --- self_offset ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", PAIR_LOSSES, ids=PAIR_IDS)
@pytest.mark.parametrize("k", [-1, -N, M - N + 1, M])
def test_self_offset_out_of_range(loss, k):
    x, labels, y, y_labels, _ = make()
    with raises(ValueError, "self_offset"):
        loss(x, labels, y, y_labels, self_offset=k)


@pytest.mark.parametrize("loss", PAIR_LOSSES, ids=PAIR_IDS)
@pytest.mark.parametrize("k", [0, 1])
def test_self_offset_without_ref_emb(loss, k):
    x, labels, *_ = make()
    with raises(ValueError, "self_offset"):
        loss(x, labels, self_offset=k)


@pytest.mark.parametrize("loss", PAIR_LOSSES, ids=PAIR_IDS)
@pytest.mark.parametrize("k", [1.0, 0.5, True, False, "1"], ids=["float1", "float0.5", "True", "False", "str"])
def test_self_offset_not_an_int(loss, k):
    x, labels, y, y_labels, _ = make()
    with raises(TypeError, "self_offset"):
        loss(x, labels, y, y_labels, self_offset=k)


# --- reduction, backend, deterministic, flags ----------------------------------------------------------------------

@pytest.mark.parametrize("loss", PAIR_LOSSES + CLASSIFIER_CALLS, ids=PAIR_IDS + CLASSIFIER_IDS)
@pytest.mark.parametrize("reduction", ["bogus", "MEAN", "avg", None, ""])
def test_unknown_reduction(loss, reduction):
    x, labels, *_ = make()
    with raises(ValueError, "reduction"):
        loss(x, labels, reduction=reduction)


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=ALL_IDS)
@pytest.mark.parametrize("backend", ["bogus", "Reference", "gpu", None, ""])
def test_unknown_backend(loss, backend):
    x, labels, *_ = make()
    with raises(ValueError, "backend"):
        loss(x, labels, backend=backend)


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=ALL_IDS)
@pytest.mark.parametrize("deterministic", ["yes", 1, 0, "True"])
def test_deterministic_not_none_or_bool(loss, deterministic):
    x, labels, *_ = make()
    with raises(TypeError, "deterministic"):
        loss(x, labels, deterministic=deterministic)


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=ALL_IDS)
@pytest.mark.parametrize("deterministic", [None, True, False])
def test_deterministic_valid_values(loss, deterministic):
    x, labels, *_ = make()
    assert torch.isfinite(loss(x, labels, deterministic=deterministic))


@pytest.mark.parametrize("name", ["soft", "normalize_embeddings"])
@pytest.mark.parametrize("value", ["yes", 1, 0, None])
def test_batch_hard_flags_not_bool(name, value):
    x, labels, *_ = make()
    with raises(TypeError, name):
        batch_hard_triplet_loss(x, labels, **{name: value})


@pytest.mark.parametrize("value", ["yes", 1, 0, None])
def test_triplet_margin_smooth_loss_not_bool(value):
    x, labels, *_ = make()
    with raises(TypeError, "smooth_loss"):
        triplet_margin_loss(x, labels, smooth_loss=value)


# --- modules -------------------------------------------------------------------------------------------------------

MODULE_CONSTRUCTORS = [
    (lambda: CircleLoss(gamma=0), ValueError, "gamma"),
    (lambda: CircleLoss(gamma=-1), ValueError, "gamma"),
    (lambda: CircleLoss(gamma="80"), TypeError, "gamma"),
    (lambda: CircleLoss(m=NAN), ValueError, "m"),
    (lambda: SupConLoss(temperature=-1), ValueError, "temperature"),
    (lambda: metric_kernels.TupletMarginLoss(scale=0), ValueError, "scale"),
    (lambda: metric_kernels.TupletMarginLoss(margin="5"), TypeError, "margin"),
    (lambda: SupConLoss(temperature=NAN), ValueError, "temperature"),
    (lambda: SupConLoss(base_temperature=0), ValueError, "base_temperature"),
    (lambda: BatchHardTripletLoss(soft="yes"), TypeError, "soft"),
    (lambda: BatchHardTripletLoss(normalize_embeddings=1), TypeError, "normalize_embeddings"),
    (lambda: BatchHardTripletLoss(margin="0.05"), TypeError, "margin"),
    (lambda: metric_kernels.TripletMarginLoss(margin="0.05"), TypeError, "margin"),
    (lambda: metric_kernels.TripletMarginLoss(smooth_loss=1), TypeError, "smooth_loss"),
    (lambda: metric_kernels.TripletMarginLoss(swap="no"), TypeError, "swap"),
    (lambda: metric_kernels.TripletMarginLoss(swap=True), NotImplementedError, "swap=True"),
    (lambda: metric_kernels.TripletMarginLoss(triplets_per_anchor=5), NotImplementedError, "triplets_per_anchor"),
    (lambda: ProxyAnchorLoss(num_classes=0, embedding_size=D), ValueError, "num_classes"),
    (lambda: ProxyAnchorLoss(num_classes=-2, embedding_size=D), ValueError, "num_classes"),
    (lambda: ProxyAnchorLoss(num_classes=2.0, embedding_size=D), TypeError, "num_classes"),
    (lambda: ProxyAnchorLoss(num_classes=C, embedding_size=2.5), TypeError, "embedding_size"),
    (lambda: ProxyAnchorLoss(num_classes=C, embedding_size=0), ValueError, "embedding_size"),
    (lambda: ProxyAnchorLoss(num_classes=C, embedding_size=True), TypeError, "embedding_size"),
    (lambda: ProxyAnchorLoss(C, D, alpha=0), ValueError, "alpha"),
    (lambda: CircleLoss(reduction="bogus"), ValueError, "reduction"),
    (lambda: SupConLoss(reduction="bogus"), ValueError, "reduction"),
    (lambda: BatchHardTripletLoss(reduction="bogus"), ValueError, "reduction"),
    (lambda: CircleLoss(backend="bogus"), ValueError, "backend"),
    (lambda: SupConLoss(backend="bogus"), ValueError, "backend"),
    (lambda: BatchHardTripletLoss(backend="bogus"), ValueError, "backend"),
    (lambda: ProxyAnchorLoss(C, D, backend="bogus"), ValueError, "backend"),
    (lambda: CircleLoss(deterministic="yes"), TypeError, "deterministic"),
    (lambda: ProxyAnchorLoss(C, D, deterministic=1), TypeError, "deterministic"),
    (lambda: ProxyAnchorLoss(C, D, weight_init_func="normal"), TypeError, "weight_init_func"),
    (lambda: ArcFaceLoss(0, D), ValueError, "num_classes"),
    (lambda: ArcFaceLoss(C, 2.5), TypeError, "embedding_size"),
    (lambda: ArcFaceLoss(C, D, margin=180), ValueError, "margin"),
    (lambda: ArcFaceLoss(C, D, margin=-1), ValueError, "margin"),
    (lambda: ArcFaceLoss(C, D, scale=0), ValueError, "scale"),
    (lambda: ArcFaceLoss(C, D, scale="64"), TypeError, "scale"),
    (lambda: CosFaceLoss(C, D, margin=NAN), ValueError, "margin"),
    (lambda: CosFaceLoss(C, D, scale=-1), ValueError, "scale"),
    (lambda: CosFaceLoss(True, D), TypeError, "num_classes"),
    (lambda: SubCenterArcFaceLoss(num_classes=C, embedding_size=D, sub_centers=0), ValueError, "sub_centers"),
    (lambda: SubCenterArcFaceLoss(num_classes=C, embedding_size=D, sub_centers=True), TypeError, "sub_centers"),
    (lambda: SubCenterArcFaceLoss(num_classes=C, embedding_size=D, margin=NAN), ValueError, "margin"),
    (lambda: SubCenterArcFaceLoss(num_classes=-1, embedding_size=D), ValueError, "num_classes"),
    (lambda: NormalizedSoftmaxLoss(C, D, temperature=0), ValueError, "temperature"),
    (lambda: NormalizedSoftmaxLoss(C, 0), ValueError, "embedding_size"),
    (lambda: NormalizedSoftmaxLoss(C, D, backend="bogus"), ValueError, "backend"),
    (lambda: ArcFaceLoss(C, D, deterministic="yes"), TypeError, "deterministic"),
    (lambda: CosFaceLoss(C, D, weight_init_func=3), TypeError, "weight_init_func"),
    (lambda: LargeMarginSoftmaxLoss(C, D, margin=1.5), ValueError, "margin"),
    (lambda: LargeMarginSoftmaxLoss(C, D, margin=0), ValueError, "margin"),
    (lambda: LargeMarginSoftmaxLoss(C, D, margin="4"), TypeError, "margin"),
    (lambda: LargeMarginSoftmaxLoss(C, D, scale=0), ValueError, "scale"),
    (lambda: SphereFaceLoss(C, D, margin=-2), ValueError, "margin"),
    (lambda: SphereFaceLoss(C, 2.0), TypeError, "embedding_size"),
    (lambda: SoftTripleLoss(C, D, centers_per_class=0), ValueError, "centers_per_class"),
    (lambda: SoftTripleLoss(C, D, centers_per_class=2.0), TypeError, "centers_per_class"),
    (lambda: SoftTripleLoss(C, D, la=0), ValueError, "la"),
    (lambda: SoftTripleLoss(C, D, gamma=-0.1), ValueError, "gamma"),
    (lambda: SoftTripleLoss(C, D, margin=NAN), ValueError, "margin"),
]


@pytest.mark.parametrize("make_module,exc,name", MODULE_CONSTRUCTORS,
                         ids=[f"{i}-{name}" for i, (_, _, name) in enumerate(MODULE_CONSTRUCTORS)])
def test_module_constructor_rejects(make_module, exc, name):
    with raises(exc, name):
        make_module()


def _modules():
    return [CircleLoss(), SupConLoss(), BatchHardTripletLoss(), ProxyAnchorLoss(C, D), ArcFaceLoss(C, D),
            CosFaceLoss(C, D), SubCenterArcFaceLoss(C, D), NormalizedSoftmaxLoss(C, D), LargeMarginSoftmaxLoss(C, D),
            SphereFaceLoss(C, D), SoftTripleLoss(C, D)]


MODULE_IDS = ["CircleLoss", "SupConLoss", "BatchHardTripletLoss", "ProxyAnchorLoss", "ArcFaceLoss", "CosFaceLoss",
              "SubCenterArcFaceLoss", "NormalizedSoftmaxLoss", "LargeMarginSoftmaxLoss", "SphereFaceLoss",
              "SoftTripleLoss"]
WEIGHT_MODULES = range(3, 11)  # the modules that own their class weights: no references


@pytest.mark.parametrize("index", range(len(MODULE_IDS)), ids=MODULE_IDS)
def test_module_default_forward_works(index):
    x, labels, *_ = make()
    assert torch.isfinite(_modules()[index](x.float(), labels))


@pytest.mark.parametrize("index", range(len(MODULE_IDS)), ids=MODULE_IDS)
def test_module_rejects_indices_tuple(index):
    x, labels, *_ = make()
    idx = torch.arange(N)
    for indices_tuple in [(idx, idx, idx), (idx, idx, idx, idx)]:
        with pytest.raises(NotImplementedError, match="indices_tuple"):
            _modules()[index](x.float(), labels, indices_tuple)
        with pytest.raises(NotImplementedError, match="indices_tuple"):
            _modules()[index](x.float(), labels, indices_tuple=indices_tuple)


@pytest.mark.parametrize("index", range(len(MODULE_IDS)), ids=MODULE_IDS)
def test_module_forward_without_labels(index):
    x, *_ = make()
    with raises(ValueError, "labels"):
        _modules()[index](x.float())
    with raises(ValueError, "labels"):
        _modules()[index](x.float(), None)


@pytest.mark.parametrize("index", WEIGHT_MODULES, ids=MODULE_IDS[3:])
def test_weight_module_rejects_ref_emb(index):
    x, labels, y, y_labels, _ = make()
    module = _modules()[index]
    with raises(ValueError, "ref_emb"):
        module(x.float(), labels, None, y.float(), y_labels)
    with raises(ValueError, "ref_emb"):
        module(x.float(), labels, ref_emb=y.float())


@pytest.mark.parametrize("index", range(3), ids=MODULE_IDS[:3])
def test_module_forward_passes_bad_input_to_validation(index):
    x, labels, y, y_labels, _ = make()
    module = _modules()[index]
    with raises(TypeError, "labels"):
        module(x, labels.double())
    with raises(ValueError, "ref_labels"):
        module(x, labels, None, y)
    with raises(ValueError, "ref_emb"):
        module(x, labels, None, torch.randn(M, D + 1, dtype=torch.float64), y_labels)
    with raises(ValueError, "self_offset"):
        module(x, labels, None, y, y_labels, self_offset=M)


@pytest.mark.parametrize("index", WEIGHT_MODULES, ids=MODULE_IDS[3:])
def test_weight_module_rejects_bad_embeddings_and_labels(index):
    x, labels, *_ = make()
    module = _modules()[index]
    weights = "proxies" if index == 3 else "weight"
    with raises(ValueError, weights):  # width D + 1 against weights of width D
        module(torch.randn(N, D + 1), labels)
    with raises(ValueError, "labels"):
        module(x.float(), torch.full((N,), C))
    with raises(TypeError, "embeddings"):
        module(x.long(), labels)
    with raises(TypeError, "labels"):
        module(x.float(), labels.float())
    with raises(ValueError, "embeddings"):  # get_logits: the width is the module's embedding_size
        module.get_logits(torch.randn(N, D + 1))
    with raises(TypeError, "embeddings"):
        module.get_logits(x.long())


# --- multiview -----------------------------------------------------------------------------------------------------

def test_multiview_valid():
    features = torch.randn(N, 2, D, dtype=torch.float64)
    embeddings, labels = multiview(features, torch.arange(N))
    assert embeddings.shape == (2 * N, D) and labels.shape == (2 * N,)


@pytest.mark.parametrize("shape", [(N, D), (N,), (N, 2, D, 1)], ids=["2d", "1d", "4d"])
def test_multiview_not_3d(shape):
    with raises(ValueError, "features"):
        multiview(torch.randn(shape, dtype=torch.float64))


@pytest.mark.parametrize("bad", [torch.zeros(N, 2, D, dtype=torch.long), torch.zeros(N, 2, D, dtype=torch.bool),
                                 [[[0.0] * D] * 2] * N], ids=["int", "bool", "list"])
def test_multiview_features_not_float_tensor(bad):
    with raises(TypeError, "features"):
        multiview(bad)


@pytest.mark.parametrize("length", [N - 1, N + 1, 2 * N])
def test_multiview_labels_of_wrong_length(length):
    with raises(ValueError, "labels"):
        multiview(torch.randn(N, 2, D, dtype=torch.float64), torch.zeros(length, dtype=torch.long))


def test_multiview_labels_bad_dtype_or_device():
    features = torch.randn(N, 2, D, dtype=torch.float64)
    with raises(TypeError, "labels"):
        multiview(features, torch.zeros(N))
    with raises(ValueError, "labels"):
        multiview(features, torch.zeros(N, dtype=torch.long, device="meta"))


# --- the error comes before any computation ------------------------------------------------------------------------

def _forbid(monkeypatch, rows_name):
    def forbidden(*args, **kwargs):
        raise AssertionError(f"{rows_name} was called")
    monkeypatch.setattr(metric_kernels.reference, rows_name, forbidden)


BAD_BEFORE_KERNEL = [
    ("circle_rows", lambda x, l, y, yl, p: circle_loss(x, l, backend="reference", gamma=0), ValueError, "gamma"),
    ("circle_rows", lambda x, l, y, yl, p: circle_loss(x, l, y, yl, self_offset=M, backend="reference"),
     ValueError, "self_offset"),
    ("circle_rows", lambda x, l, y, yl, p: circle_loss(x, l, reduction="bogus", backend="reference"),
     ValueError, "reduction"),
    ("circle_rows", lambda x, l, y, yl, p: circle_loss(x, l, deterministic="x", backend="reference"),
     TypeError, "deterministic"),
    ("supcon_rows", lambda x, l, y, yl, p: supcon_loss(x, l, y, yl[:-1], backend="reference"),
     ValueError, "ref_labels"),
    ("batch_hard_rows", lambda x, l, y, yl, p: batch_hard_triplet_loss(x, l.double(), backend="reference"),
     TypeError, "labels"),
    ("proxy_anchor_rows", lambda x, l, y, yl, p: proxy_anchor_loss(x, l + C, p, backend="reference"),
     ValueError, "labels"),
    ("nca_rows", lambda x, l, y, yl, p: nca_loss(x, l, y, yl, softmax_scale=-1, backend="reference"),
     ValueError, "softmax_scale"),
    ("nca_rows", lambda x, l, y, yl, p: proxy_nca_loss(x, l + C, p, backend="reference"), ValueError, "labels"),
    ("ntxent_rows", lambda x, l, y, yl, p: tuplet_margin_loss(x, l, y, yl, scale=0, backend="reference"),
     ValueError, "scale"),
    ("ntxent_rows", lambda x, l, y, yl, p: tuplet_margin_loss(x, l, margin=NAN, backend="reference"),
     ValueError, "margin"),
    ("margin_softmax_rows", lambda x, l, y, yl, p: arcface_loss(x, l + C, p.T, backend="reference"),
     ValueError, "labels"),
    ("margin_softmax_rows", lambda x, l, y, yl, p: cosface_loss(x, l, p.T, scale=0, backend="reference"),
     ValueError, "scale"),
    ("margin_softmax_rows", lambda x, l, y, yl, p: subcenter_arcface_loss(x, l, p.T, sub_centers=2,
                                                                          backend="reference"),
     ValueError, "sub_centers"),
    ("margin_softmax_rows", lambda x, l, y, yl, p: normalized_softmax_loss(x, l, p, backend="reference"),
     ValueError, "weight"),
    ("margin_softmax_rows", lambda x, l, y, yl, p: arcface_loss(x, l, p.T, reduction="bogus", backend="reference"),
     ValueError, "reduction"),
]


@pytest.mark.parametrize("rows_name,bad_call,exc,name", BAD_BEFORE_KERNEL,
                         ids=[f"{r}-{n}" for r, _, _, n in BAD_BEFORE_KERNEL])
def test_error_comes_before_any_computation(monkeypatch, rows_name, bad_call, exc, name):
    x, labels, y, y_labels, proxies = make()
    _forbid(monkeypatch, rows_name)
    # The patch is effective: valid input reaches the (now forbidden) reference kernel.
    valid = {
        "circle_rows": lambda: circle_loss(x, labels, backend="reference"),
        "supcon_rows": lambda: supcon_loss(x, labels, backend="reference"),
        "batch_hard_rows": lambda: batch_hard_triplet_loss(x, labels, backend="reference"),
        "proxy_anchor_rows": lambda: proxy_anchor_loss(x, labels, proxies, backend="reference"),
        "nca_rows": lambda: nca_loss(x, labels, backend="reference"),
        "ntxent_rows": lambda: tuplet_margin_loss(x, labels, backend="reference"),
        "margin_softmax_rows": lambda: arcface_loss(x, labels, proxies.T, backend="reference"),
    }[rows_name]
    with pytest.raises(AssertionError, match="was called"):
        valid()
    with raises(exc, name):
        bad_call(x, labels, y, y_labels, proxies)
