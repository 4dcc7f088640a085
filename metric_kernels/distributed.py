"""DistributedLoss: one loss over the global batch of a data-parallel job, with gradients that survive DDP's averaging.

Contract (docs/distributed.md): on every rank the value equals the loss of the global batch (all ranks' rows, in
rank order) computed on one process, and after DDP divides the summed gradients by the world size W, every parameter
gradient (the embedding network's and ProxyAnchorLoss.proxies) equals that one-process computation's.

How. Let L be the global loss and E_r the embeddings of rank r. The one-process gradient is sum_r dL/dE_r dE_r/dtheta,
so rank r must backpropagate W * dL/dE_r into its own network (DDP then divides by W). Each rank computes a share
l_r of L (sum_r l_r = L) that depends on its own embeddings and on everyone's through an autograd-aware all-gather,
whose backward sums the gradients of every rank's share into each rank's slice (reduce-scatter). Rank r's share
therefore gets, through its own rows and the gather, sum_q dl_q/dE_r = dL/dE_r. The returned tensor carries the
value L (from an all-reduce of the shares) and the gradient W * dl_r (_GlobalValue).

- Circle, SupCon, Multi-Similarity, NT-Xent, Contrastive, triplet margin, generalized lifted structure, margin, NCA,
  angular, lifted structure, batch-hard: l_r comes from rank r's queries against the gathered references
  (self_offset = the rank's row offset, so a query still leaves out only itself and the fused kernels stay
  O(local + global)). PML's batch-level rules are evaluated on the global
  labels (every rank has them) and the reduction's denominator is global (mean: the global N; mean_nonzero: the
  all-reduced count of nonzero rows; batch-hard's MeanReducer: the global batch's queries with a positive and a
  negative; NT-Xent and Contrastive, reduced per pair, and the triplet margin loss, per triplet: the all-reduced
  counts of each sub-loss's pairs (triplets) or nonzero ones, and the angular and lifted structure losses', per
  positive pair (the lifted structure loss reads every rank's queries' log-sum-exps, gathered, for PML's pairing of
  a positive's index with a query's); NCA's MeanReducer: the all-reduced count of the queries PML keeps, and its rule for a batch of one query on
  the global batch; MarginLoss: the all-reduced count of its triplets, their nonzero ones or their nonzero hinge
  terms, and beta's regularizer once). DoNothingReducer's dictionary holds the gathered global rows (NCA's: the kept
  ones).
- Proxy-Anchor is a sum over proxies of terms that each depend on the whole batch, so it is split by proxies: rank r
  computes its contiguous slice of the proxies against the gathered embeddings, with the global |P+|. Rank r's proxy
  gradient is then W times its slice's and zero elsewhere, and DDP's average gives the one-process gradient. The
  proxies must therefore be averaged like the network's parameters (the module under DDP, or averaged by hand) and
  be the same on every rank (DDP broadcasts them at construction). Another reducer than the default DivisorReducer
  reduces each of the two per-proxy terms over all C proxies (mean_nonzero: all-reduced counts of nonzero terms), and
  DoNothingReducer's dictionary holds the ranks' slices gathered.
- The classifiers (ArcFace, CosFace, SubCenterArcFace, SphereFace, LargeMarginSoftmax, NormalizedSoftmax,
  SoftTriple) and ProxyNCA: a query's loss depends on
  that query and W (the proxies) alone, so each rank computes its own queries' losses (no gather) and the
  reduction's denominator is global. W, like the proxies, must be the same on every rank and averaged by DDP.

PML's regularizers (the module's embedding_regularizer and weight_regularizer): the embedding regularizer on the
gathered global batch, the weight regularizer on the weights, each term added once to the value with a 1 / W share
of its gradient on every rank (_regularization_terms).

Every reducer mode the wrapped module can have is reproduced exactly; __init__ rejects any other (_MODES).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from . import _pml_keywords as keywords
from . import _validation as check
from . import functional
from ._pairs import pair_counts
from .modules import (AngularLoss, BatchHardTripletLoss, CircleLoss, ContrastiveLoss, GeneralizedLiftedStructureLoss,
                      LiftedStructureLoss, MarginLoss, MultiSimilarityLoss, NCALoss, NTXentLoss, ProxyAnchorLoss,
                      ProxyNCALoss, SupConLoss, TripletMarginLoss, TupletMarginLoss, _kept_element_losses, _labels_on,
                      _MarginSoftmaxLoss, _no_miners, _regularization_terms, _regularized)

_LOSSES = (CircleLoss, SupConLoss, MultiSimilarityLoss, NTXentLoss, TupletMarginLoss, ContrastiveLoss,
           TripletMarginLoss, GeneralizedLiftedStructureLoss, MarginLoss, NCALoss, AngularLoss, LiftedStructureLoss,
           BatchHardTripletLoss, ProxyAnchorLoss, ProxyNCALoss, _MarginSoftmaxLoss)  # the classifiers
# The wrapped module's reducer modes (metric_kernels/_pml_keywords.py) that the global batch reproduces exactly: the
# plain reductions, PML's DoNothingReducer dictionary ("unreduced"), MeanReducer on batch-hard ("mean_over_triplets",
# over the global batch's queries with a positive and a negative) and Proxy-Anchor's DivisorReducer ("divisor").
_MODES = frozenset({"mean_nonzero", "mean", "sum", "none", "unreduced", "mean_over_triplets", "divisor"})


# --------------------------------------------------------------------------------------------------------------------
# Collectives over rows of different counts per rank (padded to the largest, as all_gather needs equal shapes).

def _gather_sizes(rows: int, device: torch.device, group) -> List[int]:
    world = dist.get_world_size(group)
    mine = torch.tensor([rows], dtype=torch.long, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(size) for size in sizes]


def _gather_rows(tensor: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """Every rank's rows concatenated in rank order (no autograd)."""
    largest = max(sizes)
    if largest == 0:
        return tensor.new_empty((0,) + tuple(tensor.shape[1:]))
    padded = tensor.contiguous()
    if tensor.shape[0] < largest:
        padded = tensor.new_zeros((largest,) + tuple(tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
    chunks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded, group=group)
    return torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes)])


def _use_reduce_scatter(group) -> bool:
    # Gloo's reduce-scatter is missing from older torch releases (and is an all-reduce inside anyway): gloo sums the
    # whole gradient with all_reduce and keeps its slice; NCCL and the others reduce-scatter.
    return dist.get_backend(group) != "gloo"


def _sum_rows_to_owner(grad: torch.Tensor, sizes: List[int], rank: int, group) -> torch.Tensor:
    """The sum over ranks of `grad` (global rows), restricted to this rank's rows: a reduce-scatter."""
    offset, rows = sum(sizes[:rank]), sizes[rank]
    largest = max(sizes)
    if largest == 0:
        return grad.new_empty((0,) + tuple(grad.shape[1:]))
    if not _use_reduce_scatter(group):
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total[offset:offset + rows]
    chunks = []
    for chunk, size in zip(grad.split(sizes), sizes):
        if size < largest:
            padded = grad.new_zeros((largest,) + tuple(grad.shape[1:]))
            padded[:size] = chunk
            chunk = padded
        chunks.append(chunk.contiguous())
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)
    return out[:rows]


class _AllGather(torch.autograd.Function):
    """All ranks' rows in rank order; backward sums every rank's gradient of them into each rank's own rows."""

    @staticmethod
    def forward(ctx, tensor, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_rows(tensor, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _sum_rows_to_owner(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


class _GlobalValue(torch.autograd.Function):
    """Forward: `value`, the global loss (no graph). Backward: `scale` times the gradient into `share`, this rank's
    share of it (for a vector loss, the share is the rank's rows at `offset` of the global vector)."""

    @staticmethod
    def forward(ctx, share, value, offset, scale):
        ctx.vector, ctx.offset, ctx.scale = share.dim() > 0, offset, scale
        ctx.rows = share.shape[0] if share.dim() else 0
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.vector:
            grad = grad.narrow(0, ctx.offset, ctx.rows)
        return grad * ctx.scale, None, None, None


# --------------------------------------------------------------------------------------------------------------------

def _pair_spec(loss):
    """(per-row function of the functional layer, normalise, PML's batch-level rule, hyper-parameters, final scale)."""
    if isinstance(loss, CircleLoss):
        return "circle_rows", True, "pairs", dict(m=loss.m, gamma=loss.gamma), 1.0
    if isinstance(loss, (MultiSimilarityLoss, SupConLoss, NTXentLoss, ContrastiveLoss, GeneralizedLiftedStructureLoss,
                         NCALoss, TripletMarginLoss)):
        pair_value, normalize = check.check_distance(**keywords.functional_distance(loss.distance_spec))
    if isinstance(loss, NCALoss):  # PML's rule for a batch of one query is applied to the global batch (_pair)
        return "nca_rows", normalize, None, dict(softmax_scale=loss.softmax_scale, pair_value=pair_value), 1.0
    if isinstance(loss, NTXentLoss):
        return "ntxent_rows", normalize, "both", dict(temperature=loss.temperature, pair_value=pair_value), 1.0
    if isinstance(loss, TupletMarginLoss):
        return "ntxent_rows", True, "both", functional.tuplet_margin_rows_params(loss.margin, loss.scale), 1.0
    if isinstance(loss, ContrastiveLoss):
        return ("contrastive_rows", normalize, "pairs",
                dict(pos_margin=functional._engine_shift(loss.pos_margin, pair_value),
                     neg_margin=functional._engine_shift(loss.neg_margin, pair_value), pair_value=pair_value), 1.0)
    if isinstance(loss, TripletMarginLoss):  # PML's TripletMarginLoss has no batch-level rule
        return ("triplet_margin_rows", normalize, None,
                dict(margin=loss.margin, smooth=loss.smooth_loss, pair_value=pair_value), 1.0)
    if isinstance(loss, GeneralizedLiftedStructureLoss):
        return ("generalized_lifted_structure_rows", normalize, "pairs",
                dict(pos_margin=functional._engine_shift(loss.pos_margin, pair_value),
                     neg_margin=functional._engine_shift(loss.neg_margin, pair_value), pair_value=pair_value), 1.0)
    if isinstance(loss, MultiSimilarityLoss):
        return ("multi_similarity_rows", normalize, "pairs",
                dict(alpha=loss.alpha, beta=loss.beta, base=functional._engine_shift(loss.base, pair_value),
                     pair_value=pair_value), 1.0)
    if isinstance(loss, SupConLoss):
        scale = 1.0 if loss.base_temperature is None else loss.temperature / loss.base_temperature
        return "supcon_rows", normalize, "both", dict(temperature=loss.temperature, pair_value=pair_value), scale
    return ("batch_hard_rows", loss.normalize_embeddings, None, dict(margin=loss.margin, soft=loss.soft), 1.0)


class DistributedLoss(nn.Module):
    """Wraps CircleLoss, SupConLoss, MultiSimilarityLoss, NTXentLoss, TupletMarginLoss, ContrastiveLoss,
    TripletMarginLoss, GeneralizedLiftedStructureLoss, MarginLoss, NCALoss, AngularLoss, LiftedStructureLoss,
    BatchHardTripletLoss, ProxyAnchorLoss, ProxyNCALoss or a
    classifier (ArcFaceLoss, CosFaceLoss, SubCenterArcFaceLoss, SphereFaceLoss, LargeMarginSoftmaxLoss,
    NormalizedSoftmaxLoss, SoftTripleLoss; kept as `.loss`) for data-parallel
    training: each rank passes its own rows; the value on every rank is the loss of the global batch (all ranks'
    rows in rank order, as one process would compute it), and after DDP's gradient averaging every parameter
    gradient equals that one-process computation's, for every `reduction=` / `reducer=` the wrapped module accepts
    (a PML DoNothingReducer's dictionary holds the global batch's rows). Rows may differ in number between ranks.
    Outside an initialised process group (or with one rank) it is the plain loss. See the module docstring for how,
    and docs/distributed.md for an example.

    The loss's own parameters (the proxies, the classifiers' W) must be the same on every rank and have their
    gradients averaged like the network's: put the DistributedLoss under DDP too (or inside the DDP-wrapped module).
    """

    def __init__(self, loss, process_group=None):
        super().__init__()
        if not isinstance(loss, _LOSSES):
            raise TypeError("loss must be a metric_kernels CircleLoss, SupConLoss, MultiSimilarityLoss, NTXentLoss, "
                            "TupletMarginLoss, ContrastiveLoss, TripletMarginLoss, GeneralizedLiftedStructureLoss, "
                            "MarginLoss, NCALoss, AngularLoss, LiftedStructureLoss, BatchHardTripletLoss, "
                            "ProxyAnchorLoss, ProxyNCALoss, ArcFaceLoss, CosFaceLoss, SubCenterArcFaceLoss, "
                            "SphereFaceLoss, LargeMarginSoftmaxLoss, NormalizedSoftmaxLoss or SoftTripleLoss, got "
                            f"{type(loss).__name__}")
        mode = getattr(loss, "_reducer_mode", None)
        if mode not in _MODES:
            reducer = keywords.describe(getattr(loss, "reducer", None))
            raise NotImplementedError(
                f"DistributedLoss does not support {type(loss).__name__}(reducer={reducer}) (reducer mode {mode!r}): "
                "it supports the plain reductions ('mean_nonzero', 'mean', 'sum', 'none'), DoNothingReducer(), "
                "MeanReducer() on BatchHardTripletLoss and Proxy-Anchor's reducers")
        self.loss = loss
        self.process_group = process_group

    def _world(self):
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if dist.get_world_size(group) == 1:
            return None
        return group

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        group = self._world()
        if group is None:
            return self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        _no_miners(indices_tuple)
        check.check_embeddings(embeddings, "embeddings")
        labels = _labels_on(labels, embeddings, "labels")
        check.check_labels(labels, "labels", embeddings.shape[0], "embeddings")
        terms = self._regularization_terms(embeddings, group)
        return _regularized(self._loss(embeddings, labels, ref_emb, ref_labels, group), terms)

    def _regularization_terms(self, embeddings, group):
        """The wrapped module's PML regularization terms on the global batch (the embedding regularizer sees every
        rank's rows, gathered; the weight regularizer the weights, the same on every rank), each as a global value
        whose gradient share is 1 / world of the term on every rank: the gather's backward sums the ranks' shares into
        each rank's rows, and DDP's average of the weights' gradients gives the term's own."""
        if getattr(self.loss, "embedding_regularizer", None) is None and \
                getattr(self.loss, "weight_regularizer", None) is None:
            return {}
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        sizes = _gather_sizes(embeddings.shape[0], embeddings.device, group)
        everyone = _AllGather.apply(embeddings, sizes, rank, group)
        return {name: _GlobalValue.apply(term / world, term.detach(), None, float(world))
                for name, term in _regularization_terms(self.loss, everyone).items()}

    def _loss(self, embeddings, labels, ref_emb, ref_labels, group):
        if isinstance(self.loss, (_MarginSoftmaxLoss, ProxyNCALoss)):
            if ref_emb is not None or ref_labels is not None:
                weights = "W" if isinstance(self.loss, _MarginSoftmaxLoss) else "proxies"
                raise ValueError(f"ref_emb is not supported for this loss function ({type(self.loss).__name__} "
                                 f"compares the embeddings with its {weights})")
            return self._classifier(embeddings, labels, group)
        if isinstance(self.loss, ProxyAnchorLoss):
            if ref_emb is not None or ref_labels is not None:
                raise ValueError("ref_emb and ref_labels are not supported by ProxyAnchorLoss: the proxies are the "
                                 "references")
            return self._proxy_anchor(embeddings, labels, group)
        return self._pair(embeddings, labels, ref_emb, ref_labels, group)

    # Pair losses: this rank's queries against every rank's references. ----------------------------------------------
    def _pair(self, embeddings, labels, ref_emb, ref_labels, group):
        loss = self.loss
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if (ref_emb is None) != (ref_labels is None):
            given, missing = ("ref_emb", "ref_labels") if ref_labels is None else ("ref_labels", "ref_emb")
            raise ValueError(f"{missing} is required when {given} is given")
        sizes = _gather_sizes(embeddings.shape[0], embeddings.device, group)
        offset, total_rows = sum(sizes[:rank]), sum(sizes)
        all_labels = _gather_rows(labels.long(), sizes, group)
        if ref_emb is None:
            # Every rank's rows are the references; this rank's queries are rows offset.. of them.
            references = _AllGather.apply(embeddings, sizes, rank, group)
            reference_labels, self_offset = all_labels, offset
            gate_references, gate_offset = all_labels, 0
        else:
            check.check_embeddings(ref_emb, "ref_emb")
            ref_labels = _labels_on(ref_labels, ref_emb, "ref_labels")
            check.check_labels(ref_labels, "ref_labels", ref_emb.shape[0], "ref_emb")
            ref_sizes = _gather_sizes(ref_emb.shape[0], ref_emb.device, group)
            references = _AllGather.apply(ref_emb, ref_sizes, rank, group)
            reference_labels = _gather_rows(ref_labels.long(), ref_sizes, group)
            self_offset, gate_references, gate_offset = None, reference_labels, None

        if isinstance(loss, MarginLoss):
            return self._margin(embeddings, labels, references, reference_labels, self_offset, sizes, world, group)
        if isinstance(loss, AngularLoss):
            losses = functional._angular_pair_losses(
                embeddings, labels, references, reference_labels, alpha=loss.alpha, self_offset=self_offset,
                reduction=loss.reduction, backend=loss.backend, deterministic=loss.deterministic)
            return self._formed_pairs(losses, sizes, world, group)
        if isinstance(loss, LiftedStructureLoss):
            def global_queries(lse):  # every rank's queries' statistics, and PML's rule on the global batch
                gate = functional._generic_pair_gate(all_labels, gate_references, gate_offset, needs_both_kinds=True)
                return _AllGather.apply(lse.contiguous(), sizes, rank, group), offset, gate

            losses = functional._lifted_structure_pair_losses(
                embeddings, labels, references, reference_labels, neg_margin=loss.neg_margin,
                pos_margin=loss.pos_margin, self_offset=self_offset, reduction=loss.reduction, backend=loss.backend,
                deterministic=loss.deterministic, global_queries=global_queries,
                **keywords.functional_distance(loss.distance_spec))
            return self._formed_pairs(losses, sizes, world, group)
        rows_name, normalize, rule, params, scale = _pair_spec(loss)
        rows, x_labels, y_labels, _, guard = functional._pair_rows(
            rows_name, embeddings, labels, references, reference_labels, self_offset, loss.reduction, loss.backend,
            loss.deterministic, normalize, **params)
        gate = None
        if rule is not None and total_rows > 0 and gate_references.shape[0] > 0:
            # PML's batch-level rule, on the global batch: every rank holds all the labels, so no communication.
            gate = functional._generic_pair_gate(all_labels, gate_references, gate_offset,
                                                 needs_both_kinds=rule == "both")
        if isinstance(loss, (NTXentLoss, TupletMarginLoss, ContrastiveLoss, TripletMarginLoss)):
            split = functional._triplet_parts if isinstance(loss, TripletMarginLoss) else functional._pair_parts
            parts = split(rows, x_labels, y_labels, self_offset)
            if gate is not None:
                parts = functional._gated_parts(parts, gate)
            if loss.reduction != "none":
                return self._pair_reduced(parts, loss.reduction, guard, world, group)
            rows = sum(sums for sums, _, _ in parts)
        elif gate is not None:
            rows = torch.where(gate, rows, torch.zeros_like(rows))
        kept = None
        if isinstance(loss, NCALoss):
            rows, kept = functional._nca_losses(rows)
            if total_rows <= 1:  # PML's NCALoss: no loss for a batch of at most one query, the global batch here
                rows, kept = rows * 0, kept & False
        if scale != 1.0:
            rows = rows * scale

        triplets = None
        if loss._reducer_mode == "mean_over_triplets":
            # PML's MeanReducer over the mined triplets: the global batch's queries with a positive and a negative.
            positives, negatives = pair_counts(all_labels, gate_references, gate_offset)
            triplets = ((positives > 0) & (negatives > 0)).sum().clamp(min=1)
        pml_rows = loss._pml_rows if loss._reducer_mode == "unreduced" else None
        return self._reduce_rows(rows, guard, loss.reduction, sizes, world, group, pml_rows, triplets, kept)

    def _margin(self, embeddings, labels, references, reference_labels, self_offset, sizes, world, group):
        """MarginLoss over the global batch's triplets: each rank's queries' triplet sums against the gathered
        references, divided by the all-reduced count the reduction takes; beta's regularizer once (a 1 / world share
        on each rank, which DDP's average of beta's gradient restores)."""
        loss = self.loss
        per_query, counts, beta, guard = functional._margin_terms(
            embeddings, labels, references, reference_labels, margin=loss.margin, beta=loss.beta,
            self_offset=self_offset, backend=loss.backend, deterministic=loss.deterministic,
            **keywords.functional_distance(loss.distance_spec))
        if loss.reduction == "none":
            return self._reduce_rows(per_query, guard, "none", sizes, world, group, None)
        local_sum = per_query.sum()
        count = counts[loss.reduction].sum() if loss.reduction != "sum" else local_sum.new_zeros(())
        totals = torch.stack([local_sum.detach() + guard.detach(), count.detach(), counts["mean"].sum().detach()])
        dist.all_reduce(totals, group=group)
        total, count, triplets = totals
        denominator = count.clamp(min=1) if loss.reduction != "sum" else torch.ones_like(count)
        counted = (count > 0) if loss.reduction != "sum" else torch.ones_like(count, dtype=torch.bool)
        share = torch.where(counted, local_sum / denominator, local_sum * 0) + guard
        value = torch.where(counted, total / denominator, total * 0)
        if loss.learn_beta and loss.nu != 0.0:
            regularizer = functional._margin_regularizer(loss.nu, beta, share)
            regularizer = torch.where(triplets > 0, regularizer, regularizer * 0)
            share, value = share + regularizer / world, value + regularizer.detach()
        return _GlobalValue.apply(share, value, None, float(world))

    def _formed_pairs(self, pair_losses, sizes, world, group):
        """The losses with one term per positive pair (angular, lifted structure): this rank's queries' pairs
        against the gathered references, (losses, anchors, positives, labels, guard), reduced per pair over the
        global batch (_pair_reduced), or DoNothingReducer's per-pair dictionary of the global batch (the ranks'
        pairs in rank order: PML's order, by query)."""
        loss = self.loss
        losses, anchors, positives, x_labels, guard = pair_losses
        if loss._reducer_mode == "unreduced":
            rank = dist.get_rank(group)
            pair_sizes = _gather_sizes(losses.shape[0], losses.device, group)
            share = losses + guard
            out = _GlobalValue.apply(share, _gather_rows(share.detach(), pair_sizes, group), sum(pair_sizes[:rank]),
                                     float(world))
            indices = (_gather_rows(anchors + sum(sizes[:rank]), pair_sizes, group),
                       _gather_rows(positives, pair_sizes, group))
            return {"loss": {"losses": out.unsqueeze(1), "indices": indices, "reduction_type": "pos_pair"}}
        parts = functional._per_query_parts(losses, anchors, x_labels.shape[0])
        if loss.reduction == "none":
            return self._reduce_rows(parts[0][0], guard, "none", sizes, world, group, None)
        return self._pair_reduced(parts, loss.reduction, guard, world, group)

    def _classifier(self, embeddings, labels, group):
        """The classifiers' (and ProxyNCA's) loss of a query depends on that query and W (the proxies) alone: each
        rank computes its own queries' losses and the reduction is global. W's gradient on rank r is world times its
        queries' share; DDP's average gives the one-process gradient."""
        loss = self.loss
        kept = None
        if isinstance(loss, ProxyNCALoss):
            rows, kept, guard = functional._proxy_nca_losses(
                embeddings, labels, loss.proxies, softmax_scale=loss.softmax_scale, reduction="none",
                backend=loss.backend, deterministic=loss.deterministic,
                **keywords.functional_distance(loss.distance_spec))
        else:
            rows = functional._margin_softmax_loss(embeddings, labels, loss._class_weights(),
                                                   sub_centers=loss._sub_centers(),
                                                   reduction="none", backend=loss.backend,
                                                   deterministic=loss.deterministic, **loss._margin())
            guard = rows.new_zeros(())  # already in the rows
        sizes = _gather_sizes(embeddings.shape[0], embeddings.device, group)
        pml_rows = (lambda out: out) if loss._reducer_mode == "unreduced" else None
        return self._reduce_rows(rows, guard, loss._reduction, sizes, dist.get_world_size(group), group, pml_rows,
                                 kept=kept)

    @staticmethod
    def _reduce_rows(rows, guard, reduction, sizes, world, group, pml_rows, triplets=None, kept=None):
        """The global reduction of per-query losses, this rank's `rows` among the ranks' `sizes`: the value of the
        global batch, and this rank's share of its gradient. `triplets`: batch-hard's MeanReducer over the global
        batch's queries with a positive and a negative; pml_rows: the module's DoNothingReducer rows; kept (NCA and
        ProxyNCA): the queries PML keeps, which MeanReducer counts and DoNothingReducer lists."""
        rank = dist.get_rank(group)
        offset, total_rows = sum(sizes[:rank]), sum(sizes)
        mode = "mean_over_triplets" if triplets is not None else reduction
        if triplets is not None:
            reduction = "sum"
        elif reduction == "none":
            share = rows + guard
            value = _gather_rows(share.detach(), sizes, group)
            out = _GlobalValue.apply(share, value, offset, float(world))
            if pml_rows is not None and kept is not None:  # NCA's DoNothingReducer: the global batch's kept queries
                return _kept_element_losses(out, _gather_rows(kept.to(torch.uint8), sizes, group).bool())
            if pml_rows is not None:  # PML's DoNothingReducer: the module's dictionary of the global batch
                indices = torch.arange(total_rows, device=out.device)
                return {"loss": {"losses": pml_rows(out), "indices": indices, "reduction_type": "element"}}
            return out
        if reduction == "mean_nonzero":
            # PML's AvgNonZeroReducer over the global batch: NaN rows are counted so that they reach the result.
            counted = (rows > 0) | rows.isnan()
            rows = torch.where(counted, rows, torch.zeros_like(rows))
            count = counted.sum().to(rows.dtype)
        elif reduction == "mean" and kept is not None:
            count = kept.sum().to(rows.dtype)  # PML's MeanReducer over the kept queries
        else:
            count = rows.new_zeros(())
        local_sum = rows.sum()
        totals = torch.stack([local_sum.detach() + guard.detach(), count.detach()])
        dist.all_reduce(totals, group=group)
        if reduction == "mean_nonzero" or (reduction == "mean" and kept is not None):
            denominator = totals[1].clamp(min=1)
        elif reduction == "mean":
            denominator = max(total_rows, 1)
        elif mode == "mean_over_triplets":
            denominator = triplets.to(rows.dtype)
        else:
            denominator = 1
        share = local_sum / denominator + guard
        return _GlobalValue.apply(share, totals[0] / denominator, None, float(world))

    @staticmethod
    def _pair_reduced(parts, reduction, guard, world, group):
        """The losses PML reduces per pair (functional._reduce_pairs) over the global batch: each sub-loss's sum over
        this rank's queries, divided by the all-reduced count of its nonzero pairs ("mean_nonzero") or of its pairs
        ("mean")."""
        local_sums = torch.stack([sums.sum() for sums, _, _ in parts])
        if reduction == "sum":
            counts = torch.zeros_like(local_sums)  # denominators of 1 after the clamp
        else:
            counts = torch.stack([(nonzero + sums.isnan() if reduction == "mean_nonzero" else pairs).sum()
                                  for sums, nonzero, pairs in parts]).to(local_sums.dtype)
        totals = torch.cat([local_sums.detach(), counts.detach(), guard.detach().reshape(1)])
        dist.all_reduce(totals, group=group)
        count = len(parts)
        denominators = totals[count:2 * count].clamp(min=1)
        share = (local_sums / denominators).sum() + guard
        value = (totals[:count] / denominators).sum() + totals[-1]
        return _GlobalValue.apply(share, value, None, float(world))

    # Proxy-Anchor: this rank's slice of the proxies against every rank's embeddings. ----------------------------------
    def _proxy_anchor(self, embeddings, labels, group):
        loss = self.loss
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        proxies = loss.proxies
        check.check_proxy_inputs(embeddings, labels, proxies)
        sizes = _gather_sizes(embeddings.shape[0], embeddings.device, group)
        all_embeddings = _AllGather.apply(embeddings, sizes, rank, group)
        all_labels = _gather_rows(labels.long(), sizes, group)

        num_classes = proxies.shape[0]
        first, stop = num_classes * rank // world, num_classes * (rank + 1) // world
        mine = stop - first
        # The slice plus one zero proxy that stands for every class outside it (its terms are dropped), so that the
        # labels stay in range for every backend: class c in the slice -> c - first, any other -> mine.
        spare = proxies.new_zeros((1, proxies.shape[1]))
        slice_labels = all_labels - first
        slice_labels = torch.where((slice_labels >= 0) & (slice_labels < mine), slice_labels,
                                   torch.full_like(slice_labels, mine))
        positive_terms, negative_terms, guard = functional._proxy_anchor_terms(
            all_embeddings, slice_labels, torch.cat([proxies[first:stop], spare]), margin=loss.margin,
            alpha=loss.alpha, backend=loss.backend, deterministic=loss.deterministic,
            **keywords.functional_distance(loss.distance_spec))
        with_positive = torch.zeros(num_classes, dtype=torch.bool, device=all_labels.device).index_fill(
            0, all_labels, True).sum()
        positive_terms, negative_terms = positive_terms[:mine], negative_terms[:mine]
        mode = loss._reducer_mode
        if mode == "unreduced":
            # PML's DoNothingReducer: the per-proxy terms of every proxy, gathered from the ranks' slices.
            slices = [num_classes * (q + 1) // world - num_classes * q // world for q in range(world)]
            indices = torch.arange(num_classes, device=positive_terms.device)
            out = {}
            for name, terms, divisor in (("pos_loss", positive_terms, int(with_positive)),
                                         ("neg_loss", negative_terms, num_classes)):
                share = terms + guard
                value = _gather_rows(share.detach(), slices, group)
                out[name] = {"losses": _GlobalValue.apply(share, value, first, float(world)), "indices": indices,
                             "reduction_type": "element", "divisor": divisor}
            return out
        if mode == "divisor":
            positive_sum = positive_terms.sum()
            positive_part = torch.where(with_positive > 0, positive_sum / with_positive.clamp(min=1),
                                        positive_sum * 0)
            share = positive_part + negative_terms.sum() / num_classes + guard
        else:
            # PML's MultipleReducers: the reducer applied to each of the two per-proxy terms over all C proxies.
            terms = torch.stack([positive_terms, negative_terms])
            if mode == "mean_nonzero":
                counted = (terms > 0) | terms.isnan()
                terms = torch.where(counted, terms, torch.zeros_like(terms))
                counts = counted.sum(dim=1).to(terms.dtype)
                dist.all_reduce(counts, group=group)
                denominators = counts.clamp(min=1)
            else:
                denominators = terms.new_full((2,), float(num_classes) if mode == "mean" else 1.0)
            share = (terms.sum(dim=1) / denominators).sum() + guard
        value = share.detach().clone()
        dist.all_reduce(value, group=group)
        return _GlobalValue.apply(share, value, None, float(world))

    def extra_repr(self):
        return "" if self.process_group is None else f"process_group={self.process_group}"
