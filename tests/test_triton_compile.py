"""Compile proof of the Triton kernels without a GPU (metric_kernels/triton/_aot.py): the specialisations the ops
launch compile for sm_80 and sm_90a with this project's triton (3.7.1) and the GPU machine's (3.6.0, installed once
into .cache/triton-3.6.0), without spills, within each architecture's per-block shared memory, and with the 16-bit and
tf32 products on tensor cores (mma.sync on sm_80, wgmma.mma_async on sm_90a).

The default run compiles the "ci" selection with 3.7.1 and the "core" one (each kernel and dtype once) with 3.6.0,
3 minutes on 2 idle cores; `bash scripts/test.sh -m heavy` runs the config sweep of both (about 40 minutes). Each
run writes its report (registers, spills, shared memory per config) to out/compile-report/ (or
$METRIC_KERNELS_COMPILE_REPORT); the committed one, bench/results/compile/report.md, comes from the command in
bench/README.md. The last test checks, under the interpreter and with no compiling, that every launch the ops make is
one of the enumerated specialisations (its pointer types and constexprs).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metric_kernels.triton import _aot

REPORT = Path(os.environ.get("METRIC_KERNELS_COMPILE_REPORT", _aot.ROOT / "out" / "compile-report"))
PRODUCTS = ("lse_rows_forward", "pair_sums_forward", "lse_rows_backward_rows", "lse_rows_backward_columns",
            "batch_hard_select", "triplet_margin_positives", "triplet_margin_forward")
KERNELS = PRODUCTS + ("finish_gradient", "row_norms", "triplet_distances", "triplet_distances_backward_rows",
                      "triplet_distances_backward_references")
_RUNS = {}


def _run(levels):
    """The compile results of {version: level}, compiled once per session; the report written."""
    key = tuple(sorted(levels.items()))
    if key not in _RUNS:
        results = _aot.run_versions(levels, archs=(80, 90))
        command = "pytest tests/test_triton_compile.py (" + ", ".join(f"{v}={lv}" for v, lv in levels.items()) + ")"
        _aot.write_report(results, REPORT / "-".join(f"{v}-{lv}" for v, lv in levels.items()), command)
        _RUNS[key] = results
    return _RUNS[key]


def _problems(results, kind):
    found = [p for result in results for p in _aot.problems(result)]
    return [p for p in found if kind in p]


def _check_complete(results, levels):
    assert [r["triton"] for r in results] == list(levels)
    for result in results:
        assert set(result["expected"]) == {"sm_80", "sm_90a"}, result["expected"].keys()
        for arch, names in result["expected"].items():
            records = [r for r in result["records"] if r["arch"] == arch]
            assert sorted(r["name"] for r in records) == sorted(names)
            seen = {(r["kernel"], r["dtype"]) for r in records}
            for kernel in KERNELS:
                dtypes = ("bf16", "fp16", "fp32-tf32", "fp32-ieee", "fp64") if kernel in PRODUCTS else \
                    ("bf16", "fp16", "fp32", "fp64")
                assert {(kernel, dtype) for dtype in dtypes} <= seen, (result["triton"], arch, kernel)
            for record in records:  # GPUTarget("cuda", 90, 32) is sm_90a: wgmma needs the "a" features
                assert not record["ok"] or record["ptx_target"] == arch, (record["name"], record["ptx_target"])


DEFAULT = {_aot.PROJECT_TRITON: "ci", _aot.GPU_MACHINE_TRITON: "core"}
SWEEP = {_aot.PROJECT_TRITON: "sweep", _aot.GPU_MACHINE_TRITON: "sweep"}
PROPERTIES = [("compiles", ": Compilation"), ("no_spills", ": spills"), ("shared_memory", "bytes shared memory >"),
              ("tensor_cores", ": no ")]


def _check(levels, failure):
    results = _run(levels)
    _check_complete(results, levels)
    failed = [r for result in results for r in result["records"] if not r["ok"]]
    if failure == ": Compilation":  # any failure to compile, whatever the error
        found = [f"triton {r['triton']} {r['arch']} {r['name']}: {r['error']}" for r in failed]
    else:
        found = _problems(results, failure)
    if failure == ": spills":
        known = [p for p in found if p.split(": ")[0] in KNOWN_SPILLS.get(tuple(levels.items()), ())]
        found = [p for p in found if p not in known]
        stale = set(KNOWN_SPILLS.get(tuple(levels.items()), ())) - {p.split(": ")[0] for p in known}
        assert not stale, f"known spills that no longer spill (remove them from KNOWN_SPILLS): {sorted(stale)}"
    report = REPORT / "-".join(f"{v}-{lv}" for v, lv in levels.items()) / "report.md"
    assert not found, f"{len(found)} problems (report: {report}):\n" + "\n".join(found[:40])


# Properties the current code is known to miss, each an expected failure that must XPASS away: none now. Spills were
# the last (2026-11-27): gone by chunking D for the products at 64 columns, pruning by the rows' layout, the ops
# giving the kernels unit column strides, and the triplet kernels' warps sized to their tiles.
KNOWN_FAILURES = {}
# Specialisations known to spill, by the levels compiled: each must still spill (a fix fails the test until its entry
# goes). None now: the last, with triton 3.6.0 for sm_80 (the margin-softmax row pass forming dX and dW from the same
# tiles, fp32 rows with tf32 products, several sub-centres, W in its own D x J layout, the widest D block: more than
# 255 registers in every config tried), is no longer launched: the ops take the column pass for dW there
# (margin_softmax_ops.row_pass_forms_dw; tests/test_triton_margin_softmax.py checks the choice).
KNOWN_SPILLS = {}


@pytest.mark.parametrize("failure", [pytest.param(f, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[f])]
                                                  if f in KNOWN_FAILURES else []) for _, f in PROPERTIES],
                         ids=[name for name, _ in PROPERTIES])
def test_specialisations_compile_for_sm80_and_sm90a(failure):
    _check(DEFAULT, failure)


@pytest.mark.heavy
@pytest.mark.parametrize("failure", [f for _, f in PROPERTIES], ids=[name for name, _ in PROPERTIES])
def test_config_sweep_compiles_for_sm80_and_sm90a(failure):
    _check(SWEEP, failure)


# ---- the enumeration matches what the ops launch -------------------------------------------------------------------

_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float64: "*fp64",
          torch.int64: "*i64", torch.int32: "*i32"}
_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "num_ctas", "maxnreg")


def _launches(monkeypatch):
    """Runs the ops under the interpreter on small inputs that take every path (dtypes, loss kinds, y or not,
    deterministic or not, each gradient, references split, D on chip and in chunks), recording each kernel launch's
    pointer types and constexprs."""
    from triton.runtime.interpreter import InterpretedFunction

    from metric_kernels.triton import ops

    launches = []
    original = InterpretedFunction.run

    def record(self, *args, **kwargs):
        named = dict(zip(self.arg_names, args))
        pointers = {k: _TYPES[v.dtype] for k, v in named.items() if isinstance(v, torch.Tensor)}
        constexprs = {k: v for k, v in kwargs.items() if k in self.arg_names and k not in _CONFIG_KEYS}
        launches.append((self.fn.__name__, pointers, constexprs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", record)
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for d in (64, 300):  # all of D on chip; D in chunks (every kernel, fewer paths)
            chunked = d == 300
            n, m = 8, 260  # 260 references: 3 splits of the interpreter's 4 stand-in SMs (ops.reference_splits)
            x = torch.randn(n, d, generator=generator).to(dtype)
            y = torch.randn(m, d, generator=generator).to(dtype)
            x_labels = torch.randint(0, 3, (n,), generator=generator)
            y_labels = torch.randint(0, 3, (m,), generator=generator)
            for kind in (0,) if chunked else (0, 1, 2, 3, 4, 5):
                for other, labels, offset in ((None, x_labels, 0), (y, y_labels, -1)):
                    stats = ops.lse_rows(x, other, x_labels, labels, offset, kind, 0, 0.25, 2.0, False)
                    grad = torch.ones_like(stats)
                    # (deterministic, need_dx, need_dy); the flags do not depend on the kind: KIND 0 takes each path
                    cases = [(False, True, False), (True, True, False)]
                    if other is not None:
                        cases = [(det, dx, dy) for det in (False, True) for dx, dy in ((1, 1), (1, 0), (0, 1))]
                        if kind or chunked:
                            cases = [(False, True, True), (True, True, True)]
                    for deterministic, need_dx, need_dy in cases:
                        ops.lse_rows_backward(grad, stats, x, other, x_labels, labels, offset, kind, 0, 0.25, 2.0,
                                              deterministic, bool(need_dx), bool(need_dy))
                    for pair_value, normalize in ((0, False), (1, True), (1, False), (2, True), (2, False)):
                        if kind and not chunked:  # the distances: the log-sum-exp kernels' other epilogues
                            stats = ops.lse_rows(x, other, x_labels, labels, offset, kind, pair_value, 0.25, 2.0,
                                                 False, normalize)
                            for deterministic in (False, True):
                                ops.lse_rows_backward(torch.ones_like(stats), stats, x, other, x_labels, labels,
                                                      offset, kind, pair_value, 0.25, 2.0, deterministic, True,
                                                      other is not None, normalize)
                if kind == 0:  # the triplet margin loss: its forward, and the backward's kind 6 on every path
                    _triplet_margin_launches(ops, x, y[:40], x_labels, y_labels[:40], chunked)
                if kind == 0 and not chunked:  # one split: the row pass writes dX itself and adds into dY
                    ops.lse_rows_backward(grad[:, :4].contiguous(), stats[:, :4].contiguous(), x[:4], y[:100],
                                          x_labels[:4], y_labels[:100], -1, 0, 0, 0.25, 2.0, False, True, True)
            for normalize in (True,) if chunked else (True, False):
                ops.batch_hard_select(x, y, x_labels, y_labels, -1, normalize)
                positive, negative = torch.randint(0, n, (2, n), generator=generator)  # y[:n]: n references
                for other in (None, y[:n]):
                    distances = ops.triplet_distances(x, other, positive, negative, normalize)
                    for need_dx, need_dy in ((True, True), (True, False), (False, True)):
                        ops.triplet_distances_backward(torch.ones_like(distances), distances, x, other, positive,
                                                       negative, normalize, need_dx, need_dy)
    return launches


def _triplet_margin_launches(ops, x, y, x_labels, y_labels, chunked):
    from metric_kernels._pairs import positive_slots
    n = x.shape[0]
    pairs = ((0, True),) if chunked else ((0, True), (0, False), (1, True), (1, False), (2, True), (2, False))
    for other, labels, offset in ((None, x_labels, 0), (y, y_labels, -1)):
        slots, rank = positive_slots(x_labels, labels)
        for pair_value, normalize in pairs:
            stats, table, weights = ops.triplet_margin_rows(x, other, x_labels, labels, offset, pair_value, 0.2, True,
                                                            slots, rank, False, normalize)
            for deterministic in (False, True):
                ops.triplet_margin_rows_backward(torch.ones(n, dtype=stats.dtype), table, weights, x, other, x_labels,
                                                 labels, offset, pair_value, True, rank, deterministic, True,
                                                 other is not None, normalize)


def test_enumeration_covers_every_launch_of_the_ops(monkeypatch):
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("runs the ops under Triton's interpreter (TRITON_INTERPRET=1, as tests/conftest.py sets)")
    launches = _launches(monkeypatch)
    enumerated = {}
    for variant in _aot.variants(90, "full") + _aot.variants(80, "full"):
        pointers = {k: v for k, v in variant.signature.items() if v.startswith("*")}
        constexprs = {k: v for k, v in variant.constexprs.items()
                      if k not in _CONFIG_KEYS and not k.startswith("stride_") and k not in variant.integer_constants}
        enumerated.setdefault(variant.kernel, []).append((pointers, constexprs))
    missing, seen = [], set()
    for kernel, pointers, constexprs in launches:
        seen.add(kernel)
        if not any(pointers == p and constexprs == c for p, c in enumerated.get(kernel, ())):
            missing.append(f"{kernel} {pointers} {constexprs}")
    assert seen == set(KERNELS)
    flags = {(c.get("WITH_DY"), c.get("ATOMIC_DX"), p.get("dx_ptr") == p.get("x_ptr"))
             for k, p, c in launches if k == "lse_rows_backward_rows"}
    assert {(True, False, True), (False, False, True), (False, False, False), (True, True, False),
            (False, True, False)} <= flags, flags
    assert not missing, f"{len(set(missing))} launches not among _aot.variants():\n" + "\n".join(sorted(set(missing)))


# ---- comparing two compiles (a refactor's proof that the GPU code did not change) ------------------------------------

_PTX = """//
// Generated by LLVM NVPTX Back-End
.version 8.7
.target sm_90a
.visible .entry kernel(
)
{
\t.loc\t1 10 4
$L__tmp0:
\tld.global.b32 \t%r1, [%rd1];
$L__BB0_2:
\tadd.f32 \t%r2, %r1, %r1;
\t@%p1 bra \t$L__BB0_2;
$L__tmp1:
\tret;
}
\t.file\t1 "/somewhere/_lse_kernels.py"
\t.section\t.debug_abbrev
\t{
.b8 1
\t}
"""


def test_ptx_digest_ignores_debug_information_and_labels_only():
    """Source lines, debug sections, label names and label-only lines (what inlining a helper changes) leave the
    digest alone; an instruction, an operand or their order changes it."""
    same = (_PTX.replace("\t.loc\t1 10 4", "\t.loc\t2 77 9").replace("$L__tmp1:\n", "$L__tmp1:\n$L__tmp2:\n")
            .replace(".b8 1", ".b8 1\n.b8 88").replace("$L__BB0_2", "$L__BB0_7").replace('"/somewhere', '"/else'))
    assert _aot.ptx_digest(same) == _aot.ptx_digest(_PTX)
    swapped = _PTX.replace("\tld.global.b32 \t%r1, [%rd1];\n$L__BB0_2:\n\tadd.f32 \t%r2, %r1, %r1;\n",
                           "$L__BB0_2:\n\tadd.f32 \t%r2, %r1, %r1;\n\tld.global.b32 \t%r1, [%rd1];\n")
    for changed in (_PTX.replace("add.f32", "sub.f32"), _PTX.replace("%r1, %r1", "%r1, %r2"), swapped,
                    _PTX.replace("\tret;\n", "\tbar.sync 0;\n\tret;\n")):
        assert _aot.ptx_digest(changed) != _aot.ptx_digest(_PTX)


def test_compare_lists_what_differs():
    def record(name, digest, regs=100, arch="sm_80"):
        return dict(arch=arch, name=name, ok=True, ptx_digest=digest, n_regs=regs, n_spills=0, shared=1024)
    before = dict(records=[record("a", "1"), record("b", "2"), record("c", "3"), record("a", "1", arch="sm_90a")])
    assert _aot.compare(before, before) == []
    after = dict(records=[record("a", "1"), record("b", "9", regs=120), record("d", "4"),
                          record("a", "1", arch="sm_90a")])
    assert _aot.compare(before, after) == ["only in the first: sm_80 c", "only in the second: sm_80 d",
                                           "sm_80 b: ptx_digest 2 -> 9, n_regs 100 -> 120"]


def test_compile_refuses_an_unknown_kernel(capsys):
    with pytest.raises(SystemExit) as stopped:
        _aot.main(["compile", "--level", "core", "--list", "--kernels", "row_norms", "no_such_kernel"])
    assert stopped.value.code == 2
    assert "--kernels: no_such_kernel not among the kernels compiled at core: " in capsys.readouterr().err


def test_compile_and_compare_from_the_command_line(tmp_path):
    """`compile --kernels K --json` twice with this triton: every variant of K compiled, each with a digest, and
    `compare` finds them the same (exit 0); a result with one variant edited differs (exit 1)."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    outputs = []
    for run in ("first", "second"):
        out = tmp_path / f"{run}.json"
        subprocess.run([sys.executable, "-m", "metric_kernels.triton._aot", "compile", "--level", "core",
                        "--kernels", "row_norms", "--json", str(out)], check=True, env=env, capture_output=True,
                       timeout=600)
        outputs.append(out)
    result = json.loads(outputs[0].read_text())
    names = {(r["arch"], r["name"]) for r in result["records"]}
    expected = {(_aot.ARCHS[arch][0], v.name) for arch in (80, 90) for v in _aot.variants(arch, "core")
                if v.kernel == "row_norms"}
    assert names == expected and expected
    assert all(r["ok"] and len(r["ptx_digest"]) == 40 for r in result["records"])
    compare = [sys.executable, "-m", "metric_kernels.triton._aot", "compare"]
    same = subprocess.run(compare + [str(p) for p in outputs], env=env, capture_output=True, text=True)
    assert same.returncode == 0, same.stdout
    result["records"][0]["ptx_digest"] = "0" * 40
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(result))
    differs = subprocess.run(compare + [str(outputs[0]), str(edited)], env=env, capture_output=True, text=True)
    assert differs.returncode == 1 and "ptx_digest" in differs.stdout
