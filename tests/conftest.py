"""Test-suite set-up. Triton's interpreter must be switched on before any kernel is defined, i.e. before
metric_kernels is imported: it runs the Triton kernels on CPU tensors, program by program. Its tl.dot is wrong on bf16
operands and ignores tf32; the test-only shim in metric_kernels/triton/_interpreter.py makes bf16 exact and rounds tf32
operands as tensor cores do, so the kernels run both through the same code as on a GPU; a second patch there folds
tl.reduce's own combine functions over whole slices (the same results, bit for bit, without a Python call per
element)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    from metric_kernels.triton._interpreter import tensor_core_dots, vectorised_reductions
except ImportError:  # Triton not installed: the triton tests report that themselves
    pass
else:
    tensor_core_dots()
    vectorised_reductions()
