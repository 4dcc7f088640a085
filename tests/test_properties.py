"""Property tests (hypothesis): the losses do not depend on the order of the batch, on the names of the labels, or
(for the cosine losses) on the length of each embedding."""
import torch
from hypothesis import given, settings, strategies as st

import metric_kernels as mk
from tests.helpers import assert_rel_close

TOL = 1e-10
PAIR = ["circle", "supcon", "ntxent", "tuplet_margin", "contrastive", "generalized_lifted_structure", "margin", "nca",
        "batch_hard_triplet", "angular", "lifted_structure"]


@st.composite
def batches(draw):
    n = draw(st.integers(1, 40))
    dim = draw(st.integers(2, 16))
    classes = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    return x, labels, g


@settings(max_examples=40, deadline=None)
@given(batches(), st.sampled_from(PAIR), st.sampled_from(["mean_nonzero", "mean", "sum", "none"]))
def test_permuting_the_batch(batch, loss, reduction):
    x, labels, g = batch
    permutation = torch.randperm(x.shape[0], generator=g)
    fn = getattr(mk, f"{loss}_loss")
    before = fn(x, labels, reduction=reduction)
    after = fn(x[permutation], labels[permutation], reduction=reduction)
    assert_rel_close(after, before[permutation] if reduction == "none" else before, TOL, loss)


@settings(max_examples=30, deadline=None)
@given(batches())
def test_permuting_the_batch_proxy_anchor(batch):
    x, labels, g = batch
    proxies = torch.randn(6, x.shape[1], generator=g, dtype=torch.float64)
    permutation = torch.randperm(x.shape[0], generator=g)
    assert_rel_close(mk.proxy_anchor_loss(x[permutation], labels[permutation], proxies),
                     mk.proxy_anchor_loss(x, labels, proxies), TOL, "proxy_anchor")


@settings(max_examples=40, deadline=None)
@given(batches(), st.sampled_from(PAIR))
def test_renaming_the_labels(batch, loss):
    x, labels, g = batch
    renamed = torch.randperm(1000, generator=g)[labels] * 7 - 3000  # any injective map, negatives included
    fn = getattr(mk, f"{loss}_loss")
    assert_rel_close(fn(x, renamed, reduction="none"), fn(x, labels, reduction="none"), 0, loss)


@settings(max_examples=40, deadline=None)
@given(batches(), st.sampled_from(["circle", "supcon", "batch_hard_triplet", "proxy_anchor"]))
def test_scaling_embeddings_leaves_normalised_losses_unchanged(batch, loss):
    x, labels, g = batch
    scales = torch.exp(4 * torch.rand(x.shape[0], 1, generator=g, dtype=torch.float64) - 2)  # 0.14 .. 7.4
    if loss == "proxy_anchor":
        proxies = torch.randn(6, x.shape[1], generator=g, dtype=torch.float64)
        fn = lambda e: mk.proxy_anchor_loss(e, labels, proxies)
    else:
        fn = lambda e: getattr(mk, f"{loss}_loss")(e, labels, reduction="none")  # normalize_embeddings=True default
    assert_rel_close(fn(x * scales), fn(x), TOL, loss)
