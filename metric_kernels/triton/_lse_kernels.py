"""Triton kernels of the log-sum-exp family (Circle, SupCon, Proxy-Anchor): one tiled engine, one epilogue per loss.

A program owns BLOCK_M query rows and walks the references in BLOCK_N tiles. Each tile of S = X Y^T is formed on chip
(tl.dot, fp32 or fp64 accumulation), its masks are built from the label vectors and self_offset, and the loss's logits
are folded into three statistics per row, never an N x M buffer:

    stats[0, i] = logsumexp over mask1 of logit1(s_ij)      (Circle, Proxy-Anchor: positives)
    stats[1, i] = logsumexp over mask2 of logit2(s_ij)      (Circle, Proxy-Anchor: negatives; SupCon: all pairs)
    stats[2, i] = sum over positives of s_ij                (SupCon only)

The losses are cheap functions of these statistics (metric_kernels/_row_epilogues.py). The backward kernels recompute
each tile from the saved statistics and the upstream gradient of each statistic, form dS on chip and accumulate
dX = dS Y (over row blocks) and dY = dS^T X (over column blocks, or atomically from the row pass).
"""
import triton
import triton.language as tl

CIRCLE = tl.constexpr(0)
SUPCON = tl.constexpr(1)
PROXY_ANCHOR = tl.constexpr(2)
KINDS = {"circle": 0, "supcon": 1, "proxy_anchor": 2}

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _similarity_tile(x_ptr, y_ptr, rows, cols, N, M, D, stride_xn, stride_xd, stride_yn, stride_yd,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """S[rows, cols] = X[rows] . Y[cols], accumulated in ACC over D in BLOCK_D chunks; rows past N / cols past M are 0."""
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows[:, None] * stride_xn + dims[None, :] * stride_xd,
                    mask=(rows[:, None] < N) & (dims[None, :] < D), other=0.0)
        y = tl.load(y_ptr + cols[:, None] * stride_yn + dims[None, :] * stride_yd,
                    mask=(cols[:, None] < M) & (dims[None, :] < D), other=0.0)
        if UPCAST:  # the interpreter's tl.dot is wrong on bf16 operands (triton issue 11584)
            x = x.to(ACC)
            y = y.to(ACC)
        s = tl.dot(x, tl.trans(y), s, input_precision=PRECISION, out_dtype=ACC)
    return s


@triton.jit
def _pair_masks(x_labels, y_labels, rows, cols, N, M, self_offset):
    """(positive, negative) masks of a tile; the pair (i, i + self_offset) is in neither (self_offset < 0: none)."""
    allowed = (rows[:, None] < N) & (cols[None, :] < M)
    allowed = allowed & ((cols[None, :] != rows[:, None] + self_offset) | (self_offset < 0))
    same = x_labels[:, None] == y_labels[None, :]
    return same & allowed, (~same) & allowed


@triton.jit
def _epilogue(s, positive, negative, param_a, param_b, KIND: tl.constexpr):
    """The loss's logits and their derivatives in s: (mask1, logit1, dlogit1, mask2, logit2, dlogit2).

    Circle: a = m, b = gamma; the weights relu(.) are treated as constants, as in the paper and PML.
    Proxy-Anchor: a = margin, b = alpha. SupCon: b = 1 / temperature.
    """
    if KIND == CIRCLE:
        weight1 = param_b * tl.maximum(1 + param_a - s, 0.0)
        weight2 = param_b * tl.maximum(s + param_a, 0.0)
        return positive, -weight1 * (s - (1 - param_a)), -weight1, negative, weight2 * (s - param_a), weight2
    elif KIND == PROXY_ANCHOR:
        return (positive, -param_b * (s - param_a), tl.zeros_like(s) - param_b,
                negative, param_b * (s + param_a), tl.zeros_like(s) + param_b)
    else:
        nothing = positive & negative
        return nothing, s, tl.zeros_like(s), positive | negative, s * param_b, tl.zeros_like(s) + param_b


@triton.jit
def _online_logsumexp(running_max, running_sum, logits, mask):
    """Folds one tile into (max, sum of 2^(v - max)) in base 2; rows with nothing yet keep max = -inf, sum = 0."""
    values = tl.where(mask, logits * LOG2E, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(values, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp2(running_max - shift) + tl.sum(tl.exp2(values - shift[:, None]), axis=1)
    return new_max, running_sum


@triton.jit
def _finish_logsumexp(running_max, running_sum):
    """Natural-log logsumexp of the folded state; -inf for a row that had nothing to sum."""
    return tl.where(running_sum > 0, (running_max + tl.log2(tl.maximum(running_sum, 1e-30))) * LN2, float("-inf"))


@triton.jit
def lse_rows_forward(x_ptr, y_ptr, x_labels_ptr, y_labels_ptr, stats_ptr,
                     N, M, D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset, param_a, param_b,
                     KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    x_labels = tl.load(x_labels_ptr + rows, mask=rows < N, other=0)
    max1 = tl.full((BLOCK_M,), float("-inf"), ACC)
    sum1 = tl.zeros((BLOCK_M,), ACC)
    max2 = tl.full((BLOCK_M,), float("-inf"), ACC)
    sum2 = tl.zeros((BLOCK_M,), ACC)
    linear = tl.zeros((BLOCK_M,), ACC)
    for n0 in range(0, M, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        y_labels = tl.load(y_labels_ptr + cols, mask=cols < M, other=0)
        s = _similarity_tile(x_ptr, y_ptr, rows, cols, N, M, D, stride_xn, stride_xd, stride_yn, stride_yd,
                             BLOCK_M, BLOCK_N, BLOCK_D, ACC, UPCAST, PRECISION)
        positive, negative = _pair_masks(x_labels, y_labels, rows, cols, N, M, self_offset)
        mask1, logit1, _, mask2, logit2, _ = _epilogue(s, positive, negative, param_a, param_b, KIND)
        max1, sum1 = _online_logsumexp(max1, sum1, logit1, mask1)
        max2, sum2 = _online_logsumexp(max2, sum2, logit2, mask2)
        if KIND == SUPCON:
            linear += tl.sum(tl.where(positive, s, 0.0), axis=1)
    tl.store(stats_ptr + rows, _finish_logsumexp(max1, sum1), mask=rows < N)
    tl.store(stats_ptr + N + rows, _finish_logsumexp(max2, sum2), mask=rows < N)
    tl.store(stats_ptr + 2 * N + rows, linear, mask=rows < N)


@triton.jit
def _ds_tile(x_ptr, y_ptr, x_labels, y_labels, rows, cols, grad1, grad2, grad3, lse1, lse2,
             N, M, D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset, param_a, param_b,
             KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dS of one tile: d(sum_i g1_i lse1_i + g2_i lse2_i + g3_i lin_i) / dS, recomputed from the saved statistics."""
    s = _similarity_tile(x_ptr, y_ptr, rows, cols, N, M, D, stride_xn, stride_xd, stride_yn, stride_yd,
                         BLOCK_M, BLOCK_N, BLOCK_D, ACC, UPCAST, PRECISION)
    positive, negative = _pair_masks(x_labels, y_labels, rows, cols, N, M, self_offset)
    mask1, logit1, dlogit1, mask2, logit2, dlogit2 = _epilogue(s, positive, negative, param_a, param_b, KIND)
    # softmax_ij = exp(logit_ij - lse_i), 0 off the mask; masking the exponent keeps the -inf of empty rows (and the
    # inf * 0 it would make) out of the arithmetic.
    softmax1 = tl.exp2(tl.where(mask1, (logit1 - lse1[:, None]) * LOG2E, float("-inf")))
    softmax2 = tl.exp2(tl.where(mask2, (logit2 - lse2[:, None]) * LOG2E, float("-inf")))
    ds = grad1[:, None] * softmax1 * dlogit1 + grad2[:, None] * softmax2 * dlogit2
    if KIND == SUPCON:
        ds += tl.where(positive, grad3[:, None], 0.0)
    return ds


@triton.jit
def _load_row_state(grad_ptr, stats_ptr, x_labels_ptr, rows, N):
    ok = rows < N
    return (tl.load(x_labels_ptr + rows, mask=ok, other=0),
            tl.load(grad_ptr + rows, mask=ok, other=0.0), tl.load(grad_ptr + N + rows, mask=ok, other=0.0),
            tl.load(grad_ptr + 2 * N + rows, mask=ok, other=0.0),
            tl.load(stats_ptr + rows, mask=ok, other=0.0), tl.load(stats_ptr + N + rows, mask=ok, other=0.0))


@triton.jit
def lse_rows_backward_dx(grad_ptr, stats_ptr, x_ptr, y_ptr, x_labels_ptr, y_labels_ptr, dx_ptr, dy_ptr,
                         N, M, D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset, param_a, param_b,
                         KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_OUT: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                         PRECISION: tl.constexpr, ATOMIC_DY: tl.constexpr, ATOMIC_DX: tl.constexpr):
    """dX for BLOCK_M rows and BLOCK_OUT columns of D; with ATOMIC_DY also adds dS^T X into dY (fp32/fp64 buffer).
    ATOMIC_DX adds dX atomically too: when the references are the queries, dX and dY are one zeroed buffer."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    out_dims = tl.program_id(1).to(tl.int64) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    x_labels, grad1, grad2, grad3, lse1, lse2 = _load_row_state(grad_ptr, stats_ptr, x_labels_ptr, rows, N)
    if ATOMIC_DY:
        x_out = tl.load(x_ptr + rows[:, None] * stride_xn + out_dims[None, :] * stride_xd,
                        mask=(rows[:, None] < N) & (out_dims[None, :] < D), other=0.0).to(ACC)
    dx = tl.zeros((BLOCK_M, BLOCK_OUT), ACC)
    for n0 in range(0, M, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        y_labels = tl.load(y_labels_ptr + cols, mask=cols < M, other=0)
        ds = _ds_tile(x_ptr, y_ptr, x_labels, y_labels, rows, cols, grad1, grad2, grad3, lse1, lse2,
                      N, M, D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset, param_a, param_b,
                      KIND, BLOCK_M, BLOCK_N, BLOCK_D, ACC, UPCAST, PRECISION)
        y_out = tl.load(y_ptr + cols[:, None] * stride_yn + out_dims[None, :] * stride_yd,
                        mask=(cols[:, None] < M) & (out_dims[None, :] < D), other=0.0).to(ACC)
        dx = tl.dot(ds, y_out, dx, input_precision=PRECISION, out_dtype=ACC)
        if ATOMIC_DY:
            dy = tl.dot(tl.trans(ds), x_out, input_precision=PRECISION, out_dtype=ACC)
            tl.atomic_add(dy_ptr + cols[:, None] * D + out_dims[None, :], dy,
                          mask=(cols[:, None] < M) & (out_dims[None, :] < D))
    dx_mask = (rows[:, None] < N) & (out_dims[None, :] < D)
    if ATOMIC_DX:
        tl.atomic_add(dx_ptr + rows[:, None] * D + out_dims[None, :], dx, mask=dx_mask)
    else:
        tl.store(dx_ptr + rows[:, None] * D + out_dims[None, :], dx, mask=dx_mask)


@triton.jit
def lse_rows_backward_dy(grad_ptr, stats_ptr, x_ptr, y_ptr, x_labels_ptr, y_labels_ptr, dy_ptr,
                         N, M, D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset, param_a, param_b,
                         KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_OUT: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                         ACCUMULATE: tl.constexpr):
    """dY for BLOCK_N references and BLOCK_OUT columns of D, summing over row blocks in a fixed order (no atomics).
    ACCUMULATE adds into what dy_ptr holds (the dX of the same rows, when the references are the queries)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_dims = tl.program_id(1).to(tl.int64) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    y_labels = tl.load(y_labels_ptr + cols, mask=cols < M, other=0)
    dy = tl.zeros((BLOCK_N, BLOCK_OUT), ACC)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        x_labels, grad1, grad2, grad3, lse1, lse2 = _load_row_state(grad_ptr, stats_ptr, x_labels_ptr, rows, N)
        ds = _ds_tile(x_ptr, y_ptr, x_labels, y_labels, rows, cols, grad1, grad2, grad3, lse1, lse2,
                      N, M, D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset, param_a, param_b,
                      KIND, BLOCK_M, BLOCK_N, BLOCK_D, ACC, UPCAST, PRECISION)
        x_out = tl.load(x_ptr + rows[:, None] * stride_xn + out_dims[None, :] * stride_xd,
                        mask=(rows[:, None] < N) & (out_dims[None, :] < D), other=0.0).to(ACC)
        dy = tl.dot(tl.trans(ds), x_out, dy, input_precision=PRECISION, out_dtype=ACC)
    dy_mask = (cols[:, None] < M) & (out_dims[None, :] < D)
    if ACCUMULATE:  # each (column block, D block) belongs to this program alone, so load-add-store is race-free
        dy += tl.load(dy_ptr + cols[:, None] * D + out_dims[None, :], mask=dy_mask, other=0.0)
    tl.store(dy_ptr + cols[:, None] * D + out_dims[None, :], dy, mask=dy_mask)
