"""Building and loading the kernels' C++ sources: once per machine, into a cache keyed by the
sources, torch and the CPU."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shutil
import sys
from pathlib import Path
from types import ModuleType

from lorafleet import cpu

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
# Compiled into one extension (module.cpp binds them); the headers are hashed too.
SOURCES = [HERE / name for name in ("gemv.cpp", "decode.cpp", "stack.cpp", "module.cpp")]
HEADERS = [HERE / name for name in ("kernels.h", "vectors.h")]
FLAGS = ["-O3", "-march=native", "-fopenmp"]
# Set to 0 / off / false to never build or use the kernels (torch's kernels run instead).
ENV_SWITCH = "LORAFLEET_KERNELS"
ENV_DIR = "LORAFLEET_KERNELS_DIR"


def enabled() -> bool:
    """Whether `$LORAFLEET_KERNELS` allows the kernels (default: yes)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def kernels_dir() -> Path:
    """`$LORAFLEET_KERNELS_DIR`, else ~/.cache/lorafleet-kernels. Not under `$LORAFLEET_CACHE`:
    tests and benchmarks point that at fresh directories, and a build costs ~25 s."""
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorafleet-kernels"


def build_tag() -> str:
    """A key for these sources, compiler flags, torch, Python and CPU (its flags: a cache shared
    between machines never loads a build made with another CPU's -march=native)."""
    import torch

    parts = [path.read_bytes() for path in SOURCES + HEADERS]
    parts += [" ".join(FLAGS).encode(), torch.__version__.encode()]
    parts += [sys.version.encode(), cpu.cpu_flags().encode(), platform.machine().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def load(verbose: bool = False) -> ModuleType:
    """The compiled extension: imported from the cache, else built there first (~25 s, needs a
    C++ compiler and ninja). Raises whatever the build raises."""
    import torch  # noqa: F401  (the extension links against torch's libraries, loaded first)

    tag = build_tag()
    name = f"lorafleet_gemv_{tag}"
    directory = kernels_dir() / tag
    built = directory / f"{name}.so"
    if built.is_file():
        return import_built(name, built)
    from torch.utils import cpp_extension

    ninja_on_path()
    directory.mkdir(parents=True, exist_ok=True)
    log.warning("building lorafleet's CPU kernels into %s (once per machine, ~25 s)", directory)
    return cpp_extension.load(
        name,
        [str(path) for path in SOURCES],
        extra_cflags=FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=verbose,
    )


def ninja_on_path() -> None:
    """Put this interpreter's scripts directory (where pip puts the `ninja` package's command)
    on PATH when no `ninja` is there: torch's builder runs `ninja` by name, and a venv's Python
    is often run without the venv activated."""
    if shutil.which("ninja") is None:
        scripts = str(Path(sys.executable).parent)
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


def import_built(name: str, path: Path) -> ModuleType:
    """Import an already-built extension module from `path` (no compiler involved)."""
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
