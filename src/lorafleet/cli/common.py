"""Helpers the command modules share: load a base (+ adapter or fed run), print a report table,
write a JSON file."""

from __future__ import annotations

from pathlib import Path

from lorafleet.errors import LorafleetError
from lorafleet.fsutil import atomic_write_json


def load_model(
    base: str,
    adapter: Path | None,
    force: bool,
    max_rank: int,
    fed: Path | None = None,
    mole: Path | None = None,
    mask: list[str] | None = None,
    dtype: str = "float32",
    hub_adapters: bool = False,
    device: str = "cpu",
):
    """(loaded base, adapter info or None, model): the base with `adapter` attached, the
    global model of the `lorafleet fed` run directory `fed`, or the MoLE directory `mole`
    (its experts `mask`ed); every parameter (the adapter's too) in `dtype`, on `device`
    (auto | cpu | cuda, models/device.py). With `hub_adapters`, `adapter` may be a hub id
    `org/name[@revision]` (a local path wins)."""
    from lorafleet.adapters.hub import locate_adapter
    from lorafleet.models import cast_parameters, parse_dtype, resolve_device

    parse_dtype(dtype)  # a bad name fails before anything loads
    where = resolve_device(device)  # so does cuda without a GPU
    if adapter is not None:  # a hub adapter is fetched (or refused) before the base loads
        adapter = locate_adapter(adapter, hub=hub_adapters)
    loaded, info, model = _load_model(base, adapter, force, max_rank, fed, mole, mask, dtype, where)
    cast_parameters(model, dtype)
    model.to(where)  # a fed or MoLE model loads on the CPU; its adapters came after the base
    return loaded, info, model


def _load_model(base, adapter, force, max_rank, fed, mole, mask, dtype, device):
    # Heavy imports happen here so `lorafleet --help` stays fast.
    if mask and mole is None:
        raise LorafleetError("--mask drops experts of a --mole; give --mole DIR")
    if mole is not None:
        if adapter is not None or fed is not None:
            raise LorafleetError("give --mole, --adapter or --fed, not several")
        from lorafleet.compose.mole import load_mole_base

        loaded, handle = load_mole_base(base, mole, mask or ())
        return loaded, None, handle.model
    if fed is not None:
        from lorafleet.fed.residual import load_fed_model

        return load_fed_model(base, fed, force, max_rank, adapter=adapter)
    from lorafleet.adapters import load_adapter
    from lorafleet.models import load_base

    loaded = load_base(base, dtype=dtype, device=device)
    if adapter is None:
        return loaded, None, loaded.model
    info, model = load_adapter(
        adapter, loaded.model, base_fingerprint=loaded.fingerprint, max_rank=max_rank, force=force
    )
    return loaded, info, model


def _cell(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} x{v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_report(report: dict) -> None:
    """One two-column table per section of {section: {key: value}}."""
    from rich.console import Console
    from rich.table import Table

    for section, values in report.items():
        table = Table(title=section, show_header=False, title_justify="left")
        for key, value in values.items():
            table.add_row(key, _cell(value))
        Console().print(table)


def write_json(path: Path, payload: dict) -> None:
    """Write `payload` as indented JSON, atomically (a temp file, then a rename)."""
    atomic_write_json(path, payload)
