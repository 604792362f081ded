"""`lorafleet bench engine --peers`: lorafleet's engine against llama-batched-bench, both
in-process, at matched precision and bytes.

Workload (PeerTableConfig): `requests` sequences of `prompt_tokens` prompt tokens prefilled
together, then `new_tokens` generated per sequence (greedy, EOS ignored), and the same for one
sequence alone; generated tokens per second of wall time, the prefill included, and the
prefill / decode speeds apart. Pairs (peers.matched_pairs): lorafleet float32 vs an F32 GGUF,
bfloat16 vs BF16, bfloat16+int8 vs Q8_0 (those GGUFs made by llama.cpp's convert_hf_to_gguf.py
from lorafleet's safetensors of the same weights), and lorafleet's default setting vs the
shipped Q4_1.

lorafleet: one spawned process per setting, alive for the whole table (the engine built, its
`adapters` random adapters loaded as a server holds them, all requests on the base, warmed up
once on the real shapes); each run submits fresh prompts and steps the engine to the end.
llama.cpp: one `llama-batched-bench` process per run (its own warm-up; -npl 1,N in one go;
-fa on, -b big enough for the N prompts to prefill in one batch, -ub 512, -t/-tb threads).
Both sides use `threads` (default: every core). Runs are interleaved (lorafleet setting,
llama.cpp matched, next setting, ..., then the next repetition), the 1-minute load average read
before each; each figure is the median [min-max] over `reps`; a ratio is median over median.
Memory: lorafleet's weights / KV / adapter-slot bytes as allocated, and its process's peak RSS;
llama.cpp's model / KV / compute buffers as its libraries log them, and its peak RSS. Bytes
read per token: the weight tensors each side holds (lorafleet's parameters and quantised
weights; every tensor of the GGUF)."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from pathlib import Path

from lorafleet.bench import peer_tools, peers, print_table, write_json
from lorafleet.bench.peers_batched import (
    batched_bench_command,
    gguf_tensor_bytes,
    run_batched_bench,
)
from lorafleet.bench.peers_config import PeerTableConfig
from lorafleet.bench.peers_runs import interleave, load1, ratio, shown, summarise_reps, verdict
from lorafleet.bench.settings import parse_setting
from lorafleet.errors import LorafleetError

METRICS = ("gen_tok_s", "prefill_tok_s", "decode_tok_s")
READY_S = 900.0  # a worker's load + engine + warm-up
RUN_S = 600.0  # one run of one system


# -- lorafleet: one engine per setting in a process of its own ---------------------------------


def engine_figures(summary: dict, sequences: int, prompt_tokens: int) -> dict:
    """streaming.in_process's summary of `sequences` requests prefilled together -> the table's
    figures. The prefill ends when the last first token is out (TTFT p99 = the max of these
    few); the decode is the rest of the wall time, over the tokens after each first one."""
    seconds, tokens = summary["seconds"], summary["tokens"]
    prefill = summary["ttft_p99"]
    decode = seconds - prefill if prefill is not None else None
    return {
        "parallel": sequences,
        "tokens": tokens,
        "seconds": seconds,
        "gen_tok_s": tokens / seconds,
        "prefill_s": prefill,
        "prefill_tok_s": sequences * prompt_tokens / prefill if prefill else None,
        "decode_tok_s": (tokens - sequences) / decode if decode else None,
    }


def adapter_slot_bytes(model) -> int:
    """Bytes of the multi-adapter layers' slot stacks (A, B^T, scale of every slot)."""
    return sum(
        buf.numel() * buf.element_size()
        for module in model.modules()
        for name, buf in module.named_buffers(recurse=False)
        if name in ("lora_A", "lora_Bt", "scale") and hasattr(module, "base_layer")
    )


def _worker(conn, cfg: dict) -> None:
    """A lorafleet engine in cfg["setting"], answering ("run", prompts) with the figures of
    prompts[:-1] run together and prompts[-1] alone, until ("stop",)."""
    import resource

    try:
        import torch

        from lorafleet.adapters import read_adapter
        from lorafleet.bench.streaming import in_process, plan
        from lorafleet.layers import weight_bytes
        from lorafleet.models import load_base
        from lorafleet.serve.engine import Engine

        torch.set_num_threads(cfg["threads"])
        dtype, quantize = parse_setting(cfg["setting"])
        loaded = load_base(cfg["base"], dtype=dtype)
        n, p, new = cfg["requests"], cfg["prompt_tokens"], cfg["new_tokens"]
        engine = Engine(
            loaded,
            max_slots=len(cfg["adapters"]),
            max_rank=cfg["rank"],
            max_batch_size=n,
            max_batch_tokens=n * p,
            max_seq_len=p + new + 8,
            quantize=quantize,
        )
        for i, path in enumerate(cfg["adapters"]):
            engine.load_adapter(f"a{i}", read_adapter(path))
        warm = cfg["warmup"]
        in_process(engine, plan(n, [None], warm[:n], 4, 0.0))  # the real shapes, a few steps
        in_process(engine, plan(1, [None], warm[n:], 4, 0.0))
        conn.send(
            {
                "weights_bytes": weight_bytes(loaded.model),
                "kv_bytes": engine.stats()["kv_bytes"],
                "packed_bytes": engine.stats()["packed_weight_bytes"],
                "adapter_bytes": adapter_slot_bytes(loaded.model),
            }
        )
        while True:
            message = conn.recv()
            if message[0] != "run":
                break
            prompts = message[1]
            together = in_process(engine, plan(n, [None], prompts[:n], new, 0.0))
            alone = in_process(engine, plan(1, [None], prompts[n:], new, 0.0))
            conn.send(
                {
                    "rows": {
                        str(n): engine_figures(together, n, p),
                        "1": engine_figures(alone, 1, p),
                    },
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                }
            )
        engine.close()
    except Exception as exc:  # one line back to the table, not a dead pipe
        conn.send({"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]})


class EngineWorker:
    """lorafleet in one setting in a spawned process of its own, alive across the reps."""

    def __init__(self, cfg: dict):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, cfg), daemon=True)
        self.proc.start()
        child.close()
        self.memory = self._answer(READY_S)

    def _answer(self, limit_s: float) -> dict:
        if not self.conn.poll(limit_s):
            self.close()
            raise LorafleetError(f"the lorafleet engine process gave nothing in {limit_s:.0f} s")
        try:
            out = self.conn.recv()
        except EOFError:
            raise LorafleetError(
                f"the lorafleet engine process died (exit code {self.proc.exitcode})"
            ) from None
        if "error" in out:
            raise LorafleetError(f"lorafleet engine: {out['error']}")
        return out

    def run(self, prompts: list[list[int]]) -> dict:
        self.conn.send(("run", prompts))
        return self._answer(RUN_S)

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(("stop",))
            self.proc.join(timeout=30)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()


# -- the table -----------------------------------------------------------------------------------


def systems_of(pairs: list[peers.Pair]) -> list[str]:
    """The run order within one repetition: each pair's lorafleet setting, then its GGUF
    (a system two pairs share runs once)."""
    order = []
    for pair in pairs:
        order += [peers.label(pair.setting), gguf_system(pair.gguf)]
    return list(dict.fromkeys(order))


def gguf_system(gguf: str) -> str:
    return f"llama.cpp {peers.GGUF_TITLES.get(gguf, gguf)}"


def run(
    cfg: PeerTableConfig,
    default_setting: str,
    base: str = "default",
    peers_dir: str | Path | None = None,
    json_out: str | Path = "bench/results/peers.json",
    pairs: list[peers.Pair] | None = None,
) -> dict:
    """The in-process table (module docstring); printed, written to `json_out`, returned."""
    from lorafleet.models import load_base

    pairs = pairs or peers.matched_pairs(default_setting)
    found = peer_tools.require(peers_dir, tools=("batched_bench", "convert"))
    threads = cfg.threads or os.cpu_count() or 1
    n, p, new = cfg.requests, cfg.prompt_tokens, cfg.new_tokens
    ggufs = {pair.gguf: peers.peer_gguf(found, base, pair.gguf) for pair in pairs}
    dirs, _ = peers.bench_adapters(found, base, cfg.adapters, cfg.rank, None)
    prompts = peers.prompts_for(load_base(base).tokenizer, (cfg.reps + 1) * (n + 1), p)
    batches = [prompts[i * (n + 1) : (i + 1) * (n + 1)] for i in range(cfg.reps + 1)]
    command = {
        gguf: batched_bench_command(found.batched_bench, path, p, new, (1, n), threads)
        for gguf, path in ggufs.items()
    }
    workers: dict[str, EngineWorker] = {}
    runs: dict[str, list[dict]] = {}
    memory: dict[str, dict] = {}
    try:
        for pair in pairs:
            name = peers.label(pair.setting)
            if name not in workers:
                print(f"starting {name} ...", flush=True)
                workers[name] = EngineWorker(
                    {
                        "base": base,
                        "setting": pair.setting,
                        "threads": threads,
                        "requests": n,
                        "prompt_tokens": p,
                        "new_tokens": new,
                        "rank": cfg.rank,
                        "adapters": [str(d) for d in dirs],
                        "warmup": batches[-1],
                    }
                )
                memory[name] = dict(workers[name].memory)
        by_system = {peers.label(pr.setting): pr.setting for pr in pairs}
        by_system.update({gguf_system(pr.gguf): pr.gguf for pr in pairs})
        for rep, system in interleave(systems_of(pairs), cfg.reps):
            load = load1()
            if system in workers:
                out = workers[system].run(batches[rep])
            else:
                out = run_batched_bench(command[by_system[system]], RUN_S)
            seen = memory.setdefault(system, {})
            seen.update(out.get("memory", {}))
            seen["peak_rss_mb"] = max(out["peak_rss_mb"], seen.get("peak_rss_mb") or 0.0)
            for key, fig in out["rows"].items():
                runs.setdefault(f"{system}|{key}", []).append({**fig, "load1": load})
            figs = "  ".join(f"{k}: {f['gen_tok_s']:.1f} tok/s" for k, f in out["rows"].items())
            print(f"rep {rep + 1}/{cfg.reps} {system:<24} {figs}  (load {load:.2f})", flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    summary = {key: summarise_reps(rs, METRICS) for key, rs in runs.items()}
    bytes_per_token = {
        **{gguf_system(g): gguf_tensor_bytes(path) for g, path in ggufs.items()},
        **{name: m["weights_bytes"] for name, m in memory.items() if "weights_bytes" in m},
    }
    return report(
        pairs, summary, runs, memory, bytes_per_token, cfg, threads, base, ggufs, json_out
    )


def pair_rows(pairs: list[peers.Pair], summary: dict, parallel: int, bytes_per_token: dict):
    """One row per pair: each side's generated tok/s (median [min-max]) at `parallel` and
    alone, the ratios of the medians, the targets and verdicts, the bytes each reads a token."""
    rows = []
    for pair in pairs:
        ours, theirs = peers.label(pair.setting), gguf_system(pair.gguf)
        row = {
            "pair": pair.title,
            "lorafleet": ours,
            "llama.cpp": theirs,
            "lorafleet_mib_per_token": _mib(bytes_per_token.get(ours)),
            "llama_cpp_mib_per_token": _mib(bytes_per_token.get(theirs)),
        }
        for workload, key in (("parallel", str(parallel)), ("single", "1")):
            a = summary.get(f"{ours}|{key}", {}).get("gen_tok_s")
            b = summary.get(f"{theirs}|{key}", {}).get("gen_tok_s")
            value, target = ratio(a, b), pair.targets.get(workload)
            row[workload] = {
                "lorafleet": a,
                "llama_cpp": b,
                "ratio": value,
                "target": target,
                "verdict": verdict(value, target) if target else "no target",
            }
        rows.append(row)
    return rows


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def report(
    pairs, summary, runs, memory, bytes_per_token, cfg, threads, base, ggufs, json_out
) -> dict:
    """Print the three tables (throughput and targets; prefill / decode; memory) and write
    every figure, per repetition included, to `json_out`."""
    n = cfg.requests
    rows = pair_rows(pairs, summary, n, bytes_per_token)
    printed = []
    for row in rows:
        line = {"pair": row["pair"]}
        for workload, tag in (("parallel", str(n)), ("single", "1")):
            fig = row[workload]
            line[f"lorafleet {tag}"] = shown(fig["lorafleet"])
            line[f"llama.cpp {tag}"] = shown(fig["llama_cpp"])
            value = fig["ratio"]
            target = f" (>= {fig['target']}x: {fig['verdict']})" if fig["target"] else ""
            line[f"ratio {tag}"] = ("-" if value is None else f"{value:.2f}x") + target
        line["MiB/token lf / lc"] = "/".join(
            "-" if row[k] is None else f"{row[k]:.0f}"
            for k in ("lorafleet_mib_per_token", "llama_cpp_mib_per_token")
        )
        printed.append(line)
    print(f"\ngenerated tokens/s of wall time, prefill included: median [min-max] of {cfg.reps}")
    print_table(printed, list(printed[0]))
    split = []
    for key in sorted(summary, key=lambda k: (k.split("|")[0], -int(k.split("|")[1]))):
        system, parallel = key.split("|")
        fig = summary[key]
        split.append(
            {
                "system": system,
                "parallel": int(parallel),
                "prefill tok/s": shown(fig["prefill_tok_s"], 0),
                "decode tok/s": shown(fig["decode_tok_s"], 1),
                "load1 per rep": " ".join(f"{x:.2f}" for x in fig["load1"]),
            }
        )
    print("\nprefill (prompt tokens/s) and decode (generated tokens/s after the first)")
    print_table(split, list(split[0]))
    mem_rows = [
        {
            "system": system,
            "weights MiB": _mib(m.get("weights_bytes")) or m.get("weights_mib") or "-",
            # lorafleet's oneDNN-packed copies of its float weights (kernels/packed.py)
            "packed copies MiB": _mib(m.get("packed_bytes")) or "-",
            "KV MiB": _mib(m.get("kv_bytes")) or m.get("kv_mib") or "-",
            "adapters MiB": _mib(m.get("adapter_bytes")) or "-",
            "compute MiB": m.get("compute_mib") or "-",
            "peak RSS MiB": m.get("peak_rss_mb"),
        }
        for system, m in memory.items()
    ]
    print("\nmemory (lorafleet: as allocated; llama.cpp: its buffers as logged)")
    print_table(mem_rows, list(mem_rows[0]))
    figures = {
        "benchmark": "peers_inproc",
        "base": base,
        "ggufs": {g: str(path) for g, path in ggufs.items()},
        "requests": n,
        "adapters_loaded": cfg.adapters,
        "rank": cfg.rank,
        "prompt_tokens": cfg.prompt_tokens,
        "new_tokens": cfg.new_tokens,
        "reps": cfg.reps,
        "threads": threads,
        "pairs": rows,
        "summary": summary,
        "runs": runs,
        "memory": memory,
        "bytes_per_token": bytes_per_token,
    }
    print(f"wrote {write_json(json_out, figures)}")
    return figures
