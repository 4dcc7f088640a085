"""The test-only interpreter patches of metric_kernels/triton/_interpreter.py against the interpreter's own code."""
import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from metric_kernels.triton._interpreter import vectorised_reductions  # noqa: E402

pytestmark = pytest.mark.skipif(not isinstance(triton.jit(lambda: None), interpreter.InterpretedFunction),
                                reason="needs TRITON_INTERPRET=1 (tests/conftest.py)")


@triton.jit
def _sum_max_and_count(a0, b0, c0, a1, b1, c1):
    return a0 + a1, tl.maximum(b0, b1), c0 + c1


@triton.jit
def _reduce_kernel(x_ptr, y_ptr, out_ptr, ROWS: tl.constexpr, COLS: tl.constexpr, AXIS: tl.constexpr,
                   KEEP: tl.constexpr):
    offsets = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    x = tl.load(x_ptr + offsets)
    y = tl.load(y_ptr + offsets)
    total, top, count = tl.reduce((x, y, (x > 0).to(tl.int32)), AXIS, _sum_max_and_count, keep_dims=KEEP)
    size: tl.constexpr = COLS if AXIS == 0 else ROWS
    at = tl.arange(0, size)
    if KEEP:
        total, top, count = tl.reshape(total, (size,)), tl.reshape(top, (size,)), tl.reshape(count, (size,))
    tl.store(out_ptr + at, total)
    tl.store(out_ptr + size + at, top)
    tl.store(out_ptr + 2 * size + at, count.to(total.dtype))


def _run(x, y, axis, keep):
    size = x.shape[1] if axis == 0 else x.shape[0]
    out = torch.empty(3 * size, dtype=x.dtype)
    _reduce_kernel[(1,)](x, y, out, ROWS=x.shape[0], COLS=x.shape[1], AXIS=axis, KEEP=keep)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("keep", [False, True])
def test_sliced_fold_equals_the_interpreters_element_loop_bit_for_bit(dtype, axis, keep):
    vectorised_reductions()
    reduce_ops = interpreter.ReduceOps
    patched = reduce_ops.generic_reduce
    g = torch.Generator().manual_seed(11)
    # magnitudes over many binades: a sum in another order would round differently
    x = (torch.randn(16, 32, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-20, 20, (16, 32),
                                                                                           generator=g))).to(dtype)
    y = torch.randn(16, 32, generator=g, dtype=dtype)
    got = _run(x, y, axis, keep)
    reduce_ops.generic_reduce = patched.replaced
    try:
        expected = _run(x, y, axis, keep)
    finally:
        reduce_ops.generic_reduce = patched
    assert torch.equal(got.view(torch.int64 if dtype == torch.float64 else torch.int32),
                       expected.view(torch.int64 if dtype == torch.float64 else torch.int32))
    # and both are the left fold numpy computes in the same order
    along = x.numpy().astype(np.float64 if dtype == torch.float64 else np.float32)
    along = along if axis == 0 else along.T
    folded = along[0].copy()
    for row in along[1:]:
        folded = folded + row
    assert np.array_equal(got[:folded.shape[0]].numpy(), folded)


def test_patch_is_idempotent():
    vectorised_reductions()
    first = interpreter.ReduceOps.generic_reduce
    vectorised_reductions()
    assert interpreter.ReduceOps.generic_reduce is first and first.replaced is not first
