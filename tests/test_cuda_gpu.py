"""backend="cuda" (csrc/cuda) on a CUDA GPU, option by option (skipped elsewhere, with the reason; bench/gpu_run.sh
runs it with METRIC_KERNELS_REQUIRE_CUDA_BACKEND=1, which turns a missing CUDA build into a failure). The precision,
large-N, bitwise-determinism and memory checks it shares with Triton are in tests/test_fused_gpu.py.

- every loss through the public API against the float64 reference: refs / ref_emb / self_offset, ragged sizes, every
  reduction, degenerate labels, fp64 and fp32 (SPEC tolerances), fp16 / bf16 inputs;
- the ops on every operand type the kernels have, the tensor-core ones included (bf16, fp16, tf32: the loss API hands
  fused backends fp32 rows, so only the ops reach bf16 and fp16 tiles), against the CPU op on the same rounded values;
- the atomic and deterministic backward agree; opcheck and torch.compile(fullgraph=True) on the ops.
"""
import os
import subprocess
import sys

import pytest
import torch

import metric_kernels as mk
from tests.helpers import assert_rel_close, grads, tf32_rounded
from tests.test_cuda_emulated import check_triplet_distance_ops
from tests.test_fused import PAIR_LOSSES, PARAMS, SIZES, _compare, _pair_inputs

REASON = mk.available_backends("cuda")["cuda"] if torch.cuda.is_available() else "needs a CUDA GPU (none here)"
if REASON is not None and torch.cuda.is_available() and os.environ.get("METRIC_KERNELS_REQUIRE_CUDA_BACKEND") == "1":
    raise RuntimeError(f"backend 'cuda' is required here but unusable: {REASON}")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=str(REASON))]


# Losses that run another loss's CUDA kernels with other weights (Multi-Similarity's for the lifted structure and
# NCA, Contrastive's for the margin loss, NT-Xent's with its angular margin for the tuplet margin loss): a few cases
# each (test_losses_on_shared_kernels), not the whole matrix, since a GPU run has minutes for every test.
SHARED_KERNEL_LOSSES = ("generalized_lifted_structure", "nca", "margin", "tuplet_margin")
GPU_PAIR_LOSSES = [loss for loss in PAIR_LOSSES if loss not in SHARED_KERNEL_LOSSES]


def _on_cuda(leaves, labels, y_labels, offset, _):
    return [t.cuda() for t in leaves], labels.cuda(), None if y_labels is None else y_labels.cuda(), offset


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("refs", ["self", "ref_emb", "self_offset"])
@pytest.mark.parametrize("size", SIZES + [(300, 200, 200)], ids=[f"{n}x{m}x{d}" for n, m, d in SIZES + [(300, 200, 200)]])
@pytest.mark.parametrize("loss", GPU_PAIR_LOSSES)
def test_pair_losses_match_reference(loss, size, refs, dtype):
    n, m, dim = size
    leaves, labels, y_labels, offset = _on_cuda(*_pair_inputs(11, n, m, dim, 5, refs, None))
    _compare("cuda", loss, leaves, labels, y_labels, offset, dtype)


@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean", "sum", "none"])
@pytest.mark.parametrize("loss", GPU_PAIR_LOSSES)
def test_every_reduction(loss, reduction):
    leaves, labels, y_labels, offset = _on_cuda(*_pair_inputs(5, 70, 90, 24, 4, "self_offset", None))
    _compare("cuda", loss, leaves, labels, y_labels, offset, torch.float32, reduction)


@pytest.mark.parametrize("labels", ["one_class", "all_distinct", "single_row"])
@pytest.mark.parametrize("loss", GPU_PAIR_LOSSES)
def test_degenerate_labels(loss, labels):
    n = 1 if labels == "single_row" else 80
    classes = 1 if labels == "one_class" else (None if labels == "all_distinct" else 3)
    leaves, labels_, y_labels, offset = _on_cuda(*_pair_inputs(6, n, 50, 16, classes, "self", None))
    _compare("cuda", loss, leaves, labels_, y_labels, offset, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", SHARED_KERNEL_LOSSES)
def test_losses_on_shared_kernels(loss, dtype):
    leaves, labels, y_labels, offset = _on_cuda(*_pair_inputs(12, 130, 150, 64, 5, "self_offset", None))
    _compare("cuda", loss, leaves, labels, y_labels, offset, dtype)


@pytest.mark.parametrize("smooth_loss", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("refs", ["self", "ref_emb", "self_offset"])
def test_triplet_margin_matches_reference(refs, dtype, smooth_loss):
    """The triplet margin loss's own forward kernel (tests/test_triplet_margin.py runs it emulated)."""
    leaves, labels, y_labels, offset = _on_cuda(*_pair_inputs(13, 130, 150, 64, 5, refs, None))
    _compare("cuda", "triplet_margin", leaves, labels, y_labels, offset, dtype, smooth_loss=smooth_loss)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (100, 7, 33), (150, 70, 130)])
def test_proxy_anchor_matches_reference(shape, dtype):
    n, classes, dim = shape
    g = torch.Generator().manual_seed(8)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64).cuda()
    proxies = torch.randn(classes, dim, generator=g, dtype=torch.float64).cuda()
    labels = torch.randint(0, classes, (n,), generator=g).cuda()
    _compare("cuda", "proxy_anchor", [x, proxies], labels, None, None, dtype)


OPERANDS = {"fp64": torch.float64, "fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
            "fp16": torch.float16}


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("operand", list(OPERANDS))
@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("refs", ["ref_emb", "self"])
def test_ops_on_every_operand_type(refs, kind, operand, deterministic):
    """Statistics and (dX, dY) of the cuda ops on rows of each operand type, against the CPU op in float64 on the same
    rounded values. Products of fp16/bf16 values are exact in fp32, so the statistics keep fp32 accuracy; dS is
    rounded to the operand type for the dX/dY products (as in FlashAttention), which bounds the gradients' error at a
    few units of that type's rounding. tf32 rounds the rows themselves (10-bit mantissas)."""
    dtype = OPERANDS[operand]
    g = torch.Generator().manual_seed(kind * 7 + len(operand))
    n, m, dim = 150, 97, 72
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1).to(dtype)
    y = None if refs == "self" else torch.nn.functional.normalize(
        torch.randn(m, dim, generator=g, dtype=torch.float64), dim=1).to(dtype)
    labels = torch.randint(0, 6, (n,), generator=g)
    y_labels = labels if y is None else torch.randint(0, 6, (m,), generator=g)
    offset = 0 if refs == "self" else -1
    a, b = {1: (0.0, 10.0), 3: (2.0, 40.0), 4: (0.0, 10.0), 5: (0.3, 0.1)}.get(kind, (0.25, 32.0))
    # tf32 rounds the rows inside the products: the exact op runs on the rounded rows, so that a pair near
    # Contrastive's margins falls on the same side in both (its counts are statistics too)
    exact = tf32_rounded if operand == "tf32" else (lambda t: t.double())
    exact_args = (exact(x), None if y is None else exact(y), labels, y_labels, offset, kind, 0, a, b, True)
    expected = torch.ops.metric_kernels.cpu_lse_rows(*exact_args)
    grad = torch.randn(4, n, generator=g, dtype=torch.float64)
    expected_dx, expected_dy = torch.ops.metric_kernels.cpu_lse_rows_backward(grad, expected, *exact_args[:-1], True,
                                                                              True, y is not None)
    allow_tf32 = operand == "tf32"  # the ops' own argument (torch's setting reaches them through the backend)
    cuda_args = (x.cuda(), None if y is None else y.cuda(), labels.cuda(), y_labels.cuda(), offset, kind, 0, a, b,
                 deterministic)
    stats = torch.ops.metric_kernels.cuda_lse_rows(*cuda_args, False, allow_tf32)  # unit rows, not normalised again
    dx, dy = torch.ops.metric_kernels.cuda_lse_rows_backward(grad.to(stats.dtype).cuda(), stats, *cuda_args[:-1],
                                                             deterministic, True, y is not None, False, allow_tf32)
    value_tol, grad_tol = {"fp64": (1e-10, 1e-10), "fp32": (1e-5, 1e-4), "tf32": (2e-2, 5e-2),
                           "bf16": (1e-4, 3e-2), "fp16": (1e-4, 5e-3)}[operand]
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(stats.cpu()), finite), "empty rows (-inf) differ"
    assert_rel_close(stats.cpu()[finite], expected[finite], value_tol, f"{operand} kind={kind} stats")
    assert dx.dtype == dtype
    assert_rel_close(dx.cpu(), expected_dx, grad_tol, f"{operand} kind={kind} dX")
    if y is not None:
        assert_rel_close(dy.cpu(), expected_dy, grad_tol, f"{operand} kind={kind} dY")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("refs", ["ref_emb", "self"])
@pytest.mark.parametrize("operand", ["fp64", "fp32", "bf16", "fp16"])
def test_triplet_distance_ops_on_every_operand_type(operand, refs, normalize):
    """csrc/cuda/triplet.cu on the GPU, through the emulated test's checks (tests/test_cuda_emulated.py)."""
    check_triplet_distance_ops("cuda", "cuda", operand, refs, normalize)


@pytest.mark.parametrize("dim", [256, 300, 600])
@pytest.mark.parametrize("refs", ["ref_emb", "self"])
def test_triplet_distance_ops_over_several_chunks_of_d(refs, dim):
    """The backward's chunks of D on the GPU (tests/test_cuda_emulated.py)."""
    check_triplet_distance_ops("cuda", "cuda", "bf16", refs, True, dim)


@pytest.mark.parametrize("operand", list(OPERANDS))
def test_batch_hard_selection_on_every_operand_type(operand):
    """The chosen pairs are the hardest ones: their exact distance equals the exact optimum (ties and near-ties may
    pick another index at the same distance)."""
    dtype = OPERANDS[operand]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(130, 40, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(170, 40, generator=g, dtype=torch.float64).to(dtype)
    labels, y_labels = torch.randint(0, 5, (130,), generator=g), torch.randint(0, 5, (170,), generator=g)
    choices = torch.ops.metric_kernels.cuda_batch_hard_select(x.cuda(), y.cuda(), labels.cuda(), y_labels.cuda(), 3,
                                                              normalize=False, allow_tf32=operand == "tf32").cpu()
    expected = torch.ops.metric_kernels.cpu_batch_hard_select(x.double(), y.double(), labels, y_labels, 3)
    assert choices.shape[0] == (4 if operand == "tf32" else 2)  # tf32: the runners-up too (tests/test_tf32.py)
    choices = choices[:2]
    assert torch.equal(choices < 0, expected < 0)
    distances = torch.cdist(x.double(), y.double())
    rows = torch.arange(130)
    tol = {"fp64": 1e-12, "fp32": 1e-5}.get(operand, 1e-2)
    for side in (0, 1):
        have = expected[side] >= 0
        ours = distances[rows[have], choices[side][have]]
        best = distances[rows[have], expected[side][have]]
        assert_rel_close(ours, best, tol, f"{operand} side {side}")


@pytest.mark.parametrize("loss", ["circle", "supcon", "proxy_anchor", "circle_self", "supcon_self"])
def test_deterministic_and_atomic_backward_agree(loss):
    refs = "self" if loss.endswith("_self") else "ref_emb"
    loss = loss.replace("_self", "")
    leaves, labels, y_labels, offset = _on_cuda(*_pair_inputs(9, 300, 260, 48, 4, refs, None))
    if loss == "proxy_anchor":
        leaves = [leaves[0], leaves[1][:4]]
    results = []
    for deterministic in (True, False):
        inputs = [t.detach().float().requires_grad_() for t in leaves]
        if loss == "proxy_anchor":
            value = mk.proxy_anchor_loss(inputs[0], labels, inputs[1], backend="cuda", deterministic=deterministic)
        else:
            ref = (inputs[1], y_labels) if len(inputs) > 1 else (None, None)
            value = getattr(mk, f"{loss}_loss")(inputs[0], labels, *ref, backend="cuda", deterministic=deterministic,
                                                **PARAMS[loss])
        results.append((value, grads(value, inputs)))
    (v1, g1), (v2, g2) = results
    assert torch.equal(v1, v2)
    for a, b in zip(g1, g2):
        assert_rel_close(a, b, 1e-5, f"{loss} atomic vs deterministic")


def _op_samples():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 6, generator=g), torch.randn(30, 6, generator=g)
    labels, y_labels = torch.randint(0, 3, (20,), generator=g), torch.randint(0, 3, (30,), generator=g)
    return x.cuda().requires_grad_(), y.cuda().requires_grad_(), labels.cuda(), y_labels.cuda()


@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4, 5])
def test_opcheck(kind):
    ops = torch.ops.metric_kernels
    x, y, labels, y_labels = _op_samples()
    for offset, deterministic in ((-1, True), (3, False)):
        torch.library.opcheck(ops.cuda_lse_rows, (x, y, labels, y_labels, offset, kind, 0, 0.25, 8.0, deterministic))
    torch.library.opcheck(ops.cuda_lse_rows, (x, None, labels, labels, 0, kind, 0, 0.25, 8.0, True))
    stats = ops.cuda_lse_rows(x, y, labels, y_labels, -1, kind, 0, 0.25, 8.0, True).detach()
    for need_dx, need_dy, deterministic in ((True, True, True), (True, False, False), (False, True, False)):
        torch.library.opcheck(ops.cuda_lse_rows_backward, (torch.randn_like(stats), stats, x.detach(), y.detach(),
                                                           labels, y_labels, -1, kind, 0, 0.25, 8.0, deterministic,
                                                           need_dx, need_dy))
    torch.library.opcheck(ops.cuda_batch_hard_select, (x.detach(), y.detach(), labels, y_labels, 2))


@pytest.mark.parametrize("loss", GPU_PAIR_LOSSES + ["proxy_anchor"])
def test_torch_compile_fullgraph(loss):
    x, y, labels, y_labels = _op_samples()
    proxies = torch.randn(3, 6, device="cuda", requires_grad=True)

    def step(x, y, proxies):
        if loss == "proxy_anchor":
            return mk.proxy_anchor_loss(x, labels, proxies, backend="cuda") + 0 * y.sum()
        return getattr(mk, f"{loss}_loss")(x, labels, y, y_labels, backend="cuda") + 0 * proxies.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    got, want = compiled(x, y, proxies), step(x, y, proxies)
    assert_rel_close(got, want, 1e-5, f"compiled {loss}")
    for a, b in zip(grads(got, [x, y, proxies]), grads(want, [x, y, proxies])):
        assert_rel_close(a, b, 1e-4, f"compiled {loss} grad")


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("empty", ["queries", "references"])
def test_backward_op_without_pairs_gives_zero_gradients(empty, deterministic):
    """N = 0 or M = 0 (D > 0): zeros of the full shapes, not the uninitialised buffers no kernel wrote."""
    ops = torch.ops.metric_kernels
    del_me = torch.full((1 << 20,), float("nan"), device="cuda")  # NaNs in the allocator's free blocks
    del del_me
    g = torch.Generator().manual_seed(5)
    n, m = (0, 9) if empty == "queries" else (7, 0)
    x, y = torch.randn(n, 5, generator=g).cuda(), torch.randn(m, 5, generator=g).cuda()
    labels, y_labels = torch.randint(0, 3, (n,), generator=g).cuda(), torch.randint(0, 3, (m,), generator=g).cuda()
    stats = ops.cuda_lse_rows(x, y, labels, y_labels, -1, 0, 0, 0.25, 8.0, True)
    dx, dy = ops.cuda_lse_rows_backward(torch.randn(4, n, generator=g).cuda(), stats, x, y, labels, y_labels, -1, 0,
                                        0, 0.25, 8.0, deterministic, True, True)
    assert torch.equal(dx.cpu(), torch.zeros(n, 5)) and torch.equal(dy.cpu(), torch.zeros(m, 5))


def test_malformed_op_calls_raise():
    """Each malformed direct call of a cuda op raises a RuntimeError that says what is wrong, in a process of its own
    (tests/gpu_probe_op_errors.py): the H200 run of 2026-11-28 crashed on a wrongly shaped grad."""
    probe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_probe_op_errors.py")
    done = subprocess.run([sys.executable, probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
