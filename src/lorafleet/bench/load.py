"""Benchmark: cold (converting) vs warm (cached) load time of the embedded base models."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from lorafleet.bench import print_table, write_json


def run(models: list[str], json_out: str | Path) -> list[dict]:
    """Load each model twice in a fresh private cache: the first load de-quantises the GGUF
    file and writes safetensors, the second reads that cache."""
    from lorafleet.models import load_base

    cache = tempfile.mkdtemp(prefix="lorafleet-bench-cache-")
    previous = os.environ.get("LORAFLEET_CACHE")
    os.environ["LORAFLEET_CACHE"] = cache
    rows = []
    try:
        for name in models:
            first = load_base(name)
            start = time.perf_counter()
            second = load_base(name)
            warm = time.perf_counter() - start
            rows.append(
                {
                    "model": name,
                    "parameters": sum(p.numel() for p in second.model.parameters()),
                    "first_load_s": round(first.load_seconds, 2),
                    "second_load_s": round(warm, 2),
                    "speedup": round(first.load_seconds / warm, 1),
                    "second_from_cache": second.from_cache,
                }
            )
            del first, second
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if previous is None:
            os.environ.pop("LORAFLEET_CACHE", None)
        else:
            os.environ["LORAFLEET_CACHE"] = previous
    print_table(rows, ["model", "parameters", "first_load_s", "second_load_s", "speedup"])
    print(f"wrote {write_json(json_out, {'benchmark': 'load', 'rows': rows})}")
    return rows
