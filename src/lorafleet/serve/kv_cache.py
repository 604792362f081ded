"""Slot-based KV memory: one preallocated row of max_len positions per running sequence."""

from __future__ import annotations

import heapq

import torch
from torch import Tensor

from lorafleet.errors import LorafleetError


class KVCache:
    """Keys and values of every layer for up to `max_seqs` sequences of up to `max_len` tokens.

    k, v: [layers, max_seqs, kv_heads, max_len, head_dim], allocated once, so memory is bounded
    by construction (`bytes`). A running sequence owns one slot (a row along max_seqs) from
    admission until it finishes or is cancelled; position p of that sequence lives at
    [:, slot, :, p]. Slots are handed out lowest first, so a batch of running sequences tends to
    hold a contiguous range, which attention can read as a view instead of a gather. Freed rows
    are not zeroed: attention reads only each sequence's first `length` positions."""

    def __init__(
        self,
        num_layers: int,
        max_seqs: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        if min(num_layers, max_seqs, kv_heads, max_len, head_dim) < 1:
            raise LorafleetError("the KV cache needs at least one layer, sequence and position")
        shape = (num_layers, max_seqs, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seqs = max_seqs
        self.max_len = max_len
        self._free = list(range(max_seqs))  # a min-heap of free slots
        self._used: set[int] = set()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_slots(self) -> int:
        return len(self._used)

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def allocate(self) -> int:
        """Take the lowest free slot; raise when none is free (the scheduler checks first)."""
        if not self._free:
            raise LorafleetError(f"no free KV slot (all {self.max_seqs} in use)")
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise LorafleetError(f"KV slot {slot} is not in use")
        self._used.remove(slot)
        heapq.heappush(self._free, slot)

    def layer(self, index: int) -> tuple[Tensor, Tensor]:
        """Views of one layer's keys and values: [max_seqs, kv_heads, max_len, head_dim] each."""
        return self.k[index], self.v[index]
