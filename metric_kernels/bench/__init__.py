"""The benchmark (`metric-kernels bench`, `python -m metric_kernels.bench`): time, peak memory, effective TFLOP/s and
error against the float64 reference of every loss on every provider, and the largest batch within a memory budget.
See bench/README.md for how to read its outputs.

Modules: providers (losses, providers, inputs, FLOP counts), measure (one case: timing, memory, error; in a fresh
process on the CPU), runner (the run: cases, matmul baselines, max-batch searches), report (CSV, JSON, markdown,
plots), cli (options and presets).
"""
from .runner import Config, run

__all__ = ["Config", "run", "main"]


def main(argv=None) -> int:
    from .cli import main as _main
    return _main(argv)
