"""Which implementation computes the per-row losses.

A backend is a module that exposes

    unavailable_reason(device: torch.device) -> str | None
    circle_rows(x, y, x_labels, y_labels, self_offset, *, m, gamma, deterministic) -> Tensor[N]
    supcon_rows(x, y, x_labels, y_labels, self_offset, *, temperature, deterministic) -> Tensor[N]
    multi_similarity_rows(x, y, x_labels, y_labels, self_offset, *, alpha, beta, base, deterministic) -> Tensor[N]
    generalized_lifted_structure_rows(x, y, x_labels, y_labels, self_offset, *, pos_margin, neg_margin,
                                      deterministic) -> Tensor[N]
    nca_rows(x, y, x_labels, y_labels, self_offset, *, softmax_scale, deterministic) -> (Tensor[N], Tensor[N])
        (the log-sum-exps of softmax_scale * v over each query's positives and over its negatives, -inf for none)
    batch_hard_rows(x, y, x_labels, y_labels, self_offset, *, margin, soft, deterministic) -> Tensor[N]
    proxy_anchor_rows(proxies, x, labels, *, margin, alpha, deterministic) -> (Tensor[C], Tensor[C])
    margin_softmax_rows(x, weight, labels, *, scale, sub_centers, deterministic, normalize_x=True,
                        normalize_w=True, pool_scale=0.0) -> (Tensor[N], Tensor[N])

    triplet_margin_rows(x, y, x_labels, y_labels, self_offset, *, margin, smooth, deterministic)
        -> (Tensor[N], Tensor[N])   (per query the sum of its triplets' losses and how many are nonzero)

(ntxent_rows and contrastive_rows return per-query sums and counts, see metric_kernels/_fused.py.) A backend may
lack some of them: "auto" then passes over it for that loss.
x and y arrive validated, normalised where the loss says so, in the compute dtype (float32 for half inputs), with N > 0
and M > 0; y may be x itself. A backend whose module sets FOLDS_NORMALIZATION = True gets the raw rows instead
(one dtype, any float type, not normalised; its batch_hard_rows also takes `normalize`) and normalises inside its
kernels. "Query i is reference i + self_offset" (self_offset is None when no query is a reference).
The classifiers' margin_softmax_rows gets x (N x D) and the class matrix weight (D x C * sub_centers, column j of
class j // sub_centers) raw, never normalised (a backend normalises inside, W is never copied), in the compute dtype,
or in their own dtype where the module sets FOLDS_NORMALIZATION; it returns the log-sum-exp of
scale * cos over the classes other than each label (a class's cosine: its largest sub-centre's) and the label's
cosine. normalize_x=False (normalize_w=False) leaves the rows (W's columns) unnormalised, so that "cos" is
x . w / |w| (SphereFace) or x . w (LargeMarginSoftmax); pool_scale > 0 makes a class's cosine the mean of its
sub-centres' weighted by softmax(pool_scale * cos) (SoftTriple) instead of the largest. The returned rows must be differentiable with respect to x, y, the proxies and the weight. Everything else (validation,
normalisation, batch-level rules, reductions) lives once in metric_kernels.functional.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Dict, Optional

import torch

from . import _native

ENV_VAR = "METRIC_KERNELS_BACKEND"

# name -> module implementing it; modules that do not exist yet report "not part of this build".
_MODULES = {
    "reference": "metric_kernels.reference",
    "triton": "metric_kernels.triton",
    "cuda": "metric_kernels.cuda",
    "cpu": "metric_kernels.cpu",
    "cuda-emulated": "metric_kernels.cuda_emulated",  # the CUDA kernels on the CPU, for tests: never "auto"
}
NAMES = tuple(_MODULES)

# What "auto" tries, fastest first, per device type; the reference runs on any device.
_AUTO_ORDER = {
    "cuda": ("triton", "reference"),
    "cpu": ("cpu", "reference"),
}


# The backends whose modules load the native extension metric_kernels._C (metric_kernels/_native.py).
_NATIVE = ("cuda", "cpu", "cuda-emulated")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says which and why."""


def check_backend_name(name) -> str:
    if name != "auto" and name not in _MODULES:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(map(repr, NAMES))}; got {name!r}")
    return name


def _import(name: str):
    """(module, None) or (None, reason)."""
    path = _MODULES[name]
    try:
        return importlib.import_module(path), None
    except ModuleNotFoundError as error:
        if error.name == path:
            return None, f"backend {name!r} is not part of this version of metric_kernels"
        return None, f"backend {name!r} cannot be imported: {error}"
    except ImportError as error:
        return None, f"backend {name!r} cannot be imported: {error}"


def native_build_mismatch() -> Optional[str]:
    """Why metric_kernels._C must not be loaded by this process, or None (it may be, or it is not built, which the
    native backends then say themselves). Decided from the build record beside it, before anything loads it: _C
    uses torch's stable ABI from its target version on, so it serves that torch and every later one, whichever it
    was built against; an older torch lacks functions it calls."""
    if not os.path.isfile(_native.LIBRARY_PATH):
        return None
    try:
        record = _native.build_record()
    except (OSError, ValueError) as error:
        return (f"metric_kernels._C has no readable record of the torch it was built against "
                f"({_native.BUILD_RECORD_PATH}: {error}); reinstall metric_kernels against this torch "
                "(see 'Building the native extension' in README.md)")
    running = str(torch.__version__)
    try:
        served = _native.serves(record, running)
    except ValueError:  # a version string PEP 440 cannot read
        served = False
    if not served:
        return (f"metric_kernels._C serves torch {record['torch_target']} and later (built against torch "
                f"{record['torch']}), running {running}; upgrade torch "
                "(see 'Building the native extension' in README.md)")
    return None


def _load_all():
    mismatch = native_build_mismatch()
    return {name: (None, f"backend {name!r} is not loaded: {mismatch}") if mismatch and name in _NATIVE
            else _import(name) for name in _MODULES}


# Imported once, when metric_kernels is: resolving a backend is then a dictionary lookup, which torch.compile can
# trace (it cannot trace importlib). A backend module must therefore import cheaply and fail softly.
_LOADED = _load_all()


def _load(name: str):
    return _LOADED[name]


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None when backend `name` can run on `device`, else a sentence saying why not."""
    module, reason = _load(check_backend_name(name))
    if module is None:
        return reason
    return module.unavailable_reason(torch.device(device))


def available_backends(device="cpu") -> Dict[str, Optional[str]]:
    """Every backend name mapped to None (usable on `device`) or the reason it is not."""
    return {name: unavailable_reason(name, device) for name in NAMES}


def computes(module: ModuleType, pair_value: int, rows: Optional[str] = None) -> bool:
    """Whether a backend's log-sum-exp losses compute this pair value (metric_kernels/_pairs.py): its PAIR_VALUES,
    the dot product alone when it has none; and, given `rows`, whether it has that per-row function."""
    return pair_value in getattr(module, "PAIR_VALUES", (0,)) and (rows is None or hasattr(module, rows))


def resolve(name: str, device: torch.device, pair_value: int = 0, rows: Optional[str] = None) -> ModuleType:
    """The backend module that computes losses for tensors on `device` (and `pair_value` and the per-row function
    `rows`: "auto" passes over a backend without them; a backend named for them raises NotImplementedError)."""
    check_backend_name(name)
    if name == "auto":
        override = os.environ.get(ENV_VAR, "").strip()
        if override:
            if override != "auto" and override not in _MODULES:
                raise ValueError(
                    f"{ENV_VAR} must be 'auto' or one of {', '.join(map(repr, NAMES))}; got {override!r}")
            name = override
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ()) + ("reference",):
            module, _ = _load(candidate)
            if (module is not None and module.unavailable_reason(device) is None
                    and computes(module, pair_value, rows)):
                return module
        raise BackendUnavailableError(f"no backend can run on device {device}")  # unreachable: the reference runs anywhere
    module, reason = _load(name)
    if module is None:
        raise BackendUnavailableError(reason)
    reason = module.unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device}: {reason}")
    if rows is not None and not hasattr(module, rows):
        loss = rows[:-len("_rows")]
        raise NotImplementedError(f"backend {name!r} does not compute the {loss} loss yet; backend='auto' picks one "
                                  "that does")
    if not computes(module, pair_value):
        raise NotImplementedError(f"backend {name!r} does not compute Euclidean distances yet (distance="
                                  f"'euclidean' or 'squared_euclidean'); backend='auto' picks one that does")
    return module
