"""Cross-batch memory at scale: one training step of CrossBatchMemory (enqueue the batch, its loss against the whole
memory, backward) with a fused backend, the reference, and PML's CrossBatchMemory, each in a fresh process.

    python -m metric_kernels.bench.xbm --memory-size 65536 --batch 256 --out DIR

Figures per (loss, provider): peak memory above the filled memory and the inputs (peak RSS on the CPU,
max_memory_allocated on CUDA) and the median step time. Writes DIR/xbm.csv (the benchmark's CSV schema, x = memory
size) and DIR/xbm.md, and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from . import report
from .runner import FreshProcesses, device_name, triton_version

LOSSES = ("circle", "supcon", "multi_similarity", "ntxent", "contrastive", "batch_hard")
# (our module, PML's loss inside its CrossBatchMemory) per loss
_MODULES = {"circle": ("CircleLoss", "CircleLoss"), "supcon": ("SupConLoss", "SupConLoss"),
            "multi_similarity": ("MultiSimilarityLoss", "MultiSimilarityLoss"), "ntxent": ("NTXentLoss", "NTXentLoss"),
            "contrastive": ("ContrastiveLoss", "ContrastiveLoss"),
            "batch_hard": ("BatchHardTripletLoss", "TripletMarginLoss")}
PROVIDERS = ("cpu", "reference", "pml")


def _build(loss: str, provider: str, dim: int, memory_size: int):
    if provider == "pml":
        from pytorch_metric_learning import losses, miners
        inner = getattr(losses, _MODULES[loss][1])()
        miner = miners.BatchHardMiner() if loss == "batch_hard" else None
        return losses.CrossBatchMemory(inner, dim, memory_size=memory_size, miner=miner)
    import metric_kernels as mk
    inner = getattr(mk, _MODULES[loss][0])
    return mk.CrossBatchMemory(inner(backend=provider), dim, memory_size=memory_size)


def _step_peak(spec: dict, connection) -> None:
    """Child process: fill the memory, then time `steps` steps and measure the peak of each."""
    loss, provider, dim, memory_size, batch, device, steps = (
        spec[key] for key in ("loss", "provider", "dim", "memory_size", "batch", "device", "steps"))
    try:
        from .measure import _RssPeak, _trim_heap
        torch.manual_seed(0)
        xbm = _build(loss, provider, dim, memory_size).to(device)
        classes = max(2, memory_size // 64)
        # A full memory, written directly (PML's state names, which ours shares): what is measured is a step
        # against it, not the filling.
        xbm.embedding_memory = torch.randn(memory_size, dim, device=device)
        xbm.label_memory = torch.randint(0, classes, (memory_size,), device=device)
        xbm.has_been_filled, xbm.queue_idx = True, 0
        rss = _RssPeak()
        x = torch.randn(batch, dim, device=device, requires_grad=True)
        labels = torch.randint(0, classes, (batch,), device=device)
        times = []
        for _ in range(steps):
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                _trim_heap()  # hand the previous step's freed pages back, so that this step's are counted again
                rss.start()  # resets the peak (VmHWM) and takes the current RSS as the base
            start = time.perf_counter()
            value = xbm(x, labels)
            value.backward()
            if device == "cuda":
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            else:
                peak = rss.peak()
            times.append((time.perf_counter() - start) * 1e3)
            x.grad = None
        connection.send({"status": "ok", "peak": peak, "times": times})
    except Exception as error:  # recorded, the run goes on
        connection.send({"status": "error", "note": f"{type(error).__name__}: {error}"[:300]})


def measure(subprocesses: FreshProcesses, loss, provider, dim, memory_size, batch, device, steps=3,
            timeout=1200) -> dict:
    """One (loss, provider) in a fresh process forked from the server (a fork of this process could inherit a
    busy thread pool and hang)."""
    spec = dict(loss=loss, provider=provider, dim=dim, memory_size=memory_size, batch=batch, device=device,
                steps=steps)
    return subprocesses.run(spec, timeout, target=_step_peak)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metric_kernels.bench.xbm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-size", type=int, default=65536)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="out/xbm")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    common = dict(device=device_name(torch.device(args.device)), torch_version=torch.__version__,
                  triton_version=triton_version())
    records, rows = [], []
    preload = ["torch", "metric_kernels", "metric_kernels.bench.measure"]
    if "pml" in args.providers:
        preload.append("pytorch_metric_learning.losses")
    subprocesses = FreshProcesses(preload)
    for loss in args.losses:
        for provider in args.providers:
            result = measure(subprocesses, loss, provider, args.dim, args.memory_size, args.batch, args.device)
            kernel = f"xbm_{loss}"
            if result["status"] == "ok":
                peak_mib = result["peak"] / 2**20
                median = statistics.median(result["times"])
                for metric, unit, value in (("peak_memory", "MiB", peak_mib), ("time", "ms", median)):
                    records.append(dict(kernel=kernel, provider=provider, mode="full", metric=metric, unit=unit,
                                        x=args.memory_size, value_p50=value, value_p20=value, value_p80=value,
                                        timestamp=stamp, **common))
                rows.append(f"| {loss} | {provider} | {args.memory_size} | {args.batch} | {peak_mib:.1f} | "
                            f"{median:.1f} |")
            else:
                rows.append(f"| {loss} | {provider} | {args.memory_size} | {args.batch} | {result['status']} | "
                            f"{result.get('note', '')} |")
            print(rows[-1], flush=True)
    table = "\n".join([
        f"# CrossBatchMemory, memory_size {args.memory_size}: {common['device']}, {stamp}",
        "",
        f"torch {torch.__version__}; `python -m metric_kernels.bench.xbm {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        "One training step (enqueue, loss against the full memory, backward), D = "
        f"{args.dim}, float32. Peak memory is above the filled memory and the inputs.",
        "",
        "| loss | provider | memory size | batch | peak MiB | step ms |",
        "|---|---|---:|---:|---:|---:|",
        *rows, ""])
    with open(os.path.join(args.out, "xbm.md"), "w") as handle:
        handle.write(table)
    report.write_csv(records, os.path.join(args.out, "xbm.csv"))
    with open(os.path.join(args.out, "xbm.json"), "w") as handle:
        json.dump({"records": records, "command": sys.argv}, handle, indent=1)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
