"""Shared test helpers: random cases, tolerance checks, gradients."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "",
                     scale_floor: float = 0.0) -> None:
    """max |actual - expected| <= rtol * max(max |expected|, scale_floor): a norm-wise relative error.

    scale_floor lets a gradient be judged against the size of its loss: with D = 1 the cosine losses' gradients are
    identically zero and both sides hold only rounding noise, so "relative to the gradient itself" would compare noise.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    actual, expected = actual.detach().double(), expected.detach().double()
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN pattern differs"
    finite = ~expected.isnan()
    difference = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    scale = max(expected[finite].abs().max().item() if finite.any() else 0.0, scale_floor)
    assert difference <= rtol * scale, f"{what}: max abs diff {difference:.3e} > {rtol:g} * {scale:.3e}"


def grads(value: torch.Tensor, inputs):
    """Gradients of a scalar (or summed vector) value; zeros for inputs it does not depend on."""
    value = value.sum() if value.dim() else value
    if not value.requires_grad:  # e.g. PML's constant 0 for a batch without pairs
        return [torch.zeros_like(i) for i in inputs]
    found = torch.autograd.grad(value, inputs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, found)]


def class_weights(module):
    """A classifier module's class matrix, ours or PML's: W, or SoftTriple's fc."""
    return module.fc if hasattr(module, "fc") else module.W


def _log_uniform_int(generator: torch.Generator, low: int, high: int) -> int:
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    return min(high, int(math.exp(math.log(low) + u * (math.log(high + 1) - math.log(low)))))


@dataclass
class PairCase:
    x: torch.Tensor
    labels: torch.Tensor
    y: Optional[torch.Tensor]
    y_labels: Optional[torch.Tensor]
    self_offset: Optional[int]

    @property
    def inputs(self):
        return [self.x] if self.y is None else [self.x, self.y]


def random_pair_case(seed: int, max_rows: int = 300, max_dim: int = 128, min_dim: int = 1,
                     allow_self_offset: bool = True, max_offset_rows: int = 300) -> PairCase:
    """Sizes 1..max_rows, dims min_dim..max_dim, few or many classes, with and without ref_emb and self_offset."""
    g = torch.Generator().manual_seed(seed)
    n = _log_uniform_int(g, 1, max_rows)
    dim = _log_uniform_int(g, min_dim, max_dim)
    kind = torch.randint(0, 4, (), generator=g).item()  # 0, 1: queries only; 2: ref_emb; 3: ref_emb + self_offset
    if kind == 3 and not allow_self_offset:
        kind = 2
    if kind == 3:
        n = min(n, max_offset_rows)
    few = torch.rand((), generator=g).item() < 0.5
    classes = torch.randint(1, 5, (), generator=g).item() if few else max(1, n // 2 + torch.randint(0, n // 2 + 1, (), generator=g).item())
    x = torch.randn(n, dim, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, classes, (n,), generator=g)
    if kind < 2:
        return PairCase(x, labels, None, None, None)
    m = _log_uniform_int(g, 1, max_rows)
    offset = None
    if kind == 3:
        offset = torch.randint(0, m + 1, (), generator=g).item()
        m = n + m  # room for the queries at rows offset .. offset + n - 1
        offset = min(offset, m - n)
    y = torch.randn(m, dim, generator=g, dtype=torch.float64)
    y_labels = torch.randint(0, classes, (m,), generator=g)
    if offset is not None:  # the queries sit inside the references, as in distributed training or a memory bank
        y[offset:offset + n] = x.detach()
        y_labels[offset:offset + n] = labels
    return PairCase(x, labels, y.requires_grad_(), y_labels, offset)


def assert_grads_close(ours: torch.Tensor, expected: torch.Tensor, inputs, rtol: float, what: str = "") -> None:
    """Gradients of `ours` and `expected` with respect to every input, relative to max(gradient, 1e-3 * |loss|)."""
    floor = 1e-3 * max(ours.detach().abs().max().item() if ours.numel() else 0.0,
                       expected.detach().abs().max().item() if expected.numel() else 0.0)
    for index, (a, b) in enumerate(zip(grads(ours, inputs), grads(expected, inputs))):
        assert_rel_close(a, b, rtol, f"{what} grad of input {index}", scale_floor=floor)


def tf32_rounded(rows):
    """fp32 rows rounded to nearest (ties away) at 10 mantissa bits, as cvt.rna.tf32.f32 (the CUDA kernels' rounding
    of fp32 operands for tf32 tensor cores), in float64."""
    bits = rows.float().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).double()


# The fused backends the CPU suite runs (triton under its interpreter, the CPU kernels, the CUDA kernels on the host),
# with ids a -k expression can name whole (cuda_emulated)
FUSED_BACKENDS = ["triton", "cpu", "cuda-emulated"]
fused_backend_param = pytest.mark.parametrize("backend", FUSED_BACKENDS,
                                              ids=[name.replace("-", "_") for name in FUSED_BACKENDS])
# (distance, normalize_embeddings) of the pair losses: every pair value, normalised or not
PAIR_DISTANCES = [("euclidean", True), ("euclidean", False), ("squared_euclidean", True),
                  ("squared_euclidean", False), ("cosine", True), ("dot", True), ("dot", False)]


def assert_pair_dictionary_equals_pmls(ours: dict, theirs: dict, inputs, rtol: float) -> None:
    """DoNothingReducer's per-pair dictionaries ("pos_pair": a P x 1 column and (anchor, positive) indices): the same
    pairs in the same order, the same terms and the same gradients."""
    ours, theirs = ours["loss"], theirs["loss"]
    assert ours["reduction_type"] == theirs["reduction_type"] == "pos_pair"
    assert all(torch.equal(a, b) for a, b in zip(ours["indices"], theirs["indices"]))
    assert ours["losses"].shape == theirs["losses"].shape
    assert_rel_close(ours["losses"], theirs["losses"], rtol, "DoNothingReducer losses")
    for a, b in zip(grads(ours["losses"], inputs), grads(theirs["losses"], inputs)):
        assert_rel_close(a, b, rtol, "DoNothingReducer gradient")
