"""A correction to Triton's CPU interpreter for the test suite and the cost report (never used on a GPU).

The interpreter's tl.dot multiplies its operands in numpy as they are stored, which is not what a GPU's tensor cores
compute in two cases, both mended by `tensor_core_dots()`:

- bf16: the interpreter keeps bf16 data as raw 16-bit integers and multiplies those integers as numbers (triton
  issue 11584), so a bf16 dot gives garbage. The patch widens bf16 operands exactly to fp32 first (a bf16 value is
  the top half of an fp32 one), which is what a tensor core's products compute before their fp32 accumulation.
- tf32 (input_precision="tf32" on fp32 operands): the interpreter ignores the precision and multiplies in IEEE fp32.
  The patch rounds the operands to tf32's 10 mantissa bits first (to nearest, ties away from zero, as cvt.rna.tf32
  does and as the CUDA kernels' emulation rounds), so tf32's error, and the near-ties it can swap, show on the CPU.
  A GPU's tensor cores may drop the low bits rather than round them: an error of the same size.

The kernels then carry no interpreter branch: bf16 and tf32 are tested through the code a GPU runs.
"""
from __future__ import annotations

import numpy as np

_TF32_DROPPED_BITS = 13  # fp32 keeps 23 mantissa bits, tf32 10


def _widen_bf16(handle, tl):
    from triton.runtime.interpreter import TensorHandle
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    widened = (np.asarray(handle.data).astype(np.uint32) << 16).view(np.float32)
    return TensorHandle(widened, tl.float32)


def _round_to_tf32(handle, tl):
    from triton.runtime.interpreter import TensorHandle
    if handle.dtype.scalar != tl.float32:
        return handle
    values = np.ascontiguousarray(handle.data, dtype=np.float32)
    bits = values.view(np.uint32)
    # adding half of the dropped range to the magnitude's bits rounds to nearest with ties away from zero
    half, kept = np.uint32(1 << (_TF32_DROPPED_BITS - 1)), np.uint32(~((1 << _TF32_DROPPED_BITS) - 1) & 0xFFFFFFFF)
    rounded = ((bits + half) & kept).view(np.float32)
    return TensorHandle(np.where(np.isfinite(values), rounded, values), tl.float32)


def tensor_core_dots() -> None:
    """Idempotent: patches InterpreterBuilder.create_dot once per process."""
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import InterpreterBuilder

    if getattr(InterpreterBuilder.create_dot, "_as_tensor_cores", False):
        return
    original = InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = _widen_bf16(a, tl), _widen_bf16(b, tl)
        if input_precision == ir.INPUT_PRECISION.TF32:
            a, b = _round_to_tf32(a, tl), _round_to_tf32(b, tl)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._as_tensor_cores = True
    InterpreterBuilder.create_dot = create_dot
