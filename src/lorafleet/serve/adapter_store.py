"""Pieces of the adapter registry: names and paths, file stamps, the CPU LRU, staging, failures."""

from __future__ import annotations

import copy
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lorafleet.adapters import Adapter, AdapterError, check_adapter, fingerprint_status
from lorafleet.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from lorafleet.errors import LorafleetError

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
MB = 1024 * 1024
SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgt]?i?b?)\s*", re.IGNORECASE)
UNITS = {"": 1, "k": 1024, "m": MB, "g": 1024 * MB, "t": 1024 * 1024 * MB}

# What identifies one version of an adapter's files: (mtime_ns, size) of each, None if absent.
Stamp = tuple


def name_problem(name) -> str | None:
    """Why `name` cannot name an adapter, or None. Names become directory names and URL parts,
    so only [A-Za-z0-9._-]{1,64}, and never "." or ".." (they would walk the directory tree)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        return f"invalid adapter name {name!r}: use 1 to 64 of A-Z a-z 0-9 . _ -"
    if set(name) == {"."}:
        return f"invalid adapter name {name!r}: it cannot be only dots"
    return None


def check_name(name) -> str:
    problem = name_problem(name)
    if problem:
        raise LorafleetError(problem)
    return name


def resolve_inside(path: str | Path, root: Path | None) -> Path:
    """`path` as an absolute, symlink-free path; refused (one line) when `root` is set and the
    path leaves it, which catches `..` parts and symlinks pointing elsewhere alike."""
    path = Path(path).expanduser()
    if root is not None and not path.is_absolute():
        path = root / path
    resolved = path.resolve()
    if root is not None and not resolved.is_relative_to(root.resolve()):
        raise LorafleetError(f"adapter path {path} is outside the adapters directory {root}")
    if not (resolved / CONFIG_NAME).is_file():
        raise LorafleetError(f"{path} is not an adapter directory (no {CONFIG_NAME})")
    return resolved


def stamp(path: Path) -> Stamp:
    """Changes whenever the adapter's config or weights file is rewritten (or appears/vanishes)."""
    out = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            st = (path / name).stat()
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


def parse_size(text: str | int | float) -> int:
    """Bytes from `512MB`, `2GB`, `1.5g`, `800k` or a plain number (units are binary: 1 GB =
    1024^3 bytes, as memory is counted); a one-line error for anything else."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and text >= 0:
        return int(text)
    match = SIZE_RE.fullmatch(str(text))
    if match is None:
        raise LorafleetError(f"cannot read {text!r} as a size: use e.g. 512MB, 2GB or 1000000")
    number, unit = match.groups()
    letter = unit[:1].lower()
    return int(float(number) * UNITS[letter if letter in UNITS else ""])


def cache_budget(cpu_cache_mb: float, cpu_cache_bytes: int | str | None) -> int:
    """The CPU tier's budget in bytes: `cpu_cache_bytes` (a size) if given, else the MB."""
    if not isinstance(cpu_cache_mb, (int, float)) or not cpu_cache_mb >= 0:
        raise LorafleetError(f"cpu_cache_mb must be a number >= 0, got {cpu_cache_mb!r}")
    return int(cpu_cache_mb * MB) if cpu_cache_bytes is None else parse_size(cpu_cache_bytes)


def adapters_root(path: str | Path | None) -> Path | None:
    """The adapters directory, resolved; a one-line error when it does not exist."""
    if path is None:
        return None
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise LorafleetError(f"adapters directory {root} does not exist")
    return root


def tensor_bytes(adapter: Adapter) -> int:
    return sum(t.numel() * t.element_size() for t in adapter.tensors.values())


@dataclass
class CpuEntry:
    adapter: Adapter
    nbytes: int
    stamp: Stamp


class CpuCache:
    """Validated adapters in CPU memory, least recently used first out, bounded by tensor bytes.
    `pinned(name)` (adapters running requests use) are skipped when evicting, so the cache may
    stay over capacity until they are done (`shrink` then). Not thread-safe on its own: the
    registry calls it under its lock."""

    def __init__(self, capacity_bytes: int, pinned=lambda name: False):
        self.capacity = int(capacity_bytes)
        self.pinned = pinned
        self.entries: OrderedDict[str, CpuEntry] = OrderedDict()
        self.nbytes = 0

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, name: str) -> CpuEntry | None:
        entry = self.entries.get(name)
        if entry is not None:
            self.entries.move_to_end(name)
        return entry

    def touch(self, name: str) -> None:
        if name in self.entries:
            self.entries.move_to_end(name)

    def put(self, name: str, adapter: Adapter, stamp: Stamp, keep: bool = False) -> list[str]:
        """Insert as most recent; return the names evicted to stay within capacity. An adapter
        bigger than the whole capacity is not kept at all, unless `keep`: then it is never
        the one evicted here, even if it stays over capacity (until the next put)."""
        self.pop(name)
        entry = CpuEntry(adapter, tensor_bytes(adapter), stamp)
        self.entries[name] = entry
        self.nbytes += entry.nbytes
        if entry.nbytes > self.capacity and not keep:
            self.pop(name)
        return [old for old in self.shrink(spare=name if keep else None) if old != name]

    def shrink(self, spare: str | None = None) -> list[str]:
        """Evict least recently used entries (never pinned ones, nor `spare`) until within
        capacity; returns their names (the newest goes too when the pinned ones fill the
        capacity)."""
        evicted = []
        for old in list(self.entries):
            if self.nbytes <= self.capacity:
                break
            if old != spare and not self.pinned(old):
                self.pop(old)
                evicted.append(old)
        return evicted

    def pop(self, name: str) -> CpuEntry | None:
        entry = self.entries.pop(name, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
        return entry


class Failures:
    """Reasons adapters failed, each kept for `ttl_s` seconds or until its files change, so a
    burst of requests for a broken adapter reads its files once."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self.entries: dict[str, tuple[str, float, Stamp]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def remember(self, name: str, reason: str, stamp: Stamp) -> str:
        reason = " ".join(reason.split())
        self.entries[name] = (reason, time.monotonic(), stamp)
        return reason

    def get(self, name: str, current: Stamp) -> str | None:
        """The remembered reason, or None (and forget it) once expired or the files changed."""
        entry = self.entries.get(name)
        if entry is None:
            return None
        reason, when, stamp = entry
        if time.monotonic() - when < self.ttl_s and stamp == current:
            return reason
        del self.entries[name]
        return None

    def peek(self, name: str) -> str | None:
        """The remembered reason while it is fresh (by age only; nothing is forgotten here)."""
        entry = self.entries.get(name)
        if entry is None or time.monotonic() - entry[1] >= self.ttl_s:
            return None
        return entry[0]

    def pop(self, name: str) -> None:
        self.entries.pop(name, None)


def check_servable(
    adapter: Adapter,
    reference,
    base_fingerprint: str,
    max_rank: int,
    check_slots: Callable[[Adapter], None],
    force: bool = False,
) -> None:
    """Raise a one-line error unless `adapter` fits `reference` (the base's module tree, or
    None: the fingerprint alone), `max_rank` and the slots (`check_slots`, a backend's)."""
    if reference is not None:
        check_adapter(
            adapter, reference, base_fingerprint=base_fingerprint, max_rank=max_rank, force=force
        )
    elif fingerprint_status(adapter, base_fingerprint) == "mismatch" and not force:
        raise AdapterError(
            adapter.where(),
            f"trained on another base (fingerprint {adapter.meta['base_fingerprint']})",
        )
    # The slots' own checks (supported methods, their max rank, injected targets) now,
    # before a slot is freed for an adapter that could not go in it.
    check_slots(adapter)


def meta_reference(config) -> torch.nn.Module:
    """The base's un-injected module tree on the meta device (no memory): what check_adapter
    validates against, since the engine's own model has MultiLoRA layers in place of linears.
    Build it on the caller's thread: transformers sets the global default dtype meanwhile."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def to_slot_format(adapter: Adapter, fmt, copy: bool = True) -> Adapter | None:
    """`adapter` itself when its tensors already have the slots' device and dtype; else a copy
    that has them, or None when `copy` is False."""
    if fmt is None or all(
        t.device == fmt[0] and (not t.is_floating_point() or t.dtype == fmt[1])
        for t in adapter.tensors.values()
    ):
        return adapter
    if not copy:
        return None
    device, dtype = fmt
    tensors = {
        k: t.to(device, dtype if t.is_floating_point() else t.dtype)
        for k, t in adapter.tensors.items()
    }
    return Adapter(dict(adapter.config), tensors, dict(adapter.meta), adapter.path)
