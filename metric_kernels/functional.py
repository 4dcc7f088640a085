"""The functional losses: validation, normalisation, batch-level rules and reductions, once for every backend.

A backend (see metric_kernels.backends) only maps prepared rows to per-row losses; everything a user can observe beyond
that per-row contract is decided here, so every backend behaves the same way.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _validation as check
from ._pairs import SIMILARITY, SQUARED_EUCLIDEAN, pair_counts, positive_pairs
from ._row_epilogues import NORM_EPS, log_one_plus_exp_as_pml, nca_from_stats, stats_dtype
from .backends import check_backend_name, resolve

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return torch.float32 if dtype in _HALF else dtype


_CHUNK_ELEMENTS = 1 << 22  # elements per backward chunk: about 16 MiB of float32 temporaries at a time


class _Normalize(torch.autograd.Function):
    """F.normalize(rows.to(dtype)) whose backward keeps only the input and the O(N) norms.

    Autograd through F.normalize would save the compute-dtype copy of half inputs (twice the input's size) and
    allocate several N x D temporaries in backward; this recomputes the normalised rows chunk by chunk instead, so
    the fused backends keep their extra memory near one N x D buffer.
    """

    @staticmethod
    def forward(ctx, rows, dtype):
        converted = rows.to(dtype)  # the input itself unless it is half precision
        norms = torch.linalg.vector_norm(converted, dim=1, keepdim=True).clamp_min(NORM_EPS)
        ctx.save_for_backward(rows, norms)
        ctx.dtype = dtype
        return converted / norms

    @staticmethod
    def backward(ctx, grad):
        rows, norms = ctx.saved_tensors
        chunk = max(1, _CHUNK_ELEMENTS // max(rows.shape[1], 1))
        if rows.shape[0] <= chunk:  # one chunk: the same formula in fewer ops (small batches pay per op)
            unit = rows.to(ctx.dtype) / norms
            dot = (unit * grad).sum(dim=1, keepdim=True)
            tangent = torch.where(norms > NORM_EPS, torch.addcmul(grad, unit, dot, value=-1), grad)
            return tangent.div_(norms).to(rows.dtype), None
        out = torch.empty_like(rows)
        for start in range(0, rows.shape[0], chunk):
            stop = start + chunk
            norm, g = norms[start:stop], grad[start:stop]
            out[start:stop] = _normalized_rows_backward(g, rows[start:stop].to(ctx.dtype) / norm, norm)
        return out, None


def _prepare(rows: torch.Tensor, dtype: torch.dtype, normalize: bool) -> torch.Tensor:
    if not normalize:
        return rows.to(dtype)
    if torch.compiler.is_compiling():
        # Under torch.compile the compiler plans the memory itself, and the Function's row loop would pin N in the
        # graph (a recompile per batch size) and cannot take captured tensors under dynamic shapes.
        return F.normalize(rows.to(dtype), p=2, dim=1, eps=NORM_EPS)
    return _Normalize.apply(rows, dtype)


def _folds_normalization(implementation) -> bool:
    """Whether the backend reads the raw rows and normalises inside its kernels (see metric_kernels/backends.py)."""
    return getattr(implementation, "FOLDS_NORMALIZATION", False)


def _raw_rows(*rows: torch.Tensor):
    """The rows as a normalising backend takes them: as they are, in one dtype (a copy only for mixed dtypes)."""
    dtype = rows[0].dtype
    for tensor in rows[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return [tensor.to(dtype) for tensor in rows]


def _nonfinite_guard(*tensors: torch.Tensor) -> torch.Tensor:
    """Exactly 0 when every entry is finite, NaN otherwise; no gradient.

    Added to every loss so that NaN or Inf in the inputs can never come out as a finite number, even when the bad
    rows are ones the loss leaves out (no positive, a reduction that skips zeros). It costs one O(N D) reduction and
    needs no host sync. It is built on detached inputs: its gradient would be zeros, which autograd would add to each
    input's gradient as one more N x D tensor. The graph stays connected through the per-row losses (and the
    fallbacks for empty batches), so an all-zero loss still has zero gradients. Half-precision rows (those a
    normalising backend takes raw) are summed in fp32: their fp16 sum overflows to Inf past 65504 (e.g. 1000 x 100
    entries of 1), which would make a finite input's loss NaN.
    """
    total = None
    for tensor in tensors:
        tensor = tensor.detach()
        part = tensor.sum(dtype=torch.float32) if tensor.dtype in _HALF else tensor.sum()
        total = part if total is None else total + part
    return total * 0


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / max(rows.shape[0], 1)
    # mean_nonzero, PML's AvgNonZeroReducer: the mean over L_i > 0, and 0 if there is none. NaN rows are counted
    # so that they reach the result. Written without boolean indexing so the shape never depends on the data.
    counted = (rows > 0) | rows.isnan()
    return torch.where(counted, rows, torch.zeros_like(rows)).sum() / counted.sum().clamp(min=1)


def _generic_pair_gate(x_labels: torch.Tensor, y_labels: torch.Tensor, self_offset: Optional[int],
                       *, needs_both_kinds: bool) -> torch.Tensor:
    """Whether PML's GenericPairLoss computes a loss for this batch at all (a 0-d bool tensor, no host sync).

    PML returns 0 when the batch has at most one positive pair and at most one negative pair (Circle and SupCon both
    inherit this from GenericPairLoss); SupCon (needs_both_kinds) also returns 0 when the batch has no positive pair
    or no negative pair.
    """
    positives, negatives = pair_counts(x_labels, y_labels, self_offset)
    total_positive, total_negative = positives.sum(), negatives.sum()
    gate = (total_positive > 1) | (total_negative > 1)
    if needs_both_kinds:
        gate = gate & (total_positive > 0) & (total_negative > 0)
    return gate


def _pair_setup(rows_name: str, embeddings, labels, ref_emb, ref_labels, self_offset, reduction, backend,
                deterministic, pair_value: int):
    """The checks and the dispatch every pair loss starts with: (references, x_labels, y_labels, self_offset,
    deterministic, the backend that computes rows_name for pair_value); the labels as int64, y_labels the resolved
    reference labels."""
    references, reference_labels, self_offset = check.check_pair_inputs(
        embeddings, labels, ref_emb, ref_labels, self_offset)
    check.check_reduction(reduction)
    check_backend_name(backend)
    deterministic = check.check_deterministic(deterministic)
    implementation = resolve(backend, embeddings.device, pair_value, rows_name)
    x_labels = labels.long().contiguous()
    y_labels = x_labels if ref_emb is None else reference_labels.long().contiguous()
    return references, x_labels, y_labels, self_offset, deterministic, implementation


def _pair_rows(rows_name: str, embeddings, labels, ref_emb, ref_labels, self_offset, reduction, backend,
               deterministic, normalize: bool, **params):
    """Validates, prepares and dispatches a pair loss: the per-query losses before any batch-level rule or reduction.

    Returns (rows, x_labels, y_labels, self_offset, guard); y_labels are the resolved reference labels and guard is
    _nonfinite_guard of the prepared rows. Shared by _pair_loss and metric_kernels.distributed, which applies the
    batch-level rule and the reduction to the global batch instead of the local one.
    """
    references, x_labels, y_labels, self_offset, deterministic, implementation = _pair_setup(
        rows_name, embeddings, labels, ref_emb, ref_labels, self_offset, reduction, backend, deterministic,
        params.get("pair_value", SIMILARITY))
    if _folds_normalization(implementation):
        x, y = _raw_rows(embeddings, references)
        y = x if ref_emb is None else y
        params["normalize"] = normalize
    else:
        dtype = _compute_dtype(embeddings, references)
        x = _prepare(embeddings, dtype, normalize)
        y = x if ref_emb is None else _prepare(references, dtype, normalize)
    guard = _nonfinite_guard(x) if ref_emb is None else _nonfinite_guard(x, y)
    if x.shape[0] == 0 or y.shape[0] == 0:
        rows = x.sum(dim=1) * 0 + y.sum() * 0  # nothing to pair: zeros that stay connected to the graph
    else:
        rows = getattr(implementation, rows_name)(
            x, y, x_labels, y_labels, self_offset, deterministic=deterministic, **params)
    return rows, x_labels, y_labels, self_offset, guard


def _pair_loss(rows_name: str, embeddings, labels, ref_emb, ref_labels, self_offset, reduction, backend,
               deterministic, normalize: bool, generic_pair_gate: Optional[str], **params):
    """Validates, prepares, dispatches and reduces a pair loss.

    generic_pair_gate: None (batch-hard, PML's TripletMarginLoss has no batch-level rule), "pairs" (Circle) or "both"
    (SupCon): see _generic_pair_gate.
    """
    rows, x_labels, y_labels, self_offset, guard = _pair_rows(
        rows_name, embeddings, labels, ref_emb, ref_labels, self_offset, reduction, backend, deterministic, normalize,
        **params)
    if generic_pair_gate is not None and x_labels.shape[0] > 0 and y_labels.shape[0] > 0:
        gate = _generic_pair_gate(x_labels, y_labels, self_offset, needs_both_kinds=generic_pair_gate == "both")
        rows = torch.where(gate, rows, torch.zeros_like(rows))
    return _reduce(rows, reduction) + guard


def circle_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, m=0.4, gamma=80.0, self_offset=None,
                reduction="mean_nonzero", backend="auto", deterministic=None):
    """Circle loss (Sun et al. 2020) on cosine similarities, with PML's semantics. See docs/losses/circle.md."""
    m = check.check_real(m, "m")
    gamma = check.check_positive(gamma, "gamma")
    return _pair_loss("circle_rows", embeddings, labels, ref_emb, ref_labels, self_offset, reduction, backend,
                      deterministic, True, "pairs", m=m, gamma=gamma)


def supcon_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, temperature=0.1, base_temperature=None,
                self_offset=None, reduction="mean_nonzero", backend="auto", deterministic=None, distance="cosine",
                normalize_embeddings=True):
    """Supervised contrastive loss (Khosla et al. 2020) with PML's semantics; base_temperature scales by t / b.

    distance: "cosine" (PML's default), "dot" (the dot product of the rows, normalised when normalize_embeddings),
    "euclidean" or "squared_euclidean" (PML's LpDistance(power=1 or 2): the logits are -d / temperature)."""
    temperature = check.check_positive(temperature, "temperature")
    if base_temperature is not None:
        base_temperature = check.check_positive(base_temperature, "base_temperature")
    pair_value, normalize = check.check_distance(distance, normalize_embeddings)
    scale = 1.0 if base_temperature is None else temperature / base_temperature
    loss = _pair_loss("supcon_rows", embeddings, labels, ref_emb, ref_labels, self_offset, reduction, backend,
                      deterministic, normalize, "both", temperature=temperature, pair_value=pair_value)
    return loss if scale == 1.0 else loss * scale


def _engine_shift(shift: float, pair_value: int) -> float:
    """A loss's shift (Proxy-Anchor's margin, Multi-Similarity's base) as the engine takes it: PML's terms on a
    distance d are the similarity's terms on -d with the shift negated (reference/proxy_anchor.py,
    reference/multi_similarity.py)."""
    return shift if pair_value == SIMILARITY else -shift


def multi_similarity_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, alpha=2.0, beta=50.0, base=0.5,
                          self_offset=None, reduction="mean", backend="auto", deterministic=None,
                          distance="cosine", normalize_embeddings=True):
    """Multi-Similarity loss (Wang et al. 2019) with PML's semantics (without its miner): per query
    (1/alpha) log(1 + sum_pos exp(-alpha (s - base))) + (1/beta) log(1 + sum_neg exp(beta (s - base))).
    The default reduction is PML's for this loss, MeanReducer ("mean" over every query).
    See docs/losses/multi-similarity.md; distance as supcon_loss's (a distance d: these on -d with base negated)."""
    alpha = check.check_positive(alpha, "alpha")
    beta = check.check_positive(beta, "beta")
    base = check.check_real(base, "base")
    pair_value, normalize = check.check_distance(distance, normalize_embeddings)
    return _pair_loss("multi_similarity_rows", embeddings, labels, ref_emb, ref_labels, self_offset, reduction,
                      backend, deterministic, normalize, "pairs", alpha=alpha, beta=beta,
                      base=_engine_shift(base, pair_value), pair_value=pair_value)


def _reduce_pairs(parts, reduction: str, per_anchor: bool = False) -> torch.Tensor:
    """PML's reducers on per-pair losses, from per-query sums: `parts` holds one (sums, nonzero, pairs) per sub-loss
    (NT-Xent: its positive pairs; Contrastive: its positive and its negative pairs), each a vector over the queries:
    the sum of the query's pair losses, how many of them are nonzero, how many pairs it has. Each sub-loss is reduced
    over its pairs and the results added, as PML's reducers treat a loss dictionary: "mean_nonzero"
    (AvgNonZeroReducer) divides by the nonzero pairs (0 if none; NaN sums are counted so that they reach the
    result), "mean" (MeanReducer) by all pairs, "sum" adds; "none" gives each query's sum over all its pairs (a
    per-pair output would be O(N M)). per_anchor: PML's PerAnchorReducer around the reducer `reduction` names: each
    query's mean over its pairs (0 without pairs), then `reduction` over the queries, per sub-loss."""
    if per_anchor:
        return sum(_reduce(torch.where(pairs > 0, sums / pairs.clamp(min=1).to(sums.dtype), torch.zeros_like(sums)),
                           reduction) for sums, _, pairs in parts)
    if reduction == "none":
        return sum(sums for sums, _, _ in parts)
    total = None
    for sums, nonzero, pairs in parts:
        if reduction == "sum":
            value = sums.sum()
        else:
            count = nonzero + sums.isnan() if reduction == "mean_nonzero" else pairs
            value = sums.sum() / count.sum().clamp(min=1).to(sums.dtype)
        total = value if total is None else total + value
    return total


def _pair_reduced_loss(rows_name: str, embeddings, labels, ref_emb, ref_labels, self_offset, reduction, backend,
                       deterministic, normalize: bool, generic_pair_gate: str, per_anchor: bool = False, **params):
    """_pair_loss for the losses PML reduces per pair (NT-Xent, Contrastive): the backend's row function returns, per
    query, the sums and nonzero counts of each sub-loss (positives; then negatives for Contrastive), which
    _reduce_pairs reduces with the label-derived pair counts."""
    rows, x_labels, y_labels, self_offset, guard = _pair_rows(
        rows_name, embeddings, labels, ref_emb, ref_labels, self_offset, reduction, backend, deterministic, normalize,
        **params)
    parts = _pair_parts(rows, x_labels, y_labels, self_offset)
    if x_labels.shape[0] > 0 and y_labels.shape[0] > 0:
        gate = _generic_pair_gate(x_labels, y_labels, self_offset, needs_both_kinds=generic_pair_gate == "both")
        parts = _gated_parts(parts, gate)
    return _reduce_pairs(parts, reduction, per_anchor) + guard


def _gated_parts(parts, gate: torch.Tensor):
    """The (sums, nonzero, pairs) of each sub-loss, zeroed where PML's batch-level rule (a 0-d bool) says no loss."""
    return [(torch.where(gate, sums, torch.zeros_like(sums)), nonzero * gate, pairs * gate)
            for sums, nonzero, pairs in parts]


def _pair_parts(rows, x_labels, y_labels, self_offset):
    """The (sums, nonzero, pairs) of each sub-loss (see _reduce_pairs) from a pair-reduced row function's output:
    (sums, nonzero) for NT-Xent, (positive sums, negative sums, positive nonzero, negative nonzero) for Contrastive;
    an empty batch gives one zero vector (_pair_rows)."""
    if isinstance(rows, torch.Tensor):  # nothing to pair
        zeros = torch.zeros(rows.shape, dtype=torch.long, device=rows.device)
        return [(rows, zeros, zeros)]
    positives, negatives = pair_counts(x_labels, y_labels, self_offset)
    if len(rows) == 2:
        return [(rows[0], rows[1], positives)]
    return [(rows[0], rows[2], positives), (rows[1], rows[3], negatives)]


def ntxent_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, temperature=0.07, self_offset=None,
                reduction="mean", backend="auto", deterministic=None, distance="cosine", normalize_embeddings=True,
                _per_anchor=False):
    """NT-Xent with PML's semantics: one loss per positive pair (i, p), log(1 + sum over i's negatives k of
    exp((s_ik - s_ip) / t)), 0 when i has no negative, and 0 for a batch without a positive or a negative pair.
    The default reduction is PML's for this loss, MeanReducer ("mean" over every positive pair); "mean_nonzero"
    averages over the pairs PML counts as nonzero; "none" gives each query's sum over its positive pairs.
    See docs/losses/ntxent.md; distance as supcon_loss's (a distance d: -d / t)."""
    temperature = check.check_positive(temperature, "temperature")
    pair_value, normalize = check.check_distance(distance, normalize_embeddings)
    return _pair_reduced_loss("ntxent_rows", embeddings, labels, ref_emb, ref_labels, self_offset, reduction, backend,
                              deterministic, normalize, "both", _per_anchor, temperature=temperature,
                              pair_value=pair_value)


def tuplet_margin_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, margin=5.73, scale=64.0,
                       self_offset=None, reduction="mean", backend="auto", deterministic=None, _per_anchor=False):
    """Tuplet margin loss (Yu and Tao 2019) with PML's semantics, on cosine similarities: one loss per positive pair
    (i, p), log(1 + sum over i's negatives k of exp(scale (s_ik - cos(theta_ip - margin)))) with theta_ip =
    acos(s_ip) and the margin in degrees; 0 when i has no negative, and 0 for a batch without a positive or a
    negative pair. NT-Xent's engine with 1 / temperature = scale and the positives' angular margin. The default
    reduction is PML's for this loss, MeanReducer ("mean" over every positive pair); the others as ntxent_loss's.
    See docs/losses/tuplet-margin.md."""
    return _tuplet_margin_loss(embeddings, labels, ref_emb, ref_labels,
                               margin_radians=math.radians(check.check_real(margin, "margin")), scale=scale,
                               self_offset=self_offset, reduction=reduction, backend=backend,
                               deterministic=deterministic, _per_anchor=_per_anchor)


def _tuplet_margin_loss(embeddings, labels, ref_emb, ref_labels, *, margin_radians, scale, self_offset, reduction,
                        backend, deterministic, _per_anchor=False):
    """tuplet_margin_loss with the margin in radians (as PML's module stores it, np.radians of the degrees)."""
    scale = check.check_positive(scale, "scale")
    return _pair_reduced_loss("ntxent_rows", embeddings, labels, ref_emb, ref_labels, self_offset, reduction, backend,
                              deterministic, True, "both", _per_anchor,
                              **tuplet_margin_rows_params(margin_radians, scale))


def tuplet_margin_rows_params(margin_radians: float, scale: float) -> dict:
    """ntxent_rows' keywords for the tuplet margin loss: NT-Xent's with 1 / temperature = scale and the positives'
    angular margin."""
    return dict(temperature=1.0 / scale, angular_margin=margin_radians)


class _GatheredPairValues(torch.autograd.Function):
    """The pair values (metric_kernels/_pairs.py) of the pairs (x[anchors], y[positives]) in `dtype`, the rows
    L2-normalised first where `normalize` says: the dot product, or minus the squared or plain Euclidean distance of
    the rows' difference (the plain distance's gradient 0 where it is 0).

    Saves the raw rows and the indices only: no normalised N x D copy and none of the P x D gathers autograd would
    keep (the backward gathers again); O(P D) work. The distances come from the differences rather than from the
    norms and the dot product: no cancellation for close pairs."""

    @staticmethod
    def _gathered(rows, index, dtype, normalize):
        """The gathered rows in dtype, normalised where asked, and their clamped norms (None without normalising)."""
        gathered = rows.index_select(0, index).to(dtype)
        if not normalize:
            return gathered, None
        norms = torch.linalg.vector_norm(gathered, dim=1, keepdim=True).clamp_min(NORM_EPS)
        return gathered / norms, norms

    @staticmethod
    def forward(ctx, x, y, anchors, positives, pair_value, normalize, dtype):
        ctx.save_for_backward(x, y, anchors, positives)
        ctx.options = pair_value, normalize, dtype
        gathered_x, _ = _GatheredPairValues._gathered(x, anchors, dtype, normalize)
        gathered_y, _ = _GatheredPairValues._gathered(y, positives, dtype, normalize)
        if pair_value == SIMILARITY:
            return (gathered_x * gathered_y).sum(dim=1)
        squared = (gathered_x - gathered_y).square().sum(dim=1)
        return -squared if pair_value == SQUARED_EUCLIDEAN else -squared.sqrt()

    @staticmethod
    def backward(ctx, grad):
        x, y, anchors, positives = ctx.saved_tensors
        pair_value, normalize, dtype = ctx.options
        gathered_x, norms_x = _GatheredPairValues._gathered(x, anchors, dtype, normalize)
        gathered_y, norms_y = _GatheredPairValues._gathered(y, positives, dtype, normalize)
        grad = grad.unsqueeze(1)
        if pair_value == SIMILARITY:
            to_x, to_y = grad * gathered_y, grad * gathered_x
        else:
            difference = gathered_x - gathered_y
            if pair_value == SQUARED_EUCLIDEAN:
                scale = 2 * grad
            else:
                distance = difference.square().sum(dim=1, keepdim=True).sqrt()
                scale = torch.where(distance > 0, grad / torch.where(distance > 0, distance, 1.0), 0.0)
            to_x = -scale * difference
            to_y = -to_x
        if normalize:  # through u = r / max(|r|, eps): (g - u (u . g)) / |r| where the clamp is inactive, else g / eps
            to_x = _normalized_rows_backward(to_x, gathered_x, norms_x)
            to_y = _normalized_rows_backward(to_y, gathered_y, norms_y)
        dx = dy = None
        if ctx.needs_input_grad[0]:
            dx = torch.zeros(x.shape, dtype=dtype, device=x.device).index_add_(0, anchors, to_x).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dy = torch.zeros(y.shape, dtype=dtype, device=y.device).index_add_(0, positives, to_y).to(y.dtype)
        return dx, dy, None, None, None, None, None


def _normalized_rows_backward(grad, unit, norms):
    """The gradient with respect to rows r of a gradient with respect to u = r / max(|r|, eps) (norms: the clamped
    |r|): (g - u (u . g)) / |r| where |r| > eps, g / eps where the clamp is active."""
    tangent = torch.where(norms > NORM_EPS, grad - unit * (unit * grad).sum(dim=1, keepdim=True), grad)
    return tangent / norms


def _angular_pair_losses(embeddings, labels, ref_emb, ref_labels, *, alpha, self_offset, reduction, backend,
                         deterministic):
    """The angular loss of every positive pair: (losses [P], anchors, positives, x_labels, guard).

    PML's form: with a, p the normalised anchor and positive and y_n the references as given (PML does not normalise
    them here), log(1 + sum over a's negatives n of exp(4 tan^2(alpha) (a + p) . y_n - 2 (1 + tan^2(alpha)) a . p)).
    The sum over n is NCA's log-sum-exp over the negatives with the pair's centre a + p as the query: every backend's
    nca_rows computes it, P queries against the M references, and no P x M matrix is formed."""
    alpha = check.check_acute_angle_degrees(alpha, "alpha")
    references, x_labels, y_labels, self_offset, deterministic, implementation = _pair_setup(
        "nca_rows", embeddings, labels, ref_emb, ref_labels, self_offset, reduction, backend, deterministic,
        SIMILARITY)
    guard = _nonfinite_guard(embeddings) if ref_emb is None else _nonfinite_guard(embeddings, references)
    anchors, positives = positive_pairs(x_labels, y_labels, self_offset)
    dtype = _compute_dtype(embeddings, references)
    tan2 = math.tan(math.radians(alpha)) ** 2
    pair_dots = _GatheredPairValues.apply(embeddings, references, anchors, positives, SIMILARITY, True, dtype)
    if anchors.shape[0] == 0:
        return pair_dots, anchors, positives, x_labels, guard  # no pair: an empty loss vector, still in the graph
    # the normalised rows live only while the centres are formed (_Normalize keeps the raw rows and the norms)
    unit_x = _prepare(embeddings, dtype, True)
    unit_y = unit_x if ref_emb is None else _prepare(references, dtype, True)
    centres = unit_x.index_select(0, anchors) + unit_y.index_select(0, positives)
    del unit_x, unit_y
    if _folds_normalization(implementation):
        references = _raw_rows(embeddings, references)[1]  # as the kernels read rows: raw, in the inputs' dtype
        centres, options = centres.to(references.dtype), dict(normalize=False)
    else:
        references, options = references.to(dtype), {}
    _, lse_negative = implementation.nca_rows(centres, references, x_labels.index_select(0, anchors), y_labels, None,
                                              softmax_scale=4 * tan2, deterministic=deterministic, **options)
    logits = lse_negative.to(pair_dots.dtype) - 2 * (1 + tan2) * pair_dots
    # rounded as PML's logsumexp with an added 0 (a term under half an ulp of 1 gives 0, which AvgNonZeroReducer
    # leaves out); no negative (l = -inf) gives 0, as PML's mask does
    return log_one_plus_exp_as_pml(logits), anchors, positives, x_labels, guard


def _per_query_parts(losses, anchors, queries: int):
    """_reduce_pairs' (sums, nonzero, pairs) of per-pair losses whose queries are `anchors`."""
    sums = losses.new_zeros(queries).index_add(0, anchors, losses)
    nonzero = torch.zeros(queries, dtype=torch.long, device=losses.device).index_add(0, anchors, (losses > 0).long())
    pairs = torch.zeros(queries, dtype=torch.long, device=losses.device).index_add(
        0, anchors, torch.ones_like(anchors))
    return [(sums, nonzero, pairs)]


def angular_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, alpha=40.0, self_offset=None,
                 reduction="mean", backend="auto", deterministic=None, _per_anchor=False):
    """Angular loss (Wang et al. 2017) with PML's semantics: one loss per positive pair (a, p),
    log(1 + sum over a's negatives n of exp(4 tan^2(alpha) (x_a + x_p) . y_n - 2 (1 + tan^2(alpha)) x_a . x_p)),
    alpha in degrees, x_a and x_p normalised, y_n the references as given (PML's AngularLoss does not normalise
    them); 0 for a pair whose anchor has no negative. The default reduction is PML's MeanReducer ("mean" over every
    positive pair); "mean_nonzero", "sum" and "none" (each query's sum over its pairs) as ntxent_loss's.
    See docs/losses/angular.md."""
    losses, anchors, _, x_labels, guard = _angular_pair_losses(
        embeddings, labels, ref_emb, ref_labels, alpha=alpha, self_offset=self_offset, reduction=reduction,
        backend=backend, deterministic=deterministic)
    return _reduce_pairs(_per_query_parts(losses, anchors, x_labels.shape[0]), reduction, _per_anchor) + guard


def contrastive_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, pos_margin=0.0, neg_margin=1.0,
                     self_offset=None, reduction="mean_nonzero", backend="auto", deterministic=None,
                     distance="euclidean", normalize_embeddings=True, _per_anchor=False):
    """Contrastive loss with PML's semantics: relu(d - pos_margin) per positive pair and relu(neg_margin - d) per
    negative pair on the distance d (default: Euclidean on normalised rows, PML's LpDistance()); with a similarity s
    (distance="cosine" or "dot") relu(pos_margin - s) and relu(s - neg_margin). Each side is reduced over its pairs
    and the two added (default "mean_nonzero", PML's AvgNonZeroReducer); "none" gives each query's sum over all its
    pairs. See docs/losses/contrastive.md."""
    pos_margin = check.check_real(pos_margin, "pos_margin")
    neg_margin = check.check_real(neg_margin, "neg_margin")
    pair_value, normalize = check.check_distance(distance, normalize_embeddings)
    return _pair_reduced_loss("contrastive_rows", embeddings, labels, ref_emb, ref_labels, self_offset, reduction,
                              backend, deterministic, normalize, "pairs", _per_anchor,
                              pos_margin=_engine_shift(pos_margin, pair_value),
                              neg_margin=_engine_shift(neg_margin, pair_value), pair_value=pair_value)


def generalized_lifted_structure_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, neg_margin=1.0,
                                      pos_margin=0.0, self_offset=None, reduction="mean", backend="auto",
                                      deterministic=None, distance="euclidean", normalize_embeddings=True):
    """The generalized lifted structure loss (Hermans et al. 2017) with PML's semantics: per query
    relu(log sum_pos exp(d - pos_margin) + log sum_neg exp(neg_margin - d)) on the distance d (default: Euclidean on
    normalised rows, PML's LpDistance()), a side without pairs contributing 0; with a similarity s (distance="cosine"
    or "dot") exp(pos_margin - s) and exp(s - neg_margin). The default reduction is PML's for this loss, MeanReducer
    ("mean" over every query). See docs/losses/lifted-structure.md."""
    neg_margin = check.check_real(neg_margin, "neg_margin")
    pos_margin = check.check_real(pos_margin, "pos_margin")
    pair_value, normalize = check.check_distance(distance, normalize_embeddings)
    return _pair_loss("generalized_lifted_structure_rows", embeddings, labels, ref_emb, ref_labels, self_offset,
                      reduction, backend, deterministic, normalize, "pairs",
                      pos_margin=_engine_shift(pos_margin, pair_value),
                      neg_margin=_engine_shift(neg_margin, pair_value), pair_value=pair_value)


def _lifted_structure_pair_losses(embeddings, labels, ref_emb, ref_labels, *, neg_margin, pos_margin, self_offset,
                                  reduction, backend, deterministic, distance, normalize_embeddings,
                                  global_queries=None):
    """The lifted structure loss of every positive pair: (losses [P], anchors, positives, x_labels, guard).

    PML's form, on a distance d: relu(log(sum over the negatives n of a and of p of exp(neg_margin - d)) + d_ap
    - pos_margin)^2 / 2, where "the negatives of p" are those of the query whose index is p (PML matches the
    positive's reference index against the negative pairs' query indices: the query p itself without ref_emb; with
    ref_emb, query p where there is one, each negative pair counted once where p = a). The sum is
    exp(A_a) + exp(A_p) with A_r the log-sum-exp over query r's negatives: NCA's statistics from every backend's
    kernels, one pass; the pairs' own terms are O(P D).

    global_queries (DistributedLoss): maps this process's A (one per query) to (every query's A, the index of this
    process's first query among them, PML's batch rule as a 0-d bool), so that p indexes the global batch's queries.
    It is called on every process, pairs or not (it may be a collective)."""
    neg_margin = check.check_real(neg_margin, "neg_margin")
    pos_margin = check.check_real(pos_margin, "pos_margin")
    pair_value, normalize = check.check_distance(distance, normalize_embeddings)
    rows, x_labels, y_labels, self_offset, guard = _pair_rows(
        "nca_rows", embeddings, labels, ref_emb, ref_labels, self_offset, reduction, backend, deterministic,
        normalize, softmax_scale=1.0, pair_value=pair_value)
    anchors, positives = positive_pairs(x_labels, y_labels, self_offset)
    references = embeddings if ref_emb is None else ref_emb
    values = _GatheredPairValues.apply(embeddings, references, anchors, positives, pair_value, normalize,
                                       _compute_dtype(embeddings, references))
    # nothing to pair: _pair_rows' zero vector, no negatives (kept in the graph, as the gathered statistics must be)
    lse_negative = rows[1] if isinstance(rows, tuple) else rows + float("-inf")
    if global_queries is None:
        first = 0
        gate = _generic_pair_gate(x_labels, y_labels, self_offset, needs_both_kinds=True) if anchors.shape[0] else None
    else:
        lse_negative, first, gate = global_queries(lse_negative)
    if anchors.shape[0] == 0:
        # no pair: an empty loss vector, still in the graph, of the gathered statistics too (their backward is a
        # collective every process must join)
        return values + lse_negative.nan_to_num(neginf=0.0).sum() * 0, anchors, positives, x_labels, guard
    lse_negative = lse_negative.to(values.dtype)
    queries = lse_negative.shape[0]
    own = lse_negative.index_select(0, anchors + first)
    minus_infinity = torch.full_like(own, float("-inf"))
    # the query whose index is p, when there is one other than a (PML's mask takes a's negatives once then)
    partner = torch.where((positives < queries) & (positives != anchors + first),
                          lse_negative.index_select(0, positives.clamp(max=queries - 1)), minus_infinity)
    # PML's log-sum-exp over no negative pair at all is 0 (its mask), not -inf; logaddexp's gradient there would be
    # NaN, which the where's zero would not cancel
    none = (own == float("-inf")) & (partner == float("-inf"))
    both = torch.logaddexp(torch.where(none, 0.0, own), partner)
    negative_part = torch.where(none, 0.0, both - _engine_shift(neg_margin, pair_value))
    losses = torch.relu(negative_part - values + _engine_shift(pos_margin, pair_value)) ** 2 / 2
    return torch.where(gate, losses, torch.zeros_like(losses)), anchors, positives, x_labels, guard


def lifted_structure_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, neg_margin=1.0, pos_margin=0.0,
                          self_offset=None, reduction="mean", backend="auto", deterministic=None, distance="euclidean",
                          normalize_embeddings=True, _per_anchor=False):
    """The lifted structure loss (Song et al. 2016) with PML's semantics: one term per positive pair (a, p),
    relu(log(sum over the negatives n of a and of p of exp(neg_margin - d)) + d_ap - pos_margin)^2 / 2 on the
    distance d (default: Euclidean on normalised rows, PML's LpDistance()); with a similarity s (distance="cosine" or
    "dot") exp(s - neg_margin) and pos_margin - s_ap. 0 for a batch without a positive or a negative pair, or with at
    most one of each (PML's rule). The default reduction is PML's MeanReducer ("mean" over every positive pair);
    "mean_nonzero", "sum" and "none" (each query's sum over its pairs) as ntxent_loss's.
    See docs/losses/lifted-structure-pairs.md."""
    losses, anchors, _, x_labels, guard = _lifted_structure_pair_losses(
        embeddings, labels, ref_emb, ref_labels, neg_margin=neg_margin, pos_margin=pos_margin, self_offset=self_offset,
        reduction=reduction, backend=backend, deterministic=deterministic, distance=distance,
        normalize_embeddings=normalize_embeddings)
    return _reduce_pairs(_per_query_parts(losses, anchors, x_labels.shape[0]), reduction, _per_anchor) + guard


MARGIN_REDUCTIONS = ("divisor", "mean_nonzero", "mean", "sum", "none")


def _check_beta(beta):
    """MarginLoss's beta: a real number, or a one-element floating-point tensor (a learned beta, whose gradient the
    loss returns). Returns (its value as a float, the tensor or None)."""
    if isinstance(beta, torch.Tensor):
        if not beta.is_floating_point() or beta.numel() != 1:
            raise TypeError(f"beta must be a real number or a one-element floating-point tensor, got a tensor of "
                            f"dtype {beta.dtype} and shape {tuple(beta.shape)}")
        value = check.check_real(beta.detach().reshape(()).item(), "beta")
        return value, beta.reshape(())
    return check.check_real(beta, "beta"), None


def _margin_terms(embeddings, labels, ref_emb, ref_labels, *, margin, beta, self_offset, backend, deterministic,
                  distance, normalize_embeddings):
    """MarginLoss's per-query parts over all triplets: (per_query, counts, beta_tensor, guard). per_query is each
    query's sum of its triplets' losses (carrying beta's gradient when beta is a tensor that requires it); counts[r]
    per query is what reduction r divides by: "divisor" the nonzero hinge terms, "mean_nonzero" the triplets with a
    nonzero loss, "mean" the triplets. Shared by margin_loss and metric_kernels.distributed."""
    margin = check.check_real(margin, "margin")
    beta_value, beta_tensor = _check_beta(beta)
    pair_value, normalize = check.check_distance(distance, normalize_embeddings)
    # Contrastive's hinges (contrastive_loss): relu(d - pos) and relu(neg - d) on a distance, relu(pos - s) and
    # relu(s - neg) on a similarity
    similarity = pair_value == SIMILARITY
    positive_threshold = beta_value + margin if similarity else beta_value - margin
    negative_threshold = beta_value - margin if similarity else beta_value + margin
    rows, x_labels, y_labels, self_offset, guard = _pair_rows(
        "contrastive_rows", embeddings, labels, ref_emb, ref_labels, self_offset, "none", backend, deterministic,
        normalize, pos_margin=_engine_shift(positive_threshold, pair_value),
        neg_margin=_engine_shift(negative_threshold, pair_value), pair_value=pair_value)
    if isinstance(rows, torch.Tensor):  # nothing to pair: no triplet
        zeros = rows.new_zeros(rows.shape)
        rows = (rows, zeros, zeros, zeros)
    positive_sums, negative_sums, positive_nonzero, negative_nonzero = rows
    positives, negatives = pair_counts(x_labels, y_labels, self_offset)
    positives, negatives = positives.to(positive_sums.dtype), negatives.to(positive_sums.dtype)
    # Over all triplets each positive pair's term counts once per negative of its query, and the reverse.
    per_query = negatives * positive_sums + positives * negative_sums
    if beta_tensor is not None and beta_tensor.requires_grad:
        # d/dbeta of the hinges: -1 per nonzero positive term and +1 per nonzero negative one on a distance (the
        # opposite on a similarity); the value is unchanged
        slope = positives * negative_nonzero - negatives * positive_nonzero
        slope = -slope if similarity else slope
        per_query = per_query + (beta_tensor - beta_tensor.detach()).to(per_query.dtype) * slope.detach()
    triplets = positives * negatives
    # a triplet's loss is 0 only where both of its hinge terms are
    counts = {"divisor": negatives * positive_nonzero + positives * negative_nonzero,
              "mean_nonzero": triplets - (positives - positive_nonzero) * (negatives - negative_nonzero),
              "mean": triplets}
    return per_query, counts, beta_tensor, guard


def _margin_regularizer(nu: float, beta, like: torch.Tensor) -> torch.Tensor:
    """PML's beta regularizer nu * beta (beta a float, or its tensor with its gradient) in the dtype of `like`."""
    return nu * beta.to(like.dtype) if isinstance(beta, torch.Tensor) else like.new_tensor(nu * beta)


def margin_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, margin=0.2, beta=1.2, nu=0.0, self_offset=None,
                reduction="divisor", backend="auto", deterministic=None, distance="euclidean",
                normalize_embeddings=True):
    """The margin loss (Wu et al. 2017, "Sampling Matters in Deep Embedding Learning") with PML's semantics over all
    triplets (PML's MarginLoss without a miner): per triplet (a, p, n), relu(d_ap - beta + margin) + relu(beta - d_an
    + margin) on the distance d (default: Euclidean on normalised rows); with a similarity s, relu(beta + margin -
    s_ap) + relu(s_an - beta + margin). Reductions over the triplets: "divisor" (PML's default DivisorReducer: the sum
    over the number of nonzero hinge terms), "mean_nonzero" (over the triplets with a loss > 0), "mean", "sum", and
    "none" (each query's sum over its triplets). beta may be a one-element tensor (learned: its gradient is returned);
    nu adds nu * beta (PML's beta regularizer, which PML adds when beta is learned) unless there is no triplet.
    See docs/losses/margin.md."""
    nu = check.check_real(nu, "nu")
    if reduction not in MARGIN_REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, MARGIN_REDUCTIONS))}; got {reduction!r}")
    per_query, counts, beta_tensor, guard = _margin_terms(
        embeddings, labels, ref_emb, ref_labels, margin=margin, beta=beta, self_offset=self_offset, backend=backend,
        deterministic=deterministic, distance=distance, normalize_embeddings=normalize_embeddings)
    if reduction == "none":
        return per_query + guard
    total = per_query.sum()
    count = counts[reduction].sum() if reduction != "sum" else torch.ones_like(total)
    value = torch.where(count > 0, total / count.clamp(min=1), total * 0)
    if nu != 0.0:
        regularizer = _margin_regularizer(nu, beta if beta_tensor is None else beta_tensor, value)
        value = value + torch.where(counts["mean"].sum() > 0, regularizer, regularizer * 0)
    return value + guard


def _nca_losses(rows):
    """(losses, kept) of NCA from a backend's nca_rows (the two log-sum-exps; _row_epilogues.nca_from_stats), or from
    the zero vector _pair_rows gives when there is nothing to pair (no query kept)."""
    if isinstance(rows, torch.Tensor):
        return rows, torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
    return nca_from_stats(*rows)


def _reduce_kept(losses: torch.Tensor, kept: torch.Tensor, reduction: str) -> torch.Tensor:
    """The reductions of a loss whose PML elements are only the kept queries (NCA): "mean" (PML's MeanReducer)
    divides by how many are kept (0 if none); the others as _reduce (a left-out query's loss is 0)."""
    if reduction == "mean":
        return losses.sum() / kept.sum().clamp(min=1).to(losses.dtype)
    return _reduce(losses, reduction)


def _nca_losses_of_batch(embeddings, labels, ref_emb, ref_labels, *, softmax_scale, self_offset, reduction,
                         backend, deterministic, distance, normalize_embeddings):
    """NCA's per-query (losses, kept, guard) with PML's rule for a batch of at most one query (nothing kept).
    Shared by nca_loss and the module (whose DoNothingReducer returns the kept queries' losses)."""
    softmax_scale = check.check_positive(softmax_scale, "softmax_scale")
    pair_value, normalize = check.check_distance(distance, normalize_embeddings)
    rows, x_labels, _, _, guard = _pair_rows("nca_rows", embeddings, labels, ref_emb, ref_labels, self_offset,
                                             reduction, backend, deterministic, normalize,
                                             softmax_scale=softmax_scale, pair_value=pair_value)
    losses, kept = _nca_losses(rows)
    if x_labels.shape[0] <= 1:  # PML's NCALoss returns no loss for a batch of at most one query
        losses, kept = losses * 0, kept & False
    return losses, kept, guard


def nca_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, softmax_scale=1.0, self_offset=None,
             reduction="mean", backend="auto", deterministic=None, distance="squared_euclidean",
             normalize_embeddings=True):
    """NCA (Goldberger et al. 2004) with PML's semantics: per query -log(sum over its positives p of
    softmax_p(softmax_scale * v)), the softmax over the query's row without itself, v = minus the squared Euclidean
    distance of the normalised rows by default (PML's LpDistance(power=2)), or the similarity `distance` names. A
    query whose positives' softmax is 0 (none, or underflow) is left out, as PML leaves it out, and so is every query
    of a batch of at most one. The default reduction is PML's MeanReducer ("mean" over the queries kept).
    See docs/losses/nca.md."""
    losses, kept, guard = _nca_losses_of_batch(
        embeddings, labels, ref_emb, ref_labels, softmax_scale=softmax_scale, self_offset=self_offset,
        reduction=reduction, backend=backend, deterministic=deterministic, distance=distance,
        normalize_embeddings=normalize_embeddings)
    return _reduce_kept(losses, kept, reduction) + guard


def _proxy_nca_losses(embeddings, labels, proxies, *, softmax_scale, reduction, backend, deterministic, distance,
                      normalize_embeddings):
    """ProxyNCA's per-query (losses, kept, guard): NCA of the queries against the proxies, proxy c of class c.
    Shared by proxy_nca_loss, the module and metric_kernels.distributed."""
    check.check_proxy_inputs(embeddings, labels, proxies)
    softmax_scale = check.check_positive(softmax_scale, "softmax_scale")
    pair_value, normalize = check.check_distance(distance, normalize_embeddings)
    proxy_labels = torch.arange(proxies.shape[0], device=proxies.device)
    rows, _, _, _, guard = _pair_rows("nca_rows", embeddings, labels, proxies, proxy_labels, None, reduction,
                                      backend, deterministic, normalize, softmax_scale=softmax_scale,
                                      pair_value=pair_value)
    losses, kept = _nca_losses(rows)
    return losses, kept, guard


def proxy_nca_loss(embeddings, labels, proxies, *, softmax_scale=1.0, reduction="mean", backend="auto",
                   deterministic=None, distance="squared_euclidean", normalize_embeddings=True):
    """ProxyNCA (Movshovitz-Attias et al. 2017) with PML's semantics: NCA of each query against the proxies
    (proxies: C x D, one per class; labels in [0, C)), -log softmax_label(softmax_scale * v) with v as nca_loss's.
    The default reduction is PML's MeanReducer over the queries kept. See docs/losses/nca.md."""
    losses, kept, guard = _proxy_nca_losses(embeddings, labels, proxies, softmax_scale=softmax_scale,
                                            reduction=reduction, backend=backend, deterministic=deterministic,
                                            distance=distance, normalize_embeddings=normalize_embeddings)
    return _reduce_kept(losses, kept, reduction) + guard


def batch_hard_triplet_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, margin=0.05, soft=False,
                            normalize_embeddings=True, self_offset=None, reduction="mean_nonzero", backend="auto",
                            deterministic=None):
    """Batch-hard triplet loss (Hermans et al. 2017) on Euclidean distances, as PML's BatchHardMiner +
    TripletMarginLoss; soft=True is PML's smooth_loss (softplus of the violation, margin still added)."""
    margin = check.check_real(margin, "margin")
    soft = check.check_bool(soft, "soft")
    normalize_embeddings = check.check_bool(normalize_embeddings, "normalize_embeddings")
    return _pair_loss("batch_hard_rows", embeddings, labels, ref_emb, ref_labels, self_offset, reduction, backend,
                      deterministic, normalize_embeddings, None, margin=margin, soft=soft)


def triplet_margin_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, margin=0.05, smooth_loss=False,
                        self_offset=None, reduction="mean_nonzero", backend="auto", deterministic=None,
                        distance="euclidean", normalize_embeddings=True):
    """Triplet margin loss over every triplet, PML's TripletMarginLoss without a miner: one loss per triplet
    (a, p, n) of an anchor, one of its positives and one of its negatives, relu(d_ap - d_an + margin) on the distance
    d (default: Euclidean on normalised rows, PML's LpDistance()), softplus of the same with smooth_loss; with a
    similarity s (distance="cosine" or "dot") the violation is s_an - s_ap + margin. Reduced over the triplets
    (default "mean_nonzero", PML's AvgNonZeroReducer; "mean" over every triplet); "none" gives each query's sum over
    its triplets. The fused backends never form the triplets: see docs/losses/triplet-margin.md."""
    margin = check.check_real(margin, "margin")
    smooth_loss = check.check_bool(smooth_loss, "smooth_loss")
    pair_value, normalize = check.check_distance(distance, normalize_embeddings)
    rows, x_labels, y_labels, self_offset, guard = _pair_rows(
        "triplet_margin_rows", embeddings, labels, ref_emb, ref_labels, self_offset, reduction, backend,
        deterministic, normalize, margin=margin, smooth=smooth_loss, pair_value=pair_value)
    return _reduce_pairs(_triplet_parts(rows, x_labels, y_labels, self_offset), reduction) + guard


def _triplet_parts(rows, x_labels, y_labels, self_offset):
    """_pair_parts of triplet_margin_rows' output (sums, nonzero): each query's triplets are its positives times its
    negatives."""
    if isinstance(rows, torch.Tensor):  # nothing to pair
        return _pair_parts(rows, x_labels, y_labels, self_offset)
    positives, negatives = pair_counts(x_labels, y_labels, self_offset)
    return [(rows[0], rows[1], positives * negatives)]


def _proxy_anchor_terms(embeddings, labels, proxies, *, margin, alpha, backend, deterministic, distance="cosine",
                        normalize_embeddings=True):
    """Validates, prepares and dispatches Proxy-Anchor: (positive_terms, negative_terms, guard), one term per proxy
    before the division by |P+| and C. Shared by proxy_anchor_loss and metric_kernels.distributed, which computes
    each rank's share of the proxies against the gathered batch."""
    check.check_proxy_inputs(embeddings, labels, proxies)
    margin = check.check_real(margin, "margin")
    alpha = check.check_positive(alpha, "alpha")
    pair_value, normalize = check.check_distance(distance, normalize_embeddings)
    check_backend_name(backend)
    deterministic = check.check_deterministic(deterministic)
    implementation = resolve(backend, embeddings.device, pair_value)

    options = dict(pair_value=pair_value)
    if _folds_normalization(implementation):
        x, p = _raw_rows(embeddings, proxies)
        options["normalize"] = normalize
    else:
        dtype = _compute_dtype(embeddings, proxies)
        x, p = _prepare(embeddings, dtype, normalize), _prepare(proxies, dtype, normalize)
    margin = _engine_shift(margin, pair_value)
    labels = labels.long()
    if x.shape[0] == 0:
        positive_terms = negative_terms = p.sum(dim=1) * 0 + x.sum() * 0  # log(1 + empty sum) = 0
    else:
        positive_terms, negative_terms = implementation.proxy_anchor_rows(
            p, x, labels, margin=margin, alpha=alpha, deterministic=deterministic, **options)
    return positive_terms, negative_terms, _nonfinite_guard(x, p)


def proxy_anchor_loss(embeddings, labels, proxies, *, margin=0.1, alpha=32.0, backend="auto", deterministic=None,
                      distance="cosine", normalize_embeddings=True):
    """Proxy-Anchor loss (Kim et al. 2020) with PML's semantics: sum_c pos_c / |P+| + sum_c neg_c / C.

    distance: as supcon_loss's; with a distance d the terms are log(1 + sum exp(alpha (d - margin))) over a proxy's
    positives and log(1 + sum exp(-alpha (d + margin))) over its negatives, as PML computes them."""
    positive_terms, negative_terms, guard = _proxy_anchor_terms(
        embeddings, labels, proxies, margin=margin, alpha=alpha, backend=backend, deterministic=deterministic,
        distance=distance, normalize_embeddings=normalize_embeddings)
    num_classes = proxies.shape[0]
    labels = labels.long()
    with_positive = torch.zeros(num_classes, dtype=torch.bool, device=labels.device).index_fill(0, labels, True).sum()
    positive_part = torch.where(with_positive > 0, positive_terms.sum() / with_positive.clamp(min=1),
                                positive_terms.sum() * 0)
    return positive_part + negative_terms.sum() / num_classes + guard


def _arcface_margin(cosine: torch.Tensor, margin: float) -> torch.Tensor:
    """PML's ArcFaceLoss.modify_cosine_of_target_classes, op for op, with the margin in radians: cos(theta + m),
    or cos(theta) - m sin(m) past theta = 180 degrees - m, where cos(theta + m) would turn back up."""
    angles = torch.acos(torch.clamp(cosine, -1, 1))
    return torch.where(angles <= math.radians(180) - margin, torch.cos(angles + margin),
                       torch.cos(angles) - margin * math.sin(margin))


def _multiple_angle_cosine(cosine: torch.Tensor, multiplier: int) -> torch.Tensor:
    """PML's LargeMarginSoftmaxLoss.modify_cosine_of_target_classes, op for op: psi(theta) = (-1)^k cos(m theta) - 2k
    for theta in [k pi / m, (k + 1) pi / m] (k without a gradient), cos(m theta) by the multiple-angle formula, a
    polynomial in cos(theta): sum_n (-1)^n binom(m, 2n) cos^(m - 2n) (1 - cos^2)^n."""
    terms = [(-1) ** n * math.comb(multiplier, 2 * n) * cosine ** (multiplier - 2 * n) * (1 - cosine ** 2) ** n
             for n in range(multiplier // 2 + 1)]
    cos_with_margin = torch.stack(terms, dim=1).sum(dim=1)
    with torch.no_grad():
        k = (torch.acos(torch.clamp(cosine, -1, 1)) / (math.pi / multiplier)).floor()
    return (-1) ** k * cos_with_margin - 2 * k


_MARGINS = {
    "arcface": _arcface_margin,
    "cosface": lambda cosine, margin: cosine - margin,  # PML's CosFaceLoss
    "none": lambda cosine, margin: cosine,  # NormalizedSoftmax: the label's cosine as it is
    "large_margin": _multiple_angle_cosine,
    "sphereface": _multiple_angle_cosine,
}

# (rows normalised, W's columns normalised) where not both: a side left raw has its norm multiply every logit, so
# that LargeMarginSoftmax's logits are scale |x| |w| cos = scale x . w and SphereFace's scale |x| cos.
_NORMALIZED = {"large_margin": (False, False), "sphereface": (False, True)}


def _target_logits(kind: str, target: torch.Tensor, x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
                   margin, scale: float) -> torch.Tensor:
    """scale * (the norms of the sides left raw) * margin(cos) at each row's label, from the backend's `target`
    (the label's similarity: its cosine times those norms): O(N) vectors and the N label columns' norms."""
    if kind not in _NORMALIZED:  # the margin on the similarity itself (normalised or not)
        return scale * _MARGINS[kind](target, margin)
    normalize_w = _NORMALIZED[kind][1]
    lengths = torch.linalg.vector_norm(x, dim=1, dtype=target.dtype)
    cosine = target / lengths.clamp_min(NORM_EPS)
    if not normalize_w:
        column_lengths = torch.linalg.vector_norm(w[:, labels], dim=0, dtype=target.dtype)
        lengths, cosine = lengths * column_lengths, cosine / column_lengths.clamp_min(NORM_EPS)
    return scale * lengths * _MARGINS[kind](cosine, margin)


def _margin_softmax_loss(embeddings, labels, weight, *, kind: str, margin: float, scale: float, sub_centers: int,
                         reduction, backend, deterministic, pool_scale: float = 0.0, normalize_embeddings=True):
    """The margin-softmax classifiers: validation, dispatch of the backend's margin_softmax_rows (per row the
    log-sum-exp of scale * cosine over the other classes, and the label's cosine; metric_kernels/backends.py), then
    on O(N) vectors the margin of `kind` (margin in radians for "arcface", the angle's multiple for "large_margin"
    and "sphereface") and PML's cross-entropy L_i = log(exp(lse_other_i) + exp(logit_i)) - logit_i with
    logit_i = scale * margin(cos_i, label) (times the norms of the sides _NORMALIZED leaves raw). A class's cosine is
    its sub-centres' largest, or with pool_scale > 0 their softmax(pool_scale * cos)-weighted mean (SoftTriple);
    normalize_embeddings=False (the kinds outside _NORMALIZED) uses the raw products x . w instead of the cosines.
    `scale`, `margin`, `sub_centers` and `pool_scale` arrive checked."""
    check.check_classifier_inputs(embeddings, labels, weight, sub_centers)
    check.check_reduction(reduction)
    check_backend_name(backend)
    deterministic = check.check_deterministic(deterministic)
    implementation = resolve(backend, embeddings.device, rows="margin_softmax_rows")

    if _folds_normalization(implementation):
        x, w = _raw_rows(embeddings, weight)  # W in its own dtype: a 16-bit W is never copied to fp32
    else:
        dtype = _compute_dtype(embeddings, weight)
        x, w = embeddings.to(dtype), weight.to(dtype)
    labels = labels.long().contiguous()
    if x.shape[0] == 0:  # no query: zeros that stay connected to the graph of the embeddings and the weight
        rows = (x.sum(dim=1) * 0 + w.sum() * 0).to(stats_dtype(x.dtype))
    else:
        normalize_x, normalize_w = _NORMALIZED.get(kind, (normalize_embeddings, normalize_embeddings))
        lse_other, target = implementation.margin_softmax_rows(
            x, w, labels, scale=scale, sub_centers=sub_centers, deterministic=deterministic, normalize_x=normalize_x,
            normalize_w=normalize_w, pool_scale=pool_scale)
        logits = _target_logits(kind, target, x, w, labels, margin, scale)
        rows = torch.logaddexp(lse_other, logits) - logits
    return _reduce(rows, reduction) + _nonfinite_guard(x, w)


def arcface_loss(embeddings, labels, weight, *, margin=28.6, scale=64.0, reduction="mean", backend="auto",
                 deterministic=None):
    """ArcFace (Deng et al. 2019) with PML's semantics: cross-entropy over scale * cos(x_i, W_c), the label's cosine
    replaced by cos(theta + m) (m = margin in degrees; cos(theta) - m sin(m) past theta = 180 - margin degrees).
    weight: D x C, PML's W (one column per class). reduction "mean" is PML's MeanReducer over the N queries.
    See docs/losses/margin-softmax.md."""
    margin = math.radians(check.check_angle_degrees(margin, "margin"))
    scale = check.check_positive(scale, "scale")
    return _margin_softmax_loss(embeddings, labels, weight, kind="arcface", margin=margin, scale=scale,
                                sub_centers=1, reduction=reduction, backend=backend, deterministic=deterministic)


def cosface_loss(embeddings, labels, weight, *, margin=0.35, scale=64.0, reduction="mean", backend="auto",
                 deterministic=None):
    """CosFace (Wang et al. 2018) with PML's semantics: cross-entropy over scale * cos(x_i, W_c), the label's cosine
    minus margin. weight: D x C, PML's W. See docs/losses/margin-softmax.md."""
    margin = check.check_real(margin, "margin")
    scale = check.check_positive(scale, "scale")
    return _margin_softmax_loss(embeddings, labels, weight, kind="cosface", margin=margin, scale=scale,
                                sub_centers=1, reduction=reduction, backend=backend, deterministic=deterministic)


def subcenter_arcface_loss(embeddings, labels, weight, *, sub_centers=3, margin=28.6, scale=64.0, reduction="mean",
                           backend="auto", deterministic=None):
    """Sub-center ArcFace (Deng et al. 2020) with PML's semantics: ArcFace on each class's largest cosine over its
    sub_centers columns of weight (D x (C * sub_centers), PML's W: column j is class j // sub_centers).
    See docs/losses/margin-softmax.md."""
    sub_centers = check.check_count(sub_centers, "sub_centers")
    margin = math.radians(check.check_angle_degrees(margin, "margin"))
    scale = check.check_positive(scale, "scale")
    return _margin_softmax_loss(embeddings, labels, weight, kind="arcface", margin=margin, scale=scale,
                                sub_centers=sub_centers, reduction=reduction, backend=backend,
                                deterministic=deterministic)


def normalized_softmax_loss(embeddings, labels, weight, *, temperature=0.05, reduction="mean", backend="auto",
                            deterministic=None):
    """Normalized softmax (NormFace, Wang et al. 2017) with PML's semantics: cross-entropy over
    cos(x_i, W_c) / temperature. weight: D x C, PML's W. See docs/losses/margin-softmax.md."""
    temperature = check.check_positive(temperature, "temperature")
    return _margin_softmax_loss(embeddings, labels, weight, kind="none", margin=0.0, scale=1.0 / temperature,
                                sub_centers=1, reduction=reduction, backend=backend, deterministic=deterministic)


def large_margin_softmax_loss(embeddings, labels, weight, *, margin=4, scale=1.0, reduction="mean", backend="auto",
                              deterministic=None):
    """Large-margin softmax (L-Softmax, Liu et al. 2016) with PML's semantics: cross-entropy over
    scale * x_i . W_c = scale |x_i| |W_c| cos(theta_ic), the label's cos(theta) replaced by
    psi(theta) = (-1)^k cos(m theta) - 2k on [k pi / m, (k + 1) pi / m] (m = margin, a whole number >= 1).
    Neither the embeddings nor W are normalised. weight: D x C, PML's W. See docs/losses/margin-softmax.md."""
    margin = check.check_whole_multiplier(margin, "margin")
    scale = check.check_positive(scale, "scale")
    return _margin_softmax_loss(embeddings, labels, weight, kind="large_margin", margin=margin, scale=scale,
                                sub_centers=1, reduction=reduction, backend=backend, deterministic=deterministic)


def sphereface_loss(embeddings, labels, weight, *, margin=4, scale=1.0, reduction="mean", backend="auto",
                    deterministic=None):
    """SphereFace (A-Softmax, Liu et al. 2017) with PML's semantics: large_margin_softmax_loss with W's columns
    normalised, logits scale |x_i| cos(theta_ic). weight: D x C, PML's W. See docs/losses/margin-softmax.md."""
    margin = check.check_whole_multiplier(margin, "margin")
    scale = check.check_positive(scale, "scale")
    return _margin_softmax_loss(embeddings, labels, weight, kind="sphereface", margin=margin, scale=scale,
                                sub_centers=1, reduction=reduction, backend=backend, deterministic=deterministic)


def soft_triple_loss(embeddings, labels, weight, *, centers_per_class=10, la=20.0, gamma=0.1, margin=0.01,
                     distance="cosine", normalize_embeddings=True, reduction="mean", backend="auto",
                     deterministic=None):
    """SoftTriple (Qian et al. 2019) with PML's semantics: cross-entropy over la * (s_ic - margin [c = label]), where
    s_ic pools the similarities of class c's centers_per_class centers (weight: D x (C * centers_per_class), PML's
    fc, column j for class j // centers_per_class) by their mean weighted by softmax(s / gamma). distance: "cosine"
    (PML's default) or "dot" (the dot product, of normalised rows and columns unless normalize_embeddings=False).
    See docs/losses/margin-softmax.md."""
    centers_per_class = check.check_count(centers_per_class, "centers_per_class")
    la = check.check_positive(la, "la")
    gamma = check.check_positive(gamma, "gamma")
    margin = check.check_real(margin, "margin")
    if distance not in ("cosine", "dot"):
        raise ValueError(f"distance must be 'cosine' or 'dot' (SoftTriple pools similarities; PML asserts an "
                         f"inverted distance); got {distance!r}")
    normalize = check.check_distance(distance, normalize_embeddings)[1]
    return _margin_softmax_loss(embeddings, labels, weight, kind="cosface", margin=margin, scale=la,
                                sub_centers=centers_per_class, reduction=reduction, backend=backend,
                                deterministic=deterministic, pool_scale=1.0 / gamma, normalize_embeddings=normalize)


def multiview(features, labels=None):
    """[bsz, n_views, D] -> (embeddings [n_views * bsz, D], labels), rows view-major as SupContrast orders them
    (all first views, then all second views, ...). labels=None gives one class per sample."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got dtype {features.dtype}")
    if features.dim() != 3:
        raise ValueError(f"features must be 3-D (batch x views x embedding size), got shape {tuple(features.shape)}")
    batch, views, width = features.shape
    if labels is None:
        labels = torch.arange(batch, device=features.device)
    else:
        check.check_labels(labels, "labels", batch, "features")
        check.check_same_device(features, "features", labels=labels)
    embeddings = features.transpose(0, 1).reshape(views * batch, width)
    return embeddings, labels.repeat(views)
