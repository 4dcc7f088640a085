"""The Triton engine's own paths, under the interpreter, against the float64 reference: raw rows normalised inside
the kernels (strided, mixed dtypes, rows whose norm is clamped), references split across programs and merged, D wider
than one tile, the fp16 gradient scale, and the ops on raw rows equal to the ops on normalised rows.

tests/test_fused.py runs every loss through every fused backend; these are the cases only the Triton engine has."""
import pytest
import torch
import torch.nn.functional as F

import metric_kernels as mk
from metric_kernels.triton import ops
from tests.helpers import assert_rel_close, grads

pytestmark = pytest.mark.skipif(mk.available_backends("cpu")["triton"] is not None,
                                reason=f"{mk.available_backends('cpu')['triton']}")

PAIR = {"circle": dict(m=0.25, gamma=64.0), "supcon": dict(temperature=0.1),
        "batch_hard_triplet": dict(margin=0.2)}


def _run(loss, backend, x, labels, y=None, y_labels=None, deterministic=None, proxies=None):
    if loss == "proxy_anchor":
        return mk.proxy_anchor_loss(x, labels, proxies, backend=backend, deterministic=deterministic)
    return getattr(mk, f"{loss}_loss")(x, labels, y, y_labels, backend=backend, deterministic=deterministic,
                                       **PAIR[loss])


def _check(loss, leaves, labels, y_labels=None, deterministic=None, dtype=torch.float64, tol=(1e-10, 1e-10)):
    """Triton on `leaves` (any dtype, any strides) against the reference on float64 copies."""
    def call(backend, tensors):
        if loss == "proxy_anchor":
            return _run(loss, backend, tensors[0], labels, deterministic=deterministic, proxies=tensors[1])
        y = tensors[1] if len(tensors) > 1 else None
        return _run(loss, backend, tensors[0], labels, y, y_labels if y is not None else None, deterministic)

    ours = [t.detach().requires_grad_() for t in leaves]
    value = call("triton", ours)
    ours_grads = grads(value, ours)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    expected = call("reference", exact)
    expected_grads = grads(expected, exact)
    floor = 1e-3 * abs(expected.item())
    assert_rel_close(value, expected, tol[0], f"{loss} value")
    for index, (a, b) in enumerate(zip(ours_grads, expected_grads)):
        assert a.dtype == leaves[index].dtype
        assert_rel_close(a, b, tol[1], f"{loss} grad {index}", scale_floor=floor)


@pytest.fixture
def many_sms(monkeypatch):
    """A pretend GPU wide enough that a few row blocks split their references across programs."""
    monkeypatch.setattr(ops, "INTERPRETER_SM_COUNT", 64)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("loss", ["circle", "supcon", "batch_hard_triplet", "proxy_anchor"])
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
@pytest.mark.parametrize("loss", ["circle", "supcon", "batch_hard_triplet"])
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


@pytest.mark.parametrize("loss", ["circle", "supcon", "batch_hard_triplet", "proxy_anchor"])
def test_strided_rows_and_clamped_norms(loss):
    """Rows read through their strides (a transposed view) and rows of norm below eps, where the normalisation is
    x / eps and has no radial part."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(16, 45, generator=g, dtype=torch.float64).t()  # 45 x 16, not contiguous
    x[3] = 0.0
    x[7] *= 1e-14
    assert not x.is_contiguous()
    labels = torch.randint(0, 3, (45,), generator=g)
    if loss == "proxy_anchor":
        proxies = torch.randn(4, 16, generator=g, dtype=torch.float64)
        proxies[1] = 0.0
        _check(loss, [x, proxies], torch.randint(0, 4, (45,), generator=g))
        return
    y = torch.randn(30, 16, generator=g, dtype=torch.float64)
    y[5] *= 1e-13
    for deterministic in (False, True):
        _check(loss, [x, y], labels, torch.randint(0, 3, (30,), generator=g), deterministic=deterministic)
        _check(loss, [x], labels, deterministic=deterministic)


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


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("loss", ["circle", "supcon", "proxy_anchor"])
def test_fp16_gradients_keep_their_small_terms(loss, deterministic):
    """Rows of norm ~5000 make P = G r_i r_j about 1e-8, below fp16's normal range, while the gradients themselves
    (~1e-4) are representable: without the power-of-two scale P would lose most of its bits (a 50% error here).
    Against float64: no worse than the eager reference on the same fp16 inputs, + 1e-2."""
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

    def error(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    expected = gradients("reference", lambda t: t.double())
    for ours, eager, exact in zip(gradients("triton", lambda t: t.clone()), gradients("reference", lambda t: t.clone()),
                                  expected):
        assert exact.abs().max() > 0
        assert error(ours, exact) <= error(eager, exact) + 1e-2, f"{loss}: relative error {error(ours, exact):.2e}"


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_ops_on_raw_rows_equal_ops_on_normalised_rows(kind):
    """The ops normalise inside: raw rows and their normalised copies give the same statistics and, through the
    normalisation's chain rule, the same gradients."""
    g = torch.Generator().manual_seed(16)
    x = 5 * torch.randn(33, 10, generator=g, dtype=torch.float64)
    y = 3 * torch.randn(41, 10, generator=g, dtype=torch.float64)
    labels, y_labels = torch.randint(0, 3, (33,), generator=g), torch.randint(0, 3, (41,), generator=g)
    raw = [x.clone().requires_grad_(), y.clone().requires_grad_()]
    normalised = [t.clone().requires_grad_() for t in (x, y)]
    stats = ops.lse_rows(raw[0], raw[1], labels, y_labels, 2, kind, 0, 0.25, 8.0, True)
    expected = ops.lse_rows(F.normalize(normalised[0], dim=1), F.normalize(normalised[1], dim=1), labels, y_labels,
                            2, kind, 0, 0.25, 8.0, True)
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(stats))
    assert_rel_close(stats[finite], expected[finite], 1e-12, "stats")
    weights = torch.randn(3, 33, generator=g, dtype=torch.float64)
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
