"""Finding a MoLE's experts: by content hash among the adapters in view, then by the recorded path.

A MoLE records each expert as {"name", "path" (relative to the MoLE dir), "sha256" (the
adapter's content_digest)}. The hash is what identifies the expert, so a MoLE keeps working
when it is copied beside its experts, bundled with them (MOLE/experts/NAME) or when the
experts move, as long as some adapter in view holds the same bytes; the recorded path only
serves the error message when none does."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from lorafleet.adapters import content_digest
from lorafleet.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from lorafleet.errors import LorafleetError

BUNDLED = "experts"  # a bundled MoLE's own copies: MOLE/experts/<dir>
SAFE_DIR = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


class ExpertNotFound(LorafleetError):
    """No adapter in view holds the expert's recorded content (one line: missing or changed)."""


def is_adapter_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def bundled_dir(name: str, index: int) -> str:
    """The directory (under MOLE/experts/) a bundle gives expert number `index` named `name`:
    the name itself when it is a safe directory name, else `expert<index>`."""
    return name if SAFE_DIR.fullmatch(name) else f"expert{index}"


def sibling_pool(mole_dir: str | Path) -> list[Path]:
    """The adapters the CLI sees for a MoLE: the adapter directories beside it."""
    parent = Path(mole_dir).resolve().parent
    try:
        return sorted(p for p in parent.iterdir() if p.is_dir() and is_adapter_dir(p))
    except OSError:
        return []


class Digests:
    """content_digest of adapter directories, cached by their files' (mtime_ns, size): a pool
    of adapters is hashed once, and again only where a file changed. Thread-safe."""

    def __init__(self):
        self._cache: dict[Path, tuple[tuple, str]] = {}
        self._lock = threading.Lock()

    def get(self, path: Path) -> str | None:
        """The adapter's content hash, or None when `path` is not a readable adapter dir."""
        try:
            key = path.resolve()
            files = [(key / n).stat() for n in (CONFIG_NAME, WEIGHTS_NAME)]
        except OSError:
            return None
        stamp = tuple((s.st_mtime_ns, s.st_size) for s in files)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        try:
            digest = content_digest(key)
        except (OSError, LorafleetError):
            return None
        with self._lock:
            self._cache[key] = (stamp, digest)
        return digest


def _unique(paths: Iterable[Path]) -> list[Path]:
    seen, out = set(), []
    for p in paths:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def find_expert(
    mole_dir: Path, index: int, item: dict, pool: Sequence[Path], digests: Digests
) -> Path:
    """The directory holding expert `item` (the config's entry number `index`): the first of
    its bundled copy, its recorded path, the pool's adapters of the same name, then the rest
    of the pool, whose content hash equals the recorded one. ExpertNotFound (one line) says
    "changed" when an adapter stands where the expert was recorded (or under its name) with
    other bytes, else "missing"."""
    name, want = item["name"], item["sha256"]
    recorded = mole_dir / item["path"]
    bundled = mole_dir / BUNDLED / bundled_dir(name, index)
    names = {Path(item["path"]).name, name}
    same_named = [p for p in pool if p.name in names]
    likely = [bundled, recorded, *same_named]
    for candidate in _unique([*likely, *pool]):
        if digests.get(candidate) == want:
            return candidate
    stale = next((p for p in likely if is_adapter_dir(p)), None)
    if stale is not None:
        raise ExpertNotFound(
            f"expert {name} ({stale}) changed since the gates were trained: its sha256 differs "
            f"and no adapter in view (of {len(pool)}) holds the recorded one {want[:12]}"
        )
    raise ExpertNotFound(
        f"expert {name} is missing: no adapter in view (of {len(pool)}) has its sha256 "
        f"{want[:12]}, and {recorded} is not an adapter directory"
    )


def find_experts(
    mole_dir: str | Path,
    config: dict,
    pool: Sequence[Path] | None = None,
    digests: Digests | None = None,
) -> list[Path]:
    """Every expert's directory, in the config's order (see find_expert); `pool` defaults to
    the adapter directories beside the MoLE (sibling_pool)."""
    root = Path(mole_dir)
    pool = sibling_pool(root) if pool is None else list(pool)
    digests = digests or Digests()
    return [find_expert(root, i, item, pool, digests) for i, item in enumerate(config["experts"])]
