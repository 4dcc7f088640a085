"""Options that reproduce the papers' own code: SupContrast (base_temperature, reduction="mean", multiview) and
fast-reid / Hermans batch-hard (normalize_embeddings=False, reduction="mean"), in float64 to 1e-10."""
import pytest
import torch
import torch.nn.functional as F

import metric_kernels as mk
from tests.helpers import assert_grads_close, assert_rel_close
from tests.originals import fastreid_triplet_loss, supcontrast_loss

TOL = 1e-10


def _at_least_two_classes(labels):
    """SupContrast has no batch-level rule; PML's (no negative pair anywhere -> 0) applies to one-class batches only."""
    if labels.unique().numel() < 2:
        labels = labels.clone()
        labels[0] = labels[1] + 1
    return labels


@pytest.mark.parametrize("seed", range(20))
def test_supcon_equals_supcontrast_all_mode(seed):
    g = torch.Generator().manual_seed(seed)
    batch, views, dim = torch.randint(2, 40, (), generator=g).item(), torch.randint(1, 4, (), generator=g).item(), 16
    raw = torch.randn(batch, views, dim, generator=g, dtype=torch.float64, requires_grad=True)
    features = F.normalize(raw, dim=2)
    labels = None if seed % 4 == 0 else torch.randint(0, max(2, batch // 3), (batch,), generator=g)
    if labels is not None:
        labels = _at_least_two_classes(labels)
    t, b = 0.05 + 0.5 * seed / 20, 0.07
    expected = supcontrast_loss(features, labels, temperature=t, base_temperature=b)
    embeddings, row_labels = mk.multiview(raw, labels)
    ours = mk.supcon_loss(embeddings, row_labels, temperature=t, base_temperature=b, reduction="mean")
    assert_rel_close(ours, expected, TOL, f"seed={seed} value")
    assert_grads_close(ours, expected, [raw], TOL, f"seed={seed}")


@pytest.mark.parametrize("seed", range(10))
def test_supcon_equals_supcontrast_one_mode(seed):
    """contrast_mode="one": the first view of each sample against all views, its own row left out by self_offset=0."""
    g = torch.Generator().manual_seed(100 + seed)
    batch, views = torch.randint(2, 30, (), generator=g).item(), torch.randint(2, 4, (), generator=g).item()
    raw = torch.randn(batch, views, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = _at_least_two_classes(torch.randint(0, max(2, batch // 2), (batch,), generator=g))
    expected = supcontrast_loss(F.normalize(raw, dim=2), labels, 0.1, 0.07, contrast_mode="one")
    references, reference_labels = mk.multiview(raw, labels)
    ours = mk.supcon_loss(raw[:, 0], labels, references, reference_labels, self_offset=0, temperature=0.1,
                          base_temperature=0.07, reduction="mean")
    assert_rel_close(ours, expected, TOL, "value")
    assert_grads_close(ours, expected, [raw], TOL, f"seed={seed}")


def test_one_class_batch_follows_pml_not_supcontrast():
    """SPEC.md: a batch with no negative pair has SupCon loss 0 (PML); SupContrast would return a positive number."""
    raw = torch.randn(4, 2, 8, dtype=torch.float64)
    labels = torch.zeros(4, dtype=torch.long)
    assert supcontrast_loss(F.normalize(raw, dim=2), labels, 0.1, 0.07).item() > 0
    assert mk.supcon_loss(*mk.multiview(raw, labels), reduction="mean").item() == 0


def test_multiview_orders_rows_view_major():
    features = torch.arange(2 * 3 * 1, dtype=torch.float32).reshape(2, 3, 1)  # sample s, view v -> 3 s + v
    embeddings, labels = mk.multiview(features, torch.tensor([7, 9]))
    assert embeddings.flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert labels.tolist() == [7, 9, 7, 9, 7, 9]
    assert mk.multiview(features)[1].tolist() == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("margin", [0.3, 0.0])
def test_batch_hard_equals_fastreid(seed, margin):
    """P x K batches (every anchor has a positive and a negative), raw Euclidean distances, mean over anchors;
    fast-reid's margin 0 is the soft margin, i.e. soft=True with margin=0."""
    g = torch.Generator().manual_seed(seed)
    p, k = torch.randint(2, 9, (), generator=g).item(), torch.randint(2, 5, (), generator=g).item()
    x = torch.randn(p * k, 32, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(p).repeat_interleave(k)[torch.randperm(p * k, generator=g)]
    expected = fastreid_triplet_loss(x, labels, margin)
    ours = mk.batch_hard_triplet_loss(x, labels, margin=margin, soft=margin == 0, normalize_embeddings=False,
                                      reduction="mean")
    assert_rel_close(ours, expected, TOL, "value")
    assert_grads_close(ours, expected, [x], TOL, f"seed={seed}")
