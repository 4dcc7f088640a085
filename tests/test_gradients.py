"""Gradients: torch.autograd.gradcheck in float64 for every loss whose gradient is the derivative of its value, and for
Circle (whose weights are detached by definition, so finite differences do not apply) the closed form of SPEC.md."""
import pytest
import torch
import torch.nn.functional as F

import metric_kernels as mk
from tests.helpers import assert_rel_close

REDUCTIONS = ["mean_nonzero", "mean", "sum", "none"]


def _inputs(seed, n=7, m=9, dim=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(m, dim, generator=g, dtype=torch.float64, requires_grad=True)
    return x, torch.randint(0, 3, (n,), generator=g), y, torch.randint(0, 3, (m,), generator=g)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("refs", ["self", "ref_emb", "self_offset"])
def test_supcon_gradcheck(refs, reduction):
    x, labels, y, y_labels = _inputs(1)
    if refs == "self":
        fn = lambda a: mk.supcon_loss(a, labels, temperature=0.3, base_temperature=0.5, reduction=reduction)
        assert torch.autograd.gradcheck(fn, (x,))
    else:
        offset = 1 if refs == "self_offset" else None
        fn = lambda a, b: mk.supcon_loss(a, labels, b, y_labels, temperature=0.3, self_offset=offset,
                                         reduction=reduction)
        assert torch.autograd.gradcheck(fn, (x, y))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_batch_hard_gradcheck(normalize, soft, reduction):
    x, labels, y, y_labels = _inputs(2)
    # A margin large enough that every row violates it keeps relu and mean_nonzero away from their kinks.
    fn = lambda a, b: mk.batch_hard_triplet_loss(a, labels, b, y_labels, margin=2.5, soft=soft,
                                                 normalize_embeddings=normalize, reduction=reduction)
    assert torch.autograd.gradcheck(fn, (x, y))
    assert torch.autograd.gradcheck(lambda a: mk.batch_hard_triplet_loss(a, labels, margin=2.5, soft=soft,
                                                                         normalize_embeddings=normalize,
                                                                         reduction=reduction), (x,))


@pytest.mark.parametrize("seed", range(3))
def test_proxy_anchor_gradcheck(seed):
    x, labels, _, _ = _inputs(3 + seed, n=8)
    proxies = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, p: mk.proxy_anchor_loss(a, labels, p, alpha=4.0, margin=0.2),
                                    (x, proxies))


def _circle_closed_form_ds(s, positive, negative, m, gamma):
    """dL_i/ds_ij of SPEC.md for the per-row losses (reduction "sum")."""
    lp = torch.where(positive, -gamma * torch.relu(1 + m - s) * (s - (1 - m)), float("-inf"))
    ln = torch.where(negative, gamma * torch.relu(s + m) * (s - m), float("-inf"))
    valid = positive.any(1) & negative.any(1)
    outer = torch.sigmoid(torch.logsumexp(lp, 1) + torch.logsumexp(ln, 1)).where(valid, torch.zeros(()))[:, None]
    ds = torch.where(positive, torch.softmax(lp, 1).nan_to_num() * (-gamma * torch.relu(1 + m - s)), 0.0)
    ds = ds + torch.where(negative, torch.softmax(ln, 1).nan_to_num() * (gamma * torch.relu(s + m)), 0.0)
    return outer * ds


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("refs", ["self", "ref_emb", "self_offset"])
def test_circle_gradient_is_specs_closed_form(refs, seed):
    x, labels, y, y_labels = _inputs(10 + seed, n=12, m=15, dim=6)
    m, gamma = 0.25, 64.0
    offset = {"self": 0, "ref_emb": None, "self_offset": 2}[refs]
    references, reference_labels = (x, labels) if refs == "self" else (y, y_labels)
    ours = mk.circle_loss(x, labels, *(() if refs == "self" else (y, y_labels)), m=m, gamma=gamma,
                          self_offset=None if refs == "self" else offset, reduction="sum")
    inputs = [x] if refs == "self" else [x, y]
    our_grads = torch.autograd.grad(ours, inputs)

    s = F.normalize(x, dim=1) @ F.normalize(references, dim=1).T
    same = labels[:, None] == reference_labels[None, :]
    allowed = torch.ones_like(same)
    if offset is not None:
        allowed[torch.arange(12), torch.arange(12) + offset] = False
    ds = _circle_closed_form_ds(s.detach(), same & allowed, ~same & allowed, m, gamma)
    expected_grads = torch.autograd.grad(s, inputs, grad_outputs=ds)
    for a, b in zip(our_grads, expected_grads):
        assert_rel_close(a, b, 1e-10, f"circle {refs}")


@pytest.mark.parametrize("chunk_elements", [None, 14])
def test_normalisation_backward_equals_autograds(monkeypatch, chunk_elements):
    """The fused losses' normalisation (functional._Normalize) keeps the raw rows and the norms and forms the backward
    itself, a few rows at a time above _CHUNK_ELEMENTS (forced down to 2 rows here): equal to autograd through
    F.normalize, a zero row and a row under eps (the clamp) among them; the angular and lifted structure losses'
    pair terms (functional._GatheredPairValues) normalise gathered rows with the same backward, gradchecked."""
    from metric_kernels import functional
    if chunk_elements is not None:
        monkeypatch.setattr(functional, "_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 7, generator=g, dtype=torch.float64)
    x[3], x[5] = 0.0, x[5] * 1e-14
    weights = torch.randn(50, 7, generator=g, dtype=torch.float64)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    (functional._Normalize.apply(ours, torch.float64) * weights).sum().backward()
    (F.normalize(theirs, dim=1, eps=functional.NORM_EPS) * weights).sum().backward()
    assert_rel_close(ours.grad, theirs.grad, 1e-14, "normalisation backward")
    rows = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    anchors, positives = torch.tensor([0, 0, 1, 4, 5]), torch.tensor([1, 2, 3, 4, 0])
    for pair_value in (0, 1, 2):
        assert torch.autograd.gradcheck(
            lambda r: functional._GatheredPairValues.apply(r, r, anchors, positives, pair_value, True, torch.float64),
            (rows,))
