"""Triton kernels of the margin-softmax classifiers (ArcFace, CosFace, SubCenterArcFace, NormalizedSoftmax,
SphereFace, LargeMarginSoftmax): per query row x_i, over the classes c of W (D x J, J = C K columns, column
j = class j // K, K sub-centres)

    cos_ij = (x_i . w_j) r_i r_j,   r = 1 / max(||.||, eps),   cos_ic = max over the class's K columns of cos_ij
    lse_i = logsumexp over c != label_i of scale * cos_ic          (-inf for C == 1)
    target_i = cos_i,label_i

as csrc/cpu/margin_softmax.cpp computes them, with the engine's tiles and helpers (_lse_kernels.py): the raw rows and
W in their own dtype, fp32 (fp64 for fp64 rows) norms, one tl.dot over the whole of D per (row block, class tile,
sub-centre) (D walked in chunks only above the widest tile), never an N x C buffer and never a copy of W.

W is read in place through its strides: sub-centre k of the classes is the matrix W_k[c, d] = W[d, c K + k], loaded
as the engine loads reference rows, [BLOCK_N classes, BLOCK_D] tiles with row stride stride_wc = K stride_wj (1 for a
contiguous W with one sub-centre: the launch specialises it, and the compiler loads vectors of classes) and column
stride stride_wd (J; a 64-bit integer here, as D J passes 2^31 for a million classes). A mask along the classes
would keep those vector loads (and the asynchronous copies that pipeline them) from forming, so the class loops walk
the whole tiles unmasked and the last, partial one apart (EVEN). A class's cosine is the largest of its
sub-centres' (the first of equal ones; NaN wins, so that it reaches the loss), and its gradient lands on that one
column.

The backward recomputes each tile's cosines and takes dS_c = dL/dcos_c (g_target for the label, g_lse scale
softmax_c for the others), then P = dS r_i r_j at each class's chosen column (times a power of two, `power`, that
keeps fp16 operands in range: margin_softmax_ops._gradient_power), dX = P W_k^T and dW_k^T = P^T X per
sub-centre, minus the normalisation's radial part:

    dx_i = r_i sum_j dS_ij r_j w_j - r_i^2 (sum_c dS_ic cos_ic) x_i     (the second term only where ||x_i|| > eps)

and the same for each column w_j with the roles swapped. normalize_x / normalize_w 0 leave the rows / W's columns
raw (SphereFace: rows; LargeMarginSoftmax: both): r = 1 there and no radial part, so that "cos" is the product with
the other side's unit vectors. The row pass writes dX from one program per row block (or
one fp32 partial per class split); by default it also adds dW from the same tiles through relaxed atomics, and
deterministically a column pass writes dW from one program per class tile, summing the row blocks in order.

BLOCK_N is the class tile (the engine's reference tile, so that its autotune configs and pruning apply).
"""
import triton
import triton.language as tl

from ._lse_kernels import (LN2, LOG2E, _add_transposed_product, _column_range, _dot_tile, _finite_or_zero,
                           _fold_tile, _load_params, _load_rows, _radial_part, _row_scales)

# Which sides are normalised, as run-time integers (1 or 0; a constant 1 would make a second specialisation of each
# kernel, which the compile proof would have to cover too): rows and columns left raw have r = 1 and no radial part.
RUNTIME_FLAGS = ["normalize_x", "normalize_w"]


@triton.jit
def _scales(norm_ptr, rows, n, normalize):
    """_row_scales of normalised rows (columns) where `normalize` is nonzero; r = 1 and no radial part where not."""
    inverse, radial, length2 = _row_scales(norm_ptr, rows, n, True)
    return tl.where(normalize != 0, inverse, 1.0), radial & (normalize != 0), length2


@triton.jit
def _sub_centre(x_ptr, w_ptr, w_norm_ptr, normalize_w, x_tile, x_inverse, rows, cols, dims, k, N, C, D,
                stride_xn, stride_xd, stride_wd, stride_wj, stride_wc,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FULL_D: tl.constexpr,
                ACC: tl.constexpr, PRECISION: tl.constexpr, LOAD_TILE: tl.constexpr, EVEN: tl.constexpr):
    """(cosines, W_k tile, inverse norms) of sub-centre k of the classes `cols` (those below C; EVEN: all of them)
    against the rows: the W_k tile at `dims` when LOAD_TILE (the forward loads it only when it holds the whole of D),
    and the columns' r. w_norm_ptr holds the column norms sub-centre by sub-centre ([K, C])."""
    w_k = w_ptr + k * stride_wj
    w_inverse = _scales(w_norm_ptr + k * C, cols, C, normalize_w)[0]
    w_tile = _load_rows(w_k, cols, dims, C, D, stride_wc, stride_wd, EVEN) if LOAD_TILE else x_tile
    dot = _dot_tile(x_ptr, w_k, x_tile, w_tile, rows, cols, N, C, D, stride_xn, stride_xd, stride_wc, stride_wd,
                    BLOCK_M, BLOCK_N, BLOCK_D, FULL_D, ACC, PRECISION, EVEN)
    return dot * x_inverse[:, None] * w_inverse[None, :], w_tile, w_inverse


@triton.jit
def _class_cosines(x_ptr, w_ptr, w_norm_ptr, normalize_w, pool_scale, x_tile, x_inverse, rows, cols, dims, N, C, D,
                   K, stride_xn, stride_xd, stride_wd, stride_wj, stride_wc,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FULL_D: tl.constexpr,
                   ACC: tl.constexpr, PRECISION: tl.constexpr, WITH_PICK: tl.constexpr, EVEN: tl.constexpr,
                   POOL: tl.constexpr):
    """(cos, pick, top, total) of a class tile with K > 1 sub-centres: the largest sub-centre cosine and, WITH_PICK,
    which k gave it (the first of equal ones; NaN wins, as in the cpu kernel), else 0; or, POOL (SoftTriple), their
    mean weighted by softmax(pool_scale * cos), folded online: top the largest cosine and total the softmax's
    denominator, sum_k exp(pool_scale (cos_k - top)), which _pooled_weight needs. POOL is a constexpr (MULTI == 2):
    the pool's registers, as a run-time branch, made the largest-sub-centre kernels spill (the compile proof)."""
    best = tl.full((BLOCK_M, BLOCK_N), float("-inf"), ACC)
    pick = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    total = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    weighted = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for k in range(K):
        cosine = _sub_centre(x_ptr, w_ptr, w_norm_ptr, normalize_w, x_tile, x_inverse, rows, cols, dims, k, N, C, D,
                             stride_xn, stride_xd, stride_wd, stride_wj, stride_wc, BLOCK_M, BLOCK_N, BLOCK_D, FULL_D,
                             ACC, PRECISION, FULL_D, EVEN)[0]
        if POOL:
            top = tl.maximum(best, cosine)
            rescale = tl.exp2((best - top) * (pool_scale * LOG2E))
            term = tl.exp2((cosine - top) * (pool_scale * LOG2E))  # NaN for a NaN cosine: the pool is NaN
            total = total * rescale + term
            weighted = weighted * rescale + term * cosine
            best = top
        else:
            better = (cosine > best) | (cosine != cosine)
            best = tl.where(better, cosine, best)
            if WITH_PICK:
                pick = tl.where(better, k, pick)
    pooled = best
    if POOL:
        pooled = weighted / total
    return pooled, pick, best, total


@triton.jit
def _pooled_weight(value, pooled, top, total, pool_scale):
    """d pooled / d cos_k of a softmax pool (_class_cosines): p_k (1 + pool_scale (cos_k - pooled))."""
    return tl.exp2((value - top) * (pool_scale * LOG2E)) / total * (1 + pool_scale * (value - pooled))


@triton.jit
def _even_stop(start, stop, BLOCK_N: tl.constexpr):
    """The end of the whole BLOCK_N tiles of [start, stop) (start itself when it has none)."""
    return start + tl.maximum(stop - start, 0) // BLOCK_N * BLOCK_N


@triton.jit
def _load_row_gradient(grad_ptr, stats_ptr, labels_ptr, rows, N):
    """(labels, g_lse, g_target, lse) of the rows: the upstream gradients of both statistics and the saved
    log-sum-exp (rows past N: label -1, gradients 0)."""
    ok = rows < N
    return (tl.load(labels_ptr + rows, mask=ok, other=-1), tl.load(grad_ptr + rows, mask=ok, other=0.0),
            tl.load(grad_ptr + N + rows, mask=ok, other=0.0), tl.load(stats_ptr + rows, mask=ok, other=0.0))


@triton.jit
def _class_gradient(cosine, cols, labels, g_lse, g_target, lse, scale, C):
    """dS = dL/dcos of each (row, class) of a tile, L = g_lse lse + g_target target: g_target at the label,
    g_lse scale softmax_c = g_lse scale exp(scale cos_c - lse) at the other classes below C, 0 past C. The exponent
    is masked, so that an lse of -inf (no other class) never meets an inf."""
    target = cols[None, :] == labels[:, None]
    other = (cols[None, :] < C) & ~target
    softmax = tl.exp2(tl.where(other, (scale * cosine - _finite_or_zero(lse)[:, None]) * LOG2E, float("-inf")))
    return tl.where(target, g_target[:, None], (g_lse * scale)[:, None] * softmax)


@triton.jit
def _backward_scalars(params_ptr, power_ptr, stride_wd):
    """(scale, pool_scale, the power of two P is multiplied by, W's row stride as a 64-bit integer) of a backward
    program."""
    scale, pool_scale = _load_params(params_ptr)
    return scale, pool_scale, tl.load(power_ptr), tl.cast(stride_wd, tl.int64)


@triton.jit
def _product_operand(ds, row_factor, w_inverse, operand: tl.constexpr):
    """P = dS r_i power r_j in the operand dtype of the products (row_factor = r_i power)."""
    return (ds * row_factor[:, None] * w_inverse[None, :]).to(operand)


@triton.jit
def _forward_step(running_max, running_sum, target, c0, scale, labels, x_ptr, w_ptr, w_norm_ptr, normalize_w,
                  pool_scale, x_tile, x_inverse, rows, dims, N, C, D, K, stride_xn, stride_xd, stride_wd, stride_wj,
                  stride_wc,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FULL_D: tl.constexpr,
                  ACC: tl.constexpr, PRECISION: tl.constexpr, MULTI: tl.constexpr, EVEN: tl.constexpr):
    """The class tile at c0 folded into the rows' log-sum-exp state (the classes other than the label) and the
    label's cosine added to `target` where the tile holds it."""
    cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
    if MULTI:
        cosine = _class_cosines(x_ptr, w_ptr, w_norm_ptr, normalize_w, pool_scale, x_tile, x_inverse, rows, cols, dims,
                                N, C, D, K, stride_xn, stride_xd, stride_wd, stride_wj, stride_wc, BLOCK_M, BLOCK_N,
                                BLOCK_D, FULL_D, ACC, PRECISION, False, EVEN, MULTI == 2)[0]
    else:
        cosine = _sub_centre(x_ptr, w_ptr, w_norm_ptr, normalize_w, x_tile, x_inverse, rows, cols, dims, 0, N, C, D,
                             stride_xn, stride_xd, stride_wd, stride_wj, stride_wc, BLOCK_M, BLOCK_N, BLOCK_D, FULL_D,
                             ACC, PRECISION, FULL_D, EVEN)[0]
    is_target = cols[None, :] == labels[:, None]
    target += tl.sum(tl.where(is_target, cosine, 0.0), axis=1)
    logits = tl.where((cols[None, :] < C) & ~is_target, scale * cosine, float("-inf"))
    # one set: _fold_tile leaves its first state (here the same one) as it is
    folded = _fold_tile(running_max, running_sum, running_max, running_sum, logits, is_target, False)
    return folded[2], folded[3], target


@triton.jit(do_not_specialize=RUNTIME_FLAGS)
def margin_softmax_forward(x_ptr, w_ptr, x_norm_ptr, w_norm_ptr, normalize_x, normalize_w, labels_ptr, params_ptr,
                           lse_ptr, target_ptr,
                           N, C, D, K, stride_xn, stride_xd, stride_wd, stride_wj, stride_wc, SPLIT,
                           N_BUCKET, M_BUCKET, ALIGNED,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           FULL_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, MULTI: tl.constexpr):
    """Over the class tiles of split program_id(1) (SPLIT = 1: all of them): lse_ptr[split, rows] = the log-sum-exp of
    scale * cos over the classes other than the label (-inf where the split has none; NaN is kept), and
    target_ptr[rows] = the label's cosine, stored by the split that holds the label. MULTI: K > 1 (1: a class's
    largest sub-centre; 2: their softmax pool, SoftTriple; with K == 1 the class tile loop is the innermost, which
    the compiler pipelines). N_BUCKET, M_BUCKET and ALIGNED are the autotuner's key only."""
    scale, pool_scale = _load_params(params_ptr)
    stride_wd = tl.cast(stride_wd, tl.int64)
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    labels = tl.load(labels_ptr + rows, mask=rows < N, other=-1)
    x_inverse = _scales(x_norm_ptr, rows, N, normalize_x)[0]
    x_tile = _load_rows(x_ptr, rows, dims, N, D, stride_xn, stride_xd) if FULL_D else tl.zeros((1, 1), ACC)
    running_max = tl.full((BLOCK_M,), float("-inf"), ACC)
    running_sum = tl.zeros((BLOCK_M,), ACC)
    target = tl.zeros((BLOCK_M,), ACC)
    start, stop = _column_range(split, C, SPLIT, BLOCK_N)
    even_stop = _even_stop(start, stop, BLOCK_N)
    for c0 in range(start, even_stop, BLOCK_N):
        running_max, running_sum, target = _forward_step(running_max, running_sum, target, c0, scale, labels, x_ptr,
                                                         w_ptr, w_norm_ptr, normalize_w, pool_scale, x_tile, x_inverse,
                                                         rows, dims, N, C, D, K, stride_xn, stride_xd, stride_wd,
                                                         stride_wj, stride_wc, BLOCK_M, BLOCK_N, BLOCK_D, FULL_D, ACC,
                                                         PRECISION, MULTI, True)
    for c0 in range(even_stop, stop, BLOCK_N):  # the partial tile, if any (a loop: an `if` here made the compiler
        # load the dot's row operand once for both, and keep it in registers across the first loop)
        running_max, running_sum, target = _forward_step(running_max, running_sum, target, c0, scale, labels, x_ptr,
                                                         w_ptr, w_norm_ptr, normalize_w, pool_scale, x_tile, x_inverse,
                                                         rows, dims, N, C, D, K, stride_xn, stride_xd, stride_wd,
                                                         stride_wj, stride_wc, BLOCK_M, BLOCK_N, BLOCK_D, FULL_D, ACC,
                                                         PRECISION, MULTI, False)
    # A NaN logit makes the sum NaN for good; the engine's _finish_logsumexp would turn that into -inf.
    lse = tl.where(running_sum == 0, float("-inf"),
                   (running_max + tl.log2(tl.where(running_sum == 0, 1.0, running_sum))) * LN2)
    tl.store(lse_ptr + split.to(tl.int64) * N + rows, lse, mask=rows < N)
    tl.store(target_ptr + rows, target, mask=(rows < N) & (labels >= start) & (labels < stop))


@triton.jit
def _add_column_terms(terms, w_radial, cols, C, columns, dw_t_ptr, first_dims):
    """Adds the tile's columns' t_j = sum_i dS cos (the column sums of `terms`, where the normalisation is radial)
    into dw_t_ptr ([J]) at `columns`, once per D block, relaxed atomics."""
    tl.atomic_add(dw_t_ptr + columns, tl.where(w_radial, tl.sum(terms, axis=0), 0.0), mask=(cols < C) & first_dims,
                  sem="relaxed")


@triton.jit
def _rows_step(dx, t_rows, c0, scale, labels, g_lse, g_target, lse, row_factor, x_radial, x_ptr, w_ptr, w_norm_ptr,
               normalize_w, pool_scale, x_tile, x_inverse, rows, dims, dw_ptr, dw_t_ptr, first_dims, N, C, D, K,
               stride_xn, stride_xd, stride_wd, stride_wj, stride_wc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, FULL_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
               MULTI: tl.constexpr, WITH_DW: tl.constexpr, EVEN: tl.constexpr):
    """The class tile at c0's part of the rows' dX block (dX += P W_k per sub-centre) and of t_i = sum_c dS cos;
    WITH_DW also its part of dW, from the same P (_add_transposed_product). FULL_D: the cosines from x_tile. A
    softmax pool (MULTI == 2) spreads each class's dS over its sub-centres by _pooled_weight, recomputing each
    sub-centre's cosines (one more product per sub-centre), and t_i sums g v over them."""
    cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
    operand = x_ptr.dtype.element_ty
    if MULTI:
        cosine, pick, top, total = _class_cosines(x_ptr, w_ptr, w_norm_ptr, normalize_w, pool_scale, x_tile,
                                                  x_inverse, rows, cols, dims, N, C, D, K, stride_xn, stride_xd,
                                                  stride_wd, stride_wj, stride_wc, BLOCK_M, BLOCK_N, BLOCK_D, FULL_D,
                                                  ACC, PRECISION, True, EVEN, MULTI == 2)
        ds = _class_gradient(cosine, cols, labels, g_lse, g_target, lse, scale, C)
        pooled_terms = tl.zeros((BLOCK_M,), ACC)
        for k in range(K):  # each class's dS to its chosen column(s): one product per sub-centre
            inverse_k, radial_k, _ = _scales(w_norm_ptr + k * C, cols, C, normalize_w)
            tile_k = _load_rows(w_ptr + k * stride_wj, cols, dims, C, D, stride_wc, stride_wd, EVEN)
            if MULTI == 2:
                value = _sub_centre(x_ptr, w_ptr, w_norm_ptr, normalize_w, x_tile, x_inverse, rows, cols, dims, k, N,
                                    C, D, stride_xn, stride_xd, stride_wd, stride_wj, stride_wc, BLOCK_M, BLOCK_N,
                                    BLOCK_D, FULL_D, ACC, PRECISION, FULL_D, EVEN)[0]
                gradient = ds * _pooled_weight(value, cosine, top, total, pool_scale)
                terms = gradient * value
                pooled_terms += tl.sum(tl.where(x_radial[:, None], terms, 0.0), axis=1)
            else:  # not 0 * cos where not chosen: a NaN of another sub-centre stays out
                chosen = pick == k
                gradient = tl.where(chosen, ds, 0.0)
                terms = tl.where(chosen, ds * cosine, 0.0)
            p = _product_operand(gradient, row_factor, inverse_k, operand)
            dx = tl.dot(p, tile_k, dx, input_precision=PRECISION, out_dtype=ACC)
            if WITH_DW:
                _add_transposed_product(p, x_tile, cols, C, cols * K + k, dims, dw_ptr, D, ACC, PRECISION)
                _add_column_terms(terms, radial_k, cols, C, cols * K + k, dw_t_ptr, first_dims)
        if MULTI == 2:
            row_terms = pooled_terms
        else:
            row_terms = tl.sum(tl.where(x_radial[:, None], ds * cosine, 0.0), axis=1)
    else:
        cosine, w_tile, w_inverse = _sub_centre(x_ptr, w_ptr, w_norm_ptr, normalize_w, x_tile, x_inverse, rows, cols,
                                                dims, 0, N, C, D, stride_xn, stride_xd, stride_wd, stride_wj, stride_wc,
                                                BLOCK_M, BLOCK_N, BLOCK_D, FULL_D, ACC, PRECISION, True, EVEN)
        ds = _class_gradient(cosine, cols, labels, g_lse, g_target, lse, scale, C)
        p = _product_operand(ds, row_factor, w_inverse, operand)
        dx = tl.dot(p, w_tile, dx, input_precision=PRECISION, out_dtype=ACC)
        if WITH_DW:
            w_radial = _scales(w_norm_ptr, cols, C, normalize_w)[1]
            terms = ds * cosine
            _add_transposed_product(p, x_tile, cols, C, cols, dims, dw_ptr, D, ACC, PRECISION)
            _add_column_terms(terms, w_radial, cols, C, cols, dw_t_ptr, first_dims)
        row_terms = tl.sum(tl.where(x_radial[:, None], ds * cosine, 0.0), axis=1)
    return dx, t_rows + row_terms


@triton.jit(do_not_specialize=RUNTIME_FLAGS)
def margin_softmax_backward_rows(grad_ptr, stats_ptr, power_ptr, params_ptr, x_ptr, w_ptr, x_norm_ptr, w_norm_ptr,
                                 normalize_x, normalize_w, labels_ptr, dx_ptr, t_ptr, dw_ptr, dw_t_ptr,
                                 N, C, D, K, stride_xn, stride_xd, stride_wd, stride_wj, stride_wc, SPLIT,
                                 N_BUCKET, M_BUCKET, ALIGNED,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                 FULL_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                                 MULTI: tl.constexpr, PARTIAL: tl.constexpr, WITH_DW: tl.constexpr,
                                 S_ON_CHIP: tl.constexpr):
    """dX of BLOCK_M rows (on chip) for the D columns of program_id(2), over the class tiles of split program_id(1).
    PARTIAL (several splits): the split's sum_j P_ij w_j (times power) into dx_ptr[split] (fp32/fp64) and its
    t_i = sum_c dS_ic cos_ic into t_ptr[split], added up in split order by _lse_kernels.finish_gradient. Otherwise
    the gradient itself, radial part included, in dx_ptr's dtype. WITH_DW (the default backward): each tile's
    P^T X and column sums of dS cos into dW's accumulators as well (relaxed atomics), so that the tiles are formed
    once for both gradients; finish_gradient completes dW. S_ON_CHIP: the cosines from the D block on chip (FULL_D),
    else over D in chunks read from memory (the same products; the ops choose it for fp32 rows, whose whole-D
    operands took more than the 255 registers a thread has: the compile proof)."""
    scale, pool_scale, power, stride_wd = _backward_scalars(params_ptr, power_ptr, stride_wd)
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    first_dims = tl.program_id(2) == 0  # the column statistics are added once, not once per D block
    labels, g_lse, g_target, lse = _load_row_gradient(grad_ptr, stats_ptr, labels_ptr, rows, N)
    x_inverse, x_radial, x_length2 = _scales(x_norm_ptr, rows, N, normalize_x)
    row_factor = x_inverse * power
    x_tile = _load_rows(x_ptr, rows, dims, N, D, stride_xn, stride_xd)
    dx = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    t_rows = tl.zeros((BLOCK_M,), ACC)
    start, stop = _column_range(split, C, SPLIT, BLOCK_N)
    even_stop = _even_stop(start, stop, BLOCK_N)
    for c0 in range(start, even_stop, BLOCK_N):
        dx, t_rows = _rows_step(dx, t_rows, c0, scale, labels, g_lse, g_target, lse, row_factor, x_radial, x_ptr, w_ptr,
                                w_norm_ptr, normalize_w, pool_scale, x_tile, x_inverse, rows, dims, dw_ptr, dw_t_ptr,
                                first_dims, N, C, D, K, stride_xn, stride_xd, stride_wd, stride_wj, stride_wc, BLOCK_M,
                                BLOCK_N, BLOCK_D, S_ON_CHIP, ACC, PRECISION, MULTI, WITH_DW, True)
    for c0 in range(even_stop, stop, BLOCK_N):  # the partial tile, if any (margin_softmax_forward)
        dx, t_rows = _rows_step(dx, t_rows, c0, scale, labels, g_lse, g_target, lse, row_factor, x_radial, x_ptr, w_ptr,
                                w_norm_ptr, normalize_w, pool_scale, x_tile, x_inverse, rows, dims, dw_ptr, dw_t_ptr,
                                first_dims, N, C, D, K, stride_xn, stride_xd, stride_wd, stride_wj, stride_wc, BLOCK_M,
                                BLOCK_N, BLOCK_D, S_ON_CHIP, ACC, PRECISION, MULTI, WITH_DW, False)
    out_mask = (rows[:, None] < N) & (dims[None, :] < D)
    if PARTIAL:
        at = split.to(tl.int64) * N
        tl.store(dx_ptr + (at + rows[:, None]) * D + dims[None, :], dx, mask=out_mask)
        tl.store(t_ptr + at + rows, t_rows, mask=(rows < N) & first_dims)
    else:
        dx = dx / power - _radial_part(t_rows, x_inverse)[:, None] * x_tile.to(ACC)
        tl.store(dx_ptr + rows[:, None] * D + dims[None, :], dx.to(dx_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _finish_columns(dw, t_columns, w_tile, w_inverse, w_radial, power, cols, columns, dims, dw_ptr, C, D, K,
                    ACC: tl.constexpr):
    """Writes dW's columns `columns` (j = c K + k) for the D rows `dims` into dw_ptr (D x J, contiguous, W's dtype):
    dw / power minus the radial part."""
    dw = dw / power - _radial_part(tl.where(w_radial, t_columns, 0.0), w_inverse)[:, None] * w_tile.to(ACC)
    tl.store(dw_ptr + dims[None, :] * (C * K) + columns[:, None], dw.to(dw_ptr.dtype.element_ty),
             mask=(cols[:, None] < C) & (dims[None, :] < D))


@triton.jit(do_not_specialize=RUNTIME_FLAGS)
def margin_softmax_backward_columns(grad_ptr, stats_ptr, power_ptr, params_ptr, x_ptr, w_ptr, x_norm_ptr,
                                    w_norm_ptr, normalize_x, normalize_w, labels_ptr, dw_ptr, partial_ptr,
                                    partial_t_ptr,
                                    N, C, D, K, stride_xn, stride_xd, stride_wd, stride_wj, stride_wc,
                                    N_BUCKET, M_BUCKET, ALIGNED,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                    FULL_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                                    MULTI: tl.constexpr):
    """The deterministic dW: the columns of the class tile program_id(0) for the D rows of program_id(1), every row
    block summed in order, radial part included, written into dw_ptr (D x J, contiguous, W's dtype).

    One sub-centre: dW^T = P^T X on chip. K > 1: each row block's K cosine tiles are formed once, for the classes'
    choices and dS (one exponential per class), then each sub-centre's P_k^T X is added into this program's own
    rows of an fp32 partial (partial_ptr [J, D], and partial_t_ptr [D blocks, J] for the column sums of dS cos; a
    register tile per sub-centre would not fit, as K is known only at run time), read back by the same program after
    a barrier. A softmax pool (MULTI == 2) recomputes each sub-centre's cosines for its weights (_rows_step)."""
    scale, pool_scale, power, stride_wd = _backward_scalars(params_ptr, power_ptr, stride_wd)
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    operand = w_ptr.dtype.element_ty
    if not MULTI:  # (K > 1 reads each sub-centre's scales and rows where it uses them)
        w_inverse, w_radial, _ = _scales(w_norm_ptr, cols, C, normalize_w)
        w_tile = _load_rows(w_ptr, cols, dims, C, D, stride_wc, stride_wd)
        dw = tl.zeros((BLOCK_N, BLOCK_D), ACC)
        t_columns = tl.zeros((BLOCK_N,), ACC)
    out_mask = (cols[:, None] < C) & (dims[None, :] < D)
    partial_t_ptr += tl.program_id(1).to(tl.int64) * C * K
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        labels, g_lse, g_target, lse = _load_row_gradient(grad_ptr, stats_ptr, labels_ptr, rows, N)
        x_inverse = _scales(x_norm_ptr, rows, N, normalize_x)[0]
        x_tile = _load_rows(x_ptr, rows, dims, N, D, stride_xn, stride_xd)
        if MULTI:
            cosine, pick, top, total = _class_cosines(x_ptr, w_ptr, w_norm_ptr, normalize_w, pool_scale, x_tile,
                                                      x_inverse, rows, cols, dims, N, C, D, K, stride_xn, stride_xd,
                                                      stride_wd, stride_wj, stride_wc, BLOCK_M, BLOCK_N, BLOCK_D,
                                                      FULL_D, ACC, PRECISION, True, False, MULTI == 2)
            ds = _class_gradient(cosine, cols, labels, g_lse, g_target, lse, scale, C)
            for k in range(K):
                if MULTI == 2:
                    value = _sub_centre(x_ptr, w_ptr, w_norm_ptr, normalize_w, x_tile, x_inverse, rows, cols, dims,
                                        k, N, C, D, stride_xn, stride_xd, stride_wd, stride_wj, stride_wc, BLOCK_M,
                                        BLOCK_N, BLOCK_D, FULL_D, ACC, PRECISION, FULL_D, False)[0]
                    gradient = ds * _pooled_weight(value, cosine, top, total, pool_scale)
                    terms = tl.sum(gradient * value, axis=0)
                else:  # not 0 * cos where not chosen: a NaN of another sub-centre stays out
                    chosen = pick == k
                    gradient = tl.where(chosen, ds, 0.0)
                    terms = tl.sum(tl.where(chosen, ds * cosine, 0.0), axis=0)
                inverse_k = _scales(w_norm_ptr + k * C, cols, C, normalize_w)[0]
                p = _product_operand(gradient, x_inverse * power, inverse_k, operand)
                columns = cols * K + k
                at = partial_ptr + columns[:, None] * D + dims[None, :]
                # the first row block writes, the others add: no zeroed buffer
                part = tl.dot(tl.trans(p), x_tile, tl.load(at, mask=out_mask & (m0 > 0), other=0.0),
                              input_precision=PRECISION, out_dtype=ACC)
                tl.store(at, part, mask=out_mask)
                t_at = partial_t_ptr + columns
                tl.store(t_at, tl.load(t_at, mask=(cols < C) & (m0 > 0), other=0.0) + terms, mask=cols < C)
            tl.debug_barrier()  # the stores above are read back by other threads of the program
        else:
            dot = _dot_tile(x_ptr, w_ptr, x_tile, w_tile, rows, cols, N, C, D, stride_xn, stride_xd, stride_wc,
                            stride_wd, BLOCK_M, BLOCK_N, BLOCK_D, FULL_D, ACC, PRECISION)
            cosine = dot * x_inverse[:, None] * w_inverse[None, :]
            ds = _class_gradient(cosine, cols, labels, g_lse, g_target, lse, scale, C)
            t_columns += tl.sum(ds * cosine, axis=0)
            p = _product_operand(ds, x_inverse * power, w_inverse, operand)
            dw = tl.dot(tl.trans(p), x_tile, dw, input_precision=PRECISION, out_dtype=ACC)
    if MULTI:
        for k in range(K):
            w_inverse_k, w_radial_k, _ = _scales(w_norm_ptr + k * C, cols, C, normalize_w)
            columns = cols * K + k
            dw_k = tl.load(partial_ptr + columns[:, None] * D + dims[None, :], mask=out_mask, other=0.0)
            t_k = tl.load(partial_t_ptr + columns, mask=cols < C, other=0.0)
            w_tile_k = _load_rows(w_ptr + k * stride_wj, cols, dims, C, D, stride_wc, stride_wd)
            _finish_columns(dw_k, t_k, w_tile_k, w_inverse_k, w_radial_k, power, cols, columns, dims, dw_ptr, C, D,
                            K, ACC)
    else:
        _finish_columns(dw, t_columns, w_tile, w_inverse, w_radial, power, cols, cols, dims, dw_ptr, C, D, K, ACC)
