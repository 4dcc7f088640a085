"""Edge cases of SPEC.md: empty and one-row batches, one class, all-distinct labels, identical embeddings,
non-contiguous inputs, half precision with large scales, NaN and Inf inputs."""
import math

import pytest
import torch

import metric_kernels as mk
from metric_kernels import pml
from tests.helpers import assert_grads_close, assert_rel_close, grads

PAIR_LOSSES = ["circle", "supcon", "multi_similarity", "ntxent", "tuplet_margin", "contrastive",
               "generalized_lifted_structure", "margin", "nca", "batch_hard_triplet", "angular", "lifted_structure"]
REDUCTIONS = ["mean_nonzero", "mean", "sum", "none"]


def pair_loss(name):
    return getattr(mk, f"{name}_loss")


def proxy_loss(x, labels, **kwargs):
    proxies = torch.randn(5, x.shape[1], dtype=x.dtype, requires_grad=True)
    return mk.proxy_anchor_loss(x, labels, proxies, **kwargs), proxies


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", PAIR_LOSSES)
@pytest.mark.parametrize("rows", [0, 1])
def test_empty_and_single_row_batches_give_connected_zero(loss, reduction, rows):
    x = torch.randn(rows, 8, dtype=torch.float64, requires_grad=True)
    out = pair_loss(loss)(x, torch.zeros(rows, dtype=torch.long), reduction=reduction)
    assert out.shape == ((rows,) if reduction == "none" else ())
    assert torch.all(out == 0)
    (g,) = torch.autograd.grad(out.sum(), x)  # connected: backward works and gives zeros
    assert g.shape == x.shape and torch.all(g == 0)


@pytest.mark.parametrize("loss", PAIR_LOSSES)
def test_references_without_rows(loss):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(0, 4, dtype=torch.float64, requires_grad=True)
    out = pair_loss(loss)(x, torch.tensor([0, 1, 0]), y, torch.zeros(0, dtype=torch.long))
    assert out.item() == 0
    gx, gy = torch.autograd.grad(out, [x, y])
    assert torch.all(gx == 0) and gy.shape == (0, 4)


def test_proxy_anchor_on_empty_and_single_row_batches():
    for rows in (0, 1):
        x = torch.randn(rows, 6, dtype=torch.float64, requires_grad=True)
        labels = torch.full((rows,), 2)
        out, proxies = proxy_loss(x, labels)
        expected = pml.proxy_anchor_loss(x, labels, proxies) if rows else None
        if rows == 0:
            assert out.item() == 0
            assert torch.all(torch.autograd.grad(out, proxies)[0] == 0)
        else:
            assert_rel_close(out, expected, 1e-10, "one row")
            assert_grads_close(out, expected, [x, proxies], 1e-10, "one row")


@pytest.mark.parametrize("labels", ["one_class", "all_distinct"])
def test_multi_similarity_one_class_and_all_distinct(labels):
    """Multi-Similarity's two sides are independent (PML's too): one class leaves the positives' term, all-distinct
    labels the negatives' term; neither is 0."""
    x = torch.randn(17, 8, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(17, dtype=torch.long) if labels == "one_class" else torch.arange(17)
    out, expected = mk.multi_similarity_loss(x, y), pml.multi_similarity_loss(x, y)
    assert out.item() > 0
    assert_rel_close(out, expected, 1e-10, labels)
    assert_grads_close(out, expected, [x], 1e-10, labels)


# (Multi-Similarity's, Contrastive's and the lifted structure's sides are each a loss of its own; NCA without a
# positive: its own test)
@pytest.mark.parametrize("loss", [name for name in PAIR_LOSSES if name not in (
    "multi_similarity", "contrastive", "generalized_lifted_structure", "nca")])
@pytest.mark.parametrize("labels", ["one_class", "all_distinct"])
def test_pair_losses_are_zero_without_positives_or_negatives(loss, labels):
    n = 17
    x = torch.randn(n, 8, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(n, dtype=torch.long) if labels == "one_class" else torch.arange(n)
    out = pair_loss(loss)(x, y, reduction="none")
    assert torch.all(out == 0)
    expected = getattr(pml, f"{loss}_loss")(x, y)
    assert expected.item() == 0 and pair_loss(loss)(x, y).item() == 0
    assert torch.all(torch.autograd.grad(pair_loss(loss)(x, y), x)[0] == 0)


@pytest.mark.parametrize("labels", ["one_class", "all_distinct"])
def test_proxy_anchor_one_class_and_all_distinct(labels):
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(5, dtype=torch.long) if labels == "one_class" else torch.arange(5)
    out, proxies = proxy_loss(x, y)
    expected = pml.proxy_anchor_loss(x, y, proxies)
    assert_rel_close(out, expected, 1e-10, labels)
    assert_grads_close(out, expected, [x, proxies], 1e-10, labels)


@pytest.mark.parametrize("loss", PAIR_LOSSES + ["proxy_anchor"])
def test_identical_embeddings(loss):
    """PML forms its Euclidean distances with torch.cdist, which on identical rows can give 1e-8 instead of 0: it runs
    with exact distances here (metric_kernels.pml.exact_cdist), as in the other comparisons."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 8, generator=g, dtype=torch.float64).repeat(12, 1).requires_grad_()
    labels = torch.tensor([0, 1, 2] * 4)
    if loss == "proxy_anchor":
        torch.manual_seed(8)
        out, proxies = proxy_loss(x, labels)
        expected = pml.proxy_anchor_loss(x, labels, proxies)
        inputs = [x, proxies]
    else:
        out = pair_loss(loss)(x, labels)
        with pml.exact_cdist():
            expected = getattr(pml, f"{loss}_loss")(x, labels)
        inputs = [x]
    assert torch.isfinite(out)
    assert_rel_close(out, expected, 1e-10, "value")
    for g in grads(out, inputs):
        assert torch.all(torch.isfinite(g))
    if loss == "batch_hard_triplet":  # every distance is 0: loss = margin, and a zero distance has zero gradient
        assert out.item() == pytest.approx(0.05)
        assert torch.all(grads(out, [x])[0] == 0)
    elif loss == "tuplet_margin":  # PML's gradient is NaN at angle 0 (tests/test_reference_vs_pml.py pins ours)
        assert_grads_close(out, pair_loss(loss)(x, labels, backend="reference"), inputs, 1e-10, "identical")
    else:
        assert_grads_close(out, expected, inputs, 1e-10, "identical")


@pytest.mark.parametrize("loss", PAIR_LOSSES)
def test_non_contiguous_inputs(loss):
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(30, 32, generator=g, dtype=torch.float64)
    x = wide[::2, ::4]  # strided rows and columns
    y = torch.randn(16, 25, generator=g, dtype=torch.float64).T[:, :8]  # transposed
    labels = torch.randint(0, 3, (45,), generator=g)[::3]
    y_labels = torch.randint(0, 3, (25,), generator=g)
    assert not x.is_contiguous() and not y.is_contiguous() and not labels.is_contiguous()
    fn = pair_loss(loss)
    assert_rel_close(fn(x, labels, y, y_labels), fn(x.contiguous(), labels.contiguous(), y.contiguous(), y_labels),
                     1e-12, "ref")
    assert_rel_close(fn(x, labels), fn(x.contiguous(), labels.contiguous()), 1e-12, "self")


def test_proxy_anchor_non_contiguous():
    x = torch.randn(20, 16, dtype=torch.float64)[::2, ::2]
    proxies = torch.randn(8, 6, dtype=torch.float64).T
    labels = torch.randint(0, 6, (10,))
    assert_rel_close(mk.proxy_anchor_loss(x, labels, proxies),
                     mk.proxy_anchor_loss(x.contiguous(), labels, proxies.contiguous()), 1e-12, "proxy")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", ["circle", "supcon", "batch_hard_triplet", "proxy_anchor"])
def test_half_inputs_with_large_scales_are_finite_and_computed_in_fp32(loss, dtype):
    """gamma 256..300 (Circle), temperature 0.01 (SupCon), alpha 256 (Proxy-Anchor): exp() of such logits overflows
    fp16 and bf16, so the computation must happen in fp32; the result is fp32 and near the float64 result of the
    same (rounded) inputs."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 32, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, 4, (64,), generator=g)
    x64 = x.detach().double().requires_grad_()
    for scale in (256.0, 300.0):
        if loss == "circle":
            run = lambda e: mk.circle_loss(e, labels, gamma=scale)
        elif loss == "supcon":
            run = lambda e: mk.supcon_loss(e, labels, temperature=1 / scale)
        elif loss == "batch_hard_triplet":
            run = lambda e: mk.batch_hard_triplet_loss(e, labels, margin=scale / 1000)
        else:
            proxies = torch.randn(4, 32, generator=g).to(dtype)
            run = lambda e: mk.proxy_anchor_loss(e, labels, proxies.to(e.dtype), alpha=scale)
        out, expected = run(x), run(x64)
        assert out.dtype == torch.float32 and torch.isfinite(out)
        assert_rel_close(out, expected, 1e-4, f"{loss} {dtype} scale {scale}")
        (gx,) = torch.autograd.grad(out, x)
        assert gx.dtype == dtype and torch.all(torch.isfinite(gx))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", PAIR_LOSSES)
@pytest.mark.parametrize("where", ["query_without_positive", "reference", "single_row"])
def test_nan_or_inf_inputs_never_give_a_finite_loss(loss, reduction, where, bad):
    x = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 3])  # rows 4 and 5 have no positive: their loss is left out
    y, y_labels = None, None
    if where == "query_without_positive":
        x[5, 1] = bad
    elif where == "reference":
        y, y_labels = torch.randn(4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
        y[3, 0] = bad
    else:
        x, labels = torch.full((1, 4), bad, dtype=torch.float64), torch.tensor([0])
    out = pair_loss(loss)(x, labels, y, y_labels, reduction=reduction)
    assert torch.isnan(out).any() if reduction == "none" else torch.isnan(out)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["embeddings", "proxies"])
def test_proxy_anchor_nan_or_inf_gives_nan(where, bad):
    x = torch.randn(4, 4)
    proxies = torch.randn(3, 4)
    (x if where == "embeddings" else proxies)[0, 0] = bad
    assert torch.isnan(mk.proxy_anchor_loss(x, torch.tensor([0, 0, 1, 1]), proxies))


@pytest.mark.parametrize("loss", PAIR_LOSSES)
def test_integer_label_dtypes_and_large_label_values(loss):
    x = torch.randn(20, 8, dtype=torch.float64)
    labels = torch.randint(0, 4, (20,))
    expected = pair_loss(loss)(x, labels)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert_rel_close(pair_loss(loss)(x, labels.to(dtype)), expected, 0, str(dtype))
    assert_rel_close(pair_loss(loss)(x, labels * (2**40) - 2**50), expected, 0, "large label values")


def test_proxy_anchor_is_accurate_for_tiny_terms():
    """One proxy whose only positive sits far inside the margin: the loss is log(1 + e^-28.8) = 3.1e-13. PML's
    logsumexp-with-a-zero rounds 1 + 3.1e-13 and keeps only 4 digits; the reference (and every backend) keeps all."""
    x, proxies = torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    exact = math.log1p(math.exp(-32.0 * (1.0 - 0.1)))
    ours = mk.proxy_anchor_loss(x, torch.tensor([0]), proxies, backend="reference")
    assert abs(ours.item() - exact) <= 1e-15 * exact
    assert abs(pml.proxy_anchor_loss(x, torch.tensor([0]), proxies).item() - exact) > 1e-6 * exact
