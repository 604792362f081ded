"""Run one benchmark variant in its own spawned process: its figures, peak RSS, a time limit."""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import resource
import time
from collections.abc import Callable


def _child(fn: Callable[..., dict], args: tuple, results) -> None:
    try:
        result = fn(*args)
    except Exception as exc:  # a failed variant is a row with its reason, not a crashed bench
        result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
    results.put(result)


def run_in_child(fn: Callable[..., dict], *args, limit_s: float) -> dict:
    """fn(*args) in a fresh spawned process (its own memory, so peak RSS is its own), plus
    `peak_rss_mb`; {"error": reason} if it raises, dies, or gives nothing within `limit_s`.
    `fn` must be a module-level function (spawn pickles it by name)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, results))
    proc.start()
    deadline, result = time.monotonic() + limit_s, None
    try:
        while result is None:
            try:
                result = results.get(timeout=2)
            except queue_mod.Empty:
                if not proc.is_alive():
                    result = {"error": f"the process exited with code {proc.exitcode}"}
                elif time.monotonic() > deadline:
                    proc.kill()
                    result = {"error": f"no result within {limit_s:.0f} s"}
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    return result
