"""The losses under tf32 products (torch.set_float32_matmul_precision("high")), on the backends whose kernels multiply
in tf32: triton (its interpreter's tf32 dots rounded as tensor cores round, by the test shim) and the CUDA kernels
through their host emulation; the batch-hard checks on a GPU too.

Every loss lies within tf32's error of the float64 reference, values and gradients, both backward paths, and differs
from the IEEE fp32 result (tf32 was used). Batch-hard: tf32 keeps 10 mantissa bits, so two candidates whose
distances differ by less than its error can swap in the kernels' ranking. The selection ops then hand each side's
runner-up too (rows 2 and 3 of their answer), and the loss chooses between the two on the distances the
chosen-distance kernels compute from the rows (direct differences in fp32): the tests build near-ties that tf32 does
swap, and hold the loss and its gradients to the float64 reference at fp32's tolerances; and they check the
runners-up themselves on rows whose tf32 products are exact.
"""
import contextlib
import os
import subprocess
import sys

import pytest
import torch

import metric_kernels as mk
from tests.helpers import assert_rel_close, grads
from tests.test_fused import PAIR_LOSSES, PARAMS

_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")]
CASES = [pytest.param(("triton", "cpu"), id="triton"), pytest.param(("cuda-emulated", "cpu"), id="cuda-emulated"),
         pytest.param(("triton", "cuda"), id="triton-gpu", marks=_GPU),
         pytest.param(("cuda", "cuda"), id="cuda-gpu", marks=_GPU)]


@pytest.fixture(params=CASES)
def case(request):
    """(backend, device): the interpreted and emulated kernels on the CPU (CI builds both: missing is a failure),
    and the same checks on a GPU."""
    backend, device = request.param
    if device == "cuda" and backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton's interpreter is on: run the GPU tests with TRITON_INTERPRET=0")
    reason = mk.available_backends(device)[backend]
    if reason is not None:
        pytest.fail(f"backend {backend!r} is not usable on {device}: {reason}")
    return backend, device


@contextlib.contextmanager
def _tf32():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _select_op(backend):
    return getattr(torch.ops.metric_kernels, f"{backend.replace('-', '_')}_batch_hard_select")


def _select(case, x, y, labels, y_labels, self_offset, normalize):
    """The backend's selection op as the loss calls it under tf32, on the case's device; the choices on the CPU."""
    backend, device = case
    on = [t.to(device) for t in (x, y, labels, y_labels)]
    tf32 = () if backend == "triton" else (True,)
    return _select_op(backend)(*on, self_offset, normalize, *tf32).cpu()


@pytest.mark.parametrize("backend", ["triton", "cuda-emulated"])
@pytest.mark.parametrize("loss", PAIR_LOSSES + ["proxy_anchor"])
def test_losses_in_tf32(loss, backend):
    """fp32 losses under torch's "high" matmul precision: the kernels multiply in tf32 (as on a GPU), within tf32's
    error of the float64 reference, both backward paths."""
    if mk.available_backends("cpu")[backend] is not None:
        pytest.fail(f"backend {backend!r} is not usable here: {mk.available_backends('cpu')[backend]}")
    g = torch.Generator().manual_seed(6)
    x64, y64 = torch.randn(90, 48, generator=g, dtype=torch.float64), torch.randn(75, 48, generator=g, dtype=torch.float64)
    labels, y_labels = torch.randint(0, 5, (90,), generator=g), torch.randint(0, 5, (75,), generator=g)

    def run(backend, dtype, deterministic=True):
        x, y = x64.to(dtype).requires_grad_(), y64.to(dtype).requires_grad_()
        if loss == "proxy_anchor":
            value = mk.proxy_anchor_loss(x, labels, y[:5], backend=backend, deterministic=deterministic)
        else:
            value = getattr(mk, f"{loss}_loss")(x, labels, y, y_labels, self_offset=None, backend=backend,
                                                 deterministic=deterministic, **PARAMS[loss])
        return value, grads(value, [x, y])

    expected, expected_grads = run("reference", torch.float64)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        for deterministic in (True, False):
            value, our_grads = run(backend, torch.float32, deterministic)
            floor = 1e-3 * expected.abs().item()
            assert_rel_close(value, expected, 2e-2, f"tf32 {loss} value")
            for index, (a, b) in enumerate(zip(our_grads, expected_grads)):
                assert_rel_close(a, b, 5e-2, f"tf32 {loss} grad {index}", scale_floor=floor)
        plain, _ = run(backend, torch.float32)
    finally:
        torch.set_float32_matmul_precision(before)
    highest, _ = run(backend, torch.float32)
    if loss != "batch_hard_triplet":  # the chosen triplets' distances are recomputed exactly in Python
        assert not torch.equal(plain, highest), "tf32 and IEEE fp32 gave the same bits: tf32 was not used"


def _orthogonal_unit(rows, generator):
    """A random unit direction orthogonal to each (unit) row."""
    direction = torch.randn(rows.shape, generator=generator, dtype=torch.float64)
    direction -= (direction * rows).sum(dim=1, keepdim=True) * rows
    return torch.nn.functional.normalize(direction, dim=1)


def _near_ties(generator, queries=48, dim=64, gap=1e-5):
    """Queries of distinct labels, each with two positives at distances r and r (1 + gap) in random order (the only
    positives: one is the farthest) and two negatives of their own labels at distances r' and r' (1 + gap) (much
    nearer than any other reference), so both of batch-hard's choices are near-ties tf32 can swap."""
    x = torch.nn.functional.normalize(torch.randn(queries, dim, generator=generator, dtype=torch.float64), dim=1)
    references, reference_labels = [], []
    for side, radius in ((0, 1.0), (1, 0.3)):
        stretch = 1 + gap * torch.rand(queries, 2, generator=generator, dtype=torch.float64).argsort(dim=1)
        for k in range(2):
            references.append(x + radius * stretch[:, k:k + 1] * _orthogonal_unit(x, generator))
            labels = torch.arange(queries) if side == 0 else queries * (1 + 2 * torch.arange(queries) + k)
            reference_labels.append(labels)
    return x.float(), torch.arange(queries), torch.cat(references).float(), torch.cat(reference_labels)


@pytest.mark.parametrize("normalize", [True, False])
def test_near_ties_are_chosen_on_exact_distances(case, normalize):
    """tf32 ranks the near-tied candidates wrongly for some queries (checked: the test would pass without the
    runners-up otherwise); the loss still picks the exact hardest pairs: its value and gradients equal the float64
    reference's at fp32's tolerances (a swapped choice sends a row's gradient to another reference)."""
    backend, device = case
    g = torch.Generator().manual_seed(21 + normalize)
    x, labels, y, y_labels = _near_ties(g)
    with _tf32():
        choices = _select(case, x, y, labels, y_labels, -1, normalize)
    assert choices.shape == (4, x.shape[0])
    unit = (lambda t: torch.nn.functional.normalize(t.double(), dim=1)) if normalize else (lambda t: t.double())
    distances = torch.cdist(unit(x), unit(y))
    positive = labels[:, None] == y_labels[None, :]
    exact_far = torch.where(positive, distances, -1.0).argmax(dim=1)
    exact_near = torch.where(positive, torch.inf, distances).argmin(dim=1)
    swapped = int((choices[0] != exact_far).sum() + (choices[1] != exact_near).sum())
    assert swapped > 0, "tf32 swapped none of the near-ties: the case does not test the runners-up"
    assert torch.equal(torch.stack([choices[0], choices[2]]).sort(dim=0).values,
                       torch.stack([exact_far, torch.where(positive, distances, -1.0).topk(2, dim=1).indices[:, 1]]
                                   ).sort(dim=0).values)

    def run(backend_name, dtype, on="cpu"):
        rows, references = x.to(on, dtype).requires_grad_(), y.to(on, dtype).requires_grad_()
        value = mk.batch_hard_triplet_loss(rows, labels.to(on), references, y_labels.to(on), margin=0.2,
                                           backend=backend_name, normalize_embeddings=normalize)
        return value.cpu(), [grad.cpu() for grad in grads(value, [rows, references])]

    expected, expected_grads = run("reference", torch.float64)
    with _tf32():
        value, ours = run(backend, torch.float32, device)
    assert_rel_close(value, expected, 1e-5, f"{backend} tf32 value")
    for what, a, b in zip(("dX", "dY"), ours, expected_grads):
        assert_rel_close(a, b, 1e-4, f"{backend} tf32 {what} ({swapped} near-ties swapped by tf32)")


def _exact_best_two(squared, candidates, farthest):
    """Per row the best two columns of `squared` among `candidates` (farthest: largest), ties to the lower index,
    -1 where fewer exist."""
    none = -torch.inf if farthest else torch.inf
    keyed = torch.where(candidates, squared, none)
    order = torch.sort(keyed, dim=1, descending=farthest, stable=True).indices[:, :2]
    return torch.where(keyed.gather(1, order) == none, -1, order).T


def _signs_with_square_norms(count, dim, generator):
    """Rows of 0 and +-1 with 4, 9, 16, 25 or 36 non-zero entries: tf32 holds them exactly, their products are
    exact in fp32, and so is their squared length as the kernels form it, (||row||)^2 with ||row|| = 2 ... 6."""
    ones = torch.tensor([4, 9, 16, 25, 36])[torch.randint(0, 5, (count,), generator=generator)]
    placed = torch.rand(count, dim, generator=generator).argsort(dim=1) < ones[:, None]
    signs = torch.randint(0, 2, (count, dim), generator=generator) * 2 - 1
    return (placed * signs).float()


@pytest.mark.parametrize("refs", ["ref_emb", "self"])
def test_runners_up_on_rows_whose_tf32_products_are_exact(case, refs):
    """On rows whose distances the kernels compute exactly in tf32 (_signs_with_square_norms), the selection must
    give the exact best two per side, ties (many, here) to the lower index: over reference splits and tiles (triton)
    and thread pairs (cuda), a row without a positive, and queries as references."""
    g = torch.Generator().manual_seed(5)
    n, m, dim = 70, 300, 40
    x = _signs_with_square_norms(n, dim, g)
    labels = torch.randint(0, 4, (n,), generator=g)
    if refs == "self":
        y, y_labels, offset = x, labels, 0
    else:
        y, y_labels, offset = _signs_with_square_norms(m, dim, g), torch.randint(0, 4, (m,), generator=g), -1
    labels[0] = 9 if refs == "ref_emb" else labels[0]  # no positive for query 0 against separate references
    with _tf32():
        choices = _select(case, x, y, labels, y_labels, offset, False)
    squared = torch.cdist(x.double(), y.double()) ** 2
    same = labels[:, None] == y_labels[None, :]
    own = torch.zeros_like(same)
    if offset >= 0:
        own[torch.arange(n), torch.arange(n) + offset] = True
    far = _exact_best_two(squared.round(), same & ~own, farthest=True)
    near = _exact_best_two(squared.round(), ~same & ~own, farthest=False)
    assert torch.equal(choices, torch.stack([far[0], near[0], far[1], near[1]]))


def test_selection_answers_two_rows_unless_the_products_are_tf32(case):
    """IEEE fp32, fp64 and 16-bit rows get [2, N] (their products rank as exactly as the distances the loss
    recomputes); fp32 under tf32 gets [4, N]; the ops' fake implementations agree (opcheck)."""
    backend, device = case
    g = torch.Generator().manual_seed(2)
    x, labels = torch.randn(40, 24, generator=g).to(device), torch.randint(0, 3, (40,), generator=g).to(device)
    for dtype, tf32, rows in ((torch.float32, False, 2), (torch.float32, True, 4), (torch.float64, True, 2),
                              (torch.bfloat16, True, 2)):
        with _tf32() if tf32 else contextlib.nullcontext():
            rows_x = x.to(dtype)
            args = (rows_x, rows_x, labels, labels, 0, True) + (() if backend == "triton" else (tf32,))
            assert _select_op(backend)(*args).shape == (rows, 40), (dtype, tf32)
            torch.library.opcheck(_select_op(backend), args)


def test_the_swap_count_script_runs():
    """scripts/count_tf32_swaps.py (docs/backends.md quotes it; bench/gpu_run.sh runs it on a GPU), one seed on the
    emulated CUDA kernels: it reports its counts, and the loss's choices miss none."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                          "count_tf32_swaps.py")
    result = subprocess.run([sys.executable, script, "cuda-emulated", "1"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "after the choice on exact distances: 0 of 2000" in result.stdout, result.stdout
