"""Adapters named by Hugging Face hub id (`org/name[@revision]`): parsed, fetched once into the
hub cache (code-free files only, never pickles or code), refused in one line when not cached
while offline. Light at import: huggingface_hub and torch load on first use."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from lorafleet.errors import LorafleetError

FLAG = "--hub-adapters"
# What is fetched: the config, safetensors weights and the model card. Never pickled weights
# (adapter_model.bin, *.pt) nor code (*.py): loading those can run arbitrary code.
ALLOW_PATTERNS = ("adapter_config.json", "*.safetensors", "README.md")
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".py")
# org/name as the hub spells repository ids, then an optional @branch, @tag or @commit.
HUB_REF_RE = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})"
    r"(?:@(?P<revision>[A-Za-z0-9][\w./-]{0,127}))?"
)
TRUE = {"1", "true", "yes", "on"}


class HubAdapterError(LorafleetError):
    """A hub adapter that cannot be had (not cached while offline, no such repository or
    revision, no safetensors weights); the message names the repository."""


@dataclass(frozen=True)
class HubRef:
    """A hub adapter: the repository id and the revision (None: the default branch)."""

    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo if self.revision is None else f"{self.repo}@{self.revision}"


def parse_hub_ref(text) -> HubRef | None:
    """`org/name` or `org/name@revision` as a HubRef; None for anything else (a plain name, a
    path with more or fewer parts, `..` anywhere)."""
    if not isinstance(text, str) or ".." in text:
        return None
    match = HUB_REF_RE.fullmatch(text)
    if match is None or match["revision"] is not None and match["revision"].endswith("/"):
        return None
    return HubRef(match["repo"], match["revision"])


def not_found_hint(name) -> str:
    """The hint for a name that looks like a hub id and is not local, with the hub off."""
    ref = parse_hub_ref(name)
    return "" if ref is None else f"to load the hub adapter {ref}, turn on {FLAG}"


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set now (read at each call, not at import), or when
    huggingface_hub read it as set when it was imported and the variable is unset now."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().lower() in TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache() -> Path:
    """The hub cache directory: $HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's
    default (~/.cache/huggingface/hub); read at each call."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def fetch_adapter(ref: HubRef) -> Path:
    """The local snapshot directory of `ref` in the hub cache, holding its adapter_config.json
    and adapter_model.safetensors. Downloads only ALLOW_PATTERNS files, and only those missing
    from the cache (huggingface_hub's cache: a later call finds them there); offline
    (HF_HUB_OFFLINE) it reads the cache alone. Blocking; a one-line HubAdapterError naming
    the repository otherwise. The files' contents are not checked here: read_adapter and
    check_adapter do that, as for any adapter directory."""
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        path = snapshot_download(
            ref.repo,
            revision=ref.revision,
            cache_dir=str(hub_cache()),
            allow_patterns=list(ALLOW_PATTERNS),
            local_files_only=offline,
        )
    except Exception as exc:  # every way it fails ends in one line naming the repository
        raise HubAdapterError(f"hub adapter {ref}: {_why(exc, ref, offline)}") from None
    return check_snapshot(Path(path), ref)


def _why(exc: Exception, ref: HubRef, offline: bool) -> str:
    """What a snapshot_download failure means, in words (the most specific error first)."""
    from huggingface_hub import errors

    incomplete = getattr(errors, "IncompleteSnapshotError", ())
    if isinstance(exc, errors.GatedRepoError):
        return "the repository is gated: accept its terms on the hub and set HF_TOKEN"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"the repository has no revision {ref.revision!r}"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return "no such repository on the hub (or it is private: set HF_TOKEN)"
    if isinstance(exc, errors.HFValidationError):
        return "not a valid hub repository id"
    if isinstance(exc, (errors.LocalEntryNotFoundError, incomplete)):
        where = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        revision = f"revision {ref.revision}" if ref.revision else "it"
        return (
            f"{revision} is not in the local hub cache and {where}; "
            "fetch it once while online, or copy the hub cache here"
        )
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"could not be fetched ({type(exc).__name__}: {first})"


def check_snapshot(path: Path, ref: HubRef) -> Path:
    """`path` when it holds adapter_config.json and adapter_model.safetensors; else a one-line
    HubAdapterError naming what it lacks (and the pickled weights or code it has instead)."""
    from lorafleet.adapters.format import CONFIG_NAME, WEIGHTS_NAME

    have = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if name not in have]
    if not missing:
        return path
    unsafe = [name for name in have if name.endswith(UNSAFE_SUFFIXES)]
    found = f"; it holds {', '.join(unsafe)}, which lorafleet never loads" if unsafe else ""
    raise HubAdapterError(
        f"hub adapter {ref}: the repository has no {' or '.join(missing)}{found} (adapters "
        "are read from safetensors only: no pickled weights, no repository code)"
    )


def locate_adapter(text: str | Path, *, hub: bool) -> Path:
    """The directory the adapter argument `text` names: the local path when something exists
    there (a local directory always wins over a hub id); else, with `hub`, the hub snapshot of
    `org/name[@revision]` (fetch_adapter); else the path as given (reading it then says what
    is wrong), with a hint naming FLAG when it looks like a hub id."""
    path = Path(text).expanduser()
    if path.exists():
        return path
    ref = parse_hub_ref(str(text))
    if ref is None:
        return path
    if not hub:
        raise HubAdapterError(f"{text}: no such adapter directory ({not_found_hint(str(ref))})")
    return fetch_adapter(ref)
