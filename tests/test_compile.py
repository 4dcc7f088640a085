"""torch.compile(fullgraph=True) traces every loss: no graph breaks (no host syncs, no untraceable Python) on the way
from the public API to the backend. The default run checks the trace (backend="eager"); inductor's full compile is
slow on 2 cores and runs under `-m heavy`."""
import os
import tempfile

import pytest
import torch

import metric_kernels as mk
from tests.helpers import assert_rel_close

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "metric_kernels_inductor"))


def _cases():
    g = torch.Generator().manual_seed(0)
    # float64: compiled graphs normalise with F.normalize, eager code with a memory-lean autograd.Function; the two
    # gradient formulas are equal and round differently, by ~1e-16 here.
    x = torch.randn(24, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels, y_labels = torch.randint(0, 4, (24,), generator=g), torch.randint(0, 4, (30,), generator=g)
    proxies = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    return {
        "circle": (lambda a, b: mk.circle_loss(a, labels, b, y_labels), (x, y)),
        "supcon": (lambda a, b: mk.supcon_loss(a, labels, b, y_labels, self_offset=2, base_temperature=0.07), (x, y)),
        "batch_hard": (lambda a: mk.batch_hard_triplet_loss(a, labels, soft=True, reduction="mean"), (x,)),
        "proxy_anchor": (lambda a, p: mk.proxy_anchor_loss(a, labels, p), (x, proxies)),
        "circle_module": (lambda a: mk.CircleLoss(reduction="none")(a, labels).sum(), (x,)),
    }


def _check(name, compiler, rtol):
    fn, inputs = _cases()[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    value, expected = compiled(*inputs), fn(*inputs)
    assert_rel_close(value, expected, rtol, f"{name} value")
    for a, b in zip(torch.autograd.grad(value, inputs), torch.autograd.grad(expected, inputs)):
        assert_rel_close(a, b, rtol, f"{name} grad")


@pytest.mark.parametrize("name", list(_cases()))
def test_fullgraph_trace(name):
    _check(name, "eager", 1e-12)


@pytest.mark.heavy
@pytest.mark.parametrize("name", list(_cases()))
def test_fullgraph_inductor(name):
    _check(name, "inductor", 1e-10)


def test_proxy_label_range_is_still_checked_when_compiled():
    proxies = torch.randn(3, 4)
    compiled = torch.compile(lambda a, lab: mk.proxy_anchor_loss(a, lab, proxies), fullgraph=True, backend="eager")
    torch._dynamo.reset()
    assert torch.isfinite(compiled(torch.randn(5, 4), torch.tensor([0, 1, 2, 2, 1])))
    with pytest.raises(RuntimeError, match=r"\[0, C\)"):
        compiled(torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 1]))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("loss", ["circle", "supcon", "batch_hard", "proxy_anchor"])
def test_dynamic_shapes_compile_once(loss, backend):
    """dynamic=True: one graph serves every batch size (no recompile per N), forward and backward."""
    from torch._dynamo.utils import counters
    proxies = torch.randn(5, 8, requires_grad=True)
    fn = {"circle": lambda a, lab: mk.circle_loss(a, lab, backend=backend),
          "supcon": lambda a, lab: mk.supcon_loss(a, lab, backend=backend),
          "batch_hard": lambda a, lab: mk.batch_hard_triplet_loss(a, lab, reduction="mean", backend=backend),
          "proxy_anchor": lambda a, lab: mk.proxy_anchor_loss(a, lab, proxies, backend=backend)}[loss]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (20, 33, 47):
        x, labels = torch.randn(n, 8, requires_grad=True), torch.randint(0, 5, (n,))
        value = compiled(x, labels)
        assert_rel_close(value, fn(x, labels), 1e-6, f"{loss} N={n}")
        value.backward()
    assert counters["stats"]["unique_graphs"] == 1
