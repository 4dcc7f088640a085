"""The Triton backend's margin-softmax rows (ArcFace, CosFace, SubCenterArcFace, NormalizedSoftmax), under the
interpreter: both statistics and the gradients of x and W, for random upstream gradients of both, against the plain
float64 formula (the N x C cosines materialised, a masked log-sum-exp, a gather) on fresh seeded inputs: fp64, fp32,
bf16 and fp16, one to three sub-centres, ragged sizes over several class tiles and splits, one or two classes,
strided x and W, D on chip and wider than the widest tile, clamped norms, fp16's gradient scale; and equal to the cpu
backend in fp64."""
import pytest
import torch
import torch.nn.functional as F

import metric_kernels as mk
from metric_kernels.triton import ops
from tests.helpers import assert_rel_close

pytestmark = pytest.mark.skipif(mk.available_backends("cpu")["triton"] is not None,
                                reason=f"{mk.available_backends('cpu')['triton']}")

SCALE = 30.0


def _triton():
    import metric_kernels.triton as backend
    return backend


def formula(x, weight, labels, sub_centers, scale=SCALE):
    """(lse, target) in the inputs' dtype, eagerly: cos = normalise(x) normalise(W), each class's largest
    sub-centre (the first of equal ones: its gradient goes there, as in the kernels; amax would share it), the
    log-sum-exp of scale * cos over the other classes, the label's cosine."""
    cosine = (F.normalize(x, dim=1) @ F.normalize(weight, dim=0)).view(x.shape[0], -1, sub_centers)
    cosine = cosine.gather(2, cosine.argmax(dim=2, keepdim=True))[:, :, 0]
    label = F.one_hot(labels, cosine.shape[1]).bool()
    return (torch.logsumexp((scale * cosine).masked_fill(label, float("-inf")), dim=1),
            cosine.gather(1, labels[:, None])[:, 0])


def _outputs(function, x, weight, labels, sub_centers, upstream):
    """(lse, target, dx, dw): the statistics and the gradients of sum(g_lse lse + g_target target) (lse taken where
    finite: with one class it is -inf)."""
    leaves = [x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
    lse, target = function(*leaves, labels, sub_centers)
    finite = torch.isfinite(lse.detach())
    loss = (torch.where(finite, lse, 0) * upstream[0]).sum() + (target * upstream[1]).sum()
    return (lse, target, *torch.autograd.grad(loss, leaves))


def triton_rows(deterministic):
    """The backend's rows in one backward mode: default (dW through atomics from the row pass's tiles when dX is
    needed too, as here) or deterministic (dW from the column pass)."""
    def rows(x, weight, labels, sub_centers):
        return _triton().margin_softmax_rows(x, weight, labels, scale=SCALE, sub_centers=sub_centers,
                                             deterministic=deterministic)
    return rows


both_modes = pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])


def _case(seed, n, classes, d, sub_centers, dtype=torch.float64, strided=False, magnitude=1.0):
    """x (N x D, with a row stride when `strided`), W (D x C K, a transposed view when `strided`), labels, the two
    upstream gradients."""
    g = torch.Generator().manual_seed(seed)
    x = (magnitude * torch.randn(n, d + (7 if strided else 0), generator=g, dtype=torch.float64)).to(dtype)[:, :d]
    columns = classes * sub_centers
    weight = (magnitude * (torch.randn(columns, d, generator=g, dtype=torch.float64) if strided
                           else torch.randn(d, columns, generator=g, dtype=torch.float64))).to(dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    upstream = torch.randn(2, n, generator=g, dtype=torch.float64)
    return x, weight.t() if strided else weight, labels, upstream


# (N, C, D, K, strided): 64-row blocks and 64-class tiles under the interpreter; the interpreter's 4 stand-in SMs
# (ops.INTERPRETER_SM_COUNT) split 300 classes of one or two row blocks across 3 programs.
CASES = [(40, 300, 24, 1, False), (130, 300, 20, 1, True), (70, 130, 20, 3, False), (45, 150, 16, 2, True),
         (33, 1, 12, 1, False), (20, 1, 8, 3, False), (50, 2, 10, 1, False), (17, 2, 9, 2, True)]


@pytest.fixture
def no_tf32():
    """fp32 products in full precision (the kernels follow torch's setting on a GPU; the interpreter is exact)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def test_cases_cover_tiles_and_splits():
    """The cases above take the paths they are meant to: several class tiles and class splits (the forward's merge,
    dX's partial sums), one split of several tiles."""
    cpu = torch.device("cpu")
    assert ops._configs()[0].kwargs == {"BLOCK_M": 64, "BLOCK_N": 64}
    assert ops.reference_splits(40, 300, cpu) == 3 and ops.reference_splits(130, 300, cpu) == 3
    assert ops.reference_splits(70, 130, cpu) == 2 and ops.reference_splits(45, 150, cpu) == 2
    assert ops.reference_splits(50, 70, cpu) == 1


def _ids(cases):
    return [f"n{n}-c{c}-d{d}-k{k}" + ("-strided" if s else "") for n, c, d, k, s in cases]


def _check(ours, exact, tol_value, tol_grad, what):
    lse, target, dx, dw = ours
    assert lse.dtype == target.dtype == ops.stats_dtype(dx.dtype)
    finite = torch.isfinite(exact[0])
    assert torch.equal(torch.isfinite(lse.detach()), finite), f"{what}: lse finite pattern"
    assert torch.all(lse.detach()[~finite] == float("-inf")), f"{what}: lse of a single class"
    assert_rel_close(lse[finite], exact[0][finite], tol_value, f"{what} lse")
    assert_rel_close(target, exact[1], tol_value, f"{what} target")
    for name, a, b in (("dx", dx, exact[2]), ("dw", dw, exact[3])):
        assert_rel_close(a, b, tol_grad, f"{what} {name}", scale_floor=1e-3 * b.abs().max().item())


@both_modes
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n, classes, d, sub_centers, strided", CASES, ids=_ids(CASES))
def test_matches_float64_formula(n, classes, d, sub_centers, strided, dtype, deterministic, no_tf32):
    x, weight, labels, upstream = _case(n * 1000 + classes, n, classes, d, sub_centers, dtype, strided)
    assert x.is_contiguous() != strided and weight.is_contiguous() != strided
    ours = _outputs(triton_rows(deterministic), x, weight, labels, sub_centers, upstream.to(ops.stats_dtype(dtype)))
    exact = _outputs(formula, x.double(), weight.double(), labels, sub_centers, upstream)
    assert ours[2].dtype == ours[3].dtype == dtype
    tol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 1e-4)
    _check(ours, exact, *tol, f"{dtype}")


@both_modes
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sub_centers", [1, 2])
def test_rows_wider_than_one_tile(dtype, sub_centers, deterministic, no_tf32):
    """D above the widest whole-D tile: the cosines over D chunks, the gradients per D block."""
    d = ops.MAX_FULL_D[dtype.itemsize] + 44
    x, weight, labels, upstream = _case(7 + sub_centers, 50, 70, d, sub_centers, dtype)
    ours = _outputs(triton_rows(deterministic), x, weight, labels, sub_centers, upstream.to(ops.stats_dtype(dtype)))
    exact = _outputs(formula, x.double(), weight.double(), labels, sub_centers, upstream)
    tol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 1e-4)
    _check(ours, exact, *tol, f"{dtype} D={d}")


@both_modes
def test_clamped_norms(deterministic):
    """A row of x and a column of W of norm below eps: divided by eps, no radial part (as F.normalize)."""
    x, weight, labels, upstream = _case(5, 30, 90, 16, 2)
    x[3] = 0.0
    x[7] *= 1e-14
    weight[:, 5] = 0.0
    weight[:, 8] *= 1e-14
    ours = _outputs(triton_rows(deterministic), x, weight, labels, 2, upstream)
    exact = _outputs(formula, x, weight, labels, 2, upstream)
    _check(ours, exact, 1e-10, 1e-10, "clamped")


def _relative_error(a, b):
    """max |a - b| / max |b|, b the float64 result."""
    return ((a.detach().double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype, magnitude", [(torch.bfloat16, 1.0), (torch.float16, 1.0), (torch.float16, 1000.0)])
@pytest.mark.parametrize("sub_centers", [1, 3])
@both_modes
def test_half_inputs(dtype, magnitude, sub_centers, deterministic):
    """16-bit x and W: statistics in fp32, gradients in the inputs' dtype, no worse against float64 than the same
    formula in eager torch in that dtype, + 1e-2. Rows and columns of norm ~5000 (magnitude 1000) make
    P = dS r_i r_j about 1e-8, below fp16's range: the kernels scale it by a power of two."""
    x, weight, labels, upstream = _case(int(magnitude) + sub_centers, 60, 100, 32, sub_centers, dtype,
                                        magnitude=magnitude)
    ours = _outputs(triton_rows(deterministic), x, weight, labels, sub_centers, upstream.float())
    eager = _outputs(formula, x, weight, labels, sub_centers, upstream.to(dtype))
    exact = _outputs(formula, x.double(), weight.double(), labels, sub_centers, upstream)
    assert ours[0].dtype == torch.float32 and ours[2].dtype == ours[3].dtype == dtype
    for name, a, b, c in zip(("lse", "target", "dx", "dw"), ours, eager, exact):
        assert c.abs().max() > 0
        error = _relative_error(a, c)
        assert error <= _relative_error(b, c) + 1e-2, f"{name}: relative error {error:.2e}"


@both_modes
def test_equals_cpu_backend(deterministic):
    import metric_kernels.cpu as cpu
    if not hasattr(cpu, "margin_softmax_rows"):
        pytest.skip(cpu.unavailable_reason(torch.device("cpu")))

    def cpu_rows(x, weight, labels, sub_centers):
        return cpu.margin_softmax_rows(x, weight, labels, scale=SCALE, sub_centers=sub_centers, deterministic=True)

    for seed, (n, classes, d, sub_centers) in enumerate([(70, 300, 24, 1), (40, 130, 20, 3), (9, 1, 5, 2)]):
        x, weight, labels, upstream = _case(seed, n, classes, d, sub_centers)
        _check(_outputs(triton_rows(deterministic), x, weight, labels, sub_centers, upstream),
               _outputs(cpu_rows, x, weight, labels, sub_centers, upstream), 1e-12, 1e-12, f"cpu {n, classes}")


def test_ops_gradients_and_nan():
    """The backward op's unneeded gradient has 0 rows; a NaN in a column reaches every row's log-sum-exp (the
    class with the NaN is no row's label) and a label outside [0, C) gives a NaN target."""
    x, weight, labels, upstream = _case(3, 20, 70, 8, 1)
    labels = labels.clamp(max=68)
    stats = torch.ops.metric_kernels.triton_margin_softmax_rows(x, weight, labels, 1, SCALE, True, True, 0.0, True)
    grad = upstream.contiguous()
    dx, dw = torch.ops.metric_kernels.triton_margin_softmax_rows_backward(grad, stats, x, weight, labels, 1, SCALE,
                                                                         True, True, 0.0, True, True, False)
    assert dx.shape == x.shape and dw.shape == (0, 70)
    dx, dw = torch.ops.metric_kernels.triton_margin_softmax_rows_backward(grad, stats, x, weight, labels, 1, SCALE,
                                                                         True, True, 0.0, True, False, True)
    assert dx.shape == (0, 8) and dw.shape == weight.shape
    weight[2, 69] = float("nan")
    stats = torch.ops.metric_kernels.triton_margin_softmax_rows(x, weight, labels, 1, SCALE, True, True, 0.0, True)
    assert stats[0].isnan().all() and not stats[1].isnan().any()
    labels[4] = 70
    stats = torch.ops.metric_kernels.triton_margin_softmax_rows(x, weight, labels, 1, SCALE, True, True, 0.0, True)
    assert stats[1].isnan().tolist() == [i == 4 for i in range(20)]


def test_refuses_what_the_contract_does_not_allow():
    x, weight, labels, _ = _case(6, 4, 6, 8, 2)
    op = torch.ops.metric_kernels.triton_margin_softmax_rows
    for args, message in (((x, weight.float(), labels, 2), "one dtype"), ((x, weight, labels, 5), "whole number"),
                          ((x, weight[:5], labels, 2), "N x D"), ((x, weight, labels.int(), 2), "int64"),
                          ((x, weight, labels[:3], 2), "one per row")):
        with pytest.raises(ValueError, match=message):
            op(*args, SCALE, True, True, 0.0, True)


@both_modes
def test_opcheck(deterministic):
    x, weight, labels, upstream = _case(4, 12, 70, 8, 2, torch.float32)
    for normalize_x, normalize_w, pool_scale in ((True, True, 0.0), (False, True, 0.0), (False, False, 0.0),
                                                 (True, True, 10.0), (False, False, 3.0)):
        args = (x, weight, labels, 2, SCALE, normalize_x, normalize_w, pool_scale, deterministic)
        torch.library.opcheck(torch.ops.metric_kernels.triton_margin_softmax_rows, args)
        stats = torch.ops.metric_kernels.triton_margin_softmax_rows(*args)
        torch.library.opcheck(torch.ops.metric_kernels.triton_margin_softmax_rows_backward,
                              (upstream.float(), stats, *args, True, True))


def test_row_pass_leaves_dw_to_the_column_pass_where_it_would_spill():
    """margin_softmax_ops.row_pass_forms_dw: the one specialisation that no config compiles without spilling
    (triton before 3.7, compute capability 8.x, tf32 products, several sub-centres, W in its own D x J layout, one
    split, the widest D block) leaves dW to the column pass; with any one condition off, the row pass forms it."""
    from metric_kernels.triton.margin_softmax_ops import row_pass_forms_dw
    spilling = dict(precision="tf32", multi=True, w_by_class=False, partial=False, block_d=256, arch=8,
                    triton_version="3.6.0")
    assert not row_pass_forms_dw(**spilling)
    for key, other in (("precision", "ieee"), ("multi", False), ("w_by_class", True), ("partial", True),
                       ("block_d", 128), ("arch", 9), ("arch", None), ("triton_version", "3.7.1")):
        assert row_pass_forms_dw(**dict(spilling, **{key: other})), key


@pytest.mark.parametrize("forms_dw", [True, False])
def test_default_backward_takes_the_column_pass_when_the_row_pass_does_not_form_dw(monkeypatch, forms_dw, no_tf32):
    """The op asks row_pass_forms_dw with its launch's facts, and where the answer is no, dW comes from the column
    pass (launched once) with the same values as the row pass's atomics (float64 formula, fp32 tolerances)."""
    from metric_kernels.triton import margin_softmax_ops
    asked, launched = [], []
    monkeypatch.setattr(margin_softmax_ops, "row_pass_forms_dw", lambda *args: asked.append(args) or forms_dw)

    class Recorded:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launched.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(margin_softmax_ops, "_backward_columns", Recorded(margin_softmax_ops._backward_columns))
    x, weight, labels, upstream = _case(5, 40, 30, 20, 2, torch.float32)
    ours = _outputs(triton_rows(False), x, weight, labels, 2, upstream.float())
    exact = _outputs(formula, x.double(), weight.double(), labels, 2, upstream)
    _check(ours, exact, 1e-5, 1e-4, f"forms_dw={forms_dw}")
    assert asked == [("ieee", True, False, False, ops.block_d(20, 4), None, margin_softmax_ops.triton.__version__)]
    assert len(launched) == (0 if forms_dw else 1)
