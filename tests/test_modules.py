"""The nn.Module losses are drop-in replacements for PML's classes: same constructor defaults, same forward order,
and one optimisation step of a PML-style training loop gives the same parameters."""
import copy

import pytest
import torch
from pytorch_metric_learning import distances, losses, miners

import metric_kernels as mk
from metric_kernels.pml import exact_cdist
from tests.helpers import assert_rel_close

TOL = 1e-10


class BatchHardPML(torch.nn.Module):
    """PML's batch-hard triplet loss as users write it: a BatchHardMiner feeding TripletMarginLoss."""

    def __init__(self):
        super().__init__()
        self.miner, self.loss = miners.BatchHardMiner(), losses.TripletMarginLoss()

    def forward(self, embeddings, labels):
        return self.loss(embeddings, labels, self.miner(embeddings, labels))


def _pairs():
    return {
        "circle": (mk.CircleLoss(), losses.CircleLoss()),
        "supcon": (mk.SupConLoss(), losses.SupConLoss()),
        "batch_hard": (mk.BatchHardTripletLoss(), BatchHardPML()),
    }


def _one_step(model, loss_fn, data, labels, extra_params=()):
    optimizer = torch.optim.SGD(list(model.parameters()) + list(extra_params), lr=0.5, momentum=0.9)
    optimizer.zero_grad()
    loss = loss_fn(model(data), labels)
    loss.backward()
    optimizer.step()
    return loss


@pytest.mark.parametrize("name", ["circle", "supcon", "batch_hard"])
def test_one_training_step_matches_pml(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).double()
    twin, initial = copy.deepcopy(model), copy.deepcopy(model)
    data, labels = torch.randn(48, 20, dtype=torch.float64), torch.randint(0, 6, (48,))
    ours, theirs = _pairs()[name]
    with exact_cdist():
        expected_loss = _one_step(twin, theirs, data, labels)
    our_loss = _one_step(model, ours, data, labels)
    assert_rel_close(our_loss, expected_loss, TOL, "loss")
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert_rel_close(a, b, TOL, key)
    assert not torch.equal(model[0].weight, initial[0].weight)  # the loss had a gradient: the step moved the model


def test_proxy_anchor_module_matches_pml_init_logits_and_step():
    torch.manual_seed(5)
    ours = mk.ProxyAnchorLoss(10, 16)
    torch.manual_seed(5)
    theirs = losses.ProxyAnchorLoss(10, 16)
    assert torch.equal(ours.proxies, theirs.proxies)  # same kaiming_normal_(mode="fan_out") draw
    assert isinstance(ours.proxies, torch.nn.Parameter) and "proxies" in ours.state_dict()
    ours.double(), theirs.double()

    torch.manual_seed(1)
    model = torch.nn.Linear(12, 16).double()
    twin = copy.deepcopy(model)
    data, labels = torch.randn(40, 12, dtype=torch.float64), torch.randint(0, 10, (40,))
    assert_rel_close(ours.get_logits(model(data)), theirs.get_logits(model(data)), TOL, "get_logits")
    our_loss = _one_step(model, ours, data, labels, [ours.proxies])
    expected_loss = _one_step(twin, theirs, data, labels, [theirs.proxies])
    assert_rel_close(our_loss, expected_loss, TOL, "loss")
    assert_rel_close(ours.proxies, theirs.proxies, TOL, "proxies after the step")
    assert_rel_close(model.weight, twin.weight, TOL, "weights after the step")


def test_constructor_defaults_are_pmls():
    assert (mk.CircleLoss().m, mk.CircleLoss().gamma) == (losses.CircleLoss().m, losses.CircleLoss().gamma)
    assert mk.SupConLoss().temperature == losses.SupConLoss().temperature
    triplet = losses.TripletMarginLoss()
    ours = mk.BatchHardTripletLoss()
    assert (ours.margin, ours.soft, ours.normalize_embeddings) == (triplet.margin, triplet.smooth_loss, True)
    pa, pml_pa = mk.ProxyAnchorLoss(3, 4), losses.ProxyAnchorLoss(3, 4)
    assert (pa.margin, pa.alpha, pa.num_classes) == (pml_pa.margin, pml_pa.alpha, pml_pa.num_classes)
    assert all(module.reduction == "mean_nonzero" for module in (mk.CircleLoss(), mk.SupConLoss(), ours))


@pytest.mark.parametrize("name", ["circle", "supcon", "batch_hard"])
def test_module_forward_order_with_references(name):
    """forward(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None), positionally, as PML."""
    ours, theirs = _pairs()[name]
    x, y = torch.randn(10, 8, dtype=torch.float64), torch.randn(14, 8, dtype=torch.float64)
    labels, y_labels = torch.randint(0, 3, (10,)), torch.randint(0, 3, (14,))
    if name == "batch_hard":
        with exact_cdist():
            theirs_value = theirs.loss(x, labels, theirs.miner(x, labels, y, y_labels), y, y_labels)
    else:
        theirs_value = theirs(x, labels, None, y, y_labels)
    assert_rel_close(ours(x, labels, None, y, y_labels), theirs_value, TOL, name)


def test_modules_pass_their_options_through():
    x, labels = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))
    assert_rel_close(mk.CircleLoss(m=0.25, gamma=128, reduction="sum")(x, labels),
                     mk.circle_loss(x, labels, m=0.25, gamma=128, reduction="sum"), 0, "circle")
    assert_rel_close(mk.SupConLoss(0.07, base_temperature=0.07, reduction="mean")(x, labels),
                     mk.supcon_loss(x, labels, temperature=0.07, base_temperature=0.07, reduction="mean"), 0, "supcon")
    assert_rel_close(mk.BatchHardTripletLoss(0.2, True, False, reduction="none")(x, labels),
                     mk.batch_hard_triplet_loss(x, labels, margin=0.2, soft=True, normalize_embeddings=False,
                                                reduction="none"), 0, "batch hard")
    y = torch.randn(20, 8, dtype=torch.float64)
    y[3:19] = x
    y_labels = torch.randint(0, 3, (20,))
    y_labels[3:19] = labels
    assert_rel_close(mk.CircleLoss()(x, labels, None, y, y_labels, self_offset=3),
                     mk.circle_loss(x, labels, y, y_labels, self_offset=3), 0, "self_offset")
    pa = mk.ProxyAnchorLoss(3, 8, margin=0.2, alpha=16).double()
    assert_rel_close(pa(x, labels), mk.proxy_anchor_loss(x, labels, pa.proxies, margin=0.2, alpha=16), 0, "proxy")


def test_modules_work_under_deterministic_algorithms():
    x, labels = torch.randn(16, 8), torch.randint(0, 3, (16,))
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = mk.CircleLoss()(x, labels), mk.CircleLoss(deterministic=True)(x, labels)
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(first, second)
