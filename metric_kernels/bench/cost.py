"""The GPU cost report, `metric-kernels cost`: what one training step of each loss would make a GPU do, counted, not
timed, by running the Triton kernels under Triton's CPU interpreter through the public API.

For each loss (forward + backward through its functional form, mk.circle_loss, ..., mk.proxy_anchor_loss, with
backend="triton"), each mode (deterministic=False, "default", and True, "deterministic"),
input dtype and D, it counts, from the interpreter's builder (the object every tl.* operation goes through):

    dot FLOPs     2 M N K per tl.dot, keyed by the operand dtype the kernel gives it and the input precision
    exponentials  elements of every tl.exp / tl.exp2 (other special functions: log, sqrt, ... counted apart)
    bytes         elements a load or store touches (mask true) times their size; atomics counted apart
    launches      kernel launches, and programs (the product of each launch's grid)

and, with a TorchDispatchMode, the host tensors of N x D elements or more that the step allocates (outputs of torch
ops that are new storage: not a view of an input, not an in-place or out= result), inside the Triton ops included.

From the counts it derives matmul-equivalents (dot FLOPs / 2NMD), the share of dot FLOPs on 16-bit operands,
exponentials per pair, and an H100 roofline ESTIMATE (H100_SXM below; a model, not a measurement). bench/README.md
says what each figure means and what is not counted.

The interpreter must be on before the kernels are defined, i.e. TRITON_INTERPRET=1 before metric_kernels is imported;
`metric-kernels cost` re-runs itself in a fresh process with it set when it was not (prepare_interpreter).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# The H100 model's constants, in one table (H100 SXM5 at its boost clock, dense rates without sparsity, as NVIDIA's
# H100 datasheet gives them; bench/README.md lists them with what the model leaves out).
H100_SXM = {
    "flops_16bit": 989e12,   # bf16 / fp16 tensor-core FLOP/s, fp32 accumulation (also used for 8-bit operands)
    "flops_tf32": 494e12,    # tf32 tensor-core FLOP/s (fp32 operands, input_precision "tf32")
    "flops_fma": 67e12,      # fp32 FLOP/s of the CUDA cores' FMA (fp32 "ieee" dots); fp64 dots (DMMA) run at 67e12 too
    "bytes_per_s": 3.35e12,  # HBM3 bandwidth
    "sms": 132,
    "exp_per_sm_clock": 16,  # MUFU ex2 results per SM per clock
    "clock_hz": 1.755e9,     # boost clock
}
MODEL_LABEL = "H100 model, not a measurement"

LOSSES = ("circle", "supcon", "multi_similarity", "ntxent", "contrastive", "triplet_margin", "batch_hard",
          "proxy_anchor", "arcface",
          "subcenter_arcface")
# The classifiers: N queries against C = N classes of W (D x C * sub-centres); CosFace and NormalizedSoftmax run
# ArcFace's kernels (only the O(N) margin differs), SubCenterArcFace with PML's 3 sub-centres.
CLASSIFIERS = {"arcface": 1, "subcenter_arcface": 3}
MODES = {"default": False, "deterministic": True}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
CLASSES = 16
# Useful work in matmul-equivalents (2 N M D each) of one forward + backward: the row-statistics losses need S = X Y^T
# (forward) and dX = G Y, dY = G^T X (backward); batch-hard needs the distances (forward) and an O((N + M) D) backward.
# The classifiers' unit is 2 N C D (C classes): SubCenterArcFace's 3 sub-centres make it three times the work.
USEFUL_MATMULS = {"circle": 3, "supcon": 3, "multi_similarity": 3, "ntxent": 3, "contrastive": 3, "triplet_margin": 3,
                  "proxy_anchor": 3,
                  "batch_hard": 1, "arcface": 3, "subcenter_arcface": 9}

_EXPONENTIALS = ("create_exp", "create_exp2")
_SPECIAL = ("create_log", "create_log2", "create_sqrt", "create_precise_sqrt", "create_rsqrt", "create_sin",
            "create_cos", "create_erf")
_LOADS = ("create_load", "create_masked_load", "create_tensor_pointer_load", "create_descriptor_load")
_STORES = ("create_store", "create_masked_store", "create_tensor_pointer_store", "create_descriptor_store")


# --------------------------------------------------------------------------------------------------------------------
# Counting what the kernels do
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class KernelCounts:
    """What one kernel (or all of them) asked of the GPU. dot_flops is keyed by (operand dtype, input precision)."""
    launches: int = 0
    programs: int = 0
    dot_flops: Counter = field(default_factory=Counter)
    exponentials: int = 0
    row_exponentials: int = 0  # of them, on 1-D per-row vectors (the online log-sum-exp's rescaling)
    special: int = 0
    bytes_loaded: int = 0
    bytes_stored: int = 0
    atomic_elements: int = 0
    atomic_bytes: int = 0

    def add(self, other: "KernelCounts") -> None:
        for name in ("launches", "programs", "exponentials", "row_exponentials", "special", "bytes_loaded",
                     "bytes_stored",
                     "atomic_elements", "atomic_bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.dot_flops.update(other.dot_flops)

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "dot_flops"}
        out["dot_flops"] = {f"{a}/{p}": v for (a, p), v in sorted(self.dot_flops.items())}
        return out


class InterpreterCounts:
    """Counts per kernel name; `total()` sums them."""

    def __init__(self):
        self.kernels: Dict[str, KernelCounts] = defaultdict(KernelCounts)
        self.current = "(outside a launch)"

    def here(self) -> KernelCounts:
        return self.kernels[self.current]

    def total(self) -> KernelCounts:
        total = KernelCounts()
        for counts in self.kernels.values():
            total.add(counts)
        return total


def _scalar_type(handle):
    dtype = handle.dtype
    return getattr(dtype, "scalar", dtype)


def _dtype_name(tl_dtype) -> str:
    return str(tl_dtype)  # "bf16", "fp16", "fp32", "fp64", "int1", ...


def _element_bytes(ptrs) -> int:
    # int1 is stored in a byte, as the interpreter's own pointer arithmetic assumes
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


def _active(mask, shape) -> int:
    if mask is None:
        return int(np.prod(shape, dtype=np.int64))
    return int(np.count_nonzero(np.broadcast_to(np.asarray(mask.data), shape)))


def _precision_name(precision) -> str:
    if precision is None:
        return "default"
    return getattr(precision, "name", str(precision)).lower()


@contextlib.contextmanager
def count_interpreter(counts: InterpreterCounts):
    """Counts every kernel launched under Triton's interpreter inside the block, by wrapping (never replacing) the
    interpreter builder's methods, and restores them after.

    The dot wrapper is installed outermost, over tensor_core_dots' patch (applied first, so bf16 results stay exact),
    because that patch widens bf16 operands to fp32 before the interpreter's own dot: the dtype recorded is the one
    the kernel passes, as a GPU would see it. Loads and stores are counted once, where their mask is known (below)."""
    from triton.runtime import interpreter
    from ..triton._interpreter import patch_interpreter

    patch_interpreter()
    builder = interpreter.InterpreterBuilder
    saved = {}

    def patch(owner, name, make):
        original = owner.__dict__.get(name)
        if original is None:  # not in this Triton version
            return
        saved[(owner, name)] = original
        wrapper = make(original)
        for attribute, value in getattr(original, "__dict__", {}).items():  # e.g. tensor_core_dots' _as_tensor_cores
            setattr(wrapper, attribute, value)
        setattr(owner, name, wrapper)

    def dot(original):
        def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            *batch, m, k = np.shape(a.data)
            n = np.shape(b.data)[-1]
            a_type, b_type = _dtype_name(_scalar_type(a)), _dtype_name(_scalar_type(b))
            key = (a_type if a_type == b_type else f"{a_type}x{b_type}", _precision_name(input_precision))
            counts.here().dot_flops[key] += 2 * m * n * k * int(np.prod(batch, dtype=np.int64))
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        return create_dot

    def elementwise(attribute):
        def make(original):
            def wrapper(self, arg, *args, **kwargs):
                here = counts.here()
                setattr(here, attribute, getattr(here, attribute) + int(np.size(arg.data)))
                if attribute == "exponentials" and np.ndim(arg.data) <= 1:
                    here.row_exponentials += int(np.size(arg.data))
                return original(self, arg, *args, **kwargs)
            return wrapper
        return make

    # Loads and stores are counted where the mask is known: the interpreter's create_masked_load / _store, which its
    # create_load / _store and the block- and descriptor-pointer variants call. Those variants count only when they
    # did not get there (another Triton version): all the elements they return or write.
    masked_calls = [0]

    def masked_load(original):
        def create_masked_load(self, ptrs, mask, other, *args, **kwargs):
            masked_calls[0] += 1
            counts.here().bytes_loaded += _active(mask, np.shape(ptrs.data)) * _element_bytes(ptrs)
            return original(self, ptrs, mask, other, *args, **kwargs)
        return create_masked_load

    def masked_store(original):
        def create_masked_store(self, ptrs, value, mask, *args, **kwargs):
            masked_calls[0] += 1
            counts.here().bytes_stored += _active(mask, np.shape(ptrs.data)) * _element_bytes(ptrs)
            return original(self, ptrs, value, mask, *args, **kwargs)
        return create_masked_store

    def other_load(original):
        def wrapper(self, *args, **kwargs):
            before = masked_calls[0]
            result = original(self, *args, **kwargs)
            if masked_calls[0] == before:
                counts.here().bytes_loaded += int(np.size(result.data)) * np.asarray(result.data).itemsize
            return result
        return wrapper

    def other_store(original):
        def wrapper(self, ptr, value, *args, **kwargs):
            before = masked_calls[0]
            result = original(self, ptr, value, *args, **kwargs)
            if masked_calls[0] == before:
                counts.here().bytes_stored += int(np.size(value.data)) * np.asarray(value.data).itemsize
            return result
        return wrapper

    def atomic_rmw(original):
        def create_atomic_rmw(self, op, ptr, val, mask, *args, **kwargs):
            here = counts.here()
            active = _active(mask, np.shape(ptr.data))
            here.atomic_elements += active
            here.atomic_bytes += active * _element_bytes(ptr)
            return original(self, op, ptr, val, mask, *args, **kwargs)
        return create_atomic_rmw

    def atomic_cas(original):
        def create_atomic_cas(self, ptr, *args, **kwargs):
            here = counts.here()
            active = _active(None, np.shape(ptr.data))
            here.atomic_elements += active
            here.atomic_bytes += active * _element_bytes(ptr)
            return original(self, ptr, *args, **kwargs)
        return create_atomic_cas

    def grid_dim(original):
        def set_grid_dim(self, nx, ny, nz):
            counts.here().programs += int(nx) * int(ny) * int(nz)
            return original(self, nx, ny, nz)
        return set_grid_dim

    def launch(original):
        def __call__(self, *args, **kwargs):
            outer = counts.current
            counts.current = getattr(self.fn, "__name__", "kernel")
            counts.here().launches += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                counts.current = outer
        return __call__

    try:
        patch(builder, "create_masked_load", masked_load)
        patch(builder, "create_masked_store", masked_store)
        for name in _LOADS:
            if name != "create_masked_load":
                patch(builder, name, other_load)
        for name in _STORES:
            if name != "create_masked_store":
                patch(builder, name, other_store)
        patch(builder, "create_dot", dot)
        for name in _EXPONENTIALS:
            patch(builder, name, elementwise("exponentials"))
        for name in _SPECIAL:
            patch(builder, name, elementwise("special"))
        patch(builder, "create_atomic_rmw", atomic_rmw)
        patch(builder, "create_atomic_cas", atomic_cas)
        patch(builder, "set_grid_dim", grid_dim)
        patch(interpreter.GridExecutor, "__call__", launch)
        yield counts
    finally:
        for (owner, name), original in saved.items():
            setattr(owner, name, original)


# --------------------------------------------------------------------------------------------------------------------
# Host tensors the step allocates
# --------------------------------------------------------------------------------------------------------------------

def _storage_key(tensor: torch.Tensor):
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (fake, sparse)
        return None


class HostAllocations(TorchDispatchMode):
    """Records the torch op outputs of at least `min_numel` elements that are new storage: not sharing a storage
    with any input of the op (views, in-place and out= results do), as (op, shape, dtype).

    The fused backends' own ops (namespace metric_kernels) are entered, not treated as one opaque op: their
    implementation runs with this mode active, so the gradients and fp32 accumulators they allocate are seen where
    they are made (and their outputs, already seen inside, are not counted again)."""

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel = min_numel
        self.records: List[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "metric_kernels":
            # torch.library.custom_op keeps the Python implementation (private: _init_fn); running it under this mode
            # exposes its allocations. Ops without one (the native cpu/cuda backends') stay opaque.
            from torch._library.custom_ops import _maybe_get_opdef
            definition = _maybe_get_opdef(func)
            if definition is not None:
                with self:
                    return definition._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if (isinstance(tensor, torch.Tensor) and tensor.numel() >= self.min_numel
                    and _storage_key(tensor) not in inputs):
                self.records.append({"op": str(func), "shape": list(tensor.shape),
                                     "dtype": str(tensor.dtype).replace("torch.", "")})
        return out


# --------------------------------------------------------------------------------------------------------------------
# One step of one loss
# --------------------------------------------------------------------------------------------------------------------

def prepare_interpreter() -> bool:
    """Whether this process runs the Triton kernels under Triton's interpreter, making its bf16 dots exact if so.

    The interpreter must be on before the kernels are defined, and importing metric_kernels defines them (backends.py
    imports every backend): TRITON_INTERPRET=1 has to be in the environment before that import. When it was not,
    this returns False and the caller runs in a fresh process with it set (metric-kernels cost does)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        raise RuntimeError("the cost report needs Triton (pip install triton)") from None
    from ..triton import _lse_kernels
    from ..triton._interpreter import patch_interpreter
    if os.environ.get("TRITON_INTERPRET") != "1" or not isinstance(_lse_kernels.row_norms, InterpretedFunction):
        return False
    patch_interpreter()
    return True


@dataclass(frozen=True)
class Case:
    loss: str        # one of LOSSES
    refs: str        # "ref_emb": a separate M x D reference batch; "self": ref_emb=None; "proxies": C x D proxies;
                     # "weight": a classifier's D x (C * sub-centres) W
    dtype: str       # a key of DTYPES
    dim: int
    mode: str        # a key of MODES
    size: int = 256  # N = M (= C)


def cases(dims: Sequence[int], dtypes: Sequence[str], size: int, losses: Sequence[str] = LOSSES,
          modes: Sequence[str] = tuple(MODES), self_refs: bool = True) -> List[Case]:
    out = []
    for dtype in dtypes:
        for dim in dims:
            for loss in losses:
                if loss in CLASSIFIERS or loss == "proxy_anchor":
                    refs = ("weight",) if loss in CLASSIFIERS else ("proxies",)
                else:
                    refs = ("ref_emb", "self") if self_refs else ("ref_emb",)
                for ref in refs:
                    for mode in modes:
                        out.append(Case(loss, ref, dtype, dim, mode, size))
    return out


def _inputs(case: Case, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    dtype, n = DTYPES[case.dtype], case.size

    def rows():
        return torch.randn(n, case.dim, generator=generator).to(dtype).requires_grad_()

    def labels():
        return torch.randint(0, CLASSES, (n,), generator=generator)

    x, x_labels = rows(), labels()
    if case.refs == "weight":
        weight = torch.randn(case.dim, n * CLASSIFIERS[case.loss], generator=generator).to(dtype).requires_grad_()
        return (x, weight), (x, x_labels, weight)
    if case.refs == "self":
        return (x,), (x, x_labels)
    y, y_labels = rows(), labels()
    if case.refs == "proxies":
        return (x, y), (x, x_labels, y)
    return (x, y), (x, x_labels, y, y_labels)


def _loss_fn(loss: str):
    import metric_kernels as mk
    return {"circle": mk.circle_loss, "supcon": mk.supcon_loss, "multi_similarity": mk.multi_similarity_loss,
            "ntxent": mk.ntxent_loss, "contrastive": mk.contrastive_loss, "triplet_margin": mk.triplet_margin_loss,
            "batch_hard": mk.batch_hard_triplet_loss,
            "proxy_anchor": mk.proxy_anchor_loss, "arcface": mk.arcface_loss,
            "subcenter_arcface": mk.subcenter_arcface_loss}[loss]


@contextlib.contextmanager
def _matmul_precision(precision: str):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def count_step(case: Case, seed: int = 0) -> dict:
    """Runs one forward + backward of `case` through the public API and returns its counts (see `row`)."""
    if not prepare_interpreter():
        raise RuntimeError("the Triton kernels run under the interpreter only with TRITON_INTERPRET=1 set before "
                           "metric_kernels is imported (metric-kernels cost sets it up itself)")
    leaves, args = _inputs(case, seed)
    fn = _loss_fn(case.loss)
    phases = {}
    allocations = HostAllocations(min_numel=case.size * case.dim)
    # fp32 dots run as IEEE fp32 ("highest", torch's default): the kernels use tf32 only where torch allows it
    with _matmul_precision("highest"):
        with allocations:
            counts = InterpreterCounts()
            with count_interpreter(counts):
                loss = fn(*args, backend="triton", deterministic=MODES[case.mode])
            phases["forward"] = counts
            counts = InterpreterCounts()
            with count_interpreter(counts):
                torch.autograd.grad(loss, leaves)
            phases["backward"] = counts
    return {"phases": phases, "host_tensors": allocations.records}


# --------------------------------------------------------------------------------------------------------------------
# Figures and the model
# --------------------------------------------------------------------------------------------------------------------

def _is_16bit(key: str) -> bool:
    return all(part in ("bf16", "fp16") or part.startswith("fp8") for part in key.split("/")[0].split("x"))


def _flop_classes(dot_flops: Dict[str, int]) -> Dict[str, int]:
    """Dot FLOPs by the unit that would run them: 16-bit tensor cores, tf32 tensor cores, FMA (fp32 IEEE, fp64)."""
    classes = {"16bit": 0, "tf32": 0, "fma": 0}
    for key, flops in dot_flops.items():
        operands, precision = key.split("/")
        if _is_16bit(key):
            classes["16bit"] += flops
        elif operands == "fp32" and precision.startswith("tf32"):
            classes["tf32"] += flops * (3 if precision == "tf32x3" else 1)
        else:
            classes["fma"] += flops
    return classes


def h100_model(flops: Dict[str, int], bytes_moved: int, exponentials: int) -> dict:
    """The roofline estimate (a model, not a measurement): compute time (the three dot rates, summed), memory time
    and exponential time; the step takes the largest."""
    c = H100_SXM
    compute = flops["16bit"] / c["flops_16bit"] + flops["tf32"] / c["flops_tf32"] + flops["fma"] / c["flops_fma"]
    memory = bytes_moved / c["bytes_per_s"]
    exp = exponentials / (c["sms"] * c["exp_per_sm_clock"] * c["clock_hz"])
    bound, seconds = max((("compute", compute), ("memory", memory), ("exp", exp)), key=lambda item: item[1])
    return {"h100_compute_us": compute * 1e6, "h100_memory_us": memory * 1e6, "h100_exp_us": exp * 1e6,
            "h100_time_us": seconds * 1e6, "h100_bound": bound}


def row(case: Case, counted: dict) -> dict:
    """One row of the report: the case, every count and every derived figure (the schema of cost.json / cost.md)."""
    n = m = case.size
    pair_matmul = 2.0 * n * m * case.dim
    total = KernelCounts()
    for counts in counted["phases"].values():
        total.add(counts.total())
    forward = counted["phases"]["forward"].total()
    dot_flops = {f"{a}/{p}": v for (a, p), v in total.dot_flops.items()}
    flops = _flop_classes(dot_flops)
    all_flops = sum(dot_flops.values())
    bytes_moved = total.bytes_loaded + total.bytes_stored + total.atomic_bytes
    model = h100_model(flops, bytes_moved, total.exponentials)
    useful = USEFUL_MATMULS[case.loss] * pair_matmul
    host = counted["host_tensors"]
    return {
        "loss": case.loss, "refs": case.refs, "dtype": case.dtype, "D": case.dim, "mode": case.mode,
        "N": n, "M": m,
        "launches": total.launches, "programs": total.programs,
        "dot_flops": all_flops, "dot_flops_16bit": flops["16bit"], "dot_flops_tf32": flops["tf32"],
        "dot_flops_fma": flops["fma"],
        "matmul_equivalents": all_flops / pair_matmul,
        "forward_matmul_equivalents": sum(forward.dot_flops.values()) / pair_matmul,
        "dot_16bit_share": flops["16bit"] / all_flops if all_flops else 0.0,
        "exponentials": total.exponentials,
        "exponentials_per_pair": (total.exponentials - total.row_exponentials) / (n * m),
        "forward_exponentials_per_pair": (forward.exponentials - forward.row_exponentials) / (n * m),
        "row_exponentials": total.row_exponentials, "row_exponentials_per_pair": total.row_exponentials / (n * m),
        "special_functions": total.special,
        "bytes_loaded": total.bytes_loaded, "bytes_stored": total.bytes_stored,
        "atomic_elements": total.atomic_elements, "atomic_bytes": total.atomic_bytes,
        "host_tensors_nd": len(host),
        "host_tensors": "; ".join(f"{r['op']} {'x'.join(map(str, r['shape']))} {r['dtype']}" for r in host),
        **model,
        "useful_matmul_equivalents": USEFUL_MATMULS[case.loss],
        "h100_bf16_peak_fraction": (useful / (model["h100_time_us"] * 1e-6) / H100_SXM["flops_16bit"]
                                    if model["h100_time_us"] > 0 else 0.0),
        "dot_flops_by_operands": " ".join(f"{key}={value}" for key, value in sorted(dot_flops.items())),
    }


def kernel_detail(case: Case, counted: dict) -> dict:
    """Per-kernel counts of one case, forward and backward apart (cost.json's "kernels")."""
    kernels = {f"{phase}:{name}": kernel.as_dict()
               for phase, counts in counted["phases"].items() for name, kernel in counts.kernels.items()}
    return {"loss": case.loss, "refs": case.refs, "dtype": case.dtype, "D": case.dim, "mode": case.mode,
            "kernels": kernels}


# --------------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------------

COLUMNS = ["loss", "refs", "dtype", "D", "mode", "N", "M", "launches", "programs", "dot_flops", "dot_flops_16bit",
           "dot_flops_tf32", "dot_flops_fma", "matmul_equivalents", "forward_matmul_equivalents", "dot_16bit_share",
           "exponentials", "exponentials_per_pair", "forward_exponentials_per_pair", "row_exponentials",
           "row_exponentials_per_pair", "special_functions",
           "bytes_loaded", "bytes_stored", "atomic_elements", "atomic_bytes", "host_tensors_nd", "host_tensors",
           "h100_compute_us", "h100_memory_us", "h100_exp_us", "h100_time_us", "h100_bound",
           "useful_matmul_equivalents", "h100_bf16_peak_fraction", "dot_flops_by_operands"]


def markdown(rows: List[dict], meta: dict) -> str:
    size = meta["size"]
    lines = [
        f"# GPU cost report: {meta['machine']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}; `{meta['command']}`",
        "",
        f"What the Triton kernels would make a GPU do in one forward + backward through the public API "
        f"(backend=\"triton\"), counted under Triton's interpreter (its one tile config: {meta['interpreter_tiles']}); "
        f"N = M = {size} (Proxy-Anchor: {size} embeddings against {size} proxies), {CLASSES} classes; refs: "
        f"`ref_emb` a separate reference batch, `self` ref_emb=None, `weight` a classifier's W: {size} embeddings "
        f"against M = {size} classes of one column (SubCenterArcFace: 3 sub-centre columns each; CosFace and "
        f"NormalizedSoftmax run ArcFace's kernels). *matmul-eq*: dot FLOPs / 2NMD. *16-bit*: share "
        f"of the dot FLOPs on 16-bit operands. *exp/pair*: exponentials on pair tiles / NM; *row exp*: "
        f"those on per-row vectors (the online log-sum-exp's rescaling) / NM. *MB ld*, *MB st*: bytes the programs "
        f"load and store (masked-off elements not counted); *atomics*: elements added atomically. *host NxD*: host "
        f"tensors of N x D elements or more that the step allocates. The last three columns are an "
        f"**{MODEL_LABEL}**: max(compute, memory, exponentials) at H100 SXM rates, and the useful work (row-statistics "
        f"losses and ArcFace 3, SubCenterArcFace 9, batch-hard 1 matmul-equivalents) over that time as a fraction of the bf16 tensor-core peak. "
        f"bench/README.md explains each figure; cost.json has every count, per kernel too.",
        "",
        "| loss | refs | dtype | D | mode | launches | programs | matmul-eq | 16-bit | exp/pair | row exp | MB ld "
        "| MB st | atomics | host NxD | H100 model us | bound | of bf16 peak |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['loss']} | {r['refs']} | {r['dtype']} | {r['D']} | {r['mode']} | {r['launches']} | "
            f"{r['programs']} | {r['matmul_equivalents']:.3f} | {r['dot_16bit_share']:.0%} | "
            f"{r['exponentials_per_pair']:.3f} | {r['row_exponentials_per_pair']:.3f} | "
            f"{r['bytes_loaded'] / 1e6:.2f} | {r['bytes_stored'] / 1e6:.3f} | "
            f"{r['atomic_elements']} | {r['host_tensors_nd']} | {r['h100_time_us']:.3g} | {r['h100_bound']} | "
            f"{r['h100_bf16_peak_fraction']:.1%} |")
    lines += ["", "Model constants (H100 SXM): " + ", ".join(f"{k} = {v:g}" for k, v in H100_SXM.items()) + "."]
    return "\n".join(lines) + "\n"


def meta_for(command: str, size: int, date: Optional[str] = None, machine: str = "CPU, Triton interpreter") -> dict:
    import triton
    from ..triton import ops
    tiles = ops._configs()[0].kwargs  # under the interpreter, the one config it runs
    return {"machine": machine, "date": date or time.strftime("%Y-%m-%d"), "command": command, "size": size,
            "interpreter_tiles": f"BLOCK_M = {tiles['BLOCK_M']}, BLOCK_N = {tiles['BLOCK_N']}",
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "model": MODEL_LABEL, "h100_constants": dict(H100_SXM)}


def run(dims: Sequence[int] = (64, 128, 256), dtypes: Sequence[str] = ("bf16", "fp32"), size: int = 256,
        losses: Sequence[str] = LOSSES, progress=None):
    """(rows, per-kernel details) of every case."""
    rows, details = [], []
    for case in cases(dims, dtypes, size, losses):
        started = time.perf_counter()
        counted = count_step(case)
        rows.append(row(case, counted))
        details.append(kernel_detail(case, counted))
        if progress:
            progress(f"{case.loss} {case.refs} {case.dtype} D={case.dim} {case.mode}: "
                     f"{time.perf_counter() - started:.1f} s")
    return rows, details


def write(out_dir: str, rows: List[dict], details: List[dict], meta: dict, render=markdown,
          columns: Sequence[str] = COLUMNS) -> str:
    """Writes cost.md (the table, from render(rows, meta)) and cost.json (meta, columns, one flat row per case,
    per-kernel details)."""
    os.makedirs(out_dir, exist_ok=True)
    table = render(rows, meta)
    with open(os.path.join(out_dir, "cost.md"), "w") as f:
        f.write(table)
    # one row (and one case's kernel details) per line: readable, and diffs of a rerun show which cases changed
    lines = lambda items: ",\n".join("  " + json.dumps(item) for item in items)  # noqa: E731
    with open(os.path.join(out_dir, "cost.json"), "w") as f:
        f.write(f'{{"meta": {json.dumps(meta)},\n "columns": {json.dumps(list(columns))},\n'
                f' "rows": [\n{lines(rows)}],\n "kernels": [\n{lines(details)}]}}\n')
    return table


# --------------------------------------------------------------------------------------------------------------------
# Command line (metric-kernels cost)
# --------------------------------------------------------------------------------------------------------------------

DEFAULT_MACHINE = "CPU, Triton interpreter"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("triton", "cuda-emulated"), default="triton",
                        help="whose kernels to count: Triton's under its interpreter (default), or the CUDA kernels "
                             "under their host emulation (metric_kernels.bench.cuda_cost)")
    parser.add_argument("--out", default="out/cost", help="folder for cost.md and cost.json (default out/cost)")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256], metavar="D")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--size", type=int, default=256, help="N = M (= C for Proxy-Anchor), default 256")
    parser.add_argument("--date", help="the date written in the report (default: today)")
    parser.add_argument("--machine", default=DEFAULT_MACHINE, help="the machine named in the report")


def run_from_args(args, argv: Iterable[str]) -> int:
    """Runs the report in this process when the interpreter can be switched on here, else in a fresh one."""
    argv = list(argv)
    if args.backend == "cuda-emulated":
        from . import cuda_cost
        return cuda_cost.run_from_args(args, argv)
    if not prepare_interpreter():
        import subprocess
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "metric_kernels", "cost", *argv], env=env)
    command = "metric-kernels cost" + ("" if not argv else " " + " ".join(argv))
    rows, details = run(args.dims, args.dtypes, args.size, args.losses,
                        progress=lambda text: print(text, file=sys.stderr, flush=True))
    table = write(args.out, rows, details, meta_for(command, args.size, args.date, args.machine))
    print(table, flush=True)
    return 0
