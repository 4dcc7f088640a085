"""The native extension metric_kernels._C: _C.so beside this file, a library of torch ops (csrc/, built by
CMakeLists.txt) that torch.ops.load_library loads, which registers torch.ops.metric_kernels.cpu_*, cuda_emulated_*
and, in a CUDA build, cuda_*. It is no Python module: nothing imports it.

Its build record, _C_build.json beside it, says what it was built against and with:

    {"torch": the torch it was built against, "torch_target": the oldest torch it serves (major.minor),
     "with_cuda": whether the CUDA kernels are in it, "with_cuda_emulation": whether their host emulation is}

_C uses torch's stable ABI only (TORCH_TARGET_VERSION = torch_target), so it loads in that torch and every later one;
metric_kernels/backends.py refuses it, before anything loads it, under an older torch or without a readable record.
"""
from __future__ import annotations

import functools
import json
import os

import torch
from torch.torch_version import TorchVersion

BUILD_RECORD = "_C_build.json"
LIBRARY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C.so")
BUILD_RECORD_PATH = os.path.join(os.path.dirname(LIBRARY_PATH), BUILD_RECORD)


def build_record() -> dict:
    """_C's build record; OSError (ENOENT when _C is not built) or ValueError when it cannot be read."""
    with open(BUILD_RECORD_PATH, encoding="utf-8") as file:
        record = json.load(file)
    if not isinstance(record, dict) or not {"torch", "torch_target", "with_cuda", "with_cuda_emulation"} <= set(record):
        raise ValueError(f"not a build record of this version of metric_kernels: {record!r}")
    return record


def serves(record: dict, version) -> bool:
    """Whether a _C with this build record serves torch `version`: its stable-ABI target or later (a pre-release of
    the target itself is older than the target and is not served)."""
    return TorchVersion(str(version)) >= record["torch_target"]


@functools.lru_cache(maxsize=None)
def load() -> dict:
    """Loads _C into this process, once, and returns its build record. ImportError when it is not built (or its
    record or the library itself cannot be read)."""
    if not os.path.isfile(LIBRARY_PATH):
        raise ImportError(f"{LIBRARY_PATH} does not exist")
    try:
        record = build_record()
        torch.ops.load_library(LIBRARY_PATH)
    except (OSError, ValueError) as error:
        raise ImportError(f"{LIBRARY_PATH} cannot be loaded: {error}") from error
    return record
