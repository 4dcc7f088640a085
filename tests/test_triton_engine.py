"""The Triton engine's own paths, under the interpreter, against the float64 reference: raw rows normalised inside
the kernels (strided, mixed dtypes, rows whose norm is clamped), references split across programs and merged, D wider
than one tile, the fp16 gradient scale, and the ops on raw rows equal to the ops on normalised rows. NT-Xent and
Contrastive, whose statistics are sums over pairs (NT-Xent's after a first sweep for its negatives' log-sum-exp), are
also checked here over every distance, reduction, reference layout and dtype.

tests/test_fused.py runs every loss through every fused backend; these are the cases only the Triton engine has."""
import pytest
import torch
import torch.nn.functional as F

import metric_kernels as mk
from metric_kernels._fused import KIND, STAT_ROWS
from metric_kernels.reference.contrastive import contrastive_rows
from metric_kernels.reference.ntxent import ntxent_rows
from metric_kernels.triton import ops
from tests.helpers import assert_rel_close, grads

pytestmark = pytest.mark.skipif(mk.available_backends("cpu")["triton"] is not None,
                                reason=f"{mk.available_backends('cpu')['triton']}")

PAIR = {"circle": dict(m=0.25, gamma=64.0), "supcon": dict(temperature=0.1),
        "batch_hard_triplet": dict(margin=0.2), "ntxent": dict(temperature=0.1),
        "contrastive": dict(pos_margin=0.3, neg_margin=1.3)}
DISTANCES = ["cosine", "dot", "euclidean", "squared_euclidean"]
REDUCTIONS = ["none", "sum", "mean", "mean_nonzero"]
# Contrastive's margins by distance, where some pairs of random rows violate them and some do not (normalised rows:
# cosine near 0, Euclidean distance near sqrt(2)).
CONTRASTIVE_MARGINS = {"cosine": dict(pos_margin=0.2, neg_margin=0.1), "dot": dict(pos_margin=0.2, neg_margin=0.1),
                       "euclidean": dict(pos_margin=1.2, neg_margin=1.5),
                       "squared_euclidean": dict(pos_margin=1.6, neg_margin=2.2)}


def _run(loss, backend, x, labels, y=None, y_labels=None, deterministic=None, proxies=None, **options):
    """The loss on `backend`; options: more of its keywords (reduction, distance, self_offset, margins)."""
    if loss == "proxy_anchor":
        return mk.proxy_anchor_loss(x, labels, proxies, backend=backend, deterministic=deterministic)
    return getattr(mk, f"{loss}_loss")(x, labels, y, y_labels, backend=backend, deterministic=deterministic,
                                       **{**PAIR[loss], **options})


def _check(loss, leaves, labels, y_labels=None, deterministic=None, dtype=torch.float64, tol=(1e-10, 1e-10),
           label="", backend="triton", **options):
    """`backend` (Triton by default) on `leaves` (any dtype, any strides) against the reference on float64 copies;
    label: the case, for the failure messages."""
    def call(backend, tensors):
        if loss == "proxy_anchor":
            return _run(loss, backend, tensors[0], labels, deterministic=deterministic, proxies=tensors[1])
        y = tensors[1] if len(tensors) > 1 else None
        return _run(loss, backend, tensors[0], labels, y, y_labels if y is not None else None, deterministic,
                    **options)

    ours = [t.detach().requires_grad_() for t in leaves]
    value = call(backend, ours)
    ours_grads = grads(value, ours)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    expected = call("reference", exact)
    expected_grads = grads(expected, exact)
    floor = 1e-3 * expected.detach().abs().max().item()
    what = " ".join(filter(None, (loss, label, str(options) if options else "")))
    assert_rel_close(value, expected, tol[0], f"{what} value")
    for index, (a, b) in enumerate(zip(ours_grads, expected_grads)):
        assert a.dtype == leaves[index].dtype
        assert_rel_close(a, b, tol[1], f"{what} grad {index}", scale_floor=floor)


def _relative_error(a, b):
    """max |a - b| / max |b|, b the float64 result."""
    return ((a.detach().double() - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def many_sms(monkeypatch):
    """A pretend GPU wide enough that a few row blocks split their references across programs."""
    monkeypatch.setattr(ops, "INTERPRETER_SM_COUNT", 64)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("loss", ["circle", "supcon", "batch_hard_triplet", "proxy_anchor", "ntxent", "contrastive"])
def test_split_references_merge_exactly(many_sms, loss, deterministic):
    g = torch.Generator().manual_seed(11)
    n, m, d = 40, 700, 24
    assert ops.reference_splits(n, m, torch.device("cpu")) > 1
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if loss == "proxy_anchor":  # the proxies are the rows: 5 of them against 700 embeddings
        embeddings = torch.randn(m, d, generator=g, dtype=torch.float64)
        _check(loss, [embeddings, x[:5]], torch.randint(0, 5, (m,), generator=g), deterministic=deterministic)
        return
    y = torch.randn(m, d, generator=g, dtype=torch.float64)
    labels, y_labels = torch.randint(0, 6, (n,), generator=g), torch.randint(0, 6, (m,), generator=g)
    _check(loss, [x, y], labels, y_labels, deterministic=deterministic)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss", ["circle", "supcon", "batch_hard_triplet", "ntxent", "contrastive"])
def test_rows_wider_than_one_tile(loss, dtype):
    """D above the widest whole-D tile: the similarity is accumulated over D chunks, the gradient per D block."""
    d = ops.MAX_FULL_D[dtype.itemsize] + 44
    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(50, d, generator=g, dtype=dtype), torch.randn(70, d, generator=g, dtype=dtype)
    labels, y_labels = torch.randint(0, 4, (50,), generator=g), torch.randint(0, 4, (70,), generator=g)
    tol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 1e-4)
    for deterministic in (False, True):
        _check(loss, [x, y], labels, y_labels, deterministic=deterministic, tol=tol)
        _check(loss, [x], labels, deterministic=deterministic, tol=tol)


@pytest.mark.parametrize("backend", ["triton", "cuda-emulated"])
@pytest.mark.parametrize("loss", ["circle", "supcon", "batch_hard_triplet", "proxy_anchor", "ntxent", "contrastive"])
def test_strided_rows_and_clamped_norms(loss, backend):
    """Rows read through their strides (a transposed view) and rows of norm below eps, where the normalisation is
    x / eps and has no radial part (the CUDA kernels, under their host emulation, fold it in the same way)."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(16, 45, generator=g, dtype=torch.float64).t()  # 45 x 16, not contiguous
    x[3] = 0.0
    x[7] *= 1e-14
    assert not x.is_contiguous()
    labels = torch.randint(0, 3, (45,), generator=g)
    if loss == "proxy_anchor":
        proxies = torch.randn(4, 16, generator=g, dtype=torch.float64)
        proxies[1] = 0.0
        _check(loss, [x, proxies], torch.randint(0, 4, (45,), generator=g), backend=backend)
        return
    y = torch.randn(30, 16, generator=g, dtype=torch.float64)
    y[5] *= 1e-13
    for deterministic in (False, True):
        _check(loss, [x, y], labels, torch.randint(0, 3, (30,), generator=g), deterministic=deterministic,
               backend=backend)
        _check(loss, [x], labels, deterministic=deterministic, backend=backend)


def test_mixed_dtypes_meet_in_the_wider_one():
    g = torch.Generator().manual_seed(14)
    x = torch.randn(30, 20, generator=g).to(torch.bfloat16).requires_grad_()
    y = torch.randn(40, 20, generator=g, requires_grad=True)
    labels, y_labels = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (40,), generator=g)
    value = mk.circle_loss(x, labels, y, y_labels, backend="triton")
    gx, gy = torch.autograd.grad(value, [x, y])
    assert value.dtype == torch.float32 and gx.dtype == torch.bfloat16 and gy.dtype == torch.float32
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    expected = mk.circle_loss(x64, labels, y64, y_labels, backend="reference")
    ex, ey = torch.autograd.grad(expected, [x64, y64])
    assert_rel_close(value, expected, 1e-5, "value")
    assert_rel_close(gy, ey, 1e-4, "dy")


@pytest.mark.parametrize("backend", ["triton", "cuda-emulated"])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("loss", ["circle", "supcon", "proxy_anchor", "ntxent", "contrastive"])
def test_fp16_gradients_keep_their_small_terms(loss, deterministic, backend):
    """Rows of norm ~5000 make P = G r_i r_j about 1e-8, below fp16's normal range, while the gradients themselves
    (~1e-4) are representable: without the power-of-two scale P would lose most of its bits (a 50% error here).
    Against float64: no worse than the eager reference on the same fp16 inputs, + 1e-2. The CUDA kernels (under
    their host emulation) scale P the same way (csrc/cuda/lse_rows.cu, gradient_scale_kernel)."""
    g = torch.Generator().manual_seed(15)
    x = (1000 * torch.randn(60, 32, generator=g)).to(torch.float16)
    labels = torch.randint(0, 4, (60,), generator=g)
    y = (1000 * torch.randn(50, 32, generator=g)).to(torch.float16)
    y_labels = torch.randint(0, 4, (50,), generator=g)
    if loss == "proxy_anchor":
        y, y_labels = y[:4], None

    def gradients(backend, cast):
        leaves = [cast(t).requires_grad_() for t in (x, y)]
        if loss == "proxy_anchor":
            value = mk.proxy_anchor_loss(leaves[0], labels, leaves[1], backend=backend, deterministic=deterministic)
        else:
            value = _run(loss, backend, leaves[0], labels, leaves[1], y_labels, deterministic)
        return torch.autograd.grad(value, leaves)

    expected = gradients("reference", lambda t: t.double())
    for ours, eager, exact in zip(gradients(backend, lambda t: t.clone()), gradients("reference", lambda t: t.clone()),
                                  expected):
        assert exact.abs().max() > 0
        error = _relative_error(ours, exact)
        assert error <= _relative_error(eager, exact) + 1e-2, f"{loss}: relative error {error:.2e}"


@pytest.mark.parametrize("kind, param_a, param_b", [(0, 0.25, 8.0), (1, 0.25, 8.0), (2, 0.25, 8.0), (4, 0.0, 8.0),
                                                    (5, 0.25, 0.1)])
def test_ops_on_raw_rows_equal_ops_on_normalised_rows(kind, param_a, param_b):
    """The ops normalise inside: raw rows and their normalised copies give the same statistics and, through the
    normalisation's chain rule, the same gradients."""
    g = torch.Generator().manual_seed(16)
    x = 5 * torch.randn(33, 10, generator=g, dtype=torch.float64)
    y = 3 * torch.randn(41, 10, generator=g, dtype=torch.float64)
    labels, y_labels = torch.randint(0, 3, (33,), generator=g), torch.randint(0, 3, (41,), generator=g)
    raw = [x.clone().requires_grad_(), y.clone().requires_grad_()]
    normalised = [t.clone().requires_grad_() for t in (x, y)]
    stats = ops.lse_rows(raw[0], raw[1], labels, y_labels, 2, kind, 0, param_a, param_b, True)
    expected = ops.lse_rows(F.normalize(normalised[0], dim=1), F.normalize(normalised[1], dim=1), labels, y_labels,
                            2, kind, 0, param_a, param_b, True)
    assert stats.shape == (STAT_ROWS, 33)
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(stats))
    assert_rel_close(stats[finite], expected[finite], 1e-12, "stats")
    weights = torch.randn(STAT_ROWS, 33, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((stats[finite] * weights[finite]).sum(), raw)
    theirs = torch.autograd.grad((expected[finite] * weights[finite]).sum(), normalised)
    for a, b in zip(ours, theirs):
        assert_rel_close(a, b, 1e-10, "gradients")


def test_batch_hard_select_normalises_only_when_asked():
    g = torch.Generator().manual_seed(17)
    x = torch.randn(30, 8, generator=g, dtype=torch.float64) * torch.rand(30, 1, generator=g, dtype=torch.float64)
    y = torch.randn(45, 8, generator=g, dtype=torch.float64) * 4
    labels, y_labels = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (45,), generator=g)
    for normalize in (True, False):
        chosen = ops.batch_hard_select(x, y, labels, y_labels, -1, normalize)
        a, b = (F.normalize(x, dim=1), F.normalize(y, dim=1)) if normalize else (x, y)
        distances = torch.cdist(a, b)
        same = labels[:, None] == y_labels[None, :]
        far = torch.where(same, distances, -torch.inf).argmax(dim=1)
        near = torch.where(~same, distances, torch.inf).argmin(dim=1)
        assert torch.equal(chosen[0], far) and torch.equal(chosen[1], near), normalize


def test_triplet_distance_ops_pass_opcheck_and_gradcheck():
    g = torch.Generator().manual_seed(18)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    positive, negative = torch.randint(0, 7, (6,), generator=g), torch.randint(0, 7, (6,), generator=g)
    for normalize in (True, False):
        torch.library.opcheck(ops.triplet_distances, (x, y, positive, negative, normalize))
        torch.library.opcheck(ops.triplet_distances, (x, None, positive % 6, negative % 6, normalize))
        assert torch.autograd.gradcheck(lambda a, b: ops.triplet_distances(a, b, positive, negative, normalize),
                                        (x, y))
        assert torch.autograd.gradcheck(
            lambda a: ops.triplet_distances(a, None, positive % 6, negative % 6, normalize), (x,))


def test_a_zero_triplet_distance_passes_no_gradient():
    """As torch.cdist: where a chosen pair coincides, its distance has gradient 0 (not NaN)."""
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.cat([x.detach()[:3] * 2.0, torch.randn(4, 5, dtype=torch.float64)]).requires_grad_()
    positive, negative = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([6, 5, 4, 3, 2, 1])
    distances = ops.triplet_distances(x, y, positive, negative, True)
    assert torch.all(distances[0, :3] == 0)
    gx, gy = torch.autograd.grad(distances.sum(), [x, y])
    assert torch.all(torch.isfinite(gx)) and torch.all(torch.isfinite(gy))
    u, v = F.normalize(x.detach(), dim=1).requires_grad_(), F.normalize(y.detach(), dim=1)
    keep = torch.arange(6) >= 3  # the pairs at distance 0 contribute nothing
    expected = (torch.linalg.vector_norm(u - v[positive], dim=1) * keep).sum() + torch.linalg.vector_norm(
        u - v[negative], dim=1).sum()
    (gu,) = torch.autograd.grad(expected, [u])
    x64 = x.detach().requires_grad_()
    (gx_expected,) = torch.autograd.grad(F.normalize(x64, dim=1), [x64], gu)
    assert_rel_close(gx, gx_expected, 1e-10, "dx")


# ---- NT-Xent and Contrastive: statistics that are sums over pairs ---------------------------------------------------

def _pair_reduced_options(loss, distance, normalize=True):
    options = dict(distance=distance, normalize_embeddings=normalize)
    return dict(options, **CONTRASTIVE_MARGINS[distance]) if loss == "contrastive" else options


def _layouts(seed, dtype=torch.float64):
    """(name, leaves, labels, reference labels, self_offset), ragged against the 64-wide tiles: the references are
    the queries; a separate batch; a single query; the queries among the references (self_offset); and 3 queries
    against 300 references, which the ops split across programs."""
    g = torch.Generator().manual_seed(seed)
    rows = lambda n: torch.randn(n, 20, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    labels = lambda n: torch.randint(0, 4, (n,), generator=g)  # noqa: E731
    x, y, x_labels, y_labels = rows(45), rows(17), labels(45), labels(17)
    among = torch.cat([rows(6), x[:17], rows(5)])
    among_labels = torch.cat([labels(6), x_labels[:17], labels(5)])
    few, many = rows(3), rows(300)
    assert ops.reference_splits(3, 300, torch.device("cpu")) > 1
    return [("self", [x], x_labels, None, None), ("ref_emb", [x, y], x_labels, y_labels, None),
            ("single_query", [x[:1], y], x_labels[:1], y_labels, None),
            ("self_offset", [x[:17], among], x_labels[:17], among_labels, 6),
            ("split", [few, many], labels(3), labels(300), None)]


DISTANCE_CASES = [("cosine", True), ("dot", True), ("dot", False), ("euclidean", True), ("euclidean", False),
                  ("squared_euclidean", True)]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("distance, normalize", DISTANCE_CASES, ids=[f"{d}-{int(n)}" for d, n in DISTANCE_CASES])
@pytest.mark.parametrize("loss", ["ntxent", "contrastive"])
def test_pair_reduced_losses_match_the_reference(loss, distance, normalize, deterministic):
    """Values and gradients (embeddings and ref_emb) against the float64 reference at 1e-10, every reduction and
    reference layout; deterministic: the row and column passes (one reduction: the others reach the kernels only
    as other upstream gradients of the same statistics), else one pass with atomics."""
    options = _pair_reduced_options(loss, distance, normalize)
    for layout, leaves, labels, y_labels, offset in _layouts(21):
        for reduction in ["mean_nonzero"] if deterministic else REDUCTIONS:
            _check(loss, leaves, labels, y_labels, deterministic, label=f"{layout} {reduction}", reduction=reduction,
                   self_offset=offset, **options)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("loss", ["ntxent", "contrastive"])
def test_pair_reduced_losses_in_float32(loss, deterministic):
    """fp32 rows (IEEE products under the interpreter) within 1e-5 (values) and 1e-4 (gradients) of float64."""
    for distance in DISTANCES:
        options = _pair_reduced_options(loss, distance)
        for layout, leaves, labels, y_labels, offset in _layouts(22, torch.float32)[:2]:
            _check(loss, leaves, labels, y_labels, deterministic, tol=(1e-5, 1e-4), label=layout, self_offset=offset,
                   **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["ntxent", "contrastive"])
def test_pair_reduced_losses_on_16_bit_rows(loss, dtype):
    """16-bit rows (16-bit products, fp32 statistics): no further from float64 than the eager reference run on the
    same rows, + 1e-2, values and gradients, in the gradients' own dtype."""
    for distance in DISTANCES:
        options = _pair_reduced_options(loss, distance)
        for layout, leaves, labels, y_labels, offset in _layouts(23, dtype)[:2]:
            def run(backend, cast):
                tensors = [cast(t).requires_grad_() for t in leaves]
                y = tensors[1] if len(tensors) > 1 else None
                value = _run(loss, backend, tensors[0], labels, y, y_labels if y is not None else None,
                             self_offset=offset, **options)
                return [value] + grads(value, tensors)

            ours, eager = run("triton", lambda t: t.clone()), run("reference", lambda t: t.clone())
            exact = run("reference", lambda t: t.double())
            assert [g.dtype for g in ours[1:]] == [dtype] * len(leaves)
            for index, (a, b, c) in enumerate(zip(ours, eager, exact)):
                error = _relative_error(a, c)
                assert error <= _relative_error(b, c) + 1e-2, f"{loss} {distance} {layout} output {index}: {error:.2e}"


@pytest.mark.parametrize("loss", ["ntxent", "contrastive"])
def test_nan_in_the_rows_gives_nan_losses(loss):
    """A NaN in a query or a reference makes every reduction of the loss NaN (the log-sum-exp statistics need not
    carry it: the loss adds _nonfinite_guard). Contrastive's plain sums carry it into the statistics of every query
    that pairs with it, as in the reference."""
    g = torch.Generator().manual_seed(24)
    x = torch.randn(30, 8, generator=g, dtype=torch.float64)
    y = torch.randn(20, 8, generator=g, dtype=torch.float64)
    labels, y_labels = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (20,), generator=g)
    for bad in (x, y):
        rows = [x.clone(), y.clone()]
        rows[0 if bad is x else 1][3, 2] = float("nan")
        for reduction in REDUCTIONS:
            assert torch.isnan(_run(loss, "triton", rows[0], labels, rows[1], y_labels, reduction=reduction)).all()
            if bad is x:
                assert torch.isnan(_run(loss, "triton", rows[0], labels, reduction=reduction)).all()
    x[3, 2] = float("nan")
    stats = ops.lse_rows(x, None, labels, labels, 0, KIND["contrastive"], 0, 0.2, 0.1, False)
    u = F.normalize(x, dim=1)
    expected = contrastive_rows(u, u, labels, labels, 0, pos_margin=0.2, neg_margin=0.1)
    assert torch.isnan(stats[0]).any() and torch.isnan(stats[1]).any()
    for index, (ours, theirs) in enumerate(zip(stats, expected)):
        assert_rel_close(ours, theirs.double(), 1e-10, f"statistic {index}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ntxent_counts_the_pairs_pml_keeps_in_the_statistics_dtype(dtype):
    """stats[3] counts the positive pairs whose 1 + exp(x) > 1 in the statistics dtype, as the reference (PML)
    rounds them in the loss's: two tight, orthogonal clusters at temperature 0.05 put x = A - v / t between -22 and
    -6, some pairs below fp32's -16.6 (nonzero in fp64, 0 in fp32)."""
    g = torch.Generator().manual_seed(25)
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    labels = torch.randint(0, 2, (40,), generator=g)
    x = (centres[labels] + 0.15 * torch.randn(40, 3, generator=g, dtype=torch.float64)).to(dtype)
    stats = ops.lse_rows(x, None, labels, labels, 0, KIND["ntxent"], 0, 0.0, 20.0, False)
    u = F.normalize(x, dim=1)
    sums, nonzero = ntxent_rows(u, u, labels, labels, 0, temperature=0.05)
    assert stats.dtype == dtype
    assert torch.equal(stats[3], nonzero.to(dtype))
    assert_rel_close(stats[0], sums, 1e-5 if dtype == torch.float32 else 1e-10, "sums")
    counted = [ntxent_rows(u.to(t), u.to(t), labels, labels, 0, temperature=0.05)[1].sum() for t in (torch.float32,
                                                                                                      torch.float64)]
    assert counted[0] < counted[1]  # the case: pairs that fp32 rounds to 0 and fp64 does not


@pytest.mark.parametrize("loss", ["ntxent", "contrastive"])
def test_pair_reduced_ops_pass_opcheck(loss):
    """The [STAT_ROWS, N] fake, the autograd formula and the backward op of the new kinds, with y and without."""
    g = torch.Generator().manual_seed(26)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(30, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels, y_labels = torch.randint(0, 3, (20,), generator=g), torch.randint(0, 3, (30,), generator=g)
    kind, a, b = KIND[loss], *((0.0, 4.0) if loss == "ntxent" else (0.2, 0.1))
    for deterministic in (True, False):
        torch.library.opcheck(ops.lse_rows, (x, y, labels, y_labels, 3, kind, 0, a, b, deterministic))
        torch.library.opcheck(ops.lse_rows, (x, None, labels, labels, 0, kind, 2, a, b, deterministic))
        stats = ops.lse_rows(x, y, labels, y_labels, -1, kind, 0, a, b, deterministic).detach()
        torch.library.opcheck(ops.lse_rows_backward, (torch.randn_like(stats), stats, x.detach(), y.detach(), labels,
                                                      y_labels, -1, kind, 0, a, b, deterministic, True, True))
