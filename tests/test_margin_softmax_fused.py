"""The fused margin-softmax classifiers (ArcFace, CosFace, SubCenterArcFace, NormalizedSoftmax, LargeMarginSoftmax,
SphereFace, SoftTriple) against the float64 reference, through the public functional API: values and gradients of the
embeddings and of W, every fused backend that computes them, ragged sizes against the kernels' tiles (several class
tiles, class splits of small batches, sub-centres), C = 1 and 2, every reduction, fp64 / fp32 at the SPEC tolerances and
fp16 / bf16 no worse than the reference run on the same half inputs + 1e-2; float64 gradcheck,
torch.compile(fullgraph=True), torch.library.opcheck, and that no tensor of N x C entries is ever made.
"""
import math
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import metric_kernels as mk
from metric_kernels import pml
from tests.helpers import assert_rel_close, grads, tf32_rounded
from tests.test_cuda_emulated import OPERAND_TOLERANCE, OPERANDS, _work
from tests.test_fused import MISSING, _fused_backend_is_built  # noqa: F401 (the autouse fixture)

# The fused backends whose kernels compute the classifiers (metric_kernels/_fused.py, CLASSIFIER_ROWS); one missing
# here fails its tests (tests/test_fused.py's autouse fixture), it is not skipped.
BACKENDS = ["triton", "cpu", "cuda-emulated"]
backend_param = pytest.mark.parametrize("backend", BACKENDS)


TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}
HALF = (torch.float16, torch.bfloat16)
LOSSES = {"arcface": dict(margin=28.6, scale=64.0), "cosface": dict(margin=0.35, scale=64.0),
          "subcenter_arcface": dict(sub_centers=3, margin=28.6, scale=64.0),
          "normalized_softmax": dict(temperature=0.05), "large_margin_softmax": dict(margin=4, scale=1.0),
          "sphereface": dict(margin=3, scale=2.0),
          "soft_triple": dict(centers_per_class=3, la=20.0, gamma=0.1, margin=0.01)}
# (N, D, classes): one row; ragged row blocks and class tiles; a small batch over many class tiles (class splits).
SIZES = [(1, 5, 1), (3, 4, 2), (37, 17, 300), (130, 33, 97), (9, 24, 1100)]


def _sub_centers(loss, params):
    return params.get("sub_centers", params.get("centers_per_class", 1))


def _inputs(seed, n, dim, classes, sub_centers):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(dim, classes * sub_centers, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    # A few rows near their class's (first) column, some near its opposite: large and small angles, and for ArcFace
    # the branch past 180 degrees - margin.
    for i in range(0, n, 4):
        column = weight[:, labels[i] * sub_centers]
        x[i] = (1 if i % 8 == 0 else -1) * column + 0.1 * x[i]
    return x, weight, labels


def _run(loss, x, labels, weight, backend, reduction="mean", **params):
    return getattr(mk, f"{loss}_loss")(x, labels, weight, backend=backend, reduction=reduction, **params)


def _compare(backend, loss, x64, weight64, labels, dtype, reduction="mean", **params):
    def run(name, cast):
        leaves = [cast(t.detach()).requires_grad_() for t in (x64, weight64)]
        value = _run(loss, leaves[0], labels, leaves[1], name, reduction, **params)
        return value, grads(value, leaves)

    ours, our_grads = run(backend, lambda t: t.to(dtype))
    expected, expected_grads = run("reference", lambda t: t.to(dtype).double())
    what = f"{backend} {loss} {dtype} N={x64.shape[0]} J={weight64.shape[1]} {reduction} {params}"
    assert ours.dtype == (torch.float32 if dtype in HALF else dtype), what
    for g in our_grads:
        assert g.dtype == dtype and torch.all(torch.isfinite(g)), what
    floor = 1e-3 * expected.detach().abs().max().item() if expected.numel() else 0.0
    if dtype in HALF:
        eager, eager_grads = run("reference", lambda t: t.to(dtype))
        value_bound = (eager.double() - expected).abs().max().item() + 1e-2 * max(expected.abs().max().item(), 1.0)
        assert (ours.double() - expected).abs().max().item() <= value_bound, what
        for index, (a, b, e) in enumerate(zip(our_grads, expected_grads, eager_grads)):
            scale = max(b.abs().max().item(), floor)
            bound = (e.double() - b).abs().max().item() + 1e-2 * scale
            assert (a.double() - b).abs().max().item() <= bound, f"{what} grad {index}"
        return
    value_rtol, grad_rtol = TOLERANCE[dtype]
    assert_rel_close(ours, expected, value_rtol, what)
    for index, (a, b) in enumerate(zip(our_grads, expected_grads)):
        assert_rel_close(a, b, grad_rtol, f"{what} grad {index}", scale_floor=floor)


@backend_param
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_equal_to_the_reference(backend, loss, dtype, size):
    n, dim, classes = size
    params = LOSSES[loss]
    x, weight, labels = _inputs(zlib.crc32(f"{loss} {size}".encode()), n, dim, classes, _sub_centers(loss, params))
    _compare(backend, loss, x, weight, labels, dtype, **params)


@backend_param
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "mean_nonzero"])
@pytest.mark.parametrize("loss", ["arcface", "subcenter_arcface"])
def test_every_reduction(backend, loss, reduction):
    params = dict(LOSSES[loss], margin=40.0, scale=16.0)
    x, weight, labels = _inputs(7, 70, 12, 150, _sub_centers(loss, params))
    _compare(backend, loss, x, weight, labels, torch.float64, reduction, **params)


@backend_param
@pytest.mark.parametrize("sub_centers", [1, 2, 4])
def test_margins_and_scales(backend, sub_centers):
    """Parameters away from the defaults (a margin near 90 degrees puts many rows past ArcFace's branch)."""
    for seed, (margin, scale) in enumerate([(0.0, 1.0), (85.0, 30.0), (10.0, 100.0)]):
        x, weight, labels = _inputs(seed, 50, 16, 77, sub_centers)
        _compare(backend, "subcenter_arcface", x, weight, labels, torch.float64, sub_centers=sub_centers,
                 margin=margin, scale=scale)
        if sub_centers == 1:
            _compare(backend, "cosface", x, weight, labels, torch.float32, margin=margin / 100, scale=scale)


@backend_param
@pytest.mark.parametrize("loss", ["large_margin_softmax", "sphereface"])
def test_multiple_angle_margins_and_scales(backend, loss):
    """LargeMarginSoftmax and SphereFace (the kernels with the rows, and for LargeMarginSoftmax W's columns, left
    raw) over angle multiples 1..6, scales around PML's default, and rows and columns of very different norms, in
    float64 and float32, with a zero row (no norm to divide by)."""
    for seed, (margin, scale) in enumerate([(1, 1.0), (2, 0.3), (5, 2.5), (6, 0.05)]):
        x, weight, labels = _inputs(100 + seed, 50, 16, 77, 1)
        g = torch.Generator().manual_seed(seed)
        x = x * torch.exp(torch.randn(50, 1, generator=g, dtype=torch.float64))
        weight = weight * torch.exp(torch.randn(1, 77, generator=g, dtype=torch.float64))
        x[7] = 0
        for dtype in (torch.float64, torch.float32):
            _compare(backend, loss, x, weight, labels, dtype, margin=margin, scale=scale)


@backend_param
@pytest.mark.parametrize("centers", [1, 2, 5])
def test_soft_triple_pools_and_distances(backend, centers):
    """SoftTriple's softmax pooling of each class's centers, from nearly the largest (small gamma) to nearly the mean
    (large gamma), on cosines and on raw products (distance="dot", normalize_embeddings=False), float64, float32 and
    the half types (fp16's gradient scale bounds the pool's weights by the raw sides' norms); rows and columns of very
    different norms, a zero row (not in the half types: normalising it has a gradient of size 1 / eps, past fp16's
    range, for PML as for us)."""
    for seed, (gamma, la, margin, distance, normalize) in enumerate([(0.02, 30.0, 0.1, "cosine", True),
                                                                    (1.0, 5.0, -0.2, "dot", True),
                                                                    (0.5, 0.2, 0.05, "dot", False)]):
        x, weight, labels = _inputs(200 + seed, 50, 16, 77, centers)
        g = torch.Generator().manual_seed(seed)
        x = x * torch.exp(torch.randn(50, 1, generator=g, dtype=torch.float64))
        weight = weight * torch.exp(torch.randn(1, 77 * centers, generator=g, dtype=torch.float64))
        for dtype in (torch.float16, torch.bfloat16):
            _compare(backend, "soft_triple", x, weight, labels, dtype, centers_per_class=centers, gamma=gamma, la=la,
                     margin=margin, distance=distance, normalize_embeddings=normalize)
        x[7] = 0
        for dtype in (torch.float64, torch.float32):
            _compare(backend, "soft_triple", x, weight, labels, dtype, centers_per_class=centers, gamma=gamma, la=la,
                     margin=margin, distance=distance, normalize_embeddings=normalize)


@backend_param
def test_strided_and_transposed_inputs(backend):
    """Embeddings that are a strided view, a weight that is a slice of a wider matrix (row stride > J)."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(40, 50, generator=g, dtype=torch.float64)
    x = wide[:, ::2]  # 40 x 25, column stride 2
    weight = torch.randn(25, 300, generator=g, dtype=torch.float64)[:, 50:250]
    labels = torch.randint(0, 200, (40,), generator=g)
    _compare(backend, "arcface", x, weight, labels, torch.float64)


@backend_param
def test_gradcheck(backend):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3 * 2, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (6,), generator=g)
    assert torch.autograd.gradcheck(
        lambda a, b: mk.subcenter_arcface_loss(a, labels, b, sub_centers=2, margin=20.0, scale=4.0, backend=backend),
        (x, weight))
    # the softmax pool's gradient, and the raw sides of LargeMarginSoftmax and SphereFace
    assert torch.autograd.gradcheck(
        lambda a, b: mk.soft_triple_loss(a, labels, b, centers_per_class=2, la=3.0, gamma=0.3, backend=backend),
        (x, weight))
    assert torch.autograd.gradcheck(
        lambda a, b: mk.large_margin_softmax_loss(a, labels, b[:, :3], margin=3, scale=0.5, backend=backend),
        (x, weight))
    assert torch.autograd.gradcheck(
        lambda a, b: mk.sphereface_loss(a, labels, b[:, :3], margin=2, scale=0.5, backend=backend), (x, weight))


class _LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@backend_param
def test_no_n_by_c_tensor(backend):
    """Forward and backward make nothing larger than W (its gradient) and nothing of N x C entries."""
    n, dim, classes = 96, 8, 4000
    x, weight, labels = _inputs(5, n, dim, classes, 1)
    x.requires_grad_(), weight.requires_grad_()
    with _LargestTensor() as mode:
        mk.arcface_loss(x, labels, weight, backend=backend).backward()
    assert mode.largest <= weight.numel() < n * classes
    with _LargestTensor() as reference:
        mk.arcface_loss(x, labels, weight, backend="reference")
    assert reference.largest >= n * classes  # the check sees the reference's logits


@backend_param
def test_compile_fullgraph(backend):
    x, weight, labels = _inputs(2, 20, 8, 30, 1)
    x.requires_grad_(), weight.requires_grad_()
    compiled = torch.compile(lambda a, b: mk.cosface_loss(a, labels, b, backend=backend), fullgraph=True)
    value = compiled(x, weight)
    expected = mk.cosface_loss(x, labels, weight, backend=backend)
    assert_rel_close(value, expected, 1e-12, "compiled")
    for a, b in zip(grads(value, [x, weight]), grads(expected, [x, weight])):
        assert_rel_close(a, b, 1e-12, "compiled grad")


@backend_param
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).split(".")[-1])
def test_opcheck(backend, dtype):
    prefix = backend.replace("-", "_")
    op = getattr(torch.ops.metric_kernels, f"{prefix}_margin_softmax_rows")
    x, weight, labels = _inputs(4, 12, 6, 10, 2)
    x, weight = x.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    for normalize_x, normalize_w, pool_scale in ((True, True, 0.0), (False, True, 0.0), (False, False, 0.0),
                                                 (True, True, 10.0), (False, False, 3.0)):
        torch.library.opcheck(op, (x, weight, labels, 2, 5.0, normalize_x, normalize_w, pool_scale, False))


@backend_param
def test_nonfinite_inputs_give_nan(backend):
    x, weight, labels = _inputs(1, 10, 4, 7, 1)
    for bad in (math.nan, math.inf):
        poisoned = weight.clone()
        poisoned[1, 3] = bad
        assert torch.isnan(mk.arcface_loss(x, labels, poisoned, backend=backend))
        poisoned_x = x.clone()
        poisoned_x[2, 0] = bad
        assert torch.isnan(mk.normalized_softmax_loss(poisoned_x, labels, weight, backend=backend))


def test_auto_picks_the_cpu_kernels_on_cpu(monkeypatch):
    monkeypatch.delenv("METRIC_KERNELS_BACKEND", raising=False)
    from metric_kernels.backends import resolve
    assert resolve("auto", torch.device("cpu"), rows="margin_softmax_rows").__name__ == "metric_kernels.cpu"


def _reference_stats(x, weight, labels, scale, sub_centers):
    """(lse_other, target_cosine) in float64, materialising the N x C cosines."""
    n, classes = x.shape[0], weight.shape[1] // sub_centers
    cosine = (torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(weight, dim=0))
    cosine = cosine.view(n, classes, sub_centers).amax(dim=2)
    target = cosine.gather(1, labels[:, None])[:, 0]
    others = (scale * cosine).masked_fill(torch.nn.functional.one_hot(labels, classes).bool(), -math.inf)
    return torch.logsumexp(others, dim=1), target


def _check_cuda_kernels(operand, sub_centers, n, dim, classes, scale, deterministic=True):
    """The ops of the CUDA kernels under the host emulation on rows of `operand`: statistics and both gradients
    against float64 on the rounded rows (tf32 rounds inside the products); deterministic=False takes dW from the dX
    pass through atomics where the kernels have that path (not fp64, D within one block's span)."""
    if "cuda-emulated" in MISSING:
        pytest.fail(f"backend 'cuda-emulated' is not usable here: {MISSING['cuda-emulated']}")
    x, weight, labels = _inputs(17, n, dim, classes, sub_centers)
    dtype = OPERANDS[operand]
    xs, ws = x.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    stats = torch.ops.metric_kernels.cuda_emulated_margin_softmax_rows(xs, ws, labels, sub_centers, scale, True, True,
                                                                       0.0, True, operand == "tf32")
    exact_rows = tf32_rounded if operand == "tf32" else (lambda t: t.to(dtype).double())
    xe, we = exact_rows(x).requires_grad_(), exact_rows(weight).requires_grad_()
    lse, target = _reference_stats(xe, we, labels, scale, sub_centers)
    value_rtol, grad_rtol = OPERAND_TOLERANCE[operand]
    assert_rel_close(stats[0], lse, value_rtol, f"{operand} lse")
    assert_rel_close(stats[1], target, value_rtol, f"{operand} target")
    upstream = torch.randn(2, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dx, dw = torch.ops.metric_kernels.cuda_emulated_margin_softmax_rows_backward(
        upstream.to(stats.dtype), stats, xs, ws, labels, sub_centers, scale, True, True, 0.0, deterministic, True,
        True, operand == "tf32")
    expected = torch.autograd.grad((upstream[0] * lse + upstream[1] * target).sum(), (xe, we))
    assert dx.dtype == dtype and dw.dtype == dtype
    assert_rel_close(dx, expected[0], grad_rtol, f"{operand} dx")
    assert_rel_close(dw, expected[1], grad_rtol, f"{operand} dw")


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
@pytest.mark.parametrize("operand", list(OPERANDS))
@pytest.mark.parametrize("sub_centers", [1, 3])
def test_cuda_kernels_on_every_operand_type(operand, sub_centers, deterministic):
    """The CUDA kernels' ops under the host emulation with the operand types only the ops reach (the backends pass
    fp32 rows for half inputs): 16-bit and tf32 tiles on the emulated tensor cores, against float64 on the rounded
    rows (tf32 rounds inside the products), in both backward modes."""
    _check_cuda_kernels(operand, sub_centers, 70, 40, 45, 6.0, deterministic)


@pytest.mark.parametrize("operand, dim, sub_centers", [("bf16", 256, 3), ("fp32", 130, 1), ("tf32", 200, 3),
                                                       ("fp16", 100, 1)])
def test_cuda_atomic_backward_across_its_span(operand, dim, sub_centers):
    """The atomic pass holds D up to 256 in one block: two slices' dX accumulators in registers, the next in shared
    memory (a ragged last slice, and a span only partly used), dW added per class tile with its columns' radial
    terms; 70 rows in two row blocks, so dW's columns take additions from two blocks."""
    _check_cuda_kernels(operand, sub_centers, 70, dim, 45, 6.0, deterministic=False)


@pytest.mark.parametrize("operand, dim, sub_centers", [("fp32", 300, 1), ("bf16", 300, 3), ("fp64", 130, 1)])
def test_cuda_backward_over_several_spans_of_d(operand, dim, sub_centers):
    """D wider than one backward block holds (256 columns; fp64: 64): blocks along D, each recomputing the product
    tiles, a ragged last span and a ragged slice within it."""
    _check_cuda_kernels(operand, sub_centers, 70, dim, 45, 6.0)


@pytest.mark.parametrize("dim", [128, 256])
@pytest.mark.parametrize("operand", ["bf16", "fp32"])
def test_cuda_matmul_equivalents_of_each_pass(operand, dim):
    """The work the CUDA kernels give a GPU, counted by the emulation: the forward forms each product tile once
    (1 matmul-equivalent, 2 N C D FLOPs); with the whole of D (up to 256) in one block, the dX pass recomputes each
    tile once and takes dS W^T from it (2), the dW pass likewise X^T dS (2), and the atomic backward takes both from
    the dX pass's tiles (3 in all, every element of dW added once per row block); every product of bf16 rows runs on
    16-bit operands, of fp32 rows on fp32 (tf32 not allowed); one exponential per (query, other class) in each
    pass."""
    if "cuda-emulated" in MISSING:
        pytest.fail(f"backend 'cuda-emulated' is not usable here: {MISSING['cuda-emulated']}")
    dtype = OPERANDS[operand]
    kind_of_dot = {"bf16": 0, "fp32": 2}[operand]  # _work's order: 16-bit, tf32, fp32, fp64
    n = classes = 128
    g = torch.Generator().manual_seed(dim)
    x, weight = torch.randn(n, dim, generator=g).to(dtype), torch.randn(dim, classes, generator=g).to(dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    ops = torch.ops.metric_kernels
    args = (x, weight, labels, 1, 10.0, True, True, 0.0, True)
    stats = ops.cuda_emulated_margin_softmax_rows(*args, False)
    upstream = torch.randn(2, n, generator=g).to(stats.dtype)

    def backward(need_dx, need_dw, deterministic=True):
        return lambda: ops.cuda_emulated_margin_softmax_rows_backward(upstream, stats, *args[:-1], deterministic,
                                                                      need_dx, need_dw, False)

    runs = {"forward": (lambda: ops.cuda_emulated_margin_softmax_rows(*args, False), 1.0, 0),
            "dX pass": (backward(True, False), 2.0, 0), "dW pass": (backward(False, True), 2.0, 0),
            "atomic backward": (backward(True, True, deterministic=False), 3.0, (n // 64) * classes * dim)}
    matmul = 2.0 * n * classes * dim
    others = n * (classes - 1)  # (query, class) pairs in the log-sum-exp: one exponential each per pass
    for name, (run, expected, expected_atomics) in runs.items():
        flops, atomics, exponentials = _work(run)
        assert flops[kind_of_dot] == sum(flops), f"{operand} {name}: products on other operand types: {flops}"
        assert flops[kind_of_dot] / matmul == expected, f"{operand} {name}: {flops[kind_of_dot] / matmul}"
        assert atomics == expected_atomics, f"{operand} {name}: {atomics} atomics"
        # the forward's two threads of a row merge their log-sum-exp states: at most 2 exponentials each
        extra = 4 * n if name == "forward" else 0
        assert others <= exponentials <= others + extra, f"{operand} {name}: {exponentials} exponentials"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("loss", ["arcface", "subcenter_arcface", "large_margin_softmax", "soft_triple"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_on_a_gpu(backend, dtype, loss, deterministic):
    """The GPU kernels against the float64 reference on the CPU (IEEE fp32 products; bf16 at the half accuracy), in
    both backward modes (Triton's default takes dW through atomics)."""
    reason = mk.available_backends("cuda")[backend]
    if reason is not None:
        pytest.fail(f"backend {backend!r} is not usable on this GPU machine: {reason}")
    params = LOSSES[loss]
    x64, weight64, labels = _inputs(23, 300, 96, 2000, _sub_centers(loss, params))
    x = x64.to("cuda", dtype).requires_grad_()
    weight = weight64.to("cuda", dtype).requires_grad_()
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        value = _run(loss, x, labels.cuda(), weight, backend, deterministic=deterministic, **params)
        ours = grads(value, [x, weight])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    leaves = [x.detach().cpu().double().requires_grad_(), weight.detach().cpu().double().requires_grad_()]
    expected = _run(loss, leaves[0], labels, leaves[1], "reference", **params)
    expected_grads = grads(expected, leaves)
    value_rtol, grad_rtol = TOLERANCE.get(dtype, (2e-2, 5e-2))
    assert_rel_close(value.cpu(), expected, value_rtol, f"{backend} {loss} {dtype}")
    floor = 1e-3 * expected.abs().item()
    for index, (a, b) in enumerate(zip(ours, expected_grads)):
        assert_rel_close(a.cpu(), b, grad_rtol, f"{backend} {loss} {dtype} grad {index}", scale_floor=floor)


@pytest.mark.skipif(not pml.is_available(), reason="pytorch-metric-learning is not installed")
@pytest.mark.parametrize("loss", list(LOSSES))
def test_the_benchmarks_pml_oracles_equal_the_reference(loss):
    """metric_kernels.pml's classifier calls (the benchmark's "pml" provider: PML's module given our W) compute PML's
    loss: equal to the reference in float64, values and gradients."""
    params = LOSSES[loss]
    x, weight, labels = _inputs(31, 40, 16, 90, _sub_centers(loss, params))
    leaves = [x.requires_grad_(), weight.requires_grad_()]
    theirs = getattr(pml, f"{loss}_loss")(leaves[0], labels, leaves[1], **params)
    ours = _run(loss, leaves[0], labels, leaves[1], "reference", **params)
    assert_rel_close(theirs, ours, 1e-10, loss)
    for a, b in zip(grads(theirs, leaves), grads(ours, leaves)):
        assert_rel_close(a, b, 1e-10, f"{loss} grad", scale_floor=1e-3 * ours.item())
