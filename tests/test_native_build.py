"""The native build: a plain `cmake -G Ninja` build of CMakeLists.txt gives the same library as setup.py, one that
needs nothing of torch but the C functions of its stable ABI, and the fused CPU kernels' memory stays O(block x M) (a
subprocess's peak RSS at N = 16384)."""
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# What _C may need from torch's libraries: the C functions of the stable ABI (aoti_torch_*, torch_*). A C++ symbol of
# torch (at::, c10::, torch::) would tie it to the torch it was built against.
TORCH_CPP_NAMESPACE = re.compile(r"\b(at|c10|caffe2|torch|pybind11)::")


def _check_stable_abi_only(library):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm is needed to list the library's undefined symbols")
    listed = subprocess.run([nm, "-D", "--undefined-only", "--demangle", str(library)], capture_output=True,
                            text=True, check=True, timeout=60).stdout
    undefined = [line.split(None, 1)[1] for line in listed.splitlines() if line.strip()]  # "U name"
    from_torch = [name for name in undefined if TORCH_CPP_NAMESPACE.search(name)]
    assert not from_torch, f"{library} needs C++ symbols of torch: {from_torch[:10]}"
    shim = [name for name in undefined if name.startswith(("aoti_torch_", "torch_"))]
    assert "aoti_torch_cpu_addmm_out" in shim and "torch_call_dispatcher" in shim, shim


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ninja") is None,
                    reason="cmake and ninja are needed to build the extension (CI installs them)")
def test_plain_cmake_build_loads_and_runs(tmp_path):
    package = tmp_path / "site" / "metric_kernels"
    shutil.copytree(os.path.join(ROOT, "metric_kernels"), package,
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    build = tmp_path / "build"
    subprocess.run(["cmake", "-G", "Ninja", "-S", ROOT, "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
                    f"-DMETRIC_KERNELS_OUTPUT_DIR={package}"], check=True, capture_output=True, timeout=600)
    subprocess.run(["cmake", "--build", str(build), "--parallel", os.environ.get("MAX_JOBS", "2")], check=True,
                   capture_output=True, timeout=900)
    script = textwrap.dedent("""
        import torch, metric_kernels
        from metric_kernels import _native
        assert _native.LIBRARY_PATH.startswith(%r), _native.LIBRARY_PATH
        x, labels = torch.randn(50, 8, dtype=torch.float64), torch.randint(0, 4, (50,))
        ours = metric_kernels.circle_loss(x, labels, backend="cpu")
        expected = metric_kernels.circle_loss(x, labels, backend="reference")
        assert abs(ours.item() - expected.item()) <= 1e-12 * abs(expected.item()), (ours, expected)
        assert _native.LIBRARY_PATH in torch.ops.loaded_libraries
        print("ok")
    """ % str(package))
    env = dict(os.environ, PYTHONPATH=str(package.parent))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    _check_stable_abi_only(package / "_C.so")


MEMORY_SCRIPT = """
import resource, sys, torch, metric_kernels as mk
loss, backend = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
n, dim = 16384, 64
x = torch.randn(n, dim, requires_grad=True)
labels = torch.randint(0, 512, (n,))
proxies = torch.randn(512, dim, requires_grad=True)
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
baseline = peak()
if loss == "proxy_anchor":
    value = mk.proxy_anchor_loss(x, labels, proxies, backend=backend)
else:
    value = getattr(mk, loss + "_loss")(x, labels, backend=backend)
value.backward()
print(peak() - baseline)
"""


@pytest.mark.parametrize("loss", ["circle", "supcon", "batch_hard_triplet", "proxy_anchor"])
def test_cpu_backend_memory_is_linear(loss):
    """Forward + backward at N = 16384, D = 64, float32 raise peak RSS by less than 256 MiB (the N x N float32
    similarity matrix alone is 1 GiB; the reference holds several)."""
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, loss, "cpu"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    growth = int(result.stdout.strip().splitlines()[-1])
    assert growth < 256 * 2**20, f"{loss}: peak RSS grew by {growth / 2**20:.0f} MiB"
