"""The Trans-LoRA kit: seeds, discriminator, source adapter reference, source base fingerprint.

KIT/
  kit.json           format, task format, source base (name + fingerprint), source adapter
                     (absolute path + sha256), chat, the discriminator's held-out accuracy
  seeds.jsonl        the seed rows (the only task rows the kit keeps)
  discriminator/     a PEFT LoRA adapter on the source base
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lorafleet.adapters import content_digest
from lorafleet.fsutil import atomic_write_json
from lorafleet.transfer.task import TaskFormat, TransferError

KIT_FILE = "kit.json"
SEEDS_FILE = "seeds.jsonl"
DISC_DIR = "discriminator"
FORMAT = "lorafleet-translora-kit"
VERSION = 1


def kit_digest(path: str | Path) -> str:
    """sha256 over the kit's files (a run records which kit it used)."""
    path = Path(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode())
        h.update(file.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class Kit:
    path: Path
    info: dict  # kit.json
    seeds: list[dict]

    @property
    def task(self) -> TaskFormat:
        return TaskFormat.from_dict(self.info["task"])

    @property
    def chat(self) -> bool:
        return bool(self.info["chat"])

    @property
    def discriminator(self) -> Path:
        return self.path / DISC_DIR

    @property
    def source_fingerprint(self) -> str:
        return self.info["source_base"]["fingerprint"]

    def seed_inputs(self) -> list[str]:
        return [self.task.input_of(row) for row in self.seeds]

    def source_adapter(self, override: Path | None = None) -> Path:
        """The source adapter's directory, checked against the hash recorded in the kit."""
        ref = self.info["source_adapter"]
        path = Path(override) if override is not None else Path(ref["path"])
        if not path.exists():
            raise TransferError(
                f"{path}: source adapter not found (the kit points there); pass "
                "--source-adapter DIR if it moved"
            )
        if content_digest(path) != ref["sha256"]:
            raise TransferError(
                f"{path}: this is not the source adapter the kit was made with (content hash "
                "differs)"
            )
        return path


def write_kit(target: Path, info: dict, seeds: list[dict]) -> None:
    """Fill `target` (a fresh directory that already holds discriminator/)."""
    info = {"format": FORMAT, "version": VERSION, **info}
    (target / SEEDS_FILE).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in seeds))
    atomic_write_json(target / KIT_FILE, info)


def read_kit(path: str | Path) -> Kit:
    """A kit directory, checked file by file (one-line errors)."""
    path = Path(path)
    file = path / KIT_FILE
    if not file.is_file():
        raise TransferError(
            f"{path}: not a Trans-LoRA kit (no {KIT_FILE}); make one with "
            "`lorafleet transfer prepare`"
        )
    try:
        info = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise TransferError(f"{file}: invalid JSON ({exc.msg})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise TransferError(f"{file}: not a Trans-LoRA kit file (format {FORMAT!r} expected)")
    if info.get("version") != VERSION:
        raise TransferError(
            f"{file}: kit version {info.get('version')!r}; this lorafleet reads version {VERSION}"
        )
    seeds_file = path / SEEDS_FILE
    if not seeds_file.is_file():
        raise TransferError(f"{path}: the kit has no {SEEDS_FILE}")
    try:
        seeds = [json.loads(line) for line in seeds_file.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise TransferError(f"{seeds_file}: invalid JSON ({exc.msg})") from None
    if not seeds:
        raise TransferError(f"{seeds_file}: no seed rows")
    if not (path / DISC_DIR / "adapter_config.json").is_file():
        raise TransferError(f"{path / DISC_DIR}: the kit's discriminator adapter is missing")
    return Kit(path, info, seeds)
