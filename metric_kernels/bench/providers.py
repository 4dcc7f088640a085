"""What the benchmark measures: the losses, the providers that compute them, and the inputs of one case.

A provider turns a loss name into a callable `fn(inputs) -> scalar loss`. Providers:

  <backend>   every metric_kernels backend usable on the device (available_backends), except "triton" on the CPU,
              where it only runs under Triton's interpreter, which is far too slow to time, and "cuda-emulated" (the
              CUDA kernels' code run by host threads, for tests: its time says nothing about a GPU's). "reference" is
              one of them.
  compile     torch.compile(the reference losses), fullgraph, dynamic shapes where dynamo can trace them
  pml         pytorch-metric-learning's equivalent (metric_kernels.pml), where it is installed
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import functional
from .. import pml as pml_module
from ..backends import NAMES as BACKEND_NAMES
from ..backends import available_backends

# The margin-softmax classifiers: M is their number of classes, and their class matrix W (D x M * sub-centres, PML's
# layout) gets gradients like the proxies.
CLASSIFIERS = ("arcface", "cosface", "subcenter_arcface", "normalized_softmax", "large_margin_softmax", "sphereface",
               "soft_triple")
SUB_CENTERS = {"subcenter_arcface": 3, "soft_triple": 10}  # PML's defaults
# The losses whose references are one proxy per class: M is their number of classes.
PROXY_LOSSES = ("proxy_anchor", "proxy_nca")
LOSSES = ("circle", "supcon", "multi_similarity", "ntxent", "tuplet_margin", "contrastive", "triplet_margin",
          "generalized_lifted_structure", "lifted_structure", "margin", "nca", "angular", "batch_hard") + PROXY_LOSSES \
    + CLASSIFIERS
LOSS_ALIASES = {"batch_hard_triplet": "batch_hard", "proxy": "proxy_anchor", "proxyanchor": "proxy_anchor",
                "proxynca": "proxy_nca", "lifted": "generalized_lifted_structure",
                "ms": "multi_similarity", "nt_xent": "ntxent", "subcenter": "subcenter_arcface",
                "normalized": "normalized_softmax", "tuplet": "tuplet_margin", "large_margin": "large_margin_softmax",
                "lsoftmax": "large_margin_softmax", "asoftmax": "sphereface", "softtriple": "soft_triple",
                "triplet": "triplet_margin"}
# Products of N x M x D a fused kernel needs, in units of 2NMD (one S = X Y^T), forward and backward: the row-statistics
# losses form S once forward and recompute it backward beside dX = dS Y and dY = dS^T X; NT-Xent's forward (and the
# tuplet margin loss's, on NT-Xent's kernels, and the triplet margin loss's: its positives' table, then the
# negatives) sweeps the references twice; batch-hard's backward is O((N + M) D),
# counted as 0. The angular loss runs NCA's kernels with its P positive pairs as the queries: P is about 4 N with
# about 4 samples per class (a sample's class holds 4 others on average: 3.8 N to 4.1 N in the benchmark's cases).
# The classifiers count N x C x D per sub-centre (SubCenterArcFace's M classes have 3 columns each,
# SoftTriple's 10 centers).
PRODUCTS = {"ntxent": (2, 3), "tuplet_margin": (2, 3), "triplet_margin": (2, 3), "batch_hard": (1, 0),
            "angular": (4, 12), "subcenter_arcface": (3, 9), "soft_triple": (10, 30)}
DEFAULT_PRODUCTS = (1, 3)
MODES = ("forward", "backward", "full")
EXTRA_PROVIDERS = ("compile", "pml")
PROVIDER_NAMES = BACKEND_NAMES + EXTRA_PROVIDERS
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "half": "float16", "f16": "float16",
                 "bf16": "bfloat16", "fp64": "float64", "f64": "float64", "double": "float64", "float": "float32"}

_FUNCTIONAL = {"circle": "circle_loss", "supcon": "supcon_loss", "multi_similarity": "multi_similarity_loss",
               "ntxent": "ntxent_loss", "tuplet_margin": "tuplet_margin_loss", "contrastive": "contrastive_loss",
               "triplet_margin": "triplet_margin_loss",
               "nca": "nca_loss", "angular": "angular_loss", "lifted_structure": "lifted_structure_loss",
               "generalized_lifted_structure": "generalized_lifted_structure_loss", "margin": "margin_loss",
               "batch_hard": "batch_hard_triplet_loss"}


def flops(loss: str, mode: str, n: int, m: int, d: int) -> float:
    """Floating-point operations a fused kernel needs (PRODUCTS); 0 where none is counted."""
    forward, backward = PRODUCTS.get(loss, DEFAULT_PRODUCTS)
    return 2.0 * {"forward": forward, "backward": backward, "full": forward + backward}[mode] * n * m * d


def classes_for(loss: str, n: int, m: int) -> int:
    """Number of classes in a case: M for the proxy losses (one proxy per class) and the classifiers, else about 4
    samples per class."""
    return m if loss in PROXY_LOSSES or loss in CLASSIFIERS else max(2, n // 4)


@dataclasses.dataclass
class Inputs:
    """One case's tensors. y is None when the references are the queries themselves (M = N, no --refs)."""
    loss: str
    x: torch.Tensor
    labels: torch.Tensor
    y: Optional[torch.Tensor] = None
    y_labels: Optional[torch.Tensor] = None
    proxies: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None  # a classifier's W, D x (classes * sub-centres)

    def leaves(self) -> List[torch.Tensor]:
        return [t for t in (self.x, self.y, self.proxies, self.weight) if t is not None]

    def args(self) -> Tuple:
        if self.loss in PROXY_LOSSES:
            return (self.x, self.labels, self.proxies)
        if self.loss in CLASSIFIERS:
            return (self.x, self.labels, self.weight)
        return (self.x, self.labels, self.y, self.y_labels)

    def zero_grad(self) -> None:
        for tensor in self.leaves():
            tensor.grad = None

    def converted(self, dtype: torch.dtype) -> "Inputs":
        """The same values in another dtype, as fresh leaves (for the float64 reference)."""
        def leaf(t):
            return None if t is None else t.detach().to(dtype).requires_grad_()
        return Inputs(self.loss, leaf(self.x), self.labels, leaf(self.y), self.y_labels, leaf(self.proxies),
                      leaf(self.weight))


def make_inputs(loss: str, n: int, m: int, d: int, dtype: torch.dtype, device, *, with_refs: bool,
                seed: int = 0) -> Inputs:
    """Random rows (standard normal) and labels for one case, reproducible from the seed."""
    generator = torch.Generator().manual_seed(seed)
    classes = classes_for(loss, n, m)

    def rows(count):
        return torch.randn(count, d, generator=generator).to(device=device, dtype=dtype).requires_grad_()

    def labels(count):
        return torch.randint(0, classes, (count,), generator=generator).to(device)

    x, x_labels = rows(n), labels(n)
    if loss in PROXY_LOSSES:
        return Inputs(loss, x, x_labels, proxies=rows(m))
    if loss in CLASSIFIERS:
        weight = torch.randn(d, m * SUB_CENTERS.get(loss, 1), generator=generator)
        return Inputs(loss, x, x_labels, weight=weight.to(device=device, dtype=dtype).requires_grad_())
    if not with_refs:
        return Inputs(loss, x, x_labels)
    return Inputs(loss, x, x_labels, rows(m), labels(m))


# --------------------------------------------------------------------------------------------------- providers
def _functional_loss(loss: str, backend: str) -> Callable:
    if loss in PROXY_LOSSES or loss in CLASSIFIERS:
        against_weights = getattr(functional, f"{loss}_loss")
        return lambda x, labels, weights: against_weights(x, labels, weights, backend=backend)
    fn = getattr(functional, _FUNCTIONAL[loss])
    return lambda x, labels, y, y_labels: fn(x, labels, y, y_labels, backend=backend)


def _backend_provider(backend: str) -> Callable:
    def make(loss: str):
        fn = _functional_loss(loss, backend)
        return lambda inputs: fn(*inputs.args())
    return make


class _Compiled:
    """torch.compile(reference loss, fullgraph=True, dynamic=True). Where dynamo cannot trace the loss with dynamic
    shapes, static ones, said in `note`. (Where the traced code specialises on N, each N compiles its own graph
    either way; TORCHINDUCTOR_CACHE_DIR keeps them between runs.)"""

    def __init__(self, loss: str):
        import torch._dynamo
        for name in ("recompile_limit", "cache_size_limit"):  # losses x dtypes x ref layouts share code objects
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
        self.function = _functional_loss(loss, "reference")
        self.compiled = torch.compile(self.function, fullgraph=True, dynamic=True)
        self.static = False
        self.note = ""

    def __call__(self, inputs: "Inputs") -> torch.Tensor:
        try:
            return self.compiled(*inputs.args())
        except Exception as error:  # noqa: BLE001
            if self.static or isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "allocate" in str(error):
                raise
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
            self.note = f"static shapes: dynamic=True failed ({type(error).__name__}: {first})"
            self.static = True
            self.compiled = torch.compile(self.function, fullgraph=True, dynamic=False)
            return self.compiled(*inputs.args())


def _compile_provider(loss: str):
    return _Compiled(loss)


def _pml_provider(loss: str):
    if loss in PROXY_LOSSES:
        against_proxies = getattr(pml_module, f"{loss}_loss")
        return lambda i: against_proxies(i.x, i.labels, i.proxies)
    if loss in CLASSIFIERS:
        classifier = getattr(pml_module, f"{loss}_loss")
        return lambda i: classifier(i.x, i.labels, i.weight)
    fn = getattr(pml_module, _FUNCTIONAL[loss])
    return lambda i: fn(i.x, i.labels, i.y, i.y_labels)


@dataclasses.dataclass
class Provider:
    name: str
    make: Callable[[str], Callable[[Inputs], torch.Tensor]]
    description: str = ""
    compiles: bool = False  # first call compiles: warm it up before measuring memory


_EXTRA: Dict[str, Provider] = {}


def register(provider: Provider) -> None:
    """Adds a provider (tests use this for fakes); it is measured in-process only (see runner.Config.isolation)."""
    _EXTRA[provider.name] = provider


def unregister(name: str) -> None:
    _EXTRA.pop(name, None)


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None when provider `name` can run on `device`, else why not."""
    device = torch.device(device)
    if name in _EXTRA:
        return None
    if name in BACKEND_NAMES:
        reason = available_backends(device)[name]
        if reason is None and name == "triton" and device.type == "cpu":
            return ("the 'triton' backend runs on the CPU only under Triton's interpreter, far too slow to "
                    "benchmark; it is benchmarked on CUDA devices")
        if reason is None and name == "cuda-emulated":
            return ("the 'cuda-emulated' backend runs the CUDA kernels' code on host threads to check their numerics; "
                    "its speed says nothing about a GPU's: benchmark 'cuda' on a CUDA device")
        return reason
    if name == "compile":
        return None
    if name == "pml":
        return None if pml_module.is_available() else "pytorch-metric-learning is not installed"
    return f"unknown provider {name!r}"


def default_providers(device) -> List[str]:
    """Every provider that can run on the device: the usable backends (reference first), compile, pml."""
    names = ["reference"] + [b for b in BACKEND_NAMES if b != "reference"] + list(EXTRA_PROVIDERS)
    return [name for name in names if unavailable_reason(name, device) is None]


def get(name: str) -> Provider:
    if name in _EXTRA:
        return _EXTRA[name]
    if name in BACKEND_NAMES:
        return Provider(name, _backend_provider(name), f"metric_kernels backend {name!r}")
    if name == "compile":
        return Provider(name, _compile_provider, "torch.compile(reference), fullgraph, dynamic shapes", compiles=True)
    if name == "pml":
        return Provider(name, _pml_provider, "pytorch-metric-learning")
    raise KeyError(f"unknown provider {name!r}")


def is_registered_fake(name: str) -> bool:
    return name in _EXTRA
