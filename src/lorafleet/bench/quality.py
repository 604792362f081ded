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


def parse_setting(text: str) -> tuple[str, str]:
    """'bfloat16', 'int8', 'bfloat16+int4' -> (dtype, quantize); one-line error otherwise."""
    from lorafleet.layers import check_quantize
    from lorafleet.models import parse_dtype

    dtype, quantize = "float32", "none"
    for part in str(text).lower().split("+"):
        if part in ("int8", "int4", "none"):
            quantize = check_quantize(part)
        else:
            dtype = str(parse_dtype(part)).removeprefix("torch.")
    return dtype, quantize


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


def kl_pass(engines: dict, pieces: list[Piece], context: int, limits: dict, progress) -> dict:
    """Per setting (every engine but "float32+none", the reference), a quality_stats.Tally over
    every chunk of its pieces (the first limits.get(setting, all) pieces); one chunk's logits
    alive per engine at a time."""
    import torch

    from lorafleet.bench.quality_stats import REFERENCE, Tally, token_figures

    first = context // 2
    tallies = {key: Tally() for key in engines if key != REFERENCE}
    for p, piece in enumerate(pieces):
        for c in range(piece.chunks):
            ids = piece.ids[c * context : (c + 1) * context]
            targets = torch.tensor(ids[first + 1 :])  # [context - 1 - first]
            ref = all_logits(engines[REFERENCE], [ids])[0][first : context - 1]
            for key, tally in tallies.items():
                if p < limits.get(key, len(pieces)):
                    got = all_logits(engines[key], [ids])[0][first : context - 1]
                    tally.add(*token_figures(ref, got, targets))
            progress()
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
    peers, base: str, pieces: list[Piece], context: int, threads: int, n_vocab: int, progress
):
    """llama.cpp's figures over the same pieces: {name: [one parse_kld_output per piece]} for
    LLAMA_ROWS, the share of token ids llama.cpp's tokeniser gave that equal lorafleet's, and
    the GGUF files used."""
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
    parts: dict[str, list[dict]] = {name: [] for name in LLAMA_ROWS}
    same = total = 0
    for i, piece in enumerate(pieces):
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
            same += sum(a == b for a, b in zip(ids, piece.ids, strict=False))
            total += len(piece.ids)
            for name in LLAMA_ROWS:
                cmd = llama_ppl.kld_command(binary, models[name], kld, context, threads)
                parts[name].append(llama_ppl.parse_kld_output(_run_tool(cmd, env, name)))
                progress()
        finally:
            kld.unlink(missing_ok=True)
            text.unlink(missing_ok=True)
    return parts, (same / total if total else 0.0), {k: str(v) for k, v in models.items()}


# -- the run ---------------------------------------------------------------------------------------


def read_speeds(path: str | Path) -> dict[str, float]:
    """quality_stats.speed_score per setting from a `bench precision` JSON ({} if absent)."""
    from lorafleet.bench.quality_stats import speed_score

    path = Path(path)
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text()).get("rows", [])
    return {r["setting"]: speed_score(r) for r in rows if "single_stream_vs_fp32" in r}


def run(
    base: str = "default",
    settings=SETTINGS,
    context: int = 512,
    tokens: int = 50_000,
    piece_tokens: int = 20_000,
    task_rows: int = 400,
    prompts: int = 32,
    prompt_tokens: int = 64,
    new_tokens: int = 64,
    peers: bool = True,
    only_peers: bool = False,
    rule_only: bool = False,
    limits: dict[str, int] | None = None,
    threads: int | None = None,
    boot: int = 1000,
    speeds: str | Path = "bench/results/precision.json",
    json_out: str | Path = "bench/results/quality.json",
) -> dict:
    """Every setting against float32 (see the module doc); prints tables, applies the rule,
    writes JSON. `limits`: setting -> pieces it is scored on (the first K; default all), with
    the same share of task rows. `only_peers`: lorafleet's rows come from `json_out` (an earlier
    --no-peers run on the same text); only llama.cpp's pass runs, then the rule. `rule_only`:
    nothing runs; the rule is applied again to `json_out`'s figures with the current `speeds`."""
    import torch

    from lorafleet.bench import quality_stats as qs
    from lorafleet.models import load_base

    start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    limits = {"+".join(parse_setting(k)): int(v) for k, v in (limits or {}).items()}
    located = _locate_peers() if (peers or only_peers) and not rule_only else None
    text = {"context": context, "tokens": tokens, "piece_tokens": piece_tokens}
    earlier = _earlier(json_out, text) if only_peers or rule_only else None
    tokenizer = load_base(base).tokenizer
    pieces = build_pieces(tokenizer, context, tokens, piece_tokens)
    figures: dict = {
        "benchmark": "quality",
        "base": base,
        "text": text,
        "threads": threads,
        "pieces": [{"chunks": p.chunks, "rows": p.rows} for p in pieces],
        "rule": qs.DEFAULT_RULE,
    }
    stages = {}
    if earlier is None:
        rows, task_counts = _lorafleet_side(
            base,
            settings,
            tokenizer,
            pieces,
            context,
            task_rows,
            prompts,
            prompt_tokens,
            new_tokens,
            limits,
            boot,
            stages,
        )
    else:
        rows, task_counts = earlier["rows"], earlier["task_rows"]
        stages = dict(earlier.get("seconds_by_stage") or {})
    figures["rows"], figures["task_rows"] = rows, task_counts
    parts, same_tokens, models = {}, None, {}
    if rule_only:
        llama = earlier.get("llama_cpp") or {}
        parts, same_tokens, models = (llama.get(k) for k in ("pieces", "same_token_ids", "models"))
        if not parts:
            raise LorafleetError(f"--rule-only: {json_out} holds no llama.cpp figures")
    elif located is not None:
        mark = time.perf_counter()
        parts, same_tokens, models = _with_bar(
            "llama-perplexity",
            len(pieces) * (1 + len(LLAMA_ROWS)),
            lambda tick: llama_pass(
                located,
                base,
                pieces,
                context,
                threads,
                load_base(base).model.config.vocab_size,
                tick,
            ),
        )
        stages["llama_cpp"] = time.perf_counter() - mark
    from lorafleet.bench.llama_ppl import combine

    figures["llama_cpp"] = {
        "rows": {name: combine(p) for name, p in parts.items()},
        "pieces": parts,
        "models": models,
        "same_token_ids": same_tokens,
    }
    speed = read_speeds(speeds)
    figures["speeds"] = {"file": str(speeds), "score": speed}
    if "Q8_0" in parts:
        q8 = {  # Q8_0 over the very pieces each setting was scored on
            r["setting"]: combine(parts["Q8_0"][: r.get("pieces", len(pieces))])["kl_mean"]
            for r in rows
        }
        verdict = qs.pick_default(
            {r["setting"]: r["kl_mean"] for r in rows},
            {r["setting"]: r["accuracy_lower"] for r in rows},
            q8,
            speed,
        )
        figures["verdict"] = {"default": verdict.default, "reasons": verdict.reasons}
    figures["seconds"] = time.perf_counter() - start
    figures["seconds_by_stage"] = stages
    _print(figures)
    print(f"wrote {write_json(json_out, figures)}")
    return figures


def _locate_peers():
    """The peers with llama-perplexity, or one line naming `make bench-peers`."""
    from lorafleet.bench.peer_tools import require

    return require(tools=("perplexity",))


def _earlier(json_out: str | Path, text: dict) -> dict:
    """lorafleet's rows from an earlier run on the same text (for --only-peers)."""
    path = Path(json_out)
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        raise LorafleetError(
            f"--only-peers / --rule-only: no earlier `bench quality` figures at {path}"
        ) from None
    if earlier.get("text") != text or not earlier.get("rows"):
        raise LorafleetError(
            f"--only-peers / --rule-only: {path} was measured on other text "
            f"({earlier.get('text')}); rerun "
            "with the same --context / --tokens / --piece-tokens"
        )
    return earlier


def _with_bar(what: str, total: int, work):
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(what, total=total)
        return work(lambda: bar.advance(task))


def _lorafleet_side(
    base,
    settings,
    tokenizer,
    pieces,
    context,
    task_rows,
    prompts,
    prompt_tokens,
    new_tokens,
    limits,
    boot,
    stages,
) -> tuple[list[dict], dict]:
    """lorafleet's rows: KL figures, task accuracy with McNemar's test, greedy agreement."""
    from lorafleet.bench import quality_stats as qs
    from lorafleet.bench.engine import gsm8k_prompts
    from lorafleet.layers import weight_bytes

    mark = time.perf_counter()
    items = [it for t in CHOICE_TASKS for it in choice_items(tokenizer, t, task_rows, context)]
    greedy_ids = gsm8k_prompts(tokenizer, prompts, prompt_tokens) if prompts else []
    lengths = [len(c[0]) for it in items for c in it["choices"]]
    longest = max([context, prompt_tokens + new_tokens, *lengths])
    batch_tokens = max(context, 1024)
    keys = [qs.REFERENCE] + [f"{d}+{q}" for d, q in settings if f"{d}+{q}" != qs.REFERENCE]
    engines = {k: _engine(base, *k.split("+"), 8, longest + 2, batch_tokens) for k in keys}
    stages["load"] = time.perf_counter() - mark
    mark = time.perf_counter()
    chunks = sum(p.chunks for p in pieces)
    tallies = _with_bar(
        "KL over chunks", chunks, lambda tick: kl_pass(engines, pieces, context, limits, tick)
    )
    stages["kl"] = time.perf_counter() - mark
    mark = time.perf_counter()
    right = {}
    for key, engine in engines.items():
        share = min(limits.get(key, len(pieces)), len(pieces)) / len(pieces)
        per_task = max(1, math.ceil(task_rows * share))
        mine = [it for it in items if it["row"] < per_task]
        right[key] = (mine, choice_correct(engine, mine, batch_tokens))
    stages["tasks"] = time.perf_counter() - mark
    mark = time.perf_counter()
    greedy = {
        k: _greedy(e, greedy_ids, new_tokens) if greedy_ids else [] for k, e in engines.items()
    }
    stages["greedy"] = time.perf_counter() - mark
    rows = []
    ref_items, ref_right = right[qs.REFERENCE]
    ref_by_item = {id(it): r for it, r in zip(ref_items, ref_right, strict=True)}
    for key, engine in engines.items():
        row: dict = {"setting": key, "weight_mb": weight_bytes(engine.base.model) / 2**20}
        row["pieces"] = min(limits.get(key, len(pieces)), len(pieces))
        if key in tallies:
            row.update(qs.summarise(tallies[key], boot=boot))
        else:
            scored = sum(p.chunks for p in pieces) * (context - 1 - context // 2)
            row.update({"tokens": scored, "kl_mean": 0.0, "kl_p99": 0.0})
            row.update({"same_top1": 1.0, "ppl_ratio": 1.0})
        mine, got = right[key]
        ref = [ref_by_item[id(it)] for it in mine]
        row["task_rows"] = len(mine)
        row["accuracy"] = sum(got) / max(1, len(got))
        row["accuracy_ref"] = sum(ref) / max(1, len(ref))
        for task_name in CHOICE_TASKS:
            picked = [g for g, it in zip(got, mine, strict=True) if it["task"] == task_name]
            row[f"accuracy_{task_name}"] = sum(picked) / max(1, len(picked))
        row["mcnemar"] = qs.mcnemar_exact(ref, got)
        row["accuracy_lower"] = qs.significantly_lower(ref, got)
        if greedy_ids:
            row["greedy_agreement"], row["prompts_identical"] = greedy_agreement(
                greedy[qs.REFERENCE], greedy[key], new_tokens
            )
        rows.append(row)
    return rows, {t: sum(it["task"] == t for it in items) for t in CHOICE_TASKS}


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
                "accuracy": r["accuracy"],
                "acc_fp32": r.get("accuracy_ref"),
                "task_rows": r.get("task_rows"),
                "mcnemar_p": r["mcnemar"]["p_value"],
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
