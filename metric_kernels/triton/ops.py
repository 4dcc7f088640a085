"""torch.library custom ops around the Triton kernels, so the fused losses work eagerly, under
torch.compile(fullgraph=True) and under torch.library.opcheck:

    metric_kernels::triton_lse_rows, triton_lse_rows_backward, triton_batch_hard_select

(the contract of every fused backend's ops, with their fake implementations and autograd formula, registered by the
package's __init__ through fused_backend: metric_kernels/_fused.py).
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._fused import check_row_state, stats_dtype
from . import _batch_hard_kernel, _lse_kernels

_HALF = (torch.float16, torch.bfloat16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _accumulator(dtype: torch.dtype):
    """Triton's accumulator and statistics type: float64 for float64 inputs, float32 otherwise (stats_dtype)."""
    return tl.float64 if stats_dtype(dtype) == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's float32 matmul precision: tf32 only where torch allows it."""
    if dtype == torch.float32 and not interpreting() and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _block_d(dim: int) -> int:
    """The D tile: tl.dot needs every block dimension >= 16; 64 keeps a tile of X and Y on chip for any D."""
    return max(16, min(64, triton.next_power_of_2(max(dim, 1))))


def _configs():
    """Autotuning space of the row and reference tiles. Under the interpreter a single config: Triton's autotuner
    cannot benchmark there, and one config makes it run the kernel as is, through the same wrapper as on a GPU."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    shapes = ((64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 2), (64, 32, 4, 4), (32, 64, 4, 4),
              (128, 32, 4, 3))
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


_KEY = ["N", "M", "D", "BLOCK_D", "ACC", "PRECISION"]  # Triton adds the pointer dtypes itself
_forward = triton.autotune(_configs(), key=_KEY + ["KIND"])(_lse_kernels.lse_rows_forward)
# Benchmarking runs a kernel repeatedly: atomically filled buffers are zeroed, and the accumulating dY pass gets
# back the dX it adds to, before each run.
_backward_dx = triton.autotune(_configs(), key=_KEY + ["KIND", "ATOMIC_DY", "ATOMIC_DX"],
                               reset_to_zero=["dy_ptr"])(_lse_kernels.lse_rows_backward_dx)
_backward_dy = triton.autotune(_configs(), key=_KEY + ["KIND", "ACCUMULATE"],
                               restore_value=["dy_ptr"])(_lse_kernels.lse_rows_backward_dy)
_batch_hard = triton.autotune(_configs(), key=_KEY)(_batch_hard_kernel.batch_hard_select)


def _launch_args(x, y):
    acc = _accumulator(x.dtype)
    return dict(BLOCK_D=_block_d(x.shape[1]), ACC=acc, UPCAST=interpreting() and x.dtype in _HALF,
                PRECISION=_precision(x.dtype))


def _rows_grid(n):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)


def _device_guard(tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("metric_kernels::triton_lse_rows", mutates_args=())
def lse_rows(x: torch.Tensor, y: Optional[torch.Tensor], x_labels: torch.Tensor, y_labels: torch.Tensor,
             self_offset: int, kind: int, param_a: float, param_b: float, deterministic: bool) -> torch.Tensor:
    """Per-row statistics [3, N] (see _lse_kernels and metric_kernels/_fused.py for the ops' contract)."""
    y = x if y is None else y
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    stats = torch.empty((3, n), dtype=stats_dtype(x.dtype), device=x.device)
    args = _launch_args(x, y)
    with _device_guard(x):
        _forward[_rows_grid(n)](
            x, y, x_labels, y_labels, stats, n, m, d, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            self_offset, param_a, param_b, KIND=kind, **args)
    return stats


@torch.library.custom_op("metric_kernels::triton_lse_rows_backward", mutates_args=())
def lse_rows_backward(grad: torch.Tensor, stats: torch.Tensor, x: torch.Tensor, y: Optional[torch.Tensor],
                      x_labels: torch.Tensor, y_labels: torch.Tensor, self_offset: int, kind: int, param_a: float,
                      param_b: float, deterministic: bool, need_dx: bool, need_dy: bool
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dX, dY) as metric_kernels/_fused.py describes."""
    check_row_state(grad, stats, x)
    same = y is None
    y = x if same else y
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    acc_dtype = stats_dtype(x.dtype)
    args = _launch_args(x, y)
    block_out = args["BLOCK_D"]
    if same:
        need_dx, need_dy = need_dx or need_dy, False
    # dY from the row pass, added atomically: only where that saves a pass (dY alone is one deterministic pass)
    atomic = not deterministic and need_dx and (need_dy or same)
    dx = (torch.zeros if same and atomic else torch.empty)((n if need_dx else 0, d), dtype=acc_dtype,
                                                           device=x.device)
    dy = dx if same else (torch.zeros if atomic else torch.empty)((m if need_dy else 0, d), dtype=acc_dtype,
                                                                    device=x.device)
    common = (x, y, x_labels, y_labels)
    sizes = (n, m, d, x.stride(0), x.stride(1), y.stride(0), y.stride(1), self_offset, param_a, param_b)
    with _device_guard(x):
        if d > 0 and need_dx:
            _backward_dx[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(d, block_out))](
                grad, stats, *common, dx, dy, *sizes, KIND=kind, BLOCK_OUT=block_out, ATOMIC_DY=atomic,
                ATOMIC_DX=same and atomic, **args)
        if d > 0 and (need_dy or same) and not atomic:
            # Without atomics, dY is its own pass over column blocks, each summing the row blocks in a fixed order.
            _backward_dy[lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), triton.cdiv(d, block_out))](
                grad, stats, *common, dy, *sizes, KIND=kind, BLOCK_OUT=block_out, ACCUMULATE=same, **args)
    if same:
        dy = dx.new_empty((0, d))  # a fresh tensor: a custom op's outputs may not alias each other
    return dx.to(x.dtype), dy.to(y.dtype)


@torch.library.custom_op("metric_kernels::triton_batch_hard_select", mutates_args=())
def batch_hard_select(x: torch.Tensor, y: torch.Tensor, x_labels: torch.Tensor, y_labels: torch.Tensor,
                      self_offset: int) -> torch.Tensor:
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    acc_dtype = stats_dtype(x.dtype)
    choices = torch.empty((2, n), dtype=torch.int64, device=x.device)
    x_squared = x.to(acc_dtype).pow(2).sum(dim=1)
    y_squared = y.to(acc_dtype).pow(2).sum(dim=1)
    args = _launch_args(x, y)
    with _device_guard(x):
        _batch_hard[_rows_grid(n)](
            x, y, x_squared, y_squared, x_labels, y_labels, choices, n, m, d,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), self_offset, **args)
    return choices
