"""Command line of the benchmark: `metric-kernels bench` and `python -m metric_kernels.bench`."""
from __future__ import annotations

import argparse
import os
import re
import sys

import torch

from . import providers as P
from .runner import Config, run

DESCRIPTION = """\
Time, peak memory, effective TFLOP/s (and the fraction of the device's matmul rate) and the error against the float64
reference, for every loss and every provider: the metric_kernels backends usable on the device ("triton" only on
CUDA), "compile" (torch.compile of the reference) and "pml" (pytorch-metric-learning). Writes results.csv,
results.json, results.md, time.png and memory.png (and max_batch.png with --max-batch) under --out and prints the
table. See bench/README.md for how to read them.

Presets (explicit options override them):
  --quick   N 256 1024 (1024 4096 on CUDA), D 128, float32, every loss, mode and provider; < 3 min on 2 CPU cores
  --full    CPU: N 256..16384, max batch within 2GiB; CUDA: N 1024..65536, float32 and bfloat16, max batch in 8GiB
"""

_CPU_TIMING = dict(min_time=0.5, min_reps=5, max_reps=100, warmup=2)
_CUDA_TIMING = dict(min_time=0.15, min_reps=10, max_reps=200, warmup=2)
PRESETS = {
    "quick": {"cpu": dict(sizes=(256, 1024), timing=dict(min_time=0.25, min_reps=3, max_reps=20, warmup=1)),
              "cuda": dict(sizes=(1024, 4096), timing=dict(min_time=0.1, min_reps=5, max_reps=100, warmup=2))},
    "full": {"cpu": dict(sizes=(256, 1024, 4096, 8192, 16384), max_batch=2 << 30,
                         timing=dict(min_time=1.0, min_reps=5, max_reps=50, warmup=2)),
             "cuda": dict(sizes=(1024, 4096, 16384, 65536), dtypes=("float32", "bfloat16"), max_batch=8 << 30,
                          timing=_CUDA_TIMING)},
}
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a memory size: a number with an optional unit (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB), "
            f"e.g. 2GiB")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a memory size must be at least 1 byte")
    return int(value)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    what = parser.add_argument_group("what to measure")
    what.add_argument("--losses", nargs="+", metavar="LOSS",
                      help=f"losses (default: all): {', '.join(P.LOSSES)}, or 'all'")
    what.add_argument("--providers", nargs="+", metavar="PROVIDER",
                      help=f"providers (default: every one available on the device): {', '.join(P.PROVIDER_NAMES)}")
    what.add_argument("--sizes", nargs="+", type=_positive_int, metavar="N", help="batch sizes N (rows of queries)")
    what.add_argument("--refs", nargs="+", type=_positive_int, metavar="M",
                      help="references M: one value for every N, or one per N (default M = N, the queries themselves; "
                           "for proxy_anchor and proxy_nca M is the number of proxies / classes)")
    what.add_argument("--dims", nargs="+", type=_positive_int, metavar="D", help="embedding widths D (default 128)")
    what.add_argument("--dtypes", nargs="+", metavar="DTYPE",
                      help=f"input dtypes (default float32): {', '.join(P.DTYPES)} (or fp32, fp16, bf16, fp64)")
    what.add_argument("--modes", nargs="+", metavar="MODE", help=f"modes (default all): {', '.join(P.MODES)}")
    what.add_argument("--device", help="cpu or cuda[:index] (default: cuda when present, else cpu)")
    preset = what.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="the quick preset (see above)")
    preset.add_argument("--full", action="store_true", help="the full preset (see above)")
    what.add_argument("--max-batch", type=parse_bytes, metavar="BUDGET",
                      help="also find, per provider, the largest N whose forward + backward fits BUDGET (e.g. 2GiB), "
                           "at the first dtype and D, and its ratio to PML's")
    what.add_argument("--max-batch-cap", type=_positive_int, metavar="N",
                      help="largest N the max-batch search tries (default 32768 on CPU, 262144 on CUDA)")
    how = parser.add_argument_group("how")
    how.add_argument("--out", default=os.path.join("out", "bench"), metavar="DIR",
                     help="output folder (default out/bench)")
    how.add_argument("--min-time", type=_positive_float, metavar="S", help="seconds of timed repetitions per case")
    how.add_argument("--reps", type=_positive_int, metavar="R", help="at least R timed repetitions per case")
    how.add_argument("--warmup", type=_positive_int, metavar="W", help="warm-up repetitions per case")
    how.add_argument("--isolation", choices=("auto", "subprocess", "inprocess"), default="auto",
                     help="a fresh process per case (CPU default: its peak RSS is the case's alone) or in this one "
                          "(CUDA default)")
    how.add_argument("--timeout", type=_positive_float, default=900.0, metavar="S",
                     help="seconds one case may take in its own process (default 900)")
    how.add_argument("--deadline", type=_positive_float, metavar="S",
                     help="seconds for the whole run; cases left after it are recorded as skipped")
    how.add_argument("--mem-limit", type=parse_bytes, metavar="BYTES",
                     help="address space a CPU case may add before it fails as OOM (default 50%% of MemAvailable)")
    how.add_argument("--compile-cache", metavar="DIR",
                     help="TORCHINDUCTOR_CACHE_DIR for the compile provider (default: metric_kernels_bench_inductor "
                          "in the temp dir, kept between runs)")
    how.add_argument("--matmul-precision", choices=("highest", "high", "medium"),
                     help="torch.set_float32_matmul_precision for the run (default: torch's, 'highest')")
    how.add_argument("--seed", type=int, default=0)
    how.add_argument("--no-error", action="store_true", help="skip the comparison with the float64 reference")
    how.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    how.add_argument("--no-progress", action="store_true", help="no progress bar")


def _choose(values, choices, aliases, what, parser):
    chosen = []
    for value in values:
        name = aliases.get(value.lower(), value.lower())
        if name == "all":
            chosen.extend(choices)
            continue
        if name not in choices:
            parser.error(f"argument --{what}: unknown value {value!r}; choose from {', '.join(choices)}")
        chosen.append(name)
    return tuple(dict.fromkeys(chosen))


def config_from_args(args, parser: argparse.ArgumentParser, argv=None) -> Config:
    """Validates the parsed options (parser.error on bad ones) and builds the run's Config."""
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"argument --device: {args.device!r} is not a device (cpu or cuda)")
        if device.type not in ("cpu", "cuda"):
            parser.error(f"argument --device: {args.device!r}: the benchmark runs on cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("argument --device: cuda was asked for but no CUDA device is available here")
    kind = device.type
    preset_name = "quick" if args.quick else "full" if args.full else ""
    settings = dict(sizes=(256, 1024, 4096), timing=dict(_CUDA_TIMING if kind == "cuda" else _CPU_TIMING))
    if preset_name:
        settings.update(PRESETS[preset_name][kind])
    losses = _choose(args.losses or ["all"], P.LOSSES, P.LOSS_ALIASES, "losses", parser)
    dtypes = _choose(args.dtypes or list(settings.get("dtypes", ("float32",))), tuple(P.DTYPES), P.DTYPE_ALIASES,
                     "dtypes", parser)
    modes = _choose(args.modes or ["all"], P.MODES, {}, "modes", parser)
    modes = tuple(m for m in P.MODES if m in modes)
    if args.providers:
        providers = _choose(args.providers, P.PROVIDER_NAMES + tuple(n for n in P._EXTRA), {}, "providers", parser)
        for name in providers:
            reason = P.unavailable_reason(name, device)
            if reason is not None:
                parser.error(f"argument --providers: {name!r} cannot run on {device}: {reason}")
    else:
        providers = tuple(P.default_providers(device))
    sizes = tuple(args.sizes or settings["sizes"])
    refs = tuple(args.refs) if args.refs else None
    if refs is not None and len(refs) not in (1, len(sizes)):
        parser.error(f"argument --refs: give one M, or one per N ({len(sizes)}); got {len(refs)}")
    timing = dict(settings["timing"])
    if args.min_time is not None:
        timing["min_time"] = args.min_time
    if args.reps is not None:
        timing["min_reps"] = args.reps
        timing["max_reps"] = max(timing["max_reps"], args.reps)
    if args.warmup is not None:
        timing["warmup"] = args.warmup
    max_batch = args.max_batch if args.max_batch is not None else settings.get("max_batch")
    return Config(losses=losses, providers=providers, sizes=sizes, refs=refs, dims=tuple(args.dims or (128,)),
                  dtypes=dtypes, modes=modes, device=str(device), out=args.out, max_batch=max_batch,
                  max_batch_cap=args.max_batch_cap, timing=timing, isolation=args.isolation, timeout=args.timeout,
                  deadline=args.deadline, mem_limit=args.mem_limit, measure_error=not args.no_error, seed=args.seed,
                  progress=not args.no_progress, plots=not args.no_plots, compile_cache=args.compile_cache,
                  matmul_precision=args.matmul_precision, preset=preset_name, argv=tuple(argv or ()))


def run_from_args(args, parser: argparse.ArgumentParser, prog: str = "metric-kernels bench") -> int:
    argv = getattr(args, "argv", None)
    command = [*prog.split(), *(argv if argv is not None else sys.argv[1:])]
    config = config_from_args(args, parser, argv=command)
    outcome = run(config)
    print(outcome["table"])
    print("wrote " + ", ".join(outcome["paths"].values()), file=sys.stderr)
    ours = set(P.BACKEND_NAMES)
    broken = [r for r in outcome["results"] if r["status"] == "error" and r["spec"]["provider"] in ours]
    for r in broken:
        print(f"error: {r['spec']['loss']} on {r['spec']['provider']} (N={r['spec']['n']}): {r['note']}",
              file=sys.stderr)
    return 1 if broken else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metric_kernels.bench")
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run_from_args(args, parser, prog="python -m metric_kernels.bench")


if __name__ == "__main__":
    sys.exit(main())
