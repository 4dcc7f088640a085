"""Runs a benchmark: every case, the matmul baselines, the max-batch searches; then writes the outputs."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import torch

from . import measure
from . import providers as P
from . import report


@dataclasses.dataclass
class Config:
    losses: Tuple[str, ...] = P.LOSSES
    providers: Tuple[str, ...] = ()          # empty: every provider available on the device
    sizes: Tuple[int, ...] = (256, 1024)
    refs: Optional[Tuple[int, ...]] = None   # None: M = N and the references are the queries themselves
    dims: Tuple[int, ...] = (128,)
    dtypes: Tuple[str, ...] = ("float32",)
    modes: Tuple[str, ...] = P.MODES
    device: str = "cpu"
    out: str = os.path.join("out", "bench")
    max_batch: Optional[int] = None          # bytes
    max_batch_cap: Optional[int] = None      # largest N a max-batch search tries (None: a default per device)
    max_batch_start: int = 1024
    timing: dict = dataclasses.field(default_factory=dict)   # time_modes keywords
    isolation: str = "auto"                  # "subprocess" (a fresh process per case), "inprocess", "auto"
    timeout: float = 900.0                   # seconds per case in a subprocess
    deadline: Optional[float] = None         # seconds for the whole run; later cases are recorded as skipped
    mem_limit: Optional[int] = None          # bytes of address space a CPU case may add (None: from MemAvailable)
    measure_error: bool = True
    matmul: bool = True
    seed: int = 0
    progress: bool = True
    plots: bool = True
    compile_cache: Optional[str] = None      # TORCHINDUCTOR_CACHE_DIR (None: default_compile_cache())
    matmul_precision: Optional[str] = None
    preset: str = ""
    argv: Tuple[str, ...] = ()

    def resolved_isolation(self) -> str:
        if self.isolation != "auto":
            return self.isolation
        return "inprocess" if torch.device(self.device).type == "cuda" else "subprocess"


def _pairs(config: Config) -> List[Tuple[int, int, bool]]:
    """(N, M, with_refs) per size."""
    if config.refs is None:
        return [(n, n, False) for n in config.sizes]
    refs = config.refs if len(config.refs) == len(config.sizes) else config.refs * len(config.sizes)
    return [(n, m, True) for n, m in zip(config.sizes, refs)]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {model}, {torch.get_num_threads()} threads"


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return ""


def default_compile_cache() -> str:
    """Where torch.compile keeps its cache between runs (outside --out, so results folders stay small)."""
    return os.path.join(tempfile.gettempdir(), "metric_kernels_bench_inductor")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class FreshProcesses:
    """A fresh process per case, forked from a server that has imported torch and metric_kernels but run nothing
    (so no thread pool or allocator state is inherited, and starting one costs milliseconds, not an import)."""

    def __init__(self, preload: List[str]):
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(preload)

    def run(self, spec: dict, timeout: float, target=measure.child_main) -> dict:
        """Runs target(spec, connection) in a fresh process; what it sends back, or a status saying why nothing came."""
        receiver, sender = self.context.Pipe(duplex=False)
        process = self.context.Process(target=target, args=(spec, sender), daemon=True)
        with _main_file_hidden_if_missing():
            process.start()
        sender.close()
        result, timed_out = None, False
        give_up = time.monotonic() + timeout
        while result is None:
            if receiver.poll(0.1):
                try:
                    result = receiver.recv()
                except EOFError:
                    break
            elif not process.is_alive():
                if receiver.poll(0):
                    continue
                break
            elif time.monotonic() > give_up:
                timed_out = True
                process.kill()
                break
        process.join(10)
        receiver.close()
        if result is not None:
            return result
        code = process.exitcode
        empty = {"times": {}, "memory": {}, "errors": {}}
        if timed_out:
            return {"status": "timeout", "note": f"no result within {timeout:g} s (--timeout)", **empty}
        if code is not None and code < 0:
            import signal
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            status = "oom" if -code == signal.SIGKILL else "error"
            return {"status": status, "note": f"process killed by {name}", **empty}
        return {"status": "error", "note": f"process exited with code {code} without a result", **empty}


@contextlib.contextmanager
def _main_file_hidden_if_missing():
    """multiprocessing re-imports the parent's __main__ from its file in each child; a script read from stdin has
    no such file, so hide the name while the child is started (it needs nothing from __main__)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    hide = path is not None and getattr(main, "__spec__", None) is None and not os.path.exists(path)
    if hide:
        del main.__file__
    try:
        yield
    finally:
        if hide:
            main.__file__ = path


def _mem_limit(config: Config) -> Optional[int]:
    if config.mem_limit is not None:
        return config.mem_limit or None
    available = measure._meminfo_bytes("MemAvailable")
    return int(0.5 * available) if available else None


class Runner:
    def __init__(self, config: Config):
        self.config = config
        self.device = torch.device(config.device)
        self.isolation = config.resolved_isolation()
        self.providers = list(config.providers) or P.default_providers(self.device)
        self.records: List[dict] = []
        self.results: List[dict] = []
        self.started = time.monotonic()
        self.subprocesses = None
        self.env = {}
        self.common = {"device": device_name(self.device), "torch_version": torch.__version__,
                       "triton_version": triton_version()}

    # ---------------------------------------------------------------------------------------------- plumbing
    def _out_of_time(self) -> bool:
        return self.config.deadline is not None and time.monotonic() - self.started > self.config.deadline

    def _execute(self, spec: dict) -> dict:
        if self._out_of_time():
            return {"status": "skipped", "note": "time budget (--deadline) spent", "times": {}, "memory": {},
                    "errors": {}}
        if self.isolation == "subprocess" and not P.is_registered_fake(spec["provider"]):
            if self.subprocesses is None:
                self.subprocesses = FreshProcesses(self._preload())
            spec = dict(spec, env=self.env, threads=torch.get_num_threads(),
                        address_space_limit=_mem_limit(self.config))
            return self.subprocesses.run(spec, self.config.timeout)
        return measure.run_case(spec)

    def _preload(self) -> List[str]:
        """What the fork server imports once, so that no case pays for it (importing runs no torch op)."""
        preload = ["torch", "metric_kernels", "metric_kernels.bench.measure"]
        if "pml" in self.providers:
            preload.append("pytorch_metric_learning.losses")
        if "compile" in self.providers:
            preload += ["torch._dynamo", "torch._inductor.compile_fx"]
        return preload

    def _spec(self, loss, provider, n, m, with_refs, dim, dtype, **extra) -> dict:
        spec = dict(loss=loss, provider=provider, n=n, m=m, with_refs=with_refs, dim=dim, dtype=dtype,
                    device=str(self.device), modes=list(self.config.modes), seed=self.config.seed,
                    timing=dict(self.config.timing), memory=True, error=self.config.measure_error)
        spec.update(extra)
        return spec

    def _setup(self) -> None:
        config = self.config
        os.makedirs(config.out, exist_ok=True)
        cache = config.compile_cache or default_compile_cache()
        os.makedirs(cache, exist_ok=True)
        self.env = {"TORCHINDUCTOR_CACHE_DIR": os.path.abspath(cache)}
        os.environ.update(self.env)
        if config.matmul_precision:
            torch.set_float32_matmul_precision(config.matmul_precision)

    # ------------------------------------------------------------------------------------------------- phases
    def _matmul(self, n, m, d, dtype) -> Optional[List[float]]:
        if not self.config.matmul or self._out_of_time():
            return None
        size = P.DTYPES[dtype].itemsize * (n * m + (n + m) * d)
        if self.device.type == "cuda":
            room = torch.cuda.mem_get_info(self.device)[0] * 0.5
        else:  # this process is not a disposable one: stay well inside the machine
            room = (measure._meminfo_bytes("MemAvailable") or 1 << 62) * 0.25
        if size > room:
            return None
        try:
            timing = dict(self.config.timing)
            return measure.time_matmul(n, m, d, P.DTYPES[dtype], self.device, **timing)
        except Exception as error:  # noqa: BLE001
            if not measure.is_oom(error):
                raise
            return None
        finally:
            measure._free(self.device)

    def cases(self) -> List[dict]:
        config = self.config
        return [self._spec(loss, provider, n, m, with_refs, dim, dtype)
                for dtype in config.dtypes for dim in config.dims for n, m, with_refs in _pairs(config)
                for loss in config.losses for provider in self.providers]

    def run(self) -> dict:
        saved = {key: os.environ.get(key) for key in ("TORCHINDUCTOR_CACHE_DIR",)}
        precision = torch.get_float32_matmul_precision()
        try:
            return self._run()
        finally:
            torch.set_float32_matmul_precision(precision)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def _run(self) -> dict:
        self._setup()
        cases = self.cases()
        searches = [(loss, provider) for loss in self.config.losses for provider in self.providers] \
            if self.config.max_batch else []
        bar = _progress(len(cases) + len(searches), self.config.progress)
        matmul_ms: Dict[tuple, Optional[List[float]]] = {}
        try:
            if searches:  # first: with a --deadline, the searches are the figures most worth having
                found = {}
                for loss, provider in searches:
                    bar.set_description(f"max batch {loss} {provider}")
                    found[(loss, provider)] = self.max_batch(loss, provider)
                    bar.update(1)
                self.records += report.max_batch_records(found, self.config.max_batch, self.common, _now())
            for spec in cases:
                bar.set_description(f"{spec['loss']} {spec['provider']} N={spec['n']} {spec['dtype']}")
                shape = (spec["dtype"], spec["n"], spec["m"], spec["dim"])
                if shape not in matmul_ms:
                    matmul_ms[shape] = self._matmul(spec["n"], spec["m"], spec["dim"], spec["dtype"])
                    if matmul_ms[shape] is not None:
                        self.records += report.matmul_records(shape, matmul_ms[shape], self.common, _now())
                result = self._execute(spec)
                self.results.append(dict(spec=_public(spec), **result))
                self.records += report.case_records(spec, result, matmul_ms[shape], self.common, _now())
                bar.update(1)
        finally:
            bar.close()
        return self.finish()

    def max_batch(self, loss: str, provider: str) -> dict:
        """The largest N whose forward + backward stays within the budget: doubling, then bisection."""
        config, budget = self.config, self.config.max_batch
        dtype, dim = config.dtypes[0], config.dims[0]
        fixed_m = config.refs[0] if config.refs else None
        cap = config.max_batch_cap or (1 << 18 if self.device.type == "cuda" else 1 << 15)
        probes = []

        def fits(n: int) -> bool:
            m = fixed_m or n
            spec = self._spec(loss, provider, n, m, fixed_m is not None, dim, dtype, modes=["full"],
                              memory_only=True, error=False)
            result = self._execute_probe(spec, budget)
            peak = result.get("memory", {}).get("full")
            ok = result["status"] == "ok" and peak is not None and peak <= budget
            probes.append({"n": n, "status": result["status"], "peak_bytes": peak, "fits": ok,
                           "note": result.get("note", "")})
            if result["status"] in ("error", "timeout", "skipped"):
                raise _StopSearch(result["status"], result.get("note", ""))
            return ok

        low, high, status, note = 0, None, "ok", ""
        try:
            n = min(config.max_batch_start, cap)
            if fits(n):
                low = n
                while low < cap:
                    n = min(low * 2, cap)
                    if not fits(n):
                        high = n
                        break
                    low = n
            else:
                high = n
                n //= 2
                while n >= 1:
                    if fits(n):
                        low = n
                        break
                    high, n = n, n // 2
            while high is not None and high - low > max(low // 32, 1):
                mid = (low + high) // 2
                if mid > 64:
                    mid -= mid % 8
                if mid <= low or mid >= high:
                    mid = (low + high) // 2
                if fits(mid):
                    low = mid
                else:
                    high = mid
            if high is None:
                status, note = "capped", f"fits at the search cap N={cap} (--max-batch-cap)"
        except _StopSearch as stop:
            status, note = stop.status, f"search stopped: {stop.note}"
        return {"max_n": low, "status": status, "note": note, "dtype": dtype, "dim": dim, "m": fixed_m,
                "probes": probes}

    def _execute_probe(self, spec: dict, budget: int) -> dict:
        if self.isolation == "subprocess" and not P.is_registered_fake(spec["provider"]):
            if self._out_of_time():
                return {"status": "skipped", "note": "time budget (--deadline) spent", "memory": {}}
            if self.subprocesses is None:
                self.subprocesses = FreshProcesses(self._preload())
            # Past the budget (with room for the allocator's slack) the case cannot fit: stop it there.
            limit = min(int(budget * 1.25) + (512 << 20), _mem_limit(self.config) or 1 << 62)
            spec = dict(spec, env=self.env, threads=torch.get_num_threads(), address_space_limit=limit)
            return self.subprocesses.run(spec, self.config.timeout)
        return self._execute(spec)

    def finish(self) -> dict:
        config = self.config
        meta = {
            "command": " ".join(config.argv) if config.argv else " ".join(sys.argv),
            "argv": list(config.argv),
            "preset": config.preset,
            "device": str(self.device),
            "device_name": self.common["device"],
            "date": _now(),
            "torch_version": torch.__version__,
            "triton_version": self.common["triton_version"],
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "isolation": self.isolation,
            "providers": self.providers,
            "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("argv",)},
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "pml_version": _pml_version(),
        }
        cases = [{"case": {k: r["spec"][k] for k in ("loss", "provider", "n", "m", "dim", "dtype")},
                  "status": r["status"], "note": r.get("note", ""), "seconds": r.get("seconds")}
                 for r in self.results]
        paths = report.write_all(self.records, meta, config.out, plots=config.plots, cases=cases)
        table = report.markdown(self.records, meta)
        with open(os.path.join(config.out, "results.md"), "w") as handle:
            handle.write(table)
        paths["md"] = os.path.join(config.out, "results.md")
        return {"records": self.records, "meta": meta, "paths": paths, "table": table, "results": self.results}


class _StopSearch(Exception):
    def __init__(self, status, note):
        super().__init__(note)
        self.status, self.note = status, note


def _public(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k not in ("env",)}


def _pml_version() -> str:
    try:
        import pytorch_metric_learning
        return pytorch_metric_learning.__version__
    except ImportError:
        return ""


class _NoBar:
    def set_description(self, *_):
        pass

    def update(self, *_):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def run(config: Config) -> dict:
    """Runs the benchmark described by config; prints nothing. Returns records, meta, paths and the table."""
    return Runner(config).run()
