"""Malformed direct calls of the cuda ops, each of which must raise a RuntimeError: run as a script (a process of
its own, so that a crash shows as an exit signal with faulthandler's trace instead of killing the test run). Prints one
line per call, flushed, so the last line before a crash names the call. tests/test_cuda_gpu.py runs it; on a GPU
machine bench/gpu_run.sh reruns a failing probe under cuda-gdb for a native backtrace.

The H200 run of 2026-11-28 crashed (SIGSEGV) on the first call below, which the cpu and cuda_emulated ops built
against the same torch (2.11) answer with a RuntimeError."""
import faulthandler
import sys

import torch

import metric_kernels  # noqa: F401  (loads the ops)


def main() -> int:
    faulthandler.enable()
    ops = torch.ops.metric_kernels
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 6, generator=g).cuda(), torch.randn(30, 6, generator=g).cuda()
    labels, y_labels = torch.randint(0, 3, (20,), generator=g).cuda(), torch.randint(0, 3, (30,), generator=g).cuda()
    stats = ops.cuda_lse_rows(x, y, labels, y_labels, -1, 0, 0, 0.25, 8.0, True)
    args = (x, y, labels, y_labels, -1, 0, 0, 0.25, 8.0, True, True, True)
    positive = torch.zeros(20, dtype=torch.long, device="cuda")
    calls = {  # name: (call, what its message must say)
        "cpu op, wrong grad shape": (lambda: ops.cpu_lse_rows_backward(
            torch.randn(4, 19), stats.cpu(), x.cpu(), y.cpu(), labels.cpu(), y_labels.cpu(), -1, 0, 0, 0.25, 8.0,
            True, True, True), "grad must be 4 x N"),
        "cuda lse_rows, integer rows": (lambda: ops.cuda_lse_rows(x.int(), y.int(), labels, y_labels, -1, 0, 0, 0.25,
                                                                   8.0, True), "float32, float64, float16 or bfloat16"),
        "cuda lse_rows, unknown kind": (lambda: ops.cuda_lse_rows(x, y, labels, y_labels, -1, 9, 0, 0.25, 8.0, True),
                                        "is not a loss of the engine"),
        "cuda lse_rows_backward, wrong grad shape": (lambda: ops.cuda_lse_rows_backward(
            torch.randn(4, 19, device="cuda"), stats, *args), "grad must be 4 x N"),
        "cuda lse_rows_backward, grad on the CPU": (lambda: ops.cuda_lse_rows_backward(
            torch.randn(4, 20), stats, *args), "must be on the rows' device"),
        "cuda triplet_distances, short indices": (lambda: ops.cuda_triplet_distances(
            x, y, positive[:19], positive, True), "positive and negative must be int64, one per row"),
    }
    failures = 0
    for name, (call, message) in calls.items():
        print(f"calling: {name}", flush=True)
        try:
            call()
        except RuntimeError as error:
            said = str(error)
            print(f"raised: {name}: {said.splitlines()[0]}", flush=True)
            if message not in said:
                print(f"WRONG MESSAGE: {name}: expected {message!r}", flush=True)
                failures += 1
        else:
            print(f"DID NOT RAISE: {name}", flush=True)
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
