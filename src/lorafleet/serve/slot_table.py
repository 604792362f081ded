"""The engine's adapter slot table: which resident adapter holds which MultiLoRA slot."""

from __future__ import annotations

from typing import Protocol

import torch

from lorafleet.adapters import Adapter
from lorafleet.errors import LorafleetError
from lorafleet.layers import MultiLoRAModel


class AdapterSource(Protocol):
    """Where the engine turns for an adapter that is not resident (the tiered registry)."""

    def prepare(self, name: str) -> str | None:
        """Start making `name` resident (through `Engine.load_adapter`, e.g. from a background
        thread) and return None, so requests for it wait; or return a one-line reason it can
        never be served, so they fail alone. Called at add time and at every step while such a
        request waits, so it must be idempotent and quick."""
        ...


class SlotTable:
    """Names of resident adapters -> slots 1..max_slots of one MultiLoRA handle (slot 0 is the
    base), and the `source` asked for adapters that are not resident. It answers the
    scheduler's `AdapterGate`. It knows nothing of requests or locks: the engine holds its
    lock around `load` / `unload` and refuses changes to an adapter running requests pin."""

    def __init__(
        self,
        handle: MultiLoRAModel | None,
        max_slots: int,
        base_fingerprint: str,
        source: AdapterSource | None = None,
    ):
        self.handle, self.max_slots = handle, max_slots
        self.base_fingerprint, self.source = base_fingerprint, source
        self._slots: dict[str, int] = {}  # resident adapter name -> slot

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, name: object) -> bool:
        return name in self._slots

    def adapter_ready(self, name: str | None) -> bool:
        """The base (None) or a resident adapter."""
        return name is None or name in self._slots

    def slot_of(self, name: str | None) -> int:
        return 0 if name is None else self._slots[name]

    def names(self) -> dict[str, int]:
        return dict(self._slots)  # a copy; entries change under the engine's lock

    def problem(self, name: str | None) -> str | None:
        """None when `name` is resident or the source is loading it; else why it cannot be.
        The source is asked about resident names too (its hit counts and recency)."""
        if name is None or (self.adapter_ready(name) and self.source is None):
            return None
        if self.source is not None:
            return self.source.prepare(name)
        loaded = ", ".join(sorted(self._slots)) or "none"
        return f"unknown adapter {name!r} (loaded: {loaded})"

    def problem_with(self, names: tuple[str, ...]) -> str | None:
        """`problem` for a request's adapters (one, or a mixture's parts), and their count."""
        if len(names) > max(self.max_slots, 1):
            return f"the mixture has {len(names)} adapters; there are {self.max_slots} slots"
        return next(filter(None, map(self.problem, names)), None)

    def unmixable(self, names: tuple[str, ...]) -> str | None:
        """Why a mixture of `names` cannot run (a resident part served per row only: DoRA,
        Bat), or None. Checked before admission, so it fails its own request, never a batch."""
        for name in names:
            if self.adapter_ready(name) and not self.handle.mixable(self._slots[name]):
                return f"adapter {name} (DoRA or Bat) cannot be part of a mixture"
        return None

    def check(self, name: str, adapter: Adapter, *, force: bool = False) -> None:
        """Raise (one line) unless `adapter` may be loaded as `name`; copies nothing."""
        if self.handle is None:
            raise LorafleetError("this engine has no adapter slots (max_slots=0)")
        if not isinstance(name, str) or not name.strip():
            raise LorafleetError(f"an adapter name must be a non-empty string, got {name!r}")
        theirs = adapter.meta.get("base_fingerprint")
        if theirs and theirs != self.base_fingerprint and not force:
            raise LorafleetError(
                f"adapter {name}: trained on another base (fingerprint {theirs}, this base is "
                f"{self.base_fingerprint})"
            )

    def check_fits(self, adapter: Adapter) -> None:
        """Raise (one line) unless the slots take `adapter`: its method is served batched, its
        rank fits and its target modules are injected; copies nothing."""
        if self.handle is None:
            raise LorafleetError("the engine has no adapter slots (closed?)")
        self.handle.slot_weights(adapter)

    def format(self) -> tuple[torch.device, torch.dtype] | None:
        """The device and dtype of the slots' tensors (None without slots, or once closed)."""
        layers = self.handle.layers.values() if self.handle is not None else ()
        layer = next(iter(layers), None)
        return None if layer is None else (layer.lora_A.device, layer.lora_A.dtype)

    def load(self, name: str, adapter: Adapter) -> int:
        """Copy `adapter` into `name`'s own slot if resident, else the lowest free one; return
        the slot. Call `check` first."""
        slot = self._slots.get(name) or self._free_slot()
        self.handle.load_slot(slot, adapter)
        self._slots[name] = slot
        return slot

    def unload(self, name: str) -> None:
        if name not in self._slots:
            raise LorafleetError(f"adapter {name} is not loaded")
        self.handle.clear_slot(self._slots.pop(name))

    def close(self) -> None:
        """Forget every adapter and give the model its plain linears back."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self._slots.clear()

    def _free_slot(self) -> int:
        free = sorted(set(range(1, self.max_slots + 1)) - set(self._slots.values()))
        if not free:
            raise LorafleetError(f"all {self.max_slots} adapter slots are taken; unload one first")
        return free[0]
