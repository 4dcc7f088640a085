"""Triton kernels of batch-hard's chosen triplets: the 2 N distances ||u_i - v_p(i)|| and ||u_i - v_n(i)|| of the
rows the selection kernel picked, and their backward, O(N D) work and no N x D temporary.

u = x r and v = y r are the rows scaled by r = 1 / max(||row||, eps) when normalising (else r = 1), formed on chip
from the raw rows. The distances are direct differences (not the |u|^2 + |v|^2 - 2 u.v expansion), exact for the
close pairs that batch-hard picks. The backward writes dX per row, and dY per reference by walking the rows that chose
it in a fixed order (entries sorted by reference): deterministic, no atomics, no accumulator; when the references are
the queries, the reference pass adds each row's own part as a query and writes its whole gradient.
"""
import triton
import triton.language as tl

from ._lse_kernels import _row_scales


@triton.jit
def _scaled_rows(ptr, norm_ptr, rows, valid, dims, n, D, stride_n, stride_d, ACC: tl.constexpr,
                 NORMALIZE: tl.constexpr):
    """The rows `rows` (all of D) times their r, in ACC."""
    inverse, _, _ = _row_scales(norm_ptr, rows, n, NORMALIZE)
    tile = tl.load(ptr + rows[:, None] * stride_n + dims[None, :] * stride_d,
                   mask=valid[:, None] & (dims[None, :] < D), other=0.0).to(ACC)
    return tile * inverse.to(ACC)[:, None]


@triton.jit
def _normalisation_backward(grad, unit, inverse, unclamped, NORMALIZE: tl.constexpr):
    """d(x r)/dx applied to grad (rows): r (g - u (u . g)) where the clamp is inactive, r g where it is."""
    if NORMALIZE:
        radial = tl.where(unclamped, tl.sum(unit * grad, axis=1), 0.0)
        return inverse.to(grad.dtype)[:, None] * (grad - radial[:, None] * unit)
    return grad


@triton.jit
def triplet_distances(x_ptr, y_ptr, x_norm_ptr, y_norm_ptr, positive_ptr, negative_ptr, out_ptr,
                      N, M, D, stride_xn, stride_xd, stride_yn, stride_yd,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, NORMALIZE: tl.constexpr):
    """out[0, i] = ||u_i - v_positive(i)||, out[1, i] = ||u_i - v_negative(i)||."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    valid = rows < N
    positive = tl.load(positive_ptr + rows, mask=valid, other=0)
    negative = tl.load(negative_ptr + rows, mask=valid, other=0)
    u = _scaled_rows(x_ptr, x_norm_ptr, rows, valid, dims, N, D, stride_xn, stride_xd, ACC, NORMALIZE)
    v = _scaled_rows(y_ptr, y_norm_ptr, positive, valid, dims, M, D, stride_yn, stride_yd, ACC, NORMALIZE)
    tl.store(out_ptr + rows, tl.sqrt(tl.sum((u - v) * (u - v), axis=1)), mask=valid)
    v = _scaled_rows(y_ptr, y_norm_ptr, negative, valid, dims, M, D, stride_yn, stride_yd, ACC, NORMALIZE)
    tl.store(out_ptr + N + rows, tl.sqrt(tl.sum((u - v) * (u - v), axis=1)), mask=valid)


@triton.jit
def triplet_distances_backward_rows(coefficient_ptr, x_ptr, y_ptr, x_norm_ptr, y_norm_ptr, positive_ptr,
                                    negative_ptr, dx_ptr, N, M, D, stride_xn, stride_xd, stride_yn, stride_yd,
                                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                                    NORMALIZE: tl.constexpr):
    """dX: with c = g / d per chosen distance (0 where d = 0), du_i = c_p (u_i - v_p) + c_n (u_i - v_n), through the
    normalisation; written in the rows' dtype (the references being other rows: with the queries as references, the
    reference pass writes the whole gradient)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    valid = rows < N
    positive = tl.load(positive_ptr + rows, mask=valid, other=0)
    negative = tl.load(negative_ptr + rows, mask=valid, other=0)
    to_positive = tl.load(coefficient_ptr + rows, mask=valid, other=0.0)
    to_negative = tl.load(coefficient_ptr + N + rows, mask=valid, other=0.0)
    u = _scaled_rows(x_ptr, x_norm_ptr, rows, valid, dims, N, D, stride_xn, stride_xd, ACC, NORMALIZE)
    inverse, unclamped, _ = _row_scales(x_norm_ptr, rows, N, NORMALIZE)
    v = _scaled_rows(y_ptr, y_norm_ptr, positive, valid, dims, M, D, stride_yn, stride_yd, ACC, NORMALIZE)
    du = to_positive[:, None] * (u - v)
    v = _scaled_rows(y_ptr, y_norm_ptr, negative, valid, dims, M, D, stride_yn, stride_yd, ACC, NORMALIZE)
    du += to_negative[:, None] * (u - v)
    dx = _normalisation_backward(du, u, inverse, unclamped, NORMALIZE)
    tl.store(dx_ptr + rows[:, None] * D + dims[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=valid[:, None] & (dims[None, :] < D))


@triton.jit
def triplet_distances_backward_references(entry_row_ptr, entry_coefficient_ptr, offset_ptr, x_ptr, y_ptr,
                                          x_norm_ptr, y_norm_ptr, dy_ptr, N, M, D, stride_xn, stride_xd, stride_yn,
                                          stride_yd, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                                          NORMALIZE: tl.constexpr):
    """dY of reference program_id(0): dv_j = sum of c (v_j - u_i) over its entries (i, c), in their sorted order,
    through the normalisation. The entries are the rows that chose j; when the references are the queries, also
    row j's own choices as a query (i its chosen positive or negative: c (v_j - v_i) is then its part as a query), so
    that dv_j is its whole gradient."""
    reference = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    one = tl.full((1,), 0, tl.int64) + reference
    v = _scaled_rows(y_ptr, y_norm_ptr, one, one < M, dims, M, D, stride_yn, stride_yd, ACC, NORMALIZE)
    inverse, unclamped, _ = _row_scales(y_norm_ptr, one, M, NORMALIZE)
    dv = tl.zeros((1, BLOCK_D), ACC)
    start = tl.load(offset_ptr + reference)
    stop = tl.load(offset_ptr + reference + 1)
    for entry in range(start, stop):
        row = tl.full((1,), 0, tl.int64) + tl.load(entry_row_ptr + entry)
        u = _scaled_rows(x_ptr, x_norm_ptr, row, row < N, dims, N, D, stride_xn, stride_xd, ACC, NORMALIZE)
        dv += tl.load(entry_coefficient_ptr + entry).to(ACC) * (v - u)
    dy = _normalisation_backward(dv, v, inverse, unclamped, NORMALIZE)
    mask = (one[:, None] < M) & (dims[None, :] < D)
    tl.store(dy_ptr + one[:, None] * D + dims[None, :], dy.to(dy_ptr.dtype.element_ty), mask=mask)
