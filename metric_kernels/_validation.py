"""Input checks shared by every loss and every backend.

Every check runs before any kernel and raises ValueError or TypeError whose message starts with the argument's name,
so a user sees which argument is wrong without reading a traceback into the kernels.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

REDUCTIONS = ("mean_nonzero", "mean", "sum", "none")
# The functional losses' `distance=` (PML's distance classes: CosineSimilarity, DotProductSimilarity, LpDistance with
# power 1 and 2) -> the pair value the engine computes (metric_kernels/_pairs.py).
DISTANCES = {"cosine": 0, "dot": 0, "euclidean": 2, "squared_euclidean": 1}


def check_embeddings(value, name: str, layout: str = "rows x embedding size") -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.dim() != 2:
        raise ValueError(f"{name} must be 2-D ({layout}), got shape {tuple(value.shape)}")
    return value


def check_labels(value, name: str, rows: int, rows_name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer labels, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    if value.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(value.shape)}")
    if value.shape[0] != rows:
        raise ValueError(f"{name} has {value.shape[0]} entries but {rows_name} has {rows} rows")
    return value


def check_same_device(reference: torch.Tensor, reference_name: str, **others: Optional[torch.Tensor]) -> None:
    for name, tensor in others.items():
        if tensor is not None and tensor.device != reference.device:
            raise ValueError(f"{name} is on {tensor.device} but {reference_name} is on {reference.device}")


def check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not 0 < value < float("inf"):  # also rejects NaN
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def check_real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not abs(value) < float("inf"):  # rejects NaN and +-Inf
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def check_count(value, name: str) -> int:
    """A whole number >= 1 (num_classes, embedding_size, sub_centers); bool is refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_whole_multiplier(value, name: str) -> int:
    """A whole number >= 1 given as an int or an integral float (LargeMarginSoftmax's angle multiplier, which PML
    truncates with int(): a fractional one is refused here rather than truncated)."""
    value = check_real(value, name)
    if value < 1 or value != int(value):
        raise ValueError(f"{name} must be a whole number >= 1 (the multiple of the angle), got {value}")
    return int(value)


def check_angle_degrees(value, name: str) -> float:
    """An angular margin in degrees (ArcFace's): finite, 0 <= value < 180."""
    value = check_real(value, name)
    if not 0 <= value < 180:
        raise ValueError(f"{name} must lie in [0, 180) degrees, got {value}")
    return value


def check_acute_angle_degrees(value, name: str) -> float:
    """An angle in degrees strictly between 0 and 90 (the angular loss's alpha, whose tangent it takes)."""
    value = check_real(value, name)
    if not 0 < value < 90:
        raise ValueError(f"{name} must lie in (0, 90) degrees, got {value}")
    return value


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_distance(distance, normalize_embeddings) -> tuple:
    """(pair value, normalise the rows?) of `distance=` and `normalize_embeddings=`."""
    if not isinstance(distance, str) or distance not in DISTANCES:
        raise ValueError(f"distance must be one of {', '.join(map(repr, DISTANCES))}; got {distance!r}")
    check_bool(normalize_embeddings, "normalize_embeddings")
    if distance == "cosine" and not normalize_embeddings:
        raise ValueError("normalize_embeddings=False contradicts distance='cosine' (the dot product of normalised "
                         "rows); the dot product of the rows as they are is distance='dot'")
    return DISTANCES[distance], normalize_embeddings


def check_reduction(value) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}; got {value!r}")
    return value


def check_deterministic(value) -> bool:
    if value is None:
        return torch.are_deterministic_algorithms_enabled()
    if not isinstance(value, bool):
        raise TypeError(f"deterministic must be None, True or False, got {value!r}")
    return value


def check_pair_inputs(embeddings, labels, ref_emb, ref_labels, self_offset):
    """Checks the inputs of the three pair losses and resolves the references.

    Returns (references, reference_labels, self_offset): with no ref_emb the references are the queries themselves
    and self_offset is 0, so every backend handles one case, "query i is reference i + self_offset".
    """
    check_embeddings(embeddings, "embeddings")
    check_labels(labels, "labels", embeddings.shape[0], "embeddings")
    check_same_device(embeddings, "embeddings", labels=labels)
    if (ref_emb is None) != (ref_labels is None):
        given, missing = ("ref_emb", "ref_labels") if ref_labels is None else ("ref_labels", "ref_emb")
        raise ValueError(f"{missing} is required when {given} is given")
    if ref_emb is None:
        if self_offset is not None:
            raise ValueError("self_offset needs a ref_emb: without one, each query is already left out of its own pairs")
        return embeddings, labels, 0
    check_embeddings(ref_emb, "ref_emb")
    if ref_emb.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"ref_emb has embedding size {ref_emb.shape[1]} but embeddings has {embeddings.shape[1]}")
    check_same_device(embeddings, "embeddings", ref_emb=ref_emb)
    check_labels(ref_labels, "ref_labels", ref_emb.shape[0], "ref_emb")
    check_same_device(embeddings, "embeddings", ref_labels=ref_labels)
    if self_offset is not None:
        if isinstance(self_offset, bool) or not isinstance(self_offset, numbers.Integral):
            raise TypeError(f"self_offset must be an int or None, got {type(self_offset).__name__}")
        self_offset = int(self_offset)
        if self_offset < 0 or self_offset + embeddings.shape[0] > ref_emb.shape[0]:
            raise ValueError(
                f"self_offset={self_offset} is out of range: it needs 0 <= self_offset and "
                f"self_offset + {embeddings.shape[0]} (rows of embeddings) <= {ref_emb.shape[0]} (rows of ref_emb)")
    return ref_emb, ref_labels, self_offset


def check_proxy_inputs(embeddings, labels, proxies):
    check_embeddings(embeddings, "embeddings")
    check_labels(labels, "labels", embeddings.shape[0], "embeddings")
    check_same_device(embeddings, "embeddings", labels=labels)
    check_embeddings(proxies, "proxies")
    if proxies.shape[0] == 0:
        raise ValueError("proxies must have at least one row (one proxy per class)")
    if proxies.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"proxies must be C x {embeddings.shape[1]} (the embeddings' width), got shape {tuple(proxies.shape)}")
    check_same_device(embeddings, "embeddings", proxies=proxies)
    check_labels_in_range(labels, proxies.shape[0], "one proxy per class")


def check_labels_in_range(labels: torch.Tensor, num_classes: int, meaning: str) -> None:
    """labels in [0, num_classes): an out-of-range label would index past the class rows inside a kernel. Eagerly:
    one host sync and a ValueError. Under torch.compile a host sync would break the graph, so the check becomes an
    in-graph assertion."""
    if labels.numel() == 0:
        return
    if torch.compiler.is_compiling():
        torch._assert_async((labels.min() >= 0) & (labels.max() < num_classes),
                            f"labels must lie in [0, C) ({meaning})")
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) ({meaning}), got values in [{low}, {high}]")


def check_classifier_inputs(embeddings, labels, weight, sub_centers: int) -> int:
    """The margin-softmax classifiers' inputs: embeddings N x D, labels [N] in [0, C), weight D x (C * sub_centers)
    (PML's W: column j is class j // sub_centers). sub_centers must be checked already. Returns C."""
    check_embeddings(embeddings, "embeddings")
    check_labels(labels, "labels", embeddings.shape[0], "embeddings")
    check_same_device(embeddings, "embeddings", labels=labels)
    check_embeddings(weight, "weight", "embedding size x classes * sub_centers")
    width = embeddings.shape[1]
    if weight.shape[0] != width:
        raise ValueError(f"weight must be {width} x (C * sub_centers) (its rows: the embeddings' width, "
                         f"embedding_size), got shape {tuple(weight.shape)}")
    if weight.shape[1] == 0:
        raise ValueError("weight must have at least one column (one per class and sub-centre)")
    if weight.shape[1] % sub_centers:
        raise ValueError(f"weight has {weight.shape[1]} columns, not a multiple of sub_centers={sub_centers} "
                         "(it holds C * sub_centers columns)")
    check_same_device(embeddings, "embeddings", weight=weight)
    num_classes = weight.shape[1] // sub_centers
    check_labels_in_range(labels, num_classes, "one class per sub_centers columns of weight" if sub_centers > 1
                          else "one class per column of weight")
    return num_classes
