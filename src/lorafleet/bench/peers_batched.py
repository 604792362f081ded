"""llama.cpp in-process: `llama-batched-bench` (its command, its Markdown table parsed), the
memory its libraries log, a GGUF's tensor bytes, and a child process's own peak RSS."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from lorafleet.errors import LorafleetError

# tools/batched-bench/batched-bench.cpp prints one row per (PP, TG, B), columns
# | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
COLUMNS = ("pp", "tg", "pl", "n_kv", "t_pp", "s_pp", "t_tg", "s_tg", "t", "s")
_NUMBER = r"\s*(-?[0-9.]+(?:[eE][-+]?[0-9]+)?|nan|inf)\s*"
_ROW = re.compile(r"^\|" + r"\|".join([_NUMBER] * len(COLUMNS)) + r"\|\s*$")
# Lines the llama.cpp libraries log at load (src/llama-model.cpp, llama-kv-cache.cpp,
# llama-context.cpp, llama-adapter.cpp): "<fn>: <buffer> <what> buffer size = <x> MiB".
_BUFFER = re.compile(r"\b(model|KV|compute|LoRA) buffer size\s*=\s*([0-9.]+) MiB")
BUFFER_KEYS = {"model": "weights_mib", "KV": "kv_mib", "compute": "compute_mib", "LoRA": "lora_mib"}


def batched_bench_command(
    binary: Path,
    gguf: Path,
    prompt_tokens: int,
    new_tokens: int,
    parallel: tuple[int, ...],
    threads: int,
    batch: int | None = None,
    ubatch: int = 512,
) -> list[str]:
    """llama-batched-bench as its users run it for this workload: `parallel` sequences of
    `prompt_tokens` random prompt tokens each, then `new_tokens` decode steps of one token per
    sequence; flash attention on; a logical batch (-b) big enough that every prompt of the
    widest run prefills in one llama_decode (`batch`, default the next power of two at or
    above max(parallel) * prompt_tokens, at least 2048), split in `ubatch` micro-batches (-ub);
    a context (-c) holding every sequence whole."""
    widest = max(parallel)
    need = widest * prompt_tokens
    batch = batch or max(2048, 1 << (need - 1).bit_length())
    if batch < need:
        raise LorafleetError(f"-b {batch} is below {widest} x {prompt_tokens} prompt tokens")
    return [
        str(binary),
        "-m",
        str(gguf),
        "-c",
        str(widest * (prompt_tokens + new_tokens)),
        "-b",
        str(batch),
        "-ub",
        str(ubatch),
        "-npp",
        str(prompt_tokens),
        "-ntg",
        str(new_tokens),
        "-npl",
        ",".join(str(p) for p in parallel),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "-fa",
        "on",
        "-lv",
        "4",  # info: the buffer sizes at load (nothing is logged per step)
    ]


def parse_table(text: str) -> list[dict]:
    """llama-batched-bench's Markdown rows -> [{pp, tg, pl, n_kv, t_pp, s_pp, t_tg, s_tg, t, s}]
    (ints for the sizes, floats for the seconds and speeds); the header, its rule and every
    other line are skipped. Raises when no row is found."""
    rows = []
    for line in text.splitlines():
        found = _ROW.match(line.strip())
        if found:
            values = found.groups()
            rows.append(
                {
                    key: (int(v) if i < 4 else float(v))
                    for i, (key, v) in enumerate(zip(COLUMNS, values, strict=True))
                }
            )
    if not rows:
        tail = (text.strip().splitlines() or ["no output"])[-1]
        raise LorafleetError(f"llama-batched-bench printed no result row: {tail[:300]}")
    return rows


def figures(row: dict) -> dict:
    """One batched-bench row as the peer tables' figures: generated tokens per second of wall
    time with the prefill included (B x TG / (T_PP + T_TG)), prefill and decode speeds."""
    generated = row["pl"] * row["tg"]
    return {
        "parallel": row["pl"],
        "tokens": generated,
        "seconds": row["t_pp"] + row["t_tg"],
        "gen_tok_s": generated / (row["t_pp"] + row["t_tg"]),
        "prefill_tok_s": row["s_pp"],
        "decode_tok_s": row["s_tg"],
        "prefill_s": row["t_pp"],
    }


def buffer_mib(text: str) -> dict:
    """The MiB the llama.cpp libraries logged per kind of buffer, summed over the buffers of a
    kind: {"weights_mib", "kv_mib", "compute_mib", "lora_mib"} (absent when not logged)."""
    out: dict[str, float] = {}
    for what, mib in _BUFFER.findall(text):
        key = BUFFER_KEYS[what]
        out[key] = out.get(key, 0.0) + float(mib)
    return out


def gguf_tensor_bytes(path: Path) -> int:
    """Bytes of every tensor in a GGUF file: what one token's forward reads of the weights
    (the token embedding is read whole only where it is also the output head, as here)."""
    from gguf import GGUFReader

    return int(sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors))


def run_measured(args: list[str], timeout: float) -> dict:
    """Run `args` to completion: {"returncode", "output" (stdout + stderr), "peak_rss_mb" (the
    child's own maximum RSS, from wait4), "seconds"}; killed past `timeout`."""
    with tempfile.TemporaryFile() as out:
        began = time.monotonic()
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - began > timeout:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait
        out.seek(0)
        text = out.read().decode(errors="replace")
    return {
        "returncode": proc.returncode,
        "output": text,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "seconds": time.monotonic() - began,
    }


def run_batched_bench(args: list[str], timeout: float) -> dict:
    """One llama-batched-bench run: {"rows": {str(B): figures} for every -npl B, "memory",
    "peak_rss_mb"}; a failed run or a missing row is one LorafleetError."""
    done = run_measured(args, timeout)
    tail = (done["output"].strip().splitlines() or ["no output"])[-1][:300]
    if done["returncode"] != 0:
        raise LorafleetError(f"llama-batched-bench exited with {done['returncode']}: {tail}")
    rows = {str(r["pl"]): figures(r) for r in parse_table(done["output"])}
    wanted = args[args.index("-npl") + 1].split(",")
    if sorted(rows) != sorted(wanted):
        raise LorafleetError(f"llama-batched-bench gave rows {sorted(rows)}, not {wanted}: {tail}")
    return {"rows": rows, "memory": buffer_mib(done["output"]), "peak_rss_mb": done["peak_rss_mb"]}
