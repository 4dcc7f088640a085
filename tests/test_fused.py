"""The fused backends against the float64 reference: "triton" on the CPU under Triton's interpreter
(tests/conftest.py), "cpu", the native kernels of metric_kernels._C, and "cuda-emulated", the CUDA kernels of
csrc/cuda run on the CPU by the host emulation (csrc/cuda/host_emulation.h; tests/test_cuda_emulated.py adds the
operand types only the ops reach: bf16, fp16, tf32).

Every loss, forward and backward (embeddings, ref_emb, proxies), with and without ref_emb and self_offset, every
reduction, ragged sizes that are not multiples of the blocks, one class / all-distinct labels / N = 1, fp32 at SPEC
tolerances, fp16 and bf16 inputs against the reference run in the same precision; the deterministic and atomic
backward paths; float64 gradcheck; torch.compile(fullgraph=True) and torch.library.opcheck on the ops.
"""
import pytest
import torch

import metric_kernels as mk
from tests.helpers import assert_rel_close, grads

BACKENDS = ["triton", "cpu", "cuda-emulated"]
FUSED = [name for name in BACKENDS if mk.available_backends("cpu")[name] is None]
MISSING = {name: reason for name, reason in mk.available_backends("cpu").items() if name in BACKENDS and reason}
backend_param = pytest.mark.parametrize("backend", BACKENDS)


@pytest.fixture(autouse=True)
def _fused_backend_is_built(request):
    """A fused backend missing from the test machine is a failure, not a skip: CI builds both. The GPU tests (marked
    gpu) check their backends on the CUDA device instead: on a GPU machine TRITON_INTERPRET=0, so "triton" does not
    run on CPU tensors there."""
    backend = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    if backend in MISSING and request.node.get_closest_marker("gpu") is None:
        pytest.fail(f"backend {backend!r} is not usable here: {MISSING[backend]}")

# Tolerances against the float64 reference: (value, gradients), relative (SPEC / the developers' guide).
TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}
HALF = (torch.float16, torch.bfloat16)
SIZES = [(1, 1, 1), (37, 65, 17), (65, 130, 100), (130, 63, 3)]  # (N, M, D): ragged against 64-wide blocks
PAIR_LOSSES = ["circle", "supcon", "multi_similarity", "ntxent", "tuplet_margin", "contrastive",
               "generalized_lifted_structure", "margin", "nca", "batch_hard_triplet"]
PARAMS = {"circle": dict(m=0.25, gamma=128.0), "supcon": dict(temperature=0.07, base_temperature=0.1),
          "nca": dict(softmax_scale=6.0), "proxy_nca": dict(softmax_scale=9.0),
          "generalized_lifted_structure": dict(neg_margin=1.2, pos_margin=0.2), "margin": dict(margin=0.25, beta=1.1),
          "multi_similarity": dict(alpha=2.0, beta=40.0, base=0.4), "ntxent": dict(temperature=0.1),
          "tuplet_margin": dict(margin=8.0, scale=20.0), "contrastive": dict(pos_margin=0.3, neg_margin=1.3),
          "batch_hard_triplet": dict(margin=0.3, soft=True), "proxy_anchor": dict(margin=0.1, alpha=32.0),
          "triplet_margin": dict(margin=0.3),  # tests/test_triplet_margin.py: smooth_loss and distances as options
          "angular": dict(alpha=45.0), "lifted_structure": dict(neg_margin=1.1, pos_margin=0.2)}


def _pair_inputs(seed, n, m, dim, classes, refs, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g) if classes else torch.arange(n)
    if refs == "self":
        return [x], labels, None, None, None
    m = m + n if refs == "self_offset" else m
    y = torch.randn(m, dim, generator=g, dtype=torch.float64)
    y_labels = torch.randint(0, classes, (m,), generator=g) if classes else torch.arange(m) + n
    offset = None
    if refs == "self_offset":
        offset = m - n - 1 if m - n > 1 else 0
        y[offset:offset + n], y_labels[offset:offset + n] = x, labels
    return [x, y], labels, y_labels, offset, None


def _run(loss, leaves, labels, y_labels, offset, backend, reduction="mean_nonzero", **options):
    if loss in ("proxy_anchor", "proxy_nca"):
        if loss == "proxy_nca":
            options = dict(options, reduction=reduction)
        return getattr(mk, f"{loss}_loss")(leaves[0], labels, leaves[1], backend=backend, **PARAMS[loss], **options)
    ref = (leaves[1], y_labels) if len(leaves) > 1 else (None, None)
    return getattr(mk, f"{loss}_loss")(leaves[0], labels, *ref, self_offset=offset, reduction=reduction,
                                       backend=backend, **PARAMS[loss], **options)


def _compare(backend, loss, leaves64, labels, y_labels, offset, dtype, reduction="mean_nonzero", **options):
    """Runs `backend` on `dtype` copies and the reference on float64 copies of the same (rounded) inputs; checks values
    and gradients. Half precision: no worse than the eager reference run on the same half inputs, plus 1e-2.
    options: more keywords of the loss (a distance)."""
    def run(backend, cast):
        leaves = [cast(t.detach()).requires_grad_() for t in leaves64]
        value = _run(loss, leaves, labels, y_labels, offset, backend, reduction, **options)
        return value, grads(value, leaves)

    ours, our_grads = run(backend, lambda t: t.to(dtype))
    expected, expected_grads = run("reference", lambda t: t.to(dtype).double())
    what = f"{backend} {loss} {dtype} N={leaves64[0].shape[0]} refs={len(leaves64)} offset={offset} {reduction}"
    floor = 1e-3 * expected.detach().abs().max().item() if expected.numel() else 0.0
    for g in our_grads:
        assert g.dtype == dtype and torch.all(torch.isfinite(g)), what
    if dtype in HALF:
        eager, eager_grads = run("reference", lambda t: t.to(dtype))
        assert ours.dtype == torch.float32 and torch.all(torch.isfinite(ours)), what
        assert _error(ours, expected) <= _error(eager, expected) + 1e-2, what + " value"
        for index, (a, b, c) in enumerate(zip(our_grads, eager_grads, expected_grads)):
            assert _error(a, c, floor) <= _error(b, c, floor) + 1e-2, f"{what} grad {index}"
        return
    value_tol, grad_tol = TOLERANCE[dtype]
    assert ours.dtype == dtype
    assert_rel_close(ours, expected, value_tol, what + " value")
    for index, (a, b) in enumerate(zip(our_grads, expected_grads)):
        assert_rel_close(a, b, grad_tol, f"{what} grad {index}", scale_floor=floor)


def _error(a, b, floor=0.0):
    """max |a - b| / max(max |b|, floor): the norm-wise relative error of assert_rel_close."""
    if b.numel() == 0:
        return 0.0
    scale = max(b.detach().abs().max().item(), floor)
    difference = (a.detach().double() - b.detach().double()).abs().max().item()
    return difference / scale if scale else difference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("refs", ["self", "ref_emb", "self_offset"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{n}x{m}x{d}" for n, m, d in SIZES])
@pytest.mark.parametrize("loss", PAIR_LOSSES)
@backend_param
def test_pair_losses_match_reference(backend, loss, size, refs, dtype):
    seed = SIZES.index(size) * 3 + ["self", "ref_emb", "self_offset"].index(refs)
    leaves, labels, y_labels, offset, _ = _pair_inputs(seed, *size, classes=5, refs=refs, dtype=dtype)
    _compare(backend, loss, leaves, labels, y_labels, offset, dtype)


@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean", "sum", "none"])
@pytest.mark.parametrize("loss", PAIR_LOSSES)
@backend_param
def test_every_reduction(backend, loss, reduction):
    leaves, labels, y_labels, offset, _ = _pair_inputs(7, 70, 80, 12, classes=4, refs="ref_emb", dtype=None)
    _compare(backend, loss, leaves, labels, y_labels, offset, torch.float32, reduction)


@pytest.mark.parametrize("labels", ["one_class", "all_distinct", "single_row"])
@pytest.mark.parametrize("loss", PAIR_LOSSES)
@backend_param
def test_degenerate_labels(backend, loss, labels):
    n = 1 if labels == "single_row" else 40
    classes = {"one_class": 1, "all_distinct": 0, "single_row": 3}[labels]
    leaves, lab, y_labels, offset, _ = _pair_inputs(3, n, 50, 8, classes=classes, refs="self", dtype=None)
    _compare(backend, loss, leaves, lab, y_labels, offset, torch.float64)
    leaves, lab, y_labels, offset, _ = _pair_inputs(4, n, 50, 8, classes=classes, refs="ref_emb", dtype=None)
    _compare(backend, loss, leaves, lab, y_labels, offset, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 1), (100, 7, 33), (150, 70, 5)], ids=["1x1x1", "100x7x33", "150x70x5"])
@backend_param
def test_proxy_anchor_matches_reference(backend, shape, dtype):
    n, classes, dim = shape
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    proxies = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, max(1, classes // 2), (n,), generator=g)  # some proxies without a positive
    _compare(backend, "proxy_anchor", [x, proxies], labels, None, None, dtype)


@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 1), (100, 7, 33), (150, 70, 5)], ids=["1x1x1", "100x7x33", "150x70x5"])
@backend_param
def test_proxy_nca_matches_reference(backend, shape, dtype, reduction):
    n, classes, dim = shape
    g = torch.Generator().manual_seed(n + 1)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    proxies = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    _compare(backend, "proxy_nca", [x, proxies], labels, None, None, dtype, reduction)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("loss", PAIR_LOSSES + ["proxy_anchor", "proxy_nca"])
@backend_param
def test_half_inputs(backend, loss, dtype):
    if loss in ("proxy_anchor", "proxy_nca"):
        g = torch.Generator().manual_seed(0)
        leaves = [torch.randn(90, 24, generator=g, dtype=torch.float64), torch.randn(6, 24, generator=g, dtype=torch.float64)]
        _compare(backend, loss, leaves, torch.randint(0, 6, (90,), generator=g), None, None, dtype)
        return
    leaves, labels, y_labels, offset, _ = _pair_inputs(5, 90, 70, 24, classes=6, refs="ref_emb", dtype=None)
    _compare(backend, loss, leaves, labels, y_labels, offset, dtype)


@backend_param
@pytest.mark.parametrize("loss", ["circle", "supcon", "ntxent", "tuplet_margin", "contrastive", "nca", "proxy_anchor",
                                  "circle_self", "supcon_self", "ntxent_self", "tuplet_margin_self", "nca_self"])
def test_deterministic_and_atomic_backward_agree(backend, loss):
    """Both backward paths, including the single-buffer one used when the references are the queries."""
    refs = "self" if loss.endswith("_self") else "ref_emb"
    loss = loss.replace("_self", "")
    leaves, labels, y_labels, offset, _ = _pair_inputs(9, 100, 90, 20, classes=4, refs=refs, dtype=None)
    if refs == "self":
        leaves.append(None)
    if loss == "proxy_anchor":
        leaves, y_labels = [leaves[0], leaves[1][:4]], None
    results = []
    for deterministic in (True, False):
        inputs = [t.detach().float().requires_grad_() for t in leaves if t is not None]
        if refs == "self":
            inputs.append(None)
        if loss == "proxy_anchor":
            value = mk.proxy_anchor_loss(inputs[0], labels, inputs[1], backend=backend, deterministic=deterministic)
        else:
            value = getattr(mk, f"{loss}_loss")(inputs[0], labels, inputs[1], y_labels, backend=backend,
                                                 deterministic=deterministic)
        results.append((value, grads(value, [t for t in inputs if t is not None])))
    (v1, g1), (v2, g2) = results
    assert torch.equal(v1, v2)
    for a, b in zip(g1, g2):
        assert_rel_close(a, b, 1e-6, f"{loss} atomic vs deterministic")


@backend_param
def test_backward_skips_references_without_grad(backend):
    x = torch.randn(30, 8, requires_grad=True)
    y = torch.randn(40, 8)  # a memory bank: no gradient wanted
    labels, y_labels = torch.randint(0, 3, (30,)), torch.randint(0, 3, (40,))
    ours = mk.circle_loss(x, labels, y, y_labels, backend=backend)
    (gx,) = torch.autograd.grad(ours, x)
    x64 = x.detach().double().requires_grad_()
    expected = mk.circle_loss(x64, labels, y.double(), y_labels, backend="reference")
    (gx_ref,) = torch.autograd.grad(expected, x64)
    assert_rel_close(gx, gx_ref, 1e-4, "dX without dY", scale_floor=1e-3 * expected.item())


def test_triton_is_usable_on_cpu_only_under_the_interpreter_and_auto_skips_it():
    assert mk.available_backends("cpu")["triton"] is None
    from metric_kernels import backends
    assert backends.resolve("auto", torch.device("cpu")).__name__ != "metric_kernels.triton"


def _loss_and_inputs(loss_name, backend):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 8, generator=g, requires_grad=True)
    y = torch.randn(50, 8, generator=g, requires_grad=True)
    proxies = torch.randn(4, 8, generator=g, requires_grad=True)
    labels, y_labels = torch.randint(0, 4, (40,), generator=g), torch.randint(0, 4, (50,), generator=g)
    calls = {
        "circle": lambda a, b, p: mk.circle_loss(a, labels, b, y_labels, backend=backend) + 0 * p.sum(),
        "circle_self": lambda a, b, p: mk.circle_loss(a, labels, backend=backend) + 0 * (p.sum() + b.sum()),
        "supcon": lambda a, b, p: mk.supcon_loss(a, labels, b, y_labels, self_offset=5, backend=backend,
                                                 deterministic=False) + 0 * p.sum(),
        "multi_similarity": lambda a, b, p: mk.multi_similarity_loss(a, labels, b, y_labels, distance="euclidean",
                                                                     backend=backend) + 0 * p.sum(),
        "ntxent": lambda a, b, p: mk.ntxent_loss(a, labels, b, y_labels, temperature=0.2, backend=backend)
        + 0 * p.sum(),
        "tuplet_margin": lambda a, b, p: mk.tuplet_margin_loss(a, labels, b, y_labels, margin=10.0, scale=16.0,
                                                               backend=backend) + 0 * p.sum(),
        "contrastive": lambda a, b, p: mk.contrastive_loss(a, labels, b, y_labels, self_offset=3, backend=backend)
        + 0 * p.sum(),
        "batch_hard_triplet": lambda a, b, p: mk.batch_hard_triplet_loss(a, labels, b, y_labels, backend=backend)
        + 0 * p.sum(),
        "nca": lambda a, b, p: mk.nca_loss(a, labels, b, y_labels, softmax_scale=3.0, backend=backend) + 0 * p.sum(),
        "margin": lambda a, b, p: mk.margin_loss(a, labels, b, y_labels, beta=0.9, backend=backend) + 0 * p.sum(),
        "generalized_lifted_structure": lambda a, b, p: mk.generalized_lifted_structure_loss(
            a, labels, b, y_labels, distance="squared_euclidean", backend=backend) + 0 * p.sum(),
        "proxy_anchor": lambda a, b, p: mk.proxy_anchor_loss(a, labels, p, backend=backend) + 0 * b.sum(),
        "proxy_nca": lambda a, b, p: mk.proxy_nca_loss(a, labels, p, backend=backend) + 0 * b.sum(),
    }
    return calls[loss_name], (x, y, proxies)


@backend_param
@pytest.mark.parametrize("loss", PAIR_LOSSES + ["circle_self", "proxy_anchor", "proxy_nca"])
def test_torch_compile_fullgraph(backend, loss):
    """A compiled training step: the custom ops trace as opaque nodes with fake implementations, AOTAutograd builds
    the forward and backward graphs (aot_eager runs them, fakes included), and values and gradients equal eager."""
    fn, inputs = _loss_and_inputs(loss, backend)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, want = compiled(*inputs), fn(*inputs)
    assert_rel_close(got, want, 1e-6, f"compiled {loss} value")
    for a, b in zip(grads(got, list(inputs)), grads(want, list(inputs))):
        assert_rel_close(a, b, 1e-6, f"compiled {loss} grad")


def _op_samples():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 6, generator=g, requires_grad=True)
    y = torch.randn(30, 6, generator=g, requires_grad=True)
    labels, y_labels = torch.randint(0, 3, (20,), generator=g), torch.randint(0, 3, (30,), generator=g)
    return x, y, labels, y_labels


def _ops(backend):
    prefix = backend.replace("-", "_")  # backend "cuda-emulated": ops cuda_emulated_*
    return (getattr(torch.ops.metric_kernels, f"{prefix}_{name}")
            for name in ("lse_rows", "lse_rows_backward", "batch_hard_select"))


@backend_param
@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4, 5])
def test_opcheck_lse_rows(backend, kind):
    lse_rows, _, _ = _ops(backend)
    x, y, labels, y_labels = _op_samples()
    for offset, deterministic in ((-1, True), (3, False)):
        torch.library.opcheck(lse_rows, (x, y, labels, y_labels, offset, kind, 0, 0.25, 8.0, deterministic))
    for deterministic in (True, False):  # the references are the queries: one gradient buffer
        torch.library.opcheck(lse_rows, (x, None, labels, labels, 0, kind, 0, 0.25, 8.0, deterministic))


@backend_param
def test_opcheck_backward_and_batch_hard_select(backend):
    lse_rows, lse_rows_backward, batch_hard_select = _ops(backend)
    x, y, labels, y_labels = _op_samples()
    stats = lse_rows(x, y, labels, y_labels, -1, 0, 0, 0.25, 8.0, True)
    grad = torch.randn_like(stats)
    for need_dx, need_dy, deterministic in ((True, True, True), (True, False, False), (False, True, False)):
        torch.library.opcheck(lse_rows_backward, (grad, stats.detach(), x.detach(), y.detach(), labels, y_labels,
                                                      -1, 0, 0, 0.25, 8.0, deterministic, need_dx, need_dy))
    self_stats = lse_rows(x, None, labels, labels, 0, 0, 0, 0.25, 8.0, True).detach()
    for deterministic in (True, False):
        torch.library.opcheck(lse_rows_backward, (torch.randn_like(self_stats), self_stats, x.detach(), None,
                                                      labels, labels, 0, 0, 0, 0.25, 8.0, deterministic, True, False))
    torch.library.opcheck(batch_hard_select, (x.detach(), y.detach(), labels, y_labels, 2))


@backend_param
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("empty", ["queries", "references"])
def test_backward_op_without_pairs_gives_zero_gradients(backend, empty, deterministic):
    """N = 0 or M = 0 (D > 0): no pair, so both gradients are zeros of their full shapes, whichever path."""
    lse_rows, lse_rows_backward, _ = _ops(backend)
    g = torch.Generator().manual_seed(5)
    n, m = (0, 9) if empty == "queries" else (7, 0)
    x, y = torch.randn(n, 5, generator=g), torch.randn(m, 5, generator=g)
    labels, y_labels = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (m,), generator=g)
    stats = lse_rows(x, y, labels, y_labels, -1, 0, 0, 0.25, 8.0, True)
    dx, dy = lse_rows_backward(torch.randn(4, n, generator=g), stats, x, y, labels, y_labels, -1, 0, 0, 0.25, 8.0,
                               deterministic, True, True)
    assert torch.equal(dx, torch.zeros(n, 5)) and torch.equal(dy, torch.zeros(m, 5))


@backend_param
def test_backward_op_checks_the_row_state(backend):
    lse_rows, lse_rows_backward, _ = _ops(backend)
    x, y, labels, y_labels = (t.detach() for t in _op_samples())
    stats = lse_rows(x, y, labels, y_labels, -1, 0, 0, 0.25, 8.0, True)
    args = (x, y, labels, y_labels, -1, 0, 0, 0.25, 8.0, True, True, True)
    with pytest.raises((RuntimeError, ValueError), match="grad must be 4 x N"):
        lse_rows_backward(torch.randn(4, 19), stats, *args)
    with pytest.raises((RuntimeError, ValueError), match="stats must be 4 x N"):
        lse_rows_backward(torch.randn(4, 20), stats[:3], *args)


@pytest.mark.parametrize("loss", ["circle", "supcon", "batch_hard_triplet"])
def test_chunked_reference_of_the_gpu_tests_equals_the_reference(loss):
    """The oracle of the GPU tests' N = 65536 case, checked here on a size the unchunked reference handles."""
    from tests.test_fused_gpu import PARAMS as GPU_PARAMS, chunked_reference_rows
    x = torch.randn(300, 16, dtype=torch.float64)
    labels = torch.randint(0, 40, (300,))
    expected = getattr(mk, f"{loss}_loss")(x, labels, reduction="none", backend="reference", **GPU_PARAMS[loss])
    assert_rel_close(chunked_reference_rows(loss, x, labels, chunk=64, **GPU_PARAMS[loss]), expected, 1e-12, loss)


@backend_param
@pytest.mark.parametrize("loss", ["supcon", "ntxent", "nca", "batch_hard_triplet", "proxy_anchor"])
def test_float64_gradcheck(backend, loss):
    """Finite differences against the fused backward (Circle's detached weights are checked by its closed form in
    test_gradients.py; here its gradients equal the reference's, in test_pair_losses_match_reference)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels, y_labels = torch.randint(0, 3, (9,), generator=g), torch.randint(0, 3, (11,), generator=g)
    if loss == "proxy_anchor":
        fn = lambda a, b: mk.proxy_anchor_loss(a, labels, b[:3], alpha=4.0, backend=backend)
    elif loss in ("supcon", "ntxent"):
        fn = lambda a, b: getattr(mk, f"{loss}_loss")(a, labels, b, y_labels, temperature=0.5, self_offset=1,
                                                      backend=backend)
    elif loss == "nca":
        fn = lambda a, b: mk.nca_loss(a, labels, b, y_labels, softmax_scale=2.0, self_offset=1, backend=backend)
    else:
        fn = lambda a, b: mk.batch_hard_triplet_loss(a, labels, b, y_labels, margin=2.5, backend=backend)
    assert torch.autograd.gradcheck(fn, (x, y))
    self_fn = lambda a: (getattr(mk, f"{loss}_loss")(a, labels, temperature=0.5, backend=backend)
                         if loss in ("supcon", "ntxent") else
                         mk.nca_loss(a, labels, softmax_scale=2.0, backend=backend) if loss == "nca" else fn(a, y))
    assert torch.autograd.gradcheck(self_fn, (x,))


@pytest.mark.parametrize("backend", ["triton", "cpu", "cuda-emulated"])
def test_float64_gradcheck_tuplet_margin(backend):
    """Finite differences against the angular margin's backward (NT-Xent's kind)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels, y_labels = torch.randint(0, 3, (9,), generator=g), torch.randint(0, 3, (11,), generator=g)
    assert torch.autograd.gradcheck(lambda a, b: mk.tuplet_margin_loss(a, labels, b, y_labels, margin=20.0, scale=3.0,
                                                                       self_offset=1, backend=backend), (x, y))
    assert torch.autograd.gradcheck(lambda a: mk.tuplet_margin_loss(a, labels, margin=-15.0, scale=5.0,
                                                                    backend=backend), (x,))
