"""nn.Module losses with pytorch-metric-learning's constructor arguments, defaults and forward order.

They are thin: each holds its hyper-parameters and calls the functional loss, so a PML training loop can swap
`pytorch_metric_learning.losses.CircleLoss(...)` for `metric_kernels.CircleLoss(...)` unchanged.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from . import _validation as check
from . import functional
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


class _PairLoss(nn.Module):
    """forward(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, *, self_offset=None)."""

    def __init__(self, reduction: str, backend: str, deterministic):
        super().__init__()
        self.reduction = check.check_reduction(reduction)
        self.backend = check_backend_name(backend)
        if deterministic is not None:
            check.check_bool(deterministic, "deterministic")
        self.deterministic = deterministic

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                self_offset=None):
        _no_miners(indices_tuple)
        labels = _labels_on(labels, embeddings, "labels")
        if ref_labels is not None:
            ref_labels = _labels_on(ref_labels, ref_emb if ref_emb is not None else embeddings, "ref_labels")
        return self._loss(embeddings, labels, ref_emb, ref_labels, self_offset=self_offset,
                          reduction=self.reduction, backend=self.backend, deterministic=self.deterministic)

    def _loss(self, *args, **kwargs):
        raise NotImplementedError


class CircleLoss(_PairLoss):
    def __init__(self, m=0.4, gamma=80, *, reduction="mean_nonzero", backend="auto", deterministic=None):
        super().__init__(reduction, backend, deterministic)
        self.m = check.check_real(m, "m")
        self.gamma = check.check_positive(gamma, "gamma")

    def _loss(self, *args, **kwargs):
        return functional.circle_loss(*args, m=self.m, gamma=self.gamma, **kwargs)

    def extra_repr(self):
        return f"m={self.m}, gamma={self.gamma}, reduction={self.reduction!r}, backend={self.backend!r}"


class SupConLoss(_PairLoss):
    def __init__(self, temperature=0.1, *, base_temperature=None, reduction="mean_nonzero", backend="auto",
                 deterministic=None):
        super().__init__(reduction, backend, deterministic)
        self.temperature = check.check_positive(temperature, "temperature")
        self.base_temperature = (None if base_temperature is None
                                 else check.check_positive(base_temperature, "base_temperature"))

    def _loss(self, *args, **kwargs):
        return functional.supcon_loss(*args, temperature=self.temperature, base_temperature=self.base_temperature,
                                      **kwargs)

    def extra_repr(self):
        return (f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


class BatchHardTripletLoss(_PairLoss):
    def __init__(self, margin=0.05, soft=False, normalize_embeddings=True, *, reduction="mean_nonzero",
                 backend="auto", deterministic=None):
        super().__init__(reduction, backend, deterministic)
        self.margin = check.check_real(margin, "margin")
        self.soft = check.check_bool(soft, "soft")
        self.normalize_embeddings = check.check_bool(normalize_embeddings, "normalize_embeddings")

    def _loss(self, *args, **kwargs):
        return functional.batch_hard_triplet_loss(*args, margin=self.margin, soft=self.soft,
                                                  normalize_embeddings=self.normalize_embeddings, **kwargs)

    def extra_repr(self):
        return (f"margin={self.margin}, soft={self.soft}, normalize_embeddings={self.normalize_embeddings}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


class ProxyAnchorLoss(nn.Module):
    """Owns `proxies`, a num_classes x embedding_size nn.Parameter initialised as PML does (kaiming_normal_,
    mode="fan_out"), so the same seed gives the same proxies as PML's class."""

    def __init__(self, num_classes, embedding_size, margin=0.1, alpha=32, *, backend="auto", deterministic=None):
        super().__init__()
        for value, name in ((num_classes, "num_classes"), (embedding_size, "embedding_size")):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_classes = num_classes = int(num_classes)
        self.embedding_size = embedding_size = int(embedding_size)
        self.margin = check.check_real(margin, "margin")
        self.alpha = check.check_positive(alpha, "alpha")
        self.backend = check_backend_name(backend)
        if deterministic is not None:
            check.check_bool(deterministic, "deterministic")
        self.deterministic = deterministic
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        _no_miners(indices_tuple)
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("ref_emb and ref_labels are not supported by ProxyAnchorLoss: the proxies are the references")
        labels = _labels_on(labels, embeddings, "labels")
        return functional.proxy_anchor_loss(embeddings, labels, self.proxies, margin=self.margin, alpha=self.alpha,
                                            backend=self.backend, deterministic=self.deterministic)

    def get_logits(self, embeddings):
        """Cosine similarities of the embeddings to every proxy, N x C (PML's get_logits)."""
        check.check_embeddings(embeddings, "embeddings")
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must have {self.embedding_size} columns (embedding_size), "
                             f"got shape {tuple(embeddings.shape)}")
        check.check_same_device(embeddings, "embeddings", proxies=self.proxies)
        proxies = self.proxies.to(embeddings.dtype)
        return functional._prepare(embeddings, embeddings.dtype, True) @ functional._prepare(
            proxies, proxies.dtype, True).T

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, "
                f"alpha={self.alpha}, backend={self.backend!r}")
