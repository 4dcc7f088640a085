"""A correction to Triton's CPU interpreter for the test suite and the cost report (never used on a GPU).

The interpreter keeps bf16 data as raw 16-bit integers and its tl.dot multiplies those integers as numbers (triton
issue 11584), so a bf16 dot gives garbage there. `exact_bf16_dots()` patches the interpreter's dot to widen bf16
operands exactly to fp32 first (a bf16 value is the top half of an fp32 one), which is what a tensor core's products
compute before their fp32 accumulation. The kernels then carry no interpreter branch: bf16 is tested through the
code a GPU runs.
"""
from __future__ import annotations

import numpy as np


def _widen_bf16(handle, tl):
    from triton.runtime.interpreter import TensorHandle
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    widened = (np.asarray(handle.data).astype(np.uint32) << 16).view(np.float32)
    return TensorHandle(widened, tl.float32)


def exact_bf16_dots() -> None:
    """Idempotent: patches InterpreterBuilder.create_dot once per process."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder

    if getattr(InterpreterBuilder.create_dot, "_widens_bf16", False):
        return
    original = InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, _widen_bf16(a, tl), _widen_bf16(b, tl), d, input_precision, max_num_imprecise_acc)

    create_dot._widens_bf16 = True
    InterpreterBuilder.create_dot = create_dot
