"""Where converted base models are cached, the marker of a complete copy, and quiet transformers."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

from transformers.utils import logging as hf_logging

from lorafleet.models.sources import BaseSource
from lorafleet.paths import cache_dir

MARKER = "lorafleet-cache.json"  # written last: a cache dir without it is incomplete


@contextmanager
def quiet_transformers(show_progress: bool):
    """Silence transformers' warnings (and its progress bars unless the work is long)."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    if not show_progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def cache_key(source: BaseSource) -> str:
    """The cache entry's name: an embedded model's name and package version, else the file's
    stem and a hash of its path, size and mtime (a changed file converts again)."""
    if source.embedded is not None:
        return f"{source.name}-{source.embedded.cache_tag()}"
    stat = Path(source.location).stat()
    ident = f"{Path(source.location).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"{Path(source.location).stem}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def converted_dir(source: BaseSource) -> Path:
    """Where the de-quantised safetensors copy of a GGUF base lives."""
    return cache_dir() / "models" / cache_key(source)
