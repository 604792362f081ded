"""This machine's CPU as the kernels and the default precision see it: its feature flags
(stdlib only, floor 0)."""

from __future__ import annotations

import platform
from pathlib import Path

# Any of these makes bfloat16 products native (oneDNN's AVX512-BF16 / AMX kernels) rather
# than converted to float32 and back.
NATIVE_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> str:
    """The CPU's feature flags as /proc/cpuinfo lists them (Linux), else the processor name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def native_bfloat16(flags: str | None = None) -> bool:
    """Whether the CPU (or the given flags text) multiplies bfloat16 natively."""
    have = set((cpu_flags() if flags is None else flags).split())
    return any(flag in have for flag in NATIVE_BFLOAT16_FLAGS)
