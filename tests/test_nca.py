"""NCA and ProxyNCA: the reference (and the whole functional and module path) equals pytorch-metric-learning in
float64 (1e-10 relative, values and gradients), PML's rules are pinned (which queries it leaves out, batches of one
query, its reducers, its distances), and the modules are drop-in replacements. The fused backends are checked against
the reference in tests/test_fused.py."""
import pytest
import torch

import metric_kernels as mk
from metric_kernels import pml
from metric_kernels.pml import exact_cdist
from tests.helpers import assert_rel_close, grads, random_pair_case

TOL = 1e-10
# PML's softmax sums carry rounding of about N ulps: for a query whose positives take all the probability (one class)
# PML's loss is 1e-16-level noise where ours is exactly 0. Values and gradients are judged relative to at least this
# (1e-13 absolute at TOL), as the other losses' gradients are judged relative to their loss (tests/helpers.py).
FLOOR = 1e-3


def _assert_close_to_pml(ours, expected, inputs, what):
    assert_rel_close(ours, expected, TOL, what + " value", scale_floor=FLOOR)
    for index, (a, b) in enumerate(zip(grads(ours, inputs), grads(expected, inputs))):
        assert_rel_close(a, b, TOL, f"{what} grad of input {index}", scale_floor=FLOOR)

distances = pytest.importorskip("pytorch_metric_learning.distances")
reducers = pytest.importorskip("pytorch_metric_learning.reducers")
losses = pytest.importorskip("pytorch_metric_learning.losses")

# (PML distance, the functional keywords saying the same)
DISTANCES = {
    "LpDistance(power=2)": (lambda: distances.LpDistance(power=2), dict()),
    "LpDistance()": (lambda: distances.LpDistance(), dict(distance="euclidean")),
    "LpDistance(power=2, unnormalised)": (lambda: distances.LpDistance(power=2, normalize_embeddings=False),
                                          dict(distance="squared_euclidean", normalize_embeddings=False)),
    "LpDistance(unnormalised)": (lambda: distances.LpDistance(normalize_embeddings=False),
                                 dict(distance="euclidean", normalize_embeddings=False)),
    "CosineSimilarity()": (lambda: distances.CosineSimilarity(), dict(distance="cosine")),
    "DotProductSimilarity(unnormalised)": (lambda: distances.DotProductSimilarity(normalize_embeddings=False),
                                           dict(distance="dot", normalize_embeddings=False)),
}


def _softmax_scale(seed):
    g = torch.Generator().manual_seed(20_000 + seed)
    return 0.2 + 30 * torch.rand((), generator=g, dtype=torch.float64).item()


@pytest.mark.parametrize("block", range(4))
def test_nca_equals_pml(block):
    """Random sizes, dims, classes (queries without a positive among them), with and without ref_emb."""
    for seed in range(block * 25, (block + 1) * 25):
        case = random_pair_case(600_000 + seed, max_rows=200, allow_self_offset=False)
        scale = _softmax_scale(seed)
        with exact_cdist():
            expected = pml.nca_loss(case.x, case.labels, case.y, case.y_labels, softmax_scale=scale)
        ours = mk.nca_loss(case.x, case.labels, case.y, case.y_labels, softmax_scale=scale, backend="reference")
        what = f"nca seed={seed} N={case.x.shape[0]} D={case.x.shape[1]} " \
               f"M={None if case.y is None else case.y.shape[0]} scale={scale:.3g}"
        assert ours.dtype == torch.float64
        if expected.isnan():  # no query kept: PML's MeanReducer averages nothing (the test below)
            assert ours.item() == 0, what
            continue
        _assert_close_to_pml(ours, expected, case.inputs, what)


@pytest.mark.parametrize("name", list(DISTANCES))
def test_nca_every_distance_equals_pml(name):
    make_distance, options = DISTANCES[name]
    for seed in range(8):
        case = random_pair_case(610_000 + seed, max_rows=120, allow_self_offset=False)
        scale = _softmax_scale(seed) / 10  # the unnormalised rows' distances reach 100: keep some queries kept
        with exact_cdist():
            expected = pml.nca_loss(case.x, case.labels, case.y, case.y_labels, softmax_scale=scale,
                                    distance=make_distance())
        ours = mk.nca_loss(case.x, case.labels, case.y, case.y_labels, softmax_scale=scale, backend="reference",
                           **options)
        what = f"nca {name} seed={seed}"
        _assert_close_to_pml(ours, expected, case.inputs, what)
        module = mk.NCALoss(softmax_scale=scale, distance=make_distance(), backend="reference")
        assert_rel_close(module(case.x, case.labels, None, case.y, case.y_labels), expected, TOL, what + " module",
                         scale_floor=FLOOR)


def test_nca_self_offset_leaves_out_only_the_query_itself():
    """PML has no self_offset (its indices_tuple weighs NCA's queries instead of leaving pairs out): each query is
    emulated by PML's own nca_computation against the references without its own row, the mean over the kept ones."""
    for seed in range(10):
        case = random_pair_case(620_000 + seed, max_rows=60)
        if case.self_offset is None:
            continue
        loss = losses.NCALoss(softmax_scale=3.0)
        kept = []
        for i in range(case.x.shape[0]):
            keep = torch.arange(case.y.shape[0]) != i + case.self_offset
            out = loss.nca_computation(case.x[i:i + 1], case.y[keep], case.labels[i:i + 1], case.y_labels[keep],
                                       None)["loss"]["losses"]
            kept.append(out)
        kept = torch.cat(kept)
        expected = kept.mean() if kept.numel() else kept.sum() * 0
        if case.x.shape[0] <= 1:
            expected = expected * 0  # PML's rule for a batch of one query (test below)
        ours = mk.nca_loss(case.x, case.labels, case.y, case.y_labels, self_offset=case.self_offset,
                           softmax_scale=3.0, backend="reference")
        _assert_close_to_pml(ours, expected, case.inputs, f"seed={seed}")


def _pml_kept_rows(out, rows):
    """PML's DoNothingReducer losses scattered to one entry per query (0 where left out), and the kept mask."""
    info = out["loss"]
    losses_, kept = torch.zeros(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.bool)
    info = dict(info, losses=info["losses"].double()) if torch.is_tensor(info["losses"]) else info
    if info["reduction_type"] == "already_reduced":
        return losses_, kept
    kept[info["indices"]] = True
    return losses_.index_add(0, info["indices"], info["losses"]), kept


@pytest.mark.parametrize("reducer", ["AvgNonZeroReducer", "MeanReducer", "SumReducer", "DoNothingReducer",
                                     "PerAnchorReducer"])
def test_nca_reducers_equal_pml(reducer):
    """Every reducer, through the module, on batches where some queries have no positive (PML leaves them out of
    MeanReducer's count) and some have no negative (kept, with a loss of 0: AvgNonZeroReducer leaves them out)."""
    def make():
        if reducer == "PerAnchorReducer":
            return reducers.PerAnchorReducer(reducers.MeanReducer())
        return getattr(reducers, reducer)()
    for seed in range(6):
        g = torch.Generator().manual_seed(630_000 + seed)
        x = torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(0, 6, (40,), generator=g)
        labels[:3] = torch.tensor([100, 101, 102])  # no positive: left out
        y = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
        y_labels = torch.randint(0, 6, (30,), generator=g)
        y_labels[:2], labels[3] = 7, 7  # query 3's only references are positives: kept with a loss of 0
        y_labels[:2] = 7
        for ref in ((None, None), (y, y_labels)):
            expected = losses.NCALoss(softmax_scale=4.0, reducer=make())(x, labels, None, *ref)
            ours = mk.NCALoss(softmax_scale=4.0, reducer=make(), backend="reference")(x, labels, None, *ref)
            what = f"{reducer} seed={seed} ref_emb={ref[0] is not None}"
            if reducer == "DoNothingReducer":
                assert torch.equal(ours["loss"]["indices"], expected["loss"]["indices"]), what
                assert ours["loss"]["reduction_type"] == "element"
                ours, expected = ours["loss"]["losses"].sum(), expected["loss"]["losses"].sum()
            _assert_close_to_pml(ours, expected, [x] if ref[0] is None else [x, y], what)


def test_nca_reductions_reduce_pmls_kept_rows():
    """reduction="none" is PML's per-query losses (0 where PML leaves a query out); "mean" divides by the kept
    queries, "mean_nonzero" by the positive ones, "sum" adds."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 8, (50,), generator=g)
    labels[:4] = torch.arange(4) + 50
    expected, kept = _pml_kept_rows(losses.NCALoss(reducer=reducers.DoNothingReducer())(x, labels), 50)
    call = lambda reduction: mk.nca_loss(x, labels, reduction=reduction, backend="reference")  # noqa: E731
    assert_rel_close(call("none"), expected, TOL, "none")
    assert_rel_close(call("sum"), expected.sum(), TOL, "sum")
    assert_rel_close(call("mean"), expected.sum() / kept.sum(), TOL, "mean")
    assert_rel_close(call("mean_nonzero"), expected[expected > 0].mean(), TOL, "mean_nonzero")
    assert kept.sum() < 50 and call("mean").item() != pytest.approx(expected.mean().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda-emulated"])
def test_nca_leaves_out_a_query_whose_positive_probability_underflows(backend, dtype):
    """PML: -log(0) is left out (`exp != 0`), not infinite. Query 0's positive is opposite to it and its negative
    identical, so its probability is exp(-4 scale): 0 in the dtype for this scale; query 1's is far from 0."""
    scale = 300.0 if dtype == torch.float64 else 40.0
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.1], [0.1, 1.0]], dtype=dtype, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1])
    with torch.no_grad():
        probability = torch.exp(torch.tensor(-4 * scale, dtype=dtype))
    assert probability == 0
    expected, kept = _pml_kept_rows(losses.NCALoss(softmax_scale=scale, reducer=reducers.DoNothingReducer())(
        x.detach(), labels), 5)  # PML in the same dtype: its own underflow
    assert not kept[0] and kept[1], "PML leaves out query 0 only"
    ours = mk.nca_loss(x, labels, softmax_scale=scale, reduction="none", backend=backend)
    assert ours[0] == 0 and torch.all(torch.isfinite(ours))
    assert_rel_close(ours.double(), expected, 1e-10 if dtype == torch.float64 else 1e-5, "rows")
    value = mk.nca_loss(x, labels, softmax_scale=scale, backend=backend)
    assert_rel_close(value.double(), expected.sum() / kept.sum(), 1e-10 if dtype == torch.float64 else 1e-5, "mean")
    (grad,) = torch.autograd.grad(value, x)
    assert torch.all(torch.isfinite(grad))


def test_nca_without_a_kept_query_is_zero_where_pmls_mean_is_nan():
    """Where PML keeps no query (no query has a positive), its MeanReducer (the default) returns torch.mean of no
    losses, NaN; SPEC.md's rule is that a loss without terms is 0 (PML's AvgNonZeroReducer and SumReducer give 0
    here too), so we return 0 with zero gradients and do not follow PML's NaN."""
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(6)
    assert pml.nca_loss(x, labels).isnan()
    assert pml.nca_loss(x, labels, reducer=reducers.AvgNonZeroReducer()).item() == 0
    for module in (mk.NCALoss(), mk.NCALoss(reducer=reducers.MeanReducer())):
        value = module(x, labels)
        assert value.item() == 0
        (grad,) = torch.autograd.grad(value, x)
        assert torch.equal(grad, torch.zeros_like(x))
    assert mk.proxy_nca_loss(x, labels, torch.randn(6, 5, dtype=torch.float64)).item() > 0


def test_nca_batch_of_one_query_gives_zero_as_pml():
    """PML's NCALoss returns no loss for at most one query, even against references; ProxyNCALoss has no such rule."""
    x = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 4, dtype=torch.float64)
    labels, y_labels = torch.tensor([1]), torch.tensor([1, 0, 1, 2, 0])
    assert pml.nca_loss(x, labels, y, y_labels).item() == 0
    ours = mk.nca_loss(x, labels, y, y_labels)
    assert ours.item() == 0 and ours.requires_grad
    assert mk.nca_loss(x, labels, y, y_labels, reduction="none").tolist() == [0.0]
    proxies = torch.randn(3, 4, dtype=torch.float64)
    expected = pml.proxy_nca_loss(x, labels, proxies)
    assert expected.item() > 0
    assert_rel_close(mk.proxy_nca_loss(x, labels, proxies), expected, TOL, "ProxyNCA, one query")


@pytest.mark.parametrize("block", range(2))
def test_proxy_nca_equals_pml(block):
    for seed in range(block * 20, (block + 1) * 20):
        g = torch.Generator().manual_seed(640_000 + seed)
        n = torch.randint(1, 200, (), generator=g).item()
        dim = torch.randint(1, 65, (), generator=g).item()
        classes = torch.randint(1, 50, (), generator=g).item()
        x = torch.randn(n, dim, generator=g, dtype=torch.float64, requires_grad=True)
        proxies = torch.randn(classes, dim, generator=g, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(0, classes, (n,), generator=g)
        scale = _softmax_scale(seed)
        with exact_cdist():
            expected = pml.proxy_nca_loss(x, labels, proxies, softmax_scale=scale)
        ours = mk.proxy_nca_loss(x, labels, proxies, softmax_scale=scale, backend="reference")
        _assert_close_to_pml(ours, expected, [x, proxies], f"proxy_nca seed={seed} N={n} D={dim} C={classes}")


@pytest.mark.parametrize("name", list(DISTANCES))
def test_proxy_nca_module_equals_pmls(name):
    """The module: same proxies from the same seed, every distance, values, gradients (embeddings and proxies) and
    get_logits; DoNothingReducer's dictionary."""
    make_distance, _ = DISTANCES[name]
    torch.manual_seed(7)
    theirs = losses.ProxyNCALoss(6, 10, softmax_scale=0.7, distance=make_distance()).double()
    torch.manual_seed(7)
    ours = mk.ProxyNCALoss(6, 10, softmax_scale=0.7, distance=make_distance(), backend="reference").double()
    assert torch.equal(ours.proxies, theirs.proxies)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(40, 10, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (40,), generator=g)
    with exact_cdist():
        expected = theirs(x, labels)
        expected_logits = theirs.get_logits(x)
    value = ours(x, labels)
    assert_rel_close(value, expected, TOL, name + " value")
    for a, b in zip(torch.autograd.grad(value, [x, ours.proxies]), torch.autograd.grad(expected, [x, theirs.proxies])):
        assert_rel_close(a, b, TOL, name + " gradient")
    assert_rel_close(ours.get_logits(x), expected_logits, TOL, name + " get_logits")
    unreduced = mk.ProxyNCALoss(6, 10, reducer=reducers.DoNothingReducer(), distance=make_distance())
    unreduced.proxies.data.copy_(theirs.proxies.data.float())
    out = unreduced(x.detach().float(), labels)["loss"]
    assert torch.equal(out["indices"], torch.arange(40)) and out["losses"].shape == (40,)


def test_nca_module_defaults_and_keywords():
    module = mk.NCALoss()
    assert module.softmax_scale == 1 and module.reduction == "mean"
    assert str(module.distance_spec) == "LpDistance(normalize_embeddings=True, p=2, power=2)"
    with pytest.raises(NotImplementedError, match="distance=LpDistance.*p=3"):
        mk.NCALoss(distance=distances.LpDistance(p=3))
    with pytest.raises(NotImplementedError, match="indices_tuple"):
        mk.NCALoss()(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), (torch.tensor([0]),) * 3)
    assert "softmax_scale=2" in repr(mk.NCALoss(softmax_scale=2))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1"])
def test_softmax_scale_must_be_positive(bad):
    x, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises((ValueError, TypeError), match="softmax_scale"):
        mk.nca_loss(x, labels, softmax_scale=bad)
    with pytest.raises((ValueError, TypeError), match="softmax_scale"):
        mk.proxy_nca_loss(x, labels, torch.randn(3, 3), softmax_scale=bad)
    with pytest.raises((ValueError, TypeError), match="softmax_scale"):
        mk.NCALoss(softmax_scale=bad)
    with pytest.raises((ValueError, TypeError), match="softmax_scale"):
        mk.ProxyNCALoss(3, 3, softmax_scale=bad)


def test_proxy_nca_input_errors():
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        mk.proxy_nca_loss(x, torch.tensor([0, 0, 1, 1, 2, 3]), torch.randn(3, 3))
    with pytest.raises(ValueError, match="proxies must be C x 3"):
        mk.proxy_nca_loss(x, torch.tensor([0, 0, 1, 1, 2, 2]), torch.randn(3, 4))
    with pytest.raises(ValueError, match="ref_emb is not supported"):
        mk.ProxyNCALoss(3, 3)(x, torch.tensor([0, 0, 1, 1, 2, 2]), None, x, torch.tensor([0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match="distance must be one of"):
        mk.nca_loss(x, torch.tensor([0, 0, 1, 1, 2, 2]), distance="manhattan")


@pytest.mark.parametrize("reducer", ["AvgNonZeroReducer", "MeanReducer", "SumReducer", "PerAnchorReducer"])
def test_proxy_nca_reducers_equal_pml(reducer):
    """ProxyNCALoss's reducers against PML's, with a query whose probability underflows (left out) among them."""
    def make():
        return (reducers.PerAnchorReducer(reducers.SumReducer()) if reducer == "PerAnchorReducer"
                else getattr(reducers, reducer)())
    torch.manual_seed(3)
    theirs = losses.ProxyNCALoss(5, 6, softmax_scale=400.0, reducer=make()).double()
    ours = mk.ProxyNCALoss(5, 6, softmax_scale=400.0, reducer=make(), backend="reference").double()
    ours.proxies.data.copy_(theirs.proxies.data)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    x[0] = -theirs.proxies.data[2] + 1e-3 * torch.randn(6, generator=g, dtype=torch.float64)  # far from its proxy
    x.requires_grad_()
    # Every other query's label is its nearest proxy: their losses stay far from underflow (where PML's gradient is
    # NaN: its softmax backward divides by a subnormal probability).
    labels = torch.nn.functional.normalize(x.detach(), dim=1).matmul(
        torch.nn.functional.normalize(theirs.proxies.data, dim=1).T).argmax(dim=1)
    labels[0] = 2
    expected, value = theirs(x, labels), ours(x, labels)
    assert_rel_close(value, expected, TOL, reducer, scale_floor=FLOOR)
    for a, b in zip(torch.autograd.grad(value, [x, ours.proxies]), torch.autograd.grad(expected, [x, theirs.proxies])):
        assert_rel_close(a, b, TOL, reducer + " gradient", scale_floor=FLOOR)
    out = losses.ProxyNCALoss(5, 6, softmax_scale=400.0, reducer=reducers.DoNothingReducer()).double()
    out.proxies.data.copy_(theirs.proxies.data)
    assert 0 not in out(x, labels)["loss"]["indices"].tolist(), "PML leaves query 0 out"
