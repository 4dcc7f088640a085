"""Builds metric_kernels._C by driving CMakeLists.txt with Ninja (the way vLLM does), so `pip install
--no-build-isolation .`, `pip install --no-build-isolation -e .` and a plain `cmake -G Ninja` build give the same
library, metric_kernels/_C.so. Install without build isolation: an isolated build would download a torch of its own
to build against. _C uses torch's stable ABI only, so it serves the torch it was built against and every later one
from its target version on (TORCH_TARGET_VERSION, CMakeLists.txt). The build writes _C_build.json next to the library
(CMakeLists.txt): the torch it was built against, that target version and the build's flags, which
metric_kernels/_native.py reads before it loads _C with torch.ops.load_library.

Environment variables:
  METRIC_KERNELS_BUILD_TYPE   CMake build type (default Release; Debug for a debug build)
  MAX_JOBS                    parallel compile jobs (default: the number of CPUs)
  METRIC_KERNELS_CUDA_ARCHS   CUDA architectures when CUDA sources are built (default "80;90a")
  METRIC_KERNELS_SKIP_EXT=1   install the pure-Python package only (backend="cpu" then reports it is not built); a
                              wheel built so is a pure one (py3-none-any)
  METRIC_KERNELS_REQUIRE_EXT=1  fail the install when the extension does not build (CI sets it); otherwise a failed
                              build warns and the package installs without it
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
SKIP_EXT = os.environ.get("METRIC_KERNELS_SKIP_EXT") == "1"
BUILD_RECORD = "_C_build.json"  # beside _C.so: what it was built against and with (CMakeLists.txt writes it)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def get_ext_filename(self, fullname):
        # _C is a library for torch.ops.load_library, not a Python module: no interpreter tag in its name (and
        # nothing imports it)
        return os.path.join(*fullname.split(".")) + ".so"

    def run(self):
        if SKIP_EXT:
            print("metric_kernels: METRIC_KERNELS_SKIP_EXT=1, not building the native extension")
            return
        try:
            super().run()
        except Exception as error:  # a missing compiler, cmake or torch must not stop a pure-Python install
            if os.environ.get("METRIC_KERNELS_REQUIRE_EXT") == "1":
                raise
            print(f"metric_kernels: WARNING: the native extension was not built ({error}); "
                  "backend='cpu' will report it is not built", file=sys.stderr)

    def build_extension(self, ext):
        if shutil.which("cmake") is None:
            raise RuntimeError("cmake is not on PATH")
        output_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build_dir, exist_ok=True)
        configure = [
            "cmake", "-S", ROOT, "-B", build_dir,
            f"-DCMAKE_BUILD_TYPE={os.environ.get('METRIC_KERNELS_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DMETRIC_KERNELS_OUTPUT_DIR={output_dir}",
            f"-DMETRIC_KERNELS_CUDA_ARCHS={os.environ.get('METRIC_KERNELS_CUDA_ARCHS', '80;90a')}",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(configure)
        subprocess.check_call(["cmake", "--build", build_dir, "--parallel", jobs])
        self._record_dirs = {**getattr(self, "_record_dirs", {}), ext.name: output_dir}

    def copy_extensions_to_source(self):
        # An editable install builds into a temporary directory and copies the library into the source tree; the
        # build record (_C_build.json, written by CMakeLists.txt beside the library) must follow it there.
        super().copy_extensions_to_source()
        for ext in self.extensions:
            record = os.path.join(getattr(self, "_record_dirs", {}).get(ext.name, ""), BUILD_RECORD)
            if os.path.isfile(record):
                self.copy_file(record, os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), BUILD_RECORD))


setup(ext_modules=[] if SKIP_EXT else [CMakeExtension("metric_kernels._C")], cmdclass={"build_ext": CMakeBuild})
