"""Ahead-of-time compilation of every Triton kernel variant for a GPU architecture, without a GPU.

Triton's compiler runs to a cubin on any machine (ptxas ships with it), so the CPU test suite can prove the kernels
lower for sm_80 and sm_90 — what the interpreter, which runs them as numpy, never checks. Needs TRITON_INTERPRET unset
(under the interpreter the kernels are not compilable objects), hence `python -m metric_kernels.triton._aot 90`.
"""
from __future__ import annotations

import itertools
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _batch_hard_kernel, _lse_kernels

_POINTER = {tl.float32: "*fp32", tl.float64: "*fp64"}


def _signature(kernel, data, constexprs):
    """Argument types by name: *_ptr are data pointers (labels and choices int64), sizes and strides i32 (i64 for
    the offsets that can pass 2^31 are computed in-kernel), scalars fp32."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("labels_ptr") or name == "choice_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = data
        elif name.startswith("param_"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def variants():
    """(name, kernel, data pointer type, constexprs) for every kernel, loss kind and accumulator the ops launch."""
    for acc, kind in itertools.product((tl.float32, tl.float64), (0, 1, 2)):
        precision = "tf32" if acc == tl.float32 else "ieee"
        base = dict(KIND=kind, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, ACC=acc, UPCAST=False, PRECISION=precision)
        data = _POINTER[acc]
        yield f"lse_rows_forward[kind={kind},{acc}]", _lse_kernels.lse_rows_forward, data, base
        for atomic_dy, atomic_dx in ((False, False), (True, False), (True, True)):
            yield (f"lse_rows_backward_dx[kind={kind},{acc},atomic={atomic_dy},{atomic_dx}]",
                   _lse_kernels.lse_rows_backward_dx, data,
                   dict(base, BLOCK_OUT=64, ATOMIC_DY=atomic_dy, ATOMIC_DX=atomic_dx))
        for accumulate in (False, True):
            yield (f"lse_rows_backward_dy[kind={kind},{acc},accumulate={accumulate}]",
                   _lse_kernels.lse_rows_backward_dy, data, dict(base, BLOCK_OUT=64, ACCUMULATE=accumulate))
    for acc in (tl.float32, tl.float64):
        yield (f"batch_hard_select[{acc}]", _batch_hard_kernel.batch_hard_select, _POINTER[acc],
               dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, ACC=acc, UPCAST=False,
                    PRECISION="tf32" if acc == tl.float32 else "ieee"))


def compile_all(arch: int):
    """Compiles every variant for sm_<arch>; returns [(name, shared memory bytes)]. Raises on the first failure."""
    target = GPUTarget("cuda", arch, 32)
    report = []
    for name, kernel, data, constexprs in variants():
        source = ASTSource(fn=kernel, signature=_signature(kernel, data, constexprs), constexprs=constexprs)
        compiled = triton.compile(source, target=target)
        assert "cubin" in compiled.asm, name
        report.append((name, compiled.metadata.shared))
    return report


if __name__ == "__main__":
    for arch in map(int, sys.argv[1:] or ["90"]):
        for name, shared in compile_all(arch):
            print(f"sm_{arch} {name}: ok, {shared} bytes shared memory")
