"""The GPU backends on a CUDA GPU (skipped elsewhere, with the reason): backend="triton" compiled and backend="cuda"
(csrc/cuda), each through the same checks. Run on a GPU machine with `TRITON_INTERPRET=0 python -m pytest tests -m gpu`
(bench/gpu_run.sh does, with METRIC_KERNELS_REQUIRE_CUDA_BACKEND=1 so that a missing CUDA build fails instead of
skipping).

- bf16, fp16 and tf32 within the eager reference's own error in that precision plus 1e-2, fp32 (IEEE) at 1e-5 / 1e-4;
- N up to 65536 against a row-chunked reference;
- the deterministic backward bitwise stable over 5 runs;
- memory: at N = M = 32768, D = 256, bf16, forward + backward allocate less than 128 MiB beyond inputs and gradients.
"""
import contextlib
import os

import pytest
import torch

import metric_kernels as mk
from metric_kernels import reference
from metric_kernels.functional import _prepare
from tests.helpers import assert_rel_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"),
]
GPU_BACKENDS = ["triton", "cuda"]


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    """Each GPU backend, or a skip saying why it cannot run here."""
    name = request.param
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton's interpreter is on: run the GPU tests with TRITON_INTERPRET=0")
    reason = mk.available_backends("cuda")[name]
    if reason is not None:
        if name == "cuda" and os.environ.get("METRIC_KERNELS_REQUIRE_CUDA_BACKEND") == "1":
            pytest.fail(f"backend 'cuda' is required here but unusable: {reason}")
        pytest.skip(f"backend {name!r} is unusable here: {reason}")
    return name
# the tuplet margin loss: NT-Xent's kernels through the angular margin's branch; the triplet margin loss: its own
# forward kernels and the engine's backward with its kind; the angular loss: NCA's kernels on 16-bit pair centres
LOSSES = ["circle", "supcon", "batch_hard_triplet", "proxy_anchor", "tuplet_margin", "triplet_margin", "angular"]
PARAMS = {"circle": dict(m=0.25, gamma=128.0), "supcon": dict(temperature=0.1), "tuplet_margin": dict(scale=32.0),
          "batch_hard_triplet": dict(margin=0.2), "proxy_anchor": dict(margin=0.1, alpha=32.0),
          "triplet_margin": dict(margin=0.2, smooth_loss=True), "angular": dict(alpha=45.0)}


@contextlib.contextmanager
def matmul_precision(value):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _inputs(loss, n, dim, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, dim, device="cuda", generator=g).to(dtype)
    labels = torch.randint(0, max(2, n // 8), (n,), device="cuda", generator=g)
    if loss == "proxy_anchor":
        return [x, torch.randn(max(2, n // 8), dim, device="cuda", generator=g).to(dtype)], labels
    return [x, torch.randn(n + 7, dim, device="cuda", generator=g).to(dtype)], labels


def _loss(loss, leaves, labels, backend, **kwargs):
    if loss == "proxy_anchor":
        return mk.proxy_anchor_loss(leaves[0], labels, leaves[1], backend=backend, **PARAMS[loss], **kwargs)
    y_labels = torch.arange(leaves[1].shape[0], device=labels.device) % max(2, labels.shape[0] // 8)
    return getattr(mk, f"{loss}_loss")(leaves[0], labels, leaves[1], y_labels, backend=backend, **PARAMS[loss],
                                       **kwargs)


def _value_and_grads(loss, leaves, labels, backend, cast, **kwargs):
    leaves = [cast(t.detach()).requires_grad_() for t in leaves]
    value = _loss(loss, leaves, labels, backend, **kwargs)
    return value, torch.autograd.grad(value, leaves)


def _error(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("precision", ["bf16", "fp16", "tf32", "ieee"])
@pytest.mark.parametrize("loss", LOSSES)
def test_matches_reference_in_every_precision(backend, loss, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    leaves, labels = _inputs(loss, 1000, 128, dtype)
    with matmul_precision("high" if precision == "tf32" else "highest"):
        ours, our_grads = _value_and_grads(loss, leaves, labels, backend, lambda t: t)
        eager, eager_grads = _value_and_grads(loss, leaves, labels, "reference", lambda t: t)
    exact, exact_grads = _value_and_grads(loss, leaves, labels, "reference", lambda t: t.double())
    if precision == "ieee":
        assert_rel_close(ours, exact, 1e-5, f"{loss} value")
        for a, b in zip(our_grads, exact_grads):
            assert_rel_close(a, b, 1e-4, f"{loss} grad", scale_floor=1e-3 * exact.abs().item())
        return
    assert _error(ours, exact) <= _error(eager, exact) + 1e-2
    for a, b, c in zip(our_grads, eager_grads, exact_grads):
        assert _error(a, c) <= _error(b, c) + 1e-2


def chunked_reference_rows(loss, x, labels, chunk=2048, **params):
    """Per-row losses of the self-referencing batch from the reference, `chunk` query rows at a time (memory
    chunk x N instead of N x N): query rows [a, b) against all rows, the query's own row left out by self_offset=a.
    Differentiable; on the CPU, tests/test_triton.py checks it against the unchunked reference."""
    unit = _prepare(x, torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype,
                    normalize=loss != "batch_hard_triplet" or params.get("normalize_embeddings", True))
    rows_fn = getattr(reference, f"{loss.replace('_triplet', '')}_rows")
    params = {k: v for k, v in params.items() if k != "normalize_embeddings"}
    if loss == "batch_hard_triplet":
        params.setdefault("soft", False)
    pieces = [rows_fn(unit[a:a + chunk], unit, labels[a:a + chunk], labels, a, deterministic=True, **params)
              for a in range(0, x.shape[0], chunk)]
    return torch.cat(pieces)


@pytest.mark.parametrize("n", [16384, 65536])
@pytest.mark.parametrize("loss", ["circle", "supcon", "batch_hard_triplet"])
def test_large_batches_against_chunked_reference(backend, loss, n):
    g = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(n, 128, device="cuda", generator=g)
    labels = torch.randint(0, n // 4, (n,), device="cuda", generator=g)
    params = dict(PARAMS[loss])
    ours = getattr(mk, f"{loss}_loss")(x, labels, reduction="none", backend=backend, **params)
    if loss == "supcon":
        params.pop("base_temperature", None)
    expected = chunked_reference_rows(loss, x.double(), labels, chunk=1024, **params)
    assert_rel_close(ours, expected, 1e-4, f"{loss} N={n} rows")


@pytest.mark.parametrize("loss", LOSSES)
def test_deterministic_backward_is_bitwise_stable(backend, loss):
    leaves, labels = _inputs(loss, 4000, 128, torch.bfloat16, seed=3)
    runs = [_value_and_grads(loss, leaves, labels, backend, lambda t: t, deterministic=True) for _ in range(5)]
    for value, grads in runs[1:]:
        assert torch.equal(value, runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))


# triton.testing.do_bench, which the autotuner times its configs with, allocates a 256 MiB buffer to clear the L2 cache
# before each timing: the first call at a new autotune key (a new size bucket) holds it for a moment.
AUTOTUNE_FLUSH_BYTES = 256 * 2**20


@pytest.mark.parametrize("loss", ["circle", "supcon", "batch_hard_triplet"])
def test_memory_stays_linear(backend, loss):
    """N = M = 32768, D = 256, bf16: one N x N bf16 matrix alone would be 2 GiB. A training step (the second: the
    first autotunes) allocates less than 128 MiB beyond inputs and gradients; the first, at most the autotuner's L2
    flush buffer more."""
    import gc
    n, dim = 32768, 256
    x = torch.randn(n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 4096, (n,), device="cuda")
    gc.collect()  # earlier tests' tensors, freed during this one, would hide part of its peak
    extras = []
    for _ in range(2):
        x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        getattr(mk, f"{loss}_loss")(x, labels, backend=backend, **PARAMS[loss]).backward()
        torch.cuda.synchronize()
        extras.append(torch.cuda.max_memory_allocated() - baseline - x.grad.numel() * x.grad.element_size())
    first, step = extras
    assert step < 128 * 2**20, f"{loss}: {step / 2**20:.1f} MiB beyond inputs and gradients"
    assert first < 128 * 2**20 + AUTOTUNE_FLUSH_BYTES, f"{loss}: first call {first / 2**20:.1f} MiB"


def test_auto_picks_triton_on_cuda():
    """Never "cuda": it joins "auto" only after this suite has passed on a GPU (metric_kernels/cuda.py)."""
    from metric_kernels import backends
    assert backends.resolve("auto", torch.device("cuda")).__name__ == "metric_kernels.triton"
