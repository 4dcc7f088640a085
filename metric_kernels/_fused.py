"""What every fused backend shares: fake (meta) implementations and the autograd formula of its ops, and the four
per-row loss functions built on them. A fused backend provides three ops, named <prefix>_lse_rows,
<prefix>_lse_rows_backward and <prefix>_batch_hard_select in the metric_kernels namespace:

    lse_rows(x, y?, x_labels, y_labels, self_offset, kind, pair_value, param_a, param_b, deterministic)
        -> stats [4, N]
    lse_rows_backward(grad [4, N], stats, x, y?, x_labels, y_labels, self_offset, kind, pair_value, param_a,
                      param_b, deterministic, need_dx, need_dy) -> (dx, dy)   (an unneeded gradient has 0 rows;
                      y = None: the references are the queries, dx holds the whole gradient)
    batch_hard_select(x, y, x_labels, y_labels, self_offset) -> [2, N] int64 (-1: none), or [4, N] where the
        products are tf32 (the rows class's selection_rows): each side's runner-up in rows 2 and 3

with self_offset -1 for "no query is a reference" and pair_value what a pair contributes (metric_kernels/_pairs.py:
the dot product, or minus the squared or plain Euclidean distance). The statistics are those of csrc/epilogue.h
(STAT_ROWS of them per query; the backward ignores the upstream gradient of the ones no loss differentiates: the
counts, NT-Xent's W). The
cpu ops take rows already normalised (where the loss's distance normalises), in float32 or float64; the triton, cuda
and cuda_emulated ops take the raw rows in their own dtype and normalise inside the kernels (the backend's
FOLDS_NORMALIZATION): their lse ops and batch_hard_select take an argument `normalize` after the others. The cuda and
cuda_emulated ops (the CUDA kernels, built on torch's stable ABI, which does not reach torch's global settings) end
with `allow_tf32=False` after it, and their `deterministic` is what makes the backward deterministic: CudaKernelRows
passes torch's settings in both.

A backend whose kernels compute the margin-softmax classifiers also provides <prefix>_margin_softmax_rows and
<prefix>_margin_softmax_rows_backward:

    margin_softmax_rows(x, weight, labels, sub_centers, scale, normalize_x, normalize_w, pool_scale, deterministic)
        -> stats [2, N]
        (0: log-sum-exp of scale * s over the classes other than the label, 1: the label's s, where a class's s is
        its sub-centres' largest s_ij (pool_scale == 0) or their mean weighted by softmax(pool_scale * s_ij) (> 0,
        SoftTriple), s_ij = (x_i . w_j) rx_i rw_j with r = 1 / max(norm, eps) for the rows (normalize_x) and W's
        columns (normalize_w) that are normalised, 1 for the others: the cosine when both are; raw rows x N x D and
        weight D x (C * sub_centers), normalised inside the kernels)
    margin_softmax_rows_backward(grad [2, N], stats, x, weight, labels, sub_centers, scale, normalize_x,
                                 normalize_w, pool_scale, deterministic, need_dx, need_dw) -> (dx, dw)
        (an unneeded gradient has 0 rows)

A backend whose kernels compute the triplet margin loss over every triplet also provides
<prefix>_triplet_margin_rows and <prefix>_triplet_margin_rows_backward:

    triplet_margin_rows(x, y?, x_labels, y_labels, self_offset, pair_value, margin, smooth, slots, rank,
                        deterministic) -> (stats [2, N], table [N, K], weights [N, K])
        (slots and rank: _pairs.positive_slots, K = max(slots); table[a, rank[p]] = margin - v_ap for each positive p
        of anchor a, -inf in the slots no positive fills; stats[0, a] = sum over the triplets (a, p, n) of
        f(z), z = v_an + table[a, rank[p]] = v_an - v_ap + margin, f = relu, or softplus with smooth (torch's, linear
        above 20); stats[1, a] = how many of those are nonzero; weights[a, r] = sum over a's negatives n of
        f'(v_an + table[a, r]))
    triplet_margin_rows_backward(grad [N], table, weights, x, y?, x_labels, y_labels, self_offset, pair_value,
                                 smooth, rank, deterministic, need_dx, need_dy) -> (dx, dy)
        (dL/dv_ap = -grad[a] weights[a, rank[p]], dL/dv_an = grad[a] sum_r f'(v_an + table[a, r]))

with the backend's own options after `deterministic` as for the lse ops.

A backend lists the pair values its lse ops compute in PAIR_VALUES (default: SIMILARITY only); "auto" skips a backend
that lacks the one a loss needs.
"""
from __future__ import annotations

import torch

from ._pairs import SIMILARITY, pair_counts, positive_slots
from ._row_epilogues import (batch_hard_from_choices, circle_from_stats, generalized_lifted_structure_from_stats,
                             hardest_triplet_losses, multi_similarity_from_stats, proxy_anchor_from_stats, stats_dtype,
                             supcon_from_stats, triplet_backward_inputs)

KIND = {"circle": 0, "supcon": 1, "proxy_anchor": 2, "multi_similarity": 3, "ntxent": 4, "contrastive": 5,
        "triplet_margin": 6}
STAT_ROWS = 4  # statistics per query row (csrc/epilogue.h)


def check_row_state(grad: torch.Tensor, stats: torch.Tensor, x: torch.Tensor) -> None:
    """The backward's upstream gradients and statistics: STAT_ROWS x N each, on the rows' device (csrc/op_glue.h
    checks the native ops' the same way)."""
    for name, tensor in (("grad", grad), ("stats", stats)):
        if tuple(tensor.shape) != (STAT_ROWS, x.shape[0]):
            raise ValueError(f"{name} must be {STAT_ROWS} x N = {STAT_ROWS} x {x.shape[0]}, got {tuple(tensor.shape)}")
        if tensor.device != x.device:
            raise ValueError(f"{name} must be on the rows' device ({x.device}), got {tensor.device}")


def fake_gradients(x, y, need_dx: bool, need_dy: bool):
    """The (dx, dy) shapes of a fused backward op: an unneeded gradient has 0 rows; y = None (the references are the
    queries) puts the whole gradient in dx."""
    if y is None:
        return x.new_empty((x.shape[0] if need_dx or need_dy else 0, x.shape[1])), x.new_empty((0, x.shape[1]))
    return (x.new_empty((x.shape[0] if need_dx else 0, x.shape[1])),
            y.new_empty((y.shape[0] if need_dy else 0, y.shape[1])))


def register_ops(prefix: str, selection_rows=lambda x, *options: 2) -> None:
    """Registers the fake implementations and the autograd formula of metric_kernels::<prefix>_* ops;
    selection_rows(x, *options) is how many rows batch_hard_select answers (its options after self_offset)."""
    forward, backward, select = (f"metric_kernels::{prefix}_{op}"
                                 for op in ("lse_rows", "lse_rows_backward", "batch_hard_select"))
    backward_op = getattr(torch.ops.metric_kernels, f"{prefix}_lse_rows_backward")

    @torch.library.register_fake(forward)
    def _(x, y, *options):
        return x.new_empty((STAT_ROWS, x.shape[0]), dtype=stats_dtype(x.dtype))

    @torch.library.register_fake(backward)
    def _(grad, stats, x, y, *options):  # options end with (need_dx, need_dy), or with normalize after them
        need_dx, need_dy = options[8:10]
        return fake_gradients(x, y, need_dx, need_dy)

    @torch.library.register_fake(select)
    def _(x, y, x_labels, y_labels, self_offset, *options):  # triton's also takes `normalize`
        return x.new_empty((selection_rows(x, *options), x.shape[0]), dtype=torch.int64)

    def setup_context(ctx, inputs, output):
        x, y, x_labels, y_labels = inputs[:4]
        ctx.save_for_backward(x, y, x_labels, y_labels, output)
        # (self_offset, kind, pair_value, param_a, param_b, deterministic), then the backend's own options
        ctx.params, ctx.options = inputs[4:10], inputs[10:]

    def backward_fn(ctx, grad):
        x, y, x_labels, y_labels, stats = ctx.saved_tensors
        need_dx, need_dy = ctx.needs_input_grad[0], y is not None and ctx.needs_input_grad[1]
        dx, dy = backward_op(grad.to(stats.dtype).contiguous(), stats, x, y, x_labels, y_labels, *ctx.params,
                             need_dx, need_dy, *ctx.options)
        return (dx if need_dx else None, dy if need_dy else None) + (None,) * (8 + len(ctx.options))

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)


def register_margin_softmax_ops(prefix: str) -> None:
    """Registers the fake implementations and the autograd formula of metric_kernels::<prefix>_margin_softmax_*."""
    forward = f"metric_kernels::{prefix}_margin_softmax_rows"
    backward_op = getattr(torch.ops.metric_kernels, f"{prefix}_margin_softmax_rows_backward")

    @torch.library.register_fake(forward)
    def _(x, weight, *options):
        return x.new_empty((2, x.shape[0]), dtype=stats_dtype(x.dtype))

    @torch.library.register_fake(f"{forward}_backward")
    def _(grad, stats, x, weight, labels, sub_centers, scale, normalize_x, normalize_w, pool_scale, deterministic,
          need_dx, need_dw, *options):
        return (x.new_empty((x.shape[0] if need_dx else 0, x.shape[1])),
                weight.new_empty((weight.shape[0] if need_dw else 0, weight.shape[1])))

    def setup_context(ctx, inputs, output):
        x, weight, labels = inputs[:3]
        ctx.save_for_backward(x, weight, labels, output)
        # (sub_centers, scale, normalize_x, normalize_w, pool_scale, deterministic), then the backend's own options
        ctx.params, ctx.options = inputs[3:9], inputs[9:]

    def backward_fn(ctx, grad):
        x, weight, labels, stats = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dw = backward_op(grad.to(stats.dtype).contiguous(), stats, x, weight, labels, *ctx.params, need_dx,
                             need_dw, *ctx.options)
        return (dx if need_dx else None, dw if need_dw else None) + (None,) * (7 + len(ctx.options))

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)


def register_triplet_autograd(forward: str, backward) -> None:
    """Registers the fake implementation and the autograd formula of a chosen-distance op (batch-hard's chosen
    distances from the raw rows; Triton's and the CUDA kernels'):

        forward(x, y?, positive, negative, normalize) -> [2, N]   (indices in [0, M); y = None: the references are
            the queries)

    given backward(grad, distances, x, y?, positive, negative, normalize, need_dx, need_dy) -> (dx, dy)."""
    @torch.library.register_fake(forward)
    def _(x, y, positive, negative, normalize=True):
        return x.new_empty((2, x.shape[0]), dtype=stats_dtype(x.dtype))

    def setup_context(ctx, inputs, output):
        x, y, positive, negative, normalize = inputs
        ctx.save_for_backward(x, y, positive, negative, output)
        ctx.normalize = normalize

    def backward_fn(ctx, grad):
        x, y, positive, negative, distances = ctx.saved_tensors
        need_dx, need_dy = ctx.needs_input_grad[0], y is not None and ctx.needs_input_grad[1]
        dx, dy = backward(grad.contiguous(), distances, x, y, positive, negative, ctx.normalize, need_dx, need_dy)
        return dx if need_dx else None, dy if need_dy else None, None, None, None

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)


def register_triplet_ops(prefix: str) -> None:
    """Registers metric_kernels::<prefix>_triplet_distances (register_triplet_autograd) and the fake implementation
    of its backward op, the CUDA kernels' (triplet_backward_inputs' coefficients and order passed in):

        triplet_distances_backward(coefficients [2, N], x, y?, positive, negative, order, offsets, normalize,
                                   need_dx, need_dy) -> (dx, dy)
    """
    forward = f"metric_kernels::{prefix}_triplet_distances"
    backward_op = getattr(torch.ops.metric_kernels, f"{prefix}_triplet_distances_backward")

    @torch.library.register_fake(f"{forward}_backward")
    def _(coefficients, x, y, positive, negative, order, offsets, normalize, need_dx, need_dy):
        return fake_gradients(x, y, need_dx, need_dy)

    def backward(grad, distances, x, y, positive, negative, normalize, need_dx, need_dy):
        references = x.shape[0] if y is None else y.shape[0]
        coefficients, order, offsets = triplet_backward_inputs(grad, distances, positive, negative, references)
        return backward_op(coefficients, x, y, positive, negative, order, offsets, normalize, need_dx, need_dy)

    register_triplet_autograd(forward, backward)


def register_triplet_margin_ops(prefix: str) -> None:
    """Registers the fake implementations and the autograd formula of metric_kernels::<prefix>_triplet_margin_rows
    (its table width K is data-dependent: max(slots))."""
    forward = f"metric_kernels::{prefix}_triplet_margin_rows"
    backward_op = getattr(torch.ops.metric_kernels, f"{prefix}_triplet_margin_rows_backward")

    @torch.library.register_fake(forward)
    def _(x, y, x_labels, y_labels, self_offset, pair_value, margin, smooth, slots, rank, deterministic, *options):
        slot_count = torch.library.get_ctx().new_dynamic_size()
        dtype = stats_dtype(x.dtype)
        return (x.new_empty((2, x.shape[0]), dtype=dtype), x.new_empty((x.shape[0], slot_count), dtype=dtype),
                x.new_empty((x.shape[0], slot_count), dtype=dtype))

    @torch.library.register_fake(f"{forward}_backward")
    def _(grad, table, weights, x, y, x_labels, y_labels, self_offset, pair_value, smooth, rank, deterministic,
          need_dx, need_dy, *options):
        return fake_gradients(x, y, need_dx, need_dy)

    def setup_context(ctx, inputs, output):
        x, y, x_labels, y_labels, self_offset, pair_value, margin, smooth, slots, rank, deterministic = inputs[:11]
        _, table, weights = output
        ctx.save_for_backward(x, y, x_labels, y_labels, rank, table, weights)
        ctx.params, ctx.deterministic, ctx.options = (self_offset, pair_value, smooth), deterministic, inputs[11:]
        ctx.mark_non_differentiable(table, weights)

    def backward_fn(ctx, grad, grad_table, grad_weights):
        x, y, x_labels, y_labels, rank, table, weights = ctx.saved_tensors
        need_dx, need_dy = ctx.needs_input_grad[0], y is not None and ctx.needs_input_grad[1]
        dx, dy = backward_op(grad[0].to(table.dtype).contiguous(), table, weights, x, y, x_labels, y_labels,
                             *ctx.params, rank, ctx.deterministic, need_dx, need_dy, *ctx.options)
        return (dx if need_dx else None, dy if need_dy else None) + (None,) * (9 + len(ctx.options))

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)


class FusedRows:
    """The backend contract's four per-row functions (metric_kernels/backends.py) over a fused backend's ops."""

    def __init__(self, prefix: str):
        self._lse_rows = getattr(torch.ops.metric_kernels, f"{prefix}_lse_rows")
        self._select = getattr(torch.ops.metric_kernels, f"{prefix}_batch_hard_select")
        self._margin_softmax = getattr(torch.ops.metric_kernels, f"{prefix}_margin_softmax_rows", None)
        self._triplet_margin = getattr(torch.ops.metric_kernels, f"{prefix}_triplet_margin_rows", None)

    @staticmethod
    def selection_rows(x, *options) -> int:
        """Rows of the backend's batch_hard_select answer (options: the op's arguments after self_offset): 2 where
        its products are exact enough to rank on, 4 (runners-up too) for tf32 products."""
        return 2

    @staticmethod
    def _offset(self_offset):
        return -1 if self_offset is None else self_offset

    def _stats(self, x, y, x_labels, y_labels, self_offset, kind, a, b, deterministic, pair_value, *options):
        """The lse op's statistics: every per-row function calls the op here."""
        # y is x: the op gets None and writes a single gradient (as query and as reference)
        return self._lse_rows(x, None if y is x else y, x_labels, y_labels, self._offset(self_offset), KIND[kind],
                              pair_value, a, b, deterministic, *options)

    def _choices(self, x, y, x_labels, y_labels, self_offset, *options):
        """batch_hard_select's choices: every per-row function calls the op here."""
        return self._select(x.detach(), y.detach(), x_labels, y_labels, self._offset(self_offset), *options)

    def circle_rows(self, x, y, x_labels, y_labels, self_offset, *, m, gamma, deterministic, **options):
        stats = self._stats(x, y, x_labels, y_labels, self_offset, "circle", m, gamma, deterministic, SIMILARITY,
                            *options.values())
        positives, negatives = pair_counts(x_labels, y_labels, self_offset)
        return circle_from_stats(stats[0], stats[1], positives, negatives)

    def supcon_rows(self, x, y, x_labels, y_labels, self_offset, *, temperature, deterministic,
                    pair_value=SIMILARITY, **options):
        stats = self._stats(x, y, x_labels, y_labels, self_offset, "supcon", 0.0, 1.0 / temperature, deterministic,
                            pair_value, *options.values())
        positives, _ = pair_counts(x_labels, y_labels, self_offset)
        return supcon_from_stats(stats[1], stats[2], positives, temperature)

    def multi_similarity_rows(self, x, y, x_labels, y_labels, self_offset, *, alpha, beta, base, deterministic,
                              pair_value=SIMILARITY, **options):
        stats = self._stats(x, y, x_labels, y_labels, self_offset, "multi_similarity", alpha, beta, deterministic,
                            pair_value, *options.values())
        return multi_similarity_from_stats(stats[0], stats[1], alpha, beta, base)

    def generalized_lifted_structure_rows(self, x, y, x_labels, y_labels, self_offset, *, pos_margin, neg_margin,
                                          deterministic, pair_value=SIMILARITY, **options):
        # Multi-Similarity's kind with alpha = beta = 1: the log-sum-exps of -v over the positives and v over the
        # negatives, the margins added per row
        stats = self._stats(x, y, x_labels, y_labels, self_offset, "multi_similarity", 1.0, 1.0, deterministic,
                            pair_value, *options.values())
        return generalized_lifted_structure_from_stats(stats[0], stats[1], pos_margin, neg_margin)

    def nca_rows(self, x, y, x_labels, y_labels, self_offset, *, softmax_scale, deterministic, pair_value=SIMILARITY,
                 **options):
        # Multi-Similarity's kind folds -a v over the positives and b v over the negatives: a = -scale, b = scale
        # gives NCA's two log-sum-exps of scale * v.
        stats = self._stats(x, y, x_labels, y_labels, self_offset, "multi_similarity", -softmax_scale, softmax_scale,
                            deterministic, pair_value, *options.values())
        return stats[0], stats[1]

    def ntxent_rows(self, x, y, x_labels, y_labels, self_offset, *, temperature, deterministic, angular_margin=0.0,
                    pair_value=SIMILARITY, **options):
        # the kind's a: the positives' angular margin (TupletMarginLoss; csrc/epilogue.h's AngularMargin)
        stats = self._stats(x, y, x_labels, y_labels, self_offset, "ntxent", angular_margin, 1.0 / temperature,
                            deterministic, pair_value, *options.values())
        return stats[0], stats[3]

    def contrastive_rows(self, x, y, x_labels, y_labels, self_offset, *, pos_margin, neg_margin, deterministic,
                         pair_value=SIMILARITY, **options):
        stats = self._stats(x, y, x_labels, y_labels, self_offset, "contrastive", pos_margin, neg_margin,
                            deterministic, pair_value, *options.values())
        return stats[0], stats[1], stats[2], stats[3]

    def triplet_margin_rows(self, x, y, x_labels, y_labels, self_offset, *, margin, smooth, deterministic,
                            pair_value=SIMILARITY, **options):
        slots, rank = positive_slots(x_labels, y_labels)
        stats, _, _ = self._triplet_margin(x, None if y is x else y, x_labels, y_labels, self._offset(self_offset),
                                           pair_value, margin, smooth, slots, rank, deterministic, *options.values())
        return stats[0], stats[1]

    def batch_hard_rows(self, x, y, x_labels, y_labels, self_offset, *, margin, soft, deterministic):
        choices = self._choices(x, y, x_labels, y_labels, self_offset)
        return batch_hard_from_choices(x, y, choices[0], choices[1], margin, soft)

    def proxy_anchor_rows(self, proxies, x, labels, *, margin, alpha, deterministic, pair_value=SIMILARITY,
                          **options):
        proxy_labels = torch.arange(proxies.shape[0], device=proxies.device)
        stats = self._stats(proxies, x, proxy_labels, labels, None, "proxy_anchor", margin, alpha, deterministic,
                            pair_value, *options.values())
        return proxy_anchor_from_stats(stats[0], stats[1])

    def margin_softmax_rows(self, x, weight, labels, *, scale, sub_centers, deterministic, normalize_x=True,
                            normalize_w=True, pool_scale=0.0, **options):
        stats = self._margin_softmax(x, weight, labels, sub_centers, scale, normalize_x, normalize_w, pool_scale,
                                     deterministic, *options.values())
        return stats[0], stats[1]


class RawRows(FusedRows):
    """The fused per-row functions of a backend whose kernels take the raw rows: batch-hard normalises (when asked)
    inside its selection kernel too, and its chosen distances come from the backend's own kernel
    (self._triplet_distances, the <prefix>_triplet_distances op) rather than normalised or upcast N x D copies."""

    def batch_hard_rows(self, x, y, x_labels, y_labels, self_offset, *, margin, soft, deterministic, normalize):
        choices = self._choices(x, y, x_labels, y_labels, self_offset, normalize)
        references = None if y is x else y
        return hardest_triplet_losses(
            choices, lambda positive, negative: self._triplet_distances(x, references, positive, negative, normalize),
            margin, soft)


class CudaKernelRows(RawRows):
    """The per-row functions over the CUDA kernels' ops (backends "cuda" and "cuda-emulated"), which are built on
    torch's stable ABI and so cannot read torch's global settings: each call passes them. fp32 tiles go to tensor
    cores in tf32 only where torch allows tf32 matmuls (torch.backends.cuda.matmul.allow_tf32, also set by
    torch.set_float32_matmul_precision), the ops' last argument; torch's deterministic mode makes the backward
    deterministic whatever `deterministic` says (the atomic dY and dW passes run only where neither asks for
    determinism).
    The autograd formula hands the backward op its forward's arguments: a backward follows the settings of its
    forward."""

    def __init__(self, prefix: str):
        super().__init__(prefix)
        register_triplet_ops(prefix)
        self._triplet_distances = getattr(torch.ops.metric_kernels, f"{prefix}_triplet_distances")

    def _stats(self, x, y, x_labels, y_labels, self_offset, kind, a, b, deterministic, pair_value, *options):
        return super()._stats(x, y, x_labels, y_labels, self_offset, kind, a, b,
                              deterministic or torch.are_deterministic_algorithms_enabled(), pair_value, *options,
                              torch.backends.cuda.matmul.allow_tf32)

    def _choices(self, x, y, x_labels, y_labels, self_offset, *options):
        return super()._choices(x, y, x_labels, y_labels, self_offset, *options, torch.backends.cuda.matmul.allow_tf32)

    @staticmethod
    def selection_rows(x, normalize=True, allow_tf32=False) -> int:
        return 4 if allow_tf32 and x.dtype == torch.float32 else 2

    def triplet_margin_rows(self, x, y, x_labels, y_labels, self_offset, *, margin, smooth, deterministic,
                            pair_value=SIMILARITY, **options):
        return super().triplet_margin_rows(
            x, y, x_labels, y_labels, self_offset, margin=margin, smooth=smooth, pair_value=pair_value,
            deterministic=deterministic or torch.are_deterministic_algorithms_enabled(), **options,
            allow_tf32=torch.backends.cuda.matmul.allow_tf32)

    def margin_softmax_rows(self, x, weight, labels, *, scale, sub_centers, deterministic, normalize_x=True,
                            normalize_w=True, pool_scale=0.0, **options):
        return super().margin_softmax_rows(x, weight, labels, scale=scale, sub_centers=sub_centers,
                                           normalize_x=normalize_x, normalize_w=normalize_w, pool_scale=pool_scale,
                                           deterministic=deterministic or torch.are_deterministic_algorithms_enabled(),
                                           **options, allow_tf32=torch.backends.cuda.matmul.allow_tf32)


ROW_FUNCTIONS = ("circle_rows", "supcon_rows", "multi_similarity_rows", "nca_rows", "ntxent_rows",
                 "contrastive_rows", "generalized_lifted_structure_rows", "batch_hard_rows", "proxy_anchor_rows")
CLASSIFIER_ROWS = "margin_softmax_rows"  # the margin-softmax ops, where a backend's kernels compute them
TRIPLET_MARGIN_ROWS = "triplet_margin_rows"  # the triplet margin ops, where a backend's kernels compute them


def fused_backend(prefix: str, namespace: dict, rows_class=FusedRows, names=ROW_FUNCTIONS) -> None:
    """Registers the <prefix>_* ops' fake implementations and autograd, and puts the backend contract's per-row
    functions over them (`names`, of ROW_FUNCTIONS and CLASSIFIER_ROWS: those the backend's kernels compute) into
    `namespace`, the backend module's globals(). CLASSIFIER_ROWS (TRIPLET_MARGIN_ROWS) among them registers the
    margin-softmax (triplet margin) ops too."""
    register_ops(prefix, rows_class.selection_rows)
    if CLASSIFIER_ROWS in names:
        register_margin_softmax_ops(prefix)
    if TRIPLET_MARGIN_ROWS in names:
        register_triplet_margin_ops(prefix)
    rows = rows_class(prefix)
    namespace.update({name: getattr(rows, name) for name in names})
