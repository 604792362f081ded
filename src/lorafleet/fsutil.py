"""Atomic file writes (temp file in the same directory, then a rename): stdlib only, floor 0."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

_UMASK = os.umask(0o022)  # read the process umask (the only way) and put it straight back
os.umask(_UMASK)


def atomic_write(target: Path, write: Callable[[str], object]) -> None:
    """Call `write(tmp)` on a temp file in the target's directory, then rename it over the
    target: readers see the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: str | Path, value, *, default=None) -> Path:
    """Write `value` as indented JSON with a trailing newline, atomically; creates the parent
    directory. The file gets the usual permissions (mkstemp alone would leave it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(value, indent=2, default=default) + "\n"

    def write(tmp: str) -> None:
        Path(tmp).write_text(text)
        os.chmod(tmp, 0o666 & ~_UMASK)

    atomic_write(path, write)
    return path


@contextlib.contextmanager
def atomic_dir(target: str | Path, prefix: str | None = None) -> Iterator[Path]:
    """Yield a temp directory beside `target` to fill; on success it replaces `target` whole
    (an older one is removed first), on an exception it is deleted: all or nothing."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
