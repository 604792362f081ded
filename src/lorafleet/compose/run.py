"""`lorafleet merge` as one function: parse NAME=DIR[:WEIGHT] specs, check, merge, write."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lorafleet.adapters import check_adapter, read_adapter, write_adapter
from lorafleet.compose.deltas import MergeError
from lorafleet.compose.export import fold_deltas, write_model_dir
from lorafleet.compose.merge import merge_adapters, merged_deltas


@dataclass
class AdapterSpec:
    """One `--adapter NAME=DIR[:WEIGHT]` (or plain DIR: name from the dir, weight 1)."""

    name: str
    path: Path
    weight: float = 1.0


def parse_spec(text: str) -> AdapterSpec:
    """NAME=DIR[:WEIGHT] | DIR[:WEIGHT]; a bad weight is a one-line error."""
    name, _, rest = text.partition("=") if "=" in text else ("", "", text)
    path, weight = rest, 1.0
    head, sep, tail = rest.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            head = ""
        if head:
            path = head
    if not path:
        raise MergeError(f"--adapter {text!r}: expected NAME=DIR[:WEIGHT]")
    if not math.isfinite(weight):
        raise MergeError(f"--adapter {text!r}: the weight must be a finite number")
    return AdapterSpec(name=name or Path(path).name, path=Path(path), weight=weight)


def run_merge(
    base: str,
    specs: list[str],
    method: str,
    out: Path,
    *,
    into_base: bool = False,
    density: float = 0.5,
    majority_sign: str = "total",
    seed: int = 0,
    rank: int | None = None,
    force: bool = False,
    max_rank: int = 4096,
    hub_adapters: bool = False,
) -> dict:
    """Merge the adapters and write an adapter dir (or, `into_base`, a full model dir).
    Returns a JSON-ready summary (where it was written, the recipe, the relative error).
    With `hub_adapters`, a DIR may be a hub id `org/name[@revision]` (a local path wins)."""
    from lorafleet.adapters.hub import locate_adapter
    from lorafleet.models import load_base

    parsed = [parse_spec(s) for s in specs]
    if not parsed:
        raise MergeError("give at least one --adapter")
    names = [p.name for p in parsed]
    if len(set(names)) != len(names):
        raise MergeError(f"adapter names must differ: {', '.join(names)}")
    adapters = [read_adapter(locate_adapter(p.path, hub=hub_adapters)) for p in parsed]
    loaded = load_base(base)
    for a in adapters:
        check_adapter(
            a, loaded.model, base_fingerprint=loaded.fingerprint, max_rank=max_rank, force=force
        )
    weights = [p.weight for p in parsed]
    opts = {"density": density, "majority_sign": majority_sign, "seed": seed, "rank": rank}
    if into_base:
        deltas, report = merged_deltas(adapters, weights, method, progress=True, **opts)
        fold_deltas(loaded.model, deltas)
        recipe = {
            "method": method,
            "base": base,
            "base_fingerprint": loaded.fingerprint,
            "adapters": [{"name": p.name, "path": str(p.path), "weight": p.weight} for p in parsed],
            **report,
        }
        write_model_dir(loaded.model, loaded.tokenizer, out, recipe)
        return {"model_dir": str(out), **recipe}
    merged = merge_adapters(adapters, weights, method, names=names, progress=True, **opts)
    merged.meta.setdefault("base_fingerprint", loaded.fingerprint)
    write_adapter(out, merged)
    return {"adapter": str(out), "rank": merged.rank, **merged.meta["merge"]}
