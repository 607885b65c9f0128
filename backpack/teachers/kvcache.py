"""The KV cache of the hf teacher's decode loop: buffers sized for the whole answer, written in place, whose rows
are dropped by moving only the rows that must move, and whose memory a teacher keeps from batch to batch."""

from __future__ import annotations

import math
import threading

import torch
from transformers.cache_utils import DynamicLayer


class KVBuffers:
    """Storage for `decode_batch`'s KV cache kept from one batch to the next, by whoever decodes batch after batch
    (the hf teacher keeps one). A batch's KV buffers are hundreds of MB (64 rows x 156 positions: 460 MB for
    SmolLM2-135M); allocated afresh for each batch, glibc hands them back to the kernel at the end and the next
    batch faults its pages in again, which on CPU cost 0.3-0.7 s of a 12 s batch here (120-190 thousand page
    faults; 20-40 thousand with the storage kept). It grows to the largest batch asked of it and keeps that much.
    One batch at a time: a `decode_batch` that finds it in use by another thread allocates its own buffers."""

    GROWTH = 1.25  # room beyond the batch that asked, so slightly larger batches reuse it too

    def __init__(self):
        self._storage: dict[tuple, torch.Tensor] = {}
        self.lock = threading.Lock()

    def take(self, slot: tuple, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A tensor of `shape` (contents undefined) with `like`'s dtype and device, from the storage of `slot`."""
        need = math.prod(shape)
        flat = self._storage.get(slot)
        if flat is None or flat.numel() < need or flat.dtype != like.dtype or flat.device != like.device:
            flat = self._storage[slot] = None  # the old storage is freed before its successor is allocated
            with torch.inference_mode(False):  # a plain tensor: batches decoded in and out of inference mode share it
                flat = self._storage[slot] = torch.empty(int(need * self.GROWTH), dtype=like.dtype, device=like.device)
        return flat[:need].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._storage.values() if t is not None)


class GrowingLayer(DynamicLayer):
    """A layer's KV cache in buffers sized for the whole answer: a decode step writes its column in place, where
    DynamicLayer concatenates (copies) the whole cache every step (a fifth of the decode time on CPU here)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._k, self._v, self.length = keys, values, length
        self._view()

    def _view(self) -> None:
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[2]:
            raise RuntimeError(f"KV cache buffer of {self._k.shape[2]} positions is full")
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self._view()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._view()

    def keep_rows(self, order: list[int]) -> None:
        """Keep len(order) rows, row i becoming old row order[i], where `order` is a `refill_order` (kept rows
        stay put, the holes take rows from the tail): only the rows that move are copied, in place, where
        `batch_select_indices` copies every row's whole buffer (5% of the decode time at 64 rows here)."""
        moves = [(i, j) for i, j in enumerate(order) if i != j]
        if moves:
            dst, src = torch.tensor([i for i, _ in moves]), torch.tensor([j for _, j in moves])
            self._k[dst, :, :self.length] = self._k[src, :, :self.length]
            self._v[dst, :, :self.length] = self._v[src, :, :self.length]
        self._k, self._v = self._k[:len(order)], self._v[:len(order)]
        self._view()


def refill_order(keep: list[int], rows: int) -> list[int]:
    """The new order of a batch of `rows` that keeps the rows `keep` (ascending): a kept row keeps its place, and
    each place below len(keep) whose row left takes a kept row from beyond len(keep). No row is read after its
    place was written, so the move can be done in place (`GrowingLayer.keep_rows`)."""
    n, kept = len(keep), set(keep)
    tail = [j for j in keep if j >= n]
    return [i if i in kept else tail.pop() for i in range(n)]
