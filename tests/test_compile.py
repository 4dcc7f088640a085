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
    x = torch.randn(24, 8, generator=g, requires_grad=True)
    y = torch.randn(30, 8, generator=g, requires_grad=True)
    labels, y_labels = torch.randint(0, 4, (24,), generator=g), torch.randint(0, 4, (30,), generator=g)
    proxies = torch.randn(4, 8, generator=g, requires_grad=True)
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
    _check(name, "eager", 0)


@pytest.mark.heavy
@pytest.mark.parametrize("name", list(_cases()))
def test_fullgraph_inductor(name):
    _check(name, "inductor", 1e-5)


def test_proxy_label_range_is_still_checked_when_compiled():
    proxies = torch.randn(3, 4)
    compiled = torch.compile(lambda a, lab: mk.proxy_anchor_loss(a, lab, proxies), fullgraph=True, backend="eager")
    torch._dynamo.reset()
    assert torch.isfinite(compiled(torch.randn(5, 4), torch.tensor([0, 1, 2, 2, 1])))
    with pytest.raises(RuntimeError, match=r"\[0, C\)"):
        compiled(torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 1]))
