"""Ahead-of-time compilation of the Triton kernels' specialisations for sm_80 and sm_90a, without a GPU.

Triton's compiler runs to a cubin on any machine (ptxas ships with it), so the CPU test suite can prove that what
the ops launch lowers for the GPU: what the interpreter, which runs the kernels as numpy, never checks. For the
specialisations the ops in metric_kernels/triton/ops.py launch (kernel x row dtype x loss kind x backward flags x
autotune config kept by the ops' own pruner for the architecture's shared memory x D width) this records registers,
spills, shared memory and whether the products run on tensor cores (mma.sync on sm_80, wgmma.mma_async on sm_90a),
and checks them (problems()).

    python -m metric_kernels.triton._aot compile [--level L] [--arch 80 90] [--jobs J] [--json OUT] [--list]
    python -m metric_kernels.triton._aot report [--level L] [--versions 3.7.1 3.6.0=core] [--out DIR]
    python -m metric_kernels.triton._aot render DIR/report.json   # report.md again from the JSON

`compile` uses this interpreter's triton. `report` runs `compile` in subprocesses (TRITON_INTERPRET=0: under the
interpreter the kernels are not compilable objects), one per triton version, side by side; a version other than this
environment's (3.6.0, the GPU machine's) is installed once into .cache/triton-<version> (pip --no-deps --target)
and put first on PYTHONPATH. It writes report.md and report.json (default bench/results/compile/).

The whole product ("full", LEVELS) is some 5,500 specialisations per version, about 4 CPU-seconds each; the other
levels (_selection) compile the heaviest case of each kernel and dtype and a growing share of the rest: "core" (each
kernel and dtype once), "ci" (the CPU test's, with triton 3.7.1; 3.6.0 runs "core"), "sweep" (every kept config at
the widest D; the heavy test and the committed report).

What is compiled is the launch of contiguous rows: unit stride along D (Triton specialises an integer 1 to a
constant), 16-byte aligned pointers, D and row strides divisible by 16; plus, from "ci" up, one unaligned launch
(strides as integers, no divisibility). Integers are i32 (Triton's type for values below 2^31), pointers typed by
what the ops pass (_pointer_types). The margin-softmax kernels are compiled with W in both of its layouts (its own
D x J storage and a transposed J x D view: _classifier_integers) and with one sub-centre or several.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]
PROJECT_TRITON = "3.7.1"
GPU_MACHINE_TRITON = "3.6.0"
VERSIONS = (PROJECT_TRITON, GPU_MACHINE_TRITON)
# cudaDevAttrMaxSharedMemoryPerBlockOptin: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
ARCHS = {80: ("sm_80", 166912), 90: ("sm_90a", 232448)}
# (label, torch dtype name, triton pointer type, dot precision)
DTYPES = (("bf16", "bfloat16", "bf16", "ieee"), ("fp16", "float16", "fp16", "ieee"),
          ("fp32-tf32", "float32", "fp32", "tf32"), ("fp32-ieee", "float32", "fp32", "ieee"),
          ("fp64", "float64", "fp64", "ieee"))
SIXTEEN_BIT = ("bf16", "fp16")
LEVELS = ("core", "ci", "sweep", "full")
CLASSIFIER_KERNELS = ("margin_softmax_forward", "margin_softmax_backward_rows", "margin_softmax_backward_columns")
DOT_KERNELS = ("lse_rows_forward", "pair_sums_forward", "lse_rows_backward_rows", "lse_rows_backward_columns",
               "batch_hard_select", "triplet_margin_positives", "triplet_margin_forward") + CLASSIFIER_KERNELS
KINDS = (0, 1, 2, 3, 4, 5, 6)  # circle, supcon, proxy_anchor, multi_similarity, ntxent, contrastive, triplet_margin
# The kinds each loss kernel is launched with (ops.lse_rows, ops.lse_rows_backward): the log-sum-exp pass all but
# Contrastive (NT-Xent: its first sweep), the pass of sums NT-Xent (its second) and Contrastive, the triplet margin
# loss's own two forward sweeps (which have no KIND argument), the backward every kind. The first is the kernel's primary kind,
# which _selection compiles most (on the cosine).
KERNEL_KINDS = {"lse_rows_forward": (0, 1, 2, 3, 4), "pair_sums_forward": (4, 5),
                "triplet_margin_positives": (6,), "triplet_margin_forward": (6,),
                "lse_rows_backward_rows": KINDS, "lse_rows_backward_columns": KINDS}
# The loss kernels' pair values (metric_kernels/_pairs.py) with and without normalising, for every kind but Circle
# (the cosine only), and the lowest level that compiles each: (pair value, normalize) -> level.
PAIR_CASES = {(0, True): "core", (2, True): "ci", (2, False): "sweep", (1, True): "sweep", (1, False): "full",
              (0, False): "sweep"}
BACKWARD_PASSES = ("rows", "columns")  # of ops._pruner's passes
# (WITH_DY, ATOMIC_DX) as ops.lse_rows_backward sets them, each with the types its dx_ptr gets: "rows" the gradient
# itself, "acc" an accumulator or the fp32 partial the column pass completes (the references are the queries).
ROW_FLAGS = (((True, False), ("rows",)), ((False, False), ("rows", "acc")), ((True, True), ("acc",)),
             ((False, True), ("acc",)))


@dataclasses.dataclass
class Variant:
    name: str
    kernel: str
    dtype: str
    width: str  # "64", "128", "256" (all of D on chip), "chunked-256" (D walked in chunks of 256), "unaligned-64"
    kind: Optional[int]
    flags: str
    config: str
    num_warps: int
    num_stages: int
    maxnreg: Optional[int]  # the config's register ceiling (ops.FALLBACK_REGISTERS), None for ptxas's own choice
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    attrs: List[int]  # argument positions with 16-divisibility
    sweep: bool  # part of a whole config sweep (else a single representative config)
    product_rows: List[int]  # the M dimension of each tl.dot (wgmma needs 64)
    shared_estimate: Optional[int]  # ops.shared_memory_estimate, what the pruner compares with the limit
    integer_constants: List[str] = dataclasses.field(default_factory=list)  # integers Triton specialises to 1


def _ops():
    from . import ops
    return ops


def _gpu_configs():
    """ops._configs() as on a GPU (under the interpreter it is a single config)."""
    ops = _ops()
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        return ops._configs()
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _config_label(config) -> str:
    kw = config.kwargs
    ceiling = f"r{config.maxnreg}" if config.maxnreg else ""
    return f"m{kw['BLOCK_M']}n{kw['BLOCK_N']}w{config.num_warps}s{config.num_stages}{ceiling}"


class _Rows:
    """What ops._pruner reads of the x_ptr argument."""

    def __init__(self, element_size: int):
        self._element_size = element_size
        self.device = None

    def element_size(self) -> int:
        return self._element_size


def kept_configs(arch: int, block_d: int, element_size: int, kernel_pass: str, full_d: bool = True,
                 precision: str = "ieee", aligned: bool = True, pair_value: int = 0, with_dy: bool = False,
                 multi: Optional[bool] = None, with_dw: bool = False):
    """ops._configs() (the GPU list) as the ops' pruner keeps it on a GPU of the architecture (its shared memory):
    ops._pruner(kernel_pass), or with `multi` (the MULTI constexpr) the margin-softmax kernels'
    (margin_softmax_ops._pruning)."""
    ops = _ops()
    limit = ARCHS[arch][1]
    if multi is None:
        prune = ops._pruner(kernel_pass)["early_config_prune"]
    else:
        from . import margin_softmax_ops
        prune = margin_softmax_ops._pruning(kernel_pass)["early_config_prune"]
    original = ops._shared_memory_limit
    ops._shared_memory_limit = lambda device: limit
    try:
        return prune(_gpu_configs(), {"x_ptr": _Rows(element_size), "BLOCK_D": block_d, "FULL_D": full_d,
                                      "PRECISION": precision, "ALIGNED": int(aligned), "PAIR_VALUE": pair_value,
                                      "WITH_DY": with_dy, "MULTI": bool(multi), "WITH_DW": with_dw})
    finally:
        ops._shared_memory_limit = original


def _widths(element_size: int):
    """(label, BLOCK_D, FULL_D) of D's width classes, as ops._shape_args picks them: all of D on chip at 16 to 256
    where allowed, and D walked in chunks of the widest tile."""
    ops = _ops()
    widest = ops.MAX_FULL_D[element_size]
    seen = []
    for d in (16, 32, 64, 128, 256, 2 * widest + 16):
        width = ops.block_d(d, element_size)
        full = d <= width
        entry = (str(width) if full else f"chunked-{width}", width, full)
        if entry not in seen:
            seen.append(entry)
    return seen


def _pointer_types(kernel: str, rows: str, acc: str, dx: str = "rows", partial: str = "rows") -> Dict[str, str]:
    """Pointer arguments by name that are not in the accumulator type: the rows (and the gradients written in their
    dtype) and the int64 labels and choices. Every other pointer (norms, statistics, the gradient of the statistics,
    the gradient scale, the loss parameters, accumulators, t buffers, batch-hard values) is in the accumulator
    type."""
    r, a = f"*{rows}", f"*{acc}"
    common = dict(x_ptr=r, y_ptr=r, x_labels_ptr="*i64", y_labels_ptr="*i64")
    return {
        "lse_rows_forward": common,
        "pair_sums_forward": common,
        "triplet_margin_positives": dict(common, rank_ptr="*i64"),
        "triplet_margin_forward": common,
        "lse_rows_backward_rows": dict(common, dx_ptr=r if dx == "rows" else a, rank_ptr="*i64"),
        "lse_rows_backward_columns": dict(common, partial_ptr=r if partial == "rows" else a, dy_ptr=r,
                                          rank_ptr="*i64"),
        "batch_hard_select": dict(common, choice_ptr="*i64"),
        "finish_gradient": dict(x_ptr=r, out_ptr=r),
        "margin_softmax_forward": dict(x_ptr=r, w_ptr=r, labels_ptr="*i64"),
        "margin_softmax_backward_rows": dict(x_ptr=r, w_ptr=r, labels_ptr="*i64", dx_ptr=r if dx == "rows" else a),
        "margin_softmax_backward_columns": dict(x_ptr=r, w_ptr=r, labels_ptr="*i64", dw_ptr=r),
        "row_norms": dict(x_ptr=r),
        "triplet_distances": dict(x_ptr=r, y_ptr=r, positive_ptr="*i64", negative_ptr="*i64"),
        "triplet_distances_backward_rows": dict(x_ptr=r, y_ptr=r, positive_ptr="*i64", negative_ptr="*i64", dx_ptr=r),
        "triplet_distances_backward_references": dict(x_ptr=r, y_ptr=r, entry_row_ptr="*i64", offset_ptr="*i64",
                                                      dy_ptr=r),
    }[kernel]


def _kernel(name: str):
    from . import _batch_hard_kernel, _lse_kernels, _margin_softmax_kernels, _triplet_kernel
    module = (_batch_hard_kernel if name == "batch_hard_select" else
              _triplet_kernel if name.startswith("triplet_distances") else
              _margin_softmax_kernels if name.startswith("margin_softmax_") else _lse_kernels)
    return getattr(module, name)


def _signature(kernel: str, pointers: Dict[str, str], acc: str, constexprs: Dict[str, object], aligned: bool,
               integers: Optional[Dict[str, object]] = None):
    """(signature, constexprs, 16-divisible argument positions) of a launch: unit D strides become constants when
    aligned (contiguous rows), other integers i32, param_* fp32. `integers` overrides integer arguments by name: an
    int is the value Triton specialises to a constant (1), "i32" one without divisibility, "i32/16" one divisible by
    16 when aligned."""
    fn = _kernel(kernel)
    constexprs = dict(constexprs)
    integers = integers or {}
    signature, attrs = {}, []
    for position, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(integers.get(name), int):
            signature[name] = "constexpr"
            constexprs[name] = integers[name]
        elif name in integers:
            signature[name] = "i32"
            if integers[name] == "i32/16":
                attrs.append(position)
        elif name in ("stride_xd", "stride_yd"):  # the ops give the kernels rows of unit column stride
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, f"*{acc}")
            attrs.append(position)
        elif name.startswith("param_"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in ("D", "stride_xn", "stride_yn"):
                attrs.append(position)
    missing = set(fn.arg_names) - set(signature)
    assert not missing, (kernel, missing)
    return signature, constexprs, attrs if aligned else []


def _product_rows(kernel: str, constexprs) -> List[int]:
    """Rows (M) of each product: S = X Y^T has BLOCK_M, dX = P Y BLOCK_M, dY = P^T X BLOCK_N."""
    m, n = constexprs.get("BLOCK_M"), constexprs.get("BLOCK_N")
    return {"lse_rows_forward": [m], "pair_sums_forward": [m], "batch_hard_select": [m],
            "triplet_margin_positives": [m], "triplet_margin_forward": [m],
            "lse_rows_backward_rows": [m, m] + ([n] if constexprs.get("WITH_DY") else []),
            "lse_rows_backward_columns": [m, n], "margin_softmax_forward": [m],
            "margin_softmax_backward_rows": [m, m] + ([n] if constexprs.get("WITH_DW") else []),
            "margin_softmax_backward_columns": [m, n]}.get(kernel, [])


TRIPLET_DIMS = tuple(2 ** k for k in range(4, 14))  # D = 16 .. 8192: ops._triplet_blocks' tiles


def _plain_cases(ops, element, widths, widest):
    """The kernels without products or autotuning: (kernel, width label, BLOCK_D, flags, constexprs, pointer
    options, heaviest flags?, the lowest level that compiles it: "core", "ci", "sweep" (every flag set at that width)
    or "full", integer arguments for _signature)."""
    from . import margin_softmax_ops

    cases = []
    # finish_gradient's launches: the engine's (one accumulator, contiguous rows and output), the margin-softmax
    # dX from per-split partials, and dW (D x J) from accumulators of W's columns, W in either layout
    # (_classifier_integers)
    finishes = (("", dict(SPLITS=1, stride_on="i32/16", stride_od=1), True),
                ("splits", dict(SPLITS="i32", stride_on="i32/16", stride_od=1), False),
                ("dw,w=columns", dict(SPLITS=1, stride_xn=1, stride_xd="i32", stride_on=1, stride_od="i32"), False),
                ("dw,w=classes", dict(SPLITS=1, stride_xn="i32/16", stride_xd=1, stride_on=1, stride_od="i32"),
                 False))
    seen = set()
    for width_label, block_d, full_d in reversed(widths):  # the widest first: it marks dW's block for "ci"
        if full_d:  # finish_gradient's D tile is the backward's (D in chunks: more programs of the widest tile)
            for normalize in (True, False):
                for label, integers, engine in finishes:
                    if not normalize and not engine:
                        continue  # the classifiers always normalise
                    at = "core" if width_label == widest and not label else "ci" if width_label == widest else "full"
                    block = margin_softmax_ops.finish_block_d(block_d, label.startswith("dw"))
                    flags = ",".join(filter(None, (f"normalize={int(normalize)}", label)))
                    if (block, flags) in seen:  # dW's narrower block: the same launch for several widths
                        continue
                    seen.add((block, flags))
                    cases.append(("finish_gradient", str(block), block, flags,
                                  dict(BLOCK_R=32, NORMALIZE=normalize, maxnreg=ops.FINISH_REGISTERS), {}, normalize,
                                  at, integers))
    norm_widths = {}  # row_norms: block_d(D) up to 256 columns, chunks of 256 beyond
    for d in (16, 32, 64, 128, 256, 1024):
        norm_widths[ops.block_d(d, element) if d <= 256 else 256] = "core" if d == 1024 else "full"
    for block_d, count in norm_widths.items():
        cases.append(("row_norms", str(block_d), block_d, "", dict(BLOCK_R=ops._NORM_BLOCK_ROWS), {}, True, count,
                      None))
    for d in TRIPLET_DIMS:  # the whole of D on chip, rows per program so that a tile holds about 4096 values
        block_rows, block_d, row_warps, reference_warps = ops._triplet_blocks(d, element)
        count = {4096: "core", 256: "ci", 8192: "ci", 64: "sweep"}.get(d, "full")
        for normalize in (True, False):
            tile = dict(BLOCK_R=block_rows, NORMALIZE=normalize, num_warps=row_warps)
            cases.append(("triplet_distances", str(block_d), block_d, f"normalize={int(normalize)}", tile, {},
                          normalize, count, None))
            cases.append(("triplet_distances_backward_rows", str(block_d), block_d, f"normalize={int(normalize)}",
                          tile, {}, normalize, count, None))
            cases.append(("triplet_distances_backward_references", str(block_d), block_d,
                          f"normalize={int(normalize)}", dict(NORMALIZE=normalize, num_warps=reference_warps), {},
                          normalize, count, None))
    return cases


# The margin-softmax kernels' launches (margin_softmax_ops): W in its own D x J storage ("columns": read along the
# classes, pruned as unaligned; with one sub-centre the classes' stride is 1, which Triton makes a constant) or as a
# transposed view of a J x D matrix ("classes": read along D as the engine reads rows), one sub-centre or several
# (MULTI 1, pooled by the largest, or 2, by SoftTriple's softmax; K then an integer), and the row pass's flags:
# PARTIAL (dX in per-split fp32 partials) and WITH_DW (the default backward's atomic dW). The primary launch is the
# heaviest: several sub-centres, W's own layout, both gradients from the row pass writing dX itself.
CLASSIFIER_PRIMARY = dict(PARTIAL=False, WITH_DW=True, MULTI=1, layout="columns")


def _classifier_integers(layout: str, multi: bool) -> Dict[str, object]:
    """The W strides and K as the ops pass them (margin_softmax_ops._launch_args), for _signature."""
    k = "i32" if multi else 1
    if layout == "columns":  # stride_wd = J, stride_wj = 1, stride_wc = K
        return dict(K=k, stride_wd="i32", stride_wj=1, stride_wc=k)
    return dict(K=k, stride_wd=1, stride_wj="i32/16", stride_wc="i32/16")  # stride_wj = D, stride_wc = K D


def _classifier_cases():
    """(kernel, pass, flags label, constexprs, pointer options, layout, primary?, a neighbour of the primary (one
    flag off it, or it)?) of every margin-softmax launch."""
    kernels = (("margin_softmax_forward", "forward", ()), ("margin_softmax_backward_rows", "rows",
                                                           ("PARTIAL", "WITH_DW")),
               ("margin_softmax_backward_columns", "columns", ()))
    cases = []
    for kernel, kernel_pass, flag_names in kernels:
        # MULTI: 0 one column per class, 1 several pooled by the largest, 2 by a softmax (SoftTriple)
        for values in itertools.product(*[[False, True]] * len(flag_names), [0, 1, 2]):
            for layout in ("columns", "classes"):
                flags = dict(zip(flag_names + ("MULTI",), values))
                setting = dict(flags, layout=layout)
                off = sum(setting[key] != CLASSIFIER_PRIMARY[key] for key in setting)
                label = ",".join([f"{key.lower()}={int(value)}" for key, value in flags.items()] + [f"w={layout}"])
                options = dict(dx="acc" if flags.get("PARTIAL") else "rows")
                cases.append((kernel, kernel_pass, label, flags, options, layout, off == 0, off <= 1))
    return cases


def _plain_selected(level: str, heaviest: bool, count: str) -> bool:
    """Whether a level compiles a _plain_cases entry: "full" all; "sweep" the heaviest flags at every width and every
    flag set at the widths marked up to "sweep"; "ci" and "core" the heaviest flags at the widths marked up to them."""
    if level == "full":
        return True
    if level == "sweep":
        return heaviest or count != "full"
    return heaviest and LEVELS.index(count) <= LEVELS.index(level)


def _selection(level: str, dtype: str, primary: bool, heaviest_or_kind0: bool, width: str, widest: str):
    """How many autotune configs of a (kernel, dtype, kind, flags, width) a level compiles: "all" the kept ones,
    "one" (the kept config with the largest tiles) or None. KIND 0 stands for the kernel's primary kind
    (KERNEL_KINDS).

    core:  each kernel and dtype once: the heaviest flags, KIND 0, the widest on-chip D.
    ci:    core, plus D in chunks (bf16, fp32-tf32, fp64) and, for bf16, half the widest D (the pruner keeps larger,
           non-square tiles there, which the interpreter's 64 x 64 tile never types), every flag set (KIND 0), every
           loss kind (heaviest flags) and the unaligned launch.
    sweep: every kept config at the widest on-chip D for the heaviest flags and KIND 0; one config for the other
           widths, and at the widest D for every other flag set (KIND 0) and loss kind (heaviest flags); the
           unaligned launch.
    full:  the whole product.
    """
    if level == "full":
        return "all"
    at_widest = width == widest
    if level == "sweep":
        if primary:
            return "all" if at_widest else "one"
        return "one" if at_widest and heaviest_or_kind0 else None
    if primary and at_widest:
        return "one"
    if level == "ci":
        if primary and width.startswith("chunked") and dtype in ("bf16", "fp32-tf32", "fp64"):
            return "one"
        if dtype == "bf16" and at_widest and heaviest_or_kind0:
            return "one"
        if dtype == "bf16" and primary and width == str(int(widest) // 2):
            return "one"
    return None


def variants(arch: int, level: str = "sweep") -> List[Variant]:
    """The specialisations compiled for sm_<arch> at a selection level (LEVELS; "full" is everything the ops
    launch)."""
    import torch

    import triton

    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    from . import margin_softmax_ops

    ops = _ops()
    out: List[Variant] = []

    def add(kernel, dtype, acc, width_label, block_d, full_d, kind, flags, config, constexprs, pointers, sweep,
            aligned=True, element=None, backward=False, integers=None):
        estimate, ceiling = None, None
        if config is None:
            ceiling = constexprs.pop("maxnreg", None)
            warps, stages, config_label = constexprs.pop("num_warps", 4), constexprs.pop("num_stages", 3), "-"
        else:
            ceiling = config.maxnreg
            estimate = ops.shared_memory_estimate(config, block_d, element, backward, full_d is not False)
            warps, stages, config_label = config.num_warps, config.num_stages, _config_label(config)
            constexprs = dict(constexprs, **config.kwargs)
        constexprs = dict(constexprs, BLOCK_D=block_d)
        if full_d is not None:
            constexprs["FULL_D"] = full_d
        signature, constexprs, attrs = _signature(kernel, pointers, acc, constexprs, aligned, integers)
        label = width_label if aligned else f"unaligned-{width_label}"
        kind_label = "" if kind is None else f",kind={kind}"
        name = f"{kernel}[{dtype},D={label}{kind_label}{',' + flags if flags else ''},{config_label}]"
        out.append(Variant(name, kernel, dtype, label, kind, flags, config_label, warps, stages, ceiling, signature,
                           constexprs, attrs, sweep, _product_rows(kernel, constexprs), estimate,
                           sorted(k for k, v in (integers or {}).items() if isinstance(v, int))))

    for dtype, torch_name, rows, precision in DTYPES:
        torch_dtype = getattr(torch, torch_name)
        element = torch_dtype.itemsize
        acc_tl = ops._accumulator(torch_dtype)
        acc = "fp64" if acc_tl == ops.tl.float64 else "fp32"
        widths = _widths(element)
        widest = max((w for w in widths if w[2]), key=lambda w: w[1])[0]
        base = dict(ACC=acc_tl, PRECISION=precision)

        def configs(block_d, full_d, kernel_pass, count, aligned=True, pair_value=0, with_dy=False, multi=None,
                    with_dw=False):
            kept = kept_configs(arch, block_d, element, kernel_pass, full_d, precision, aligned, pair_value, with_dy,
                                multi, with_dw)
            if count == "all":
                return kept
            backward = kernel_pass in BACKWARD_PASSES
            return [max(kept, key=lambda c: ops.shared_memory_estimate(c, block_d, element, backward, full_d))]

        # per kernel: (its pass in ops._pruner, [(kind or None, flags label, constexprs, pointer options, heaviest
        # flags?)])
        def pairs(kernel):  # (kind, pair value, normalize) of the kernel's launches
            return [(kind, pair_value, nz) for kind in KERNEL_KINDS[kernel]
                    for (pair_value, nz), pair_level in PAIR_CASES.items()
                    if (kind != 0 or (pair_value, nz) == (0, True))
                    and LEVELS.index(pair_level) <= LEVELS.index(level)]

        def loss(kind, pair_value, nz, flags="", kernel=None):  # the loss's constexprs and its flags label
            label = flags if (pair_value, nz) == (0, True) else \
                ",".join(filter(None, (f"pair_value={pair_value},normalize={int(nz)}", flags)))
            constexprs = dict(PAIR_VALUE=pair_value, NORMALIZE=nz)
            if kernel in ("triplet_margin_positives", "triplet_margin_forward"):  # one loss's kernels: no KIND
                if kernel == "triplet_margin_forward":
                    constexprs["SMOOTH"] = True  # the heavier of the two (an exponential and a log per triplet)
            else:
                constexprs["KIND"] = kind
            return constexprs, label

        row_cases = [(kind, loss(kind, pv, nz, f"with_dy={int(dy)},atomic_dx={int(adx)},dx={dx}")[1],
                      dict(loss(kind, pv, nz)[0], WITH_DY=dy, ATOMIC_DX=adx), dict(dx=dx),
                      (dy, adx, dx) == (True, False, "rows"))
                     for kind, pv, nz in pairs("lse_rows_backward_rows") for (dy, adx), dxs in ROW_FLAGS
                     for dx in dxs]
        column_cases = [(kind, loss(kind, pv, nz, f"accumulate={int(acc_)}")[1],
                         dict(loss(kind, pv, nz)[0], ACCUMULATE=acc_), dict(partial="acc" if acc_ else "rows"), acc_)
                        for kind, pv, nz in pairs("lse_rows_backward_columns") for acc_ in (False, True)]
        forward_cases = {kernel: [(kind, loss(kind, pv, nz)[1], loss(kind, pv, nz, kernel=kernel)[0], {}, True)
                                  for kind, pv, nz in pairs(kernel)]
                         for kernel in ("lse_rows_forward", "pair_sums_forward", "triplet_margin_positives",
                                        "triplet_margin_forward")}
        plans = [("lse_rows_forward", "forward", forward_cases["lse_rows_forward"]),
                 ("pair_sums_forward", "sums", forward_cases["pair_sums_forward"]),
                 ("triplet_margin_positives", "positives", forward_cases["triplet_margin_positives"]),
                 ("triplet_margin_forward", "triplets", forward_cases["triplet_margin_forward"]),
                 ("lse_rows_backward_rows", "rows", row_cases),
                 ("lse_rows_backward_columns", "columns", column_cases),
                 ("batch_hard_select", "select", [(None, f"normalize={int(nz)}", dict(NORMALIZE=nz), {}, nz)
                                                  for nz in (True, False)])]
        for kernel, kernel_pass, cases in plans:
            backward = kernel_pass in BACKWARD_PASSES
            primary_kind = KERNEL_KINDS.get(kernel, (None,))[0]
            for kind, flags, extra, pointer_options, heaviest in cases:
                pointers = _pointer_types(kernel, rows, acc, **pointer_options)
                # the primary kind on the cosine, as Circle (KIND 0) has no other pair value
                primary = heaviest and kind == primary_kind and extra.get("PAIR_VALUE", 0) == 0 \
                    and extra.get("NORMALIZE", True)
                def launched(block_d, full_d):  # the atomic flags only where ops._engine_backward takes them
                    atomic = extra.get("WITH_DY") or extra.get("ATOMIC_DX")
                    return not atomic or ops.atomic_backward(kind, element, block_d, full_d)

                for width_label, block_d, full_d in widths:
                    count = _selection(level, dtype, primary, heaviest or kind == primary_kind, width_label, widest)
                    if not launched(block_d, full_d):
                        continue
                    chosen = configs(block_d, full_d, kernel_pass, count, pair_value=extra.get("PAIR_VALUE", 0),
                                     with_dy=extra.get("WITH_DY", False)) if count else ()
                    for config in chosen:
                        add(kernel, dtype, acc, width_label, block_d, full_d, kind, flags, config,
                            dict(base, **extra), pointers, count == "all", element=element, backward=backward)
                # the backward's unaligned D blocks in chunks are narrower (ops.backward_block_d): every flag set
                # in "full", so that each launch of the ops is enumerated
                every_unaligned = backward and level == "full"
                if (primary or every_unaligned) and (level in ("sweep", "full") or (level == "ci" and dtype == "bf16")):
                    # the unaligned launches (D not a multiple of 16, or rows not 16-byte aligned): one config each,
                    # the widest D on chip and D in chunks
                    for width_label, block_d, full_d in widths:
                        if not full_d and backward:
                            block_d = ops.backward_block_d(block_d, full_d, aligned=False)
                            width_label = f"chunked-{block_d}"
                        if (width_label == widest or not full_d) and launched(block_d, full_d):
                            add(kernel, dtype, acc, width_label, block_d, full_d, kind, flags,
                                configs(block_d, full_d, kernel_pass, "one", False, extra.get("PAIR_VALUE", 0),
                                        extra.get("WITH_DY", False))[0],
                                dict(base, **extra),
                                pointers, False, aligned=False, element=element, backward=backward)
        for kernel, kernel_pass, flags, extra, pointer_options, layout, primary, neighbour in _classifier_cases():
            backward = kernel_pass in BACKWARD_PASSES
            multi = extra["MULTI"]
            pointers = _pointer_types(kernel, rows, acc, **pointer_options)
            for width_label, block_d, full_d in widths:
                count = _selection(level, dtype, primary, neighbour, width_label, widest)
                if not count:
                    continue
                if extra.get("WITH_DW") and not margin_softmax_ops.row_pass_forms_dw(
                        precision, multi, layout == "classes", extra["PARTIAL"], block_d, arch // 10,
                        triton.__version__):
                    continue  # the ops take the column pass for dW there
                chosen = configs(block_d, full_d, kernel_pass, count, aligned=layout == "classes", multi=multi,
                                 with_dw=extra.get("WITH_DW", False))
                constexprs = dict(base, **extra)
                if kernel_pass == "rows":
                    constexprs["S_ON_CHIP"] = margin_softmax_ops.cosines_on_chip(torch_dtype, full_d)
                for config in chosen:
                    add(kernel, dtype, acc, width_label, block_d, full_d, None, flags, config, constexprs,
                        pointers, count == "all", element=element, backward=backward,
                        integers=_classifier_integers(layout, multi))
        if dtype == "fp32-ieee":
            continue  # the kernels below have no product: one fp32 entry
        label = "fp32" if dtype == "fp32-tf32" else dtype
        for kernel, width_label, block_d, flags, extra, pointer_options, heaviest, count, integers in _plain_cases(
                ops, element, widths, widest):
            if _plain_selected(level, heaviest, count):
                add(kernel, label, acc, width_label, block_d, None, None, flags, None,
                    dict(dict(ACC=acc_tl, num_warps=4, num_stages=3), **extra),
                    _pointer_types(kernel, rows, acc, **pointer_options), False, integers=integers)
    return out


_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_MMA = re.compile(r"^\s*(wgmma\.mma_async|mma\.sync)\S*", re.MULTILINE)


def _tensor_core_instructions(ptx: str) -> Dict[str, Dict[str, int]]:
    """{"mma.sync" | "wgmma.mma_async": {operand type: count}} of the PTX's matrix instructions."""
    found: Dict[str, Dict[str, int]] = {}
    for match in _MMA.finditer(ptx):
        instruction = match.group(0).strip()
        parts = instruction.split(".")
        types = [p for p in parts if p in ("bf16", "f16", "tf32", "f64", "f32", "e4m3", "e5m2", "s8")]
        operand = types[-1] if types else "?"  # the operands' type follows the accumulator's in both forms
        if match.group(1) == "mma.sync" and len(types) >= 2:
            operand = types[1]  # mma.sync.aligned.mXnYkZ.row.col.<d>.<a>.<b>.<c>
        found.setdefault(match.group(1), {}).setdefault(operand, 0)
        found[match.group(1)][operand] += 1
    return found


_LABEL = re.compile(r"\$L__\w+")


def ptx_digest(ptx: str) -> str:
    """SHA-1 of the PTX's instructions: without its debug sections, .loc / .file lines and label-only lines, label
    names made one, so that two compiles differing only in source lines or inlined-function scopes (a refactor that
    moves code into a helper) digest alike, and any change of an instruction, operand or order does not."""
    code = re.split(r"^\s*\.section\s+\.debug", ptx, maxsplit=1, flags=re.MULTILINE)[0]
    lines = []
    for line in code.splitlines():
        stripped = line.strip()
        if stripped.startswith((".loc", ".file", "//")):
            continue
        stripped = _LABEL.sub("L", stripped)
        if stripped and stripped != "L:":
            lines.append(stripped)
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the kernel from cuobjdump (shipped with Triton)."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", handle.name], capture_output=True, text=True,
                              check=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"([A-Z]+):(\d+)", line)}


def compile_variant(variant: Variant, arch: int) -> Dict[str, object]:
    """Compiles one specialisation; a dict of what it takes (or its error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    record = dict(arch=ARCHS[arch][0], name=variant.name, kernel=variant.kernel, dtype=variant.dtype,
                  width=variant.width, kind=variant.kind, flags=variant.flags, config=variant.config,
                  sweep=variant.sweep, product_rows=variant.product_rows, shared_estimate=variant.shared_estimate,
                  triton=triton.__version__)
    attrs = {(position,): [["tt.divisibility", 16]] for position in variant.attrs}
    source = ASTSource(fn=_kernel(variant.kernel), signature=variant.signature, constexprs=variant.constexprs,
                       attrs=attrs)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=variant.num_warps, num_stages=variant.num_stages,
                                                   **({"maxnreg": variant.maxnreg} if variant.maxnreg else {})))
    except Exception as error:  # noqa: BLE001 - recorded, and reported as a failure
        lines = [line for line in str(error).splitlines() if line.strip()]
        where = lines[0] if lines else ""
        record.update(ok=False, error=f"{type(error).__name__} {where[:60]} {lines[-1][:400] if lines else ''}",
                      seconds=round(time.perf_counter() - start, 2))
        return record
    usage = _resource_usage(compiled.asm["cubin"])
    spills = _SPILLS.search(log.getvalue())
    ptx = compiled.asm["ptx"]
    target = re.search(r"^\.target (\S+)", ptx, re.MULTILINE)
    record.update(ok=True, seconds=round(time.perf_counter() - start, 2), ptx_target=target.group(1) if target else "",
                  n_regs=usage.get("REG"), n_spills=usage.get("STACK", 0) // 4 + usage.get("LOCAL", 0) // 4,
                  stack_bytes=usage.get("STACK", 0),
                  spill_store_bytes=int(spills.group(2)) if spills else None,
                  spill_load_bytes=int(spills.group(3)) if spills else None,
                  shared=compiled.metadata.shared, num_warps=variant.num_warps, num_stages=variant.num_stages,
                  tensor_cores=_tensor_core_instructions(ptx), ptx_digest=ptx_digest(ptx))
    return record


_POOL_VARIANTS: List[Variant] = []


def _compile_index(job):
    index, arch = job
    return compile_variant(_POOL_VARIANTS[index], arch)


def _cost(variant: Variant) -> int:
    """A rough rank of compile time, so the slow compiles start first (fp32 ieee products run on FMAs: the largest
    code; backward kernels before forward ones; the epilogue kernels last)."""
    return ((variant.dtype == "fp32-ieee") * 8 + (variant.kernel in DOT_KERNELS) * 4
            + ("backward" in variant.kernel) * 2 + variant.sweep)


def compile_all(archs, level="sweep", jobs=1, progress=None, kernels=None) -> Dict[str, object]:
    """Compiles every variant of a level (of `kernels` only, where given) for each architecture with this
    interpreter's triton, `jobs` processes at a time (forked: nothing here touches a GPU)."""
    import multiprocessing

    import triton
    from triton import knobs

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compiling needs TRITON_INTERPRET=0: under the interpreter the kernels are not compilable")
    knobs.nvidia.dump_ptxas_log = True  # spill stores / loads (printed by the compiler, captured per variant)
    global _POOL_VARIANTS
    expected, order = {}, {}
    _POOL_VARIANTS, arch_of = [], []
    for arch in archs:
        for variant in variants(arch, level):
            if kernels is not None and variant.kernel not in kernels:
                continue
            expected.setdefault(ARCHS[arch][0], []).append(variant.name)
            order[(ARCHS[arch][0], variant.name)] = len(_POOL_VARIANTS)
            _POOL_VARIANTS.append(variant)
            arch_of.append(arch)
    work = sorted(range(len(_POOL_VARIANTS)), key=lambda i: -_cost(_POOL_VARIANTS[i]))
    work = [(i, arch_of[i]) for i in work]
    start = time.perf_counter()
    records = []
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for record in pool.imap_unordered(_compile_index, work, chunksize=1):
                records.append(record)
                if progress:
                    progress(record, len(records), len(work))
    else:
        for job in work:
            records.append(_compile_index(job))
            if progress:
                progress(records[-1], len(records), len(work))
    records.sort(key=lambda r: order[(r["arch"], r["name"])])
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    version = subprocess.run([str(ptxas), "--version"], capture_output=True, text=True).stdout
    version = re.search(r"release [\d.]+, V[\d.]+", version)
    return dict(triton=triton.__version__, ptxas=version.group(0) if version else "?", level=level, expected=expected,
                records=records, seconds=round(time.perf_counter() - start, 1), jobs=jobs)


def expected_tensor_cores(arch: str, product_rows: List[int]) -> str:
    """The instruction a 16-bit or tf32 product must show: mma.sync on sm_80; wgmma.mma_async on sm_90a, where a
    product has the 64 rows of a warpgroup's tile (with fewer, as BLOCK_M = 32, Triton keeps mma.sync there)."""
    if arch == "sm_90a" and max(product_rows, default=0) >= 64:
        return "wgmma.mma_async"
    return "mma.sync"


def problems(result: Dict[str, object]) -> List[str]:
    """What the compile proof does not accept: a missing or failed variant, spills, shared memory above the
    architecture's per-block limit, 16-bit or tf32 products off the tensor cores (sm_80: mma.sync on bf16, f16 or
    tf32 operands; sm_90a: wgmma.mma_async on them)."""
    found = []
    version = result["triton"]
    by_name = {(r["arch"], r["name"]): r for r in result["records"]}
    limits = dict(ARCHS.values())
    for arch, names in result["expected"].items():
        for name in names:
            record = by_name.get((arch, name))
            where = f"triton {version} {arch} {name}"
            if record is None:
                found.append(f"{where}: not compiled")
                continue
            if not record["ok"]:
                found.append(f"{where}: {record['error']}")
                continue
            if record["n_spills"]:
                found.append(f"{where}: spills (n_spills {record['n_spills']}, {record['spill_store_bytes']} bytes "
                             f"spill stores, {record['n_regs']} registers)")
            if record["shared"] > limits[arch]:
                found.append(f"{where}: {record['shared']} bytes shared memory > the {limits[arch]} per block")
            operand = {"bf16": "bf16", "fp16": "f16", "fp32-tf32": "tf32"}.get(record["dtype"])
            if record["kernel"] in DOT_KERNELS and operand:
                want = expected_tensor_cores(arch, record["product_rows"])
                if not record["tensor_cores"].get(want, {}).get(operand):
                    found.append(f"{where}: no {want} on {operand} operands in the PTX "
                                 f"(found {record['tensor_cores'] or 'none'})")
    return found


# ---- across triton versions --------------------------------------------------------------------------------------

def triton_path(version: str) -> Optional[Path]:
    """Where triton `version` is importable from: None for this environment's own, else an isolated pip --target
    directory, .cache/triton-<version> (git-ignored), installed once (without dependencies: the compiler needs none;
    a half-finished install is never taken for a finished one)."""
    import importlib.metadata
    import shutil

    if importlib.metadata.version("triton") == version:
        return None
    cache = ROOT / ".cache"
    target = cache / f"triton-{version}"
    if (target / ".complete").exists():
        return target
    cache.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"triton-{version}-", dir=cache))
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                        "--target", str(staging), f"triton=={version}"], check=True)
        (staging / ".complete").write_text(version + "\n")
        if not (target / ".complete").exists():  # else another process finished first: keep its copy
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _start_version(version: str, archs, level: str, jobs: int, scratch: Path):
    """`compile` in a subprocess with triton `version` first on the path; (process, result path, command)."""
    path = triton_path(version)
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(scratch / f"cache-{version}"))
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = scratch / f"result-{version}.json"
    command = [sys.executable, "-m", "metric_kernels.triton._aot", "compile", "--json", str(out), "--level", level,
               "--jobs", str(jobs), "--arch", *map(str, archs)]
    log = open(scratch / f"log-{version}.txt", "w")
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return process, out, command, log


def run_versions(levels: Dict[str, str], archs=(80, 90), jobs: Optional[int] = None, timeout: float = 4 * 3600):
    """Compiles at levels[version] with each triton version, the versions side by side (each with `jobs`
    processes; a fresh Triton cache, so every variant really compiles); their JSON results."""
    jobs = jobs or max(1, min(os.cpu_count() or 1, 8))
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        started = [(version, *_start_version(version, archs, level, jobs, scratch))
                   for version, level in levels.items()]
        results, deadline = [], time.monotonic() + timeout
        try:
            for version, process, out, command, log in started:
                code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
                log.close()
                if code != 0 or not out.exists():
                    text = (scratch / f"log-{version}.txt").read_text()
                    raise RuntimeError(f"triton {version}: {' '.join(command)} failed ({code}):\n{text[-4000:]}")
                result = json.loads(out.read_text())
                if result["triton"] != version:
                    raise RuntimeError(f"asked for triton {version}, the subprocess imported {result['triton']}")
                results.append(result)
        finally:
            for _, process, *_ in started:
                if process.poll() is None:
                    process.kill()
                    process.wait()
    return results


def _tensor_core_label(record) -> str:
    cores = record.get("tensor_cores") or {}
    return " ".join(f"{kind.split('.')[0]} {'/'.join(sorted(ops))}" for kind, ops in sorted(cores.items())) or "-"


def _summary_rows(result) -> List[str]:
    """Per architecture, kernel and dtype: how many variants compiled, spilled, overflowed shared memory, missed
    the tensor cores; the registers and shared memory ranges."""
    limits = dict(ARCHS.values())
    missing = {tuple(p.split(": ", 1)[0].split(" ", 3)[2:]) for p in problems(result) if ": no " in p}
    groups: Dict[tuple, list] = {}
    for record in result["records"]:
        groups.setdefault((record["arch"], record["kernel"], record["dtype"]), []).append(record)
    rows = []
    for (arch, kernel, dtype), records in groups.items():
        good = [r for r in records if r["ok"]]
        spilling = [r for r in good if r["n_spills"]]
        over = [r for r in good if r["shared"] > limits[arch]]
        span = (lambda key: f"{min(r[key] for r in good)}-{max(r[key] for r in good)}") if good else (lambda key: "")
        cores = sorted({_tensor_core_label(r) for r in good})
        rows.append(f"| {result['triton']} | {arch} | {kernel} | {dtype} | {len(records)} "
                    f"| {len(records) - len(good) or ''} | {len(spilling) or ''} "
                    f"| {max((r['n_spills'] for r in spilling), default='')} | {len(over) or ''} "
                    f"| {sum(1 for r in records if (arch, r['name']) in missing) or ''} | {span('n_regs')} "
                    f"| {span('shared')} | {', '.join(cores)} |")
    return rows


def _sweep_rows(result) -> List[str]:
    """Per config sweep (one kernel, dtype, width, kind and flags at every kept config): the configs without a
    problem, those that spill, those over the shared memory limit, and the compiled shared memory over the ops'
    estimate (what a pruning rule has to predict)."""
    limits = dict(ARCHS.values())
    groups: Dict[tuple, list] = {}
    for record in result["records"]:
        if record["sweep"]:
            key = (record["arch"], record["kernel"], record["dtype"], record["width"], record["kind"], record["flags"])
            groups.setdefault(key, []).append(record)
    rows = []
    for (arch, kernel, dtype, width, kind, flags), records in groups.items():
        good = [r for r in records if r["ok"]]
        clean = [r["config"] for r in good if not r["n_spills"] and r["shared"] <= limits[arch]]
        spilling = [f"{r['config']} ({r['n_spills']})" for r in good if r["n_spills"]]
        over = [r["config"] for r in good if r["shared"] > limits[arch]]
        ratios = [r["shared"] / r["shared_estimate"] for r in good if r.get("shared_estimate")]
        ratio = f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else ""
        failed = len(records) - len(good)
        rows.append(f"| {result['triton']} | {arch} | {kernel} | {dtype} | {width} | {'' if kind is None else kind} "
                    f"| {flags} | {' '.join(clean) or 'none'} | {' '.join(spilling)} | {' '.join(over)} | {ratio} "
                    f"| {failed or ''} |")
    return rows


def _json_lines(report: Dict[str, object]) -> str:
    """JSON with one record per line (readable diffs between runs)."""
    results = [dict(result, records=f"@records{i}@") for i, result in enumerate(report["results"])]
    text = json.dumps(dict(report, results=results), indent=1)
    for i, result in enumerate(report["results"]):
        records = ",\n".join(json.dumps(record, separators=(",", ":")) for record in result["records"])
        text = text.replace(f'"@records{i}@"', "[\n" + records + "\n]")
    return text + "\n"


def write_report(results: List[Dict[str, object]], out: Path, command: str) -> List[str]:
    """report.md and report.json in `out`; returns the problems found."""
    out.mkdir(parents=True, exist_ok=True)
    found = [problem for result in results for problem in problems(result)]
    (out / "report.json").write_text(_json_lines(dict(command=command, problems=found, results=results)))
    limits = dict(ARCHS.values())
    lines = ["# Triton compile proof", "",
             f"Generated by `{command}` (bench/README.md): the specialisations the Triton ops launch, compiled "
             "without a GPU for sm_80 and sm_90a with each triton version (which ones at each level: "
             "metric_kernels/triton/_aot.py). Registers and `n_spills` (local memory bytes / 4, as Triton counts "
             "them) from the cubin (cuobjdump), spill stores from ptxas, shared memory from Triton's metadata next to "
             "the ops' pruning estimate (ops.shared_memory_estimate), tensor-core instructions from the PTX (mma = "
             "mma.sync, wgmma = wgmma.mma_async, by operand type). Per-block shared memory limits (opt-in): "
             + ", ".join(f"{name} {limit} bytes" for name, limit in limits.items()) + ". "
             "report.json holds every number and the full list of problems.", "",
             "| triton | ptxas | level | arch | variants | compiled | spilling | over shared memory | wall time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for arch, names in result["expected"].items():
            good = [r for r in result["records"] if r["arch"] == arch and r["ok"]]
            lines.append(f"| {result['triton']} | {result['ptxas']} | {result['level']} | {arch} | {len(names)} "
                         f"| {len(good)} | {sum(1 for r in good if r['n_spills'])} "
                         f"| {sum(1 for r in good if r['shared'] > limits[arch])} "
                         f"| {result['seconds']:.0f} s ({result['jobs']} processes, both archs) |")
    lines += ["", f"## By kernel and dtype ({len(found)} problems)", "",
              "| triton | arch | kernel | dtype | variants | failed | spilling | max n_spills | over shared memory "
              "| off the expected tensor cores | registers | shared | tensor cores |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        lines += _summary_rows(result)
    errors = sorted({r["error"] for result in results for r in result["records"] if not r["ok"]})
    if errors:
        lines += ["", "Compile errors:", ""] + [f"- `{error}`" for error in errors]
    sweeps = [row for result in results for row in _sweep_rows(result)]
    if sweeps:
        lines += ["", "## Config sweeps", "",
                  "Every config the pruner keeps, at the widest D on chip: which have no problem, which spill "
                  "(n_spills), which exceed the shared memory limit, and the compiled shared memory over "
                  "ops.shared_memory_estimate.", "",
                  "| triton | arch | kernel | dtype | D | kind | flags | clean configs | spilling (n_spills) "
                  "| over shared memory | shared / estimate | failed |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"] + sweeps
    for result in results:
        for arch in result["expected"]:
            lines += ["", f"## triton {result['triton']}, {arch}", "",
                      "| kernel | dtype | D | kind | flags | config | registers | n_spills | spill stores "
                      "| shared (estimate) | tensor cores | s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in (r for r in result["records"] if r["arch"] == arch):
                head = (f"| {r['kernel']} | {r['dtype']} | {r['width']} | {'' if r['kind'] is None else r['kind']} "
                        f"| {r['flags']} | {r['config']}{' (sweep)' if r['sweep'] else ''} ")
                if not r["ok"]:
                    lines.append(head + f"| failed: {r['error'][:90].replace('|', '/')} | | | | | |")
                    continue
                over = " **over**" if r["shared"] > limits[arch] else ""
                estimate = f" ({r['shared_estimate']})" if r.get("shared_estimate") is not None else ""
                lines.append(head + f"| {r['n_regs']} | {r['n_spills']} | {r['spill_store_bytes']} "
                                    f"| {r['shared']}{estimate}{over} | {_tensor_core_label(r)} | {r['seconds']} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return found


DEFAULT_REPORT = ROOT / "bench" / "results" / "compile"


def compare(before: Dict[str, object], after: Dict[str, object]) -> List[str]:
    """What differs between two `compile --json` results of the same selection: variants only in one, and per
    variant compiled in both, its PTX digest, registers, spills or shared memory. Empty: the same code."""
    def by_name(result):
        return {(r["arch"], r["name"]): r for r in result["records"]}
    old, new = by_name(before), by_name(after)
    lines = [f"only in the first: {arch} {name}" for arch, name in sorted(old.keys() - new.keys())]
    lines += [f"only in the second: {arch} {name}" for arch, name in sorted(new.keys() - old.keys())]
    for key in sorted(old.keys() & new.keys()):
        a, b = old[key], new[key]
        changed = [f"{field} {a.get(field)} -> {b.get(field)}"
                   for field in ("ok", "ptx_digest", "n_regs", "n_spills", "shared") if a.get(field) != b.get(field)]
        if changed:
            lines.append(f"{key[0]} {key[1]}: " + ", ".join(changed))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metric_kernels.triton._aot", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("compile", help="compile with this interpreter's triton")
    one.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(ARCHS))
    one.add_argument("--level", choices=LEVELS, default="sweep")
    one.add_argument("--jobs", type=int, default=1)
    one.add_argument("--json", type=Path, help="write the result here")
    one.add_argument("--list", action="store_true", help="only list the variants")
    one.add_argument("--kernels", nargs="+", help="only these kernels (names as in _lse_kernels.py and the others)")
    same = commands.add_parser("compare", help="what differs between two `compile --json` results (exit 1 if any)")
    same.add_argument("before", type=Path)
    same.add_argument("after", type=Path)
    every = commands.add_parser("report", help="compile with several triton versions, write report.md and .json")
    every.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(ARCHS))
    every.add_argument("--level", choices=LEVELS, default="sweep")
    every.add_argument("--versions", nargs="+", default=list(VERSIONS),
                       help="VERSION or VERSION=LEVEL (a level for that version only)")
    every.add_argument("--jobs", type=int, default=None, help="processes per version (default: the CPU count)")
    every.add_argument("--out", type=Path, default=DEFAULT_REPORT)
    again = commands.add_parser("render", help="write report.md again from a report.json (no compiling)")
    again.add_argument("json", type=Path)
    args = parser.parse_args(argv)
    if args.command == "compare":
        found = compare(json.loads(args.before.read_text()), json.loads(args.after.read_text()))
        print("\n".join(found) if found else "the same code: every variant's PTX digest and resources agree")
        return 1 if found else 0
    if args.command == "render":
        saved = json.loads(args.json.read_text())
        found = write_report(saved["results"], args.json.parent, saved["command"])
        print(f"wrote {args.json.parent / 'report.md'}; {len(found)} problems")
        return 0
    if args.command == "report":
        levels = dict(item.split("=", 1) if "=" in item else (item, args.level) for item in args.versions)
        results = run_versions(levels, args.arch, args.jobs)
        command = "python -m metric_kernels.triton._aot report " + " ".join(argv if argv is not None else sys.argv[1:])
        found = write_report(results, args.out, command.replace(" report report", " report").strip())
        print(f"wrote {args.out / 'report.md'}; {len(found)} problems")
        for problem in found:
            print(problem)
        return 1 if found else 0
    if args.kernels is not None:
        known = {variant.kernel for arch in args.arch for variant in variants(arch, args.level)}
        unknown = sorted(set(args.kernels) - known)
        if unknown:
            parser.error(f"--kernels: {', '.join(unknown)} not among the kernels compiled at {args.level}: "
                         f"{', '.join(sorted(known))}")
    if args.list:
        for arch in args.arch:
            for variant in variants(arch, args.level):
                if args.kernels is None or variant.kernel in args.kernels:
                    print(ARCHS[arch][0], variant.name)
        return 0

    def progress(record, done, total):
        state = "ok" if record["ok"] else "FAILED " + record["error"]
        extra = (f" regs {record['n_regs']} spills {record['n_spills']} shared {record['shared']}"
                 if record["ok"] else "")
        print(f"[{done}/{total}] {record['arch']} {record['name']}: {state}{extra} ({record['seconds']} s)",
              flush=True)

    result = compile_all(args.arch, args.level, args.jobs, progress, args.kernels)
    if args.json:
        args.json.write_text(json.dumps(result))
    print(f"triton {result['triton']}: {len(result['records'])} compiled in {result['seconds']} s, "
          f"{len(problems(result))} problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
