"""A self-contained MoLE directory: its gates, its config and a copy of every expert inside it."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from lorafleet.adapters import content_digest
from lorafleet.compose.mole import GATES_FILE, MOLE_CONFIG, MoleError, read_mole_config
from lorafleet.compose.mole_find import BUNDLED, bundled_dir, find_experts
from lorafleet.errors import LorafleetError
from lorafleet.fsutil import atomic_dir, atomic_write_json

# Beside the config and gates, what a bundle keeps of the source MoLE (training's checkpoints
# are left behind: they resume training, not serving).
KEPT = ("metrics.jsonl",)


def bundle_mole(src: str | Path, out: str | Path, pool: Sequence[Path] | None = None) -> Path:
    """Write OUT: the MoLE `src` with a copy of each expert as OUT/experts/<name> (its files,
    not its sub-directories) and the config's paths pointing there; hashes, gates, variant and
    base fingerprint unchanged. Experts are found as serving finds them (by content hash, see
    mole_find; `pool` defaults to the adapters beside `src`) and each copy is hashed again.
    Written to a temp dir beside OUT, then renamed: OUT appears whole or not at all. Refused
    (one line) when OUT exists or an expert cannot be found."""
    src, out = Path(src), Path(out)
    config = read_mole_config(src)
    if out.exists():
        raise MoleError(f"{out} already exists; choose another --out")
    if not (src / GATES_FILE).is_file():
        raise MoleError(f"{src}: no {GATES_FILE}")
    try:
        found = find_experts(src, config, pool)
    except LorafleetError as exc:
        raise MoleError(f"{src}: {exc}") from exc
    experts = []
    with atomic_dir(out, prefix=f".{out.name}.bundle-") as tmp:
        for i, (item, where) in enumerate(zip(config["experts"], found, strict=True)):
            rel = f"{BUNDLED}/{bundled_dir(item['name'], i)}"
            dest = tmp / rel
            if dest.exists():
                raise MoleError(f"{src}: two experts would be bundled as {rel}")
            dest.mkdir(parents=True)
            for file in where.iterdir():
                if file.is_file():
                    shutil.copy2(file, dest / file.name)
            if content_digest(dest) != item["sha256"]:  # rewritten while it was copied
                raise MoleError(f"expert {item['name']} ({where}) changed while it was copied")
            experts.append({**item, "path": rel})
        shutil.copy2(src / GATES_FILE, tmp / GATES_FILE)
        for name in KEPT:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        atomic_write_json(tmp / MOLE_CONFIG, {**config, "experts": experts})
    return out
