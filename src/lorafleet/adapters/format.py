"""The adapter as data: PEFT's directory format (adapter_config.json + adapter_model.safetensors).

lorafleet's own metadata (base fingerprint, method, creation time) rides in the safetensors
header under the key "lorafleet" as a JSON string; PEFT ignores header keys it does not know,
so every directory written here still loads in PEFT and vLLM unchanged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lorafleet.adapters.methods.registry import find_method, peft_types
from lorafleet.errors import LorafleetError
from lorafleet.fsutil import atomic_write

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# The adapter's weights as initialised before training (same keys as WEIGHTS_NAME), written by
# `lorafleet train` for LoRA/rsLoRA runs: `calibrate --prior init` centres its prior there.
INIT_NAME = "lora_init.safetensors"
META_KEY = "lorafleet"
# Pickle-based files are never opened: loading them can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# The peft_types some registered method (adapters/methods/) is saved as.
SUPPORTED_PEFT_TYPES = peft_types()


class AdapterError(LorafleetError):
    """An adapter that cannot be used; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"{path}: {problem}")


@dataclass
class Adapter:
    """A PEFT adapter in memory: config dict, tensors (PEFT's on-disk keys), our metadata."""

    config: dict
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "")).upper()

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 0))

    @property
    def alpha(self) -> float | None:
        """lora_alpha, for the configs that have one (LoraConfig's); None otherwise."""
        return self.config.get("lora_alpha")

    @property
    def method(self) -> str:
        """The registered method the config belongs to (lora, rslora, dora, bone, bat, ...;
        from the config, not from our metadata; a saved BiLoRA reads as lora), or the lower-case
        peft_type when no registered method reads it."""
        found = find_method(self.config)
        return found.shown_as(self.config) if found else (self.peft_type.lower() or "unknown")

    @property
    def targets(self) -> list[str] | str:
        targets = self.config.get("target_modules") or []
        return targets if isinstance(targets, str) else sorted(targets)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def where(self, name: str = CONFIG_NAME) -> Path | str:
        return self.path / name if self.path is not None else name


def _json_default(value):
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def json_ready(config: dict) -> dict:
    """A config dict as it reads back from adapter_config.json (enums as strings, sets as
    sorted lists), so in-memory and on-disk adapters look the same."""
    return json.loads(json.dumps(config, default=_json_default))


def _read_config(path: Path) -> dict:
    file = path / CONFIG_NAME
    if not file.is_file():
        raise AdapterError(file, "missing (not a PEFT adapter directory)")
    text = file.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise AdapterError(file, "empty file")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterError(file, f"invalid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(config, dict):
        raise AdapterError(file, f"JSON is a {type(config).__name__}, expected an object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "BONE":
        raise AdapterError(
            file, "peft_type BONE was removed from PEFT; convert it to MISS (same math)"
        )
    if peft_type not in SUPPORTED_PEFT_TYPES:
        known = ", ".join(SUPPORTED_PEFT_TYPES)
        raise AdapterError(
            file, f"unknown peft_type {config.get('peft_type')!r} (expected {known})"
        )
    return config


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    file = path / WEIGHTS_NAME
    if not file.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterError(
                path / pickles[0],
                "pickle weights are never loaded (unsafe); save the adapter as safetensors",
            )
        raise AdapterError(file, "missing")
    if file.stat().st_size == 0:
        raise AdapterError(file, "empty file")
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open API)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(file, f"not a valid safetensors file ({exc})") from exc
    if not tensors:
        raise AdapterError(file, "holds no tensors")
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterError(file, f"tensor {key} has non-finite values (NaN or inf)")
    meta = {}
    if META_KEY in header:
        try:
            meta = json.loads(header[META_KEY])
        except json.JSONDecodeError:
            meta = {}
    return tensors, meta if isinstance(meta, dict) else {}


def read_adapter(path: str | Path) -> Adapter:
    """Read a PEFT adapter directory without unpickling anything; file-level checks only."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(path, "no such adapter directory")
    if not path.is_dir():
        raise AdapterError(path, "not a directory (an adapter is a PEFT adapter directory)")
    config = _read_config(path)
    tensors, meta = _read_tensors(path)
    return Adapter(config=config, tensors=tensors, meta=meta, path=path)


def _model_card(adapter: Adapter) -> str:
    meta = adapter.meta
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {adapter.config.get('base_model_name_or_path') or 'unknown'}",
        "tags: [lorafleet, " + adapter.method + "]",
        "---",
        "",
        f"# {adapter.method} adapter written by lorafleet",
        "",
        f"- method: {adapter.method}, rank {adapter.rank}"
        + (f", alpha {adapter.alpha}" if adapter.alpha is not None else ""),
        f"- targets: {adapter.targets}",
        f"- parameters: {adapter.num_parameters:,}",
        f"- base fingerprint: {meta.get('base_fingerprint', 'unknown')}",
    ]
    return "\n".join(lines) + "\n"


def content_digest(path: str | Path) -> str:
    """sha256 over an adapter directory's config and weights files (its content), so a record
    that names an adapter by path notices when the files change."""
    h = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        file = Path(path) / name
        if not file.is_file():
            raise LorafleetError(f"{path}: not an adapter directory (no {name})")
        h.update(name.encode())
        h.update(file.read_bytes())
    return h.hexdigest()


def write_init(path: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write the adapter's initial weights as PATH/lora_init.safetensors (atomically)."""
    file = Path(path) / INIT_NAME
    cpu = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    atomic_write(file, lambda tmp: save_file(cpu, tmp))
    return file


def write_adapter(path: str | Path, adapter: Adapter) -> Path:
    """Write `adapter` as a PEFT directory. Each file is replaced atomically; the config goes
    last, so a crash mid-write never leaves a config that points at missing weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for key, t in adapter.tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterError(path / WEIGHTS_NAME, f"refusing to write non-finite tensor {key}")
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in adapter.tensors.items()}
    header = {"format": "pt", META_KEY: json.dumps(adapter.meta, sort_keys=True)}
    # Drop an older config first: a crash below then leaves "config missing", never an old
    # config paired with new weights.
    (path / CONFIG_NAME).unlink(missing_ok=True)
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=header))
    config_text = json.dumps(adapter.config, indent=2, sort_keys=True, default=_json_default)
    card = _model_card(adapter)
    atomic_write(path / "README.md", lambda tmp: Path(tmp).write_text(card))
    atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_text + "\n"))
    adapter.path = path
    return path
