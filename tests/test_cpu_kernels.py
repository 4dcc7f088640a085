"""The CPU kernels' own paths (csrc/cpu), beside tests/test_fused.py's checks of backend "cpu" against the reference:

- vexp (csrc/cpu/vec_exp.h), the vectorisable exponential of the per-pair loops: within 1.5 ulp of long double exp
  on a dense grid, special values, compiled as the kernels are and with AVX2 + FMA (tests/cpu_exp_check.cpp);
- the backward's two paths: the whole dS kept (N x M up to 4M entries, what test_fused's sizes take) and the tiled
  passes above it, forced here with METRIC_KERNELS_CPU_KEEP_ENTRIES=0, both against the float64 reference;
- the row functions for the baseline ISA (METRIC_KERNELS_CPU_BASELINE=1) as well as the AVX2 ones this machine runs.
"""
import os
import shutil
import subprocess

import pytest
import torch

import metric_kernels as mk
from tests.test_fused import _compare, _pair_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(mk.available_backends("cpu")["cpu"] is not None, reason="backend 'cpu' not built")

FLAGS = ["-std=c++20", "-O3", "-fno-trapping-math", "-fno-math-errno", f"-I{os.path.join(ROOT, 'csrc')}"]


def _supports_avx2():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_vexp_accuracy(isa, tmp_path):
    if isa == "avx2" and not _supports_avx2():
        pytest.skip("no AVX2 + FMA here")
    binary = tmp_path / "exp_check"
    subprocess.run(["c++", *FLAGS, *(["-mavx2", "-mfma"] if isa == "avx2" else []),
                    os.path.join(ROOT, "tests", "cpu_exp_check.cpp"), "-o", str(binary)],
                   check=True, capture_output=True, text=True, timeout=300)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


# (environment, what it forces): the tiled backward, and the baseline row functions (with each backward path).
PATHS = {"tiled": {"METRIC_KERNELS_CPU_KEEP_ENTRIES": "0"},
         "baseline": {"METRIC_KERNELS_CPU_BASELINE": "1"},
         "baseline-tiled": {"METRIC_KERNELS_CPU_BASELINE": "1", "METRIC_KERNELS_CPU_KEEP_ENTRIES": "0"}}
SIZE = (70, 300, 33)  # ragged against the 64-row and 256-column blocks


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("refs", ["self", "ref_emb", "self_offset"])
@pytest.mark.parametrize("loss", ["circle", "supcon", "multi_similarity"])
@pytest.mark.parametrize("path", PATHS)
def test_pair_loss_paths_match_reference(path, loss, refs, dtype, monkeypatch):
    for name, value in PATHS[path].items():
        monkeypatch.setenv(name, value)
    leaves, labels, y_labels, offset, _ = _pair_inputs(5, *SIZE, classes=7, refs=refs, dtype=dtype)
    _compare("cpu", loss, leaves, labels, y_labels, offset, dtype)


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "squared_euclidean"])
@pytest.mark.parametrize("loss,refs", [("supcon", "self"), ("supcon", "self_offset"), ("proxy_anchor", "self")])
@pytest.mark.parametrize("path", PATHS)
def test_distances_and_proxy_anchor_paths_match_reference(path, loss, refs, distance, monkeypatch):
    for name, value in PATHS[path].items():
        monkeypatch.setenv(name, value)
    leaves, labels, y_labels, offset, _ = _pair_inputs(9, *SIZE, classes=7, refs=refs, dtype=torch.float64)
    if loss == "proxy_anchor":
        leaves = [leaves[0], torch.randn(7, SIZE[2], generator=torch.Generator().manual_seed(3), dtype=torch.float64)]
    _compare("cpu", loss, leaves, labels, y_labels, offset, torch.float64, distance=distance)


def test_kept_and_tiled_backward_agree_on_the_ops(monkeypatch):
    """The op's two backward paths on one input: same gradients to rounding (dX and dY, distances' norm terms)."""
    ops = torch.ops.metric_kernels
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(130, 40, generator=g), torch.randn(300, 40, generator=g)
    x_labels, y_labels = torch.randint(0, 9, (130,), generator=g), torch.randint(0, 9, (300,), generator=g)
    kinds = [(0.25, 16.0), (0.0, 2.0), (0.1, 4.0), (2.0, 4.0), (0.0, 5.0), (0.2, 0.1)]  # as epilogue.h's LossKind
    for kind, (a, b) in enumerate(kinds):
        for pair_value in (0, 1, 2):
            args = (x, y, x_labels, y_labels, -1, kind, pair_value, a, b, True)
            stats = ops.cpu_lse_rows(*args)
            grad = torch.randn(4, 130, generator=g)
            kept = ops.cpu_lse_rows_backward(grad, stats, *args, True, True)
            monkeypatch.setenv("METRIC_KERNELS_CPU_KEEP_ENTRIES", "0")
            tiled = ops.cpu_lse_rows_backward(grad, stats, *args, True, True)
            monkeypatch.delenv("METRIC_KERNELS_CPU_KEEP_ENTRIES")
            for ours, theirs in zip(kept, tiled):
                scale = theirs.abs().max().item()
                assert (ours - theirs).abs().max().item() <= 1e-5 * scale, (kind, pair_value)
