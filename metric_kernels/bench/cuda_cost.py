"""The CUDA kernels' cost report, `metric-kernels cost --backend cuda-emulated`: what one training step of each loss
would make a GPU do with backend="cuda", counted, not timed, by the host emulation that runs the CUDA kernels' own
code on the CPU (csrc/cuda/host_emulation.h, its work counters: the op cuda_emulated_work_counters).

Per step (forward + backward through the public API, backend="cuda-emulated", the cases of metric_kernels.bench.cost):

    dot FLOPs     by operand type: 16-bit and tf32 (a WMMA mma_sync, 2 M N K for the warp), fp32 and fp64 (a SIMT
                  step's fmas); the kernels' 64 x 64 tiles are padded, so edges count whole tiles
    exponentials  those of the per-pair math (csrc/epilogue.h's exponential)
    atomics       elements added to global memory atomically
    bytes copied  what the asynchronous copies (cp.async) bring into shared memory, zero fill included; plain loads
                  (W's transposed tiles, labels, row scales) and the stores to global memory are not counted

and the host tensors of N x D elements or more the step allocates, as in the Triton report.
"""
from __future__ import annotations

import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from . import cost

# host_emulation.h's Work, in its order
WORK = ("dot_16bit", "dot_tf32", "dot_fp32", "dot_fp64", "atomic_elements", "exponentials", "async_copy_bytes")
MACHINE = "CPU, CUDA kernels under their host emulation"


def _counters(reset: bool = True) -> Dict[str, int]:
    return dict(zip(WORK, torch.ops.metric_kernels.cuda_emulated_work_counters(reset).tolist()))


def count_step(case: cost.Case, seed: int = 0) -> dict:
    """Runs one forward + backward of `case` on the emulated CUDA kernels and returns the work of each phase."""
    from ..cuda_emulated import unavailable_reason
    reason = unavailable_reason(torch.device("cpu"))
    if reason:
        raise RuntimeError(reason)
    leaves, args = cost._inputs(case, seed)
    fn = cost._loss_fn(case.loss)
    allocations = cost.HostAllocations(min_numel=case.size * case.dim)
    phases = {}
    # fp32 products as IEEE fp32 ("highest", torch's default): tf32 only where torch allows it
    with cost._matmul_precision("highest"):
        with allocations:
            _counters()
            loss = fn(*args, backend="cuda-emulated", deterministic=cost.MODES[case.mode])
            phases["forward"] = _counters()
            torch.autograd.grad(loss, leaves)
            phases["backward"] = _counters()
    return {"phases": phases, "host_tensors": allocations.records}


def row(case: cost.Case, counted: dict) -> dict:
    """One row of the report (the schema of COLUMNS)."""
    n = m = case.size
    pair_matmul = 2.0 * n * m * case.dim
    forward, backward = counted["phases"]["forward"], counted["phases"]["backward"]
    total = {key: forward[key] + backward[key] for key in WORK}
    dots = ("dot_16bit", "dot_tf32", "dot_fp32", "dot_fp64")
    flops = sum(total[key] for key in dots)
    host = counted["host_tensors"]
    return {
        "loss": case.loss, "refs": case.refs, "dtype": case.dtype, "D": case.dim, "mode": case.mode, "N": n, "M": m,
        "dot_flops": flops, "dot_flops_16bit": total["dot_16bit"], "dot_flops_tf32": total["dot_tf32"],
        "dot_flops_fma": total["dot_fp32"] + total["dot_fp64"],
        "matmul_equivalents": flops / pair_matmul,
        "forward_matmul_equivalents": sum(forward[key] for key in dots) / pair_matmul,
        "dot_16bit_share": total["dot_16bit"] / flops if flops else 0.0,
        "exponentials": total["exponentials"],
        "exponentials_per_pair": total["exponentials"] / (n * m),
        "forward_exponentials_per_pair": forward["exponentials"] / (n * m),
        "atomic_elements": total["atomic_elements"],
        "async_copy_bytes": total["async_copy_bytes"],
        "host_tensors_nd": len(host),
        "host_tensors": "; ".join(f"{r['op']} {'x'.join(map(str, r['shape']))} {r['dtype']}" for r in host),
    }


COLUMNS = ["loss", "refs", "dtype", "D", "mode", "N", "M", "dot_flops", "dot_flops_16bit", "dot_flops_tf32",
           "dot_flops_fma", "matmul_equivalents", "forward_matmul_equivalents", "dot_16bit_share", "exponentials",
           "exponentials_per_pair", "forward_exponentials_per_pair", "atomic_elements", "async_copy_bytes",
           "host_tensors_nd", "host_tensors"]


def markdown(rows: List[dict], meta: dict) -> str:
    size = meta["size"]
    lines = [
        f"# CUDA cost report: {meta['machine']}, {meta['date']}",
        "",
        f"torch {meta['torch']}; `{meta['command']}`",
        "",
        f"What the CUDA kernels (backend=\"cuda\") would make a GPU do in one forward + backward through the public "
        f"API, counted by their host emulation (backend=\"cuda-emulated\", the kernels' own code on the CPU); the "
        f"cases of the Triton report below it: N = M = {size}, {cost.CLASSES} classes, `weight` a classifier's W of "
        f"{size} classes (SubCenterArcFace: 3 sub-centre columns each). *matmul-eq*: dot FLOPs / 2NMD (the 64 x 64 "
        f"tiles' padded products), *fwd* the forward's share; *16-bit*: share of the dot FLOPs on 16-bit operands; "
        f"*exp/pair*: exponentials of the per-pair math / NM; *atomics*: elements added atomically; *MB copied*: bytes "
        f"the asynchronous copies bring into shared memory (plain loads and global stores not counted); *host NxD*: "
        f"host tensors of N x D elements or more that the step allocates. Counts, not timings: no GPU ran them.",
        "",
        "| loss | refs | dtype | D | mode | matmul-eq | fwd | 16-bit | exp/pair | atomics | MB copied | host NxD |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['loss']} | {r['refs']} | {r['dtype']} | {r['D']} | {r['mode']} | {r['matmul_equivalents']:.3f} | "
            f"{r['forward_matmul_equivalents']:.3f} | {r['dot_16bit_share']:.0%} | {r['exponentials_per_pair']:.3f} | "
            f"{r['atomic_elements']} | {r['async_copy_bytes'] / 1e6:.2f} | {r['host_tensors_nd']} |")
    return "\n".join(lines) + "\n"


def meta_for(command: str, size: int, date: Optional[str] = None, machine: str = MACHINE) -> dict:
    import platform
    return {"machine": machine, "date": date or time.strftime("%Y-%m-%d"), "command": command, "size": size,
            "torch": torch.__version__, "python": platform.python_version()}


def run(dims: Sequence[int], dtypes: Sequence[str], size: int, losses: Sequence[str] = cost.LOSSES,
        progress=None) -> List[dict]:
    rows = []
    for case in cost.cases(dims, dtypes, size, losses):
        started = time.perf_counter()
        rows.append(row(case, count_step(case)))
        if progress:
            progress(f"{case.loss} {case.refs} {case.dtype} D={case.dim} {case.mode}: "
                     f"{time.perf_counter() - started:.1f} s")
    return rows


def run_from_args(args, argv: Iterable[str]) -> int:
    argv = list(argv)
    command = "metric-kernels cost" + ("" if not argv else " " + " ".join(argv))
    rows = run(args.dims, args.dtypes, args.size, args.losses,
               progress=lambda text: print(text, file=sys.stderr, flush=True))
    machine = args.machine if args.machine != cost.DEFAULT_MACHINE else MACHINE
    table = cost.write(args.out, rows, [], meta_for(command, args.size, args.date, machine), render=markdown,
                       columns=COLUMNS)
    print(table, flush=True)
    return 0
