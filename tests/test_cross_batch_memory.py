"""CrossBatchMemory equals PML's CrossBatchMemory (float64, 1e-10 relative, values and gradients) over a sequence of
batches that fills the ring and wraps around it (memory_size not a multiple of the batch sizes), and keeps the same
state (memory contents, queue_idx, has_been_filled)."""
import pytest
import torch
from pytorch_metric_learning import losses, miners, reducers

import metric_kernels as mk
from metric_kernels.pml import exact_cdist
from tests.helpers import assert_rel_close

TOL = 1e-10
DIM = 7
BATCHES = (4, 5, 3, 6, 4, 5, 2, 6, 6, 3)  # with memory 13: fills at the 5th, wraps at the 5th, 7th and 10th


def _losses(name, reducer=None):
    """(ours, PML's, PML's miner); `reducer` (a PML reducer class) is given to both losses."""
    kw = {} if reducer is None else {"reducer": reducer()}
    if name == "circle":
        return mk.CircleLoss(m=0.3, gamma=40, backend="reference", **kw), losses.CircleLoss(m=0.3, gamma=40, **kw), None
    if name == "supcon":
        return mk.SupConLoss(temperature=0.2, backend="reference", **kw), losses.SupConLoss(temperature=0.2, **kw), None
    if name == "multi_similarity":
        return (mk.MultiSimilarityLoss(2, 20, 0.3, backend="reference", **kw),
                losses.MultiSimilarityLoss(2, 20, 0.3, **kw), None)
    if name == "ntxent":
        return mk.NTXentLoss(0.3, backend="reference", **kw), losses.NTXentLoss(0.3, **kw), None
    if name == "tuplet_margin":
        return (mk.TupletMarginLoss(10.0, 8, backend="reference", **kw), losses.TupletMarginLoss(10.0, 8, **kw),
                None)
    if name == "contrastive":
        return (mk.ContrastiveLoss(0.2, 1.1, backend="reference", **kw), losses.ContrastiveLoss(0.2, 1.1, **kw),
                None)
    if name == "triplet_margin":
        return (mk.TripletMarginLoss(0.3, smooth_loss=True, backend="reference", **kw),
                losses.TripletMarginLoss(0.3, smooth_loss=True, **kw), None)
    if name == "margin":
        return (mk.MarginLoss(0.2, 0.1, 0.9, learn_beta=True, backend="reference", **kw).double(),
                losses.MarginLoss(0.2, 0.1, 0.9, learn_beta=True, **kw).double(), None)
    if name == "lifted":
        return (mk.GeneralizedLiftedStructureLoss(0.9, 0.1, backend="reference", **kw),
                losses.GeneralizedLiftedStructureLoss(0.9, 0.1, **kw), None)
    if name == "nca":
        return mk.NCALoss(softmax_scale=3.0, backend="reference", **kw), losses.NCALoss(softmax_scale=3.0, **kw), None
    if name == "angular":
        return mk.AngularLoss(35, backend="reference", **kw), losses.AngularLoss(35, **kw), None
    if name == "batch_hard":
        return (mk.BatchHardTripletLoss(margin=0.1, backend="reference", **kw),
                losses.TripletMarginLoss(margin=0.1, **kw), miners.BatchHardMiner())
    assert name == "batch_hard_soft"
    return (mk.BatchHardTripletLoss(margin=0.05, soft=True, backend="reference", **kw),
            losses.TripletMarginLoss(margin=0.05, smooth_loss=True, **kw), miners.BatchHardMiner())


def _grad(value, x):
    if not value.requires_grad:  # PML returns a constant 0 when it finds no pair
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(value, x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def _compare_sequence(name, memory_size, batches, seed, with_mask=False, reducer=None):
    ours_loss, their_loss, miner = _losses(name, reducer)
    ours = mk.CrossBatchMemory(ours_loss, DIM, memory_size=memory_size)
    theirs = losses.CrossBatchMemory(their_loss, DIM, memory_size=memory_size, miner=miner)
    g = torch.Generator().manual_seed(seed)
    nonzero = 0
    for step, batch in enumerate(batches):
        x = torch.randn(batch, DIM, generator=g, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(0, 3, (batch,), generator=g)
        kwargs = {}
        if with_mask:
            kwargs["enqueue_mask"] = torch.rand(batch, generator=g) < 0.5
        with exact_cdist():
            expected = theirs(x, labels, **kwargs)
            expected_grad = _grad(expected, x)
        value = ours(x, labels, **kwargs)
        what = f"{name} step {step}"
        assert_rel_close(value, expected, TOL, what)
        assert_rel_close(_grad(value, x), expected_grad, TOL, f"{what} gradient",
                         scale_floor=1e-3 * abs(expected.item()))
        assert ours.queue_idx == theirs.queue_idx, what
        assert ours.has_been_filled == theirs.has_been_filled, what
        assert torch.equal(ours.embedding_memory, theirs.embedding_memory), what
        assert torch.equal(ours.label_memory, theirs.label_memory), what
        nonzero += bool(expected.item() != 0)
    assert nonzero >= len(batches) // 2  # the comparison is not between zeros
    return ours


@pytest.mark.parametrize("name", ["circle", "supcon", "multi_similarity", "ntxent", "tuplet_margin", "contrastive",
                                  "triplet_margin", "lifted", "margin", "nca", "angular", "batch_hard",
                                  "batch_hard_soft"])
def test_matches_pml_through_fill_and_wrap_around(name):
    ours = _compare_sequence(name, 13, BATCHES, seed=1)
    assert ours.has_been_filled


@pytest.mark.parametrize("reducer", [reducers.MeanReducer, reducers.SumReducer])
@pytest.mark.parametrize("name", ["circle", "supcon", "ntxent", "tuplet_margin", "contrastive", "triplet_margin",
                                  "lifted", "margin", "nca", "angular", "batch_hard"])
def test_reducers_match_pml_through_fill_and_wrap_around(name, reducer):
    """The loss's reducer= inside the memory: for batch-hard, MeanReducer averages over the queries that have a
    positive and a negative among the memory's other slots (PML's mined triplets)."""
    _compare_sequence(name, 13, BATCHES, seed=4, reducer=reducer)


def test_angular_per_pair_dictionary_matches_pml_through_wrap_around():
    """DoNothingReducer's per-pair terms and (query, slot) indices, in PML's order, also where the batch wraps around
    the ring (the losses see a rolled copy of the memory; the indices are the slots)."""
    ours = mk.CrossBatchMemory(mk.AngularLoss(35, reducer=reducers.DoNothingReducer(), backend="reference"), DIM,
                               memory_size=13)
    theirs = losses.CrossBatchMemory(losses.AngularLoss(35, reducer=reducers.DoNothingReducer()), DIM,
                                     memory_size=13)
    g = torch.Generator().manual_seed(5)
    wrapped = 0
    for step, batch in enumerate(BATCHES):
        x = torch.randn(batch, DIM, generator=g, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(0, 3, (batch,), generator=g)
        wrapped += ours.has_been_filled and ours.queue_idx + batch > 13
        expected, value = theirs(x, labels)["loss"], ours(x, labels)["loss"]
        what = f"step {step}"
        assert value["reduction_type"] == expected["reduction_type"], what
        if expected["reduction_type"] == "already_reduced":
            assert value["losses"].numel() == 0, what
            continue
        assert all(torch.equal(a, b) for a, b in zip(value["indices"], expected["indices"])), what
        assert_rel_close(value["losses"], expected["losses"], TOL, what)
    assert wrapped >= 2


@pytest.mark.parametrize("name", ["circle", "supcon"])
def test_matches_pml_when_the_batch_fills_the_memory(name):
    _compare_sequence(name, 6, (6, 6, 4, 6), seed=2)  # whole memory each time; then a partial wrap


@pytest.mark.parametrize("name", ["circle", "contrastive", "triplet_margin", "margin", "nca", "angular", "batch_hard"])
def test_enqueue_mask_matches_pml(name):
    _compare_sequence(name, 11, (6, 8, 5, 7, 8), seed=3, with_mask=True)


def test_state_names_reset_and_device_dtype_follow_the_batch():
    xbm = mk.CrossBatchMemory(mk.CircleLoss(backend="reference"), 4, memory_size=5)
    assert set(dict(xbm.named_buffers())) == {"embedding_memory", "label_memory"}
    assert xbm.embedding_memory.shape == (5, 4) and xbm.queue_idx == 0 and not xbm.has_been_filled
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    xbm(x, torch.tensor([0, 1, 0]))
    assert xbm.embedding_memory.dtype == torch.float64 and xbm.queue_idx == 3
    assert torch.equal(xbm.embedding_memory[:3], x.detach()) and not xbm.embedding_memory.requires_grad
    xbm(torch.randn(3, 4, dtype=torch.float64), torch.tensor([1, 1, 0]))
    assert xbm.queue_idx == 1 and xbm.has_been_filled
    xbm.reset_queue()
    assert xbm.queue_idx == 0 and not xbm.has_been_filled and not xbm.embedding_memory.any()


def test_memory_is_left_out_of_the_graph_and_the_batch_sees_only_the_filled_part():
    # First call: the only references are the batch itself, less each query's own slot: the plain loss.
    loss = mk.SupConLoss(backend="reference")
    xbm = mk.CrossBatchMemory(loss, 6, memory_size=50)
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (8,))
    assert_rel_close(xbm(x, labels), loss(x, labels), TOL, "first batch")
    # A second batch: against both batches, the gradient reaches only the second one.
    x2 = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    labels2 = torch.randint(0, 3, (8,))
    value = xbm(x2, labels2)
    expected = loss(x2, labels2, None, torch.cat([x, x2]).detach(), torch.cat([labels, labels2]), self_offset=8)
    assert_rel_close(value, expected, TOL, "second batch")
    value.backward()
    assert x.grad is None and x2.grad is not None


def test_nca_keeps_each_querys_own_slot_as_pml():
    """PML's NCA inside the memory keeps the own slots (its indices_tuple only weighs the queries): the loss equals
    NCA of the batch against the filled memory with nothing left out, which is less than with the own slots left out
    (each query's own slot is a positive at distance 0)."""
    loss = mk.NCALoss(backend="reference")
    xbm = mk.CrossBatchMemory(loss, 6, memory_size=50)
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (8,))
    value = xbm(x, labels)
    assert_rel_close(value, loss(x, labels, None, x.detach(), labels), TOL, "own slots kept")
    assert_rel_close(value, losses.CrossBatchMemory(losses.NCALoss(), 6, memory_size=50)(x, labels), TOL, "PML")
    assert value < loss(x, labels, None, x.detach(), labels, self_offset=0)


def test_bad_arguments():
    with pytest.raises(TypeError, match="loss"):
        mk.CrossBatchMemory(mk.ProxyAnchorLoss(3, 4), 4)
    with pytest.raises(ValueError, match="memory_size"):
        mk.CrossBatchMemory(mk.CircleLoss(), 4, memory_size=0)
    xbm = mk.CrossBatchMemory(mk.CircleLoss(backend="reference"), 4, memory_size=3)
    x, labels = torch.randn(4, 4), torch.randint(0, 2, (4,))
    with pytest.raises(NotImplementedError, match="indices_tuple"):
        xbm(x[:2], labels[:2], (labels, labels, labels))
    with pytest.raises(ValueError, match="memory_size"):
        xbm(x, labels)  # more rows than the memory holds
    with pytest.raises(ValueError, match="embedding_size"):
        xbm(torch.randn(2, 5), labels[:2])
    with pytest.raises(ValueError, match="enqueue_mask"):
        xbm(x[:2], labels[:2], enqueue_mask=torch.tensor([True]))


def test_add_to_memory_prefills_as_pml():
    """PML's public add_to_memory(embeddings, labels, batch_size): enqueues without a loss (e.g. to pre-fill the
    memory). The state after a sequence that wraps, and the loss of the next forward, equal PML's."""
    ours = mk.CrossBatchMemory(mk.SupConLoss(temperature=0.2, backend="reference"), DIM, memory_size=9)
    theirs = losses.CrossBatchMemory(losses.SupConLoss(temperature=0.2), DIM, memory_size=9)
    g = torch.Generator().manual_seed(11)
    for batch in (4, 3, 4, 5):  # fills at the 3rd, which wraps; the 4th wraps again
        x = torch.randn(batch, DIM, generator=g, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(0, 3, (batch,), generator=g)
        for xbm in (ours, theirs):
            xbm.embedding_memory = xbm.embedding_memory.to(torch.float64)
            assert xbm.add_to_memory(x, labels, batch) is None
        assert torch.equal(ours.curr_batch_idx, theirs.curr_batch_idx)
        assert (ours.queue_idx, ours.has_been_filled) == (theirs.queue_idx, theirs.has_been_filled)
        assert torch.equal(ours.embedding_memory, theirs.embedding_memory)
        assert torch.equal(ours.label_memory, theirs.label_memory)
        assert not ours.embedding_memory.requires_grad
    x = torch.randn(5, DIM, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (5,), generator=g)
    assert_rel_close(ours(x, labels), theirs(x, labels), TOL, "forward after add_to_memory")
    assert torch.equal(ours.curr_batch_idx, theirs.curr_batch_idx)


def test_add_to_memory_bad_arguments():
    xbm = mk.CrossBatchMemory(mk.CircleLoss(backend="reference"), 4, memory_size=3)
    x, labels = torch.randn(2, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="batch_size"):
        xbm.add_to_memory(x, labels, 3)
    with pytest.raises(TypeError, match="batch_size"):
        xbm.add_to_memory(x, labels, 2.0)
    with pytest.raises(ValueError, match="memory_size"):
        xbm.add_to_memory(torch.randn(4, 4), torch.zeros(4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="embedding_size"):
        xbm.add_to_memory(torch.randn(2, 5), labels, 2)
    with pytest.raises(ValueError, match="labels"):
        xbm.add_to_memory(x, labels[:1], 2)
    assert xbm.queue_idx == 0 and not xbm.embedding_memory.any()  # nothing written by a refused call
