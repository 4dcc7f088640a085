"""pytorch-metric-learning's constructor keywords (`distance=`, `reducer=`, the regularizers, `miner=`): which values
the fused losses honour, in one place.

Each keyword is resolved against a table. A value the fused kernels compute exactly is mapped onto what the losses
take (a `DistanceSpec`, a reduction); anything else raises NotImplementedError naming the keyword, the value and the
loss, never a silently different loss.

Recognising PML's objects. metric_kernels never imports PML: a PML distance or reducer can only exist once the user
has imported PML, so an object is recognised when its class *is* (exact type, not isinstance) the class of that name
in the already-imported `pytorch_metric_learning.distances` / `.reducers` module (looked up in sys.modules), and its
settings are then read from its attributes (`p`, `power`, `normalize_embeddings`, `is_inverted`; a reducer's `low`,
`high`, inner `reducer`). A subclass is not recognised, since it may override what it computes (`compute_mat`, a
reduction), and raises NotImplementedError like any other unknown object.

Adding a distance to a loss is one entry in `SUPPORTED_DISTANCES` (and the kernels that compute it): the modules store
the resolved `DistanceSpec` as `distance_spec` and hand it to the functional API (`functional_distance`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Tuple

from . import _validation as check


@dataclass(frozen=True)
class DistanceSpec:
    """What a PML distance computes, as a kernel epilogue would take it.

    kind: "cosine" (PML's CosineSimilarity: the dot product of L2-normalised rows, a similarity), "dot"
    (DotProductSimilarity, a similarity; with normalize=True it is the cosine) or "lp" (LpDistance with p = 2: the
    Euclidean distance). power: the matrix is raised to it (PML's `power`). normalize: the rows are L2-normalised
    first (PML's `normalize_embeddings`).
    """
    kind: str
    power: float = 1
    normalize: bool = True

    def __str__(self) -> str:
        if self.kind == "cosine":
            return "CosineSimilarity()" if self.power == 1 else f"CosineSimilarity(power={self.power:g})"
        name = {"dot": "DotProductSimilarity", "lp": "LpDistance"}[self.kind]
        p = ", p=2" if self.kind == "lp" else ""
        return f"{name}(normalize_embeddings={self.normalize}{p}, power={self.power:g})"


COSINE = DistanceSpec("cosine")
# PML's DotProductSimilarity() (normalize_embeddings=True by default, p=2, power=1): the dot product of L2-normalised
# rows, which is CosineSimilarity's matrix (CosineSimilarity is this class with normalize_embeddings forced True).
NORMALIZED_DOT = DistanceSpec("dot", power=1, normalize=True)
EUCLIDEAN = DistanceSpec("lp", power=1, normalize=True)  # PML's LpDistance() default, TripletMarginLoss's distance

# The dot product of the rows as they are (DotProductSimilarity(normalize_embeddings=False)), and PML's LpDistance
# with p = 2 and power 1 or 2, normalised or not: the log-sum-exp engine's other pair values (metric_kernels/_pairs.py).
RAW_DOT = DistanceSpec("dot", power=1, normalize=False)
LP_DISTANCES = tuple(DistanceSpec("lp", power=power, normalize=normalize)
                     for power in (1, 2) for normalize in (True, False))
SQUARED_EUCLIDEAN = DistanceSpec("lp", power=2, normalize=True)  # LpDistance(power=2): NCA's default
_NCA_DISTANCES = (SQUARED_EUCLIDEAN,) + tuple(spec for spec in LP_DISTANCES if spec != SQUARED_EUCLIDEAN) + (
    COSINE, NORMALIZED_DOT, RAW_DOT)

# The distances each module's fused kernels compute. The first entry is PML's default for that loss. CircleLoss has no
# other: PML's CircleLoss asserts isinstance(distance, CosineSimilarity). Batch-hard's selection and triplet kernels
# compute the Euclidean distance (power 1) only.
SUPPORTED_DISTANCES = {
    "CircleLoss": (COSINE,),
    "SupConLoss": (COSINE, NORMALIZED_DOT, RAW_DOT) + LP_DISTANCES,
    "MultiSimilarityLoss": (COSINE, NORMALIZED_DOT, RAW_DOT) + LP_DISTANCES,
    "ProxyAnchorLoss": (COSINE, NORMALIZED_DOT, RAW_DOT) + LP_DISTANCES,
    "BatchHardTripletLoss": (EUCLIDEAN, DistanceSpec("lp", power=1, normalize=False)),
    "NTXentLoss": (COSINE, NORMALIZED_DOT, RAW_DOT) + LP_DISTANCES,
    "TupletMarginLoss": (COSINE,),  # PML's asserts a CosineSimilarity
    "AngularLoss": (EUCLIDEAN,),  # PML's asserts LpDistance(p=2, power=1, normalize_embeddings=True)
    "ContrastiveLoss": LP_DISTANCES + (COSINE, NORMALIZED_DOT, RAW_DOT),  # LP_DISTANCES[0] is LpDistance()
    "GeneralizedLiftedStructureLoss": LP_DISTANCES + (COSINE, NORMALIZED_DOT, RAW_DOT),
    "LiftedStructureLoss": LP_DISTANCES + (COSINE, NORMALIZED_DOT, RAW_DOT),
    "MarginLoss": LP_DISTANCES + (COSINE, NORMALIZED_DOT, RAW_DOT),
    "TripletMarginLoss": LP_DISTANCES + (COSINE, NORMALIZED_DOT, RAW_DOT),
    "NCALoss": _NCA_DISTANCES,
    "ProxyNCALoss": _NCA_DISTANCES,
    # The margin-softmax classifiers: the cosine of the embeddings to W's columns. PML's LargeMarginSoftmaxLoss
    # family asserts a CosineSimilarity; NormalizedSoftmaxLoss normalises W's columns, and its default
    # DotProductSimilarity() normalises the embeddings.
    "ArcFaceLoss": (COSINE,),
    "CosFaceLoss": (COSINE,),
    "SubCenterArcFaceLoss": (COSINE,),
    "LargeMarginSoftmaxLoss": (COSINE,),
    "SphereFaceLoss": (COSINE,),
    "SoftTripleLoss": (COSINE, NORMALIZED_DOT, RAW_DOT),  # PML asserts an inverted distance (a similarity)
    "NormalizedSoftmaxLoss": (NORMALIZED_DOT, COSINE),
}


def functional_distance(spec: DistanceSpec) -> dict:
    """The functional losses' `distance=` and `normalize_embeddings=` for a DistanceSpec of SUPPORTED_DISTANCES."""
    if spec.kind == "lp":
        return dict(distance="euclidean" if spec.power == 1 else "squared_euclidean",
                    normalize_embeddings=spec.normalize)
    return dict(distance=spec.kind, normalize_embeddings=spec.normalize)


# Where PML's own loss accepts only some distance classes (c_f.assert_distance_type), no table entry can add others.
PML_DISTANCE_CLASSES = {name: ("CosineSimilarity",)
                        for name in ("CircleLoss", "TupletMarginLoss", "ArcFaceLoss", "CosFaceLoss",
                                     "SubCenterArcFaceLoss", "LargeMarginSoftmaxLoss", "SphereFaceLoss")}

# How PML's reducers meet each loss: PML's reduction_type of the loss's sub-losses.
#   "element": one loss per query (Circle, SupCon, Multi-Similarity, generalized lifted structure, the margin-softmax
#              classifiers; NCA and ProxyNCA:
#              per query PML keeps, see functional.nca_loss);
#   "triplet": one loss per mined triplet, i.e. per query that has a positive and a negative (batch-hard triplet);
#   "proxy":   two element sub-losses, one term per proxy each, with PML's DivisorReducer as the default;
#   "pair":    one loss per positive pair (NT-Xent, tuplet margin), or per positive and per negative pair
#              (Contrastive);
#   "formed_pair": one loss per positive pair, which the loss forms (angular, lifted structure: O(N K) of them, K the
#              largest class), so DoNothingReducer gets PML's per-pair losses;
#   "margin":  MarginLoss, one loss per triplet of all the batch's triplets, with PML's DivisorReducer as the default;
#   "all_triplets": TripletMarginLoss, one loss per triplet of all the batch's triplets, AvgNonZeroReducer's default.
LOSS_TYPES = {"CircleLoss": "element", "SupConLoss": "element", "MultiSimilarityLoss": "element",
              "GeneralizedLiftedStructureLoss": "element", "NCALoss": "element", "ProxyNCALoss": "element",
              "BatchHardTripletLoss": "triplet", "MarginLoss": "margin",
              "ProxyAnchorLoss": "proxy", "NTXentLoss": "pair", "TupletMarginLoss": "pair",
              "AngularLoss": "formed_pair", "LiftedStructureLoss": "formed_pair",
              "ContrastiveLoss": "pair", "TripletMarginLoss": "all_triplets",
              "ArcFaceLoss": "element", "CosFaceLoss": "element", "SubCenterArcFaceLoss": "element",
              "LargeMarginSoftmaxLoss": "element", "SphereFaceLoss": "element", "NormalizedSoftmaxLoss": "element",
              "SoftTripleLoss": "element"}

# What each reducer mode means as the functional `reduction=` (None: no functional reduction says the same).
#   "unreduced" (DoNothingReducer): the module returns PML's loss dictionary of unreduced losses.
#   "mean_over_triplets" (MeanReducer on batch-hard): the mean over the queries that have a positive and a negative.
#   "divisor" (ProxyAnchor's default DivisorReducer): sum of positive terms / |P+| + sum of negative terms / C;
#             MarginLoss's: the triplets' sum over the number of nonzero hinge terms (functional.margin_loss).
#   "per_anchor_<mode>" (PerAnchorReducer on the losses reduced per pair): each query's mean over its pairs, then <mode>.
MODE_REDUCTION = {"mean_nonzero": "mean_nonzero", "mean": "mean", "sum": "sum", "none": "none", "unreduced": "none",
                  "mean_over_triplets": None, "divisor": None, "per_anchor_mean_nonzero": None, "per_anchor_mean": None,
                  "per_anchor_sum": None}


def _pml_class_name(value, module: str) -> Optional[str]:
    """The class name if `value` is exactly an instance of pytorch_metric_learning.<module>.<that name>, else None."""
    package = sys.modules.get(f"pytorch_metric_learning.{module}")
    if package is None:
        return None
    name = type(value).__name__
    return name if getattr(package, name, None) is type(value) else None


def _attribute_text(value) -> str:
    return ", ".join(f"{key}={getattr(value, key)!r}" for key in ("normalize_embeddings", "p", "power")
                     if hasattr(value, key))


def describe(value) -> str:
    """A one-line description of a keyword's value for an error message: PML distances and reducers with the
    settings that matter, anything else by its repr."""
    if value is None:
        return "None"
    if _pml_class_name(value, "distances") is not None:
        return f"{type(value).__name__}({_attribute_text(value)})"
    name = _pml_class_name(value, "reducers")
    if name == "PerAnchorReducer":
        return f"PerAnchorReducer(reducer={describe(value.reducer)})"
    if name in ("ThresholdReducer", "AvgNonZeroReducer"):
        if name == "AvgNonZeroReducer" and value.low == 0 and value.high is None:
            return "AvgNonZeroReducer()"
        return f"{name}(low={value.low!r}, high={value.high!r})"
    if name is not None:
        return f"{name}()"
    text = " ".join(repr(value).split())
    return text if len(text) <= 120 else text[:117] + "..."


def _unsupported(keyword: str, value, owner: str, reason: str) -> NotImplementedError:
    return NotImplementedError(f"{keyword}={describe(value)} is not supported by {owner} yet: {reason}")


def distance_spec(distance) -> Optional[DistanceSpec]:
    """The DistanceSpec of a PML CosineSimilarity, DotProductSimilarity or LpDistance(p=2); None for anything else
    (another class, a subclass, another p, settings that contradict the class)."""
    name = _pml_class_name(distance, "distances")
    if name not in ("CosineSimilarity", "DotProductSimilarity", "LpDistance"):
        return None
    p, power = getattr(distance, "p", None), getattr(distance, "power", None)
    normalize, inverted = getattr(distance, "normalize_embeddings", None), getattr(distance, "is_inverted", None)
    if p != 2 or isinstance(power, bool) or not isinstance(power, (int, float)) or not isinstance(normalize, bool):
        return None
    if inverted is not (name != "LpDistance"):  # similarities are inverted, distances are not
        return None
    if name == "CosineSimilarity":
        return DistanceSpec("cosine", power=power) if normalize else None
    return DistanceSpec("dot" if name == "DotProductSimilarity" else "lp", power=power, normalize=normalize)


def resolve_distance(owner: str, distance) -> DistanceSpec:
    """`distance=` of module `owner`: None gives PML's default for that loss; a supported PML distance its spec."""
    supported = SUPPORTED_DISTANCES[owner]
    if distance is None:
        return supported[0]
    spec = distance_spec(distance)
    if spec is None or spec not in supported:
        reason = (f"its fused kernels compute {' or '.join(map(str, supported))} (distance=None is PML's default, "
                  f"{supported[0]})")
        if owner in PML_DISTANCE_CLASSES and type(distance).__name__ not in PML_DISTANCE_CLASSES[owner]:
            reason += f"; PML's {owner} accepts only {' or '.join(PML_DISTANCE_CLASSES[owner])} too"
        raise _unsupported("distance", distance, owner, reason)
    return spec


def _reducer_mode(owner: str, reducer, inner=None) -> str:
    """The mode of `reducer` (or of `inner`, the reducer inside it, when given) for module `owner`."""
    loss_type = LOSS_TYPES[owner]
    value = reducer if inner is None else inner
    name = _pml_class_name(value, "reducers")
    mode = None
    if name in ("AvgNonZeroReducer", "ThresholdReducer") and value.low == 0 and value.high is None:
        mode = "mean_nonzero"
    elif name in ("MeanReducer", "SumReducer"):
        mode = "mean" if name == "MeanReducer" else "sum"
        if loss_type == "triplet" and mode == "mean":
            mode = "mean_over_triplets"
    elif name == "PerAnchorReducer" and loss_type in ("pair", "formed_pair") and inner is None:
        # each query's mean over its pairs (PML's default aggregation_func), then the inner reducer over the queries
        if reducer.aggregation_func is not getattr(sys.modules[type(reducer).__module__], "aggregation_func", None):
            raise _unsupported("reducer", reducer, owner, "only PerAnchorReducer's default aggregation_func (the "
                               "mean over each query's pairs) is computed")
        inner_mode = _reducer_mode(owner, reducer, inner=reducer.reducer)
        if inner_mode not in ("mean_nonzero", "mean", "sum"):
            raise _unsupported("reducer", reducer, owner, "PerAnchorReducer's inner reducer must be "
                               "AvgNonZeroReducer(), MeanReducer() or SumReducer()")
        return "per_anchor_" + inner_mode
    elif name == "DoNothingReducer" and loss_type == "pair":
        raise _unsupported("reducer", reducer, owner,
                           "PML's DoNothingReducer returns the per-pair losses, which the fused kernels never form "
                           "(there are O(N M) of them); reduction='none' gives each query's sum over its pairs")
    elif name in ("DoNothingReducer", "PerAnchorReducer") and loss_type in ("margin", "all_triplets"):
        raise _unsupported("reducer", reducer, owner,
                           f"PML's {owner} reduces per triplet: its DoNothingReducer returns the O(N M^2) triplet "
                           "losses, which the fused kernels never form, and its PerAnchorReducer raises for "
                           "triplets; reduction='none' gives each query's sum over its triplets")
    elif name == "DoNothingReducer" and inner is None:
        if loss_type == "triplet":
            raise _unsupported("reducer", reducer, owner,
                               "PML's DoNothingReducer returns one loss per mined triplet with the (anchor, positive, "
                               "negative) indices, which the fused kernels do not expose; reduction='none' gives the "
                               "per-query losses (0 for a query without a positive or a negative)")
        mode = "unreduced"
    elif name == "PerAnchorReducer" and inner is None:
        if loss_type == "triplet":
            raise _unsupported("reducer", reducer, owner,
                               "PML's PerAnchorReducer raises NotImplementedError ('Triplet reduction not supported') "
                               "for TripletMarginLoss; the per-query losses are reduction='none'")
        # PML's losses here are per query (or per proxy) already, so PerAnchorReducer hands them to its inner reducer
        # unchanged (its aggregation_func is used only for per-pair losses).
        return _reducer_mode(owner, reducer, inner=reducer.reducer)
    elif name == "DivisorReducer" and loss_type in ("proxy", "margin") and inner is None:
        mode = "divisor"
    if mode is None:
        honoured = "AvgNonZeroReducer(), MeanReducer(), SumReducer()"
        if loss_type in ("element", "proxy"):
            honoured += ", DoNothingReducer(), PerAnchorReducer(reducer=one of the first three)"
        if loss_type in ("proxy", "margin"):
            honoured += ", DivisorReducer() (PML's default here)"
        raise _unsupported("reducer", reducer, owner, f"the fused losses honour {honoured}")
    return mode


def resolve_reducer(owner: str, reducer, reduction: Optional[str] = None,
                    default: str = "mean_nonzero") -> Tuple[str, str]:
    """`reducer=` and, for the pair losses, `reduction=` of module `owner` -> (mode, functional reduction).

    reduction None means "not given". Both given must agree; reducer None keeps our own reduction (default: `default`).
    For a mode no functional reduction expresses, the functional reduction is "none" (the module reduces the rows).
    """
    if reduction is not None:
        check.check_reduction(reduction)
    if reducer is None:
        mode = default if reduction is None else reduction
        return mode, MODE_REDUCTION[mode] or "none"
    mode = _reducer_mode(owner, reducer)
    implied = MODE_REDUCTION[mode]
    if reduction is not None and reduction != implied:
        meaning = (f"which is reduction={implied!r}" if implied is not None else
                   "the mean over the queries that have a positive and a negative, as PML averages over the mined "
                   "triplets; no reduction= says that")
        raise ValueError(f"reduction={reduction!r} conflicts with reducer={describe(reducer)} ({meaning}): pass one "
                         "of them")
    return mode, implied or "none"


def check_regularizer(owner: str, keyword: str, value):
    """`embedding_regularizer=` / `weight_regularizer=`: None, or one of PML's regularizers (an instance of
    pytorch_metric_learning.regularizers.BaseRegularizer, subclasses included: the module calls it as PML's base
    class does, on the embeddings or the weights, so whatever it computes is PML's term). Returns it."""
    if value is None:
        return None
    package = sys.modules.get("pytorch_metric_learning.regularizers")
    base = getattr(package, "BaseRegularizer", None)
    if base is None or not isinstance(value, base):
        raise _unsupported(keyword, value, owner, "the modules call PML's regularizers "
                           "(pytorch_metric_learning.regularizers), as PML's losses do; add another term to the loss "
                           "yourself")
    return value


def check_none(owner: str, **keywords) -> None:
    """Keywords whose only supported value is None (miners)."""
    reasons = {
        "miner": "the fused losses compute every pair (batch-hard mining is BatchHardTripletLoss itself)",
    }
    for keyword, value in keywords.items():
        if value is not None:
            raise _unsupported(keyword, value, owner, reasons[keyword])


def check_collect_stats(owner: str, collect_stats) -> None:
    """PML's ModuleWithRecords keyword: None or False accepted (nothing is recorded); True is not supported."""
    if collect_stats is None or collect_stats is False:
        return
    if collect_stats is True:
        raise _unsupported("collect_stats", True, owner, "the fused losses record no statistics")
    raise TypeError(f"collect_stats must be None, True or False, got {collect_stats!r}")


def check_reg_weight(value, name: str) -> float:
    """PML's embedding_reg_weight / weight_reg_weight: stored; without a regularizer it has no effect, as in PML."""
    return check.check_real(value, name)
