"""Triton kernels of the fused pair losses (Circle, SupCon, Proxy-Anchor, Multi-Similarity, NT-Xent, Contrastive): one
tiled engine, one epilogue per loss.

The kernels read the raw rows X (N x D) and Y (M x D) in their own dtype and fp32 (fp64 for fp64 rows) row norms.
A program owns BLOCK_M query rows and walks its share of the references in BLOCK_N tiles. Each tile of

    s_ij = (x_i . y_j) r_i r_j,    r = 1 / max(||row||, eps)

is formed on chip by one tl.dot over the whole of D (16-bit operands for 16-bit rows, fp32 accumulation; D is walked
in BLOCK_D chunks only above the widest tile), masked from the label vectors and self_offset, and folded into STAT_ROWS
statistics per row, never an N x M buffer. The log-sum-exp kinds (lse_rows_forward):

    stats[0, i] = logsumexp over the first set of z_ij      (Circle, Proxy-Anchor: positives)
    stats[1, i] = logsumexp over the second set of z_ij     (Circle, Proxy-Anchor: negatives; SupCon: all pairs)
    stats[2, i] = sum over positives of s_ij                (SupCon only)
    stats[3, i] = 0

The two sets are disjoint, so each pair costs one exponential: it is shifted by the running maximum of its own set.
The losses are cheap functions of these statistics (metric_kernels/_row_epilogues.py). The kinds whose statistics
are sums over pairs (pair_sums_forward, partial sums of a split merged by addition), with v_ij the pair value:

    Contrastive (one sweep): the sums of relu(a - v) over positives and of relu(v - b) over negatives, and how many of
    each are nonzero.
    NT-Xent (b = 1 / temperature): a first sweep (lse_rows_forward) gives A_i = logsumexp over negatives of b v_ik in
    stats[1], then with x_ij = A_i - b v_ij over positives stats[0] = sum softplus(x_ij), stats[2] = W_i =
    sum sigmoid(x_ij), stats[3] = how many have 1 + exp(x_ij) > 1 in the statistics dtype (PML's nonzero pairs).

The backward kernels recompute each tile once from the saved statistics and the upstream gradient g of each statistic,
form G = dL/dS on chip, and take both products from the same tile: with P = G r_i r_j (times a power-of-two scale that
keeps fp16 operands in range), dX = P Y and dY = P^T X, minus the normalisation's radial part t r^2 x, where
t_i = sum_j G_ij s_ij (rows) or sum_i G_ij s_ij (columns) is accumulated on chip alongside.
"""
import triton
import triton.language as tl

from .._fused import STAT_ROWS as _STAT_ROWS

SIMILARITY = tl.constexpr(0)  # the pair values, metric_kernels/_pairs.py
SQUARED_EUCLIDEAN = tl.constexpr(1)
CIRCLE = tl.constexpr(0)
SUPCON = tl.constexpr(1)
PROXY_ANCHOR = tl.constexpr(2)
MULTI_SIMILARITY = tl.constexpr(3)
NTXENT = tl.constexpr(4)
CONTRASTIVE = tl.constexpr(5)
TRIPLET_MARGIN = tl.constexpr(6)
KINDS = {"circle": 0, "supcon": 1, "proxy_anchor": 2, "multi_similarity": 3, "ntxent": 4, "contrastive": 5,
         "triplet_margin": 6}
STAT_ROWS = tl.constexpr(_STAT_ROWS)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NORM_EPS = tl.constexpr(1e-12)  # F.normalize's default: a row is divided by max(||row||, eps)
# Rows wider than the widest on-chip tile are multiplied in chunks of this many columns (a GEMM's K step): wider
# chunks only add registers (the forward spilled with chunks of 256).
DOT_CHUNK = tl.constexpr(64)


@triton.jit
def _load_rows(ptr, rows, dims, n, d, stride_n, stride_d, ROWS_IN_RANGE: tl.constexpr = False):
    """A [rows, dims] tile in the rows' own dtype; entries past n or d are 0. ROWS_IN_RANGE: the caller knows every
    row is below n, and the mask leaves them out (the margin-softmax kernels read W's columns as rows: unit stride
    along `rows`, which a mask varying along them would keep from being loaded in vectors)."""
    if ROWS_IN_RANGE:
        mask = dims[None, :] < d
    else:
        mask = (rows[:, None] < n) & (dims[None, :] < d)
    return tl.load(ptr + rows[:, None] * stride_n + dims[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _row_scales(norm_ptr, rows, n, NORMALIZE: tl.constexpr):
    """(r, where the normalisation has a radial part, (||row|| r)^2) of the rows: r = 1 / max(||row||, eps) when
    normalising (radial where the clamp is inactive), else r = 1 and no radial part."""
    norms = tl.load(norm_ptr + rows, mask=rows < n, other=1.0)
    if NORMALIZE:
        unclamped = norms > NORM_EPS
        # tl.where, not tl.maximum: tl.maximum would round eps to fp32 first, off by 4e-9 relative for fp64 rows
        inverse = 1.0 / tl.where(unclamped, norms, NORM_EPS)
    else:
        inverse = tl.zeros_like(norms) + 1.0
        unclamped = rows < 0
    length = norms * inverse
    return inverse, unclamped, length * length


@triton.jit
def _query_block(x_ptr, x_norm_ptr, x_labels_ptr, N, D, stride_xn, stride_xd, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr, FULL_D: tl.constexpr, ACC: tl.constexpr, NORMALIZE: tl.constexpr):
    """The forward kernels' block of query rows, program_id(0)'s: (rows, dims, labels, _row_scales' three, and the
    rows' tile where the whole of D is on chip, else a placeholder)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    x_labels = tl.load(x_labels_ptr + rows, mask=rows < N, other=0)
    x_inverse, x_radial, x_length2 = _row_scales(x_norm_ptr, rows, N, NORMALIZE)
    x_tile = _load_rows(x_ptr, rows, dims, N, D, stride_xn, stride_xd) if FULL_D else tl.zeros((1, 1), ACC)
    return rows, dims, x_labels, x_inverse, x_radial, x_length2, x_tile


@triton.jit
def _pair_value(s, x_length2, y_length2, PAIR_VALUE: tl.constexpr):
    """What a pair contributes (metric_kernels/_pairs.py): s itself, or minus the squared or plain Euclidean distance
    q = |u|^2 + |v|^2 - 2 s (clamped at 0) of the scaled rows."""
    if PAIR_VALUE == SIMILARITY:
        return s
    q = tl.maximum(x_length2[:, None] + y_length2[None, :] - 2 * s, 0.0)
    if PAIR_VALUE == SQUARED_EUCLIDEAN:
        return -q
    return -tl.sqrt(q)


@triton.jit
def _pair_gradient(gradient, value, PAIR_VALUE: tl.constexpr):
    """(dL/ds, dL/dq) of a tile from G = dL/d(pair value): q the squared distance (0 for a similarity). At q = 0 (the
    clamp, or a distance of 0) both are 0, as torch.cdist's gradient is."""
    if PAIR_VALUE == SIMILARITY:
        return gradient, tl.zeros_like(gradient)
    if PAIR_VALUE == SQUARED_EUCLIDEAN:
        by_q = tl.where(value < 0, -gradient, 0.0)
    else:
        by_q = tl.where(value < 0, gradient / tl.where(value < 0, 2 * value, 1.0), 0.0)  # dv/dq = 1 / (2 v)
    return -2 * by_q, by_q


@triton.jit
def _radial_terms(by_s, by_q, s, radial, axis: tl.constexpr):
    """Per row (axis 1) or column (axis 0) the coefficient c of the rows' own direction in their gradient,
    dX = P Y - c r^2 X: sum G_s s where the normalisation is radial (unit scaled rows), else -2 sum dL/dq (the
    |u|^2 term of q). The else is needed: after a constexpr-true return Triton still builds the rest of the function
    (dead, but typed), and radial[None, :] of a row vector only broadcasts against a square tile."""
    if axis == 1:
        terms = tl.sum(tl.where(radial[:, None], by_s * s, -2 * by_q), axis=1)
    else:
        terms = tl.sum(tl.where(radial[None, :], by_s * s, -2 * by_q), axis=0)
    return terms


@triton.jit
def _load_params(params_ptr):
    """The loss's two parameters, from the tensor ops.loss_params fills in the statistics dtype: a float argument
    would reach the kernel as fp32, which fp64 rows cannot afford."""
    return tl.load(params_ptr), tl.load(params_ptr + 1)


@triton.jit
def _load_angular_margin(params_ptr):
    """cos a and sin a of NT-Xent's angular margin a, computed on the host (ops.loss_params): libdevice's sin and cos
    keep their argument reduction's scratch in local memory, which ptxas reports as spills."""
    return tl.load(params_ptr + 2), tl.load(params_ptr + 3)


@triton.jit
def _dot_tile(x_ptr, y_ptr, x_tile, y_tile, rows, cols, N, M, D, stride_xn, stride_xd, stride_yn, stride_yd,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FULL_D: tl.constexpr,
              ACC: tl.constexpr, PRECISION: tl.constexpr, Y_IN_RANGE: tl.constexpr = False):
    """X[rows] . Y[cols] accumulated in ACC: from the tiles on chip when FULL_D (D <= BLOCK_D), else over D in
    BLOCK_D chunks read from memory (Y_IN_RANGE: every col is below M, _load_rows)."""
    if FULL_D:
        dot = tl.dot(x_tile, tl.trans(y_tile), input_precision=PRECISION, out_dtype=ACC)
    else:
        dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for d0 in range(0, D, DOT_CHUNK):
            dims = d0 + tl.arange(0, DOT_CHUNK)
            x = _load_rows(x_ptr, rows, dims, N, D, stride_xn, stride_xd)
            y = _load_rows(y_ptr, cols, dims, M, D, stride_yn, stride_yd, Y_IN_RANGE)
            dot = tl.dot(x, tl.trans(y), dot, input_precision=PRECISION, out_dtype=ACC)
    return dot


@triton.jit
def _pair_masks(x_labels, y_labels, rows, cols, N, M, self_offset):
    """(positive, negative) masks of a tile; the pair (i, i + self_offset) is in neither (self_offset < 0: none)."""
    allowed = (rows[:, None] < N) & (cols[None, :] < M)
    allowed = allowed & ((cols[None, :] != rows[:, None] + self_offset) | (self_offset < 0))
    same = x_labels[:, None] == y_labels[None, :]
    return same & allowed, (~same) & allowed


@triton.jit
def _logits(s, positive, negative, param_a, param_b, KIND: tl.constexpr):
    """(z, dz, first): the loss's logit of every pair (-inf outside both masks), dz/ds, and which pairs belong to the
    first log-sum-exp (the rest of the finite ones belong to the second).

    Circle: a = m, b = gamma; the weights relu(.) are constants, as in the paper and PML. Proxy-Anchor: a = margin,
    b = alpha. Multi-Similarity: a = alpha, b = beta, unshifted (its shift by base is a per-row constant, added to the
    statistics afterwards). SupCon: b = 1 / temperature, a single log-sum-exp over every pair (its first set is empty).
    NT-Xent's first sweep: SupCon's over the negatives only (A_i). Contrastive has no logits.
    """
    if KIND == CIRCLE:
        weight_positive = param_b * tl.maximum(1 + param_a - s, 0.0)
        weight_negative = param_b * tl.maximum(s + param_a, 0.0)
        z = tl.where(positive, -weight_positive * (s - (1 - param_a)), weight_negative * (s - param_a))
        dz = tl.where(positive, -weight_positive, weight_negative)
        first = positive
    elif KIND == PROXY_ANCHOR:
        z = tl.where(positive, -param_b * (s - param_a), param_b * (s + param_a))
        dz = tl.where(positive, -param_b, param_b)
        first = positive
    elif KIND == MULTI_SIMILARITY:
        dz = tl.where(positive, -param_a, param_b)
        z = dz * s
        first = positive
    else:
        z = s * param_b
        dz = tl.zeros_like(s) + param_b
        first = positive & negative
    if KIND == NTXENT:
        folded = negative
    else:
        folded = positive | negative
    return tl.where(folded, z, float("-inf")), dz, first


@triton.jit
def _finite_or_zero(value):
    return tl.where(value == float("-inf"), 0.0, value)


@triton.jit
def _fold_tile(max1, sum1, max2, sum2, z, first, TWO_SETS: tl.constexpr):
    """Folds a tile's logits into two running (max, sum of 2^(v - max)) states in base 2, one exponential per pair:
    each pair is shifted by the new maximum of its own set. Rows with nothing yet keep max = -inf, sum = 0. Without
    TWO_SETS (SupCon, NT-Xent's A) every pair is in the second set and the first state is left as it is."""
    v = z * LOG2E
    new2 = tl.maximum(max2, tl.max(tl.where(first, float("-inf"), v), axis=1))
    if TWO_SETS:
        new1 = tl.maximum(max1, tl.max(tl.where(first, v, float("-inf")), axis=1))
        shift = tl.where(first, _finite_or_zero(new1)[:, None], _finite_or_zero(new2)[:, None])
        e = tl.exp2(v - shift)  # 0 for pairs outside both sets (v = -inf)
        sum1 = sum1 * tl.exp2(max1 - _finite_or_zero(new1)) + tl.sum(tl.where(first, e, 0.0), axis=1)
        sum2 = sum2 * tl.exp2(max2 - _finite_or_zero(new2)) + tl.sum(tl.where(first, 0.0, e), axis=1)
    else:
        new1 = max1
        sum2 = sum2 * tl.exp2(max2 - _finite_or_zero(new2)) + tl.sum(tl.exp2(v - _finite_or_zero(new2)[:, None]),
                                                                     axis=1)
    return new1, sum1, new2, sum2


@triton.jit
def _finish_logsumexp(running_max, running_sum):
    """Natural-log logsumexp of the folded state; -inf for a row that had nothing to sum."""
    return tl.where(running_sum > 0, (running_max + tl.log2(tl.maximum(running_sum, 1e-30))) * LN2, float("-inf"))


@triton.jit
def _column_range(split, M, SPLIT, BLOCK_N: tl.constexpr):
    """The references [start, stop) of split `split` of SPLIT, whole BLOCK_N tiles each."""
    chunk = tl.cdiv(tl.cdiv(M, SPLIT), BLOCK_N) * BLOCK_N
    start = split * chunk
    return start, tl.minimum(start + chunk, M)


@triton.jit
def _forward_tile(x_ptr, y_ptr, y_norm_ptr, y_labels_ptr, x_tile, x_labels, x_inverse, x_length2, rows, dims, n0,
                  N, stop, D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FULL_D: tl.constexpr,
                  ACC: tl.constexpr, PRECISION: tl.constexpr, PAIR_VALUE: tl.constexpr, NORMALIZE: tl.constexpr):
    """(pair values, positive, negative) of the tile of references [n0, n0 + BLOCK_N) (those below stop) against the
    program's rows: what both forward kernels fold."""
    cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
    y_labels = tl.load(y_labels_ptr + cols, mask=cols < stop, other=0)
    y_inverse, y_radial, y_length2 = _row_scales(y_norm_ptr, cols, stop, NORMALIZE)
    y_tile = _load_rows(y_ptr, cols, dims, stop, D, stride_yn, stride_yd) if FULL_D else x_tile
    dot = _dot_tile(x_ptr, y_ptr, x_tile, y_tile, rows, cols, N, stop, D, stride_xn, stride_xd, stride_yn,
                    stride_yd, BLOCK_M, BLOCK_N, BLOCK_D, FULL_D, ACC, PRECISION)
    value = _pair_value(dot * x_inverse[:, None] * y_inverse[None, :], x_length2, y_length2, PAIR_VALUE)
    positive, negative = _pair_masks(x_labels, y_labels, rows, cols, N, stop, self_offset)
    return value, positive, negative


@triton.jit
def lse_rows_forward(x_ptr, y_ptr, x_norm_ptr, y_norm_ptr, x_labels_ptr, y_labels_ptr, stats_ptr,
                     N, M, D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset, params_ptr, SPLIT,
                     N_BUCKET, M_BUCKET, ALIGNED,
                     KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     FULL_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, PAIR_VALUE: tl.constexpr,
                     NORMALIZE: tl.constexpr):
    """stats[split, 0..3, rows] of a log-sum-exp kind (NT-Xent: its first sweep) over the references of one split
    (SPLIT = 1: the final statistics). N_BUCKET, M_BUCKET and ALIGNED are the autotuner's key only
    (ops.tuning_key)."""
    param_a, param_b = _load_params(params_ptr)
    split = tl.program_id(1)
    rows, dims, x_labels, x_inverse, x_radial, x_length2, x_tile = _query_block(
        x_ptr, x_norm_ptr, x_labels_ptr, N, D, stride_xn, stride_xd, BLOCK_M, BLOCK_D, FULL_D, ACC, NORMALIZE)
    max1 = tl.full((BLOCK_M,), float("-inf"), ACC)
    sum1 = tl.zeros((BLOCK_M,), ACC)
    max2 = tl.full((BLOCK_M,), float("-inf"), ACC)
    sum2 = tl.zeros((BLOCK_M,), ACC)
    linear = tl.zeros((BLOCK_M,), ACC)
    start, stop = _column_range(split, M, SPLIT, BLOCK_N)
    for n0 in range(start, stop, BLOCK_N):
        value, positive, negative = _forward_tile(
            x_ptr, y_ptr, y_norm_ptr, y_labels_ptr, x_tile, x_labels, x_inverse, x_length2, rows, dims, n0, N, stop,
            D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset, BLOCK_M, BLOCK_N, BLOCK_D, FULL_D, ACC,
            PRECISION, PAIR_VALUE, NORMALIZE)
        z, dz, first = _logits(value, positive, negative, param_a, param_b, KIND)
        max1, sum1, max2, sum2 = _fold_tile(max1, sum1, max2, sum2, z, first, KIND != SUPCON and KIND != NTXENT)
        if KIND == SUPCON:
            linear += tl.sum(tl.where(positive, value, 0.0), axis=1)
    out = stats_ptr + split.to(tl.int64) * STAT_ROWS * N + rows
    tl.store(out, _finish_logsumexp(max1, sum1), mask=rows < N)
    tl.store(out + N, _finish_logsumexp(max2, sum2), mask=rows < N)
    tl.store(out + 2 * N, linear, mask=rows < N)
    tl.store(out + 3 * N, tl.zeros_like(linear), mask=rows < N)


@triton.jit
def _relu(value):
    """max(value, 0) keeping NaN, as torch.relu does (tl.maximum may return the 0 on a GPU)."""
    return tl.where(value <= 0, 0.0, value)


@triton.jit
def _add_triples(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def _angular_margin(value, param_a, margin_cos, margin_sin):
    """NT-Xent's positives with an angular margin a (radians; a != 0 is TupletMarginLoss, on cosines v):
    (cos(acos(v) - a) = v cos a + sqrt(1 - v^2) sin a, its slope in v); a = 0 keeps v (any pair value) exactly, with
    slope 1; where 1 - v^2 <= 0 the sine term and its slope are 0 (csrc/epilogue.h's AngularMargin). A branch on
    the scalar a, so that NT-Xent (a = 0) pays no square root or division per pair."""
    margined = value
    slope = tl.zeros_like(value) + 1.0
    if param_a != 0:
        sine2 = (1 - value) * (1 + value)  # 1 - v is exact near v = 1
        inside = sine2 > 0
        sine = tl.sqrt(tl.where(inside, sine2, 1.0))
        margined = value * margin_cos + tl.where(inside, sine, 0.0) * margin_sin
        slope = margin_cos - tl.where(inside, value * margin_sin / sine, 0.0)
    return margined, slope


@triton.jit
def _ntxent_sums(value, positive, negatives_lse, param_a, param_b, margin_cos, margin_sin):
    """Per row, over the positives, with x = A - b v (v through _angular_margin): (sum of softplus(x), W = sum of
    sigmoid(x), how many have 1 + exp(x) > 1 in the statistics dtype, the pairs PML does not round to 0). One
    exponential per pair, e = exp(-|x|), serves all three: exp(x) = e where x < 0, and x >= 0 always counts. Pairs
    other than positives get x = -inf, as do the positives of a query without negatives (A = -inf): 0 in each sum."""
    margined, _ = _angular_margin(value, param_a, margin_cos, margin_sin)
    excess = tl.where(positive, negatives_lse[:, None] - param_b * margined, float("-inf"))
    e = tl.exp2(-tl.abs(excess) * LOG2E)
    one_plus = 1 + e
    above = excess >= 0  # NaN is not, and still reaches softplus through e
    # log(1 + e) to an ulp (libdevice.log1p has no interpreter fallback): the log of the rounded 1 + e plus its
    # rounding error e - (one_plus - 1), exact for e <= 1 (log(1 + r / u) = r / u to first order; r <= half an ulp,
    # so leaving out the 1 / u in [1/2, 1] costs at most r e).
    softplus = tl.where(above, excess, 0.0) + (tl.log(one_plus) + (e - (one_plus - 1)))
    sigmoid = tl.where(above, 1.0, e) / one_plus
    nonzero = above | (one_plus > 1)
    # one reduction of the three: three separate ones made ptxas spill at some tiles
    return tl.reduce((softplus, sigmoid, nonzero.to(value.dtype)), 1, _add_triples)


@triton.jit
def _contrastive_sums(value, positive, negative, param_a, param_b):
    """Per row: the sums of relu(a - v) over the positives and relu(v - b) over the negatives, and how many of each
    are nonzero."""
    below_margin = param_a - value
    above_margin = value - param_b
    return (tl.sum(tl.where(positive, _relu(below_margin), 0.0), axis=1),
            tl.sum(tl.where(negative, _relu(above_margin), 0.0), axis=1),
            tl.sum((positive & (below_margin > 0)).to(value.dtype), axis=1),
            tl.sum((negative & (above_margin > 0)).to(value.dtype), axis=1))


@triton.jit
def pair_sums_forward(x_ptr, y_ptr, x_norm_ptr, y_norm_ptr, x_labels_ptr, y_labels_ptr, lse_ptr, stats_ptr,
                      N, M, D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset, params_ptr, SPLIT,
                      N_BUCKET, M_BUCKET, ALIGNED,
                      KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      FULL_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, PAIR_VALUE: tl.constexpr,
                      NORMALIZE: tl.constexpr):
    """stats[split, 0..3, rows] of a kind whose statistics are sums over pairs, over the references of one split:
    the splits' partial sums add up to the statistics. Contrastive: all four. NT-Xent: its second sweep, from
    A = lse_ptr[rows] (merged over the splits), with stats[1] left 0 for the op to put A there (keeping A live past
    the loop to store it made ptxas spill on sm_80). lse_ptr is not read for Contrastive."""
    param_a, param_b = _load_params(params_ptr)
    split = tl.program_id(1)
    rows, dims, x_labels, x_inverse, x_radial, x_length2, x_tile = _query_block(
        x_ptr, x_norm_ptr, x_labels_ptr, N, D, stride_xn, stride_xd, BLOCK_M, BLOCK_D, FULL_D, ACC, NORMALIZE)
    if KIND == NTXENT:
        negatives_lse = tl.load(lse_ptr + rows, mask=rows < N, other=0.0)
        margin_cos, margin_sin = _load_angular_margin(params_ptr)
    sum0 = tl.zeros((BLOCK_M,), ACC)  # the split's stats[0..3]
    sum1 = tl.zeros((BLOCK_M,), ACC)
    sum2 = tl.zeros((BLOCK_M,), ACC)
    sum3 = tl.zeros((BLOCK_M,), ACC)
    start, stop = _column_range(split, M, SPLIT, BLOCK_N)
    for n0 in range(start, stop, BLOCK_N):
        value, positive, negative = _forward_tile(
            x_ptr, y_ptr, y_norm_ptr, y_labels_ptr, x_tile, x_labels, x_inverse, x_length2, rows, dims, n0, N, stop,
            D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset, BLOCK_M, BLOCK_N, BLOCK_D, FULL_D, ACC,
            PRECISION, PAIR_VALUE, NORMALIZE)
        if KIND == NTXENT:
            softplus, sigmoid, nonzero = _ntxent_sums(value, positive, negatives_lse, param_a, param_b, margin_cos,
                                                      margin_sin)
            sum0 += softplus
            sum2 += sigmoid
            sum3 += nonzero
        else:
            positive_sum, negative_sum, positive_nonzero, negative_nonzero = _contrastive_sums(
                value, positive, negative, param_a, param_b)
            sum0 += positive_sum
            sum1 += negative_sum
            sum2 += positive_nonzero
            sum3 += negative_nonzero
    out = stats_ptr + split.to(tl.int64) * STAT_ROWS * N + rows
    tl.store(out, sum0, mask=rows < N)
    tl.store(out + N, sum1, mask=rows < N)
    tl.store(out + 2 * N, sum2, mask=rows < N)
    tl.store(out + 3 * N, sum3, mask=rows < N)


@triton.jit
def _triplet_terms(z, smooth):
    """(loss, nonzero, slope) of triplets with violation z = v_an - v_ap + margin (-inf: no triplet): relu(z), or
    with `smooth` softplus(z) as torch computes it (z itself above 20): a constexpr in the forward, the scalar
    parameter in the backward's tile (a branch, so that the hinge pays no exponential); nonzero where exp(z) is not 0
    for the softplus (PML counts softplus > 0)."""
    if smooth != 0:
        e = tl.exp2(-tl.abs(z) * LOG2E)
        one_plus = 1 + e
        above = z >= 0
        linear = z > 20
        # log(1 + e) to an ulp, as _ntxent_sums forms it
        softplus = tl.where(above, z, 0.0) + (tl.log(one_plus) + (e - (one_plus - 1)))
        loss = tl.where(linear, z, softplus)
        slope = tl.where(linear, 1.0, tl.where(above, 1.0, e) / one_plus)
        nonzero = above | (e > 0)
    else:
        loss = _relu(z)
        nonzero = z > 0
        slope = nonzero.to(z.dtype)
    return loss, nonzero.to(z.dtype), slope


@triton.jit
def _table_column(table_ptr, rows, N, SLOTS, slot):
    """Column `slot` of the rows' positive table (-inf for rows past N)."""
    return tl.load(table_ptr + rows * SLOTS + slot, mask=rows < N, other=float("-inf"))


@triton.jit
def triplet_margin_positives(x_ptr, y_ptr, x_norm_ptr, y_norm_ptr, x_labels_ptr, y_labels_ptr, rank_ptr, table_ptr,
                             N, M, D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset, params_ptr, SLOTS,
                             SPLIT, N_BUCKET, M_BUCKET, ALIGNED,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             FULL_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                             PAIR_VALUE: tl.constexpr, NORMALIZE: tl.constexpr):
    """The triplet margin loss's first sweep: BLOCK_M anchors' rows of the positive table, table[a, rank[p]] =
    margin - v_ap (the table arrives filled with -inf: the anchor's own slot and the slots past its class's size stay
    so), for the references of split program_id(1) of SPLIT (their slots: disjoint). params: (margin, smooth_loss)."""
    margin, _ = _load_params(params_ptr)
    rows, dims, x_labels, x_inverse, x_radial, x_length2, x_tile = _query_block(
        x_ptr, x_norm_ptr, x_labels_ptr, N, D, stride_xn, stride_xd, BLOCK_M, BLOCK_D, FULL_D, ACC, NORMALIZE)
    start, stop = _column_range(tl.program_id(1), M, SPLIT, BLOCK_N)
    for n0 in range(start, stop, BLOCK_N):
        value, positive, negative = _forward_tile(
            x_ptr, y_ptr, y_norm_ptr, y_labels_ptr, x_tile, x_labels, x_inverse, x_length2, rows, dims, n0, N, stop,
            D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset, BLOCK_M, BLOCK_N, BLOCK_D, FULL_D, ACC,
            PRECISION, PAIR_VALUE, NORMALIZE)
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        rank = tl.load(rank_ptr + cols, mask=cols < stop, other=0)
        tl.store(table_ptr + rows[:, None] * SLOTS + rank[None, :], margin - value, mask=positive)


@triton.jit
def triplet_margin_forward(x_ptr, y_ptr, x_norm_ptr, y_norm_ptr, x_labels_ptr, y_labels_ptr, table_ptr,
                           weights_ptr, stats_ptr, N, M, D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset,
                           SLOTS, SPLIT, N_BUCKET, M_BUCKET, ALIGNED,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           FULL_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                           PAIR_VALUE: tl.constexpr, NORMALIZE: tl.constexpr, SMOOTH: tl.constexpr):
    """The triplet margin loss's second sweep, for BLOCK_M anchors against their rows of the positive table
    (triplet_margin_positives): for every negative n and slot r the violation z = v_an + table[a, r] goes into
    stats[0, a] (the sum of the triplet losses), stats[1, a] (how many are nonzero) and weights[a, r] (the sum of
    the slopes over the negatives: the positive's gradient), over the references of split program_id(1) of SPLIT:
    stats [SPLIT, 2, N] and weights [SPLIT, N, SLOTS] hold each split's partial sums, which the program owns."""
    split = tl.program_id(1)
    rows, dims, x_labels, x_inverse, x_radial, x_length2, x_tile = _query_block(
        x_ptr, x_norm_ptr, x_labels_ptr, N, D, stride_xn, stride_xd, BLOCK_M, BLOCK_D, FULL_D, ACC, NORMALIZE)
    loss = tl.zeros((BLOCK_M,), ACC)
    nonzero = tl.zeros((BLOCK_M,), ACC)
    weights_ptr += split.to(tl.int64) * N * SLOTS
    start, stop = _column_range(split, M, SPLIT, BLOCK_N)
    for n0 in range(start, stop, BLOCK_N):
        value, positive, negative = _forward_tile(
            x_ptr, y_ptr, y_norm_ptr, y_labels_ptr, x_tile, x_labels, x_inverse, x_length2, rows, dims, n0, N, stop,
            D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset, BLOCK_M, BLOCK_N, BLOCK_D, FULL_D, ACC,
            PRECISION, PAIR_VALUE, NORMALIZE)
        negative_value = tl.where(negative, value, float("-inf"))
        for slot in range(0, SLOTS):
            # one reduction of the three, as _ntxent_sums: three separate ones spilled
            terms, counted, slope = tl.reduce(
                _triplet_terms(negative_value + _table_column(table_ptr, rows, N, SLOTS, slot)[:, None], SMOOTH), 1,
                _add_triples)
            loss += terms
            nonzero += counted
            at = weights_ptr + rows * SLOTS + slot
            tl.store(at, tl.load(at, mask=rows < N, other=0.0) + slope, mask=rows < N)
    out = stats_ptr + split.to(tl.int64) * 2 * N + rows
    tl.store(out, loss, mask=rows < N)
    tl.store(out + N, nonzero, mask=rows < N)


@triton.jit
def _triplet_margin_gradient(value, positive, negative, rows, cols, N, M, grad, smooth, table_ptr, weights_ptr,
                             rank_ptr, SLOTS):
    """dL/dv of the triplet margin loss's pairs, L = sum_a g_a stats[0, a]: -g_a weights[a, rank[p]] for a positive
    p, g_a times the sum over the anchor's slots of the triplet's slope for a negative."""
    rank = tl.load(rank_ptr + cols, mask=cols < M, other=0)
    partners = tl.load(weights_ptr + rows[:, None] * SLOTS + rank[None, :], mask=positive, other=0.0)
    negative_value = tl.where(negative, value, float("-inf"))
    slopes = tl.zeros_like(value)
    for slot in range(0, SLOTS):
        _, _, slope = _triplet_terms(negative_value + _table_column(table_ptr, rows, N, SLOTS, slot)[:, None],
                                     smooth)
        slopes += slope
    return tl.where(positive, -grad[:, None] * partners, tl.where(negative, grad[:, None] * slopes, 0.0))


@triton.jit
def _load_row_state(grad_ptr, stats_ptr, x_labels_ptr, rows, N, KIND: tl.constexpr):
    """(labels, g1, g2, g3, stats[0], stats[1]) of the rows, g the upstream gradients of stats[0..2] (the counts in
    stats[3] have none). NT-Xent's g2 is that of A, G_A = g2 + g1 W (stats[0] depends on A through each positive's
    softplus, whose derivative sums to W), so that a tile needs no W."""
    ok = rows < N
    grad1 = tl.load(grad_ptr + rows, mask=ok, other=0.0)
    grad2 = tl.load(grad_ptr + N + rows, mask=ok, other=0.0)
    if KIND == NTXENT:
        grad2 += grad1 * tl.load(stats_ptr + 2 * N + rows, mask=ok, other=0.0)
    return (tl.load(x_labels_ptr + rows, mask=ok, other=0), grad1, grad2,
            tl.load(grad_ptr + 2 * N + rows, mask=ok, other=0.0),
            tl.load(stats_ptr + rows, mask=ok, other=0.0), tl.load(stats_ptr + N + rows, mask=ok, other=0.0))


@triton.jit
def _ntxent_gradient(s, positive, negative, grad1, grad_lse, lse, param_a, param_b, margin_cos, margin_sin):
    """dL/dv of NT-Xent's pairs, L = sum_i g1_i stats[0]_i + G_A_i A_i: -b g1 sigmoid(x) v' for a positive
    (x = A - b v, v and its slope v' through _angular_margin), b G_A exp(b v - A) for a negative (its softmax weight
    in A). One exponential per pair: exp(-|x|) for a positive, exp(-x) <= 1 for a negative."""
    margined, slope = _angular_margin(s, param_a, margin_cos, margin_sin)
    excess = lse[:, None] - param_b * tl.where(positive, margined, s)
    exponent = tl.where(positive, -tl.abs(excess), -excess)
    e = tl.exp2(tl.where(positive | negative, exponent, float("-inf")) * LOG2E)
    sigmoid = tl.where(excess >= 0, 1.0, e) / (1 + e)
    return tl.where(positive, -param_b * grad1[:, None] * sigmoid * slope,
                    tl.where(negative, param_b * grad_lse[:, None] * e, 0.0))


@triton.jit
def _gradient_tile(s, x_labels, y_labels, rows, cols, grad1, grad2, grad3, lse1, lse2, N, M, self_offset,
                   param_a, param_b, margin_cos, margin_sin, table_ptr, weights_ptr, rank_ptr, SLOTS,
                   KIND: tl.constexpr):
    """G = dL/dS of a tile, L = sum_i g1_i stats[0]_i + g2_i stats[1]_i + g3_i stats[2]_i, from the saved
    statistics (lse1, lse2: stats[0], stats[1]). The log-sum-exp kinds: one exponential per pair
    (softmax_ij = exp(z_ij - lse_i) of the pair's own set); NT-Xent: _ntxent_gradient, with g2 = G_A
    (_load_row_state); Contrastive: -g1 where a positive's relu(a - v) is active, g2 where a negative's
    relu(v - b) is; the triplet margin loss: _triplet_margin_gradient (b: smooth_loss)."""
    positive, negative = _pair_masks(x_labels, y_labels, rows, cols, N, M, self_offset)
    if KIND == TRIPLET_MARGIN:
        gradient = _triplet_margin_gradient(s, positive, negative, rows, cols, N, M, grad1, param_b, table_ptr,
                                            weights_ptr, rank_ptr, SLOTS)
    elif KIND == NTXENT:
        gradient = _ntxent_gradient(s, positive, negative, grad1, grad2, lse2, param_a, param_b, margin_cos,
                                    margin_sin)
    elif KIND == CONTRASTIVE:
        gradient = tl.where(positive & (param_a - s > 0), -grad1[:, None],
                            tl.where(negative & (s - param_b > 0), grad2[:, None], 0.0))
    else:
        z, dz, first = _logits(s, positive, negative, param_a, param_b, KIND)
        lse = tl.where(first, lse1[:, None], lse2[:, None])
        # Masking the exponent keeps the -inf of an empty set (and the inf * 0 it would make) out of the arithmetic.
        softmax = tl.exp2(tl.where(z == float("-inf"), float("-inf"), (z - _finite_or_zero(lse)) * LOG2E))
        gradient = tl.where(first, grad1[:, None], grad2[:, None]) * softmax * dz
        if KIND == SUPCON:
            gradient += tl.where(positive, grad3[:, None], 0.0)
    return gradient


@triton.jit
def _radial_part(c, inverse):
    """The coefficient of a row's own direction in its gradient, c r^2 (c from _radial_terms)."""
    return c * inverse * inverse


@triton.jit
def _add_transposed_product(p, x_tile, cols, limit, columns, dims, out_ptr, D, ACC: tl.constexpr,
                            PRECISION: tl.constexpr):
    """Adds a tile's part of the references' gradient, P^T X for the rows' D block, into the rows `columns` of out_ptr
    ([*, D]) for the tile's columns cols < limit, relaxed atomics: the pair losses' dY (WITH_DY; columns = cols) and
    the classifiers' dW (WITH_DW; columns = cols K + k) alike. The callers add their columns' statistics after it:
    computed before the product, they changed ptxas's register choice (fp32 variants at 128 registers, spilling)."""
    product = tl.dot(tl.trans(p), x_tile, input_precision=PRECISION, out_dtype=ACC)
    tl.atomic_add(out_ptr + columns[:, None] * D + dims[None, :], product,
                  mask=(cols[:, None] < limit) & (dims[None, :] < D), sem="relaxed")


@triton.jit
def lse_rows_backward_rows(grad_ptr, stats_ptr, scale_ptr, x_ptr, y_ptr, x_norm_ptr, y_norm_ptr, x_labels_ptr,
                           y_labels_ptr, dx_ptr, dx_t_ptr, dy_ptr, dy_t_ptr, table_ptr, weights_ptr, rank_ptr,
                           N, M, D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset, params_ptr, SLOTS, SPLIT,
                           N_BUCKET, M_BUCKET, ALIGNED,
                           KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           FULL_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                           PAIR_VALUE: tl.constexpr, NORMALIZE: tl.constexpr,
                           WITH_DY: tl.constexpr, ATOMIC_DX: tl.constexpr):
    """The row pass: dX of BLOCK_M rows (on chip) for the D columns of program_id(2) and the references of split
    program_id(1); with WITH_DY also P^T X into dY and the column statistics, added atomically (fp32/fp64 buffers).

    ATOMIC_DX: dX and the row statistic t are added into accumulators (several splits, or dX and dY being one
    buffer), finished by finish_gradient. Otherwise the program writes dX itself, radial part included, in the type of
    dx_ptr (the rows' dtype, or an fp32 partial that the column pass completes)."""
    param_a, param_b = _load_params(params_ptr)
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    margin_cos, margin_sin = _load_angular_margin(params_ptr)
    dims = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    operand = x_ptr.dtype.element_ty
    scale = tl.load(scale_ptr)
    first_dims = tl.program_id(2) == 0  # the statistics t are added once, not once per D block
    x_labels, grad1, grad2, grad3, lse1, lse2 = _load_row_state(grad_ptr, stats_ptr, x_labels_ptr, rows, N, KIND)
    x_inverse, x_radial, x_length2 = _row_scales(x_norm_ptr, rows, N, NORMALIZE)
    x_tile = _load_rows(x_ptr, rows, dims, N, D, stride_xn, stride_xd)
    dx = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    t_rows = tl.zeros((BLOCK_M,), ACC)
    start, stop = _column_range(split, M, SPLIT, BLOCK_N)
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        y_labels = tl.load(y_labels_ptr + cols, mask=cols < stop, other=0)
        y_inverse, y_radial, y_length2 = _row_scales(y_norm_ptr, cols, stop, NORMALIZE)
        y_tile = _load_rows(y_ptr, cols, dims, stop, D, stride_yn, stride_yd)
        dot = _dot_tile(x_ptr, y_ptr, x_tile, y_tile, rows, cols, N, stop, D, stride_xn, stride_xd, stride_yn,
                        stride_yd, BLOCK_M, BLOCK_N, BLOCK_D, FULL_D, ACC, PRECISION)
        s = dot * x_inverse[:, None] * y_inverse[None, :]
        value = _pair_value(s, x_length2, y_length2, PAIR_VALUE)
        gradient = _gradient_tile(value, x_labels, y_labels, rows, cols, grad1, grad2, grad3, lse1, lse2, N, stop,
                                  self_offset, param_a, param_b, margin_cos, margin_sin, table_ptr, weights_ptr,
                                  rank_ptr, SLOTS, KIND)
        by_s, by_q = _pair_gradient(gradient, value, PAIR_VALUE)
        t_rows += _radial_terms(by_s, by_q, s, x_radial, 1)
        p = (by_s * (x_inverse[:, None] * scale) * y_inverse[None, :]).to(operand)
        dx = tl.dot(p, y_tile, dx, input_precision=PRECISION, out_dtype=ACC)
        if WITH_DY:
            _add_transposed_product(p, x_tile, cols, stop, cols, dims, dy_ptr, D, ACC, PRECISION)
            tl.atomic_add(dy_t_ptr + cols, _radial_terms(by_s, by_q, s, y_radial, 0), mask=(cols < stop) & first_dims,
                          sem="relaxed")
    out_mask = (rows[:, None] < N) & (dims[None, :] < D)
    if ATOMIC_DX:
        tl.atomic_add(dx_ptr + rows[:, None] * D + dims[None, :], dx, mask=out_mask, sem="relaxed")
        tl.atomic_add(dx_t_ptr + rows, t_rows, mask=(rows < N) & first_dims, sem="relaxed")
    else:
        dx = dx / scale - _radial_part(t_rows, x_inverse)[:, None] * x_tile.to(ACC)
        tl.store(dx_ptr + rows[:, None] * D + dims[None, :], dx.to(dx_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def lse_rows_backward_columns(grad_ptr, stats_ptr, scale_ptr, x_ptr, y_ptr, x_norm_ptr, y_norm_ptr, x_labels_ptr,
                              y_labels_ptr, partial_ptr, dy_ptr, table_ptr, weights_ptr, rank_ptr,
                              N, M, D, stride_xn, stride_xd, stride_yn, stride_yd, self_offset, params_ptr, SLOTS,
                              N_BUCKET, M_BUCKET, ALIGNED,
                              KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr, FULL_D: tl.constexpr, ACC: tl.constexpr,
                              PRECISION: tl.constexpr, PAIR_VALUE: tl.constexpr, NORMALIZE: tl.constexpr,
                              ACCUMULATE: tl.constexpr):
    """The column pass (deterministic): dY of BLOCK_N references for the D columns of program_id(1), summing the row
    blocks in a fixed order, radial part included. ACCUMULATE adds the fp32 partial the row pass wrote for the same
    rows (the references are the queries) and writes the whole gradient."""
    param_a, param_b = _load_params(params_ptr)
    margin_cos, margin_sin = _load_angular_margin(params_ptr)
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    operand = y_ptr.dtype.element_ty
    scale = tl.load(scale_ptr)
    y_labels = tl.load(y_labels_ptr + cols, mask=cols < M, other=0)
    y_inverse, y_radial, y_length2 = _row_scales(y_norm_ptr, cols, M, NORMALIZE)
    y_tile = _load_rows(y_ptr, cols, dims, M, D, stride_yn, stride_yd)
    dy = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    t_columns = tl.zeros((BLOCK_N,), ACC)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        x_labels, grad1, grad2, grad3, lse1, lse2 = _load_row_state(grad_ptr, stats_ptr, x_labels_ptr, rows, N, KIND)
        x_inverse, x_radial, x_length2 = _row_scales(x_norm_ptr, rows, N, NORMALIZE)
        x_tile = _load_rows(x_ptr, rows, dims, N, D, stride_xn, stride_xd)
        dot = _dot_tile(x_ptr, y_ptr, x_tile, y_tile, rows, cols, N, M, D, stride_xn, stride_xd, stride_yn,
                        stride_yd, BLOCK_M, BLOCK_N, BLOCK_D, FULL_D, ACC, PRECISION)
        s = dot * x_inverse[:, None] * y_inverse[None, :]
        value = _pair_value(s, x_length2, y_length2, PAIR_VALUE)
        gradient = _gradient_tile(value, x_labels, y_labels, rows, cols, grad1, grad2, grad3, lse1, lse2, N, M,
                                  self_offset, param_a, param_b, margin_cos, margin_sin, table_ptr, weights_ptr,
                                  rank_ptr, SLOTS, KIND)
        by_s, by_q = _pair_gradient(gradient, value, PAIR_VALUE)
        t_columns += _radial_terms(by_s, by_q, s, y_radial, 0)
        p = (by_s * (x_inverse[:, None] * scale) * y_inverse[None, :]).to(operand)
        dy = tl.dot(tl.trans(p), x_tile, dy, input_precision=PRECISION, out_dtype=ACC)
    out_mask = (cols[:, None] < M) & (dims[None, :] < D)
    dy = dy / scale - _radial_part(t_columns, y_inverse)[:, None] * y_tile.to(ACC)
    if ACCUMULATE:  # each (column block, D block) belongs to this program alone: no race
        dy += tl.load(partial_ptr + cols[:, None] * D + dims[None, :], mask=out_mask, other=0.0)
    tl.store(dy_ptr + cols[:, None] * D + dims[None, :], dy.to(dy_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def finish_gradient(acc_ptr, t_ptr, scale_ptr, x_ptr, x_norm_ptr, out_ptr, N, D, stride_xn, stride_xd, stride_on,
                    stride_od, SPLITS, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                    NORMALIZE: tl.constexpr):
    """out = acc / scale - c r^2 x, in out_ptr's dtype: the end of the atomic backward, whose accumulators hold
    sum P Y (scaled) and the coefficient c (_radial_terms). SPLITS partial accumulators ([SPLITS, N, D] and
    [SPLITS, N], contiguous) are added in split order first. The output's strides are its own: the margin-softmax
    ops finish dW (D x J) from accumulators of W's columns as rows."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (dims[None, :] < D)
    scale = tl.load(scale_ptr)
    inverse, _, _ = _row_scales(x_norm_ptr, rows, N, NORMALIZE)
    t = tl.zeros((BLOCK_R,), ACC)
    acc = tl.zeros((BLOCK_R, BLOCK_D), ACC)
    at = rows  # of the split's rows: 64-bit
    for _ in range(SPLITS):
        t += tl.load(t_ptr + at, mask=rows < N, other=0.0)
        acc += tl.load(acc_ptr + at[:, None] * D + dims[None, :], mask=mask, other=0.0)
        at += N
    x = _load_rows(x_ptr, rows, dims, N, D, stride_xn, stride_xd).to(ACC)
    out = acc / scale - _radial_part(t, inverse)[:, None] * x
    tl.store(out_ptr + rows[:, None] * stride_on + dims[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def row_norms(x_ptr, out_ptr, N, D, stride_xn, stride_xd, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
              ACC: tl.constexpr):
    """||x_i|| in ACC (not clamped: the kernels clamp, and need to know where they did). The D indices are 64-bit:
    the margin-softmax ops take the column norms of W (D x J) through its transpose, whose stride_xd is J."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    total = tl.zeros((BLOCK_R,), ACC)
    for d0 in range(0, D, BLOCK_D):
        dims = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        x = _load_rows(x_ptr, rows, dims, N, D, stride_xn, stride_xd).to(ACC)
        total += tl.sum(x * x, axis=1)
    tl.store(out_ptr + rows, tl.sqrt(total), mask=rows < N)
