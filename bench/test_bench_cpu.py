"""pytest-benchmark suite for the CPU paths: forward, and forward + backward, of every loss on every provider that
runs on this CPU (the usable metric_kernels backends, torch.compile of the reference, PML), at N = M = 256 and 1024,
D = 128, float32.

    .venv/bin/python -m pytest bench/test_bench_cpu.py                        # everything (a few minutes)
    .venv/bin/python -m pytest bench/test_bench_cpu.py -k "supcon and 1024"   # a slice
    .venv/bin/python -m pytest bench/test_bench_cpu.py --benchmark-save=before   # then, after a change:
    .venv/bin/python -m pytest bench/test_bench_cpu.py --benchmark-compare       # against the saved run

Tests are grouped by loss and N, so each group's table compares the providers. Not part of the default test run
(pyproject's testpaths is tests/). `metric-kernels bench` is the full benchmark (memory, TFLOP/s, errors, plots).
"""
import pytest
import torch

from metric_kernels.bench import providers as P

SIZES = (256, 1024)
DIM = 128
PROVIDERS = P.default_providers("cpu")


def _case(loss, provider, n):
    fn = P.get(provider).make(loss)
    inputs = P.make_inputs(loss, n, n, DIM, torch.float32, "cpu", with_refs=False)
    return fn, inputs


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("loss", P.LOSSES)
def test_forward_backward(benchmark, loss, provider, n):
    fn, inputs = _case(loss, provider, n)

    def step():
        inputs.zero_grad()
        fn(inputs).backward()

    step()  # warm-up (torch.compile compiles here)
    benchmark.group = f"{loss} N={n} forward+backward"
    benchmark.extra_info.update(flops=P.flops(loss, "full", n, n, DIM), provider=provider)
    benchmark(step)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs.leaves())


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("loss", P.LOSSES)
def test_forward(benchmark, loss, provider, n):
    fn, inputs = _case(loss, provider, n)
    fn(inputs)  # warm-up
    benchmark.group = f"{loss} N={n} forward"
    benchmark.extra_info.update(flops=P.flops(loss, "forward", n, n, DIM), provider=provider)
    value = benchmark(lambda: fn(inputs))
    assert torch.isfinite(value)
