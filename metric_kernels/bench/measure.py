"""Measuring one case: time per mode, peak memory per mode, and the error against the float64 reference.

A case is one (loss, provider, N, M, D, dtype) on one device. `run_case(spec)` measures it in the calling process;
`child_main` is the same in a fresh process (the CPU default), whose peak RSS is then this case's alone.

Time. CPU: wall clock (time.perf_counter) around the forward and the backward of each repetition, after a warm-up;
CUDA: CUDA events around each, after a warm-up, with the L2 cache flushed before each repetition (as
triton.testing.do_bench does). One repetition times all three modes: forward (with autograd recording, as in
training), backward (loss.backward()), full (their sum).

Memory, above the case's inputs. CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats. CPU: the
process's peak resident set (VmHWM in /proc/self/status, reset by writing 5 to /proc/self/clear_refs) minus its
resident set just before the measured run; the provider is first run once at full size (thread pools, lazy imports,
torch.compile's graph), then glibc's malloc_trim hands the freed heap back so that only the case itself shows. forward: the peak during the forward (what it
keeps for the backward included); backward: the peak during the backward; full: the larger of the two.
"""
from __future__ import annotations

import gc
import math
import os
import time
import traceback
from typing import Dict, List, Optional

import torch

from . import providers as P


# ----------------------------------------------------------------------------------------------------- helpers
def percentile(values: List[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def is_oom(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class _RssPeak:
    """Peak resident set of this process above a baseline, in bytes."""

    def __init__(self):
        self.resettable = _status_kib("VmHWM") is not None and _reset_peak_rss()

    def start(self) -> None:
        gc.collect()
        if self.resettable:
            _reset_peak_rss()
            self.baseline = _status_kib("VmRSS") * 1024
        else:  # no /proc: ru_maxrss, which cannot be reset (a fresh process per case keeps it meaningful)
            import resource
            self.baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        if self.resettable:
            return max(_status_kib("VmHWM") * 1024 - self.baseline, 0)
        import resource
        return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.baseline, 0)

    def restart(self) -> bool:
        """Resets the peak (not the baseline) so that the next phase is seen alone; False where it cannot."""
        return self.resettable and _reset_peak_rss()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------ timing
def time_modes(fn, inputs: P.Inputs, modes, device, *, min_time: float = 0.5, min_reps: int = 5,
               max_reps: int = 100, warmup: int = 1, keep: Optional[dict] = None) -> Dict[str, List[float]]:
    """Milliseconds per repetition for each mode. `fn(inputs)` returns the loss; backward is timed when a mode
    needs it. Runs at least min_reps and until min_time seconds have been measured (at most max_reps). `keep`, a
    dict, receives the last repetition's loss value and gradients (what measure_error checks)."""
    device = torch.device(device)
    backward = any(mode in ("backward", "full") for mode in modes)
    cuda = device.type == "cuda"
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device) if cuda else None

    def once(record):
        inputs.zero_grad()
        if cuda:
            flush.zero_()
            events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            events[0].record()
            loss = fn(inputs)
            events[1].record()
            if backward:
                loss.backward()
            events[2].record()
            record.append(events)
        else:
            t0 = time.perf_counter()
            loss = fn(inputs)
            t1 = time.perf_counter()
            if backward:
                loss.backward()
            t2 = time.perf_counter()
            record.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3))
        if keep is not None:
            keep["value"] = loss.detach()
            keep["grads"] = [t.grad for t in inputs.leaves()] if backward else None
        del loss

    def to_ms(record):
        if cuda:
            torch.cuda.synchronize(device)
            return [(e[0].elapsed_time(e[1]), e[1].elapsed_time(e[2])) for e in record]
        return record

    for _ in range(max(warmup, 1) - 1):
        once([])
    _sync(device)
    started = time.perf_counter()  # the last warm-up (the first may compile) estimates one repetition
    once([])
    _sync(device)
    warm_seconds = time.perf_counter() - started
    reps = int(min(max_reps, max(min_reps, math.ceil(min_time / max(warm_seconds, 1e-6)))))
    record: list = []
    for _ in range(reps):
        once(record)
    pairs = to_ms(record)
    inputs.zero_grad()
    out = {}
    for mode in modes:
        if mode == "forward":
            out[mode] = [f for f, _ in pairs]
        elif mode == "backward":
            out[mode] = [b for _, b in pairs]
        else:
            out[mode] = [f + b for f, b in pairs]
    return out


def time_matmul(n: int, m: int, d: int, dtype: torch.dtype, device, **timing) -> List[float]:
    """Milliseconds of X @ Y^T (N x D by D x M) on the device: the rate a fused kernel is compared with."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=generator).to(device=device, dtype=dtype)
    y = torch.randn(m, d, generator=generator).to(device=device, dtype=dtype)
    inputs = P.Inputs("matmul", x, None)
    return time_modes(lambda _: x @ y.T, inputs, ("forward",), device, **timing)["forward"]


# ------------------------------------------------------------------------------------------------------ memory
def _trim_heap() -> None:
    """glibc's malloc_trim(0): returns free heap pages (in every arena) to the OS."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_memory(fn, inputs: P.Inputs, modes, device, *, warm: bool = False) -> Dict[str, float]:
    """Peak bytes above the inputs for each mode (see the module docstring). The provider is first run once at full
    size (on CUDA unless `warm` says it just was): compiling, autotuning and JIT caches allocate memory too."""
    device = torch.device(device)
    backward = any(mode in ("backward", "full") for mode in modes)
    inputs.zero_grad()
    if device.type == "cuda":
        if not warm:
            loss = fn(inputs)
            if backward:
                loss.backward()
            del loss
            inputs.zero_grad()
        _sync(device)
        _free(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        loss = fn(inputs)
        _sync(device)
        forward = torch.cuda.max_memory_allocated(device) - base
        torch.cuda.reset_peak_memory_stats(device)
        backward_peak = math.nan
        if backward:
            loss.backward()
            _sync(device)
            backward_peak = torch.cuda.max_memory_allocated(device) - base
    else:
        rss = _RssPeak()
        if rss.resettable:
            # Warm up at full size (compiling, thread pools, lazy imports, caches), then hand the freed heap back
            # to the OS, so that the measured run's pages are counted again rather than reused unseen. (Where the
            # peak cannot be reset, a warm-up would hide the case: the fresh process's first run is measured.)
            loss = fn(inputs)
            if backward:
                loss.backward()
            del loss
            inputs.zero_grad()
            gc.collect()
            _trim_heap()
        rss.start()
        loss = fn(inputs)
        forward = rss.peak()
        backward_peak = math.nan
        if backward:
            separable = rss.restart()
            loss.backward()
            backward_peak = rss.peak()
            if not separable:
                forward = math.nan if "forward" not in modes else forward
    del loss
    inputs.zero_grad()
    out = {}
    for mode in modes:
        if mode == "forward":
            out[mode] = float(forward)
        elif mode == "backward":
            out[mode] = float(backward_peak)
        else:
            out[mode] = float(max(forward, backward_peak) if not math.isnan(forward) else backward_peak)
    return out


# ------------------------------------------------------------------------------------------------------- error
def reference_fits(loss: str, n: int, m: int, device) -> bool:
    """Whether the float64 reference (about 17 N x M matrices at its peak, measured) fits comfortably in memory."""
    need = 20 * n * m * 8
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < 0.5 * free
    available = _meminfo_bytes("MemAvailable")
    return available is None or need < 0.25 * available


def _meminfo_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.detach().double(), theirs.detach().double()
    if theirs.numel() == 0:
        return 0.0
    scale = theirs.abs().max().item()
    difference = (ours - theirs).abs().max().item()
    return difference / scale if scale > 0 else difference


def measure_error(fn, inputs: P.Inputs, device, *, kept: Optional[dict] = None) -> Dict[str, float]:
    """Max relative error of the loss value ("forward") and of the gradients ("backward") against the float64
    reference on the same inputs; "full" is the larger. `kept`: the value and gradients time_modes kept, if any."""
    exact = inputs.converted(torch.float64)
    reference = P.get("reference").make(inputs.loss)
    expected = reference(exact)
    expected_grads = torch.autograd.grad(expected, exact.leaves(), allow_unused=True)
    if kept and kept.get("grads") is not None:
        value, grads = kept["value"], kept["grads"]
    else:
        inputs.zero_grad()
        value = fn(inputs)
        grads = torch.autograd.grad(value, inputs.leaves(), allow_unused=True)
    value_error = _relative(value, expected)
    grad_error = 0.0
    for ours, theirs, leaf in zip(grads, expected_grads, exact.leaves()):
        ours = torch.zeros_like(leaf) if ours is None else ours
        theirs = torch.zeros_like(leaf) if theirs is None else theirs
        grad_error = max(grad_error, _relative(ours, theirs))
    return {"forward": value_error, "backward": grad_error, "full": max(value_error, grad_error)}


# -------------------------------------------------------------------------------------------------------- case
def run_case(spec: dict) -> dict:
    """Measures one case in this process. spec: loss, provider, n, m, dim, dtype, device, with_refs, modes,
    seed, timing (dict for time_modes), memory (bool), error (bool), memory_only (bool).
    Returns {"status": "ok"|"oom"|"error", "note", "times", "memory", "errors"}."""
    device = torch.device(spec["device"])
    result = {"status": "ok", "note": "", "times": {}, "memory": {}, "errors": {}}
    provider = P.get(spec["provider"])
    modes = tuple(spec["modes"])
    inputs = fn = None
    kept: dict = {}
    started = time.perf_counter()
    try:
        fn = provider.make(spec["loss"])
        inputs = P.make_inputs(spec["loss"], spec["n"], spec["m"], spec["dim"], P.DTYPES[spec["dtype"]], device,
                               with_refs=spec["with_refs"], seed=spec.get("seed", 0))
        if device.type == "cpu":
            # Memory first, before any full-size run has grown the allocator's pools.
            if spec.get("memory", True):
                result["memory"] = measure_memory(fn, inputs, modes, device)
            if not spec.get("memory_only"):
                result["times"] = time_modes(fn, inputs, modes, device, keep=kept, **spec.get("timing", {}))
        else:
            if not spec.get("memory_only"):
                result["times"] = time_modes(fn, inputs, modes, device, keep=kept, **spec.get("timing", {}))
            if spec.get("memory", True):
                result["memory"] = measure_memory(fn, inputs, modes, device, warm=bool(result["times"]))
        if spec.get("error", True) and not spec.get("memory_only"):
            if reference_fits(spec["loss"], spec["n"], spec["m"], device):
                try:
                    result["errors"] = measure_error(fn, inputs, device, kept=kept)
                except Exception as error:  # noqa: BLE001 - the reference itself ran out: no error figure
                    if not is_oom(error):
                        raise
                    result["note"] = "float64 reference did not fit"
            else:
                result["note"] = "float64 reference too large to check against"
    except Exception as error:  # noqa: BLE001 - every failure is recorded and the run goes on
        result["status"] = "oom" if is_oom(error) else "error"
        text = f"{type(error).__name__}: {error}".strip().splitlines()
        result["note"] = text[0][:300] if text else type(error).__name__
        if result["status"] == "error" and os.environ.get("METRIC_KERNELS_BENCH_DEBUG"):
            traceback.print_exc()
    finally:
        note = getattr(fn, "note", "")
        if note:
            result["note"] = "; ".join(filter(None, (note, result["note"])))
        result["seconds"] = round(time.perf_counter() - started, 3)
        del inputs, fn, kept
        _free(device)
    return result


def _limit_address_space(limit_bytes: Optional[int]) -> None:
    """Caps this process's address space `limit_bytes` above what it maps now, so that a case too large for the
    machine fails with an allocation error (recorded as OOM) instead of waking the kernel's OOM killer."""
    if not limit_bytes:
        return
    try:
        import resource
        current = (_status_kib("VmSize") or 0) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (current + int(limit_bytes), resource.RLIM_INFINITY))
    except (ImportError, ValueError, OSError):
        pass


def child_main(spec: dict, connection) -> None:
    """Entry point of the fresh process that measures one case; sends run_case's result back."""
    for key, value in spec.get("env", {}).items():
        os.environ[key] = value
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if P.get(spec["provider"]).compiles:
        import torch._inductor.config as inductor_config
        inductor_config.compile_threads = 1  # no pool of compile workers in a process that lives for one case
    _limit_address_space(spec.get("address_space_limit"))
    try:
        connection.send(run_case(spec))
    finally:
        connection.close()
