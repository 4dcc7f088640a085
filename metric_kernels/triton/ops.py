"""torch.library custom ops around the Triton kernels, so the fused losses work eagerly, under
torch.compile(fullgraph=True) and under torch.library.opcheck:

    metric_kernels::triton_lse_rows, triton_lse_rows_backward, triton_batch_hard_select,
                    triton_triplet_distances, triton_triplet_distances_backward

(the contract of every fused backend's ops, with their fake implementations and autograd formula, registered by the
package's __init__ through fused_backend: metric_kernels/_fused.py). Unlike the other backends' ops, these read the
raw rows in their own dtype (fp16, bf16, fp32, fp64) and normalise inside the kernels: the cosine losses always,
batch-hard selection when asked. No upcast or normalised copy of the rows is made; the gradients come back in the
rows' dtype.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._fused import KIND, STAT_ROWS, check_row_state, fake_gradients, register_triplet_autograd, stats_dtype
from .._row_epilogues import triplet_backward_inputs
from . import _batch_hard_kernel, _lse_kernels, _triplet_kernel

# The widest D kept on chip whole (one tl.dot per tile); wider rows are walked in chunks of this width.
MAX_FULL_D = {1: 256, 2: 256, 4: 256, 8: 64}  # fp64 tiles take twice the registers
# Under the interpreter there is no GPU to size the reference splits for: a small stand-in SM count makes the tests
# exercise the split (and its merge) at small shapes.
INTERPRETER_SM_COUNT = 4
MIN_SPLIT_COLUMNS = 128  # each split of the references gets at least this many
_NORM_BLOCK_ROWS = 32


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _accumulator(dtype: torch.dtype):
    """Triton's accumulator and statistics type: float64 for float64 inputs, float32 otherwise (stats_dtype)."""
    return tl.float64 if stats_dtype(dtype) == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's float32 matmul precision: tf32 only where torch allows it. 16-bit operands always
    run on tensor cores; fp64 is exact. Under the interpreter too (its tf32 dots are rounded by the test shim,
    metric_kernels/triton/_interpreter.py)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def block_d(dim: int, element_size: int) -> int:
    """The D tile: all of D up to MAX_FULL_D (tl.dot needs every block dimension >= 16), else chunks of that."""
    return max(16, min(MAX_FULL_D[element_size], triton.next_power_of_2(max(dim, 1))))


def backward_block_d(width: int, full_d: bool, aligned: bool) -> int:
    """The backward's D block (a program's share of dX and dY columns): block_d, but half of it for unaligned rows
    walked in chunks. Those load and store every element of both rows' D blocks, dX and dY's atomics through its own
    address, and at the widest tile that spilled whatever the warps (the compile proof); the cost is one more
    recomputation of S per extra D block, on a path that already reads D in chunks."""
    return width if full_d or aligned else width // 2


def rows_aligned(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether the rows meet what the compiler specialises vector loads on: 16-byte aligned pointers, unit column
    strides, D and the row strides multiples of 16. Unaligned rows are loaded element by element and take more
    registers (the compile proof: the same tiles spill), so they are tuned and pruned apart."""
    return (x.data_ptr() % 16 == 0 and y.data_ptr() % 16 == 0 and x.stride(1) == 1 and y.stride(1) == 1
            and x.shape[1] % 16 == 0 and x.stride(0) % 16 == 0 and y.stride(0) % 16 == 0)


def tuning_key(x: torch.Tensor, y: torch.Tensor):
    """The kernels' key-only arguments (N_BUCKET, M_BUCKET, ALIGNED): N and M rounded up to powers of two, so a new
    batch size does not re-tune, and rows_aligned."""
    return (triton.next_power_of_2(max(x.shape[0], 1)), triton.next_power_of_2(max(y.shape[0], 1)),
            int(rows_aligned(x, y)))


def _shared_memory_limit(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 30
    properties = torch.cuda.get_device_properties(device)
    return getattr(properties, "shared_memory_per_block_optin", 99 * 1024)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def reference_splits(rows: int, references: int, device: torch.device) -> int:
    """How many programs share a row block's references: enough row-block x split programs to fill the GPU twice
    over when the row blocks alone cannot (a small batch against a large memory bank; Proxy-Anchor's C proxies)."""
    row_programs = triton.cdiv(max(rows, 1), 64)
    wanted = 2 * _sm_count(device)
    if row_programs >= wanted:
        return 1
    return max(1, min(triton.cdiv(wanted, row_programs), triton.cdiv(references, MIN_SPLIT_COLUMNS)))


def _configs():
    """Autotuning space of the row and reference tiles. Under the interpreter a single config: Triton's autotuner
    cannot benchmark there, and one config makes it run the kernel as is, through the same wrapper as on a GPU."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    shapes = ((128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 8, 2), (64, 32, 4, 3), (32, 64, 4, 3),
              (128, 32, 8, 3), (32, 32, 4, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2), (16, 64, 4, 2),
              (32, 16, 8, 2), (16, 16, 4, 2), (16, 16, 8, 2))
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _dot_width(block_d_: int, full_d: bool) -> int:
    """Columns of the operand tiles a product reads at once: all of D on chip, else chunks of DOT_CHUNK."""
    return block_d_ if full_d else min(block_d_, _lse_kernels.DOT_CHUNK.value)


def shared_memory_estimate(config, block_d_: int, element_size: int, backward: bool, full_d: bool = True) -> int:
    """Bytes of shared memory a config takes, an upper bound of what Triton allocated over the compile sweep
    (bench/results/compile): the row tile and num_stages buffered reference tiles (both buffered, DOT_CHUNK wide,
    when D is walked in chunks); the backward also stages its second operand tile and two BLOCK_M x BLOCK_N tiles
    (P and its transpose), and in chunks keeps its D block of both rows besides; plus a little for reductions."""
    block_m, block_n, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], max(config.num_stages, 1)
    if backward:
        tiles = ((2 * block_m + (stages + 1) * block_n) if full_d else (stages + 1) * (block_m + block_n)) * block_d_
        tiles += 2 * block_m * block_n
    else:
        tiles = ((block_m + stages * block_n) if full_d else stages * (block_m + block_n)) * _dot_width(block_d_,
                                                                                                         full_d)
    return tiles * element_size + 1536


def register_estimate(config, block_d_: int, element_size: int, backward: bool, full_d: bool = True,
                      pair_value: int = 0) -> int:
    """32-bit registers per thread for the values a program keeps live, roughly: the operand tiles (DOT_CHUNK wide
    when the forward walks D in chunks), about eight BLOCK_M x BLOCK_N fp32 temporaries of the epilogue (ten for the
    distances, metric_kernels/_pairs.py), and the backward's BLOCK_M x BLOCK_D gradient and BLOCK_N x BLOCK_D atomic
    partial (fp32). The compile sweep (bench/results/compile) is the measurement behind the limits."""
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    width = block_d_ if backward else _dot_width(block_d_, full_d)
    operands = (block_m + block_n) * width * element_size // 4
    epilogue = 8 if pair_value == 0 else 10
    values = operands + epilogue * block_m * block_n + ((block_m + block_n) * block_d_ if backward else 0)
    return values // (32 * config.num_warps)


# Per thread, of register_estimate: above these the compile sweep (bench/results/compile) found spills. By pass
# ("forward", "sums" for the sums over pairs of NT-Xent and Contrastive, "positives" and "triplets" for the triplet
# margin loss's two sweeps, "select" for batch-hard, "backward"), then by
# layout of the rows ("full": all of D on chip, "chunked":
# D walked in chunks, "unaligned": rows the compiler cannot load in vectors, see rows_aligned), a pair (products on
# tensor cores, products on the CUDA cores: fp32 at "highest" precision and fp64, multiplied from registers). The
# backward holds a gradient block and its atomic partial besides the epilogue's tiles: at D = 256 only 16 x 16 tiles
# stay clear. Unaligned rows are loaded element by element, each with its own address: far smaller tiles.
REGISTER_LIMIT = {
    "forward": {"full": (384, 112), "chunked": (384, 112), "unaligned": (256, 74), "unaligned-chunked": (96, 28)},
    "sums": {"full": (384, 112), "chunked": (384, 112), "unaligned": (256, 74), "unaligned-chunked": (96, 28)},
    # the triplet margin loss's sweeps: the positives' scatter into the table takes a 64-bit address per pair of
    # the tile, the negatives' fold keeps more of the tile live across the slots
    "positives": {"full": (256, 112), "chunked": (256, 80), "unaligned": (192, 74), "unaligned-chunked": (96, 28)},
    "triplets": {"full": (320, 100), "chunked": (288, 80), "unaligned": (256, 74), "unaligned-chunked": (96, 28)},
    "select": {"full": (384, 112), "chunked": (160, 74), "unaligned": (216, 63), "unaligned-chunked": (96, 28)},
    "backward": {"full": (64, 40), "chunked": (64, 40), "unaligned": (64, 40), "unaligned-chunked": (64, 40)},
}
REGISTER_LIMIT["select-runners-up"] = REGISTER_LIMIT["select"]
# Configs within the limits that the compile sweep still found spilling a few registers, (pass, layout) ->
# (BLOCK_M, BLOCK_N, num_warps): batch-hard selection's 32 x 64 tiles with D in chunks (sm_90a, 2 registers); NT-Xent's
# sums (three per pair from an exponential, a log and a division), 2 to 12 registers over kinds, dtypes and
# architectures, at the largest tiles the forward keeps and at some small ones, whatever the register count (ptxas
# saving values live across the loop's exit). Most others are 8-warp tiles at 64, 80 or 128 registers, where ptxas
# spills 2 to 8 cold values to fit one more block per SM (fp32 rows and fp64 on the CUDA cores, tf32 with unaligned
# rows or in the backward's 32 x 16 tile, fp64 Contrastive sums; some only with triton 3.6.0), and 16-bit batch-hard
# selection at 64 x 128 (sm_80, 255 registers). Batch-hard selection on tf32 products, which keeps each side's
# runner-up too: also 128 x 64 and 64 x 64 with all of D = 128 on chip (255 registers), 32 x 64 and 32 x 16 (8 warps)
# at other widths, and 32 x 32, 16 x 64 and 16 x 16 with D in chunks (some only with triton 3.6.0). The backward's
# 16 x 16 tile with 8 warps, which spilled that way over flags, dtypes and architectures, is left to the fallback.
_SMALLEST_8_WARPS = (16, 16, 8)
MEASURED_SPILLS = {("forward", "full"): {(32, 32, 8), (32, 16, 8)},
                   ("forward", "unaligned-chunked"): {(32, 16, 8), _SMALLEST_8_WARPS},
                   ("select", "full"): {(64, 128, 8), _SMALLEST_8_WARPS},
                   ("select", "chunked"): {(32, 64, 4), (32, 64, 8)},
                   ("select", "unaligned"): {(64, 32, 8), (32, 64, 8)},
                   ("select", "unaligned-chunked"): {(64, 32, 8), (32, 16, 8), _SMALLEST_8_WARPS},
                   ("sums", "full"): {(128, 64, 8), (64, 64, 4), (32, 32, 8), (32, 16, 8), _SMALLEST_8_WARPS,
                                      (16, 16, 4)},
                   ("sums", "chunked"): {(128, 32, 8), (64, 32, 8), (64, 32, 4), (32, 64, 8), (32, 64, 4), (32, 16, 8),
                                         (16, 64, 4), _SMALLEST_8_WARPS, (16, 16, 4)},
                   ("sums", "unaligned-chunked"): {(32, 16, 8), _SMALLEST_8_WARPS},
                   # the triplet margin loss's sweeps on fp32 at "highest" precision (2 to 4 registers, 8 warps)
                   ("positives", "unaligned-chunked"): {(32, 16, 8), _SMALLEST_8_WARPS},
                   ("triplets", "full"): {(32, 32, 8)},
                   ("triplets", "chunked"): {(32, 32, 8)},
                   ("triplets", "unaligned-chunked"): {(32, 16, 8), _SMALLEST_8_WARPS},
                   ("backward", "full"): {(32, 32, 8), (32, 16, 8), _SMALLEST_8_WARPS},
                   **{("backward", rows_layout): {_SMALLEST_8_WARPS}
                      for rows_layout in ("chunked", "unaligned", "unaligned-chunked")}}
# The selection with runners-up: the selection's spilling configs and those its extra registers add (comment above).
_RUNNERS_UP_SPILLS = {"full": {(128, 64, 8), (64, 64, 4), (32, 64, 4), (32, 16, 8)},
                      "chunked": {(32, 32, 4), (16, 16, 4), (16, 64, 4), _SMALLEST_8_WARPS}}
MEASURED_SPILLS.update({("select-runners-up", rows_layout): MEASURED_SPILLS[("select", rows_layout)]
                        | _RUNNERS_UP_SPILLS.get(rows_layout, set()) for rows_layout in REGISTER_LIMIT["select"]})
# When no config is left (fp32 rows at D = 256: the backward's smallest tile), the 16 x 16 tile with 8 warps: with 4,
# the backward at D = 256 needs more than 255 registers a thread. With a register ceiling (.maxnreg), unless the
# program also forms dY (the rows pass WITH_DY): without one, ptxas spills a few cold values of the 8-warp program to
# fit one more block per SM at 64, 80 or 128 registers; with one, it allocates what the tile needs. The rows pass with
# dY needs about 255 registers there, and a ceiling made ptxas spill 2 to 6 (the compile proof).
FALLBACK_WARPS = 8
FALLBACK_REGISTERS = 255
# The triplet margin loss's two sweeps put this ceiling on every config, as on the fallback: without one ptxas spilled
# a few values of most of their tiles to fit more blocks (the compile proof).
PASS_CEILINGS = {"positives": FALLBACK_REGISTERS, "triplets": FALLBACK_REGISTERS}
# finish_gradient's ceiling: without one ptxas spilled a few values of some launches to fit more blocks (the compile
# proof: the fp32 tile at D = 256 without normalising on sm_80, and dW's from the accumulators of W's columns)
FINISH_REGISTERS = 255


def layout(full_d: bool, aligned: bool) -> str:
    """The rows' layout class of REGISTER_LIMIT."""
    if aligned:
        return "full" if full_d else "chunked"
    return "unaligned" if full_d else "unaligned-chunked"


def _engine_fallback_registers(args) -> Optional[int]:
    """The fallback's register ceiling for the engine's kernels: FALLBACK_REGISTERS, none for the row pass that
    forms dY (WITH_DY; above)."""
    return None if args.get("WITH_DY") else FALLBACK_REGISTERS


def _limits_pass(kernel_pass: str, args) -> str:
    """The pass of REGISTER_LIMIT and MEASURED_SPILLS a launch falls under: the backward passes share one, and
    batch-hard's selection on tf32 products, which keeps runners-up too (more registers), has its own."""
    if kernel_pass in ("rows", "columns"):
        return "backward"
    if kernel_pass == "select" and args.get("PRECISION") == "tf32":
        return "select-runners-up"
    return kernel_pass


def _pruner(kernel_pass: str, measured_spills=None, fallback_registers=_engine_fallback_registers,
            fallback_stages=None):
    """Autotune pruning for a pass ("forward", "sums", "select", "rows", "columns"): configs within the shared memory of
    the device and within REGISTER_LIMIT, less MEASURED_SPILLS; else the smallest tile (FALLBACK_WARPS, the register
    ceiling fallback_registers(launch arguments) gives, None for ptxas's own choice). Another kernel family passes
    its own measurements (the margin-softmax kernels, margin_softmax_ops): measured_spills by (pass, layout, tensor
    cores, the MULTI constexpr), its fallback's register ceiling and stages (None: the tile's). The passes of
    PASS_CEILINGS give every kept config that register ceiling."""
    backward = kernel_pass in ("rows", "columns")
    ceiling = PASS_CEILINGS.get(kernel_pass)

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        limits_pass = _limits_pass(kernel_pass, args)
        x = args["x_ptr"]
        width, element, full_d = args["BLOCK_D"], x.element_size(), args.get("FULL_D", True)
        estimate = lambda c: register_estimate(c, width, element, backward, full_d,  # noqa: E731
                                               args.get("PAIR_VALUE", 0))
        rows_layout = layout(full_d, bool(args.get("ALIGNED", 1)))
        limit = _shared_memory_limit(x.device)
        fits = [c for c in configs if shared_memory_estimate(c, width, element, backward, full_d) <= limit]
        tensor_cores = element <= 2 or args.get("PRECISION") == "tf32"
        limit_registers = REGISTER_LIMIT[limits_pass][rows_layout][0 if tensor_cores else 1]
        if measured_spills is None:
            excluded = MEASURED_SPILLS.get((limits_pass, rows_layout), set())
        else:
            excluded = measured_spills.get((kernel_pass, rows_layout, tensor_cores, bool(args.get("MULTI"))), set())
        kept = [c for c in fits if estimate(c) <= limit_registers
                and (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) not in excluded]
        if kept:
            return kept if ceiling is None else [triton.Config(c.kwargs, num_warps=c.num_warps,
                                                               num_stages=c.num_stages, maxnreg=ceiling)
                                                 for c in kept]
        smallest = min(estimate(c) * c.num_warps for c in fits or configs)
        tiles = [c for c in fits or configs if estimate(c) * c.num_warps == smallest]
        tile = next((c for c in tiles if c.num_warps == FALLBACK_WARPS), tiles[0])
        return [triton.Config(tile.kwargs, num_warps=tile.num_warps, num_stages=fallback_stages or tile.num_stages,
                              maxnreg=fallback_registers(args))]
    return {"early_config_prune": prune}


# plus the pointer dtypes
_KEY = ["N_BUCKET", "M_BUCKET", "ALIGNED", "D", "BLOCK_D", "FULL_D", "ACC", "PRECISION", "KIND", "PAIR_VALUE",
        "NORMALIZE"]
_forward = triton.autotune(_configs(), key=_KEY, prune_configs_by=_pruner("forward")
                           )(_lse_kernels.lse_rows_forward)
_pair_sums = triton.autotune(_configs(), key=_KEY, prune_configs_by=_pruner("sums")
                             )(_lse_kernels.pair_sums_forward)
# Benchmarking runs a kernel repeatedly: atomically filled buffers are zeroed before each run.
_backward_rows = triton.autotune(_configs(), key=_KEY + ["WITH_DY", "ATOMIC_DX"], prune_configs_by=_pruner("rows"),
                                 reset_to_zero=["dx_ptr", "dx_t_ptr", "dy_ptr", "dy_t_ptr"]
                                 )(_lse_kernels.lse_rows_backward_rows)
_backward_columns = triton.autotune(_configs(), key=_KEY + ["ACCUMULATE"], prune_configs_by=_pruner("columns")
                                    )(_lse_kernels.lse_rows_backward_columns)
_batch_hard = triton.autotune(_configs(), key=_KEY[:-3] + ["NORMALIZE"],
                              prune_configs_by=_pruner("select"))(_batch_hard_kernel.batch_hard_select)


def _device_guard(tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def row_norms(rows: torch.Tensor) -> torch.Tensor:
    """||row|| per row, in the statistics dtype (not clamped), read from the rows as they are."""
    n, d = rows.shape
    out = torch.empty((n,), dtype=stats_dtype(rows.dtype), device=rows.device)
    if n:
        _lse_kernels.row_norms[(triton.cdiv(n, _NORM_BLOCK_ROWS),)](
            rows, out, n, d, rows.stride(0), rows.stride(1), BLOCK_R=_NORM_BLOCK_ROWS,
            BLOCK_D=block_d(d, rows.element_size()) if d <= 256 else 256, ACC=_accumulator(rows.dtype))
    return out


def _shape_args(x, y):
    """Launch arguments every engine kernel shares: sizes, strides, and the constexprs of the rows' dtype."""
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    width = block_d(d, x.element_size())
    sizes = (n, m, d, x.stride(0), x.stride(1), y.stride(0), y.stride(1))
    constexprs = dict(BLOCK_D=width, FULL_D=d <= width, ACC=_accumulator(x.dtype), PRECISION=_precision(x.dtype))
    return sizes, constexprs


def loss_params(param_a: float, param_b: float, rows: torch.Tensor) -> torch.Tensor:
    """The loss's parameters as the kernels read them, (a, b, cos a, sin a) (the last two: NT-Xent's angular margin,
    _lse_kernels._load_angular_margin): a tensor in the statistics dtype, so fp64 rows get them exactly (a float
    argument would be fp32)."""
    # Filled on the device: torch.tensor([...], device="cuda") would copy from pageable memory and wait for the GPU.
    params = torch.full((4,), param_a, dtype=stats_dtype(rows.dtype), device=rows.device)
    params[1:2].fill_(param_b)
    params[2:3].fill_(math.cos(param_a))
    params[3:].fill_(math.sin(param_a))
    return params


def _norms_of(x: torch.Tensor, y: torch.Tensor):
    """Both rows' norms; one set when the references are the queries."""
    x_norms = row_norms(x)
    return x_norms, x_norms if y is x else row_norms(y)


def _walk_setup(x: torch.Tensor, y: torch.Tensor):
    """What a pass over every (query, reference) tile needs first: the rows as the kernels read them (_kernel_rows),
    N, both rows' norms and how many programs share each row block's references."""
    x, y = _kernel_rows(x, y)
    return (x, y, x.shape[0], *_norms_of(x, y), reference_splits(x.shape[0], y.shape[0], x.device))


def _backward_setup(x: torch.Tensor, y: Optional[torch.Tensor], need_dx: bool, need_dy: bool):
    """What a backward op does first: y = None means the references are the queries (one gradient, in dx); the
    gradients in the rows' dtype, which every path then writes whole, or zeros when there is no pair.
    Returns (x, y, same, need_dx, need_dy, dx, dy, has_pairs), x and y as _kernel_rows gives them."""
    same = y is None
    x, y = _kernel_rows(x, x if same else y)
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    if same:
        need_dx, need_dy = need_dx or need_dy, False
    has_pairs = n > 0 and m > 0 and d > 0
    new = torch.empty if has_pairs else torch.zeros
    dx = new((n if need_dx else 0, d), dtype=x.dtype, device=x.device)
    dy = x.new_empty((0, d)) if same else new((m if need_dy else 0, d), dtype=y.dtype, device=x.device)
    return x, y, same, need_dx, need_dy, dx, dy, has_pairs


def _kernel_rows(x: torch.Tensor, y: torch.Tensor):
    """(x, y) with unit column strides, the layout the kernels are compiled for (elements of a row adjacent, so
    loads vectorise; the compile proof found column-strided tiles spilling): a column-strided input, such as a
    transposed matrix, is copied once, as a matmul library would. y stays x when it was x."""
    if x.dtype != y.dtype:
        raise ValueError(f"x and y must have one dtype, got {x.dtype} and {y.dtype}")
    unit = lambda rows: rows if rows.shape[1] <= 1 or rows.stride(1) == 1 else rows.contiguous()  # noqa: E731
    queries = unit(x)
    return queries, (queries if y is x else unit(y))


def _merge_splits(partial: torch.Tensor, logsumexp_rows: int) -> torch.Tensor:
    """The statistics [STAT_ROWS, N] from each split's [splits, STAT_ROWS, N]: the first `logsumexp_rows` rows are
    log-sum-exps (-inf where a split saw nothing), the others sums, merged in a fixed order: O(splits x N)."""
    if partial.shape[0] == 1:
        return partial[0]
    return torch.cat([torch.logsumexp(partial[:, :logsumexp_rows], dim=0), partial[:, logsumexp_rows:].sum(dim=0)])


@torch.library.custom_op("metric_kernels::triton_lse_rows", mutates_args=())
def lse_rows(x: torch.Tensor, y: Optional[torch.Tensor], x_labels: torch.Tensor, y_labels: torch.Tensor,
             self_offset: int, kind: int, pair_value: int, param_a: float, param_b: float, deterministic: bool,
             normalize: bool = True) -> torch.Tensor:
    """Per-row statistics [STAT_ROWS, N] of the raw rows x and y (see _lse_kernels and metric_kernels/_fused.py),
    normalised inside the kernels when `normalize`. The log-sum-exp kinds take one pass (lse_rows_forward),
    Contrastive one pass of sums (pair_sums_forward), NT-Xent both: its sums need A_i, merged over every split
    first."""
    y = x if y is None else y
    x, y, n, x_norms, y_norms, splits = _walk_setup(x, y)
    sizes, constexprs = _shape_args(x, y)
    params = loss_params(param_a, param_b, x)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits)  # noqa: E731
    rows = (x, y, x_norms, y_norms, x_labels, y_labels)
    options = dict(KIND=kind, PAIR_VALUE=pair_value, NORMALIZE=normalize, **constexprs)
    partial = lambda: torch.empty((splits, STAT_ROWS, n), dtype=stats_dtype(x.dtype), device=x.device)  # noqa: E731
    stats = None
    with _device_guard(x):
        if kind != KIND["contrastive"]:
            stats = partial()
            _forward[grid](*rows, stats, *sizes, self_offset, params, splits, *tuning_key(x, y), **options)
            stats = _merge_splits(stats, logsumexp_rows=2)
        if kind in (KIND["ntxent"], KIND["contrastive"]):
            negatives_lse = x_norms if stats is None else stats[1]  # Contrastive's is not read
            stats = partial()
            _pair_sums[grid](*rows, negatives_lse, stats, *sizes, self_offset, params, splits, *tuning_key(x, y),
                             **options)
            stats = _merge_splits(stats, logsumexp_rows=0)
            if kind == KIND["ntxent"]:  # A, which pair_sums_forward leaves to the op (its row 1 is 0)
                stats[1] = negatives_lse
    return stats


# Of P's bound, the factor dL/ds / dL/dv of each pair value: 2 for -q; for -sqrt(q) it is 1 / d, which no bound
# holds, so 2^11 of headroom: q is formed in fp32 from numbers near |u|^2 + |v|^2, whose smallest nonzero value
# (about 1.2e-7 for unit rows) keeps 1 / d below 1500.
_PAIR_VALUE_SLOPE = {0: 1.0, 1: 2.0, 2: 2.0 ** 11}


def _pair_gradient_bound(grad: torch.Tensor, stats: torch.Tensor, kind: int, param_a: float,
                         param_b: float) -> torch.Tensor:
    """Per row, a bound of |dL/dv_ij| (v the pair value) from the upstream gradients g of the statistics: the
    log-sum-exp kinds (g1 + g2) b (2 + |a|) + g3 (Circle: |v| <= 1); NT-Xent b (g1 (1 + W) + g2) (a sigmoid or a
    softmax weight times b g1 or b G_A) times the slope bound of its angular margin a (csrc/epilogue.h's
    AngularMargin::slope_bound); Contrastive g1 + g2."""
    g = grad.abs()
    if kind == KIND["ntxent"]:
        margin_slope = abs(math.cos(param_a)) + 64 * abs(math.sin(param_a)) if param_a != 0 else 1.0
        return abs(param_b) * (g[0] * (1 + stats[2]) + g[1]) * margin_slope
    if kind == KIND["contrastive"]:
        return g[0] + g[1]
    return (g[0] + g[1]) * (abs(param_b) * (2 + abs(param_a))) + g[2]


def gradient_scale(grad: torch.Tensor, stats: torch.Tensor, x_norms: torch.Tensor, y_norms: torch.Tensor,
                   dtype: torch.dtype, kind: int, param_a: float, param_b: float, pair_value: int = 0,
                   normalize: bool = True) -> torch.Tensor:
    """A power of two that brings P = G_s r_i r_j to at most 1 in magnitude before it is cast to fp16 (whose range
    would flush the small softmax terms of a large batch to zero); 1 for the other dtypes. A 1-element tensor, so
    no host synchronisation: |G_ij| <= _pair_gradient_bound times the pair value's slope (_PAIR_VALUE_SLOPE);
    r = 1 without normalising."""
    if dtype != torch.float16 or grad.shape[1] == 0 or y_norms.numel() == 0:
        return torch.ones((1,), dtype=stats_dtype(dtype), device=grad.device)
    return _scale_for_bound(_pair_gradient_bound(grad, stats, kind, param_a, param_b), x_norms, y_norms, dtype,
                            pair_value, normalize)


def _scale_for_bound(bound: torch.Tensor, x_norms: torch.Tensor, y_norms: torch.Tensor, dtype: torch.dtype,
                     pair_value: int, normalize: bool) -> torch.Tensor:
    """gradient_scale from a per-row bound of |dL/dv|."""
    if dtype != torch.float16 or y_norms.numel() == 0:
        return torch.ones((1,), dtype=stats_dtype(dtype), device=bound.device)
    return power_of_two_below(bound * _PAIR_VALUE_SLOPE[pair_value], x_norms, y_norms, normalize)


def power_of_two_below(bound: torch.Tensor, x_norms: torch.Tensor, y_norms: torch.Tensor,
                       normalize: bool = True, normalize_y: Optional[bool] = None) -> torch.Tensor:
    """The power of two 2^-ceil(log2(max_ij bound_i r_i r_j)) (r = 1 / max(norm, eps), or 1 for rows not normalised:
    the references follow `normalize` unless normalize_y says otherwise), as a 1-element tensor in the norms' dtype:
    what brings P = G r_i r_j, |G_ij| <= bound_i, to at most 1."""
    inverse = lambda norms, normalized: (1.0 / norms.clamp(min=1e-12) if normalized  # noqa: E731
                                         else torch.ones_like(norms))
    normalize_y = normalize if normalize_y is None else normalize_y
    largest = ((bound * inverse(x_norms, normalize)).max() * inverse(y_norms, normalize_y).max()
               ).clamp(min=2.0 ** -100, max=2.0 ** 100)
    return torch.exp2(-torch.ceil(torch.log2(largest))).reshape(1).to(x_norms.dtype)


@torch.library.custom_op("metric_kernels::triton_lse_rows_backward", mutates_args=())
def lse_rows_backward(grad: torch.Tensor, stats: torch.Tensor, x: torch.Tensor, y: Optional[torch.Tensor],
                      x_labels: torch.Tensor, y_labels: torch.Tensor, self_offset: int, kind: int, pair_value: int,
                      param_a: float, param_b: float, deterministic: bool, need_dx: bool, need_dy: bool,
                      normalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dX, dY) in the rows' dtype, as metric_kernels/_fused.py describes.

    Default: one row pass recomputes each tile once and takes dX = P Y on chip and dY = P^T X through relaxed
    atomics (3 matmul-equivalents). Deterministic: a row pass for dX and a column pass for dY, each summing in a fixed
    order (4). When the references are the queries both land in one gradient."""
    check_row_state(grad, stats, x)
    return _engine_backward(grad, stats, x, y, x_labels, y_labels, self_offset, kind, pair_value, param_a, param_b,
                            deterministic, need_dx, need_dy, normalize)


def _engine_backward(grad, stats, x, y, x_labels, y_labels, self_offset, kind, pair_value, param_a, param_b,
                     deterministic, need_dx, need_dy, normalize, triplet=None, bound=None):
    """lse_rows_backward's passes for any kind; `triplet`: the triplet margin loss's (table, weights, rank) (else
    the kernels get stand-ins they do not read), `bound`: per row a bound of |dL/dv| where the kind's own
    (_pair_gradient_bound) does not apply."""
    x, y, same, need_dx, need_dy, dx, dy, has_pairs = _backward_setup(x, y, need_dx, need_dy)
    if not has_pairs:
        return dx, dy
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    acc_dtype = stats_dtype(x.dtype)
    x_norms, y_norms = _norms_of(x, y)
    if bound is None:
        scale = gradient_scale(grad, stats, x_norms, y_norms, x.dtype, kind, param_a, param_b, pair_value, normalize)
    else:
        scale = _scale_for_bound(bound, x_norms, y_norms, x.dtype, pair_value, normalize)
    sizes, constexprs = _shape_args(x, y)
    width = backward_block_d(constexprs["BLOCK_D"], constexprs["FULL_D"], rows_aligned(x, y))
    constexprs.update(PAIR_VALUE=pair_value, NORMALIZE=normalize, BLOCK_D=width)
    deterministic = deterministic or not atomic_backward(kind, x.element_size(), width, constexprs["FULL_D"])
    state = (grad, stats, scale, x, y, x_norms, y_norms, x_labels, y_labels)
    table, weights, rank = triplet if triplet is not None else (stats, stats, y_labels)
    tables = (table, weights, rank)
    params = (self_offset, loss_params(param_a, param_b, x), table.shape[1] if triplet is not None else 0)
    buckets = tuning_key(x, y)
    zeros = lambda rows, *shape: torch.zeros((rows, *shape), dtype=acc_dtype, device=x.device)  # noqa: E731
    finish = []  # (accumulator, statistic, rows, norms, out) completed by finish_gradient
    with_dy = False
    with _device_guard(x):
        if need_dx:
            with_dy = not deterministic and (need_dy or same)
            splits = 1 if deterministic else reference_splits(n, m, x.device)
            atomic_dx = splits > 1 or (same and with_dy)
            if atomic_dx:
                dx_acc, dx_t = zeros(n, d), zeros(n)
                finish.append((dx_acc, dx_t, x, x_norms, dx))
            else:  # written whole by the row pass: the gradient, or an fp32 partial the column pass completes
                dx_acc, dx_t = (zeros(n, d) if same else dx), zeros(1)
            if with_dy and same:
                dy_acc, dy_t = dx_acc, dx_t
            elif with_dy:
                dy_acc, dy_t = zeros(m, d), zeros(m)
                finish.append((dy_acc, dy_t, y, y_norms, dy))
            else:
                dy_acc, dy_t = zeros(1), zeros(1)
            _backward_rows[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits, triton.cdiv(d, width))](
                *state, dx_acc, dx_t, dy_acc, dy_t, *tables, *sizes, *params, splits, *buckets, KIND=kind,
                WITH_DY=with_dy, ATOMIC_DX=atomic_dx, **constexprs)
        if (need_dy or same) and not with_dy:
            out = dx if same else dy
            partial = dx_acc if same else out
            _backward_columns[lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), triton.cdiv(d, width))](
                *state, partial, out, *tables, *sizes, *params, *buckets, KIND=kind, ACCUMULATE=same, **constexprs)
        for acc, statistic, rows, norms, out in finish:
            _lse_kernels.finish_gradient[(triton.cdiv(rows.shape[0], 32), triton.cdiv(d, width))](
                acc, statistic, scale, rows, norms, out, rows.shape[0], d, rows.stride(0), rows.stride(1), d, 1, 1,
                BLOCK_R=32, BLOCK_D=width, ACC=_accumulator(x.dtype), NORMALIZE=normalize, maxnreg=FINISH_REGISTERS)
    return dx, dy


def atomic_backward(kind: int, element_size: int, block_d_: int, full_d: bool) -> bool:
    """Whether the backward may take its atomic path (dY in the row pass, the references split): everywhere but the
    triplet margin kind on 4-byte rows at the widest tile on chip, whose row pass with dY spilled there (its slot
    loop beside the dX block and the dY partial; the compile proof). There it takes the deterministic passes."""
    return not (kind == KIND["triplet_margin"] and element_size == 4 and full_d and block_d_ == MAX_FULL_D[4])


_TRIPLET_KEY = [key for key in _KEY if key != "KIND"]
_TRIPLET_PARTIAL_ELEMENTS = 1 << 24  # the split forward's partial weights: at most 64 MiB in fp32
_triplet_positives = triton.autotune(_configs(), key=_TRIPLET_KEY, prune_configs_by=_pruner("positives")
                                     )(_lse_kernels.triplet_margin_positives)
_triplet_margin = triton.autotune(_configs(), key=_TRIPLET_KEY + ["SMOOTH"], prune_configs_by=_pruner("triplets"),
                                  reset_to_zero=["weights_ptr"])(_lse_kernels.triplet_margin_forward)


@torch.library.custom_op("metric_kernels::triton_triplet_margin_rows", mutates_args=())
def triplet_margin_rows(x: torch.Tensor, y: Optional[torch.Tensor], x_labels: torch.Tensor, y_labels: torch.Tensor,
                        self_offset: int, pair_value: int, margin: float, smooth: bool, slots: torch.Tensor,
                        rank: torch.Tensor, deterministic: bool,
                        normalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stats [2, N], table [N, K], weights [N, K]) of the triplet margin loss over every triplet, on the raw rows
    (metric_kernels/_fused.py): two sweeps over the references, the positives' table
    (_lse_kernels.triplet_margin_positives), then the negatives against it (triplet_margin_forward), each over row
    blocks x splits of the references (reference_splits), the splits' partial sums added in a fixed order.
    K = max(slots): a host synchronisation."""
    y = x if y is None else y
    x, y = _kernel_rows(x, y)
    n, m = x.shape[0], y.shape[0]
    acc_dtype = stats_dtype(x.dtype)
    slot_count = int(slots.max()) if n else 0
    table = torch.full((n, slot_count), float("-inf"), dtype=acc_dtype, device=x.device)
    if n == 0 or m == 0 or slot_count == 0:
        return (torch.zeros((2, n), dtype=acc_dtype, device=x.device), table,
                torch.zeros((n, slot_count), dtype=acc_dtype, device=x.device))
    x_norms, y_norms = _norms_of(x, y)
    # the references split as the other losses' (a small batch against a memory bank), each split's weights a
    # partial N x K block, at most _TRIPLET_PARTIAL_ELEMENTS of them
    splits = max(1, min(reference_splits(n, m, x.device), _TRIPLET_PARTIAL_ELEMENTS // (n * slot_count)))
    stats = torch.zeros((splits, 2, n), dtype=acc_dtype, device=x.device)
    weights = torch.zeros((splits, n, slot_count), dtype=acc_dtype, device=x.device)
    sizes, constexprs = _shape_args(x, y)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits)  # noqa: E731
    rows = (x, y, x_norms, y_norms, x_labels, y_labels)
    options = dict(PAIR_VALUE=pair_value, NORMALIZE=normalize, **constexprs)
    with _device_guard(x):
        _triplet_positives[grid](*rows, rank, table, *sizes, self_offset, loss_params(margin, float(smooth), x),
                                 slot_count, splits, *tuning_key(x, y), **options)
        _triplet_margin[grid](*rows, table, weights, stats, *sizes, self_offset, slot_count, splits,
                              *tuning_key(x, y), SMOOTH=smooth, **options)
    if splits == 1:
        return stats[0], table, weights[0]
    return stats.sum(dim=0), table, weights.sum(dim=0)  # in split order: deterministic


@torch.library.custom_op("metric_kernels::triton_triplet_margin_rows_backward", mutates_args=())
def triplet_margin_rows_backward(grad: torch.Tensor, table: torch.Tensor, weights: torch.Tensor, x: torch.Tensor,
                                 y: Optional[torch.Tensor], x_labels: torch.Tensor, y_labels: torch.Tensor,
                                 self_offset: int, pair_value: int, smooth: bool, rank: torch.Tensor,
                                 deterministic: bool, need_dx: bool, need_dy: bool,
                                 normalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dX, dY) of the triplet margin loss: lse_rows_backward's passes with the triplet kind's gradient tile
    (_lse_kernels._triplet_margin_gradient). |dL/dv| of a row is at most g_a times the larger of its slots' count
    (a negative's) and its largest weight (a positive's)."""
    n = x.shape[0]
    state = torch.zeros((STAT_ROWS, n), dtype=stats_dtype(x.dtype), device=x.device)
    state[0] = grad
    bound = grad.abs() * torch.maximum(weights.amax(dim=1) if weights.shape[1] else torch.zeros_like(grad),
                                       torch.full_like(grad, float(weights.shape[1])))
    return _engine_backward(state, torch.zeros_like(state), x, y, x_labels, y_labels, self_offset,
                            KIND["triplet_margin"], pair_value, 0.0, float(smooth), deterministic, need_dx, need_dy,
                            normalize, triplet=(table, weights, rank), bound=bound)


@torch.library.custom_op("metric_kernels::triton_batch_hard_select", mutates_args=())
def batch_hard_select(x: torch.Tensor, y: torch.Tensor, x_labels: torch.Tensor, y_labels: torch.Tensor,
                      self_offset: int, normalize: bool = True) -> torch.Tensor:
    """[2, N]: per query the farthest positive and nearest negative reference (-1: none), on the raw rows,
    normalised inside the kernel when `normalize`; [4, N] when the products are tf32 (selection_rows): rows 2 and
    3 hold each side's runner-up, for a choice on exact distances."""
    x, y, n, x_norms, y_norms, splits = _walk_setup(x, y)
    sides = selection_rows(x.dtype)
    values = torch.empty((splits, sides, n), dtype=stats_dtype(x.dtype), device=x.device)
    choices = torch.empty((splits, sides, n), dtype=torch.int64, device=x.device)
    sizes, constexprs = _shape_args(x, y)
    with _device_guard(x):
        _batch_hard[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits)](
            x, y, x_norms, y_norms, x_labels, y_labels, values, choices, *sizes, self_offset, splits,
            *tuning_key(x, y), NORMALIZE=normalize, **constexprs)
    return choices[0] if splits == 1 else merge_selections(values, choices)


def selection_rows(dtype: torch.dtype) -> int:
    """Rows of batch_hard_select's answer for rows of this dtype: 4 (leaders and runners-up) when the products are
    tf32, else 2."""
    return 4 if _precision(dtype) == "tf32" else 2


def merge_selections(values: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
    """The best one (or two, with runners-up) per side of every split's candidates, values and choices
    [splits, 2 or 4, N]. Candidates in (split, rank) order hold ascending indices among equal values (the splits
    cover ascending reference ranges, and a split's leader precedes its runner-up on a tie), so a stable sort
    keeps ties at the lowest index; a split that saw none holds -inf (farthest) / +inf (nearest) and index -1."""
    sides, n = values.shape[1], values.shape[2]
    kept = sides // 2
    merged = []
    for side, farthest in ((0, True), (1, False)):
        order = torch.sort(values[:, side::2].reshape(-1, n), dim=0, descending=farthest, stable=True).indices
        merged.append(choices[:, side::2].reshape(-1, n).gather(0, order[:kept]))
    # rows: farthest leader, nearest leader, then the runners-up in the same order
    return torch.stack([merged[0], merged[1]], dim=1).reshape(sides, n)


# Values of a triplet kernel's tile in 32-bit registers per thread: the kernels keep three or four such tiles live
# (u, v, their gradient), and more spilled (fp64 rows of D >= 256, D = 8192) in the compile proof.
_TRIPLET_TILE_REGISTERS = 16


def _triplet_blocks(d: int, element_size: int):
    """(rows per program, D tile, warps of the row kernels, warps of the reference kernel) of the triplet kernels:
    the whole of D on chip, about 4096 values per row tile (one row when D is wider), and enough warps that a tile
    takes at most _TRIPLET_TILE_REGISTERS registers per thread (fp64 values take two)."""
    width = max(16, triton.next_power_of_2(max(d, 1)))
    rows = max(1, min(64, 4096 // width))
    words = 2 if element_size == 8 else 1

    def warps(values):
        return max(4, min(16, values * words // (32 * _TRIPLET_TILE_REGISTERS)))
    return rows, width, warps(rows * width), warps(width)


@torch.library.custom_op("metric_kernels::triton_triplet_distances", mutates_args=())
def triplet_distances(x: torch.Tensor, y: Optional[torch.Tensor], positive: torch.Tensor, negative: torch.Tensor,
                      normalize: bool) -> torch.Tensor:
    """[2, N]: ||u_i - v_positive(i)|| and ||u_i - v_negative(i)|| (indices in range), on the raw rows (u = x r,
    v = y r; r = 1 / max(||row||, eps) when `normalize`, else 1). y = None: the references are the queries."""
    x, y = _kernel_rows(x, x if y is None else y)
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    out = torch.empty((2, n), dtype=stats_dtype(x.dtype), device=x.device)
    if n == 0:
        return out
    x_norms, y_norms = _norms_of(x, y)
    block_rows, width, row_warps, _ = _triplet_blocks(d, x.element_size())
    with _device_guard(x):
        _triplet_kernel.triplet_distances[(triton.cdiv(n, block_rows),)](
            x, y, x_norms, y_norms, positive, negative, out, n, m, d, x.stride(0), x.stride(1), y.stride(0),
            y.stride(1), BLOCK_R=block_rows, BLOCK_D=width, ACC=_accumulator(x.dtype), NORMALIZE=normalize,
            num_warps=row_warps)
    return out



@torch.library.custom_op("metric_kernels::triton_triplet_distances_backward", mutates_args=())
def triplet_distances_backward(grad: torch.Tensor, distances: torch.Tensor, x: torch.Tensor,
                               y: Optional[torch.Tensor], positive: torch.Tensor, negative: torch.Tensor,
                               normalize: bool, need_dx: bool, need_dy: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dX, dY) in the rows' dtype; a distance of 0 passes no gradient (as torch.cdist). Deterministic: dY sums, per
    reference, the rows that chose it in a fixed order (the 2 N choices sorted by reference: O(N) integers)."""
    x, y, same, need_dx, need_dy, dx, dy, has_pairs = _backward_setup(x, y, need_dx, need_dy)
    if not has_pairs:
        return dx, dy
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    x_norms, y_norms = _norms_of(x, y)
    coefficients, order, offsets = triplet_backward_inputs(grad, distances, positive, negative, m, own_entries=same)
    block_rows, width, row_warps, reference_warps = _triplet_blocks(d, x.element_size())
    rows = (x, y, x_norms, y_norms)
    sizes = (n, m, d, x.stride(0), x.stride(1), y.stride(0), y.stride(1))
    constexprs = dict(BLOCK_D=width, ACC=_accumulator(x.dtype), NORMALIZE=normalize)
    with _device_guard(x):
        if need_dx and not same:
            _triplet_kernel.triplet_distances_backward_rows[(triton.cdiv(n, block_rows),)](
                coefficients, *rows, positive, negative, dx, *sizes, BLOCK_R=block_rows, num_warps=row_warps,
                **constexprs)
        if need_dy or same:  # same: each row's whole gradient, as a reference and as a query, in one pass
            queries = torch.arange(n, device=x.device)
            entry_rows = torch.cat([queries, queries] + ([positive, negative] if same else []))[order]
            entry_coefficients = coefficients.reshape(-1).repeat(2 if same else 1)[order]
            _triplet_kernel.triplet_distances_backward_references[(m,)](
                entry_rows, entry_coefficients, offsets, *rows, dx if same else dy, *sizes,
                num_warps=reference_warps, **constexprs)
    return dx, dy


@triplet_distances_backward.register_fake
def _(grad, distances, x, y, positive, negative, normalize, need_dx, need_dy):
    return fake_gradients(x, y, need_dx, need_dy)


register_triplet_autograd("metric_kernels::triton_triplet_distances", triplet_distances_backward)
