"""Hub repositories for offline tests, laid out exactly as huggingface_hub's cache lays them out
(models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>,
refs/<branch>}), holding adapters written by lorafleet; and the offline switch."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import huggingface_hub
from helpers import randomize_adapter
from huggingface_hub import constants

from lorafleet.adapters import MethodConfig, adapter_from_model, new_adapter, write_adapter
from lorafleet.models import fingerprint
from lorafleet.models.tiny import tiny_llama

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def go_offline(monkeypatch, root: Path) -> Path:
    """HF_HUB_OFFLINE=1 and the hub cache (HF_HOME, HF_HUB_CACHE) under `root`; huggingface_hub's
    own switch is set too, so nothing can reach the network. Returns the (empty) cache dir."""
    cache = root / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(root / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def count_fetches(monkeypatch) -> list:
    """Record each call of huggingface_hub.snapshot_download (what fetch_adapter calls)."""
    calls = []
    real = huggingface_hub.snapshot_download

    def counted(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", counted)
    return calls


def put_repo(cache: Path, repo: str, files: dict[str, bytes], ref: str | None = "main") -> str:
    """Write `files` as one commit of model repo `repo` into the hub cache `cache`: each file a
    blob named by its sha256, the snapshot entry a relative symlink to it, `refs/<ref>`
    holding the commit hash (no ref: reachable by its hash alone). Returns the commit hash."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return commit


def write_lora(path: Path, tokenizer, seed: int, rank: int = 4, **config) -> Path:
    """A random LoRA for the seed-0 tiny Llama, written by lorafleet (with its fingerprint)."""
    base = tiny_llama(0, vocab_size=len(tokenizer))
    fp = fingerprint(base)
    model = new_adapter(base, MethodConfig(rank=rank, alpha=2 * rank, **config))
    randomize_adapter(model, seed=seed, scale=0.3)
    write_adapter(path, adapter_from_model(model, base_fingerprint=fp))
    return path


def adapter_files(path: Path) -> dict[str, bytes]:
    """The config and weights of the adapter directory `path`, as a hub repo holds them."""
    return {name: (path / name).read_bytes() for name in (CONFIG, WEIGHTS)}
