"""The CUDA kernels of csrc/cuda on the CPU, through the host emulation (csrc/cuda/host_emulation.h; backend
"cuda-emulated", ops cuda_emulated_*). tests/test_fused.py runs every loss through the public API on it, as on the
other fused backends (fp64 and fp32 rows: the loss API hands fused backends normalised fp32 rows for half inputs);
this file adds what only the ops or the emulation itself reach:

- the ops on every operand type the kernels have, the tensor-core ones included (bf16, fp16, tf32), both backward
  paths, against the CPU op in float64 on the same rounded values (the checks tests/test_cuda_gpu.py makes on a GPU);
- (the losses in tf32 through the public API: tests/test_tf32.py, with triton's);
- the shared-memory limits of the glue on an emulated GPU with 99 KB per block (sm_86 / sm_89 / sm_120);
- the emulation on its own (tests/host_emulation_check.cpp): its fp16 / bf16 / tf32 conversions against torch and
  an independent rounding, its barriers, shuffles, atomics, WMMA and launch checks, the misuses it stops, and the CUDA
  it refuses to compile.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import metric_kernels as mk
from metric_kernels._pairs import positive_slots
from metric_kernels._row_epilogues import triplet_backward_inputs
from tests.helpers import assert_rel_close, tf32_rounded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
REASON = mk.available_backends("cpu")["cuda-emulated"]


@pytest.fixture(autouse=True)
def _emulated_backend_is_built(request):
    """Built everywhere the extension is (CI builds it): missing is a failure, not a skip. The checks of the emulation
    alone need only a C++ compiler."""
    if REASON is not None and "check" not in request.node.name:
        pytest.fail(f"backend 'cuda-emulated' is not usable here: {REASON}")


OPERANDS = {"fp64": torch.float64, "fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
            "fp16": torch.float16}
# (statistics, gradients), relative to the largest entry, as in tests/test_cuda_gpu.py
OPERAND_TOLERANCE = {"fp64": (1e-10, 1e-10), "fp32": (1e-5, 1e-4), "tf32": (2e-2, 5e-2), "bf16": (1e-4, 3e-2),
                     "fp16": (1e-4, 5e-3)}


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("operand", list(OPERANDS))
@pytest.mark.parametrize("pair_value", [0, 1, 2])
@pytest.mark.parametrize("kind", [0, 1, 2, 4, 5])
@pytest.mark.parametrize("refs", ["ref_emb", "self"])
def test_ops_on_every_operand_type(refs, kind, pair_value, operand, deterministic, normalize):
    """Statistics and (dX, dY) on rows of each operand type against the CPU op in float64 on the same rounded values;
    N, M past one 64-row tile, D = 72: two D slices of the backward, a ragged last chunk (8 of 32 columns). Each pair
    value (the dot product of unit rows; minus the squared or plain Euclidean distance of rows with norms from 0.5 to
    1.5, whose gradients have the norm terms). normalize: the rows (norms 0.5 to 1.5 for every pair value) are raw
    and the kernels fold in their normalisation, against the CPU op on the normalised float64 rows, its gradients
    taken back through the normalisation by autograd."""
    dtype = OPERANDS[operand]
    g = torch.Generator().manual_seed(kind * 7 + len(operand) + 101 * pair_value + 1000 * normalize)
    n, m, dim = 150, 97, 72

    def rows(count):
        unit = torch.nn.functional.normalize(torch.randn(count, dim, generator=g, dtype=torch.float64), dim=1)
        scale = 1.0 if pair_value == 0 and not normalize else 0.5 + torch.rand(count, 1, generator=g,
                                                                                dtype=torch.float64)
        return (unit * scale).to(dtype)

    x = rows(n)
    y = None if refs == "self" else rows(m)
    labels = torch.randint(0, 6, (n,), generator=g)
    y_labels = labels if y is None else torch.randint(0, 6, (m,), generator=g)
    offset = 0 if refs == "self" else -1
    a, b = _op_params(kind, pair_value)
    # tf32 rounds the rows inside the products: the exact op runs on the rounded rows, so that a pair near
    # Contrastive's margins falls on the same side in both (its counts are statistics too)
    exact = (lambda t: tf32_rounded(t)) if operand == "tf32" else (lambda t: t.double())
    raw_x, raw_y = exact(x).clone().requires_grad_(), None if y is None else exact(y).clone().requires_grad_()

    def unit(raw, rows):
        if not normalize:
            return raw
        # the kernels divide the (tf32-rounded) products by the norms of the rows as stored
        stored_norm = rows.detach().double().norm(dim=1, keepdim=True)
        return torch.nn.functional.normalize(raw, dim=1) * (raw.detach().norm(dim=1, keepdim=True) / stored_norm)

    exact_x, exact_y = unit(raw_x, x), None if y is None else unit(raw_y, y)
    exact_args = (exact_x.detach(), None if y is None else exact_y.detach(), labels, y_labels, offset, kind,
                  pair_value, a, b, True)
    expected = torch.ops.metric_kernels.cpu_lse_rows(*exact_args)
    grad = torch.randn(4, n, generator=g, dtype=torch.float64)
    expected_dx, expected_dy = torch.ops.metric_kernels.cpu_lse_rows_backward(grad, expected, *exact_args[:-1], True,
                                                                              True, y is not None)
    if normalize:  # through the normalisation's Jacobian
        expected_dx = torch.autograd.grad(exact_x, raw_x, expected_dx)[0]
        if y is not None:
            expected_dy = torch.autograd.grad(exact_y, raw_y, expected_dy)[0]
    args = (x, y, labels, y_labels, offset, kind, pair_value, a, b, deterministic)
    allow_tf32 = operand == "tf32"
    stats = torch.ops.metric_kernels.cuda_emulated_lse_rows(*args, normalize, allow_tf32)
    dx, dy = torch.ops.metric_kernels.cuda_emulated_lse_rows_backward(grad.to(stats.dtype), stats, *args[:-1],
                                                                      deterministic, True, y is not None, normalize,
                                                                      allow_tf32)
    value_tol, grad_tol = OPERAND_TOLERANCE[operand]
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(stats), finite), "empty rows (-inf) differ"
    what = f"{operand} kind={kind} pair={pair_value} normalize={normalize}"
    assert_rel_close(stats[finite], expected[finite], value_tol, f"{what} stats")
    assert dx.dtype == dtype
    assert_rel_close(dx, expected_dx, grad_tol, f"{what} dX")
    if y is not None:
        assert dy.dtype == dtype
        assert_rel_close(dy, expected_dy, grad_tol, f"{what} dY")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("operand", list(OPERANDS))
@pytest.mark.parametrize("pair_value", [0, 1, 2])
@pytest.mark.parametrize("refs", ["ref_emb", "self"])
def test_triplet_margin_ops_on_every_operand_type(refs, pair_value, operand, smooth, normalize):
    """The triplet margin loss's ops (the forward's statistics, table and weights; dX and dY by both backward paths)
    on rows of each operand type against the CPU op in float64 on the same rounded values, as
    test_ops_on_every_operand_type: N, M past one tile, D = 72 (two backward slices)."""
    dtype = OPERANDS[operand]
    g = torch.Generator().manual_seed(len(operand) + 7 * pair_value + 50 * smooth + 100 * normalize)
    n, m, dim = 150, 97, 72

    def rows(count):
        unit = torch.nn.functional.normalize(torch.randn(count, dim, generator=g, dtype=torch.float64), dim=1)
        return (unit * (0.5 + torch.rand(count, 1, generator=g, dtype=torch.float64))).to(dtype)

    x = rows(n)
    y = None if refs == "self" else rows(m)
    labels = torch.randint(0, 6, (n,), generator=g)
    y_labels = labels if y is None else torch.randint(0, 6, (m,), generator=g)
    offset = 0 if refs == "self" else -1
    exact = (lambda t: tf32_rounded(t)) if operand == "tf32" else (lambda t: t.double())
    raw_x, raw_y = exact(x).clone().requires_grad_(), None if y is None else exact(y).clone().requires_grad_()

    def unit(raw, rows):  # as in test_ops_on_every_operand_type
        if not normalize:
            return raw
        stored_norm = rows.detach().double().norm(dim=1, keepdim=True)
        return torch.nn.functional.normalize(raw, dim=1) * (raw.detach().norm(dim=1, keepdim=True) / stored_norm)

    exact_x, exact_y = unit(raw_x, x), None if y is None else unit(raw_y, y)
    slots, rank = positive_slots(labels, y_labels)
    margin = 0.2 if pair_value == 0 else 0.5
    ops = torch.ops.metric_kernels
    exact_rows = (exact_x.detach(), None if y is None else exact_y.detach(), labels, y_labels, offset, pair_value)
    expected, table, weights = ops.cpu_triplet_margin_rows(*exact_rows, margin, smooth, slots, rank, True)
    grad = torch.randn(n, generator=g, dtype=torch.float64)
    expected_dx, expected_dy = ops.cpu_triplet_margin_rows_backward(grad, table, weights, *exact_rows, smooth, rank,
                                                                    True, True, y is not None)
    if normalize:  # through the normalisation's Jacobian
        expected_dx = torch.autograd.grad(exact_x, raw_x, expected_dx)[0]
        if y is not None:
            expected_dy = torch.autograd.grad(exact_y, raw_y, expected_dy)[0]
    allow_tf32 = operand == "tf32"
    rows_args = (x, y, labels, y_labels, offset, pair_value)
    stats, our_table, our_weights = ops.cuda_emulated_triplet_margin_rows(*rows_args, margin, smooth, slots, rank,
                                                                          True, normalize, allow_tf32)
    value_tol, grad_tol = OPERAND_TOLERANCE[operand]
    what = f"{operand} pair={pair_value} smooth={smooth} normalize={normalize}"
    filled = torch.isfinite(table)
    assert torch.equal(torch.isfinite(our_table), filled), f"{what}: the slots no positive fills differ"
    assert_rel_close(our_table[filled], table[filled], value_tol, f"{what} table")
    assert_rel_close(stats[0], expected[0], value_tol, f"{what} loss sums")
    if smooth:  # every triplet counts, and the slopes are smooth
        assert torch.equal(stats[1].double(), expected[1]), f"{what} nonzero counts"
        assert_rel_close(our_weights, weights, grad_tol if allow_tf32 else value_tol, f"{what} weights")
    else:  # products rounded in fp32 may put a hinge's triplet near 0 on the other side: its count and slope move by 1
        flips = 0 if operand == "fp64" else 2
        assert (stats[1].double() - expected[1]).abs().max() <= flips, f"{what} nonzero counts"
        assert (our_weights.double() - weights).abs().max() <= flips, f"{what} weights"
    for deterministic in (True, False):
        dx, dy = ops.cuda_emulated_triplet_margin_rows_backward(grad.to(stats.dtype), our_table, our_weights,
                                                                *rows_args, smooth, rank, deterministic, True,
                                                                y is not None, normalize, allow_tf32)
        assert dx.dtype == dtype
        assert_rel_close(dx, expected_dx, grad_tol, f"{what} deterministic={deterministic} dX")
        if y is not None:
            assert dy.dtype == dtype
            assert_rel_close(dy, expected_dy, grad_tol, f"{what} deterministic={deterministic} dY")


def _op_params(kind, pair_value):
    """(param_a, param_b) of an engine kind (csrc/epilogue.h) for rows of norm 0.5 to 1.5: a temperature of 0.1 for
    SupCon and NT-Xent, Contrastive's margins in pair-value form inside the pair values' range."""
    if kind in (1, 4):
        return 0.0, 10.0
    if kind == 5:
        return (0.3, 0.1) if pair_value == 0 else (-0.5, -1.5)
    return 0.25, 32.0


@pytest.mark.parametrize("operand", ["fp32", "tf32", "bf16", "fp16"])
def test_tensor_core_operands_round_like_their_type(operand):
    """The emulated tensor cores are not fp32 in disguise: the statistics of 16-bit and tf32 tiles differ from fp32
    ones by about their type's rounding of S (S of tf32-rounded rows), and equal the exact ones on the rounded rows."""
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(70, 40, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 4, (70,), generator=g)
    args = (None, labels, labels, 0, 1, 0, 0.0, 10.0, True)
    stats = torch.ops.metric_kernels.cuda_emulated_lse_rows(x.to(OPERANDS[operand]), *args, normalize=False,
                                                            allow_tf32=operand == "tf32")
    rounded = tf32_rounded(x) if operand == "tf32" else x.to(OPERANDS[operand]).double()
    on_rounded = torch.ops.metric_kernels.cpu_lse_rows(rounded, *args)
    on_exact = torch.ops.metric_kernels.cpu_lse_rows(x, *args)
    assert_rel_close(stats[1:], on_rounded[1:], 1e-5, f"{operand} on its rounded rows")
    if operand != "fp32":
        assert (stats[1:].double() - on_exact[1:]).abs().max() > 1e-4, f"{operand} looks like fp32"


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("operand", list(OPERANDS))
def test_batch_hard_selection_on_every_operand_type(operand, normalize):
    """The chosen pairs are the hardest ones: their exact distance equals the exact optimum (near-ties may pick
    another index at the same distance); normalize: of the rows the kernels normalise (raw norms 0.5 to 1.5)."""
    dtype = OPERANDS[operand]
    g = torch.Generator().manual_seed(4)
    scale = (lambda count: 0.5 + torch.rand(count, 1, generator=g, dtype=torch.float64)) if normalize else (
        lambda count: 1.0)
    x = (torch.randn(130, 40, generator=g, dtype=torch.float64) * scale(130)).to(dtype)
    y = (torch.randn(170, 40, generator=g, dtype=torch.float64) * scale(170)).to(dtype)
    labels, y_labels = torch.randint(0, 5, (130,), generator=g), torch.randint(0, 5, (170,), generator=g)
    choices = torch.ops.metric_kernels.cuda_emulated_batch_hard_select(x, y, labels, y_labels, 3, normalize=normalize,
                                                                       allow_tf32=operand == "tf32")
    unit = (lambda t: torch.nn.functional.normalize(t.double(), dim=1)) if normalize else (lambda t: t.double())
    expected = torch.ops.metric_kernels.cpu_batch_hard_select(unit(x), unit(y), labels, y_labels, 3)
    assert choices.shape[0] == (4 if operand == "tf32" else 2)  # tf32: the runners-up too (tests/test_tf32.py)
    choices = choices[:2]
    assert torch.equal(choices < 0, expected < 0)
    distances = torch.cdist(unit(x), unit(y))
    rows = torch.arange(130)
    tol = {"fp64": 1e-12, "fp32": 1e-5}.get(operand, 1e-2)
    for side in (0, 1):
        have = expected[side] >= 0
        assert_rel_close(distances[rows[have], choices[side][have]], distances[rows[have], expected[side][have]],
                         tol, f"{operand} side {side}")


def _exact_triplet_distances(x, y, positive, negative, normalize):
    """The chosen distances in float64 by torch ops, differentiable: ||u_i - v_p(i)||, ||u_i - v_n(i)||."""
    unit = (lambda t: torch.nn.functional.normalize(t, dim=1)) if normalize else (lambda t: t)
    u, v = unit(x), unit(x if y is None else y)
    return torch.stack([torch.linalg.vector_norm(u - v[positive], dim=1),
                        torch.linalg.vector_norm(u - v[negative], dim=1)])


def check_triplet_distance_ops(prefix, device, operand, refs, normalize, dim=70):
    """Batch-hard's chosen distances and their backward (csrc/cuda/triplet.cu; ops <prefix>_triplet_distances*, on
    `device`) against torch in float64 on the same rounded rows: values, dX and dY for each gradient wanted, a
    repeated choice (several rows choosing one reference), a chosen pair at distance 0 (gradient 0 there) and a row of
    zeros (the normalisation's clamp)."""
    dtype = OPERANDS[operand]
    g = torch.Generator().manual_seed(11 + len(operand) + 2 * normalize + dim)
    n, m = 37, 1 if refs == "self" else 23
    m = n if refs == "self" else m
    x = (torch.randn(n, dim, generator=g, dtype=torch.float64) * (0.5 + torch.rand(n, 1, generator=g))).to(dtype)
    y = None if refs == "self" else (torch.randn(m, dim, generator=g, dtype=torch.float64) * 2).to(dtype)
    if y is not None:
        y[3] = x[5]  # row 5's chosen positive below is itself: distance 0
    x[7] = 0  # a zero row: r = 1 / eps, nothing radial
    positive = torch.randint(0, m, (n,), generator=g)
    negative = torch.randint(0, 4, (n,), generator=g)  # few references chosen by many rows
    positive[5] = 5 if y is None else 3
    forward = getattr(torch.ops.metric_kernels, f"{prefix}_triplet_distances")
    backward = getattr(torch.ops.metric_kernels, f"{prefix}_triplet_distances_backward")

    def on_device(*tensors):
        return [None if t is None else t.to(device) for t in tensors]

    distances = forward(*on_device(x, y, positive, negative), normalize).cpu()
    x64 = x.double().requires_grad_()
    y64 = None if y is None else y.double().requires_grad_()
    exact = _exact_triplet_distances(x64, y64, positive, negative, normalize)
    # fp32 sums throughout; 16-bit gradients round once, when stored (half a unit in the last place of their type)
    value_tol, grad_tol = {"fp64": (1e-12, 1e-10), "fp32": (1e-5, 1e-4), "bf16": (1e-5, 2.0 ** -8),
                           "fp16": (1e-5, 2.0 ** -10)}[operand]
    assert distances.dtype == (torch.float64 if operand == "fp64" else torch.float32)
    assert_rel_close(distances, exact.detach(), value_tol, f"{operand} distances")
    grad = torch.randn(2, n, generator=g, dtype=torch.float64)
    (exact * grad).sum().backward()
    expected = (x64.grad, None if y is None else y64.grad)
    coefficients, order, offsets = triplet_backward_inputs(grad, distances.double(), positive, negative, m)
    rest = torch.arange(n) != 7

    def check_dx(dx, what):  # the zero row's gradient (r = 1 / eps when normalising) on a scale of its own
        assert dx.dtype == dtype
        assert_rel_close(dx[rest].double(), expected[0][rest], grad_tol, what)
        if dtype == torch.float16 and normalize:  # 1 / eps overflows fp16, in the kernels as in the exact value
            assert torch.equal(dx[7], expected[0][7].to(dtype)), f"{what}, the zero row"
        else:
            assert_rel_close(dx[7].double(), expected[0][7], grad_tol, f"{what}, the zero row")

    for need_dx, need_dy in ((True, True), (True, False), (False, True)):
        dx, dy = (g.cpu() for g in backward(*on_device(coefficients, x, y, positive, negative, order, offsets),
                                            normalize, need_dx, need_dy))
        if y is None:  # the whole gradient in dx
            assert dy.shape == (0, dim)
            check_dx(dx, f"{operand} dX (self)")
            continue
        assert dx.shape == ((n if need_dx else 0), dim) and dy.shape == ((m if need_dy else 0), dim)
        if need_dx:
            check_dx(dx, f"{operand} dX")
        if need_dy:
            assert dy.dtype == dtype
            assert_rel_close(dy.double(), expected[1], grad_tol, f"{operand} dY")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("refs", ["ref_emb", "self"])
@pytest.mark.parametrize("operand", ["fp64", "fp32", "bf16", "fp16"])
def test_triplet_distance_ops_on_every_operand_type(operand, refs, normalize):
    check_triplet_distance_ops("cuda_emulated", "cpu", operand, refs, normalize)


@pytest.mark.parametrize("dim", [256, 300, 600])
@pytest.mark.parametrize("refs", ["ref_emb", "self"])
@pytest.mark.parametrize("operand", ["fp32", "bf16"])
def test_triplet_distance_ops_over_several_chunks_of_d(operand, refs, dim):
    """The backward walks D in chunks of 256 per warp, one in registers (its radial sum and its write from one
    computation) or, wider, each recomputed for the write: one chunk exactly, a ragged second, a third."""
    check_triplet_distance_ops("cuda_emulated", "cpu", operand, refs, True, dim)


def test_triplet_distance_ops_check_their_arguments_and_pass_opcheck():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(9, 5, generator=g), torch.randn(6, 5, generator=g)
    positive, negative = torch.randint(0, 6, (9,), generator=g), torch.randint(0, 6, (9,), generator=g)
    ops = torch.ops.metric_kernels
    with pytest.raises(RuntimeError, match="positive and negative must be int64, one per row of x"):
        ops.cuda_emulated_triplet_distances(x, y, positive[:8], negative, True)
    with pytest.raises(RuntimeError, match="y must be M x D"):
        ops.cuda_emulated_triplet_distances(x, y[:, :4], positive, negative, True)
    with pytest.raises(RuntimeError, match="the chosen references must exist"):
        ops.cuda_emulated_triplet_distances(x, y[:0], positive, negative, True)
    with pytest.raises(RuntimeError, match="offsets must be int64, M \\+ 1 entries"):
        ops.cuda_emulated_triplet_distances_backward(torch.ones(2, 9), x, y, positive, negative,
                                                     torch.arange(18), torch.zeros(6, dtype=torch.long), True, True,
                                                     True)
    # out-of-range indices are clamped into the references, never read past them
    far = ops.cuda_emulated_triplet_distances(x, y, positive + 100, negative - 100, False)
    assert torch.equal(far, ops.cuda_emulated_triplet_distances(x, y, torch.full_like(positive, 5),
                                                                torch.zeros_like(negative), False))
    for rows in (y, None):
        torch.library.opcheck(ops.cuda_emulated_triplet_distances,
                              (x.double().requires_grad_(), None if rows is None else rows.double().requires_grad_(),
                               positive, negative, True))


def test_ops_get_torch_settings_from_the_backend():
    """The ops cannot read torch's global settings (stable ABI): backend "cuda-emulated" passes torch's TF32
    permission as their last argument, and torch's deterministic mode inside `deterministic`; the ops themselves
    default to IEEE fp32 products."""
    from metric_kernels._fused import CudaKernelRows

    calls = []

    class Recorded(CudaKernelRows):
        def __init__(self):
            super().__init__("cuda_emulated")
            lse_rows, select = self._lse_rows, self._select
            self._lse_rows = lambda *args: calls.append(("lse_rows", args[9], args[-1])) or lse_rows(*args)
            self._select = lambda *args: calls.append(("select", None, args[-1])) or select(*args)

    g = torch.Generator().manual_seed(3)
    x, labels = torch.randn(20, 8, generator=g), torch.randint(0, 3, (20,), generator=g)
    rows = Recorded()
    precision, deterministic_mode = torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.set_float32_matmul_precision("high")
        torch.use_deterministic_algorithms(True)
        rows.supcon_rows(x, x, labels, labels, 0, temperature=0.1, deterministic=False, normalize=True)
        rows.batch_hard_rows(x, x, labels, labels, 0, margin=0.1, soft=False, deterministic=False, normalize=True)
        torch.set_float32_matmul_precision("highest")
        torch.use_deterministic_algorithms(False)
        rows.supcon_rows(x, x, labels, labels, 0, temperature=0.1, deterministic=False, normalize=True)
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.use_deterministic_algorithms(deterministic_mode)
    assert calls == [("lse_rows", True, True), ("select", None, True), ("lse_rows", False, False)], calls
    stats = torch.ops.metric_kernels.cuda_emulated_lse_rows(x, None, labels, labels, 0, 1, 0, 0.0, 10.0, True)
    assert torch.equal(stats, torch.ops.metric_kernels.cuda_emulated_lse_rows(x, None, labels, labels, 0, 1, 0, 0.0,
                                                                              10.0, True, True, False))


def test_shared_memory_limits_of_a_99_kb_gpu(monkeypatch):
    """On a GPU that allows 99 KB of shared memory per block (sm_86, sm_89, sm_120) the fp64 backward (139.5 KB)
    stops with the glue's clear error; fp32's backward (86.75 KB; its atomic pass, 103.25 KB, gives way to the
    deterministic one) and fp64's forward still run."""
    monkeypatch.setenv("METRIC_KERNELS_EMULATED_SHARED_BYTES", "101376")
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(40, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    ops = torch.ops.metric_kernels
    stats = ops.cuda_emulated_lse_rows(x, None, labels, labels, 0, 0, 0, 0.25, 8.0, True)
    with pytest.raises(RuntimeError, match=r"needs 1\d{5} bytes of shared memory per block and this GPU allows 101376"):
        ops.cuda_emulated_lse_rows_backward(torch.ones_like(stats), stats, x, None, labels, labels, 0, 0, 0, 0.25, 8.0,
                                            True, True, False)
    x32 = x.float()
    stats32 = ops.cuda_emulated_lse_rows(x32, None, labels, labels, 0, 0, 0, 0.25, 8.0, False)
    dx, _ = ops.cuda_emulated_lse_rows_backward(torch.ones_like(stats32), stats32, x32, None, labels, labels, 0, 0,
                                                0, 0.25, 8.0, False, True, False)
    assert torch.isfinite(dx).all()


@pytest.mark.parametrize("dim, atomic", [(192, True), (256, False)])
def test_atomic_backward_on_a_99_kb_gpu_up_to_the_d_its_shared_slices_fit(monkeypatch, dim, atomic):
    """The atomic pass's shared memory grows with D (bf16: 68.25 KB up to D = 128, then 17 KB per 64 columns of dX
    accumulators in shared memory, 102.25 KB at 256): a GPU that allows 99 KB runs it up to D = 192 (3
    matmul-equivalents, dY added by atomics) and the deterministic backward above (4, no atomics), with the same
    gradients."""
    monkeypatch.setenv("METRIC_KERNELS_EMULATED_SHARED_BYTES", "101376")
    g = torch.Generator().manual_seed(dim)
    n = m = 64
    x, y = (torch.randn(rows, dim, generator=g).to(torch.bfloat16) for rows in (n, m))
    labels, y_labels = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (m,), generator=g)
    ops = torch.ops.metric_kernels
    args = (x, y, labels, y_labels, -1, 1, 0, 0.0, 10.0)
    stats = ops.cuda_emulated_lse_rows(*args, True, True, False)
    grad = torch.randn(4, n, generator=g)
    results = {}
    for deterministic in (False, True):
        def run():
            results[deterministic] = ops.cuda_emulated_lse_rows_backward(grad, stats, *args, deterministic, True,
                                                                         True, True, False)
        flops, atomics, _ = _work(run)
        default_path = not deterministic and atomic
        assert sum(flops) / (2.0 * n * m * dim) == (3.0 if default_path else 4.0), (deterministic, flops)
        assert atomics == (m * dim * (n // 64) if default_path else 0), (deterministic, atomics)
    for got, expected in zip(results[False], results[True]):
        assert_rel_close(got, expected, OPERAND_TOLERANCE["bf16"][1], f"D={dim} atomic against deterministic")


def test_ops_take_cpu_tensors_only():
    x = torch.randn(4, 3)
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="cuda_emulated ops take float32, float64, float16 or bfloat16 rows"):
        torch.ops.metric_kernels.cuda_emulated_lse_rows(x.int(), None, labels, labels, 0, 0, 0, 0.25, 8.0, True)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda_emulated ops take CPU tensors"):
            torch.ops.metric_kernels.cuda_emulated_lse_rows(x.cuda(), None, labels.cuda(), labels.cuda(), 0, 0,
                                                            0, 0.25, 8.0, True)



@pytest.mark.parametrize("prefix", ["cpu", "cuda_emulated"])
def test_native_ops_refuse_an_unknown_pair_value(prefix):
    """pair_value is 0, 1 or 2 (csrc/op_glue.h); anything else stops with what the values mean."""
    x, labels = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    ops = torch.ops.metric_kernels
    match = r"pair_value must be 0 \(the dot product\), 1 .* or 2 .*, got "
    with pytest.raises(RuntimeError, match=match + "3"):
        getattr(ops, f"{prefix}_lse_rows")(x, None, labels, labels, 0, 1, 3, 0.0, 10.0, True)
    stats = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match=match + "-1"):
        getattr(ops, f"{prefix}_lse_rows_backward")(stats, stats, x, None, labels, labels, 0, 1, -1, 0.0, 10.0, True,
                                                    True, False)

FORK_SCRIPT = """
import os, torch, metric_kernels as mk
x, labels = torch.randn(70, 16), torch.randint(0, 4, (70,))
before = mk.circle_loss(x, labels, backend="cuda-emulated")  # the parent's worker threads exist now
pid = os.fork()
if pid == 0:
    os._exit(0 if torch.equal(mk.circle_loss(x, labels, backend="cuda-emulated"), before) else 1)
print(os.waitpid(pid, 0)[1])
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_runs_in_a_forked_child():
    """A forked child (a DataLoader worker) has none of the parent's worker threads: it starts its own pool."""
    result = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "0", result.stdout + result.stderr[-3000:]


def test_auto_never_picks_cuda_emulated():
    from metric_kernels import backends
    assert backends.resolve("auto", torch.device("cpu")).__name__ != "metric_kernels.cuda_emulated"
    assert mk.available_backends("cuda")["cuda-emulated"] is not None  # CPU tensors only


# ---- the emulation on its own --------------------------------------------------------------------------------------

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
COMPILE = ["c++", "-std=c++20", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-DMETRIC_KERNELS_HOST_EMULATION=1",
           f"-I{CSRC}"]


@pytest.fixture(scope="module")
def check_program(tmp_path_factory):
    binary = tmp_path_factory.mktemp("emulation") / "check"
    subprocess.run(COMPILE + ["-O1", os.path.join(ROOT, "tests", "host_emulation_check.cpp"),
                              os.path.join(CSRC, "cuda", "host_emulation.cpp"), "-o", str(binary)],
                   check=True, capture_output=True, text=True, timeout=300)
    return str(binary)


@needs_compiler
def test_emulation_semantics_check(check_program):
    result = subprocess.run([check_program, "semantics"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-3000:] + result.stderr


@needs_compiler
def test_kernels_have_no_data_race_within_a_block_check(tmp_path):
    """The kernels of csrc/cuda (every operand type, forward, both backward paths, batch-hard) and the emulation's
    own checks under ThreadSanitizer: a block's threads are host threads here, so a missing __syncthreads between a
    shared-memory write and another thread's read is a reported data race. (Races between blocks cannot show: blocks
    run one after another.)"""
    binary = tmp_path / "check_tsan"
    build = subprocess.run(COMPILE + ["-O1", "-g", "-fsanitize=thread", os.path.join(ROOT, "tests", "host_emulation_check.cpp"),
                                      os.path.join(CSRC, "cuda", "host_emulation.cpp"), "-o", str(binary)],
                           capture_output=True, text=True, timeout=300)
    if build.returncode != 0 and "tsan" in build.stderr.lower():
        pytest.skip(f"no ThreadSanitizer runtime here: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr[-3000:]
    for mode in ("kernels", "semantics"):
        result = subprocess.run([str(binary), mode], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "ThreadSanitizer" not in result.stderr, (mode, result.stderr[-5000:])
        assert result.stdout.strip().endswith("ok"), result.stdout[-3000:]


def _tf32_reference(values: torch.Tensor) -> torch.Tensor:
    """Round to 10 mantissa bits, to nearest with ties away from zero, from the neighbouring tf32 values in float64
    (not from the bit trick the emulation uses)."""
    v = values.double()
    bits = values.view(torch.int32)
    down = (bits & ~0x1FFF).view(torch.float32).double()  # toward zero
    ulp = torch.ldexp(torch.ones_like(v), (torch.frexp(v)[1] - 11).clamp_min(-136))  # subnormals: 2^-126 / 2^10
    up = down + torch.sign(v) * ulp
    nearest = torch.where((v - down).abs() < (up - v).abs(), down, up)
    return torch.where(torch.isfinite(v) & (v != 0), nearest, v).float()


@needs_compiler
def test_emulation_conversions_check(check_program, tmp_path):
    """fp32 -> fp16 / bf16 equal torch's (round to nearest even, subnormals, overflow, ties), fp16 / bf16 -> fp32 for
    every pattern, and __float_to_tf32 rounds to nearest with ties away."""
    g = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-2**31, 2**31 - 1, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    halves = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    bf16s = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    finite_halves = halves[torch.isfinite(halves)]
    finite_bf16s = bf16s[torch.isfinite(bf16s)]
    sorted_halves, sorted_bf16s = finite_halves.double().unique(), finite_bf16s.double().unique()
    ties = torch.cat([(sorted_halves[1:] + sorted_halves[:-1]) / 2, (sorted_bf16s[1:] + sorted_bf16s[:-1]) / 2])
    ties = ties[(ties.float().double() == ties)].float()  # the midpoints fp32 can hold
    tf32_ties = torch.randint(-2**31, 2**31 - 1, (4096,), generator=g, dtype=torch.int64).to(torch.int32)
    tf32_ties = ((tf32_ties & ~0x1FFF) | 0x1000).view(torch.float32)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65519.99, 65520.0, 2**-24, 2**-25,
                             1.5 * 2**-25, 2**-14, 3.4e38, -3.4e38, 1e-45])
    values = torch.cat([random_bits.view(torch.float32), finite_halves, finite_bf16s, ties, tf32_ties,
                        torch.nextafter(ties, torch.full_like(ties, float("inf"))),
                        torch.nextafter(ties, torch.full_like(ties, -float("inf"))), specials])
    (tmp_path / "in.bin").write_bytes(values.numpy().tobytes())
    subprocess.run([check_program, "convert", str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True,
                   timeout=120)
    out = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.uint8)
    count = values.numel()
    per_value = out[:count * 8].view(count, 8)
    half_bits = per_value[:, 0:2].contiguous().view(torch.int16).flatten()
    bf16_bits = per_value[:, 2:4].contiguous().view(torch.int16).flatten()
    tf32 = per_value[:, 4:8].contiguous().view(torch.float32).flatten()
    nan = values.isnan()
    assert torch.equal(half_bits[~nan], values[~nan].half().view(torch.int16)), "fp32 -> fp16"
    assert torch.equal(bf16_bits[~nan], values[~nan].bfloat16().view(torch.int16)), "fp32 -> bf16"
    assert half_bits[nan].view(torch.float16).isnan().all() and bf16_bits[nan].view(torch.bfloat16).isnan().all()
    assert torch.equal(tf32[~nan].view(torch.int32), _tf32_reference(values[~nan]).view(torch.int32)), "tf32"
    back = out[count * 8:].view(1 << 16, 8)
    half_back = back[:, 0:4].contiguous().view(torch.float32).flatten()
    bf16_back = back[:, 4:8].contiguous().view(torch.float32).flatten()
    assert torch.equal(half_back.isnan(), halves.isnan()) and torch.equal(bf16_back.isnan(), bf16s.isnan())
    assert torch.equal(half_back[~halves.isnan()], halves[~halves.isnan()]), "fp16 -> fp32"
    assert torch.equal(bf16_back[~bf16s.isnan()], bf16s[~bf16s.isnan()]), "bf16 -> fp32"


FAILURES = {
    "divergent_sync": "__syncthreads() while a thread of the block has returned",
    "shuffle_exited": "__shfl_xor_sync with a lane that has returned from the kernel",
    "shuffle_mask": "only a full-warp mask is emulated",
    "wmma_misaligned": "load_matrix_sync: the pointer is not 256-bit aligned",
    "wmma_leading_dimension": "load_matrix_sync: ldm 20 is not a multiple of 16 bytes",
    "shared_overflow": "a kernel wrote past its dynamic shared memory",
    "shared_unmapped": None,  # a segmentation fault: the pages past the launch's shared memory are inaccessible
    "outside_kernel": "called outside a kernel",
    "async_unwaited": "a thread ended its kernel with asynchronous copies not waited for",
    "async_misaligned": "__pipeline_memcpy_async: an address not aligned to the copy's size",
}


@needs_compiler
@pytest.mark.parametrize("which", list(FAILURES))
def test_emulation_stops_misuse_check(check_program, which):
    """What is undefined or wrong on a GPU stops the emulated kernel with a message, rather than deadlocking or
    computing something."""
    result = subprocess.run([check_program, which], capture_output=True, text=True, timeout=60)
    assert result.returncode < 0 or result.returncode == 134, (result.returncode, result.stdout, result.stderr)
    if FAILURES[which] is not None:
        assert "metric_kernels host emulation: " in result.stderr and FAILURES[which] in result.stderr, result.stderr


REFUSED = {  # CUDA the kernels do not use, which must not compile on the host (rather than run as something else)
    "static shared memory": "__global__ void k(float* o) { __shared__ float tile[64]; tile[threadIdx.x] = 1; o[0] = tile[0]; }",
    "static shared memory, static": "__global__ void k(float* o) { static __shared__ float t[4]; o[0] = t[0]; }",
    "half arithmetic": "__device__ float f(__half a, __half b) { return a + b; }",
    "unsupported WMMA shape": "nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 32, 8, 16, __half, nvcuda::wmma::row_major> f;",
    "fp64 WMMA": "nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 8, 8, 4, double, nvcuda::wmma::row_major> f;",
    "other shuffles": "__device__ float f(float v) { return __shfl_down_sync(0xffffffffu, v, 1); }",
    "shuffle of a struct": "struct P { int a, b; }; __device__ P f(P v) { return __shfl_xor_sync(0xffffffffu, v, 1); }",
    "integer atomics": "__device__ void f(int* p) { atomicAdd(p, 1); }",
    "triple-chevron launch": "__global__ void k() {} void f() { k<<<1, 32>>>(); }",
    "other intrinsics": "__device__ float f(const float* p) { return __ldg(p) + __expf(1.0f); }",
    "warpSize": "__device__ int f() { return warpSize; }",
    "other runtime calls": "void f(float* p) { cudaMemset(p, 0, 4); cudaDeviceSynchronize(); }",
}


@needs_compiler
@pytest.mark.parametrize("what", list(REFUSED))
def test_emulation_refuses_cuda_outside_its_subset_check(what, tmp_path):
    source = tmp_path / "refused.cpp"
    source.write_text(textwrap.dedent(f"""
        #include "cuda/host_emulation.h"
        namespace metric_kernels::cuda_emulated {{
        {REFUSED[what]}
        }}
    """))
    result = subprocess.run(COMPILE + ["-fsyntax-only", str(source)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, f"{what} compiled on the host"


def _work(run):
    """The emulated kernels' work while `run()` runs: (dot FLOPs by operand type [16-bit, tf32, fp32, fp64], atomic
    additions, exponentials of the per-pair math)."""
    work = _counters(run)
    return work[:4], work[4], work[5]


def _counters(run):
    """Every work counter of the emulation while `run()` runs (host_emulation.h's Work order)."""
    counters = torch.ops.metric_kernels.cuda_emulated_work_counters
    counters(True)
    run()
    return counters(True).tolist()


@pytest.mark.parametrize("dim", [128, 256])
@pytest.mark.parametrize("operand", ["bf16", "fp16", "tf32", "fp32"])
def test_matmul_equivalents_of_each_pass(operand, dim):
    """The work the CUDA kernels give a GPU, counted by the emulation (every mma_sync and SIMT step): the forward
    forms each S tile once (1 matmul-equivalent, 2 N M D FLOPs); the deterministic backward holds the whole of D (up
    to 256) in a block and recomputes S once in each of its two passes (4); the default backward, up to D = 256 as
    well (two slices' dX accumulators in registers next to the dY product, the other two in shared memory),
    recomputes it once and takes dX = P Y and dY = P^T X from it (3), adding dY with one atomic per element of each
    (row block, column tile) product; every product of 16-bit rows runs on 16-bit operands, fp32 ones on tf32 only
    where allowed."""
    dtype = OPERANDS[operand]
    kind_of_dot = {"bf16": 0, "fp16": 0, "tf32": 1, "fp32": 2}[operand]
    n = m = 128
    g = torch.Generator().manual_seed(dim)
    x, y = (torch.randn(rows, dim, generator=g).to(dtype) for rows in (n, m))
    labels, y_labels = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 4, (m,), generator=g)
    ops = torch.ops.metric_kernels
    args = (x, y, labels, y_labels, -1, 1, 0, 0.0, 10.0)
    allow_tf32 = operand == "tf32"
    stats = ops.cuda_emulated_lse_rows(*args, True, True, allow_tf32)
    grad = torch.randn(4, n, generator=g)
    matmul = 2.0 * n * m * dim
    expected = {"forward": 1.0, "deterministic": 4.0, "atomic": 3.0}
    for name in expected:
        if name == "forward":
            run = lambda: ops.cuda_emulated_lse_rows(*args, True, True, allow_tf32)  # noqa: E731
        else:
            run = lambda: ops.cuda_emulated_lse_rows_backward(  # noqa: E731
                grad, stats, *args, name == "deterministic", True, True, True, allow_tf32)
        flops, atomics, _ = _work(run)
        assert flops[kind_of_dot] == sum(flops), f"{operand} {name}: products on other operand types: {flops}"
        assert flops[kind_of_dot] / matmul == expected[name], f"{operand} {name}: {flops[kind_of_dot] / matmul}"
        assert atomics == (m * dim * (n // 64) if name == "atomic" else 0), f"{operand} {name}: {atomics} atomics"


# Whether the forward kernels' resident rows (D = 256; fp64 64) fit a GPU that allows 99 KB of shared memory per block:
# bf16 / fp16 74 KB, fp32 117.75 KB, tf32 122 KB, fp64 105.5 KB.
RESIDENT_ROWS_FIT_99_KB = {"bf16": True, "fp16": True, "fp32": False, "tf32": False, "fp64": False}


def _copy_count_case(monkeypatch, operand, limited):
    """The copied-bytes tests' case: (element size, N, M, D, generator, (x, y, labels, y_labels)) at N = M = 128 and
    the whole of D on chip (256; fp64: 64); `limited`: the emulated GPU allows 99 KB of shared memory per block."""
    if limited:
        monkeypatch.setenv("METRIC_KERNELS_EMULATED_SHARED_BYTES", "101376")
    dtype = OPERANDS[operand]
    n = m = 128
    dim = 64 if operand == "fp64" else 256
    g = torch.Generator().manual_seed(dim + len(operand))
    x, y = (torch.randn(rows, dim, generator=g).to(dtype) for rows in (n, m))
    labels, y_labels = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 4, (m,), generator=g)
    return torch.empty((), dtype=dtype).element_size(), n, m, dim, g, (x, y, labels, y_labels)


@pytest.mark.parametrize("limited", [False, True], ids=["227KB", "99KB"])
@pytest.mark.parametrize("operand", ["bf16", "fp32", "tf32", "fp64"])
def test_forward_kernels_load_each_row_block_once(monkeypatch, operand, limited):
    """The bytes the forward kernels copy into shared memory (asynchronous copies, counted by the emulation) at N =
    M = 128 and the whole of D on chip (256; fp64: 64): a block loads its 64 rows once and keeps them for all its
    column tiles (X: N D elements in all), streaming the references (N / 64 times M D); the classifier forward
    likewise for X (W's columns come by plain loads). Where the rows do not fit (a GPU that allows 99 KB: fp32, tf32,
    fp64) a block loads its rows' chunks for every column tile (X: M / 64 times N D)."""
    element, n, m, dim, g, (x, y, labels, y_labels) = _copy_count_case(monkeypatch, operand, limited)
    weight = torch.randn(dim, m, generator=g).to(x.dtype)
    allow_tf32 = operand == "tf32"
    ops = torch.ops.metric_kernels
    x_loads = 1 if not limited or RESIDENT_ROWS_FIT_99_KB[operand] else m // 64
    streamed = (n // 64) * m * dim
    runs = {
        "lse_rows": (lambda: ops.cuda_emulated_lse_rows(x, y, labels, y_labels, -1, 0, 0, 0.25, 32.0, True, True,
                                                        allow_tf32), x_loads * n * dim + streamed),
        "batch_hard_select": (lambda: ops.cuda_emulated_batch_hard_select(x, y, labels, y_labels, -1, True,
                                                                          allow_tf32), x_loads * n * dim + streamed),
        "margin_softmax_rows": (lambda: ops.cuda_emulated_margin_softmax_rows(x, weight, labels, 1, 10.0, True, True,
                                                                              0.0, True, allow_tf32),
                                x_loads * n * dim),
    }
    for name, (run, elements) in runs.items():
        copied = _counters(run)[6]
        assert copied == elements * element, f"{name}: {copied} bytes copied, expected {elements * element}"


@pytest.mark.parametrize("operand, limited", [("bf16", False), ("fp32", False), ("tf32", False), ("fp64", False),
                                              ("bf16", True), ("fp32", True)])
def test_backward_passes_load_their_block_once(monkeypatch, operand, limited):
    """The bytes the backward passes copy into shared memory at N = M = 128 and the whole of D on chip (256; fp64:
    64): the dX pass keeps its 64 rows of X resident and streams Y twice per column tile (the chunks of S and the
    slices of dX = P Y), the dY pass likewise with its columns of Y (X twice per row tile); the atomic pass's dY = P^T
    X reads X's slices from the resident rows; the classifiers' dX pass keeps X too (W's columns come by plain
    loads). Where the resident block does not fit (`limited`: a GPU that allows 99 KB; fp32: 86.75 + 64.25 KB) every
    tile loads it again."""
    element, n, m, dim, g, (x, y, labels, y_labels) = _copy_count_case(monkeypatch, operand, limited)
    allow_tf32 = operand == "tf32"
    ops = torch.ops.metric_kernels
    args = (x, y, labels, y_labels, -1, 0, 0, 0.25, 32.0)
    stats = ops.cuda_emulated_lse_rows(*args, True, True, allow_tf32)
    grad = torch.randn(4, n, generator=g)
    resident = not limited or operand == "bf16"
    row_blocks, column_blocks = n // 64, m // 64
    modes = {"deterministic": (
        (n * dim + 2 * row_blocks * m * dim) + (m * dim + 2 * column_blocks * n * dim) if resident
        else 3 * row_blocks * m * dim + 3 * column_blocks * n * dim)}
    if operand != "fp64" and not limited:
        modes["atomic"] = n * dim + 2 * row_blocks * m * dim
    for mode, elements in modes.items():
        copied = _counters(lambda: ops.cuda_emulated_lse_rows_backward(
            grad, stats, *args, mode == "deterministic", True, True, True, allow_tf32))[6]
        assert copied == elements * element, f"{mode}: {copied} bytes copied, expected {elements * element}"
    weight = torch.randn(dim, m, generator=g).to(x.dtype)
    classifier = (x, weight, labels, 1, 10.0, True, True, 0.0, True)
    classifier_stats = ops.cuda_emulated_margin_softmax_rows(*classifier, allow_tf32)
    upstream = torch.randn(2, n, generator=g).to(classifier_stats.dtype)
    copied = _counters(lambda: ops.cuda_emulated_margin_softmax_rows_backward(upstream, classifier_stats, *classifier,
                                                                             True, False, allow_tf32))[6]
    elements = n * dim if resident else column_blocks * n * dim
    assert copied == elements * element, f"classifier dX pass: {copied} bytes copied, expected {elements * element}"


@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4, 5])
def test_one_exponential_per_pair_per_pass(kind):
    """The exponentials the kernels' per-pair math takes (epilogue.h, counted by the emulation), every pair being a
    positive or a negative here: the forward one per pair (Circle's, Proxy-Anchor's and Multi-Similarity's two
    log-sum-exps fold disjoint pairs; NT-Xent's first sweep takes the negatives, its second the positives) plus at
    most 8 per row where the two threads of a row merge their two log-sum-exp states; each backward pass one per pair
    (deterministic: a dX and a dY pass; default: one pass); Contrastive's hinges none."""
    n, m, dim = 70, 66, 40
    g = torch.Generator().manual_seed(kind)
    x, y = torch.randn(n, dim, generator=g), torch.randn(m, dim, generator=g)
    labels, y_labels = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (m,), generator=g)
    ops = torch.ops.metric_kernels
    a, b = (0.25, 1.5) if kind == 5 else (0.25, 8.0)
    args = (x, y, labels, y_labels, -1, kind, 0, a, b, True, True, False)  # deterministic, normalize, allow_tf32
    stats = ops.cuda_emulated_lse_rows(*args)
    grad = torch.randn(4, n, generator=g)
    pairs = n * m if kind != 5 else 0
    _, _, forward = _work(lambda: ops.cuda_emulated_lse_rows(*args))
    assert pairs <= forward <= pairs + (8 * n if kind != 5 else 0), f"forward: {forward} exponentials, {n * m} pairs"
    for deterministic, passes in ((True, 2), (False, 1)):
        _, _, backward = _work(lambda: ops.cuda_emulated_lse_rows_backward(
            grad, stats, x, y, labels, y_labels, -1, kind, 0, a, b, deterministic, True, True, True, False))
        assert backward == passes * pairs, f"deterministic={deterministic}: {backward} exponentials, {n * m} pairs"


@pytest.mark.parametrize("operand, dim", [("fp32", 300), ("bf16", 300), ("fp64", 130), ("fp16", 150), ("tf32", 256)])
def test_backward_over_several_spans_of_d(operand, dim):
    """D wider than one backward block holds (256 columns; fp64: 64): blocks along D, each recomputing S; and D past
    the two slices the atomic pass keeps in registers (its third and fourth in shared memory, one or two of them
    used); both backward paths, raw rows normalised inside, against the CPU op on the normalised float64 rows."""
    dtype = OPERANDS[operand]
    g = torch.Generator().manual_seed(dim + len(operand))
    x = (torch.randn(70, dim, generator=g, dtype=torch.float64) * 2).to(dtype)
    y = (torch.randn(66, dim, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels, y_labels = torch.randint(0, 3, (70,), generator=g), torch.randint(0, 3, (66,), generator=g)
    raw = [t.double().requires_grad_() for t in (x, y)]
    unit = [torch.nn.functional.normalize(t, dim=1) for t in raw]
    ops = torch.ops.metric_kernels
    exact_args = (unit[0].detach(), unit[1].detach(), labels, y_labels, -1, 0, 0, 0.25, 32.0)
    expected = ops.cpu_lse_rows(*exact_args, True)
    grad = torch.randn(4, 70, generator=g, dtype=torch.float64)
    expected_grads = torch.autograd.grad(unit, raw, ops.cpu_lse_rows_backward(grad, expected, *exact_args, True, True,
                                                                               True))
    allow_tf32 = operand == "tf32"
    stats = ops.cuda_emulated_lse_rows(x, y, labels, y_labels, -1, 0, 0, 0.25, 32.0, True, True, allow_tf32)
    value_tol, grad_tol = OPERAND_TOLERANCE[operand]
    assert_rel_close(stats[:2], expected[:2], value_tol, f"{operand} D={dim} stats")
    for deterministic in (True, False):
        got = ops.cuda_emulated_lse_rows_backward(grad.to(stats.dtype), stats, x, y, labels, y_labels, -1, 0, 0, 0.25,
                                                  32.0, deterministic, True, True, True, allow_tf32)
        for index, (a, b) in enumerate(zip(got, expected_grads)):
            assert_rel_close(a, b, grad_tol, f"{operand} D={dim} deterministic={deterministic} grad {index}")


def test_cost_report_of_the_cuda_kernels(tmp_path):
    """`metric-kernels cost --backend cuda-emulated`: the CUDA kernels' work per step through the public API, from
    the emulation's counters: Circle with a separate reference batch, forward 1 matmul-equivalent, backward 3 (atomic:
    dY added once per element of each row block's product) or 4 (deterministic), all on 16-bit operands for bf16
    rows, one exponential per pair per pass (plus the forward's partner merges); batch-hard's host N x D tensors;
    the table and JSON written."""
    from metric_kernels.bench import cost, cuda_cost
    n, dim = 128, 64
    figures = {}
    for mode in ("default", "deterministic"):
        case = cost.Case("circle", "ref_emb", "bf16", dim, mode, n)
        figures[mode] = cuda_cost.row(case, cuda_cost.count_step(case))
    for mode, passes in (("default", 1), ("deterministic", 2)):
        row = figures[mode]
        assert row["forward_matmul_equivalents"] == 1.0 and row["dot_16bit_share"] == 1.0, row
        assert row["matmul_equivalents"] == 1.0 + (3.0 if passes == 1 else 4.0), row
        assert 1 + passes <= row["exponentials_per_pair"] <= 1 + passes + 8 / n, row
        assert row["atomic_elements"] == (n * dim * (n // 64) if passes == 1 else 0), row
    # batch-hard's chosen distances come from triplet.cu: the step allocates only the gradients of N x D (dX and
    # dY, or the one dX when the references are the queries), no normalised or upcast copy
    for refs, gradients in (("ref_emb", 2), ("self", 1)):
        host = cuda_cost.count_step(cost.Case("batch_hard", refs, "bf16", dim, "default", n))["host_tensors"]
        assert len(host) == gradients and all(r["dtype"] == "bfloat16" for r in host), host
    out = tmp_path / "cost-cuda"
    result = subprocess.run([sys.executable, "-m", "metric_kernels", "cost", "--backend", "cuda-emulated", "--dims",
                             str(dim), "--dtypes", "fp32", "--losses", "supcon", "--size", "64", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (out / "cost.md").read_text()
    assert "| supcon | ref_emb | fp32 | 64 | default |" in table and "| supcon | self | fp32 | 64 |" in table, table
    report = json.loads((out / "cost.json").read_text())
    assert report["columns"] == cuda_cost.COLUMNS and len(report["rows"]) == 4
