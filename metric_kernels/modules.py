"""nn.Module losses with pytorch-metric-learning's constructor arguments, defaults and forward order.

They are thin: each holds its hyper-parameters and calls the functional loss, so a PML training loop can swap
`pytorch_metric_learning.losses.CircleLoss(...)` for `metric_kernels.CircleLoss(...)` unchanged.

PML's base-class keywords are accepted with PML's defaults: `distance=` (each loss's PML default distance),
`reducer=` (AvgNonZeroReducer, MeanReducer, SumReducer, DoNothingReducer, PerAnchorReducer of one of the first three;
ProxyAnchorLoss also DivisorReducer), `embedding_regularizer=` (PML's regularizers, added as PML adds them),
`embedding_reg_weight`, `collect_stats=None/False`, and the weight-owning modules' (ProxyAnchorLoss, ProxyNCALoss and
the margin-softmax classifiers ArcFaceLoss, CosFaceLoss, SubCenterArcFaceLoss, NormalizedSoftmaxLoss)
`weight_regularizer=`, `weight_reg_weight` and `weight_init_func`.
A value the fused kernels cannot honour raises NotImplementedError naming the keyword and the value (see
metric_kernels/_pml_keywords.py and docs/index.md, "PML's constructor keywords").
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _pml_keywords as keywords
from . import _validation as check
from . import functional
from ._pairs import pair_counts
from .backends import check_backend_name


def _no_miners(indices_tuple) -> None:
    if indices_tuple is not None:
        raise NotImplementedError(
            "indices_tuple (the output of a PML miner) is not supported: metric_kernels computes each loss over all "
            "pairs in a fused pass; use the loss without a miner (batch-hard mining is BatchHardTripletLoss)")


def _labels_on(labels, embeddings, name):
    # PML moves labels to the embeddings' device; a drop-in replacement does the same.
    if labels is None:
        raise ValueError(f"{name} is required: these losses are defined by the labels")
    if isinstance(labels, torch.Tensor) and isinstance(embeddings, torch.Tensor) and labels.device != embeddings.device:
        labels = labels.to(embeddings.device)
    return labels


def _accept_pml_keywords(module: nn.Module, owner: str, distance, reducer, reduction, embedding_regularizer,
                         embedding_reg_weight, collect_stats, default_mode: str) -> str:
    """Resolves PML's base-class keywords onto `module`: distance_spec, the reducer mode (_reducer_mode) and PML's
    attribute names (distance, reducer: the objects given, or None for PML's defaults). Returns the functional
    reduction that the reducer mode reduces."""
    module.distance_spec = keywords.resolve_distance(owner, distance)
    module._reducer_mode, functional_reduction = keywords.resolve_reducer(owner, reducer, reduction, default_mode)
    embedding_regularizer = keywords.check_regularizer(owner, "embedding_regularizer", embedding_regularizer)
    keywords.check_collect_stats(owner, collect_stats)
    module.distance, module.reducer = distance, reducer
    module.embedding_regularizer = embedding_regularizer
    module.embedding_reg_weight = keywords.check_reg_weight(embedding_reg_weight, "embedding_reg_weight")
    return functional_reduction


def _keywords_repr(module: nn.Module) -> str:
    """The PML keywords that differ from the defaults, for extra_repr."""
    parts = []
    if module.distance is not None:
        parts.append(f"distance={keywords.describe(module.distance)}")
    if module.reducer is not None:
        parts.append(f"reducer={keywords.describe(module.reducer)}")
    return "".join(", " + part for part in parts)


def _accept_backend(module: nn.Module, backend, deterministic) -> None:
    """The modules' own keywords, stored as the functional losses take them."""
    module.backend = check_backend_name(backend)
    if deterministic is not None:
        check.check_bool(deterministic, "deterministic")
    module.deterministic = deterministic


def _accept_weight_keywords(module: nn.Module, owner: str, weight_regularizer, weight_reg_weight, weight_init_func,
                            weights: str) -> None:
    """PML's WeightRegularizerMixin keywords of a module that owns weights (`weights` names them for messages):
    weight_regularizer None or one of PML's regularizers, weight_reg_weight stored, weight_init_func None (the
    module's PML default) or a callable applied to the weights."""
    module.weight_regularizer = keywords.check_regularizer(owner, "weight_regularizer", weight_regularizer)
    module.weight_reg_weight = keywords.check_reg_weight(weight_reg_weight, "weight_reg_weight")
    if weight_init_func is not None and not callable(weight_init_func):
        raise TypeError(f"weight_init_func must be callable (it is called on {weights}), got "
                        f"{type(weight_init_func).__name__}")
    module.weight_init_func = weight_init_func


def _regularization_terms(module: nn.Module, embeddings) -> dict:
    """PML's regularization sub-losses of one forward (its WeightRegularizerMixin and EmbeddingRegularizerMixin): the
    weight regularizer on the module's _regularized_weights() (as PML hands them: the proxies, or W transposed) and
    the embedding regularizer on the embeddings, each times its weight, in PML's order. Raises before any kernel runs
    where the module's output has no place for them (reduction="none": one value per query)."""
    terms = {}
    if getattr(module, "weight_regularizer", None) is not None:
        terms["weight_reg_loss"] = module.weight_regularizer(module._regularized_weights()) * module.weight_reg_weight
    if module.embedding_regularizer is not None:
        terms["embedding_reg_loss"] = module.embedding_regularizer(embeddings) * module.embedding_reg_weight
    if terms and module._reducer_mode == "none":
        raise ValueError(f"reduction='none' returns one loss per query, which has no place for the "
                         f"{' and '.join(name[:-len('_reg_loss')] for name in terms)} regularizer's term (a number "
                         "for the batch): use a reducer (DoNothingReducer keeps PML's loss dictionary)")
    return terms


def _regularized(value, terms: dict):
    """The loss with PML's regularization terms: added to a reduced loss (PML's reducers add "already_reduced"
    sub-losses as they are), or PML's entries in DoNothingReducer's dictionary."""
    if not terms:
        return value
    if isinstance(value, dict):
        return dict(value, **{name: {"losses": term, "indices": None, "reduction_type": "already_reduced"}
                              for name, term in terms.items()})
    for term in terms.values():
        value = value + term
    return value


def _checked_logit_inputs(module: nn.Module, embeddings, **weights) -> None:
    """get_logits' embeddings: a float N x embedding_size tensor on the weights' device."""
    check.check_embeddings(embeddings, "embeddings")
    if embeddings.shape[1] != module.embedding_size:
        raise ValueError(f"embeddings must have {module.embedding_size} columns (embedding_size), "
                         f"got shape {tuple(embeddings.shape)}")
    check.check_same_device(embeddings, "embeddings", **weights)


def _element_losses(rows: torch.Tensor) -> dict:
    """PML's DoNothingReducer output for a loss with one "element" loss per query."""
    indices = torch.arange(rows.shape[0], device=rows.device)
    return {"loss": {"losses": rows, "indices": indices, "reduction_type": "element"}}


def _kept_element_losses(losses: torch.Tensor, kept: torch.Tensor) -> dict:
    """PML's DoNothingReducer output for NCA and ProxyNCA: the losses of the queries PML keeps, and their indices."""
    return {"loss": {"losses": losses[kept], "indices": kept.nonzero().squeeze(1), "reduction_type": "element"}}


def _pair_losses_dictionary(value) -> dict:
    """PML's DoNothingReducer output for a loss with one "pos_pair" loss per positive pair (angular, lifted structure):
    a P x 1 column and the (anchor, positive) indices, from (losses, anchors, positives, labels, guard)."""
    losses, anchors, positives, _, guard = value
    return {"loss": {"losses": (losses + guard).unsqueeze(1), "indices": (anchors, positives),
                     "reduction_type": "pos_pair"}}


def _distance_matrix(spec: keywords.DistanceSpec, embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """PML's distance(embeddings, references) for a supported distance: the similarity (cosine or dot product) or
    the Euclidean distance to the power, of the rows normalised where the distance normalises, in the embeddings'
    dtype (PML casts its weights to it)."""
    references = references.to(embeddings.dtype)
    if spec.normalize:
        embeddings, references = (functional._prepare(rows, rows.dtype, True) for rows in (embeddings, references))
    matrix = torch.cdist(embeddings, references) if spec.kind == "lp" else embeddings @ references.T
    return matrix if spec.power == 1 else matrix ** spec.power


class _PairLoss(nn.Module):
    """forward(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, *, self_offset=None)."""

    _PML_NAME = ""  # the module's name in metric_kernels/_pml_keywords.py's tables
    _PML_DEFAULT_REDUCTION = "mean_nonzero"  # what PML's default reducer for the loss does (AvgNonZeroReducer)

    def __init__(self, reduction, backend, deterministic, distance, reducer, embedding_regularizer,
                 embedding_reg_weight, collect_stats):
        super().__init__()
        self.reduction = _accept_pml_keywords(self, self._PML_NAME, distance, reducer, reduction,
                                              embedding_regularizer, embedding_reg_weight, collect_stats,
                                              self._PML_DEFAULT_REDUCTION)
        _accept_backend(self, backend, deterministic)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                self_offset=None):
        _no_miners(indices_tuple)
        labels = _labels_on(labels, embeddings, "labels")
        if ref_labels is not None:
            ref_labels = _labels_on(ref_labels, ref_emb if ref_emb is not None else embeddings, "ref_labels")
        terms = _regularization_terms(self, embeddings)
        return _regularized(self._reduced_loss(embeddings, labels, ref_emb, ref_labels, self_offset), terms)

    def _reduced_loss(self, embeddings, labels, ref_emb, ref_labels, self_offset):
        value = self._loss(embeddings, labels, ref_emb, ref_labels, self_offset=self_offset,
                           reduction=self.reduction, backend=self.backend, deterministic=self.deterministic)
        if self._reducer_mode == "unreduced":  # PML's DoNothingReducer: its loss dictionary, one loss per query
            return self._pml_dictionary(value)
        if self._reducer_mode == "mean_over_triplets":  # PML's MeanReducer over the mined triplets
            y_labels = labels if ref_emb is None else ref_labels
            positives, negatives = pair_counts(labels.long(), y_labels.long(), 0 if ref_emb is None else self_offset)
            triplets = ((positives > 0) & (negatives > 0)).sum().clamp(min=1)
            return value.sum() / triplets.to(value.dtype)
        return value

    def _loss(self, *args, **kwargs):
        raise NotImplementedError

    @staticmethod
    def _pml_rows(rows):
        """The per-query losses in the shape PML's loss dictionary holds them."""
        return rows

    def _pml_dictionary(self, value):
        """PML's DoNothingReducer dictionary of what _loss returned with reduction "none"."""
        return _element_losses(self._pml_rows(value))


class CircleLoss(_PairLoss):
    """PML's CircleLoss(m=0.4, gamma=80): see docs/losses/circle.md.

    reduction: None means PML's default ("mean_nonzero"), or what `reducer=` says; PML's keywords: distance (only
    CosineSimilarity() for now), reducer, embedding_regularizer (PML's regularizers), embedding_reg_weight, collect_stats.
    """

    _PML_NAME = "CircleLoss"

    def __init__(self, m=0.4, gamma=80, *, reduction=None, backend="auto", deterministic=None, distance=None,
                 reducer=None, embedding_regularizer=None, embedding_reg_weight=1, collect_stats=None):
        super().__init__(reduction, backend, deterministic, distance, reducer, embedding_regularizer,
                         embedding_reg_weight, collect_stats)
        self.m = check.check_real(m, "m")
        self.gamma = check.check_positive(gamma, "gamma")

    def _loss(self, *args, **kwargs):
        return functional.circle_loss(*args, m=self.m, gamma=self.gamma, **kwargs)

    @staticmethod
    def _pml_rows(rows):
        return rows.unsqueeze(1)  # PML's CircleLoss keeps its per-query losses as an N x 1 column

    def extra_repr(self):
        return (f"m={self.m}, gamma={self.gamma}, reduction={self.reduction!r}, backend={self.backend!r}"
                + _keywords_repr(self))


class SupConLoss(_PairLoss):
    """PML's SupConLoss(temperature=0.1): see docs/losses/supcon.md. base_temperature (SupContrast's) scales by t / b.

    reduction: None means PML's default ("mean_nonzero"), or what `reducer=` says; PML's keywords: distance
    (CosineSimilarity() or DotProductSimilarity() with normalize_embeddings=True for now), reducer,
    embedding_regularizer (PML's regularizers), embedding_reg_weight, collect_stats.
    """

    _PML_NAME = "SupConLoss"

    def __init__(self, temperature=0.1, *, base_temperature=None, reduction=None, backend="auto",
                 deterministic=None, distance=None, reducer=None, embedding_regularizer=None, embedding_reg_weight=1,
                 collect_stats=None):
        super().__init__(reduction, backend, deterministic, distance, reducer, embedding_regularizer,
                         embedding_reg_weight, collect_stats)
        self.temperature = check.check_positive(temperature, "temperature")
        self.base_temperature = (None if base_temperature is None
                                 else check.check_positive(base_temperature, "base_temperature"))

    def _loss(self, *args, **kwargs):
        return functional.supcon_loss(*args, temperature=self.temperature, base_temperature=self.base_temperature,
                                      **keywords.functional_distance(self.distance_spec),
                                      **kwargs)

    def extra_repr(self):
        return (f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}" + _keywords_repr(self))


class MultiSimilarityLoss(_PairLoss):
    """PML's MultiSimilarityLoss(alpha=2, beta=50, base=0.5): see docs/losses/multi-similarity.md.

    reduction: None means PML's default for this loss, MeanReducer ("mean", over every query), or what `reducer=`
    says; PML's keywords as SupConLoss's.
    """

    _PML_NAME = "MultiSimilarityLoss"
    _PML_DEFAULT_REDUCTION = "mean"

    def __init__(self, alpha=2, beta=50, base=0.5, *, reduction=None, backend="auto", deterministic=None,
                 distance=None, reducer=None, embedding_regularizer=None, embedding_reg_weight=1, collect_stats=None):
        super().__init__(reduction, backend, deterministic, distance, reducer, embedding_regularizer,
                         embedding_reg_weight, collect_stats)
        self.alpha = check.check_positive(alpha, "alpha")
        self.beta = check.check_positive(beta, "beta")
        self.base = check.check_real(base, "base")

    def _loss(self, *args, **kwargs):
        return functional.multi_similarity_loss(*args, alpha=self.alpha, beta=self.beta, base=self.base,
                                                **keywords.functional_distance(self.distance_spec), **kwargs)

    _pml_rows = staticmethod(CircleLoss._pml_rows)  # PML keeps these per-query losses as an N x 1 column too

    def extra_repr(self):
        return (f"alpha={self.alpha}, beta={self.beta}, base={self.base}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}" + _keywords_repr(self))


class _LiftedStructureMargins(_PairLoss):
    """What the two lifted structure losses share: PML's (neg_margin=1, pos_margin=0) and their repr."""

    def __init__(self, neg_margin=1, pos_margin=0, *, reduction=None, backend="auto", deterministic=None,
                 distance=None, reducer=None, embedding_regularizer=None, embedding_reg_weight=1, collect_stats=None):
        super().__init__(reduction, backend, deterministic, distance, reducer, embedding_regularizer,
                         embedding_reg_weight, collect_stats)
        self.neg_margin = check.check_real(neg_margin, "neg_margin")
        self.pos_margin = check.check_real(pos_margin, "pos_margin")

    def extra_repr(self):
        return (f"neg_margin={self.neg_margin}, pos_margin={self.pos_margin}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}" + _keywords_repr(self))


class GeneralizedLiftedStructureLoss(_LiftedStructureMargins):
    """PML's GeneralizedLiftedStructureLoss(neg_margin=1, pos_margin=0) on PML's default distance, LpDistance()
    (Euclidean on normalised rows): see docs/losses/lifted-structure.md.

    reduction: None means PML's default for this loss, MeanReducer ("mean", over every query), or what `reducer=`
    says; PML's keywords as ContrastiveLoss's.
    """

    _PML_NAME = "GeneralizedLiftedStructureLoss"
    _PML_DEFAULT_REDUCTION = "mean"

    def _loss(self, *args, **kwargs):
        return functional.generalized_lifted_structure_loss(*args, neg_margin=self.neg_margin,
                                                            pos_margin=self.pos_margin,
                                                            **keywords.functional_distance(self.distance_spec),
                                                            **kwargs)

    _pml_rows = staticmethod(CircleLoss._pml_rows)  # PML keeps these per-query losses as an N x 1 column too


class MarginLoss(_PairLoss):
    """PML's MarginLoss(margin=0.2, nu=0, beta=1.2, triplets_per_anchor="all", learn_beta=False, num_classes=None)
    over all triplets, on PML's default distance, LpDistance() (Euclidean on normalised rows): see
    docs/losses/margin.md.

    learn_beta=True makes `beta` an nn.Parameter (one element, as PML's) that gets the loss's gradient, and adds PML's
    regularizer nu * beta. num_classes (a beta per class) and another triplets_per_anchor (PML samples that many
    triplets at random) raise NotImplementedError. reduction: None means PML's default, DivisorReducer ("divisor":
    the triplets' sum over the number of nonzero hinge terms), or what `reducer=` says (AvgNonZeroReducer,
    MeanReducer, SumReducer over the triplets); PML's keywords as ContrastiveLoss's.
    """

    _PML_NAME = "MarginLoss"
    _PML_DEFAULT_REDUCTION = "divisor"

    def __init__(self, margin=0.2, nu=0, beta=1.2, triplets_per_anchor="all", learn_beta=False, num_classes=None, *,
                 reduction=None, backend="auto", deterministic=None, distance=None, reducer=None,
                 embedding_regularizer=None, embedding_reg_weight=1, collect_stats=None):
        if reduction is not None and reduction not in functional.MARGIN_REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(map(repr, functional.MARGIN_REDUCTIONS))}; got "
                             f"{reduction!r}")
        super().__init__(None, backend, deterministic, distance, reducer, embedding_regularizer,
                         embedding_reg_weight, collect_stats)
        if reduction is not None:
            if reducer is not None and self._reducer_mode != reduction:
                raise ValueError(f"reduction={reduction!r} conflicts with reducer={keywords.describe(reducer)}: pass "
                                 "one of them")
            self._reducer_mode = reduction
        self.reduction = self._reducer_mode  # "divisor", "mean_nonzero", "mean", "sum" or "none"
        self.margin = check.check_real(margin, "margin")
        self.nu = check.check_real(nu, "nu")
        self.learn_beta = check.check_bool(learn_beta, "learn_beta")
        if num_classes is not None:
            raise NotImplementedError(f"num_classes={num_classes!r} is not supported by MarginLoss yet: a beta per "
                                      "class makes the margins differ between queries, and the fused kernels take "
                                      "one pair of margins per call")
        if triplets_per_anchor != "all":
            raise NotImplementedError(f"triplets_per_anchor={triplets_per_anchor!r} is not supported by MarginLoss "
                                      "yet: PML samples that many triplets per anchor at random; the fused kernels "
                                      "sum over all of them ('all', PML's default)")
        self.triplets_per_anchor = triplets_per_anchor
        self.num_classes = None
        beta = torch.tensor([check.check_real(beta, "beta")])
        self.beta = nn.Parameter(beta) if self.learn_beta else beta

    def _loss(self, *args, reduction, **kwargs):
        return functional.margin_loss(*args, margin=self.margin, beta=self.beta,
                                      nu=self.nu if self.learn_beta else 0.0, reduction=self.reduction,
                                      **keywords.functional_distance(self.distance_spec), **kwargs)

    def extra_repr(self):
        return (f"margin={self.margin}, nu={self.nu}, beta={float(self.beta)}, learn_beta={self.learn_beta}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}" + _keywords_repr(self))


class NCALoss(_PairLoss):
    """PML's NCALoss(softmax_scale=1) on PML's default distance for it, LpDistance(power=2) (the squared Euclidean
    distance of normalised rows): see docs/losses/nca.md.

    reduction: None means PML's default for this loss, MeanReducer ("mean", over the queries PML keeps: those whose
    positives' softmax is not 0), or what `reducer=` says; DoNothingReducer gives the kept queries' losses and
    indices, as PML's. PML's keywords: distance (LpDistance(p=2, power=1 or 2, normalised or not),
    CosineSimilarity(), DotProductSimilarity()), reducer, embedding_regularizer (PML's regularizers), embedding_reg_weight,
    collect_stats.
    """

    _PML_NAME = "NCALoss"
    _PML_DEFAULT_REDUCTION = "mean"

    def __init__(self, softmax_scale=1, *, reduction=None, backend="auto", deterministic=None, distance=None,
                 reducer=None, embedding_regularizer=None, embedding_reg_weight=1, collect_stats=None):
        super().__init__(reduction, backend, deterministic, distance, reducer, embedding_regularizer,
                         embedding_reg_weight, collect_stats)
        self.softmax_scale = check.check_positive(softmax_scale, "softmax_scale")

    def _loss(self, *args, **kwargs):
        options = dict(softmax_scale=self.softmax_scale, **keywords.functional_distance(self.distance_spec), **kwargs)
        if self._reducer_mode == "unreduced":
            return functional._nca_losses_of_batch(*args, **options)
        return functional.nca_loss(*args, **options)

    def _pml_dictionary(self, value):
        losses, kept, guard = value
        return _kept_element_losses(losses + guard, kept)

    def extra_repr(self):
        return (f"softmax_scale={self.softmax_scale}, reduction={self.reduction!r}, backend={self.backend!r}"
                + _keywords_repr(self))


def _per_anchor(module, kwargs: dict) -> dict:
    """The functional keywords of a loss reduced per pair: PML's PerAnchorReducer (reducer mode "per_anchor_<inner>")
    reduces each query's mean over its pairs with the inner reducer."""
    mode = module._reducer_mode
    if mode.startswith("per_anchor_"):
        kwargs = dict(kwargs, reduction=mode[len("per_anchor_"):], _per_anchor=True)
    return kwargs


class NTXentLoss(_PairLoss):
    """PML's NTXentLoss(temperature=0.07): see docs/losses/ntxent.md.

    reduction: None means PML's default for this loss, MeanReducer ("mean", over every positive pair), or what
    `reducer=` says (AvgNonZeroReducer, MeanReducer, SumReducer: over the pairs; PerAnchorReducer of one of them: each
    query's mean over its pairs, reduced over the queries); reduction="none" gives each query's sum over its positive
    pairs. PML's keywords as SupConLoss's.
    """

    _PML_NAME = "NTXentLoss"
    _PML_DEFAULT_REDUCTION = "mean"

    def __init__(self, temperature=0.07, *, reduction=None, backend="auto", deterministic=None, distance=None,
                 reducer=None, embedding_regularizer=None, embedding_reg_weight=1, collect_stats=None):
        super().__init__(reduction, backend, deterministic, distance, reducer, embedding_regularizer,
                         embedding_reg_weight, collect_stats)
        self.temperature = check.check_positive(temperature, "temperature")

    def _loss(self, *args, **kwargs):
        return functional.ntxent_loss(*args, temperature=self.temperature,
                                      **keywords.functional_distance(self.distance_spec), **_per_anchor(self, kwargs))

    def extra_repr(self):
        return (f"temperature={self.temperature}, reduction={self.reduction!r}, backend={self.backend!r}"
                + _keywords_repr(self))


class TupletMarginLoss(_PairLoss):
    """PML's TupletMarginLoss(margin=5.73, scale=64), on cosine similarities: see docs/losses/tuplet-margin.md.

    margin is given in degrees and stored in radians, as PML stores it (`self.margin`).

    reduction: None means PML's default for this loss, MeanReducer ("mean", over every positive pair), or what
    `reducer=` says, as NTXentLoss's (PML's own PerAnchorReducer raises on TupletMarginLoss's P x 1 column of pair
    losses; ours reduces them as that reducer does a vector). PML's keywords: distance (CosineSimilarity() only, as
    PML asserts), reducer, embedding_regularizer (PML's regularizers), embedding_reg_weight, collect_stats.
    """

    _PML_NAME = "TupletMarginLoss"
    _PML_DEFAULT_REDUCTION = "mean"

    def __init__(self, margin=5.73, scale=64, *, reduction=None, backend="auto", deterministic=None, distance=None,
                 reducer=None, embedding_regularizer=None, embedding_reg_weight=1, collect_stats=None):
        super().__init__(reduction, backend, deterministic, distance, reducer, embedding_regularizer,
                         embedding_reg_weight, collect_stats)
        self.margin = math.radians(check.check_real(margin, "margin"))
        self.scale = check.check_positive(scale, "scale")

    def _loss(self, *args, **kwargs):
        return functional._tuplet_margin_loss(*args, margin_radians=self.margin, scale=self.scale,
                                              **_per_anchor(self, kwargs))

    def extra_repr(self):
        return (f"margin={math.degrees(self.margin):g} degrees, scale={self.scale}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}" + _keywords_repr(self))


class AngularLoss(_PairLoss):
    """PML's AngularLoss(alpha=40): see docs/losses/angular.md. alpha is in degrees, stored in degrees as given (PML
    stores np.radians(alpha) as a tensor).

    reduction: None means PML's default for this loss, MeanReducer ("mean", over every positive pair), or what
    `reducer=` says (AvgNonZeroReducer, SumReducer; DoNothingReducer gives every positive pair's loss as a P x 1 column
    with its (anchor, positive) indices, as PML's; PerAnchorReducer of one of them reduces each anchor's mean over its
    pairs, as NTXentLoss's). PML's keywords: distance (LpDistance() only, as PML asserts), reducer,
    embedding_regularizer (PML's regularizers), embedding_reg_weight, collect_stats.
    """

    _PML_NAME = "AngularLoss"
    _PML_DEFAULT_REDUCTION = "mean"

    def __init__(self, alpha=40, *, reduction=None, backend="auto", deterministic=None, distance=None, reducer=None,
                 embedding_regularizer=None, embedding_reg_weight=1, collect_stats=None):
        super().__init__(reduction, backend, deterministic, distance, reducer, embedding_regularizer,
                         embedding_reg_weight, collect_stats)
        self.alpha = check.check_acute_angle_degrees(alpha, "alpha")

    def _loss(self, *args, **kwargs):
        if self._reducer_mode == "unreduced":
            return functional._angular_pair_losses(*args, alpha=self.alpha, **kwargs)
        return functional.angular_loss(*args, alpha=self.alpha, **_per_anchor(self, kwargs))

    def _pml_dictionary(self, value):
        return _pair_losses_dictionary(value)

    def extra_repr(self):
        return f"alpha={self.alpha:g} degrees, reduction={self.reduction!r}, backend={self.backend!r}" + _keywords_repr(
            self)


class LiftedStructureLoss(_LiftedStructureMargins):
    """PML's LiftedStructureLoss(neg_margin=1, pos_margin=0) on PML's default distance, LpDistance() (Euclidean on
    normalised rows): see docs/losses/lifted-structure-pairs.md.

    reduction: None means PML's default for this loss, MeanReducer ("mean", over every positive pair), or what
    `reducer=` says (AvgNonZeroReducer, SumReducer; DoNothingReducer gives every positive pair's loss as a P x 1 column
    with its (anchor, positive) indices, as PML's; PerAnchorReducer of one of them reduces each anchor's mean over its
    pairs). PML's keywords: distance (LpDistance(p=2, power=1 or 2, normalised or not), CosineSimilarity(),
    DotProductSimilarity()), reducer, embedding_regularizer (PML's regularizers), embedding_reg_weight, collect_stats.
    """

    _PML_NAME = "LiftedStructureLoss"
    _PML_DEFAULT_REDUCTION = "mean"

    def _loss(self, *args, **kwargs):
        options = dict(neg_margin=self.neg_margin, pos_margin=self.pos_margin,
                       **keywords.functional_distance(self.distance_spec))
        if self._reducer_mode == "unreduced":
            return functional._lifted_structure_pair_losses(*args, **options, **kwargs)
        return functional.lifted_structure_loss(*args, **options, **_per_anchor(self, kwargs))

    def _pml_dictionary(self, value):
        return _pair_losses_dictionary(value)


class ContrastiveLoss(_PairLoss):
    """PML's ContrastiveLoss(pos_margin=0, neg_margin=1) on PML's default distance, LpDistance() (Euclidean on
    normalised rows): see docs/losses/contrastive.md.

    reduction: None means PML's default ("mean_nonzero": each side averaged over its nonzero pairs, then added), or
    what `reducer=` says (AvgNonZeroReducer, MeanReducer, SumReducer); reduction="none" gives each query's sum over
    all its pairs. PML's keywords: distance (LpDistance(p=2, power=1 or 2, normalised or not), CosineSimilarity(),
    DotProductSimilarity()), reducer, embedding_regularizer (PML's regularizers), embedding_reg_weight, collect_stats.
    """

    _PML_NAME = "ContrastiveLoss"

    def __init__(self, pos_margin=0, neg_margin=1, *, reduction=None, backend="auto", deterministic=None,
                 distance=None, reducer=None, embedding_regularizer=None, embedding_reg_weight=1, collect_stats=None):
        super().__init__(reduction, backend, deterministic, distance, reducer, embedding_regularizer,
                         embedding_reg_weight, collect_stats)
        self.pos_margin = check.check_real(pos_margin, "pos_margin")
        self.neg_margin = check.check_real(neg_margin, "neg_margin")

    def _loss(self, *args, **kwargs):
        return functional.contrastive_loss(*args, pos_margin=self.pos_margin, neg_margin=self.neg_margin,
                                           **keywords.functional_distance(self.distance_spec),
                                           **_per_anchor(self, kwargs))

    def extra_repr(self):
        return (f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}" + _keywords_repr(self))


class TripletMarginLoss(_PairLoss):
    """PML's TripletMarginLoss(margin=0.05, swap=False, smooth_loss=False, triplets_per_anchor="all") without a miner:
    every triplet of the batch, on PML's default distance LpDistance() (Euclidean on normalised rows); see
    docs/losses/triplet-margin.md. The fused kernels never form the triplets.

    swap=True (PML's distance from the positive to the negative where it violates more) and an integer
    triplets_per_anchor (PML's random sample of triplets) raise NotImplementedError. reduction: None means PML's
    default ("mean_nonzero": the mean over the nonzero triplets), or what `reducer=` says (AvgNonZeroReducer,
    MeanReducer: over every triplet, SumReducer); reduction="none" gives each query's sum over its triplets. PML's
    keywords: distance (LpDistance(p=2, power=1 or 2, normalised or not), CosineSimilarity(),
    DotProductSimilarity()), reducer, embedding_regularizer (PML's regularizers), embedding_reg_weight, collect_stats.
    """

    _PML_NAME = "TripletMarginLoss"

    def __init__(self, margin=0.05, swap=False, smooth_loss=False, triplets_per_anchor="all", *, reduction=None,
                 backend="auto", deterministic=None, distance=None, reducer=None, embedding_regularizer=None,
                 embedding_reg_weight=1, collect_stats=None):
        super().__init__(reduction, backend, deterministic, distance, reducer, embedding_regularizer,
                         embedding_reg_weight, collect_stats)
        self.margin = check.check_real(margin, "margin")
        self.swap = check.check_bool(swap, "swap")
        self.smooth_loss = check.check_bool(smooth_loss, "smooth_loss")
        if self.swap:
            raise NotImplementedError("swap=True is not supported by TripletMarginLoss of metric_kernels: the fused "
                                      "kernels fold each anchor's row of distances, and the swap needs the "
                                      "positive's distance to each negative too")
        if triplets_per_anchor != "all":
            raise NotImplementedError(f"triplets_per_anchor={triplets_per_anchor!r} is not supported by "
                                      "TripletMarginLoss of metric_kernels: the fused kernels compute every "
                                      "triplet (PML's 'all'), not a random sample")
        self.triplets_per_anchor = triplets_per_anchor

    def _loss(self, *args, **kwargs):
        return functional.triplet_margin_loss(*args, margin=self.margin, smooth_loss=self.smooth_loss,
                                              **keywords.functional_distance(self.distance_spec), **kwargs)

    def extra_repr(self):
        return (f"margin={self.margin}, smooth_loss={self.smooth_loss}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}" + _keywords_repr(self))


class BatchHardTripletLoss(_PairLoss):
    """PML's BatchHardMiner + TripletMarginLoss(margin=0.05, smooth_loss=soft) in one module: see
    docs/losses/batch-hard-triplet.md.

    normalize_embeddings: None means True, or what `distance=` says (LpDistance(normalize_embeddings=...), p=2,
    power=1, the distance PML's miner and loss share); given together with a distance it must agree. reduction: None
    means PML's default ("mean_nonzero"), or what `reducer=` says (MeanReducer() averages over the queries that have a
    positive and a negative, as PML averages over the mined triplets).
    """

    _PML_NAME = "BatchHardTripletLoss"

    def __init__(self, margin=0.05, soft=False, normalize_embeddings=None, *, reduction=None, backend="auto",
                 deterministic=None, distance=None, reducer=None, embedding_regularizer=None, embedding_reg_weight=1,
                 collect_stats=None):
        super().__init__(reduction, backend, deterministic, distance, reducer, embedding_regularizer,
                         embedding_reg_weight, collect_stats)
        self.margin = check.check_real(margin, "margin")
        self.soft = check.check_bool(soft, "soft")
        if normalize_embeddings is None:
            normalize_embeddings = self.distance_spec.normalize
        check.check_bool(normalize_embeddings, "normalize_embeddings")
        if distance is not None and normalize_embeddings != self.distance_spec.normalize:
            raise ValueError(f"normalize_embeddings={normalize_embeddings} conflicts with "
                             f"distance={keywords.describe(distance)}: pass one of them")
        self.normalize_embeddings = normalize_embeddings
        self.distance_spec = keywords.DistanceSpec("lp", power=1, normalize=normalize_embeddings)

    def _loss(self, *args, **kwargs):
        return functional.batch_hard_triplet_loss(*args, margin=self.margin, soft=self.soft,
                                                  normalize_embeddings=self.normalize_embeddings, **kwargs)

    def extra_repr(self):
        return (f"margin={self.margin}, soft={self.soft}, normalize_embeddings={self.normalize_embeddings}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}" + _keywords_repr(self))


class ProxyAnchorLoss(nn.Module):
    """PML's ProxyAnchorLoss(num_classes, embedding_size, margin=0.1, alpha=32): see docs/losses/proxy-anchor.md.

    Owns `proxies`, a num_classes x embedding_size nn.Parameter initialised as PML does (kaiming_normal_,
    mode="fan_out", or PML's `weight_init_func` when given, called on the proxies), so the same seed gives the same
    proxies as PML's class. PML's keywords: distance (CosineSimilarity() or DotProductSimilarity() with
    normalize_embeddings=True for now), reducer (PML's default is DivisorReducer: sum of positive terms / |P+| + sum of
    negative terms / C; another reducer reduces each of the two per-proxy terms and adds them, as PML's
    MultipleReducers), embedding_regularizer and weight_regularizer (PML's regularizers), embedding_reg_weight, weight_reg_weight,
    collect_stats.
    """

    def __init__(self, num_classes, embedding_size, margin=0.1, alpha=32, *, backend="auto", deterministic=None,
                 distance=None, reducer=None, embedding_regularizer=None, embedding_reg_weight=1,
                 weight_regularizer=None, weight_reg_weight=1, weight_init_func=None, collect_stats=None):
        super().__init__()
        self.num_classes = num_classes = check.check_count(num_classes, "num_classes")
        self.embedding_size = embedding_size = check.check_count(embedding_size, "embedding_size")
        self._term_reduction = _accept_pml_keywords(self, "ProxyAnchorLoss", distance, reducer, None,
                                                    embedding_regularizer, embedding_reg_weight, collect_stats,
                                                    "divisor")
        _accept_weight_keywords(self, "ProxyAnchorLoss", weight_regularizer, weight_reg_weight, weight_init_func,
                                "the proxies")
        self.margin = check.check_real(margin, "margin")
        self.alpha = check.check_positive(alpha, "alpha")
        _accept_backend(self, backend, deterministic)
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_size))
        if weight_init_func is None:
            nn.init.kaiming_normal_(self.proxies, mode="fan_out")
        else:
            weight_init_func(self.proxies)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        _no_miners(indices_tuple)
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("ref_emb and ref_labels are not supported by ProxyAnchorLoss: the proxies are the references")
        labels = _labels_on(labels, embeddings, "labels")
        terms = _regularization_terms(self, embeddings)
        return _regularized(self._reduced_loss(embeddings, labels), terms)

    def _reduced_loss(self, embeddings, labels):
        options = dict(margin=self.margin, alpha=self.alpha, backend=self.backend, deterministic=self.deterministic,
                       **keywords.functional_distance(self.distance_spec))
        if self._reducer_mode == "divisor":
            return functional.proxy_anchor_loss(embeddings, labels, self.proxies, **options)
        positive_terms, negative_terms, guard = functional._proxy_anchor_terms(embeddings, labels, self.proxies,
                                                                               **options)
        if self._reducer_mode == "unreduced":  # PML's DoNothingReducer: its loss dictionary, one term per proxy each
            indices = torch.arange(self.num_classes, device=positive_terms.device)
            with_positive = int(torch.unique(labels).numel())
            return {"pos_loss": {"losses": positive_terms + guard, "indices": indices, "reduction_type": "element",
                                 "divisor": with_positive},
                    "neg_loss": {"losses": negative_terms + guard, "indices": indices, "reduction_type": "element",
                                 "divisor": self.num_classes}}
        # PML's MultipleReducers: the reducer applied to each sub-loss, the two results added.
        reduction = self._term_reduction
        return functional._reduce(positive_terms, reduction) + functional._reduce(negative_terms, reduction) + guard

    def _regularized_weights(self):
        return self.proxies  # what PML's ProxyAnchorLoss hands its weight regularizer

    def get_logits(self, embeddings):
        """The distance's matrix of the embeddings to every proxy, N x C (PML's get_logits: cosine similarities with
        the default distance)."""
        _checked_logit_inputs(self, embeddings, proxies=self.proxies)
        return _distance_matrix(self.distance_spec, embeddings, self.proxies)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, "
                f"alpha={self.alpha}, backend={self.backend!r}" + _keywords_repr(self))


class ProxyNCALoss(nn.Module):
    """PML's ProxyNCALoss(num_classes, embedding_size, softmax_scale=1): NCA of each query against the proxies, one
    per class (see docs/losses/nca.md).

    Owns `proxies`, a num_classes x embedding_size nn.Parameter initialised as PML does (torch.nn.init.normal_, or
    PML's `weight_init_func` when given, called on the proxies), so the same seed gives PML's proxies. labels must lie
    in [0, num_classes) (PML leaves a query of another label out of the loss silently; here it is a ValueError).
    PML's keywords: distance (as NCALoss's; default LpDistance(power=2)), reducer (MeanReducer, PML's default: the
    mean over the queries PML keeps; AvgNonZeroReducer, SumReducer, DoNothingReducer: the kept queries' losses and
    indices; PerAnchorReducer of one of the first three), embedding_regularizer and weight_regularizer (PML's regularizers),
    embedding_reg_weight, weight_reg_weight, collect_stats.
    """

    def __init__(self, num_classes, embedding_size, softmax_scale=1, *, backend="auto", deterministic=None,
                 distance=None, reducer=None, embedding_regularizer=None, embedding_reg_weight=1,
                 weight_regularizer=None, weight_reg_weight=1, weight_init_func=None, collect_stats=None):
        super().__init__()
        self.num_classes = num_classes = check.check_count(num_classes, "num_classes")
        self.embedding_size = embedding_size = check.check_count(embedding_size, "embedding_size")
        self._reduction = _accept_pml_keywords(self, "ProxyNCALoss", distance, reducer, None, embedding_regularizer,
                                               embedding_reg_weight, collect_stats, "mean")
        _accept_weight_keywords(self, "ProxyNCALoss", weight_regularizer, weight_reg_weight, weight_init_func,
                                "the proxies")
        self.softmax_scale = check.check_positive(softmax_scale, "softmax_scale")
        _accept_backend(self, backend, deterministic)
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_size))
        (nn.init.normal_ if weight_init_func is None else weight_init_func)(self.proxies)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        _no_miners(indices_tuple)
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("ref_emb is not supported for this loss function (ProxyNCALoss compares the embeddings "
                             "with its proxies; PML raises this ValueError too)")
        labels = _labels_on(labels, embeddings, "labels")
        terms = _regularization_terms(self, embeddings)
        losses, kept, guard = functional._proxy_nca_losses(
            embeddings, labels, self.proxies, softmax_scale=self.softmax_scale, reduction=self._reduction,
            backend=self.backend, deterministic=self.deterministic, **keywords.functional_distance(self.distance_spec))
        if self._reducer_mode == "unreduced":
            return _regularized(_kept_element_losses(losses + guard, kept), terms)
        return _regularized(functional._reduce_kept(losses, kept, self._reduction) + guard, terms)

    def _regularized_weights(self):
        return self.proxies  # what PML's ProxyNCALoss hands its weight regularizer

    def get_logits(self, embeddings):
        """The distance's matrix of the embeddings to every proxy, N x C (PML's get_logits: squared Euclidean
        distances of the normalised rows with the default distance)."""
        _checked_logit_inputs(self, embeddings, proxies=self.proxies)
        return _distance_matrix(self.distance_spec, embeddings, self.proxies)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"softmax_scale={self.softmax_scale}, backend={self.backend!r}" + _keywords_repr(self))


class _MarginSoftmaxLoss(nn.Module):
    """The margin-softmax classifiers (PML's LargeMarginSoftmaxLoss family and NormalizedSoftmaxLoss): own
    `W`, an embedding_size x (num_classes * sub_centers) nn.Parameter (PML's layout: column j is class
    j // sub_centers) initialised as PML does (torch.nn.init.normal_, or `weight_init_func` called on W), so the same
    seed gives PML's W.

    forward(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None) computes in the promoted dtype of
    the embeddings and W (float32 for half inputs) and leaves W as it is: PML's forward instead moves W.data to the
    embeddings' dtype and device (cast_types), in place; here W must be on the embeddings' device. PML's keywords:
    reducer (MeanReducer, PML's default: the mean over the queries; AvgNonZeroReducer, SumReducer, DoNothingReducer:
    PML's loss dictionary of per-query losses; PerAnchorReducer of one of the first three), distance (see each
    class), weight_regularizer and embedding_regularizer (PML's regularizers), weight_reg_weight, embedding_reg_weight,
    weight_init_func, collect_stats (None or False).
    """

    _PML_NAME = ""
    _WEIGHTS = "W"  # the class matrix's attribute, PML's name for it

    def __init__(self, num_classes, embedding_size, *, backend="auto", deterministic=None, distance=None,
                 reducer=None, embedding_regularizer=None, embedding_reg_weight=1, weight_regularizer=None,
                 weight_reg_weight=1, weight_init_func=None, collect_stats=None, _sub_centers=1):
        super().__init__()
        self.num_classes = check.check_count(num_classes, "num_classes")
        self.embedding_size = check.check_count(embedding_size, "embedding_size")
        self._reduction = _accept_pml_keywords(self, self._PML_NAME, distance, reducer, None, embedding_regularizer,
                                               embedding_reg_weight, collect_stats, "mean")
        _accept_weight_keywords(self, self._PML_NAME, weight_regularizer, weight_reg_weight, weight_init_func,
                                self._WEIGHTS)
        _accept_backend(self, backend, deterministic)
        weights = nn.Parameter(torch.empty(self.embedding_size, self.num_classes * _sub_centers))
        (self._default_init if weight_init_func is None else weight_init_func)(weights)
        setattr(self, self._WEIGHTS, weights)

    @staticmethod
    def _default_init(weights):
        """PML's default weight_init_func of the loss."""
        nn.init.normal_(weights)

    def _class_weights(self) -> nn.Parameter:
        return getattr(self, self._WEIGHTS)

    def _sub_centers(self) -> int:
        return 1

    def _margin(self) -> dict:
        """The functional layer's (kind, margin, scale) of this loss."""
        raise NotImplementedError

    def _class_cosines(self, embeddings):
        """N x C: the cosine of each embedding to each class (its largest sub-centre's), in the embeddings' dtype."""
        _checked_logit_inputs(self, embeddings, **{self._WEIGHTS: self._class_weights()})
        cosine = _distance_matrix(keywords.COSINE, embeddings, self._class_weights().t())
        return cosine.view(embeddings.shape[0], self.num_classes, self._sub_centers()).max(dim=2).values

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        _no_miners(indices_tuple)
        if ref_emb is not None or ref_labels is not None:
            raise ValueError(f"ref_emb is not supported for this loss function ({self._PML_NAME} compares the "
                             "embeddings with its W; PML raises this ValueError too)")
        labels = _labels_on(labels, embeddings, "labels")
        terms = _regularization_terms(self, embeddings)
        value = functional._margin_softmax_loss(embeddings, labels, self._class_weights(),
                                                sub_centers=self._sub_centers(),
                                                reduction=self._reduction, backend=self.backend,
                                                deterministic=self.deterministic, **self._margin())
        return _regularized(_element_losses(value) if self._reducer_mode == "unreduced" else value, terms)

    def _regularized_weights(self):
        return self._class_weights().t()  # what PML's classifiers hand their weight regularizer: a row per column

    def get_logits(self, embeddings):
        """scale * cosine of the embeddings to every class, N x C (PML's get_logits: no margin)."""
        return self._class_cosines(embeddings) * self.scale

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, {self._repr_params()}, "
                f"backend={self.backend!r}" + _keywords_repr(self))


class _ScaledMarginLoss(_MarginSoftmaxLoss):
    """ArcFace's and CosFace's shared part: a margin (checked and stored by _stored_margin) and a scale."""

    _KIND = ""  # the functional layer's margin function (metric_kernels/functional.py, _MARGINS)

    def __init__(self, num_classes, embedding_size, margin, scale, **kwargs):
        super().__init__(num_classes, embedding_size, **kwargs)
        self.margin = self._stored_margin(margin)
        self.scale = check.check_positive(scale, "scale")

    @staticmethod
    def _stored_margin(margin) -> float:
        return check.check_real(margin, "margin")

    def _margin(self):
        return dict(kind=self._KIND, margin=self.margin, scale=self.scale)

    def _repr_params(self):
        return f"margin={self.margin}, scale={self.scale}"


class ArcFaceLoss(_ScaledMarginLoss):
    """PML's ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64): see docs/losses/margin-softmax.md.

    margin is given in degrees and stored in radians, as PML stores it (`self.margin`). distance: CosineSimilarity()
    only (PML's ArcFaceLoss asserts a CosineSimilarity). The rest as _MarginSoftmaxLoss's docstring says.
    """

    _PML_NAME = "ArcFaceLoss"
    _KIND = "arcface"

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64, **kwargs):
        super().__init__(num_classes, embedding_size, margin, scale, **kwargs)

    @staticmethod
    def _stored_margin(margin) -> float:
        return math.radians(check.check_angle_degrees(margin, "margin"))

    def _repr_params(self):
        return f"margin={math.degrees(self.margin):g} degrees, scale={self.scale}"


class CosFaceLoss(_ScaledMarginLoss):
    """PML's CosFaceLoss(num_classes, embedding_size, margin=0.35, scale=64): see docs/losses/margin-softmax.md.

    distance: CosineSimilarity() only (PML's CosFaceLoss asserts a CosineSimilarity). The rest as
    _MarginSoftmaxLoss's docstring says.
    """

    _PML_NAME = "CosFaceLoss"
    _KIND = "cosface"

    def __init__(self, num_classes, embedding_size, margin=0.35, scale=64, **kwargs):
        super().__init__(num_classes, embedding_size, margin, scale, **kwargs)


class SubCenterArcFaceLoss(ArcFaceLoss):
    """PML's SubCenterArcFaceLoss(num_classes=..., embedding_size=..., margin=28.6, scale=64, sub_centers=3): see
    docs/losses/margin-softmax.md. num_classes and embedding_size may be given by position too (PML requires them as
    keywords). W holds num_classes * sub_centers columns, column j for class j // sub_centers; num_classes is the
    number of classes, as PML stores it. The rest as ArcFaceLoss's.
    """

    _PML_NAME = "SubCenterArcFaceLoss"

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64, sub_centers=3, **kwargs):
        sub_centers = check.check_count(sub_centers, "sub_centers")
        super().__init__(num_classes, embedding_size, margin, scale, _sub_centers=sub_centers, **kwargs)
        self.sub_centers = sub_centers

    def _sub_centers(self):
        return self.sub_centers

    def _repr_params(self):
        return f"{super()._repr_params()}, sub_centers={self.sub_centers}"

    def get_outliers(self, embeddings, labels, threshold=75, return_dominant_centers=True):
        """PML's get_outliers, step for step: per class present in `labels`, the sub-centre most of its embeddings
        are closest to (the dominant one), and the indices of the embeddings whose cosine to it is below
        cos(threshold degrees). Returns (outliers, dominant_centers), an embedding_size x num_classes tensor with the
        dominant sub-centre of each present class; as in PML, a tuple even when return_dominant_centers is False.
        The columns of absent classes are zeros (PML leaves them uninitialised), W is read in the embeddings' dtype
        without being cast in place."""
        check.check_embeddings(embeddings, "embeddings")
        check.check_labels(labels, "labels", embeddings.shape[0], "embeddings")
        dtype, device = embeddings.dtype, embeddings.device
        weight = self.W.detach().to(dtype=dtype, device=device)
        cos_threshold = math.cos(math.radians(threshold))
        outliers = []
        dominant_centers = torch.zeros(weight.shape[0], self.num_classes, dtype=dtype, device=device)
        with torch.no_grad():
            for label in range(self.num_classes):
                target_samples = labels == label
                if not target_samples.any():
                    continue
                target_indices = target_samples.nonzero()
                sub_centers = weight[:, label * self.sub_centers:(label + 1) * self.sub_centers]
                cosines = _distance_matrix(keywords.COSINE, embeddings[target_samples], sub_centers.t())
                dominant_idx = torch.argmax(torch.bincount(torch.argmax(cosines, dim=1)))
                dominant_centers[:, label] = sub_centers[:, dominant_idx]
                outliers.extend(target_indices[cosines[:, dominant_idx] < cos_threshold].tolist())
        outliers = torch.tensor(outliers, device=device).flatten()
        return outliers, dominant_centers  # PML's "a if not flag else a, b" is this tuple whatever the flag says


class LargeMarginSoftmaxLoss(_ScaledMarginLoss):
    """PML's LargeMarginSoftmaxLoss(num_classes, embedding_size, margin=4, scale=1): see
    docs/losses/margin-softmax.md.

    margin: the multiple of the label's angle, a whole number >= 1 (an int or an integral float; PML truncates a
    fractional one with int(), here it is refused); stored as an int, as PML stores it. Neither the embeddings nor W
    are normalised: the logits are scale * x . W. distance: CosineSimilarity() only (PML's asserts a
    CosineSimilarity). The rest as _MarginSoftmaxLoss's docstring says.
    """

    _PML_NAME = "LargeMarginSoftmaxLoss"
    _KIND = "large_margin"

    def __init__(self, num_classes, embedding_size, margin=4, scale=1, **kwargs):
        super().__init__(num_classes, embedding_size, margin, scale, **kwargs)

    @staticmethod
    def _stored_margin(margin) -> int:
        return check.check_whole_multiplier(margin, "margin")

    def _logit_lengths(self, embeddings):
        """The norms that multiply each cosine in the logits (PML's scale_logits): |x_i| |W_c|, N x C."""
        return (torch.linalg.vector_norm(embeddings, dim=1)[:, None]
                * torch.linalg.vector_norm(self.W.to(embeddings.dtype), dim=0)[None, :])

    def get_logits(self, embeddings):
        """scale * |x| |W_c| cosine of the embeddings to every class, N x C (PML's get_logits: no margin)."""
        return self._class_cosines(embeddings) * self._logit_lengths(embeddings) * self.scale


class SphereFaceLoss(LargeMarginSoftmaxLoss):
    """PML's SphereFaceLoss(num_classes, embedding_size, margin=4, scale=1): LargeMarginSoftmaxLoss with W's columns
    normalised, logits scale * |x| cosine (see docs/losses/margin-softmax.md). The rest as LargeMarginSoftmaxLoss's.
    """

    _PML_NAME = "SphereFaceLoss"
    _KIND = "sphereface"

    def _logit_lengths(self, embeddings):
        return torch.linalg.vector_norm(embeddings, dim=1)[:, None]


class SoftTripleLoss(_MarginSoftmaxLoss):
    """PML's SoftTripleLoss(num_classes, embedding_size, centers_per_class=10, la=20, gamma=0.1, margin=0.01): see
    docs/losses/margin-softmax.md.

    The class matrix is `fc` (PML's name), embedding_size x (num_classes * centers_per_class), initialised as PML's
    (torch.nn.init.kaiming_uniform_(a=sqrt(5)), or weight_init_func); `gamma` holds 1 / gamma, as PML stores it.
    distance: CosineSimilarity() (PML's default), DotProductSimilarity() (the same), or
    DotProductSimilarity(normalize_embeddings=False) (raw products). The rest as _MarginSoftmaxLoss's docstring says.
    """

    _PML_NAME = "SoftTripleLoss"
    _WEIGHTS = "fc"

    def __init__(self, num_classes, embedding_size, centers_per_class=10, la=20, gamma=0.1, margin=0.01, **kwargs):
        centers_per_class = check.check_count(centers_per_class, "centers_per_class")
        la = check.check_positive(la, "la")
        gamma = check.check_positive(gamma, "gamma")
        margin = check.check_real(margin, "margin")
        super().__init__(num_classes, embedding_size, _sub_centers=centers_per_class, **kwargs)
        self.centers_per_class, self.la, self.gamma, self.margin = centers_per_class, la, 1.0 / gamma, margin

    @staticmethod
    def _default_init(weights):
        nn.init.kaiming_uniform_(weights, a=math.sqrt(5))

    def _sub_centers(self):
        return self.centers_per_class

    def _margin(self):
        return dict(kind="cosface", margin=self.margin, scale=self.la, pool_scale=self.gamma,
                    normalize_embeddings=self.distance_spec.normalize)

    def get_logits(self, embeddings):
        """N x C: each class's centers' similarities pooled by softmax(similarity * gamma) (PML's get_logits)."""
        _checked_logit_inputs(self, embeddings, fc=self.fc)
        similarity = _distance_matrix(self.distance_spec, embeddings, self.fc.t())
        similarity = similarity.view(embeddings.shape[0], self.num_classes, self.centers_per_class)
        return (torch.softmax(similarity * self.gamma, dim=2) * similarity).sum(dim=2)

    def _repr_params(self):
        return (f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={1 / self.gamma:g}, "
                f"margin={self.margin}")


class NormalizedSoftmaxLoss(_MarginSoftmaxLoss):
    """PML's NormalizedSoftmaxLoss(num_classes, embedding_size, temperature=0.05): see docs/losses/margin-softmax.md.

    distance: PML's default DotProductSimilarity() or CosineSimilarity() (both the cosine, since PML normalises W's
    columns). num_classes and embedding_size hold the sizes (PML's class leaves both attributes 0). The rest as
    _MarginSoftmaxLoss's docstring says.
    """

    _PML_NAME = "NormalizedSoftmaxLoss"

    def __init__(self, num_classes, embedding_size, temperature=0.05, **kwargs):
        super().__init__(num_classes, embedding_size, **kwargs)
        self.temperature = check.check_positive(temperature, "temperature")

    def _margin(self):
        return dict(kind="none", margin=0.0, scale=1.0 / self.temperature)

    def get_logits(self, embeddings):
        """cosine / temperature of the embeddings to every class, N x C (PML's get_logits)."""
        return self._class_cosines(embeddings) / self.temperature

    def _repr_params(self):
        return f"temperature={self.temperature}"
