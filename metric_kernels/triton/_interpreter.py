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

A third mismatch, in casts: the interpreter narrows fp32 to bf16 (x.to(tl.bfloat16), and a bf16 store's conversion)
by dropping the low 16 bits, rounding toward zero, where a GPU's conversion (cvt.rn.bf16.f32) rounds to nearest even.
The truncation's bias, summed over a product's terms, doubled the interpreter's error on the bf16 operands the
backward passes feed its products and on the gradients it stores. `nearest_bf16_casts()` rounds to nearest even.

The kernels then carry no interpreter branch: bf16 and tf32 are tested through the code a GPU runs.

One more, for speed only, `vectorised_reductions()`: a tl.reduce with a combine function of its own (not sum,
max, min or argmax) runs the combine function once per element in the interpreter, in Python (a second per NT-Xent
forward at N = M = 16). The patch folds whole slices along the reduced axis instead, in the same left-to-right order:
each output element sees the same operations on the same values, so the results are the same, bit for bit.

`patch_interpreter()` applies every patch here.
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


def _nearest_bf16(values: np.ndarray) -> np.ndarray:
    """fp32 values to bf16 bit patterns (uint16), rounded to nearest even; NaN stays NaN (quiet, same sign)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    quiet_nan = (bits >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(np.isnan(values), quiet_nan, rounded).astype(np.uint16)


def nearest_bf16_casts() -> None:
    """Idempotent: patches InterpreterBuilder.cast_impl once per process (fp32 -> bf16 to nearest even)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    if getattr(InterpreterBuilder.cast_impl, "_to_nearest", False):
        return
    original = InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return TensorHandle(_nearest_bf16(np.asarray(src.data)), tl.bfloat16)
        return original(self, src, dst_type)

    cast_impl._to_nearest = True
    cast_impl.replaced = original
    InterpreterBuilder.cast_impl = cast_impl
    # the builder's casting entry points are lambdas bound to the class attribute at call time: they pick this up


def patch_interpreter() -> None:
    """Every patch of this module: exact bf16 and rounded tf32 dots, bf16 casts to nearest even, sliced reductions.
    Idempotent."""
    tensor_core_dots()
    nearest_bf16_casts()
    vectorised_reductions()


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


def _fold_slices(self, input):
    """ReduceOps.generic_reduce with the combine function applied to whole slices of the reduced axis, left to
    right, as the interpreter's loop applies it element by element (same order, same values per output element)."""
    import triton.language as tl
    from triton.runtime.interpreter import _get_np_dtype
    original_axis = self.axis
    input, axis = self.unravel(input, self.axis)
    data = [arg.handle.data for arg in input]
    dtypes = [arg.dtype for arg in input]
    shape = data[0].shape
    output_shape = shape[:axis] + shape[axis + 1:]

    def slice_at(k):
        return tuple(self.to_tensor(np.take(d, k, axis=axis), dtype) for d, dtype in zip(data, dtypes))

    def values(item, dtype):
        raw = np.asarray(item.handle.data if isinstance(item, tl.core.tensor) else item, dtype=_get_np_dtype(dtype))
        if raw.size == int(np.prod(output_shape)):  # a scalar's handle holds shape (1,)
            return raw.reshape(output_shape).copy()
        return np.broadcast_to(raw, output_shape).copy()

    accumulated = [values(t, dtype) for t, dtype in zip(slice_at(0), dtypes)]
    for k in range(1, shape[axis]):
        current = tuple(self.to_tensor(a, dtype) for a, dtype in zip(accumulated, dtypes))
        combined = self.combine_fn.fn(*current, *slice_at(k))
        combined = combined if isinstance(combined, tuple) else (combined,)
        accumulated = [values(t, dtype) for t, dtype in zip(combined, dtypes)]
    out = []
    for result, dtype in zip(accumulated, dtypes):
        if self.keep_dims:
            result = np.expand_dims(result, axis) if original_axis is not None else result.reshape((1,) * len(shape))
        elif original_axis is None:
            result = result.item()
        out.append(self.to_tensor(result, dtype))
    return out


def vectorised_reductions() -> None:
    """Idempotent: patches the interpreter's ReduceOps.generic_reduce once per process."""
    from triton.runtime.interpreter import ReduceOps

    if getattr(ReduceOps.generic_reduce, "_folds_slices", False):
        return
    _fold_slices._folds_slices = True
    _fold_slices.replaced = ReduceOps.generic_reduce  # the interpreter's own, which the tests compare with
    ReduceOps.generic_reduce = _fold_slices
