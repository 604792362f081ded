"""Interleaved repetitions for the peer tables: the run order, each run's 1-minute load
average, median / min / max over the reps, and a ratio against its target."""

from __future__ import annotations

import os
import statistics


def interleave(systems: list[str], reps: int) -> list[tuple[int, str]]:
    """The run order: every system once per repetition, in the order given, repetition after
    repetition ((0, a), (0, b), (1, a), (1, b), ...), so slow drifts of the machine fall on
    every system alike. A system listed twice runs once per repetition."""
    unique = list(dict.fromkeys(systems))
    return [(rep, system) for rep in range(reps) for system in unique]


def load1() -> float:
    """The machine's 1-minute load average now."""
    return os.getloadavg()[0]


def spread(values: list[float]) -> dict:
    """{"median", "min", "max", "n"} of `values` (None each when empty)."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarise_reps(runs: list[dict], metrics: tuple[str, ...]) -> dict:
    """One system's runs (dicts holding each of `metrics` (None where the run cannot tell) and
    "load1") -> {metric: spread of its non-None values, "load1": [per run], "reps": n}."""
    out = {"reps": len(runs), "load1": [r.get("load1") for r in runs]}
    for key in metrics:
        out[key] = spread([r[key] for r in runs if r.get(key) is not None])
    return out


def ratio(ours: dict | None, theirs: dict | None) -> float | None:
    """Median over median (two `spread`s); None when either is missing or zero."""
    if not ours or not theirs or not ours.get("median") or not theirs.get("median"):
        return None
    return ours["median"] / theirs["median"]


def verdict(value: float | None, target: float | None) -> str:
    """ "met" / "not met" against `target` (value >= target), "n/a" without one of them."""
    if value is None or target is None:
        return "n/a"
    return "met" if value >= target else "not met"


def shown(fig: dict | None, digits: int = 1) -> str:
    """A spread as "median [min-max]"; "-" when empty."""
    if not fig or fig.get("median") is None:
        return "-"
    return f"{fig['median']:.{digits}f} [{fig['min']:.{digits}f}-{fig['max']:.{digits}f}]"
