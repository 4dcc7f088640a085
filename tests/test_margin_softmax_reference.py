"""The margin-softmax classifiers (ArcFace, CosFace, SubCenterArcFace, NormalizedSoftmax, LargeMarginSoftmax,
SphereFace) on the reference backend equal pytorch-metric-learning's modules: through the functional API and through
our modules, values and gradients of the embeddings and of W, in float64 (1e-10) on seeded random cases (1..150 rows,
widths 2..64, C = 1, 2 and up to 100 classes, 1..3 sub-centres, margins and scales drawn at random, rows near their
class's column and near its opposite: ArcFace past its monotonic branch, angle > 180 degrees - margin;
LargeMarginSoftmax's and SphereFace's angle multiples 1..6, every branch of psi), and in float32 against PML in
float64 on the same rounded inputs (1e-5 values, 1e-4 gradients). Every reducer PML's element losses take,
get_logits and get_outliers equal PML's; NaN in gives NaN out; an empty batch gives 0 with zero gradients; C = 1
gives 0.
"""
import math

import pytest
import torch
from pytorch_metric_learning import losses, reducers

import metric_kernels as mk
from metric_kernels import backends
from metric_kernels.reference import margin_softmax_rows
from tests.helpers import assert_rel_close, class_weights, grads

TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}  # (value, gradients) against PML in fp64
LOSSES = ["arcface", "cosface", "subcenter_arcface", "normalized_softmax", "large_margin_softmax", "sphereface",
          "soft_triple"]
CLASS_NAMES = {"arcface": "ArcFaceLoss", "cosface": "CosFaceLoss", "subcenter_arcface": "SubCenterArcFaceLoss",
               "normalized_softmax": "NormalizedSoftmaxLoss", "large_margin_softmax": "LargeMarginSoftmaxLoss",
               "sphereface": "SphereFaceLoss", "soft_triple": "SoftTripleLoss"}
SEED_BASE = {"arcface": 0, "cosface": 10_000, "subcenter_arcface": 20_000, "normalized_softmax": 30_000,
             "large_margin_softmax": 60_000, "sphereface": 70_000, "soft_triple": 90_000}
MULTIPLE_ANGLE = ("large_margin_softmax", "sphereface")
CASES_PER_LOSS, BLOCKS = 48, 4


def _params(loss, g):
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()
    if loss == "normalized_softmax":
        return dict(temperature=u(0.01, 1.0))
    if loss == "soft_triple":  # centers pooled by softmax(cos / gamma); PML's margin on the pooled similarity
        return dict(centers_per_class=torch.randint(1, 5, (), generator=g).item(), la=u(1.0, 60.0),
                    gamma=u(0.02, 1.0), margin=u(-0.1, 0.5))
    if loss in MULTIPLE_ANGLE:  # the angle's multiple, given as an int or an integral float; logits scale |x| (|w|) cos
        margin = torch.randint(1, 7, (), generator=g).item()
        return dict(margin=float(margin) if margin % 2 else margin, scale=u(0.05, 3.0))
    scale = u(1.0, 100.0)
    if loss == "cosface":
        return dict(margin=u(-0.3, 1.0), scale=scale)
    # mostly ArcFace's usual margins, now and then one close to 180 degrees
    margin = u(0.0, 60.0) if torch.rand((), generator=g).item() < 0.8 else u(60.0, 179.0)
    params = dict(margin=margin, scale=scale)
    if loss == "subcenter_arcface":
        params["sub_centers"] = torch.randint(1, 4, (), generator=g).item()
    return params


def _case(loss, seed, max_rows=150, max_classes=100):
    """(x, labels, W, params): W D x (C K); half the classes have their sub-centres clustered around one direction,
    a quarter of the rows lie near their class's first column and a quarter near its opposite."""
    g = torch.Generator().manual_seed(SEED_BASE[loss] + seed)
    params = _params(loss, g)
    k = _k(params)
    n = torch.randint(1, max_rows + 1, (), generator=g).item()
    dim = torch.randint(2, 65, (), generator=g).item()
    classes = (1, 2, None, None)[seed % 4] or torch.randint(3, max_classes + 1, (), generator=g).item()
    weight = torch.randn(dim, classes * k, generator=g, dtype=torch.float64)
    clustered = (torch.rand(classes, generator=g) < 0.5).repeat_interleave(k)
    centres = torch.randn(dim, classes, generator=g, dtype=torch.float64).repeat_interleave(k, dim=1)
    weight = torch.where(clustered, centres + 0.1 * weight, weight)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    where = torch.rand(n, 1, generator=g)
    anchor = weight[:, labels * k].T + 0.05 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    x = torch.where(where < 0.25, anchor, torch.where(where < 0.5, -anchor, x))
    return x, labels, weight, params


def _pml_module(loss, params, classes, dim, dtype=torch.float64, **keywords):
    cls = getattr(losses, CLASS_NAMES[loss])
    return cls(num_classes=classes, embedding_size=dim, **params, **keywords).to(dtype)


def _our_module(loss, params, classes, dim, dtype=torch.float64, **keywords):
    cls = getattr(mk, CLASS_NAMES[loss])
    return cls(num_classes=classes, embedding_size=dim, **params, backend="reference", **keywords).to(dtype)


def _with_weight(module, weight):
    with torch.no_grad():
        class_weights(module).copy_(weight)
    return module


def _k(params):
    """Columns per class: SubCenterArcFace's sub_centers, SoftTriple's centers_per_class, else 1."""
    return params.get("sub_centers", params.get("centers_per_class", 1))


def _pool(params):
    """The backend's pool_scale: SoftTriple's 1 / gamma, else 0 (the largest sub-centre)."""
    return 1.0 / params["gamma"] if "gamma" in params else 0.0


def _classes(weight, params):
    return weight.shape[1] // _k(params)


def _logit_scale(loss, params, x, weight):
    """The size of the logits: scale (1 / temperature) times, for the classifiers that leave a side raw, the largest
    norms of that side (LargeMarginSoftmax: |x| |w|; SphereFace: |x|)."""
    size = params["scale"] if "scale" in params else params["la"] if "la" in params else 1 / params["temperature"]
    if loss in MULTIPLE_ANGLE:
        size *= torch.linalg.vector_norm(x.detach(), dim=1).max().item() if x.shape[0] else 1.0
    if loss == "large_margin_softmax":
        size *= torch.linalg.vector_norm(weight.detach(), dim=0).max().item()
    return size


def _raw_norms(loss, x, weight):
    """(largest |x_i|, largest |w_c|) for the classifiers whose logits scale with the raw sides' norms, else None."""
    if loss not in MULTIPLE_ANGLE or x.shape[0] == 0:
        return None
    return (torch.linalg.vector_norm(x.detach(), dim=1).max().item(),
            torch.linalg.vector_norm(weight.detach(), dim=0).max().item())


def _assert_same(ours, our_inputs, expected, expected_inputs, dtype, what, logit_scale, raw_norms=None):
    """Values relative to max(|loss|, 1e-4 logit_scale) and gradients (each input's) relative to max(its gradient,
    1e-3 of that). Each row's loss is PML's log-sum-exp of logits of size logit_scale minus the label's logit, so
    both sides round it to about eps * logit_scale: a loss far below the logits' size (every row well classified)
    is compared at the precision PML computes it with. raw_norms (LargeMarginSoftmax, SphereFace): the logits are
    homogeneous in the raw rows (and LargeMarginSoftmax's raw columns), so a logit's gradient has the size
    logit_scale / |input| (SphereFace's columns too: scale |x| / |w|); each input's gradient floor is at least 1e-3
    of that, the size at which PML's fp32 gradients of a well-classified row are rounded (measured on the fp32
    cases: within 1e-6 of it, PML's and ours alike)."""
    value_tol, grad_tol = TOLERANCE[dtype]
    assert ours.dtype == dtype, what
    size = max(ours.detach().abs().max().item(), expected.detach().abs().max().item(), 1e-4 * logit_scale)
    assert_rel_close(ours, expected, value_tol, f"{what} value", scale_floor=size)
    floors = [1e-3 * size] * len(our_inputs)
    if raw_norms is not None:
        floors = [max(floor, 1e-3 * logit_scale / norm) for floor, norm in zip(floors, raw_norms)]
    for index, (a, b) in enumerate(zip(grads(ours, our_inputs), grads(expected, expected_inputs))):
        assert_rel_close(a, b, grad_tol, f"{what} grad {index}", scale_floor=floors[index])


def _past_the_monotonic_branch(x, labels, weight, params):
    """How many rows' label angles exceed 180 degrees - margin (ArcFace's second branch)."""
    _, target = margin_softmax_rows(x, weight, labels, scale=1.0, sub_centers=_k(params),
                                    pool_scale=_pool(params))
    return int((torch.acos(target.clamp(-1, 1)) > math.pi - math.radians(params["margin"])).sum())


@pytest.mark.parametrize("block", range(BLOCKS))
@pytest.mark.parametrize("loss", LOSSES)
def test_reference_equals_pml_float64(loss, block):
    per_block = CASES_PER_LOSS // BLOCKS
    past = 0
    for seed in range(block * per_block, (block + 1) * per_block):
        x, labels, weight, params = _case(loss, seed)
        classes, dim = _classes(weight, params), x.shape[1]
        what = f"{loss} seed={seed} N={x.shape[0]} D={dim} C={classes} {params}"
        x.requires_grad_()
        theirs = _with_weight(_pml_module(loss, params, classes, dim), weight)
        expected = theirs(x, labels)
        w = weight.clone().requires_grad_()
        ours = getattr(mk, f"{loss}_loss")(x, labels, w, backend="reference", **params)
        _assert_same(ours, [x, w], expected, [x, class_weights(theirs)], torch.float64, f"{what} functional",
                     _logit_scale(loss, params, x, weight), _raw_norms(loss, x, weight))
        module = _with_weight(_our_module(loss, params, classes, dim), weight)
        _assert_same(module(x, labels), [x, class_weights(module)], expected, [x, class_weights(theirs)], torch.float64,
                     f"{what} module", _logit_scale(loss, params, x, weight), _raw_norms(loss, x, weight))
        if loss in ("arcface", "subcenter_arcface"):
            past += _past_the_monotonic_branch(x.detach(), labels, weight, params)
    if loss == "arcface":
        assert past > 0, "no row reached ArcFace's second branch"


@pytest.mark.parametrize("loss", LOSSES)
def test_reference_float32_against_pml_float64(loss):
    """fp32 in, fp32 out, within 1e-5 (values) and 1e-4 (gradients) of PML in float64 on the same rounded inputs;
    PML's own fp32 result passes the same bounds."""
    for seed in range(100, 112):
        x, labels, weight, params = _case(loss, seed)
        # Rows whose label cosine is within 1e-5 of +-1 are left out: there acos's derivative amplifies fp32's
        # rounding of the cosine past 1e-4, and a cosine rounded to exactly +-1 has an infinite one (PML's too, see
        # test_arcface_gradient_at_a_cosine_of_one_is_pmls_nan).
        _, target = margin_softmax_rows(x, weight, labels, scale=1.0, sub_centers=_k(params),
                                    pool_scale=_pool(params))
        keep = target.abs() < 1 - 1e-5
        x, labels = x[keep], labels[keep]
        x32, w32 = x.float().requires_grad_(), weight.float()
        classes, dim = _classes(weight, params), x.shape[1]
        what = f"{loss} seed={seed} N={x.shape[0]} D={dim} C={classes} {params}"
        x64 = x32.detach().double().requires_grad_()
        truth_module = _with_weight(_pml_module(loss, params, classes, dim), w32.double())
        truth = truth_module(x64, labels)
        theirs32 = _with_weight(_pml_module(loss, params, classes, dim, torch.float32), w32)
        _assert_same(theirs32(x32, labels), [x32, class_weights(theirs32)], truth, [x64, class_weights(truth_module)],
                     torch.float32, f"{what} PML fp32", _logit_scale(loss, params, x, weight),
                     _raw_norms(loss, x, weight))
        w = w32.clone().requires_grad_()
        ours = getattr(mk, f"{loss}_loss")(x32, labels, w, backend="reference", **params)
        _assert_same(ours, [x32, w], truth, [x64, class_weights(truth_module)], torch.float32, f"{what} functional",
                     _logit_scale(loss, params, x, weight), _raw_norms(loss, x, weight))
        module = _with_weight(_our_module(loss, params, classes, dim, torch.float32), w32)
        _assert_same(module(x32, labels), [x32, class_weights(module)], truth, [x64, class_weights(truth_module)],
                     torch.float32, f"{what} module", _logit_scale(loss, params, x, weight),
                     _raw_norms(loss, x, weight))


# Parameters under which well-classified rows round to exactly 0 in float64, so that AvgNonZeroReducer's count
# matters: a large scale (small temperature) and rows on their class's column.
ZERO_ROW_PARAMS = {"arcface": dict(margin=20.0, scale=300.0), "cosface": dict(margin=0.2, scale=300.0),
                   "subcenter_arcface": dict(margin=20.0, scale=300.0, sub_centers=2),
                   "normalized_softmax": dict(temperature=0.004),
                   "large_margin_softmax": dict(margin=3, scale=30.0), "sphereface": dict(margin=4, scale=150.0),
                   "soft_triple": dict(centers_per_class=2, la=2000.0, gamma=0.1, margin=0.01)}
REDUCERS = {"Mean": reducers.MeanReducer, "Sum": reducers.SumReducer, "AvgNonZero": reducers.AvgNonZeroReducer,
            "ThresholdLow0": lambda: reducers.ThresholdReducer(low=0), "DoNothing": reducers.DoNothingReducer,
            "PerAnchorMean": reducers.PerAnchorReducer,
            "PerAnchorAvgNonZero": lambda: reducers.PerAnchorReducer(reducers.AvgNonZeroReducer())}
FUNCTIONAL_REDUCTION = {"Mean": "mean", "Sum": "sum", "AvgNonZero": "mean_nonzero", "ThresholdLow0": "mean_nonzero",
                        "PerAnchorMean": "mean", "PerAnchorAvgNonZero": "mean_nonzero", "DoNothing": "none"}


def _zero_row_case(loss, seed):
    """A case whose first half of rows lie on their class's first column (loss exactly 0 in float64)."""
    params = ZERO_ROW_PARAMS[loss]
    g = torch.Generator().manual_seed(40_000 + seed)
    k, classes, dim, n = _k(params), 12, 32, 40
    weight = torch.randn(dim, classes * k, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    x[: n // 2] = 2 * weight[:, labels[: n // 2] * k].T
    return x, labels, weight, params


@pytest.mark.parametrize("reducer", REDUCERS)
@pytest.mark.parametrize("loss", LOSSES)
def test_every_reducer_equals_pml(loss, reducer):
    for seed in range(3):
        x, labels, weight, params = _zero_row_case(loss, seed)
        x.requires_grad_()
        classes, dim = _classes(weight, params), x.shape[1]
        what = f"{loss} {reducer} seed={seed}"
        theirs = _with_weight(_pml_module(loss, params, classes, dim, reducer=REDUCERS[reducer]()), weight)
        ours = _with_weight(_our_module(loss, params, classes, dim, reducer=REDUCERS[reducer]()), weight)
        expected, value = theirs(x, labels), ours(x, labels)
        w = weight.clone().requires_grad_()
        functional = getattr(mk, f"{loss}_loss")(x, labels, w, reduction=FUNCTIONAL_REDUCTION[reducer],
                                                 backend="reference", **params)
        if reducer == "DoNothing":
            rows = expected["loss"]["losses"]
            assert (rows == 0).any() and (rows > 0).any(), what  # the case tells AvgNonZero from Mean
            assert value.keys() == expected.keys() and value["loss"]["reduction_type"] == "element"
            assert torch.equal(value["loss"]["indices"], expected["loss"]["indices"])
            value, expected = value["loss"]["losses"], rows
        _assert_same(value, [x, class_weights(ours)], expected, [x, class_weights(theirs)], torch.float64,
                     f"{what} module", _logit_scale(loss, params, x, weight), _raw_norms(loss, x, weight))
        _assert_same(functional, [x, w], expected, [x, class_weights(theirs)], torch.float64, f"{what} functional",
                     _logit_scale(loss, params, x, weight), _raw_norms(loss, x, weight))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss", LOSSES)
def test_get_logits_equals_pml(loss, dtype):
    for seed in range(4):
        x, labels, weight, params = _case(loss, 200 + seed, max_rows=40, max_classes=30)
        classes, dim = _classes(weight, params), x.shape[1]
        theirs = _with_weight(_pml_module(loss, params, classes, dim, dtype), weight)
        ours = _with_weight(_our_module(loss, params, classes, dim, dtype), weight)
        x = x.to(dtype)
        expected, logits = theirs.get_logits(x), ours.get_logits(x)
        assert logits.shape == (x.shape[0], classes) and logits.dtype == dtype
        assert_rel_close(logits, expected, TOLERANCE[dtype][0], f"{loss} seed={seed} get_logits")


def _outlier_case(seed):
    """Classes of three sub-centres; most rows near one sub-centre of their class, some far from all."""
    g = torch.Generator().manual_seed(50_000 + seed)
    classes, k, dim, n = 6, 3, 16, 90
    weight = torch.randn(dim, classes * k, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes - 1, (n,), generator=g)  # the last class is absent
    pick = labels * k + torch.randint(0, k, (n,), generator=g)
    spread = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2
    x = weight[:, pick].T + spread * torch.randn(n, dim, generator=g, dtype=torch.float64)
    return x, labels, weight, classes, k


@pytest.mark.parametrize("threshold", [30, 60, 75])
def test_get_outliers_equals_pml(threshold):
    for seed in range(3):
        x, labels, weight, classes, k = _outlier_case(seed)
        params = dict(sub_centers=k)
        theirs = _with_weight(_pml_module("subcenter_arcface", params, classes, x.shape[1]), weight)
        ours = _with_weight(_our_module("subcenter_arcface", params, classes, x.shape[1]), weight)
        expected_outliers, expected_centers = theirs.get_outliers(x, labels, threshold=threshold)
        outliers, centers = ours.get_outliers(x, labels, threshold=threshold)
        assert torch.equal(outliers, expected_outliers), f"seed={seed} threshold={threshold}"
        assert 0 < outliers.numel() < x.shape[0] or threshold == 75
        present = torch.unique(labels)
        assert torch.equal(centers[:, present], expected_centers[:, present])  # PML leaves the others uninitialised
        assert (centers[:, classes - 1] == 0).all()
        # PML returns the pair whatever return_dominant_centers says, and so do we
        assert len(ours.get_outliers(x, labels, threshold, return_dominant_centers=False)) == 2


@pytest.mark.parametrize("loss", LOSSES)
def test_empty_batch_is_zero_with_zero_gradients(loss):
    _, _, weight, params = _case(loss, 1)
    x = torch.empty(0, weight.shape[0], dtype=torch.float64, requires_grad=True)
    w = weight.clone().requires_grad_()
    labels = torch.empty(0, dtype=torch.long)
    for reduction in ("mean", "sum", "mean_nonzero"):
        value = getattr(mk, f"{loss}_loss")(x, labels, w, reduction=reduction, backend="reference", **params)
        assert value.shape == () and value.item() == 0 and value.requires_grad
        dx, dw = torch.autograd.grad(value, [x, w])
        assert dx.shape == x.shape and (dw == 0).all()
    rows = getattr(mk, f"{loss}_loss")(x, labels, w, reduction="none", backend="reference", **params)
    assert rows.shape == (0,) and rows.dtype == torch.float64


@pytest.mark.parametrize("loss", LOSSES)
def test_one_class_is_zero_with_zero_gradients(loss):
    """With C = 1 there is no other class: lse_other is -inf and every row's loss is 0 (PML's cross-entropy too),
    with finite zero gradients."""
    x, labels, weight, params = _case(loss, 0)  # seed % 4 == 0: one class
    assert _classes(weight, params) == 1
    x.requires_grad_()
    w = weight.clone().requires_grad_()
    rows = getattr(mk, f"{loss}_loss")(x, labels, w, reduction="none", backend="reference", **params)
    assert (rows == 0).all()
    dx, dw = torch.autograd.grad(rows.sum(), [x, w])
    assert (dx == 0).all() and (dw == 0).all()


@pytest.mark.parametrize("where", ["embeddings", "weight"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("loss", LOSSES)
def test_nonfinite_input_gives_nan(loss, bad, where):
    x, labels, weight, params = _case(loss, 3)
    target = x if where == "embeddings" else weight
    target[-1, -1] = bad  # a row or column the loss may not even read (a W column of no label)
    for reduction in ("mean", "sum", "mean_nonzero"):
        value = getattr(mk, f"{loss}_loss")(x, labels, weight, reduction=reduction, backend="reference", **params)
        assert value.isnan(), f"{reduction}: {value}"


def test_the_nonfinite_guard_sums_half_rows_in_float32():
    """The guard is 0 for finite half rows whose fp16 sum would overflow (a normalising backend hands it the raw
    rows), NaN for a NaN or Inf among them."""
    from metric_kernels.functional import _nonfinite_guard
    for half in (torch.float16, torch.bfloat16):
        rows = torch.ones(1000, 100, dtype=half)
        assert torch.isinf(rows.sum()) or half == torch.bfloat16
        assert _nonfinite_guard(rows, rows).item() == 0
        for bad in (float("nan"), float("inf")):
            broken = rows.clone()
            broken[3, 4] = bad
            assert _nonfinite_guard(rows, broken).isnan()


@pytest.mark.parametrize("loss", LOSSES)
def test_half_inputs_give_float32(loss):
    x, labels, weight, params = _case(loss, 5, max_rows=30, max_classes=20)
    fn = getattr(mk, f"{loss}_loss")
    for half in (torch.float16, torch.bfloat16):
        xh, wh = x.to(half), weight.to(half)
        expected = fn(xh.float(), labels, wh.float(), backend="reference", **params)
        for w in (wh, wh.float()):
            value = fn(xh, labels, w, backend="reference", **params)
            assert value.dtype == torch.float32
            assert_rel_close(value, expected, 0, f"{half} weight {w.dtype}")


@pytest.mark.parametrize("loss", LOSSES)
def test_a_backend_without_margin_softmax_rows(loss, monkeypatch):
    """backend="auto" passes over a backend that lacks margin_softmax_rows; naming it raises NotImplementedError."""
    class Partial:  # a backend that computes every other loss
        @staticmethod
        def unavailable_reason(device):
            return None

    monkeypatch.setitem(backends._LOADED, "cpu", (Partial, None))
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    x, labels, weight, params = _case(loss, 7, max_rows=20, max_classes=10)
    fn = getattr(mk, f"{loss}_loss")
    assert_rel_close(fn(x, labels, weight, **params), fn(x, labels, weight, backend="reference", **params), 0, "auto")
    with pytest.raises(NotImplementedError, match="margin_softmax"):
        fn(x, labels, weight, backend="cpu", **params)


def test_arcface_margin_is_degrees_and_the_module_stores_radians():
    """arcface_loss(margin=28.6) is ArcFaceLoss(margin=28.6), whose `margin` holds radians as PML's does; a module
    whose margin is changed afterwards computes with the new value, as PML's."""
    x, labels, weight, _ = _case("arcface", 6)
    module = _with_weight(mk.ArcFaceLoss(weight.shape[1], x.shape[1], margin=40.0, backend="reference").double(),
                          weight)
    assert module.margin == math.radians(40.0) == losses.ArcFaceLoss(2, 2, margin=40.0).margin
    expected = mk.arcface_loss(x, labels, weight, margin=40.0, backend="reference")
    assert_rel_close(module(x, labels), expected, 0, "degrees")
    module.margin = math.radians(10.0)
    assert_rel_close(module(x, labels), mk.arcface_loss(x, labels, weight, margin=10.0, backend="reference"), 0,
                     "changed")
    assert not torch.equal(expected, module(x, labels))


@pytest.mark.parametrize("loss", ["arcface", "subcenter_arcface"])
def test_arcface_gradient_at_a_cosine_of_one_is_pmls_nan(loss):
    """PML's acos(clamp(cos, -1, 1)) has an infinite derivative where a label's cosine is exactly +-1 (always, with
    D = 1): its gradient is NaN there, even though the loss is finite. Computed with PML's ops, ours is too."""
    params = dict(margin=28.6, scale=64.0, **(dict(sub_centers=2) if loss == "subcenter_arcface" else {}))
    g = torch.Generator().manual_seed(9)
    x = torch.randn(8, 1, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 3 * params.get("sub_centers", 1), generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (8,), generator=g)
    theirs = _with_weight(_pml_module(loss, params, 3, 1), weight)
    expected = theirs(x, labels)
    ours = getattr(mk, f"{loss}_loss")(x, labels, weight, backend="reference", **params)
    assert_rel_close(ours, expected, 1e-10, "value")
    assert torch.isfinite(ours)
    (ours_grad,), (their_grad,) = grads(ours, [x]), grads(expected, [x])
    assert their_grad.isnan().any() and torch.equal(ours_grad.isnan(), their_grad.isnan())


@pytest.mark.parametrize("loss", MULTIPLE_ANGLE)
def test_multiple_angle_covers_every_branch_and_pins_pmls_truncation(loss):
    """Every branch k = 0 .. m - 1 of psi(theta) = (-1)^k cos(m theta) - 2k is reached by some row of a case that
    equals PML; a fractional margin, which PML truncates with int() (2.5 acts as 2), is refused here with a
    ValueError naming it, and an integral float equals the int."""
    multiplier = 5
    g = torch.Generator().manual_seed(80_000)
    dim, classes, n = 6, 4, 400
    weight = torch.randn(dim, classes, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64, requires_grad=True)
    _, target = margin_softmax_rows(x.detach(), weight, labels, scale=1.0, sub_centers=1)
    branches = torch.floor(torch.acos(target.clamp(-1, 1)) / (math.pi / multiplier)).unique().tolist()
    assert branches == list(range(multiplier)), branches
    params = dict(margin=multiplier, scale=0.5)
    theirs = _with_weight(_pml_module(loss, params, classes, dim), weight)
    w = weight.clone().requires_grad_()
    ours = getattr(mk, f"{loss}_loss")(x, labels, w, backend="reference", **params)
    _assert_same(ours, [x, w], theirs(x, labels), [x, class_weights(theirs)], torch.float64, loss,
                 _logit_scale(loss, params, x, weight), _raw_norms(loss, x, weight))
    assert getattr(mk, f"{loss}_loss")(x, labels, w, margin=5.0, scale=0.5, backend="reference").item() == ours.item()
    truncated = _with_weight(_pml_module(loss, dict(margin=2.5, scale=0.5), classes, dim), weight)
    as_two = _with_weight(_pml_module(loss, dict(margin=2, scale=0.5), classes, dim), weight)
    assert truncated.margin == 2 and truncated(x, labels).item() == as_two(x, labels).item()
    for bad in (2.5, 0, -3):
        with pytest.raises(ValueError, match="margin"):
            getattr(mk, f"{loss}_loss")(x, labels, w, margin=bad, backend="reference")
        with pytest.raises(ValueError, match="margin"):
            getattr(mk, CLASS_NAMES[loss])(classes, dim, margin=bad)
    with pytest.raises(TypeError, match="margin"):
        getattr(mk, f"{loss}_loss")(x, labels, w, margin="4", backend="reference")
    assert getattr(mk, CLASS_NAMES[loss])(classes, dim, margin=4.0).margin == 4
