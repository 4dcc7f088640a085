"""The Triton backend's margin-softmax ops (ArcFace, CosFace, SubCenterArcFace, NormalizedSoftmax, SphereFace,
LargeMarginSoftmax, SoftTriple):

    metric_kernels::triton_margin_softmax_rows, triton_margin_softmax_rows_backward

with the contract of every fused backend's margin-softmax ops (metric_kernels/_fused.py, which registers their fake
implementations and autograd formula) and the kernels of _margin_softmax_kernels.py. Like the engine's ops (ops.py)
they read the raw rows x (N x D) and the class matrix W (D x C K) in their own dtype (fp16, bf16, fp32, fp64; one
dtype for both), normalise inside, and return the statistics in fp32 (fp64 for fp64 rows) and the gradients in the
inputs' dtype. W is read in place through its strides, never copied; nothing of size N x C is allocated. As the
engine's, the default backward adds dW through relaxed atomics (its sums in no fixed order), and deterministic=True
has every output element written by one program, summing in a fixed order; dX is always deterministic.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton

from .._row_epilogues import stats_dtype
from . import _lse_kernels
from . import _margin_softmax_kernels as _kernels
from .ops import (FALLBACK_REGISTERS, FINISH_REGISTERS, _accumulator, _configs, _device_guard, _kernel_rows,
                  _precision, _pruner, block_d, loss_params, power_of_two_below, reference_splits, row_norms)

# The engine's autotune configs and pruning (ops._pruner), with these kernels' own measurements: of the configs
# within the engine's register limits, those that a compile sweep of these kernels (triton 3.7.1, sm_80 and sm_90a,
# every dtype, the widest D on chip and D in chunks, both layouts of W: _launch_args) found spilling, by (pass,
# layout, tensor cores, K > 1). The compile proof (_aot.py) compiles these kernels' launches at every level.
MEASURED_SPILLS = {
    ("forward", "full", False, True): {(32, 16, 8), (16, 16, 4)},
    ("forward", "full", True, False): {(128, 32, 8), (64, 128, 8), (64, 32, 8), (64, 32, 4), (32, 64, 8), (32, 32, 4),
                                       (16, 64, 4)},
    ("forward", "full", True, True): {(128, 64, 8), (128, 32, 8), (64, 128, 8), (64, 64, 4), (64, 32, 8), (32, 64, 8),
                                      (32, 64, 4), (32, 32, 8), (32, 32, 4), (16, 16, 8), (16, 16, 4)},
    ("forward", "chunked", False, False): {(64, 32, 8), (32, 64, 8), (32, 16, 8), (16, 16, 8), (16, 16, 4)},
    ("forward", "chunked", False, True): {(64, 32, 8), (32, 64, 8), (32, 32, 4), (32, 16, 8), (16, 16, 8), (16, 16, 4)},
    ("forward", "chunked", True, False): {(64, 64, 4), (64, 32, 8), (64, 32, 4), (32, 64, 8), (32, 64, 4), (16, 16, 8),
                                          (16, 16, 4)},
    ("forward", "chunked", True, True): {(64, 64, 4), (64, 32, 8), (64, 32, 4), (32, 64, 8), (32, 64, 4), (32, 32, 8),
                                         (32, 32, 4), (16, 64, 4), (16, 16, 8), (16, 16, 4)},
    ("forward", "unaligned", False, False): {(32, 16, 8)},
    ("forward", "unaligned", False, True): {(32, 64, 8), (32, 32, 8), (32, 16, 8), (16, 16, 8), (16, 16, 4)},
    ("forward", "unaligned", True, False): {(128, 32, 8), (64, 32, 4), (32, 64, 8), (32, 64, 4), (32, 32, 4),
                                            (16, 64, 4)},
    ("forward", "unaligned", True, True): {(128, 32, 8), (64, 32, 8), (64, 32, 4), (32, 64, 8), (32, 64, 4),
                                           (32, 32, 8), (32, 32, 4), (32, 16, 8), (16, 64, 4), (16, 16, 8),
                                           (16, 16, 4)},
    ("forward", "unaligned-chunked", False, False): {(32, 16, 8), (16, 16, 8)},
    ("forward", "unaligned-chunked", False, True): {(32, 16, 8), (16, 16, 8)},
    ("forward", "unaligned-chunked", True, False): {(64, 32, 8), (32, 64, 8), (32, 32, 8), (32, 32, 4), (32, 16, 8),
                                                    (16, 16, 8), (16, 16, 4)},
    ("forward", "unaligned-chunked", True, True): {(64, 32, 8), (32, 64, 8), (32, 32, 8), (32, 32, 4), (32, 16, 8),
                                                   (16, 64, 4), (16, 16, 8), (16, 16, 4)},
    # the compile proof's config sweeps (triton 3.7.1 and 3.6.0, 2026-11-28), W in its own D x J layout
    ("rows", "unaligned", False, True): {(32, 16, 8), (16, 16, 8), (16, 16, 4)},
    ("rows", "unaligned", True, True): {(32, 32, 8), (32, 16, 8), (16, 16, 8), (16, 16, 4)},
    ("rows", "unaligned-chunked", False, True): {(16, 16, 8)},
    ("columns", "unaligned", False, True): {(32, 16, 8), (16, 16, 8), (16, 16, 4)},
    ("columns", "unaligned", True, True): {(32, 32, 8), (32, 16, 8), (16, 16, 8), (16, 16, 4)},
}


def _pruning(kernel_pass: str):
    # The fallback (the smallest tile, 8 warps) with one stage: with two, the several-sub-centre passes in fp32
    # spilled (the pipeline's prefetched tiles live in registers alongside the products'). With the engine's
    # register ceiling: without one, ptxas spilled to fit more blocks at 80 or 128 registers; except for the row
    # pass with dW at the widest D block, which needs more than 255 with fp32 rows and spilled with the ceiling
    # but not without (the compile proof's sweep).
    def ceiling(args):
        return None if args.get("WITH_DW") and args["BLOCK_D"] >= 256 else FALLBACK_REGISTERS
    return _pruner(kernel_pass, MEASURED_SPILLS, fallback_registers=ceiling, fallback_stages=1)


def row_pass_forms_dw(precision: str, multi: bool, w_by_class: bool, partial: bool, block_d: int,
                      arch: int | None, triton_version: str) -> bool:
    """Whether the row pass also forms dW (WITH_DW) where the backward may use atomics. Not in the one case that no
    config compiles without spilling: triton before 3.7 (the GPU machine's 3.6.0) for compute capability 8.x, fp32
    rows with tf32 products, several sub-centres, W in its own D x J layout, dX written by the pass itself (one
    split), the widest D block (more than 255 registers whatever the ceiling, stages or warps tried: the compile
    proof's sweeps of 2026-11-28). There dW takes the column pass: one more matmul-equivalent, no spills. arch: the
    device's major compute capability (None off a GPU)."""
    old_triton = tuple(int(part) for part in triton_version.split(".")[:2]) < (3, 7)
    return not (old_triton and arch == 8 and precision == "tf32" and multi and not w_by_class and not partial
                and block_d >= 256)


def cosines_on_chip(dtype: torch.dtype, full_d: bool) -> bool:
    """The row pass's S_ON_CHIP: the cosines from the D block on chip when it holds all of D, except for fp32 rows,
    whose operands over the whole of D made the pass spill (the compile proof: IEEE products on the CUDA cores with
    triton 3.7.1, tf32 ones with 3.6.0): D in chunks from memory instead, the same products."""
    return full_d and dtype != torch.float32


def finish_block_d(width: int, transposed: bool) -> int:
    """finish_gradient's D block: the backward's, but at most 128 when it writes dW (D x J) from the accumulators
    of W's columns, whose loads and stores run along different axes (a 256-wide block spilled on sm_90a)."""
    return min(width, 128) if transposed else width


_KEY = ["N_BUCKET", "M_BUCKET", "ALIGNED", "D", "BLOCK_D", "FULL_D", "ACC", "PRECISION", "MULTI"]  # + pointer dtypes
_forward = triton.autotune(_configs(), key=_KEY, prune_configs_by=_pruning("forward")
                           )(_kernels.margin_softmax_forward)
# Benchmarking runs a kernel repeatedly: atomically filled buffers are zeroed before each run.
_backward_rows = triton.autotune(_configs(), key=_KEY + ["PARTIAL", "WITH_DW"], prune_configs_by=_pruning("rows"),
                                 reset_to_zero=["dw_ptr", "dw_t_ptr"])(_kernels.margin_softmax_backward_rows)
_backward_columns = triton.autotune(_configs(), key=_KEY, prune_configs_by=_pruning("columns")
                                    )(_kernels.margin_softmax_backward_columns)


def _classifier_rows(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, sub_centers: int):
    """(x with unit column strides (ops._kernel_rows: a copy of x only where it has none), labels, C), the tensors
    checked as the native ops check them; W is left as it is. Labels are not read on the host (that would wait for
    the GPU): a label outside [0, C) gives a NaN target."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[0]:
        raise ValueError(f"x must be N x D and weight D x J, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x and weight must have one dtype, got {x.dtype} and {weight.dtype}")
    if weight.device != x.device or labels.device != x.device:
        raise ValueError(f"weight and labels must be on x's device ({x.device}), got {weight.device} and "
                         f"{labels.device}")
    if sub_centers < 1 or weight.shape[1] % sub_centers:
        raise ValueError(f"weight's {weight.shape[1]} columns must be a whole number of classes of {sub_centers} "
                         "sub-centres each")
    if labels.dtype != torch.int64 or labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError("labels must be int64, one per row")
    x, _ = _kernel_rows(x, x)
    return x, labels.contiguous(), weight.shape[1] // sub_centers


def _by_sub_centre(column_norms: torch.Tensor, sub_centers: int) -> torch.Tensor:
    """W's column norms (row_norms of W's transpose, a view: column j = c K + k) laid out sub-centre by sub-centre
    ([K, C]: the kernels read sub-centre k's norms at k C + c)."""
    if sub_centers == 1:
        return column_norms
    return column_norms.view(-1, sub_centers).t().contiguous()  # O(J): the norms, not W


def _launch_args(x: torch.Tensor, weight: torch.Tensor, sub_centers: int, pool_scale: float):
    """(sizes and strides, autotune key, constexprs) every margin-softmax kernel takes. MULTI: 0 one column per
    class, 1 several pooled by the largest, 2 several pooled by a softmax (pool_scale > 0, SoftTriple)."""
    n, d = x.shape
    classes = weight.shape[1] // sub_centers
    width = block_d(d, x.element_size())
    # W's strides, and the stride between one sub-centre's classes (1 for a contiguous W with one sub-centre, which
    # the launch specialises: the compiler then loads vectors of classes)
    sizes = (n, classes, d, sub_centers, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
             sub_centers * weight.stride(1))
    # The pruner's layout class (ops.rows_aligned): x's rows and W's columns both loaded in vectors along D, as the
    # engine loads its rows, which W's columns are when W is stored class by class (a transposed view of a J x D
    # matrix). W's own D x J layout is loaded along the classes (vectors of classes for one sub-centre, single
    # elements for several), which takes more registers in the products on sm_80 and on the CUDA cores: pruned as
    # unaligned, as are rows the compiler cannot load in vectors.
    aligned = (x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0 and x.stride(1) == 1 and d % 16 == 0
               and x.stride(0) % 16 == 0 and weight.stride(0) == 1 and weight.stride(1) % 16 == 0)
    key = (triton.next_power_of_2(max(n, 1)), triton.next_power_of_2(max(classes, 1)), int(aligned))
    constexprs = dict(BLOCK_D=width, FULL_D=d <= width, ACC=_accumulator(x.dtype), PRECISION=_precision(x.dtype),
                      MULTI=(2 if pool_scale > 0 else 1) if sub_centers > 1 else 0)
    return sizes, key, constexprs


@torch.library.custom_op("metric_kernels::triton_margin_softmax_rows", mutates_args=())
def margin_softmax_rows(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, sub_centers: int, scale: float,
                        normalize_x: bool, normalize_w: bool, pool_scale: float, deterministic: bool) -> torch.Tensor:
    """stats [2, N]: the log-sum-exp of scale * cos over the classes other than the label (-inf for C == 1), and
    the label's cosine ("cos" with the rows / W's columns left raw where normalize_x / normalize_w is False; a
    class's cos pooled from its sub-centres' by the largest, or with pool_scale > 0 by the softmax-weighted mean).
    The classes are split across programs where the row blocks alone cannot fill the GPU (ops.reference_splits);
    the splits' log-sum-exps are merged here, O(splits x N)."""
    x, labels, classes = _classifier_rows(x, weight, labels, sub_centers)
    n = x.shape[0]
    dtype = stats_dtype(x.dtype)
    splits = reference_splits(n, classes, x.device)
    lse = torch.full((splits, n), float("-inf"), dtype=dtype, device=x.device)
    target = torch.full((n,), float("nan"), dtype=dtype, device=x.device)  # the split holding the label writes it
    if n and classes:
        sizes, key, constexprs = _launch_args(x, weight, sub_centers, pool_scale)
        with _device_guard(x):
            _forward[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits)](
                x, weight, row_norms(x), _by_sub_centre(row_norms(weight.t()), sub_centers), int(normalize_x),
                int(normalize_w), labels, loss_params(scale, pool_scale, x), lse, target, *sizes, splits, *key,
                **constexprs)
    return torch.stack([lse[0] if splits == 1 else torch.logsumexp(lse, dim=0), target])


def _gradient_power(grad: torch.Tensor, x: torch.Tensor, x_norms: torch.Tensor, w_norms: torch.Tensor,
                    scale: float, normalize_x: bool, normalize_w: bool, pool_scale: float) -> torch.Tensor:
    """fp16: the power of two that brings P = dS r_i r_j to at most 1 before its cast to fp16 (whose range would
    flush the small softmax terms to 0), from |dS_ic| <= |g_lse| |scale| + |g_target| (softmax_c <= 1, one
    target; r = 1 on a side left raw), times 1 + 2 pool_scale |x| |w| for a softmax pool (a column's share
    p_k (1 + pool_scale (cos_k - pooled)), |cos_k - pooled| <= 2 |x| |w|, the lengths 1 on normalised sides); 1 for
    the other dtypes (ops.gradient_scale does the same for the pair losses)."""
    if x.dtype != torch.float16:
        return torch.ones((1,), dtype=x_norms.dtype, device=x.device)
    bound = grad[0].abs() * abs(scale) + grad[1].abs()
    if pool_scale > 0:
        length = lambda norms, normalized: 1.0 if normalized else norms.max()  # noqa: E731
        bound = bound * (1 + 2 * pool_scale * length(x_norms, normalize_x) * length(w_norms, normalize_w))
    return power_of_two_below(bound, x_norms, w_norms, normalize_x, normalize_w)


@torch.library.custom_op("metric_kernels::triton_margin_softmax_rows_backward", mutates_args=())
def margin_softmax_rows_backward(grad: torch.Tensor, stats: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                 labels: torch.Tensor, sub_centers: int, scale: float, normalize_x: bool,
                                 normalize_w: bool, pool_scale: float, deterministic: bool, need_dx: bool,
                                 need_dw: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dX, dW) in the inputs' dtype (an unneeded one with 0 rows).

    The row pass runs over row blocks x class splits x D blocks and writes dX (several splits: fp32 partials, one
    per split, added in split order by finish_gradient). Default, when dW is needed too: it takes P^T X from the same
    tiles into fp32 accumulators through relaxed atomics (3 matmul-equivalents per sub-centre column, one
    exponential per class), which finish_gradient completes (except where that pass would spill: row_pass_forms_dw).
    Otherwise dW comes from a column pass over class tiles x D blocks, each summing every row block in order
    (deterministic; 4 matmul-equivalents with the row pass; several sub-centres through an fp32 partial)."""
    x, labels, classes = _classifier_rows(x, weight, labels, sub_centers)
    n, d = x.shape
    if tuple(grad.shape) != (2, n) or tuple(stats.shape) != (2, n):
        raise ValueError(f"grad and stats must be 2 x N = 2 x {n}, got {tuple(grad.shape)} and {tuple(stats.shape)}")
    work = n > 0 and classes > 0 and d > 0
    new = torch.empty if work else torch.zeros
    dx = new((n if need_dx else 0, d), dtype=x.dtype, device=x.device)
    dw = new((d if need_dw else 0, weight.shape[1]), dtype=weight.dtype, device=x.device)
    if not work or not (need_dx or need_dw):
        return dx, dw
    dtype = stats_dtype(x.dtype)
    grad, stats = grad.to(dtype).contiguous(), stats.to(dtype).contiguous()
    column_norms = row_norms(weight.t())  # column by column (j = c K + k)
    x_norms, w_norms = row_norms(x), _by_sub_centre(column_norms, sub_centers)
    power = _gradient_power(grad, x, x_norms, w_norms, scale, normalize_x, normalize_w, pool_scale)
    sizes, key, constexprs = _launch_args(x, weight, sub_centers, pool_scale)
    width = constexprs["BLOCK_D"]
    columns = weight.shape[1]
    state = (grad, stats, power, loss_params(scale, pool_scale, x), x, weight, x_norms, w_norms, int(normalize_x),
             int(normalize_w), labels)
    buffer = lambda *shape: torch.empty(shape, dtype=dtype, device=x.device)  # noqa: E731
    # (accumulators, statistics, splits, rows, their norms, out and its strides, D block), for finish_gradient
    finish = []
    # dW alone: the column pass forms each tile once too, without atomics
    with_dw = need_dx and need_dw and not deterministic
    with _device_guard(x):
        if need_dx:
            splits = reference_splits(n, classes, x.device)
            partial = splits > 1
            arch = torch.cuda.get_device_capability(x.device)[0] if x.is_cuda else None
            with_dw = with_dw and row_pass_forms_dw(constexprs["PRECISION"], sub_centers > 1, weight.stride(0) == 1,
                                                    partial, width, arch, triton.__version__)
            if partial:
                dx_acc, t = buffer(splits, n, d), buffer(splits, n)
                finish.append((dx_acc, t, splits, x, x_norms, dx, d, 1, finish_block_d(width, False)))
            else:
                dx_acc, t = dx, buffer(1)
            if with_dw:
                dw_acc, dw_t = torch.zeros((columns, d), dtype=dtype, device=x.device), buffer(columns).zero_()
                finish.append((dw_acc, dw_t, 1, weight.t(), column_norms, dw, 1, columns, finish_block_d(width, True)))
            else:
                dw_acc, dw_t = buffer(1), buffer(1)
            _backward_rows[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits, triton.cdiv(d, width))](
                *state, dx_acc, t, dw_acc, dw_t, *sizes, splits, *key, PARTIAL=partial, WITH_DW=with_dw,
                S_ON_CHIP=cosines_on_chip(x.dtype, constexprs["FULL_D"]), **constexprs)
        if need_dw and not with_dw:
            multi = sub_centers > 1
            blocks = triton.cdiv(d, width)
            partial_dw, partial_t = (buffer(columns, d), buffer(blocks, columns)) if multi else (buffer(1), buffer(1))
            _backward_columns[lambda meta: (triton.cdiv(classes, meta["BLOCK_N"]), blocks)](
                *state, dw, partial_dw, partial_t, *sizes, *key, **constexprs)
        for acc, statistic, splits, rows, norms, out, stride_on, stride_od, block in finish:
            _lse_kernels.finish_gradient[(triton.cdiv(rows.shape[0], 32), triton.cdiv(d, block))](
                acc, statistic, power, rows, norms, out, rows.shape[0], d, rows.stride(0), rows.stride(1), stride_on,
                stride_od, splits, BLOCK_R=32, BLOCK_D=block, ACC=constexprs["ACC"], NORMALIZE=True,
                maxnreg=FINISH_REGISTERS)
    return dx, dw
