"""Test-suite set-up. Triton's interpreter must be switched on before any kernel is defined, i.e. before
metric_kernels is imported: it runs the Triton kernels on CPU tensors, program by program. Its tl.dot is wrong on bf16
operands, ignores tf32 and truncates fp32 to bf16; the test-only shim in metric_kernels/triton/_interpreter.py makes
bf16 products exact, rounds tf32 operands as tensor cores do and bf16 casts to nearest even, so the kernels run through
the same code and numerics as on a GPU; another patch there folds tl.reduce's own combine functions over whole slices
(the same results, bit for bit, without a Python call per element)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    from metric_kernels.triton._interpreter import patch_interpreter
except ImportError:  # Triton not installed: the triton tests report that themselves
    pass
else:
    patch_interpreter()
