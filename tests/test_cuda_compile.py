"""The CUDA sources compile on this GPU-less machine: CMakeLists.txt's compile-only build (METRIC_KERNELS_CUDA_COMPILE_ONLY)
compiles every kernel in csrc/cuda for sm_80 and sm_90a (Hopper's architecture-specific target, what the package
builds by default) with ptxas's resource report, and the torch glue
(csrc/cuda/ops.cpp) against the installed torch. Every kernel instance must be there for both architectures, with no
local-memory spills. The per-loss math the kernels share with the CPU kernels (csrc/epilogue.h) is checked
numerically by the CPU suite; the one piece only the CUDA kernels use, merging two partial log-sum-exp states, is
checked here by a host build of the header.

Without nvcc the test skips with the reason, unless METRIC_KERNELS_REQUIRE_NVCC=1 (.ci/run sets it).
"""
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICIES = ["SimtTile<float>", "SimtTile<double>", "WmmaTile<Tf32>", "WmmaTile<__half>", "WmmaTile<__nv_bfloat16>"]
# the backward passes: <Policy, atomic, rows resident> and <Policy, columns resident>; the classifiers' dX pass
# <Policy, atomic>
FLAGS = ("false", "true")
KERNELS = (["lse_rows_forward_kernel<{}>", "triplet_margin_forward_kernel<{}>"]
           + [f"lse_rows_backward_dx_kernel<{{}},{atomic},{resident}>" for atomic in FLAGS for resident in FLAGS]
           + [f"lse_rows_backward_dy_kernel<{{}},{resident}>" for resident in FLAGS]
           + ["batch_hard_select_kernel<{}>", "margin_softmax_forward_kernel<{}>", "margin_softmax_dw_kernel<{}>"]
           + [f"margin_softmax_dx_kernel<{{}},{atomic}>" for atomic in FLAGS])
# The rows' squared norms (the pair-row kernels) and the classifiers' inverse norms, per (operand, accumulation)
# type, and the fp16 backward's gradient scale per accumulation type.
NORM_KERNELS = [f"vector_norms_kernel<{operand},{acc},{inverse}>"
                for operand, acc in (("float", "float"), ("double", "double"), ("__half", "float"),
                                     ("__nv_bfloat16", "float"))
                for inverse in ("false", "true")] + ["gradient_scale_kernel<float>", "gradient_scale_kernel<double>"]
# Batch-hard's chosen triplets (triplet.cu), per (row type, accumulation type): fp32 and tf32 rows share one.
TRIPLET_KERNELS = [kernel.format(f"{operand},{acc}")
                   for operand, acc in (("float", "float"), ("double", "double"), ("__half", "float"),
                                        ("__nv_bfloat16", "float"))
                   for kernel in ("triplet_distances_kernel<{}>", "triplet_backward_rows_kernel<{}>",
                                  "triplet_backward_references_kernel<{},false>",
                                  "triplet_backward_references_kernel<{},true>")]
ARCHS = ["sm_80", "sm_90a"]

needs_nvcc = pytest.mark.skipif(
    shutil.which("nvcc") is None and os.environ.get("METRIC_KERNELS_REQUIRE_NVCC") != "1",
    reason="nvcc is not on PATH (CI has it and sets METRIC_KERNELS_REQUIRE_NVCC=1)")


def _ptxas_report(log: str):
    """{(arch, demangled kernel): (registers, spill store bytes, spill load bytes)} from nvcc -Xptxas=-v output."""
    report, current = {}, None
    entries = []
    for line in log.splitlines():
        match = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'", line)
        if match:
            entries.append(match.groups())
            current = [match.group(2), match.group(1), None, None]
            continue
        match = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if match and current:
            current[2], current[3] = int(match.group(1)), int(match.group(2))
            continue
        match = re.search(r"Used (\d+) registers", line)
        if match and current and current[2] is not None:
            report[(current[0], current[1])] = (int(match.group(1)), current[2], current[3])
            current = None
    names = subprocess.run(["c++filt"], input="\n".join(k for _, k in report), capture_output=True, text=True,
                           check=True).stdout.splitlines()
    demangled = {}
    for ((arch, _), figures), name in zip(report.items(), names):
        name = name.replace("metric_kernels::cuda::(anonymous namespace)::", "").replace("metric_kernels::cuda::", "")
        demangled[(arch, re.sub(r"\s+", "", name.split("(")[0].replace("void ", "")))] = figures
    return demangled


@needs_nvcc
def test_every_cuda_kernel_compiles_for_sm80_and_sm90a_without_spills(tmp_path):
    build = tmp_path / "build"
    configure = subprocess.run(
        ["cmake", "-G", "Ninja", "-S", ROOT, "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
         "-DMETRIC_KERNELS_CUDA_COMPILE_ONLY=ON", "-DMETRIC_KERNELS_CUDA_ARCHS=80;90a"],
        capture_output=True, text=True, timeout=600)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compiled = subprocess.run(["cmake", "--build", str(build), "--parallel", os.environ.get("MAX_JOBS", "2"),
                               "--verbose"], capture_output=True, text=True, timeout=1200)
    log = compiled.stdout + compiled.stderr
    assert compiled.returncode == 0, log[-6000:]
    assert "ops.cpp.o" in log  # the torch glue was compiled too
    report = _ptxas_report(log)
    expected = {(arch, kernel.format(policy)) for arch in ARCHS for kernel in KERNELS for policy in POLICIES}
    expected |= {(arch, kernel) for arch in ARCHS for kernel in NORM_KERNELS + TRIPLET_KERNELS}
    missing = expected - set(report)
    assert not missing, f"kernels without a ptxas report: {sorted(missing)[:5]}; got {sorted(report)[:5]}"
    spilling = {key: figures for key, figures in report.items() if figures[1] or figures[2]}
    assert not spilling, f"local-memory spills (registers, store bytes, load bytes): {spilling}"


MERGE_CHECK = r"""
#include <cmath>
#include <cstdio>
#include <random>
#include "epilogue.h"
using metric_kernels::OnlineLse;
int main() {
  std::mt19937 rng(7);
  std::normal_distribution<double> normal(0.0, 30.0);
  int failures = 0;
  for (int trial = 0; trial < 200; ++trial) {
    const int count = trial % 17, split = count ? int(rng() % (count + 1)) : 0;
    OnlineLse<double> whole, left, right;
    for (int i = 0; i < count; ++i) {
      const double v = normal(rng);
      whole.add(v);
      (i < split ? left : right).add(v);
    }
    left.merge(right.max, right.sum);
    const double a = left.finish(), b = whole.finish();
    const bool same = (std::isinf(a) && std::isinf(b) && a < 0 && b < 0) || std::fabs(a - b) <= 1e-12 * std::fabs(b) + 1e-12;
    if (!same) { std::printf("trial %d: merged %.17g, direct %.17g\n", trial, a, b); ++failures; }
  }
  std::printf("%s\n", failures ? "failed" : "ok");
  return failures != 0;
}
"""


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_merging_partial_logsumexp_states_equals_one_pass(tmp_path):
    """OnlineLse::merge (the two threads of a row meeting in the CUDA kernels), on random splits incl. empty ones."""
    source = tmp_path / "merge.cpp"
    source.write_text(textwrap.dedent(MERGE_CHECK))
    binary = tmp_path / "merge"
    subprocess.run(["c++", "-std=c++17", "-O1", f"-I{os.path.join(ROOT, 'csrc')}", str(source), "-o", str(binary)],
                   check=True, capture_output=True, timeout=120)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-2000:]


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_shared_memory_accesses_are_free_of_bank_conflicts(tmp_path):
    """tests/shared_bank_check.cpp computes, from the kernels' own index functions and shared-memory layouts, the
    banks each warp touches: the SIMT products' reads of both operands and stores of C, WMMA's fragment rows (as
    ldmatrix moves them), and the epilogues' reads of S and writes of dS, for every tile policy. (The layouts before
    this check had an 8-way conflict on the fp32 Y chunk and 2-way ones in every epilogue.)"""
    binary = tmp_path / "banks"
    subprocess.run(["c++", "-std=c++20", "-pthread", "-Wno-unknown-pragmas", "-DMETRIC_KERNELS_HOST_EMULATION=1",
                    f"-I{os.path.join(ROOT, 'csrc')}", "-O1", os.path.join(ROOT, "tests", "shared_bank_check.cpp"),
                    os.path.join(ROOT, "csrc", "cuda", "host_emulation.cpp"), "-o", str(binary)],
                   check=True, capture_output=True, timeout=300)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-3000:]
