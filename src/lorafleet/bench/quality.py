"""Benchmark: what bfloat16 and int8 / int4 base linears cost in quality against float32, as
the field measures it (llama.cpp's `llama-perplexity --kl-divergence`), and the default setting
that the pre-written rule (quality_stats.DEFAULT_RULE) picks from these figures.

Text: held-out natural text from the built-in tasks' validation rows (never the gsm8k train rows
the speed benchmarks' prompts come from), read from the data folder at run time, documents taken
in turn from each source (held_out_documents), cut into pieces of at most `piece_tokens` scored
tokens. Each piece is tokenised and split into chunks of `context` tokens; as llama-perplexity
does, only the second half of each chunk is scored (positions context/2 .. context-2 predict the
next token, 255 of 512), every chunk starting from an empty cache.

lorafleet rows: every setting is an engine on its own copy of the base; each chunk is one
prefill through the serving engine (all positions' logits, Engine.forward with prompt_logprobs),
compared with the float32 engine's logits of the same chunk, then dropped (memory stays at one
chunk's logits per setting). Per setting: mean and p99 of KL(P_float32 || P_setting) in nats,
same top-1, perplexity ratio, each with a 95 % bootstrap interval over chunks (quality_stats).
Note: a chunk's 512 rows take the quantised linears' prefill path (dequantise, one GEMM); decode
steps of <= 32 rows run the packed int8 / int4 kernels with bfloat16 activations, so for
float32+int8 / int4 these figures leave out that cast (the greedy rows below do include it).

llama.cpp rows (with the peers of `make bench-peers`): per piece, the F32 GGUF (made by its
convert_hf_to_gguf.py from the same safetensors, bench/peer_ggufs.py) writes the reference
log-probs, then the shipped Q4_1 file, Q8_0 and BF16 are scored against them; the pieces'
printed summaries are combined (llama_ppl.combine), each .kld file deleted after its piece.

Checkpoints (quality_store): each piece is written, per setting, as soon as it is scored
(per-token figures; llama.cpp's parsed summaries per piece), and a call skips what is there for
the same text spec, so a long run can be one call per piece (--pieces) and resumed; the figures
always combine every checkpointed piece. An earlier run's JSON from before checkpoints can stand
in for its pieces (--import-summary; quality_stats.combine_with_summary says what is exact).

Task accuracy: the choice tasks' validation rows (sst2, strategyqa; first `task_rows` each),
scored as `lorafleet eval` scores them (sum of log p(choice tokens | prompt), chat template),
through each engine; McNemar's exact test against float32 on the same rows, pooled over tasks.

Greedy agreement (information only, not in the rule): each setting decodes `new_tokens` greedily
from `prompts` prompts cut from gsm8k text; the share of tokens before the first difference
from float32's, averaged over prompts."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lorafleet.bench import print_table, write_json
from lorafleet.bench.quality_config import QualityConfig
from lorafleet.bench.settings import parse_setting
from lorafleet.errors import LorafleetError

SETTINGS = (
    ("bfloat16", "none"),
    ("float32", "int8"),
    ("float32", "int4"),
    ("bfloat16", "int8"),
    ("bfloat16", "int4"),
)
CHOICE_TASKS = ("sst2", "strategyqa")
TEXT_SOURCES = ("gsm8k", "strategyqa", "sst2", "clutrr")
LLAMA_ROWS = ("Q4_1", "Q8_0", "BF16")  # scored against llama.cpp's F32 GGUF
SEPARATOR = "\n\n"


def parse_limits(texts: list[str]) -> dict[str, int]:
    """['bfloat16=1', 'bfloat16+int8=2'] -> {"bfloat16+none": 1, "bfloat16+int8": 2}."""
    out = {}
    for text in texts:
        name, _, count = str(text).partition("=")
        if not count.strip().isdigit() or int(count) < 1:
            raise LorafleetError(f"--limit {text!r}: expected SETTING=PIECES, PIECES >= 1")
        out["+".join(parse_setting(name.strip()))] = int(count)
    return out


# -- the text -------------------------------------------------------------------------------------


def _document(source: str, row: dict) -> str:
    """One row of a source as plain text: gsm8k question + worked answer, strategyqa question +
    its facts, an sst2 sentence, a clutrr story (with its question)."""
    if source == "gsm8k":
        return f"{row['question']}\n{row['answer']}"
    if source == "strategyqa":
        return " ".join([row["question"], *row.get("facts", [])])
    if source == "sst2":
        return str(row["sentence"])
    return str(row["question"])


def held_out_documents() -> list[tuple[str, int, str]]:
    """(source, validation row index, text) of every validation row of TEXT_SOURCES, in turns
    (row 0 of each source, then row 1 of each, ...): gsm8k's validation split is the last 500
    rows of its train file, the speed benchmarks' prompts come from its first rows."""
    from lorafleet.data import BUILTIN_TASKS
    from lorafleet.data.readers import iter_rows
    from lorafleet.paths import data_dir

    root = data_dir()
    if root is None:
        raise LorafleetError(
            "bench quality needs the data files: set $LORAFLEET_DATA to a folder with "
            f"{', '.join(TEXT_SOURCES)}/ (see ../shared/data/README.md)"
        )
    columns = []
    for source in TEXT_SOURCES:
        task = BUILTIN_TASKS[source]
        path = root / task.files["validation"]
        if not path.is_file():
            raise LorafleetError(f"bench quality: {path} not found (set $LORAFLEET_DATA)")
        rows = [row for _, row in iter_rows(path)]
        rows = rows[-task.holdout :] if task.holdout else rows
        columns.append([(source, i, _document(source, r)) for i, r in enumerate(rows)])
    out = []
    for turn in range(max(len(c) for c in columns)):
        out += [c[turn] for c in columns if turn < len(c)]
    return out


@dataclass(frozen=True)
class Piece:
    """A piece of the text: `chunks` chunks of `context` token ids (`ids`, BOS rule applied),
    and the text they came from (what llama-perplexity is given)."""

    text: str
    ids: list[int]
    chunks: int
    rows: dict[str, int]  # source -> validation rows used


def build_pieces(
    tokenizer, context: int, min_tokens: int, piece_tokens: int, documents=None
) -> list[Piece]:
    """Pieces holding at least `min_tokens` scored tokens in all, at most `piece_tokens` each,
    of equal chunk counts, from consecutive documents; a document is never split across pieces.
    When the tokenizer adds a BOS, each chunk's first id is the BOS (llama-perplexity's rule)."""
    from lorafleet.bench.llama_ppl import scored_per_chunk
    from lorafleet.data import bos_to_add

    per_chunk = scored_per_chunk(context)
    if per_chunk < 1 or min_tokens < 1 or piece_tokens < per_chunk:
        raise LorafleetError(
            f"bench quality: context {context} scores {per_chunk} tokens per chunk; --tokens "
            f"and --piece-tokens must allow at least one chunk"
        )
    total = -(-min_tokens // per_chunk)
    n_pieces = -(-total // (piece_tokens // per_chunk))
    chunks = -(-total // n_pieces)
    docs = list(held_out_documents() if documents is None else documents)
    bos = bos_to_add(tokenizer)
    pieces, at = [], 0
    for _ in range(n_pieces):
        need, taken, rows = chunks * context, [], {}
        ids: list[int] = []
        while len(ids) < need:
            guess = 0
            while at < len(docs) and guess < (need - len(ids)) * 1.05 + 8:
                source, _, text = docs[at]
                taken.append(text)
                rows[source] = rows.get(source, 0) + 1
                guess += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
                at += 1
            if not guess:
                raise LorafleetError(
                    f"bench quality: the held-out text has too few tokens for {n_pieces} "
                    f"pieces of {chunks} chunks of {context}; ask for fewer --tokens"
                )
            ids = tokenizer(SEPARATOR.join(taken), add_special_tokens=False)["input_ids"]
            ids = [bos, *ids] if bos is not None else ids
        ids = ids[:need]
        if bos is not None:
            for c in range(chunks):
                ids[c * context] = bos
        pieces.append(Piece(SEPARATOR.join(taken), ids, chunks, rows))
    return pieces


# -- lorafleet's side --------------------------------------------------------------------------


def _engine(base: str, dtype: str, quantize: str, slots: int, seq_len: int, batch_tokens: int):
    from lorafleet.models import load_base
    from lorafleet.serve import Engine

    return Engine(
        load_base(base, dtype=dtype),
        max_slots=0,
        max_batch_size=slots,
        max_batch_tokens=batch_tokens,
        max_seq_len=seq_len,
        quantize=quantize,
        seed=0,
    )


def all_logits(engine, batch: list[list[int]]):
    """Every position's next-token logits of each id list, through one engine prefill: a list
    of [n_i, vocab] float32 tensors (row j predicts token j + 1; the last row the one after)."""
    from lorafleet.serve import SamplingParams, Sequence

    seqs = [
        Sequence(i, ids, None, SamplingParams(prompt_logprobs=1)) for i, ids in enumerate(batch)
    ]
    for s in seqs:
        s.kv_slot, s.lora_slot = engine.kv.allocate(), 0
    try:
        out = engine.forward(seqs, [])  # [B + sum(n_i - 1), vocab]
    finally:
        for s in seqs:
            engine.kv.free(s.kv_slot)
    rows, at = [], len(batch)
    for i, ids in enumerate(batch):
        n = len(ids)
        rows.append(torch_cat(out[at : at + n - 1], out[i : i + 1]))  # [n, vocab]
        at += n - 1
    return rows


def torch_cat(a, b):
    import torch

    return torch.cat([a, b], dim=0)


def kl_piece(engines: dict, piece: Piece, context: int, keys: list[str], progress) -> dict:
    """One piece's quality_stats.Tally for each of `keys` (engines other than the reference,
    "float32+none"), chunk by chunk; one chunk's logits alive per engine at a time."""
    import torch

    from lorafleet.bench.quality_stats import REFERENCE, Tally, token_figures

    first = context // 2
    tallies = {key: Tally() for key in keys}
    for c in range(piece.chunks):
        ids = piece.ids[c * context : (c + 1) * context]
        targets = torch.tensor(ids[first + 1 :])  # [context - 1 - first]
        ref = all_logits(engines[REFERENCE], [ids])[0][first : context - 1]
        for key, tally in tallies.items():
            got = all_logits(engines[key], [ids])[0][first : context - 1]
            tally.add(*token_figures(ref, got, targets))
        progress()
    return tallies


def kl_pass(engines: dict, pieces: list[Piece], context: int, limits: dict, progress) -> dict:
    """Per setting (every engine but "float32+none", the reference), a quality_stats.Tally over
    every chunk of its pieces (the first limits.get(setting, all) pieces), kept in memory."""
    from lorafleet.bench.quality_stats import REFERENCE, Tally

    tallies = {key: Tally() for key in engines if key != REFERENCE}
    for p, piece in enumerate(pieces):
        keys = [k for k in tallies if p < limits.get(k, len(pieces))]
        for key, got in kl_piece(engines, piece, context, keys, progress).items():
            for name in ("kl", "same", "nll", "nll_ref"):
                getattr(tallies[key], name).extend(getattr(got, name))
    return tallies


def choice_items(tokenizer, task: str, rows: int, max_len: int) -> list[dict]:
    """The first `rows` validation rows of a choice task, plain prompts (no chat template), as
    `lorafleet eval --no-chat` scores them: per row its label and, per choice, the ids (prompt
    + choice, cut on the left to max_len) and how many trailing ids are the choice's."""
    from lorafleet.data import bos_to_add, load_examples

    bos = bos_to_add(tokenizer)
    items = []
    examples = load_examples(task, tokenizer, split="validation", chat=False, limit=rows).examples
    for row, ex in enumerate(examples):
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        prompt = [bos, *prompt] if bos is not None and prompt[:1] != [bos] else prompt
        choices = []
        for choice in ex.choices:
            target = tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = (prompt + target)[-max_len:]
            choices.append((ids, min(len(target), len(ids) - 1)))
        items.append({"task": task, "row": row, "label": ex.label, "choices": choices})
    return items


def score_sequences(item: dict) -> list[tuple[list[int], list[tuple[int, list[int]]], int]]:
    """The prefills one item needs, each with what to read from it: (ids, [(choice, the choice's
    n ids)], skip): the choice's ids are predicted by rows len(ids) - n - skip onwards (skip 1:
    they end the ids; 0: they follow them). Choices of one token after the same prompt share
    one prefill of that prompt (half the work for two choices)."""
    choices = item["choices"]
    heads = {tuple(ids[:-1]) for ids, n in choices}
    if all(n == 1 for _, n in choices) and len(heads) == 1:
        reads = [(c, ids[-1:]) for c, (ids, _) in enumerate(choices)]
        return [(list(choices[0][0][:-1]), reads, 0)]
    return [(ids, [(c, ids[-n:])], 1) for c, (ids, n) in enumerate(choices)]


def choice_correct(engine, items: list[dict], batch_tokens: int) -> list[bool]:
    """Per item: does the choice with the highest sum of log p(choice tokens | prompt) equal
    its label (ties: the first)."""
    import torch

    flat = []  # (item, ids, [(choice, choice ids)], skip)
    for i, item in enumerate(items):
        flat += [(i, *seq) for seq in score_sequences(item)]
    scores = [[0.0] * len(it["choices"]) for it in items]
    start = 0
    while start < len(flat):
        end, used = start, 0
        while end < len(flat) and (end == start or used + len(flat[end][1]) <= batch_tokens):
            used += len(flat[end][1])
            end += 1
        group = flat[start : min(end, start + engine.kv.free_slots)]
        outs = all_logits(engine, [g[1] for g in group])
        for (i, ids, reads, skip), logits in zip(group, outs, strict=True):
            for c, want in reads:
                rows = logits[len(ids) - len(want) - skip :][: len(want)]
                logp = torch.log_softmax(rows, dim=-1)  # [n, V]
                scores[i][c] = float(logp.gather(1, torch.tensor(want).view(-1, 1)).sum())
        start += len(group)
    return [
        max(range(len(s)), key=s.__getitem__) == it["label"]
        for s, it in zip(scores, items, strict=True)
    ]


def greedy_agreement(ref: list[list[int]], got: list[list[int]], n: int) -> tuple[float, float]:
    """(mean share of the n tokens before the first difference, share of prompts identical)."""
    shares = []
    for a, b in zip(ref, got, strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), n)
        shares.append(same / n)
    return sum(shares) / len(shares), sum(s == 1.0 for s in shares) / len(shares)


def _greedy(engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from lorafleet.serve import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return [list(o.token_ids) for o in engine.generate([(p, None, params) for p in prompts])]


# -- llama.cpp's side ----------------------------------------------------------------------------


def llama_models(peers, base: str) -> dict[str, Path]:
    """The GGUFs llama.cpp scores: F32 (the reference), the shipped file (Q4_1 for default),
    Q8_0 and BF16 (made by convert_hf_to_gguf.py from lorafleet's safetensors)."""
    from lorafleet.bench.peer_ggufs import base_gguf_for
    from lorafleet.bench.peers import base_gguf

    return {
        "F32": base_gguf_for(peers, base, "f32"),
        "Q4_1": base_gguf(base),
        "Q8_0": base_gguf_for(peers, base, "q8_0"),
        "BF16": base_gguf_for(peers, base, "bf16"),
    }


def _run_tool(cmd: list[str], env: dict, what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    text = proc.stdout + "\n" + proc.stderr
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LorafleetError(f"llama-perplexity ({what}) exited with {proc.returncode}: {tail}")
    return text


def llama_pass(
    peers,
    base: str,
    pieces: dict[int, Piece],
    context: int,
    threads: int,
    n_vocab: int,
    progress,
    save,
) -> None:
    """llama.cpp's figures over the pieces {index: Piece}: per piece, `save(index, record)`
    as soon as it is done, record = {"parts": {name: parse_kld_output} for LLAMA_ROWS,
    "same_ids": token ids llama.cpp's tokeniser gave equal to lorafleet's, "compared_ids",
    "models": the GGUF files used}."""
    import os

    from lorafleet.bench import llama_ppl

    binary = peers.perplexity
    if binary is None or not binary.is_file():
        from lorafleet.bench.peer_tools import NOT_INSTALLED

        raise LorafleetError(NOT_INSTALLED.format(missing=f"llama-perplexity at {binary}"))
    models = llama_models(peers, base)
    env = {**os.environ, "LD_LIBRARY_PATH": str(peers.lib_dir)}
    work = peers.root / "quality"
    work.mkdir(parents=True, exist_ok=True)
    for i, piece in pieces.items():
        text, kld = work / f"piece{i}.txt", work / f"piece{i}.kld"
        need = llama_ppl.kld_file_bytes(context, piece.chunks, n_vocab)
        if shutil.disk_usage(work).free < need:
            raise LorafleetError(
                f"bench quality: {work} has under {need / 1e9:.1f} GB free for a piece's "
                "log-probs; ask for smaller --piece-tokens"
            )
        text.write_text(piece.text, encoding="utf-8")
        try:
            cmd = llama_ppl.base_command(
                binary, models["F32"], text, kld, context, piece.chunks, threads
            )
            _run_tool(cmd, env, "F32 reference")
            progress()
            ids = llama_ppl.read_kld_tokens(kld)[2]
            parts = {}
            for name in LLAMA_ROWS:
                cmd = llama_ppl.kld_command(binary, models[name], kld, context, threads)
                parts[name] = llama_ppl.parse_kld_output(_run_tool(cmd, env, name))
                progress()
        finally:
            kld.unlink(missing_ok=True)
            text.unlink(missing_ok=True)
        save(
            i,
            {
                "parts": parts,
                "same_ids": sum(a == b for a, b in zip(ids, piece.ids, strict=False)),
                "compared_ids": len(piece.ids),
                "models": {k: str(v) for k, v in models.items()},
            },
        )


# -- the run ---------------------------------------------------------------------------------------


def read_speeds(path: str | Path) -> dict[str, float]:
    """quality_stats.speed_score per setting from a `bench precision` JSON ({} if absent)."""
    from lorafleet.bench.quality_stats import speed_score

    path = Path(path)
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text()).get("rows", [])
    return {r["setting"]: speed_score(r) for r in rows if "single_stream_vs_fp32" in r}


def setting_keys(names) -> list[str]:
    """The settings a call scores as "dtype+quantize" keys, the reference left out; all of
    SETTINGS when `names` is empty."""
    from lorafleet.bench.quality_stats import REFERENCE

    chosen = [parse_setting(n) for n in names] or list(SETTINGS)
    keys = [f"{d}+{q}" for d, q in chosen]
    return [k for i, k in enumerate(keys) if k != REFERENCE and k not in keys[:i]]


def run(
    config: QualityConfig | None = None,
    *,
    peers: bool = True,
    only_peers: bool = False,
    rule_only: bool = False,
    speeds: str | Path = "bench/results/precision.json",
    json_out: str | Path = "bench/results/quality.json",
) -> dict:
    """Score the pieces config.pieces picks (see the module doc), each piece checkpointed as it
    is done and pieces already checkpointed skipped; then combine every checkpointed piece (and
    an imported earlier summary) into the figures, print them, apply the rule, write JSON.
    `peers`: also llama.cpp's pass; `only_peers`: only it. `rule_only`: nothing runs, the rule
    is applied again to `json_out`'s figures with the current `speeds`."""
    import torch

    from lorafleet.bench.quality_stats import DEFAULT_RULE
    from lorafleet.bench.quality_store import Store, import_summary
    from lorafleet.models import load_base

    config = config or QualityConfig()
    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    threads = torch.get_num_threads()
    text = {k: v for k, v in config.text_spec().items() if k != "base"}
    if rule_only:
        figures = _earlier(json_out, text)
        _apply_rule(figures, speeds)
        _print(figures)
        print(f"wrote {write_json(json_out, figures)}")
        return figures
    located = _locate_peers() if peers or only_peers else None
    keys = setting_keys(config.settings)
    limits = parse_limits(list(config.limits))
    tokenizer = load_base(config.base).tokenizer
    pieces = build_pieces(tokenizer, config.context, config.tokens, config.piece_tokens)
    chosen = config.piece_range(len(pieces))
    store = Store.open(config.checkpoint_folder(json_out), config.text_spec())
    described = [{"chunks": p.chunks, "rows": p.rows} for p in pieces]
    if config.import_summary is not None:
        path = Path(config.import_summary)
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            raise LorafleetError(f"--import-summary: cannot read {path}") from None
        import_summary(store, earlier, described, str(path))
    stages: dict = {}
    if not only_peers:
        _lorafleet_side(config, keys, limits, tokenizer, pieces, chosen, store, stages)
    if located is not None:
        done = store.llama()
        todo = {i: pieces[i] for i in chosen if i not in done}
        mark = time.perf_counter()
        if todo:
            vocab = load_base(config.base).model.config.vocab_size
            _with_bar(
                "llama-perplexity",
                len(todo) * (1 + len(LLAMA_ROWS)),
                lambda tick: llama_pass(
                    located,
                    config.base,
                    todo,
                    config.context,
                    threads,
                    vocab,
                    tick,
                    lambda i, record: _saved(store.save_llama(i, record)),
                ),
            )
        stages["llama_cpp"] = time.perf_counter() - mark
    figures = {
        "benchmark": "quality",
        "base": config.base,
        "text": text,
        "threads": threads,
        "pieces": described,
        "scored_this_call": [chosen.start, chosen.stop],
        "checkpoints": str(store.root),
        "rule": DEFAULT_RULE,
        **combined_figures(store, config.boot),
    }
    _apply_rule(figures, speeds)
    figures["seconds"] = time.perf_counter() - start
    figures["seconds_by_stage"] = stages
    _print(figures)
    print(f"wrote {write_json(json_out, figures)}")
    return figures


def _saved(path: Path) -> None:
    print(f"checkpointed {path.name} at {time.strftime('%H:%M:%S')}", flush=True)


def combined_figures(store, boot: int) -> dict:
    """Every checkpointed piece (and the imported summary) as the figures' "rows" (reference
    first, then SETTINGS' order), "task_rows" and "llama_cpp"."""
    import numpy as np

    from lorafleet.bench import quality_stats as qs
    from lorafleet.bench.llama_ppl import combine

    legacy = store.legacy().get("rows", {})
    tasks = store.tasks()
    weights = store.weights()
    order = [f"{d}+{q}" for d, q in SETTINGS]
    present = store.settings()
    rows = []
    for key in sorted(present, key=lambda k: (order.index(k) if k in order else 99, k)):
        tally, indexes = store.tally(key)
        new = qs.summarise(tally, boot=boot) if indexes else None
        old = legacy.get(key)
        if old and new:
            row = qs.combine_with_summary(old, new, np.concatenate(tally.kl))
        else:
            row = dict(new or old)
        summary_pieces = list(old["pieces"]) if old else []
        row["piece_indexes"] = sorted(set(summary_pieces) | set(indexes))
        row["pieces"] = len(row["piece_indexes"])
        row["from"] = {"summary_pieces": summary_pieces, "checkpointed_pieces": indexes}
        rows.append({"setting": key, "weight_mb": weights.get(key), **row})
    every = sorted({i for r in rows for i in r["piece_indexes"]})
    reference = {
        "setting": qs.REFERENCE,
        "weight_mb": weights.get(qs.REFERENCE),
        "tokens": max([r["tokens"] for r in rows], default=0),
        "kl_mean": 0.0,
        "kl_p99": 0.0,
        "same_top1": 1.0,
        "ppl_ratio": 1.0,
        "piece_indexes": every,
        "pieces": len(every),
    }
    rows = [reference, *rows]
    for row in rows:
        row.update(tasks.get("settings", {}).get(row["setting"], {}))
    records = store.llama()
    index = sorted(records)
    parts = {name: [records[i]["parts"][name] for i in index] for name in LLAMA_ROWS}
    parts = {k: v for k, v in parts.items() if v}
    compared = sum(records[i]["compared_ids"] for i in index)
    return {
        "rows": rows,
        "task_rows": tasks.get("task_counts", {}),
        "llama_cpp": {
            "rows": {name: combine(p) for name, p in parts.items()},
            "pieces": parts,
            "piece_index": index,
            "models": records[index[-1]]["models"] if index else {},
            "same_token_ids": (
                sum(records[i]["same_ids"] for i in index) / compared if compared else None
            ),
        },
    }


def _apply_rule(figures: dict, speeds: str | Path) -> None:
    """DEFAULT_RULE on the figures (in place: "speeds", "verdict"), with the speeds of the
    `bench precision` JSON at `speeds`; no verdict without llama.cpp Q8_0 figures."""
    speed = read_speeds(speeds)
    figures["speeds"] = {"file": str(speeds), "score": speed}
    verdict = rule_verdict(figures, speed)
    if verdict is None:
        figures.pop("verdict", None)
    else:
        figures["verdict"] = verdict


def rule_verdict(figures: dict, speed: dict[str, float], among=None) -> dict | None:
    """DEFAULT_RULE on `bench quality` figures (its JSON) with `speed` (read_speeds), the pick
    made among the settings `among` (None = all): {"default", "reasons"[,
    "q8_0_missing_pieces"]}, or None without llama.cpp Q8_0 figures. Each setting's KL faces
    llama.cpp Q8_0's over the very pieces that setting was scored on ("piece_indexes", or the
    first "pieces"); a setting with none of its pieces scored by llama.cpp cannot qualify."""
    from lorafleet.bench import quality_stats as qs
    from lorafleet.bench.llama_ppl import combine

    llama = figures.get("llama_cpp") or {}
    q8_parts = (llama.get("pieces") or {}).get("Q8_0")
    if not q8_parts:
        return None
    at = dict(zip(llama.get("piece_index") or range(len(q8_parts)), q8_parts, strict=True))
    q8, missing = {}, {}
    for r in figures["rows"]:
        want = r.get("piece_indexes") or list(range(r.get("pieces", len(at))))
        got = [at[i] for i in want if i in at]
        if got:
            q8[r["setting"]] = combine(got)["kl_mean"]
        if len(got) < len(want):
            missing[r["setting"]] = [i for i in want if i not in at]
    verdict = qs.pick_default(
        {r["setting"]: r["kl_mean"] for r in figures["rows"] if r["setting"] in q8},
        {r["setting"]: r.get("accuracy_lower", True) for r in figures["rows"]},
        q8,
        speed,
        among,
    )
    reasons = dict(verdict.reasons)
    for r in figures["rows"]:
        if r["setting"] not in q8 and r["setting"] != qs.REFERENCE:
            reasons[r["setting"]] = "no llama.cpp Q8_0 figures on its pieces: cannot qualify"
    result = {"default": verdict.default, "reasons": reasons}
    if missing:
        result["q8_0_missing_pieces"] = missing
    return result


def _locate_peers():
    """The peers with llama-perplexity, or one line naming `make bench-peers`."""
    from lorafleet.bench.peer_tools import require

    return require(tools=("perplexity",))


def _earlier(json_out: str | Path, text: dict) -> dict:
    """The figures of an earlier run on the same text (for --rule-only)."""
    path = Path(json_out)
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        raise LorafleetError(f"--rule-only: no earlier `bench quality` figures at {path}") from None
    if earlier.get("text") != text or not earlier.get("rows"):
        raise LorafleetError(
            f"--rule-only: {path} was measured on other text ({earlier.get('text')}); rerun "
            "with the same --context / --tokens / --piece-tokens"
        )
    if not (earlier.get("llama_cpp") or {}).get("pieces"):
        raise LorafleetError(f"--rule-only: {path} holds no llama.cpp figures")
    return earlier


def _with_bar(what: str, total: int, work):
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(what, total=total)
        return work(lambda: bar.advance(task))


def _lorafleet_side(
    config: QualityConfig,
    keys: list[str],
    limits: dict[str, int],
    tokenizer,
    pieces: list[Piece],
    chosen: range,
    store,
    stages: dict,
) -> None:
    """lorafleet's pass over the `chosen` pieces: per piece, the settings not checkpointed
    there yet (nor in an imported summary; within their --limit) scored and checkpointed;
    then, with config.tasks, task accuracy (McNemar against float32) and greedy agreement for
    the settings without them in the checkpoint (float32 rerun beside them, to pair rows)."""
    from lorafleet.bench import quality_stats as qs
    from lorafleet.layers import weight_bytes

    summarised = {k: set(r["pieces"]) for k, r in store.legacy().get("rows", {}).items()}
    todo = {}
    for i in chosen:  # a piece an imported summary covers counts as done
        mine = [k for k in keys if i < limits.get(k, len(pieces))]
        mine = [k for k in mine if i not in summarised.get(k, ())]
        todo[i] = [k for k in mine if not store.has_piece(i, k, pieces[i].rows)]
    todo = {i: ks for i, ks in todo.items() if ks}
    have = store.tasks().get("settings", {})
    task_keys = [k for k in keys if k not in have] if config.tasks else []
    if task_keys or (config.tasks and qs.REFERENCE not in have):
        task_keys = [qs.REFERENCE, *task_keys]
    if not todo and not task_keys:
        print(f"pieces {chosen.start}..{chosen.stop - 1}: all checkpointed already")
        return
    mark = time.perf_counter()
    context = config.context
    items = []
    if task_keys:
        rows = config.task_rows
        items = [it for t in CHOICE_TASKS for it in choice_items(tokenizer, t, rows, context)]
    lengths = [len(c[0]) for it in items for c in it["choices"]]
    longest = max([context, config.prompt_tokens + config.new_tokens, *lengths])
    batch_tokens = max(context, 1024)
    needed = {qs.REFERENCE, *task_keys, *(k for ks in todo.values() for k in ks)}
    engines = {
        k: _engine(config.base, *k.split("+"), 8, longest + 2, batch_tokens)
        for k in [qs.REFERENCE, *keys]
        if k in needed
    }
    store.save_weights({k: weight_bytes(e.base.model) / 2**20 for k, e in engines.items()})
    stages["load"] = time.perf_counter() - mark
    mark = time.perf_counter()
    for i, ks in todo.items():
        piece = pieces[i]
        tallies = _with_bar(
            f"KL, piece {i}",
            piece.chunks,
            lambda tick, piece=piece, ks=ks: kl_piece(engines, piece, context, ks, tick),
        )
        for key, tally in tallies.items():
            _saved(store.save_piece(i, key, tally, piece.rows))
    stages["kl"] = time.perf_counter() - mark
    if task_keys:
        mark = time.perf_counter()
        fields = task_fields(config, {k: engines[k] for k in task_keys}, items, limits, len(pieces))
        store.save_tasks(fields, {t: sum(it["task"] == t for it in items) for t in CHOICE_TASKS})
        stages["tasks_and_greedy"] = time.perf_counter() - mark


def task_fields(
    config: QualityConfig, engines: dict, items: list[dict], limits: dict, n_pieces: int
) -> dict[str, dict]:
    """Per engine (the reference among them): task accuracy on its share of `items` (a
    --limit of K pieces: K / n_pieces of the rows), McNemar's test against the reference on
    the same rows, and greedy agreement with the reference (information only)."""
    from lorafleet.bench import quality_stats as qs
    from lorafleet.bench.engine import gsm8k_prompts
    from lorafleet.models import load_base

    batch_tokens = max(config.context, 1024)
    right = {}
    for key, engine in engines.items():
        share = min(limits.get(key, n_pieces), n_pieces) / n_pieces
        per_task = max(1, math.ceil(config.task_rows * share))
        mine = [it for it in items if it["row"] < per_task]
        right[key] = (mine, choice_correct(engine, mine, batch_tokens))
    greedy_ids = []
    if config.prompts:
        tokenizer = load_base(config.base).tokenizer
        greedy_ids = gsm8k_prompts(tokenizer, config.prompts, config.prompt_tokens)
    greedy = {
        k: _greedy(e, greedy_ids, config.new_tokens) if greedy_ids else []
        for k, e in engines.items()
    }
    ref_items, ref_right = right[qs.REFERENCE]
    ref_by_item = {id(it): r for it, r in zip(ref_items, ref_right, strict=True)}
    out = {}
    for key in engines:
        mine, got = right[key]
        ref = [ref_by_item[id(it)] for it in mine]
        row: dict = {"task_rows": len(mine)}
        row["accuracy"] = sum(got) / max(1, len(got))
        row["accuracy_ref"] = sum(ref) / max(1, len(ref))
        for task_name in CHOICE_TASKS:
            picked = [g for g, it in zip(got, mine, strict=True) if it["task"] == task_name]
            row[f"accuracy_{task_name}"] = sum(picked) / max(1, len(picked))
        row["mcnemar"] = qs.mcnemar_exact(ref, got)
        row["accuracy_lower"] = qs.significantly_lower(ref, got)
        if greedy_ids:
            row["greedy_agreement"], row["prompts_identical"] = greedy_agreement(
                greedy[qs.REFERENCE], greedy[key], config.new_tokens
            )
        out[key] = row
    return out


def _print(figures: dict) -> None:
    table = []
    for r in figures["rows"]:
        table.append(
            {
                "setting": r["setting"],
                "tokens": r.get("tokens", 0),
                "weight_mb": r["weight_mb"],
                "kl_mean": r["kl_mean"],
                "kl_mean_ci": _ci(r.get("kl_mean_ci")),
                "kl_p99": r["kl_p99"],
                "same_top1": r["same_top1"],
                "ppl_ratio": r["ppl_ratio"],
                "accuracy": r.get("accuracy"),
                "acc_fp32": r.get("accuracy_ref"),
                "task_rows": r.get("task_rows"),
                "mcnemar_p": (r.get("mcnemar") or {}).get("p_value"),
                "greedy_agreement": r.get("greedy_agreement"),
            }
        )
    for name, r in figures["llama_cpp"]["rows"].items():
        table.append(
            {
                "setting": f"llama.cpp {name}",
                "tokens": r["tokens"],
                "kl_mean": r["kl_mean"],
                "kl_mean_ci": f"± {1.96 * r['kl_mean_se']:.2g}",
                "kl_p99": r["kl_p99"],
                "same_top1": r["same_top1"],
                "ppl_ratio": r["ppl_ratio"],
            }
        )
    print_table(table, list(table[0]))
    print(f"rule: {figures['rule']}")
    verdict = figures.get("verdict")
    if verdict:
        for name, why in verdict["reasons"].items():
            print(f"  {name}: {why}")
        print(f"default by the rule: {verdict['default']}")
    else:
        print("no llama.cpp Q8_0 row (--no-peers): the rule cannot be applied")


def _ci(ci) -> str:
    return "" if not ci else f"{ci[0]:.3g}..{ci[1]:.3g}"
