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


@triton.jit
def _narrow_kernel(x_ptr, cast_ptr, stored_ptr, BLOCK: tl.constexpr):
    at = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + at)
    tl.store(cast_ptr + at, x.to(tl.bfloat16))  # an explicit cast
    tl.store(stored_ptr + at, x)  # a store's own conversion to the pointer's bf16


def test_bf16_casts_round_to_nearest_even_as_a_gpu_and_torch_do():
    """fp32 -> bf16 in the patched interpreter equals torch's conversion (round to nearest even) bit for bit: random
    values over many binades, exact ties both ways, values that round up to the next binade or to infinity,
    subnormals, +-0, +-inf and NaN. The interpreter's own cast truncates: it must differ on these values."""
    g = torch.Generator().manual_seed(3)
    random = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-130, 120, (4096,), generator=g).float())
    ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF, 0x7F7FFFFF, 0x00018000, 0x00000001],
                        dtype=torch.int64).to(torch.int32).view(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0, -1.5])
    x = torch.cat([random, ties, special, torch.zeros(8192 - 4096 - ties.numel() - special.numel())])
    cast, stored = torch.empty(8192, dtype=torch.bfloat16), torch.empty(8192, dtype=torch.bfloat16)
    _narrow_kernel[(1,)](x, cast, stored, BLOCK=8192)
    expected = x.to(torch.bfloat16)
    nan = expected.isnan()
    for got in (cast, stored):
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int16), expected[~nan].view(torch.int16))
    truncate = interpreter.InterpreterBuilder.cast_impl.replaced
    interpreter.InterpreterBuilder.cast_impl, patched = truncate, interpreter.InterpreterBuilder.cast_impl
    try:
        _narrow_kernel[(1,)](x, cast, stored, BLOCK=8192)
    finally:
        interpreter.InterpreterBuilder.cast_impl = patched
    assert not torch.equal(cast[~nan].view(torch.int16), expected[~nan].view(torch.int16))
