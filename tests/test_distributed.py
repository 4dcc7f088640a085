"""DistributedLoss: on 2 and 3 CPU processes (gloo), the value on every rank and the parameter gradients after DDP's
averaging (a real DistributedDataParallel, or averaged by hand) equal the one-process loss of the global batch, in
float64 at 1e-10 relative, for every loss (the classifiers too), equal and unequal (also empty) local batches, several
reductions and PML's reducers (DoNothingReducer's dictionary, MeanReducer on batch-hard, Proxy-Anchor's AvgNonZero, Mean, Sum).

Each world size is one spawned process group that runs every check of its list; a rank records failed checks instead
of stopping (the collectives stay in step) and the parent asserts on them.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning import distances, reducers, regularizers
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import metric_kernels as mk
from metric_kernels import distributed as mk_distributed
from tests.helpers import assert_rel_close

TOL = 1e-10
D_IN, D_OUT = 6, 5


CLASSIFIERS = {"arcface": mk.ArcFaceLoss, "cosface": mk.CosFaceLoss, "subcenter_arcface": mk.SubCenterArcFaceLoss,
               "normalized_softmax": mk.NormalizedSoftmaxLoss, "large_margin_softmax": mk.LargeMarginSoftmaxLoss,
               "sphereface": mk.SphereFaceLoss, "soft_triple": mk.SoftTripleLoss}


@dataclass
class Case:
    loss: str                       # circle | supcon | ... | proxy_anchor | a classifier (CLASSIFIERS)
    sizes: Tuple[int, ...]          # rows per rank
    how: str = "ddp"                # ddp (model and loss in separate DDPs) | joint (one DDP over both) | hand
    kwargs: dict = field(default_factory=dict)
    labels: Optional[Tuple[int, ...]] = None   # None: random in [0, classes)
    classes: int = 3
    ref_sizes: Optional[Tuple[int, ...]] = None  # ref_emb rows per rank (pair losses)
    reduce_scatter: bool = False    # force the reduce-scatter backward (gloo otherwise all-reduces)
    seed: int = 0

    def __str__(self):
        return (f"{self.loss}{self.kwargs} sizes={self.sizes} how={self.how} labels={self.labels} "
                f"refs={self.ref_sizes} reduce_scatter={self.reduce_scatter}")


def _cases(world):
    if world == 2:
        return [
            Case("circle", (6, 6), kwargs=dict(m=0.25, gamma=64)),
            Case("circle", (3, 8), "hand", kwargs=dict(reduction="mean")),
            Case("circle", (4, 5), kwargs=dict(reduction="none")),
            # Rank 0 alone has one positive and one negative pair (PML's rule would zero it); the global batch has more.
            Case("circle", (1, 2), labels=(5, 5, 7)),
            Case("circle", (5, 3), "hand", ref_sizes=(4, 7)),
            Case("supcon", (6, 6), kwargs=dict(temperature=0.2)),
            Case("multi_similarity", (5, 6), kwargs=dict(alpha=2.0, beta=20.0, base=0.3)),
            Case("ntxent", (5, 6), kwargs=dict(temperature=0.2)),
            Case("ntxent", (3, 7), "hand", kwargs=dict(reduction="mean_nonzero"), ref_sizes=(4, 5)),
            Case("ntxent", (4, 0), kwargs=dict(reduction="none")),
            Case("tuplet_margin", (5, 6), kwargs=dict(margin=8.0, scale=16)),
            # PML's regularizers: the embedding regularizer on the global batch, the weight regularizer once.
            Case("circle", (5, 6), kwargs=dict(embedding_regularizer=regularizers.LpRegularizer(),
                                               embedding_reg_weight=0.5)),
            Case("contrastive", (3, 7), "hand", kwargs=dict(embedding_regularizer=regularizers.ZeroMeanRegularizer(),
                                                            reducer=reducers.SumReducer()), ref_sizes=(4, 5)),
            Case("arcface", (4, 6), classes=4, kwargs=dict(weight_regularizer=regularizers.RegularFaceRegularizer(),
                                                            embedding_regularizer=regularizers.LpRegularizer())),
            Case("proxy_anchor", (5, 4), classes=5,
                 kwargs=dict(weight_regularizer=regularizers.CenterInvariantRegularizer(), weight_reg_weight=0.3)),
            Case("proxy_nca", (3, 6), "hand", classes=4,
                 kwargs=dict(embedding_regularizer=regularizers.LpRegularizer(power=2),
                             reducer=reducers.DoNothingReducer())),
            Case("tuplet_margin", (3, 7), "hand", kwargs=dict(reducer=reducers.AvgNonZeroReducer()), ref_sizes=(4, 5)),
            Case("contrastive", (6, 5), kwargs=dict(pos_margin=0.2, neg_margin=1.1)),
            Case("contrastive", (3, 8), "hand", kwargs=dict(reducer=reducers.MeanReducer())),
            Case("contrastive", (5, 4), kwargs=dict(reduction="sum"), ref_sizes=(3, 6)),
            Case("triplet_margin", (6, 5), kwargs=dict(margin=0.2)),
            Case("triplet_margin", (3, 7), "hand", kwargs=dict(smooth_loss=True, reducer=reducers.MeanReducer()),
                 ref_sizes=(4, 5)),
            Case("supcon", (3, 8), "hand", kwargs=dict(temperature=0.1, base_temperature=0.07, reduction="mean")),
            Case("supcon", (7, 0), kwargs=dict(reduction="sum")),
            # No negative pair in the global batch: PML's SupCon rule gives 0 (and zero gradients).
            Case("supcon", (2, 3), labels=(1, 1, 1, 1, 1)),
            Case("batch_hard", (6, 6), "hand"),
            Case("batch_hard", (3, 8), kwargs=dict(soft=True, reduction="mean"), reduce_scatter=True),
            Case("batch_hard", (5, 4), kwargs=dict(margin=0.3, normalize_embeddings=False, reduction="none")),
            Case("proxy_anchor", (6, 6), classes=5),
            Case("proxy_anchor", (3, 8), "hand", classes=5, kwargs=dict(margin=0.2, alpha=16)),
            Case("proxy_anchor", (2, 7), "joint", classes=4, reduce_scatter=True),
            Case("proxy_anchor", (3, 4), classes=1),   # fewer proxies than ranks: one rank has none
            # PML's reducers (tests/test_pml_keywords.py: the modules equal PML's with them).
            Case("circle", (5, 4), kwargs=dict(reducer=reducers.DoNothingReducer())),
            Case("supcon", (3, 6), "hand", kwargs=dict(reducer=reducers.DoNothingReducer()), ref_sizes=(4, 3)),
            Case("supcon", (4, 5), kwargs=dict(reducer=reducers.MeanReducer())),
            # Queries 0, 5 and 8 have no positive: MeanReducer divides by the 6 with one, not by 9 (nor by rank 1's 3).
            Case("batch_hard", (5, 4), kwargs=dict(reducer=reducers.MeanReducer()), labels=(9, 1, 1, 2, 2, 8, 2, 1, 7)),
            Case("batch_hard", (3, 6), "hand", kwargs=dict(reducer=reducers.MeanReducer()), ref_sizes=(2, 5)),
            Case("proxy_anchor", (6, 5), classes=5, kwargs=dict(reducer=reducers.AvgNonZeroReducer())),
            # One class in the batch: its negative term is 0, which AvgNonZeroReducer leaves out.
            Case("proxy_anchor", (4, 3), "hand", classes=4, labels=(2,) * 7,
                 kwargs=dict(reducer=reducers.AvgNonZeroReducer())),
            # Classes 2 and 4 absent: MeanReducer divides the positive terms by C = 5, the default by |P+| = 3.
            Case("proxy_anchor", (5, 5), "hand", classes=5, labels=(0, 0, 1, 1, 3, 3, 0, 1, 3, 1),
                 kwargs=dict(reducer=reducers.MeanReducer())),
            Case("proxy_anchor", (2, 6), classes=3, kwargs=dict(reducer=reducers.SumReducer())),
            Case("proxy_anchor", (4, 6), "hand", classes=5, kwargs=dict(reducer=reducers.DoNothingReducer())),
            # The classifiers: each rank its own queries against W, a global reduction.
            Case("arcface", (6, 6), classes=5),
            Case("subcenter_arcface", (3, 8), "hand", classes=4,
                 kwargs=dict(sub_centers=2, reducer=reducers.AvgNonZeroReducer())),
            Case("cosface", (5, 4), "joint", classes=6, kwargs=dict(reducer=reducers.SumReducer())),
            Case("normalized_softmax", (4, 0), classes=3, kwargs=dict(reducer=reducers.DoNothingReducer())),
            Case("large_margin_softmax", (3, 5), "hand", classes=4, kwargs=dict(margin=3, scale=0.5)),
            Case("sphereface", (4, 4), classes=5, kwargs=dict(reducer=reducers.AvgNonZeroReducer())),
            Case("soft_triple", (5, 3), "hand", classes=4, kwargs=dict(centers_per_class=3, la=6.0, gamma=0.3)),
            # NCA: queries 0 and 6 have no positive (left out, MeanReducer counts the other 7); rank 1 alone would
            # be a batch of one query (PML's rule: no loss), the global batch is not.
            Case("nca", (5, 4), labels=(9, 1, 1, 2, 2, 2, 8, 1, 2), kwargs=dict(softmax_scale=3.0)),
            Case("nca", (8, 1), "hand", kwargs=dict(reducer=reducers.DoNothingReducer()), labels=(9, 0, 0, 1, 1, 2,
                                                                                                  2, 1, 0)),
            Case("nca", (4, 5), "hand", kwargs=dict(reduction="sum"), ref_sizes=(3, 4)),
            Case("nca", (1, 0), labels=(3,)),  # a global batch of one query: 0
            Case("lifted", (5, 6), kwargs=dict(neg_margin=0.8, pos_margin=0.1)),
            Case("lifted", (3, 7), "hand", kwargs=dict(reducer=reducers.AvgNonZeroReducer()), ref_sizes=(4, 5)),
            Case("margin", (5, 6), kwargs=dict(learn_beta=True, nu=0.1, beta=0.9)),
            Case("margin", (3, 7), "hand", kwargs=dict(reducer=reducers.AvgNonZeroReducer()), ref_sizes=(4, 5)),
            Case("margin", (4, 4), "joint", kwargs=dict(learn_beta=True, reducer=reducers.MeanReducer())),
            Case("margin", (6, 2), kwargs=dict(reduction="none")),
            Case("proxy_nca", (6, 6), classes=5),
            Case("proxy_nca", (3, 8), "hand", classes=4, kwargs=dict(reducer=reducers.DoNothingReducer())),
            Case("proxy_nca", (2, 7), "joint", classes=4, kwargs=dict(softmax_scale=2.0)),
            Case("angular", (5, 6), kwargs=dict(alpha=35)),
            Case("angular", (3, 7), "hand", kwargs=dict(reducer=reducers.AvgNonZeroReducer()), ref_sizes=(4, 5)),
            Case("angular", (4, 0), kwargs=dict(reduction="none")),
            Case("angular", (6, 3), "hand", kwargs=dict(reducer=reducers.DoNothingReducer())),
            # The lifted structure loss: a positive's index names a query of the global batch (PML's pairing).
            Case("lifted_structure", (5, 6), kwargs=dict(neg_margin=0.9, pos_margin=0.1)),
            Case("lifted_structure", (3, 7), "hand", kwargs=dict(reducer=reducers.AvgNonZeroReducer()),
                 ref_sizes=(6, 5)),
            Case("lifted_structure", (4, 0), kwargs=dict(reduction="none", distance=distances.CosineSimilarity())),
            Case("lifted_structure", (6, 3), "hand", kwargs=dict(reducer=reducers.DoNothingReducer())),
            Case("lifted_structure", (1, 2), labels=(5, 5, 7)),  # one positive and one negative pair globally: 0
            # Rank 0's queries have no positive pair (its gathered statistics' backward must still run there).
            Case("lifted_structure", (2, 3), labels=(0, 1, 2, 2, 3)),
        ]
    return [
        Case("circle", (4, 4, 4), kwargs=dict(m=0.4, gamma=80)),
        Case("circle", (2, 6, 0), "hand", kwargs=dict(reduction="sum")),
        Case("supcon", (1, 5, 3), "joint", kwargs=dict(temperature=0.3, reduction="none")),
        Case("supcon", (4, 4, 4), "hand"),
        Case("batch_hard", (2, 6, 3), kwargs=dict(reduction="mean")),
        Case("batch_hard", (4, 4, 4), "hand", reduce_scatter=True),
        Case("proxy_anchor", (4, 4, 4), classes=7),
        Case("proxy_anchor", (1, 5, 3), "hand", classes=2),
        Case("batch_hard", (2, 6, 3), kwargs=dict(reducer=reducers.MeanReducer())),
        Case("circle", (3, 0, 4), "hand", kwargs=dict(reducer=reducers.DoNothingReducer())),
        Case("proxy_anchor", (3, 4, 4), "hand", classes=2, kwargs=dict(reducer=reducers.DoNothingReducer())),
        Case("proxy_anchor", (5, 3, 4), classes=7, kwargs=dict(reducer=reducers.AvgNonZeroReducer())),
        Case("ntxent", (2, 6, 3), "hand", kwargs=dict(temperature=0.5, reducer=reducers.AvgNonZeroReducer())),
        Case("tuplet_margin", (4, 1, 4), kwargs=dict(reduction="sum", margin=-5.0, scale=10)),
        Case("batch_hard", (2, 6, 3), kwargs=dict(embedding_regularizer=regularizers.LpRegularizer())),
        Case("cosface", (3, 0, 5), "hand", classes=3,
             kwargs=dict(weight_regularizer=regularizers.RegularFaceRegularizer(), reducer=reducers.DoNothingReducer())),
        Case("contrastive", (4, 1, 4), kwargs=dict(reduction="none")),
        Case("contrastive", (3, 5, 2), "hand", kwargs=dict(neg_margin=0.8)),
        Case("triplet_margin", (4, 1, 4), kwargs=dict(reduction="none", distance=distances.CosineSimilarity())),
        Case("triplet_margin", (2, 6, 3), "hand", kwargs=dict(reduction="sum", margin=0.4)),
        Case("arcface", (2, 6, 3), "hand", classes=4, kwargs=dict(margin=40.0, scale=16)),
        Case("nca", (2, 6, 3), kwargs=dict(reducer=reducers.AvgNonZeroReducer()), labels=(0, 4, 0, 1, 1, 2, 2, 1, 0,
                                                                                           5, 2)),
        Case("proxy_nca", (4, 0, 3), "hand", classes=3, kwargs=dict(reducer=reducers.SumReducer())),
        Case("angular", (2, 6, 3), kwargs=dict(reduction="sum", alpha=50)),
        Case("angular", (3, 0, 4), "hand", kwargs=dict(reducer=reducers.DoNothingReducer()), ref_sizes=(2, 4, 3)),
        Case("lifted_structure", (2, 6, 3), kwargs=dict(reduction="sum")),
        Case("lifted_structure", (3, 0, 4), "hand", kwargs=dict(reducer=reducers.MeanReducer()), ref_sizes=(5, 2, 3)),
    ]


def _make_loss(case):
    kwargs = dict(case.kwargs, backend="reference")
    if case.loss == "circle":
        return mk.CircleLoss(**kwargs)
    if case.loss == "supcon":
        return mk.SupConLoss(**kwargs)
    if case.loss == "multi_similarity":
        return mk.MultiSimilarityLoss(**kwargs)
    if case.loss == "ntxent":
        return mk.NTXentLoss(**kwargs)
    if case.loss == "tuplet_margin":
        return mk.TupletMarginLoss(**kwargs)
    if case.loss == "contrastive":
        return mk.ContrastiveLoss(**kwargs)
    if case.loss == "triplet_margin":
        return mk.TripletMarginLoss(**kwargs)
    if case.loss == "batch_hard":
        return mk.BatchHardTripletLoss(**kwargs)
    if case.loss == "nca":
        return mk.NCALoss(**kwargs)
    if case.loss == "angular":
        return mk.AngularLoss(**kwargs)
    if case.loss == "lifted_structure":
        return mk.LiftedStructureLoss(**kwargs)
    if case.loss == "lifted":
        return mk.GeneralizedLiftedStructureLoss(**kwargs)
    if case.loss == "margin":
        return mk.MarginLoss(**kwargs).double()
    if case.loss == "proxy_nca":
        return mk.ProxyNCALoss(case.classes, D_OUT, **kwargs).double()
    if case.loss in CLASSIFIERS:
        return CLASSIFIERS[case.loss](case.classes, D_OUT, **kwargs).double()
    return mk.ProxyAnchorLoss(case.classes, D_OUT, **kwargs).double()


class _Joint(nn.Module):
    def __init__(self, model, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, data, labels):
        return self.loss(self.model(data), labels)


def _check(case, rank, world):
    g = torch.Generator().manual_seed(1000 + case.seed)
    total = sum(case.sizes)
    data = torch.randn(total, D_IN, generator=g, dtype=torch.float64)
    labels = (torch.tensor(case.labels) if case.labels is not None
              else torch.randint(0, case.classes, (total,), generator=g))
    weights = torch.randn(total, generator=g, dtype=torch.float64)  # reduction="none": a weighted sum downstream
    torch.manual_seed(case.seed)
    model = nn.Linear(D_IN, D_OUT).double()
    loss = _make_loss(case)
    refs = None
    if case.ref_sizes is not None:
        ref_data = torch.randn(sum(case.ref_sizes), D_IN, generator=g, dtype=torch.float64)
        ref_labels = torch.randint(0, case.classes, (sum(case.ref_sizes),), generator=g)
        refs = ref_data, ref_labels

    entry_weights = torch.randn(64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def objective(value, rows):
        if isinstance(value, dict):  # PML's DoNothingReducer: a weighted sum of every entry's losses
            return sum((entry["losses"].reshape(-1) * entry_weights[:entry["losses"].numel()]).sum()
                       for entry in value.values())
        return (value * weights[rows]).sum() if value.dim() else value

    # One process, the global batch.
    one_model, one_loss = copy.deepcopy(model), copy.deepcopy(loss)
    args = () if refs is None else (None, one_model(refs[0]), refs[1])
    expected = one_loss(one_model(data), labels, *args)
    objective(expected, slice(None)).backward()
    expected_grads = [p.grad for p in list(one_model.parameters()) + list(one_loss.parameters())]

    # This rank's rows, through DistributedLoss.
    lo = sum(case.sizes[:rank])
    rows = slice(lo, lo + case.sizes[rank])
    d_model, d_loss = copy.deepcopy(model), mk.DistributedLoss(copy.deepcopy(loss))
    params = list(d_model.parameters()) + list(d_loss.parameters())
    if case.how == "joint":
        joint = DDP(_Joint(d_model, d_loss))
        value = joint(data[rows], labels[rows])
    else:
        run_model, run_loss = d_model, d_loss
        if case.how == "ddp":
            run_model = DDP(d_model)
            if list(d_loss.parameters()):
                run_loss = DDP(d_loss)
        args = ()
        if refs is not None:
            lo_ref = sum(case.ref_sizes[:rank])
            ref_rows = slice(lo_ref, lo_ref + case.ref_sizes[rank])
            args = (None, run_model(refs[0][ref_rows]), refs[1][ref_rows])
        value = run_loss(run_model(data[rows]), labels[rows], *args)
    _assert_same_value(value, expected)
    objective(value, slice(None)).backward()
    if case.how == "hand":
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= world
    expected_losses = _losses(expected)
    floor = 1e-3 * max((t.detach().abs().max().item() for t in expected_losses if t.numel()), default=0.0)
    for index, (p, expected_grad) in enumerate(zip(params, expected_grads)):
        assert_rel_close(p.grad, expected_grad, TOL, f"gradient of parameter {index}", scale_floor=floor)
    if case.loss == "proxy_anchor" or case.labels is None:
        assert params[0].grad.abs().max() > 0, "the check compares zero gradients"


def _losses(value):
    """The loss tensors of a value or of PML's loss dictionary."""
    return [entry["losses"] for entry in value.values()] if isinstance(value, dict) else [value]


def _assert_same_value(value, expected):
    """A loss equals the one-process one; a dictionary has the same entries, keys, indices and divisors too."""
    assert isinstance(value, dict) == isinstance(expected, dict), (type(value), type(expected))
    if not isinstance(expected, dict):
        assert_rel_close(value, expected, TOL, "value")
        return
    assert value.keys() == expected.keys(), (value.keys(), expected.keys())
    for name, entry in expected.items():
        assert value[name].keys() == entry.keys(), (name, value[name].keys(), entry.keys())
        for key, item in entry.items():
            if key == "losses":
                assert value[name][key].shape == item.shape, (name, value[name][key].shape, item.shape)
                assert_rel_close(value[name][key], item, TOL, f"{name} losses")
            elif torch.is_tensor(item):
                assert torch.equal(value[name][key], item), (name, key, value[name][key], item)
            elif isinstance(item, tuple):  # a pair loss's (anchor, positive) indices
                assert len(value[name][key]) == len(item), (name, key)
                for ours, theirs in zip(value[name][key], item):
                    assert torch.equal(ours, theirs), (name, key, ours, theirs)
            else:
                assert value[name][key] == item, (name, key, value[name][key], item)


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    failures, checks = [], 0
    try:
        for number, case in enumerate(_cases(world)):
            case.seed = number
            original = mk_distributed._use_reduce_scatter
            if case.reduce_scatter:
                mk_distributed._use_reduce_scatter = lambda group: True
            try:
                _check(case, rank, world)
            except AssertionError as error:
                failures.append(f"rank {rank}, {case}: {error}")
            finally:
                mk_distributed._use_reduce_scatter = original
            checks += 1
    except Exception:  # a failure that may leave the ranks out of step: stop here
        failures.append(f"rank {rank}: {traceback.format_exc()}")
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump({"failures": failures, "checks": checks}, handle)
        dist.destroy_process_group()
        # The results are on disk. Leave without the interpreter's teardown: about one run in three, a native thread
        # aborted there ("terminate called without an active exception", then SIGSEGV), with this session's code and
        # with the previous session's alike (gloo / torch teardown, not the losses), failing the spawn.
        os._exit(0)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_global_batch_value_and_ddp_gradients(world, tmp_path):
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    failures = []
    for rank in range(world):
        with open(tmp_path / f"rank{rank}.json") as handle:
            report = json.load(handle)
        assert report["checks"] == len(_cases(world)), report
        failures += report["failures"]
    assert not failures, "\n".join(failures)


# Outside a process group ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["circle", "supcon", "ntxent", "tuplet_margin", "contrastive", "triplet_margin",
                                  "angular", "lifted_structure", "batch_hard", "proxy_anchor"])
def test_outside_a_process_group_it_is_the_plain_loss(name):
    assert not (dist.is_available() and dist.is_initialized())
    torch.manual_seed(0)
    loss = _make_loss(Case(name, (), classes=4, kwargs={} if name == "proxy_anchor" else dict(reduction="mean")))
    wrapped = mk.DistributedLoss(copy.deepcopy(loss))
    assert isinstance(wrapped.loss, type(loss))
    x = torch.randn(12, D_OUT, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (12,))
    expected, value = loss(x, labels), wrapped(x, labels)
    assert torch.equal(value, expected)
    inputs = [x] + list(loss.parameters())
    expected_grads = torch.autograd.grad(expected, inputs)
    grads = torch.autograd.grad(value, [x] + list(wrapped.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))


def test_rejects_other_losses_and_miners():
    with pytest.raises(TypeError, match="loss"):
        mk.DistributedLoss(nn.MSELoss())
    with pytest.raises(TypeError, match="loss"):
        mk.DistributedLoss(mk.CrossBatchMemory(mk.CircleLoss(), 4))
    with pytest.raises(NotImplementedError, match="indices_tuple"):
        mk.DistributedLoss(mk.CircleLoss())(torch.randn(3, 4), torch.tensor([0, 1, 0]), (None, None, None))


@pytest.mark.parametrize("build", [
    lambda: mk.CircleLoss(reducer=reducers.DoNothingReducer()),
    lambda: mk.SupConLoss(reducer=reducers.PerAnchorReducer(reducers.SumReducer())),
    lambda: mk.BatchHardTripletLoss(reducer=reducers.MeanReducer()),
    lambda: mk.ProxyAnchorLoss(4, D_OUT, reducer=reducers.AvgNonZeroReducer()),
    lambda: mk.ProxyAnchorLoss(4, D_OUT, reducer=reducers.DoNothingReducer()),
], ids=["circle-DoNothing", "supcon-PerAnchorSum", "batch_hard-Mean", "proxy-AvgNonZero", "proxy-DoNothing"])
def test_reducers_outside_a_process_group(build):
    """Outside a process group the wrapper is the module, whatever its reducer (the 2- and 3-process checks above
    compare each reducer with the one-process global batch)."""
    torch.manual_seed(0)
    loss = build()
    x, labels = torch.randn(10, D_OUT, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 2, 0])
    expected, value = loss.double()(x, labels), mk.DistributedLoss(loss)(x, labels)
    _assert_same_value(value, expected)


def test_rejects_a_reducer_mode_it_cannot_reproduce():
    """Every reducer the modules accept today is reproduced over the global batch; a module whose reducer mode
    DistributedLoss does not know (a reducer added to the modules later) is rejected at construction, naming it."""
    for mode in ("mean_nonzero", "mean", "sum", "none", "unreduced", "mean_over_triplets"):
        loss = mk.SupConLoss()
        loss._reducer_mode = mode
        mk.DistributedLoss(loss)
    loss = mk.SupConLoss(reducer=reducers.SumReducer())
    loss._reducer_mode = "per_class"
    with pytest.raises(NotImplementedError, match=r"DistributedLoss does not support SupConLoss\(reducer=SumReducer"
                                                  r"\(\)\) \(reducer mode 'per_class'\).*the plain reductions"):
        mk.DistributedLoss(loss)
