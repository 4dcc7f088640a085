"""Packaging (issue 12 item 3). The sdist builds from the source tree and the wheel from the sdist alone; the wheel
installs into a fresh venv that has only the CPU torch (and what pip resolves for it) and runs there: import,
`metric-kernels backends`, the losses on every usable backend against the reference, in float64. The same for a
pure-Python install (METRIC_KERNELS_SKIP_EXT=1).

_C uses torch's stable ABI only, so the same wheel serves every torch from its target version on: it installs beside
torch 2.14.1 (a later torch than the one it was built against) and computes there as well. Under an older torch than
its target _C is never loaded: the native backends say "serves torch T and later ..., running Y; upgrade torch", and
nothing crashes.

The fresh-venv tests build for real (about a minute and a half on 2 cores, most of it compiling _C and installing
torch; the venv with torch 2.14.1 adds about a minute and 5.4 GB); they need the `build` package and network or a
local index for the venvs' torch, as scripts/env.sh does."""
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
import torch

import metric_kernels
from metric_kernels._native import BUILD_RECORD
from metric_kernels.backends import _NATIVE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSION = metric_kernels.__version__
# A later torch than this session's (2.13.0+cpu in CI): one wheel must serve both. A CUDA 13.0 build, on these
# machines' disk (ENVIRONMENT.md); it imports without a GPU.
LATER_TORCH = "2.14.1"

# Run by a venv's python with argv: mode (native, pure, mismatch: torch claims a version older than _C's target, or
# newer: one far later than any built against), the expected usable backends on the CPU (comma-separated; not
# checked in mismatch mode), the directory metric_kernels must be imported from.
SMOKE = r'''
import contextlib, importlib.metadata, importlib.resources, io, os, subprocess, sys
import torch
mode, expected, where = sys.argv[1], set(sys.argv[2].split(",")), sys.argv[3]
if mode in ("mismatch", "newer"):
    built, torch.__version__ = torch.__version__, {"mismatch": "0.0.0+another", "newer": "2.99.0+newer"}[mode]
import metric_kernels as mk
from metric_kernels import _native, cli
from metric_kernels.backends import _NATIVE

assert os.path.dirname(mk.__file__) == where, (mk.__file__, where)
assert mk.__version__ == importlib.metadata.version("metric-kernels"), mk.__version__
assert importlib.resources.files("metric_kernels").joinpath("py.typed").is_file(), "py.typed is missing"
reasons = mk.available_backends("cpu")
usable = sorted(name for name, reason in reasons.items() if reason is None)
loaded = _native.LIBRARY_PATH in torch.ops.loaded_libraries
if mode == "mismatch":
    assert not loaded, "a _C that does not serve this torch was loaded"
    target = _native.build_record()["torch_target"]
    phrase = f"serves torch {target} and later (built against torch {built}), running 0.0.0+another; upgrade torch"
    for name in _NATIVE:
        assert phrase in (reasons[name] or ""), (name, reasons[name])
else:
    assert set(usable) == expected, reasons
    assert loaded == (mode != "pure"), loaded
if mode == "pure":
    assert "not built" in reasons["cpu"], reasons["cpu"]
    assert not [f for f in os.listdir(where) if f.startswith("_C")], os.listdir(where)

listing = io.StringIO()
with contextlib.redirect_stdout(listing):
    assert cli.main(["backends"]) == 0
for name, reason in reasons.items():
    assert f"{name:10s} {'available' if reason is None else 'unavailable: ' + reason}" in listing.getvalue(), name
if mode not in ("mismatch", "newer"):  # the console script, in a process of its own (the real torch version)
    script = os.path.join(os.path.dirname(sys.executable), "metric-kernels")
    listed = subprocess.run([script, "backends"], capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0 and listed.stdout.strip() == listing.getvalue().strip(), (listed.stdout,
                                                                                           listed.stderr[-2000:])

torch.manual_seed(0)
x = torch.randn(40, 12, dtype=torch.float64, requires_grad=True)
labels = torch.randint(0, 5, (40,))
proxies = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
losses = {"circle": lambda b: mk.circle_loss(x, labels, backend=b),
          "supcon": lambda b: mk.supcon_loss(x, labels, backend=b),
          "batch_hard_triplet": lambda b: mk.batch_hard_triplet_loss(x, labels, backend=b),
          "proxy_anchor": lambda b: mk.proxy_anchor_loss(x, labels, proxies, backend=b)}
for backend in usable:
    for loss, compute in losses.items():
        ours, expected = compute(backend), compute("reference")
        grad, = torch.autograd.grad(ours, x)
        expected_grad, = torch.autograd.grad(expected, x)
        assert torch.allclose(ours, expected, rtol=1e-10, atol=1e-12), (backend, loss, ours, expected)
        assert torch.allclose(grad, expected_grad, rtol=1e-8, atol=1e-12), (backend, loss)
print("smoke ok:", mode, ",".join(usable))
'''


def _run(args, timeout, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, (f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
                                    f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def _clean_env(**extra):
    """The environment without this test session's settings (a source tree on the path, a forced backend, the
    Triton interpreter), as a user's shell would have it."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "METRIC_KERNELS_BACKEND", "TRITON_INTERPRET")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """The sdist, the wheel built from it (with _C) and a pure-Python wheel, from a copy of the source tree (what a
    clone has: tracked and not-ignored files), so nothing is written into the tree."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    files = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], 60, cwd=ROOT).stdout.split("\0")
    for name in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(source / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), source / name)
    out = base / "dist"
    # An sdist, then a wheel built from the unpacked sdist: a file the sdist lacks fails the wheel's build.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)], 1200,
         env=_clean_env(METRIC_KERNELS_REQUIRE_EXT="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2")))
    sdist, = out.glob("*.tar.gz")
    wheel, = out.glob("*.whl")
    pure_out = base / "pure"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(pure_out), str(sdist)],
         600, env=_clean_env(METRIC_KERNELS_SKIP_EXT="1"))
    pure, = pure_out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel, "pure": pure}


def _venv_with_torch(tmp_path_factory, name: str, torch_version: str, timeout: int):
    """A new venv holding torch==torch_version and nothing else installed by hand: (its folder, its python, where
    metric_kernels will be in its site-packages)."""
    venv = tmp_path_factory.mktemp(name) / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], 300)
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", f"torch=={torch_version}"], timeout, env=_clean_env())
    where = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 60).stdout.strip()
    return venv, python, os.path.join(where, "metric_kernels")


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A new venv with the torch this session runs (its distribution's version, e.g. 2.13.0+cpu: the same build),
    nothing else installed by hand. Returns (python, site-packages/metric_kernels)."""
    venv, python, package = _venv_with_torch(tmp_path_factory, "venv", importlib.metadata.version("torch"), 900)
    yield python, package
    shutil.rmtree(venv, ignore_errors=True)  # about 1 GB; pytest keeps its last temporary directories


@pytest.fixture(scope="module")
def later_torch_venv(tmp_path_factory):
    """A new venv with torch LATER_TORCH and nothing else installed by hand; the test skips where pip cannot get that
    torch. Returns (python, site-packages/metric_kernels)."""
    if torch.__version__.split("+")[0] == LATER_TORCH:
        pytest.skip(f"this session runs torch {torch.__version__} itself: no later torch to check")
    versions = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "torch"], capture_output=True,
                              text=True, timeout=300, env=_clean_env())
    if not re.search(rf"\b{re.escape(LATER_TORCH)}\b", versions.stdout):
        pytest.skip(f"torch {LATER_TORCH} is not installable here (pip index versions torch: "
                    f"{(versions.stdout or versions.stderr).strip()[-300:]})")
    venv, python, package = _venv_with_torch(tmp_path_factory, "later_torch", LATER_TORCH, 1200)
    yield python, package
    shutil.rmtree(venv, ignore_errors=True)  # 5.4 GB


def _smoke(python, mode, expected, where, cwd, env=None):
    result = _run([python, "-c", SMOKE, mode, ",".join(sorted(expected)), where], 600, cwd=cwd,
                  env=env or _clean_env())
    assert result.stdout.strip().startswith(f"smoke ok: {mode}"), result.stdout
    return result


def test_distributions_hold_what_they_must(dists):
    assert dists["sdist"].name == f"metric_kernels-{VERSION}.tar.gz"
    with tarfile.open(dists["sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for needed in ("pyproject.toml", "setup.py", "CMakeLists.txt", "README.md", "LICENSE", "CHANGELOG.md",
                   "MANIFEST.in", "csrc/bindings.cpp", "csrc/cpu/pair_rows.cpp", "csrc/cuda/host_emulation.h",
                   "metric_kernels/_version.py", "metric_kernels/py.typed"):
        assert needed in names, f"the sdist lacks {needed}"
    assert not [n for n in names if n.endswith(".so") or n.endswith(BUILD_RECORD)], "build outputs in the sdist"

    assert dists["wheel"].name.startswith(f"metric_kernels-{VERSION}-cp")
    with zipfile.ZipFile(dists["wheel"]) as archive:
        names = set(archive.namelist())
        record = archive.read(f"metric_kernels/{BUILD_RECORD}").decode()
        metadata = archive.read(f"metric_kernels-{VERSION}.dist-info/METADATA").decode()
    assert "metric_kernels/_C.so" in names, "the wheel has no _C"
    assert json.loads(record) == {"torch": torch.__version__, "torch_target": "2.10", "with_cuda": False,
                                  "with_cuda_emulation": True}, record
    assert "metric_kernels/py.typed" in names
    assert not [n for n in names if n.startswith("tests/")]
    for requirement in ("Requires-Dist: torch>=2.4", 'Provides-Extra: bench', 'Provides-Extra: test',
                        'Requires-Dist: tqdm; extra == "bench"'):
        assert requirement in metadata, requirement

    assert dists["pure"].name == f"metric_kernels-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(dists["pure"]) as archive:
        names = set(archive.namelist())
    assert "metric_kernels/py.typed" in names
    assert not [n for n in names if n.startswith("metric_kernels/_C")], names


def test_wheel_runs_in_a_fresh_venv(dists, fresh_venv, tmp_path):
    python, where = fresh_venv
    _run([python, "-m", "pip", "uninstall", "-y", "metric-kernels"], 300)
    _run([python, "-m", "pip", "install", "-q", str(dists["wheel"])], 600, env=_clean_env())
    _smoke(python, "native", {"reference", "cpu", "cuda-emulated"}, where, tmp_path)
    # The same installed files under another torch version: _C stays unloaded and the backends say why.
    _smoke(python, "mismatch", set(), where, tmp_path)


@pytest.mark.slow
def test_wheel_serves_a_later_torch(dists, later_torch_venv, tmp_path):
    """What the stable ABI is for: the wheel built against this session's torch installs beside torch 2.14.1, its _C
    (built against the other torch) loads there, and the native backends compute every loss equal to the
    reference (float64 values and gradients)."""
    python, where = later_torch_venv
    _run([python, "-m", "pip", "install", "-q", str(dists["wheel"])], 600, env=_clean_env())
    running = _run([python, "-c", "import torch; print(torch.__version__)"], 300, env=_clean_env()).stdout.strip()
    assert running.startswith(LATER_TORCH), running  # installing the wheel kept that torch
    with zipfile.ZipFile(dists["wheel"]) as archive:
        built = json.loads(archive.read(f"metric_kernels/{BUILD_RECORD}"))["torch"]
    assert built == torch.__version__ != running, (built, running)
    _smoke(python, "native", {"reference", "cpu", "cuda-emulated"}, where, tmp_path)


def test_pure_python_install_runs_in_a_fresh_venv(dists, fresh_venv, tmp_path):
    python, where = fresh_venv
    _run([python, "-m", "pip", "uninstall", "-y", "metric-kernels"], 300)
    _run([python, "-m", "pip", "install", "-q", str(dists["pure"])], 600, env=_clean_env())
    _smoke(python, "pure", {"reference"}, where, tmp_path)


def test_build_record_decides_which_torch_loads_it_here(tmp_path):
    """The check on this session's own build (an editable install in CI, or the checkout's in-place build): no fresh
    venv needed. A torch older than _C's target does not load it; a later one does."""
    where = os.path.dirname(metric_kernels.__file__)
    env = _clean_env(PYTHONPATH=os.path.dirname(where))  # this checkout's package, wherever pip installed one
    _smoke(sys.executable, "mismatch", set(), where, tmp_path, env)
    _smoke(sys.executable, "newer", {"reference", "cpu", "cuda-emulated"}, where, tmp_path, env)


def test_build_without_record_is_not_loaded(tmp_path):
    """A _C with no build record beside it (built before records existed, or copied alone) is not loaded either."""
    package = tmp_path / "site" / "metric_kernels"
    shutil.copytree(os.path.dirname(metric_kernels.__file__), package,
                    ignore=shutil.ignore_patterns("__pycache__", BUILD_RECORD))
    assert [f for f in os.listdir(package) if f.startswith("_C.")], "this test needs the built _C"
    script = ("import json, torch, metric_kernels as mk; r = mk.available_backends('cpu'); "
              "assert not [p for p in torch.ops.loaded_libraries if 'metric_kernels' in p]; print(json.dumps(r))")
    result = _run([sys.executable, "-c", script], 300, cwd=tmp_path,
                  env=_clean_env(PYTHONPATH=str(package.parent)))
    reasons = json.loads(result.stdout)
    for name in _NATIVE:
        assert "no readable record of the torch it was built against" in reasons[name], reasons[name]
    assert reasons["reference"] is None


def test_one_version_source():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as file:
        pyproject = file.read()
    project = re.search(r"^\[project\]\n(.*?)^\[", pyproject, flags=re.M | re.S).group(1)
    assert 'dynamic = ["version"]' in project and not re.search(r"^version\s*=", project, flags=re.M)
    assert 'version = {attr = "metric_kernels._version.__version__"}' in pyproject
    assert importlib.metadata.version("metric-kernels") == VERSION
    with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as file:
        assert re.search(rf"^## \[{re.escape(VERSION)}\]", file.read(), flags=re.M), "CHANGELOG.md has no section"
