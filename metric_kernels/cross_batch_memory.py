"""CrossBatchMemory (Wang et al. 2020, XBM): a pair loss computed against a ring buffer of past embeddings.

PML's semantics and state names: each call first enqueues the detached batch, then computes the batch's loss against
the filled part of the memory, leaving out each query's own (just enqueued) slot. The fused losses take that as
`self_offset`; because these losses do not depend on the order of the references, a batch that wraps around the end
of the ring is handled by a rolled copy of the memory in which the batch's slots come first.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from . import _pml_keywords as keywords
from . import _validation as check
from .modules import (AngularLoss, BatchHardTripletLoss, CircleLoss, ContrastiveLoss, GeneralizedLiftedStructureLoss,
                      MarginLoss, MultiSimilarityLoss, NCALoss, NTXentLoss, SupConLoss, TripletMarginLoss,
                      TupletMarginLoss, _labels_on, _no_miners)

_LOSSES = (CircleLoss, SupConLoss, MultiSimilarityLoss, NTXentLoss, TupletMarginLoss, ContrastiveLoss,
           TripletMarginLoss, GeneralizedLiftedStructureLoss, MarginLoss, NCALoss, AngularLoss, BatchHardTripletLoss)


def _pairs_by_slot(entry: dict, slots: torch.Tensor) -> dict:
    """A DoNothingReducer entry of per-pair terms computed against the rolled memory, as PML gives it against the
    ring: each pair's reference index made its slot, the pairs in PML's order (by query, then by slot)."""
    if not isinstance(entry.get("indices"), tuple):
        return entry
    anchors, positives = entry["indices"]
    positives = slots[positives]
    order = torch.argsort(anchors * slots.shape[0] + positives)
    return dict(entry, losses=entry["losses"][order], indices=(anchors[order], positives[order]))


class CrossBatchMemory(nn.Module):
    """`CrossBatchMemory(loss, embedding_size, memory_size=1024, miner=None)` for CircleLoss, SupConLoss,
    MultiSimilarityLoss, NTXentLoss, TupletMarginLoss, ContrastiveLoss, TripletMarginLoss,
    GeneralizedLiftedStructureLoss, MarginLoss, NCALoss, AngularLoss and BatchHardTripletLoss, as
    pytorch-metric-learning's CrossBatchMemory: forward(embeddings, labels,
    indices_tuple=None, enqueue_mask=None). `supported_losses()` names the losses it takes, as PML's does.

    State (PML's names): `embedding_memory` (memory_size x embedding_size) and `label_memory` buffers, `queue_idx`
    (the next slot to write), `has_been_filled`, `curr_batch_idx` (the slots of the rows last enqueued);
    `reset_queue()` empties the memory; `add_to_memory(embeddings, labels, batch_size)` enqueues without computing a
    loss (PML's method, e.g. to pre-fill the memory). With `enqueue_mask`, the rows
    where it is True are enqueued and the others are the queries (no slot is left out), as in PML.

    Differences from PML: miners (`indices_tuple`, and `miner=` other than None, which raises NotImplementedError)
    are not supported, the fused losses compute every pair (batch-hard mining is BatchHardTripletLoss itself); a batch
    of one row leaves its own slot out (PML keeps it); enqueuing nothing never marks the memory as filled.

    NCALoss, as in PML, keeps each query's own slot among its references (a positive at distance 0): PML hands the
    memory's pairs without the own slots to the loss as an indices_tuple, which NCA reads only as per-query weights
    (all equal here, each query having as many pairs as the others), never as pairs to leave out.
    """

    def __init__(self, loss, embedding_size, memory_size=1024, miner=None, *, collect_stats=None):
        super().__init__()
        if not isinstance(loss, _LOSSES):
            raise TypeError("loss must be a metric_kernels CircleLoss, SupConLoss, MultiSimilarityLoss, NTXentLoss, "
                            "TupletMarginLoss, ContrastiveLoss, TripletMarginLoss, GeneralizedLiftedStructureLoss, "
                            "MarginLoss, NCALoss, AngularLoss or BatchHardTripletLoss, got "
                            f"{type(loss).__name__}")
        keywords.check_none("CrossBatchMemory", miner=miner)
        keywords.check_collect_stats("CrossBatchMemory", collect_stats)
        self.miner = None
        for value, name in ((embedding_size, "embedding_size"), (memory_size, "memory_size")):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.loss = loss
        self.embedding_size = int(embedding_size)
        self.memory_size = int(memory_size)
        self.reset_queue()

    @staticmethod
    def supported_losses():
        """The names of the loss classes this wrapper takes (PML's holds its own class names, as strings)."""
        return [cls.__name__ for cls in _LOSSES]

    @classmethod
    def check_loss_support(cls, loss_name):
        """PML's check: raises for a loss class name not in supported_losses()."""
        if loss_name not in cls.supported_losses():
            raise TypeError(f"CrossBatchMemory does not support {loss_name}: it takes "
                            f"{', '.join(cls.supported_losses())}")

    def reset_queue(self):
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.long))
        self.has_been_filled = False
        self.queue_idx = 0

    def add_to_memory(self, embeddings, labels, batch_size):
        """PML's method: writes the rows (detached) at queue_idx.. (mod memory_size), sets curr_batch_idx to their
        slots and advances queue_idx, as forward does before it computes the loss. batch_size is the number of rows.
        The memory keeps its device and dtype (forward moves it to the batch's); the rows are cast to them."""
        labels = self._checked_batch(embeddings, labels)
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
            raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
        if batch_size != embeddings.shape[0]:
            raise ValueError(f"batch_size must be the number of rows of embeddings ({embeddings.shape[0]}), "
                             f"got {batch_size}")
        self._check_fits(batch_size)
        self._enqueue(embeddings, labels)

    def forward(self, embeddings, labels=None, indices_tuple=None, enqueue_mask=None):
        _no_miners(indices_tuple)
        labels = self._checked_batch(embeddings, labels)
        # PML keeps the memory in the embeddings' device and dtype.
        self.embedding_memory = self.embedding_memory.to(device=embeddings.device, dtype=embeddings.dtype)
        self.label_memory = self.label_memory.to(device=labels.device, dtype=labels.dtype)

        if enqueue_mask is not None:
            if not isinstance(enqueue_mask, torch.Tensor) or enqueue_mask.dtype != torch.bool:
                raise TypeError("enqueue_mask must be a boolean tensor")
            if enqueue_mask.shape != (embeddings.shape[0],):
                raise ValueError(f"enqueue_mask must have shape ({embeddings.shape[0]},) (one entry per row of "
                                 f"embeddings), got {tuple(enqueue_mask.shape)}")
            enqueue_mask = enqueue_mask.to(embeddings.device)
            to_queue, queue_labels = embeddings[enqueue_mask], labels[enqueue_mask]
            queries, query_labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
        else:
            to_queue, queue_labels = queries, query_labels = embeddings, labels
        batch = to_queue.shape[0]
        self._check_fits(batch)

        start = self._enqueue(to_queue, queue_labels)
        references, reference_labels, self_offset, slots = self._references(start, batch)
        if enqueue_mask is not None or isinstance(self.loss, NCALoss):
            self_offset = None  # the queries were not enqueued, or NCA (as PML's) keeps the own slots: see the class
        out = self.loss(queries, query_labels, None, references, reference_labels, self_offset=self_offset)
        if slots is not None and isinstance(out, dict):
            out = {name: _pairs_by_slot(entry, slots) for name, entry in out.items()}
        return out

    def _checked_batch(self, embeddings, labels):
        """Checks a batch (embedding_size columns, one integer label per row); returns the labels on its device."""
        check.check_embeddings(embeddings, "embeddings")
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must have {self.embedding_size} columns (embedding_size), "
                             f"got shape {tuple(embeddings.shape)}")
        labels = _labels_on(labels, embeddings, "labels")
        check.check_labels(labels, "labels", embeddings.shape[0], "embeddings")
        return labels

    def _check_fits(self, rows: int) -> None:
        if rows > self.memory_size:
            raise ValueError(f"cannot enqueue {rows} rows into a memory of {self.memory_size} (memory_size)")

    def _enqueue(self, embeddings, labels) -> int:
        """Writes the rows at queue_idx.. (mod memory_size); returns where they start."""
        start, batch = self.queue_idx, embeddings.shape[0]
        self.curr_batch_idx = torch.arange(start, start + batch, device=labels.device) % self.memory_size
        with torch.no_grad():
            first = min(batch, self.memory_size - start)
            self.embedding_memory[start:start + first] = embeddings[:first].detach()
            self.label_memory[start:start + first] = labels[:first]
            self.embedding_memory[:batch - first] = embeddings[first:].detach()
            self.label_memory[:batch - first] = labels[first:]
        self.queue_idx = (start + batch) % self.memory_size
        if batch > 0 and not self.has_been_filled and self.queue_idx <= start:
            self.has_been_filled = True
        return start

    def _references(self, start: int, batch: int):
        """(references, their labels, offset of the batch in them, each reference's slot or None where it is its
        row): the filled memory, rolled if the batch wraps."""
        if not self.has_been_filled:
            # Filled from slot 0 without wrapping yet: the batch is at start.. of memory[:queue_idx].
            return self.embedding_memory[:self.queue_idx], self.label_memory[:self.queue_idx], start, None
        if start + batch <= self.memory_size:
            return self.embedding_memory, self.label_memory, start, None
        # The batch wraps: roll the ring so that its slots start at 0 (the losses' values ignore the references'
        # order; per-pair indices are mapped back to slots).
        order = torch.cat([torch.arange(start, self.memory_size), torch.arange(0, start)]).to(
            self.label_memory.device)
        return self.embedding_memory[order], self.label_memory[order], 0, order

    def extra_repr(self):
        return f"embedding_size={self.embedding_size}, memory_size={self.memory_size}"
