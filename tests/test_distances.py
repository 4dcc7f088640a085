"""The log-sum-exp losses on PML's other distances (the engine's pair values, metric_kernels/_pairs.py): the dot
product of the rows as they are, and LpDistance(power=1 or 2), normalised or not, for SupCon and Proxy-Anchor.

The reference against PML (values and gradients, float64); every fused backend against the reference (the same cases
as tests/test_fused.py: fp32 at SPEC tolerances, fp64, half precision no worse than the eager reference in that
precision + 1e-2, the deterministic and atomic backward paths, rows whose norm is clamped); a backend that does not
list a pair value in its PAIR_VALUES refuses it by name and "auto" passes over it.
"""
import pytest
import torch
from pytorch_metric_learning import distances, losses

import metric_kernels as mk
from metric_kernels import backends
from tests.helpers import assert_rel_close, grads
from tests.test_fused import BACKENDS, HALF, _compare, _pair_inputs

DISTANCES = [("dot", False), ("euclidean", True), ("euclidean", False), ("squared_euclidean", True),
             ("squared_euclidean", False)]
IDS = [f"{d}-{'normalized' if n else 'raw'}" for d, n in DISTANCES]
PAIR_VALUES = {"dot": 0, "euclidean": 2, "squared_euclidean": 1}
LOSSES = ["supcon", "proxy_anchor"]


def _pml_distance(distance, normalize):
    if distance == "dot":
        return distances.DotProductSimilarity(normalize_embeddings=normalize)
    return distances.LpDistance(normalize_embeddings=normalize, power=1 if distance == "euclidean" else 2)


def _computes(backend, distance):
    module, _ = backends._load(backend)
    return module is not None and backends.computes(module, PAIR_VALUES[distance])


COMPUTED = [(b, d, n) for b in BACKENDS for d, n in DISTANCES]
COMPUTED_IDS = [f"{b}-{d}-{'normalized' if n else 'raw'}" for b, d, n in COMPUTED]


@pytest.mark.parametrize("distance,normalize", DISTANCES, ids=IDS)
@pytest.mark.parametrize("refs", [False, True], ids=["self", "ref_emb"])
def test_reference_supcon_equals_pml(distance, normalize, refs):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 10, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, 4, (24,), generator=g)
    y = torch.randn(31, 10, generator=g, dtype=torch.float64).requires_grad_()
    y_labels = torch.randint(0, 4, (31,), generator=g)
    ref = (y, y_labels) if refs else (None, None)
    ours = mk.supcon_loss(x, labels, *ref, temperature=0.3, distance=distance, normalize_embeddings=normalize,
                          backend="reference")
    theirs = losses.SupConLoss(temperature=0.3, distance=_pml_distance(distance, normalize))(x, labels, None, *ref)
    leaves = [x, y] if refs else [x]
    assert_rel_close(ours, theirs, 1e-10, "value")
    for a, b in zip(grads(ours, leaves), grads(theirs, leaves)):
        assert_rel_close(a, b, 1e-10, "gradient")


@pytest.mark.parametrize("distance,normalize", DISTANCES, ids=IDS)
def test_reference_proxy_anchor_equals_pml(distance, normalize):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 10, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, 5, (30,), generator=g)
    torch.manual_seed(0)
    pml = losses.ProxyAnchorLoss(6, 10, margin=0.2, alpha=8, distance=_pml_distance(distance, normalize)).double()
    proxies = pml.proxies.detach().clone().requires_grad_()
    ours = mk.proxy_anchor_loss(x, labels, proxies, margin=0.2, alpha=8, distance=distance,
                                normalize_embeddings=normalize, backend="reference")
    theirs = pml(x, labels)
    assert_rel_close(ours, theirs, 1e-10, "value")
    for a, b in zip(grads(ours, [x, proxies]), grads(theirs, [x, pml.proxies])):
        assert_rel_close(a, b, 1e-10, "gradient")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss,refs", [("supcon", "self"), ("supcon", "ref_emb"), ("supcon", "self_offset"),
                                       ("multi_similarity", "ref_emb"),
                                       ("proxy_anchor", "self")])  # Proxy-Anchor's references are its proxies
@pytest.mark.parametrize("distance,normalize", DISTANCES, ids=IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_backends_match_reference(backend, loss, distance, normalize, refs, dtype):
    size = (37, 65, 17)
    seed = 11 + IDS.index(f"{distance}-{'normalized' if normalize else 'raw'}")
    leaves, labels, y_labels, offset, _ = _pair_inputs(seed, *size, classes=5, refs=refs, dtype=dtype)
    if loss == "proxy_anchor":
        leaves = [leaves[0], torch.randn(5, size[2], generator=torch.Generator().manual_seed(seed + 100),
                                         dtype=torch.float64)]
    if not normalize:  # raw rows of moderate length keep the logits in the range the losses are used at
        leaves = [t * 0.3 for t in leaves]
    assert _computes(backend, distance), f"backend {backend!r} lists no pair value {PAIR_VALUES[distance]}"
    _compare(backend, loss, leaves, labels, y_labels, offset, dtype, distance=distance,
             normalize_embeddings=normalize)


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("distance,normalize", [("euclidean", True), ("squared_euclidean", False)],
                         ids=["euclidean", "squared_euclidean-raw"])
@pytest.mark.parametrize("loss", LOSSES)
def test_triton_half_precision(loss, distance, normalize, dtype):
    """16-bit rows on 16-bit products: fp16's gradient scale keeps its headroom for the Euclidean distance's 1 / d."""
    leaves, labels, y_labels, offset, _ = _pair_inputs(21, 70, 90, 40, classes=4, refs="ref_emb", dtype=dtype)
    if loss == "proxy_anchor":
        leaves = [leaves[0], leaves[1][:4]]
    if not normalize:
        leaves = [t * 0.3 for t in leaves]
    _compare("triton", loss, leaves, labels, y_labels, offset, dtype, distance=distance,
             normalize_embeddings=normalize)


@pytest.mark.parametrize("backend,distance,normalize", COMPUTED, ids=COMPUTED_IDS)
def test_deterministic_and_atomic_backward_agree(backend, distance, normalize):
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(50, 24, generator=g), torch.randn(70, 24, generator=g)
    labels, y_labels = torch.randint(0, 6, (50,), generator=g), torch.randint(0, 6, (70,), generator=g)
    found = []
    for deterministic in (True, False):
        inputs = [x.clone().requires_grad_(), y.clone().requires_grad_()]
        value = mk.supcon_loss(inputs[0], labels, inputs[1], y_labels, distance=distance,
                               normalize_embeddings=normalize, backend=backend, deterministic=deterministic)
        found.append([value] + grads(value, inputs))
    for a, b in zip(*found):
        assert_rel_close(a, b, 1e-5, "atomic vs deterministic")


@pytest.mark.parametrize("backend,distance,normalize", COMPUTED, ids=COMPUTED_IDS)
def test_rows_with_clamped_norms(backend, distance, normalize):
    """Zero rows and rows of norm below eps (normalised: scaled by 1 / eps, not to unit length): the |u|^2 terms of
    the distance carry a gradient there."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64)
    y = torch.randn(25, 6, generator=g, dtype=torch.float64)
    x[3], y[5], y[7] = 0.0, 1e-14 * torch.randn(6, generator=g, dtype=torch.float64), 0.0
    labels, y_labels = torch.randint(0, 3, (20,), generator=g), torch.randint(0, 3, (25,), generator=g)
    _compare(backend, "supcon", [x, y], labels, y_labels, None, torch.float64, distance=distance,
             normalize_embeddings=normalize)


def test_auto_passes_over_a_backend_without_the_distance(monkeypatch):
    """A backend that does not list a pair value (as the native ones did not at first) is refused by name and passed
    over by "auto"."""
    module, _ = backends._load("cpu")
    monkeypatch.setattr(module, "PAIR_VALUES", (0,))
    x, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(NotImplementedError, match="backend 'cpu' does not compute Euclidean distances"):
        mk.supcon_loss(x, labels, distance="euclidean", backend="cpu")
    assert backends.resolve("auto", torch.device("cpu"), 2) is not module
    assert backends.resolve("auto", torch.device("cpu"), 0) is module
    expected = mk.supcon_loss(x, labels, distance="euclidean", backend="reference")
    assert_rel_close(mk.supcon_loss(x, labels, distance="euclidean"), expected, 1e-6, "auto")


@pytest.mark.parametrize("bad,message", [
    (dict(distance="cosine", normalize_embeddings=False), "normalize_embeddings=False contradicts distance='cosine'"),
    (dict(distance="manhattan"), "distance must be one of"),
    (dict(distance="euclidean", normalize_embeddings=1), "normalize_embeddings must be True or False"),
])
def test_bad_distance_arguments(bad, message):
    x, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    error = TypeError if "True or False" in message else ValueError
    with pytest.raises(error, match=message):
        mk.supcon_loss(x, labels, **bad)
    with pytest.raises(error, match=message):
        mk.proxy_anchor_loss(x, labels, torch.randn(3, 3), **bad)
