"""Test-suite set-up. Triton's interpreter must be switched on before any kernel is defined, i.e. before
metric_kernels is imported: it runs the Triton kernels on CPU tensors, program by program (ENVIRONMENT.md)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
