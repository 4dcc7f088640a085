"""`metric-kernels` (also `python -m metric_kernels`): the project's command line.

  metric-kernels parity    every usable backend against pytorch-metric-learning in float64, values and gradients
  metric-kernels backends  which backends can run on a device, and why the others cannot
  metric-kernels bench     time, memory, TFLOP/s and error of every loss and provider (metric_kernels.bench)
  metric-kernels cost      what each loss's Triton kernels would make a GPU do, counted under Triton's interpreter,
                           and an H100 roofline model of it (metric_kernels.bench.cost); --backend cuda-emulated:
                           the CUDA kernels' work, counted by their host emulation (metric_kernels.bench.cuda_cost)
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

from . import functional, pml
from .backends import NAMES, available_backends
from .bench import cli as bench_cli
from .bench import cost
from .bench.providers import PROXY_LOSSES

PARITY_TOLERANCE = 1e-10
PARITY_LOSSES = ("circle", "supcon", "multi_similarity", "contrastive", "generalized_lifted_structure", "margin",
                 "nca", "batch_hard_triplet", "proxy_anchor", "proxy_nca")
PARITY_COLUMNS = ("backend", "loss", "N", "M (refs or proxies)", "D", "classes", "seed", "loss value",
                  "max rel. error (value, grads)", "result")
PARITY_CAPTION = (
    "Each row draws its own inputs from its seed (--seed {seed} plus the case's number): standard-normal float64 "
    "rows, labels uniform over `classes` (Proxy-Anchor, ProxyNCA: one proxy per class). Rows of the same shape "
    "differ in seed or classes, so their values differ; the same seed gives every backend the same inputs, so a "
    "loss's value must agree across backends. `result` is ok when the largest relative error of the value and of every "
    "gradient against PML is at most {tolerance:g}.")


def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    scale = theirs.abs().max().item() if theirs.numel() else 0.0
    difference = (ours - theirs).abs().max().item() if theirs.numel() else 0.0
    return difference / scale if scale > 0 else difference


def _parity_case(loss: str, backend: str, n: int, m: int, dim: int, classes: int, device, generator):
    """(value, max relative error of value and gradients) of one loss against PML on fresh random inputs."""
    def tensor(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device).requires_grad_()

    x = tensor(n, dim)
    labels = torch.randint(0, classes, (n,), generator=generator).to(device)
    if loss in PROXY_LOSSES:
        proxies = tensor(classes, dim)
        inputs = (x, proxies)
        ours = getattr(functional, f"{loss}_loss")(x, labels, proxies, backend=backend)
        theirs = getattr(pml, f"{loss}_loss")(x, labels, proxies)
    else:
        y = tensor(m, dim)
        y_labels = torch.randint(0, classes, (m,), generator=generator).to(device)
        inputs = (x, y)
        ours = getattr(functional, f"{loss}_loss")(x, labels, y, y_labels, backend=backend)
        # batch-hard's distances are exact (direct differences); the other losses form theirs as PML does
        with pml.exact_cdist() if loss == "batch_hard_triplet" else contextlib.nullcontext():
            theirs = getattr(pml, f"{loss}_loss")(x, labels, y, y_labels)
    errors = [_relative_error(ours.detach(), theirs.detach())]
    our_grads = torch.autograd.grad(ours, inputs, allow_unused=True)
    their_grads = torch.autograd.grad(theirs, inputs, allow_unused=True)
    for a, b in zip(our_grads, their_grads):
        a = torch.zeros_like(inputs[0]) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        errors.append(_relative_error(a, b))
    return ours.item(), max(errors)


def parity(args) -> int:
    if not pml.is_available():
        print("pytorch-metric-learning is not installed (pip install pytorch-metric-learning): nothing to compare with")
        return 2
    device = torch.device(args.device)
    backends = [name for name, reason in available_backends(device).items() if reason is None]
    print(f"# metric_kernels against pytorch-metric-learning, float64, device {device}, "
          f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}\n")
    print(PARITY_CAPTION.format(seed=args.seed, tolerance=PARITY_TOLERANCE) + "\n")
    print("| " + " | ".join(PARITY_COLUMNS) + " |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    failures = 0
    cases = [(n, n + n // 3, dim, classes) for n in args.sizes for dim in (16, 128) for classes in (4, max(n // 4, 2))]
    for backend in backends:
        for index, loss in enumerate(PARITY_LOSSES):
            for case, (n, m, dim, classes) in enumerate(cases):
                seed = args.seed + index * len(cases) + case  # the same inputs for every backend
                generator = torch.Generator().manual_seed(seed)
                value, error = _parity_case(loss, backend, n, m, dim, classes, device, generator)
                ok = error <= PARITY_TOLERANCE
                failures += not ok
                shown_m = classes if loss in PROXY_LOSSES else m
                print(f"| {backend} | {loss} | {n} | {shown_m} | {dim} | {classes} | {seed} | {value:.6g} | "
                      f"{error:.1e} | {'ok' if ok else 'FAIL'} |")
    print(f"\n{'all equal' if not failures else f'{failures} case(s) differ'} "
          f"(tolerance {PARITY_TOLERANCE:g} relative); backends not usable here: "
          + (", ".join(f"{n} ({r})" for n, r in available_backends(device).items() if r) or "none"))
    return 1 if failures else 0


def backends(args) -> int:
    for name, reason in available_backends(torch.device(args.device)).items():
        print(f"{name:10s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="metric-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("parity", help="every usable backend against pytorch-metric-learning (float64)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024], help="batch sizes N")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=parity)
    b = commands.add_parser("backends", help=f"which of {', '.join(NAMES)} can run on a device")
    b.add_argument("--device", default="cpu")
    b.set_defaults(run=backends)
    k = commands.add_parser("bench", help="time, memory, TFLOP/s and error of every loss and provider")
    bench_cli.add_arguments(k)
    k.set_defaults(run=lambda args: bench_cli.run_from_args(args, k))
    c = commands.add_parser("cost", help="dot FLOPs, exponentials, bytes, launches and host tensors of every loss's "
                                         "Triton kernels (counted under the interpreter), and an H100 model; "
                                         "--backend cuda-emulated: the CUDA kernels' work, counted by their emulation")
    cost.add_arguments(c)
    c.set_defaults(run=lambda args: cost.run_from_args(args, args.argv))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]  # the command's options, for its record of the run
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
