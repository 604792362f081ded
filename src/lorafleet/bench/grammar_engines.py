"""Benchmark: grammar engines (xgrammar, llguidance, outlines-core) on the `default` model's
tokenizer: one-time tokenizer setup, compile time per JSON schema, and the per-step cost of the
next-token mask while a valid document is decoded.

The documents are fixed instances of the schemas, tokenized the way the model would write them
(compact JSON); at every token the engine fills a bitmask (timed), the token is checked to be
allowed, and the engine accepts it. The figures are medians over the steps of `rounds` passes,
engines interleaved per round so that other load on the machine hits them alike. Engines that
are not installed are reported as missing, never fail the run."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lorafleet.bench import print_table, write_json

# (name, schema, an instance the model would write). Bounded where a random model needs it.
SCHEMAS: list[tuple[str, dict, object]] = [
    (
        "nested",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string"},
                        "city": {"type": "string"},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                    },
                    "required": ["street", "city", "zip"],
                },
                "active": {"type": "boolean"},
            },
            "required": ["name", "address", "active"],
        },
        {
            "name": "Ada Lovelace",
            "address": {"street": "12 Analytical Row", "city": "London", "zip": "10001"},
            "active": True,
        },
    ),
    (
        "enum",
        {
            "type": "object",
            "properties": {
                "sentiment": {"enum": ["positive", "negative", "neutral"]},
                "label": {"type": "string", "enum": ["spam", "ham"]},
            },
            "required": ["sentiment", "label"],
        },
        {"sentiment": "negative", "label": "ham"},
    ),
    (
        "array",
        {
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                        "required": ["sku", "qty"],
                    },
                },
            },
            "required": ["tags", "items"],
        },
        {
            "tags": ["red", "large", "cotton", "sale"],
            "items": [{"sku": "A-100", "qty": 2}, {"sku": "B-7", "qty": 11}],
        },
    ),
    (
        "numbers",
        {
            "type": "object",
            "properties": {
                "score": {"type": "number", "minimum": 0, "maximum": 1},
                "count": {"type": "integer", "minimum": 1, "maximum": 1000},
                "values": {"type": "array", "items": {"type": "number"}},
            },
            "required": ["score", "count", "values"],
        },
        {"score": 0.875, "count": 42, "values": [3.14159, -2.5, 1e-3, 12345]},
    ),
    ("json_object", {"type": "object"}, {"answer": "yes", "n": [1, 2, {"k": None}]}),
]


@dataclass
class GrammarEngine:
    """One engine behind five calls: setup(tokenizer, vocab) -> shared state; compile(state,
    schema) -> compiled; matcher(state, compiled) -> m; fill(m, bitmask [1, V/32] int32);
    accept(m, token) -> bool; accepting(m) -> the document may end here."""

    name: str
    setup: Callable
    compile: Callable
    matcher: Callable
    fill: Callable
    accept: Callable
    accepting: Callable


def _xgrammar() -> GrammarEngine:
    import xgrammar as xgr

    def setup(tokenizer, vocab):
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile_(compiler, schema):
        return compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )

    return GrammarEngine(
        "xgrammar",
        setup,
        compile_,
        lambda _state, compiled: xgr.GrammarMatcher(compiled),
        lambda m, mask: m.fill_next_token_bitmask(mask, 0),
        lambda m, token: m.accept_token(token),
        lambda m: m.is_completed(),
    )


def _llguidance() -> GrammarEngine:
    import llguidance
    import llguidance.hf

    def setup(tokenizer, vocab):
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)

    def compile_(tok, schema):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}
        )
        # llguidance compiles lazily: the matcher built here (and thrown away) does the work.
        llguidance.LLMatcher(tok, grammar)
        return grammar

    def fill(m, mask):
        row = mask[0]
        m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    return GrammarEngine(
        "llguidance",
        setup,
        compile_,
        lambda tok, grammar: llguidance.LLMatcher(tok, grammar, log_level=0),
        fill,
        lambda m, token: m.consume_token(token),
        lambda m: m.is_accepting(),
    )


def _outlines_core() -> GrammarEngine:
    import outlines_core
    from outlines_core.kernels.torch import fill_next_token_bitmask

    def setup(tokenizer, vocab):
        return outlines_vocabulary(tokenizer)

    def compile_(vocabulary, schema):
        regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(schema))
        return outlines_core.Index(regex, vocabulary)

    def accept(guide, token):
        try:
            guide.advance(token)
        except Exception:
            return False
        return True

    return GrammarEngine(
        "outlines-core",
        setup,
        compile_,
        lambda _vocab, index: outlines_core.Guide(index),
        fill_next_token_bitmask,
        accept,
        lambda guide: guide.is_finished() or guide.accepts_tokens([_EOS[0]]),
    )


_EOS = [0]


def outlines_vocabulary(tokenizer):
    """outlines-core's Vocabulary from a byte-level BPE tokenizer, offline: every non-special
    token as its bytes (the byte-level alphabet mapped back), EOS apart."""
    import outlines_core

    to_byte = {char: byte for byte, char in byte_level_alphabet().items()}
    special = set(tokenizer.all_special_ids)
    tokens: dict[bytes, list[int]] = {}
    for piece, token_id in tokenizer.get_vocab().items():
        if token_id in special:
            continue
        raw = bytes(to_byte[c] for c in piece) if all(c in to_byte for c in piece) else None
        if raw:
            tokens.setdefault(raw, []).append(token_id)
    _EOS[0] = tokenizer.eos_token_id
    return outlines_core.Vocabulary(tokenizer.eos_token_id, tokens)


def byte_level_alphabet() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte: printable Latin-1 bytes stand for
    themselves, the others (controls, space, ...) take the characters from U+0100 on, in order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {
        **{b: chr(b) for b in printable},
        **{b: chr(256 + i) for i, b in enumerate(others)},
    }


ENGINES: dict[str, Callable[[], GrammarEngine]] = {
    "xgrammar": _xgrammar,
    "llguidance": _llguidance,
    "outlines-core": _outlines_core,
}


def _allowed(mask, token: int) -> bool:
    word = int(mask[0, token // 32]) & 0xFFFFFFFF
    return bool((word >> (token % 32)) & 1)


def _walk(engine: GrammarEngine, state, compiled, ids: list[int], mask) -> list[float]:
    """Decode `ids` through a fresh matcher; the seconds of each step's mask fill (the last
    one: the mask after the document, where EOS must be allowed)."""
    m = engine.matcher(state, compiled)
    times = []
    for token in ids:
        start = time.perf_counter()
        engine.fill(m, mask)
        times.append(time.perf_counter() - start)
        if not _allowed(mask, token):
            raise RuntimeError(f"{engine.name} refused token {token} of a valid document")
        if not engine.accept(m, token):
            raise RuntimeError(f"{engine.name} did not accept token {token}")
    start = time.perf_counter()
    engine.fill(m, mask)
    times.append(time.perf_counter() - start)
    if not engine.accepting(m):
        raise RuntimeError(f"{engine.name} does not accept the complete document")
    return times


def run(engines: list[str], rounds: int, json_out: Path | None, tokenizer=None) -> dict:
    """Time each installed engine; print a table (one row per engine and schema) and write
    JSON. `rounds` passes over every document, engines interleaved per pass; `tokenizer`
    defaults to the `default` model's."""
    import torch

    from lorafleet.models.tiny import default_tokenizer

    torch.set_num_threads(1)
    tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
    vocab = len(tokenizer)
    docs = {
        name: tokenizer(json.dumps(doc, separators=(",", ":")), add_special_tokens=False)[
            "input_ids"
        ]
        for name, _, doc in SCHEMAS
    }
    loaded, missing, figures = {}, {}, {}
    for name in engines:
        try:
            loaded[name] = ENGINES[name]()
        except ImportError as exc:
            missing[name] = str(exc)
    states, compiled = {}, {}
    for name, engine in loaded.items():
        start = time.perf_counter()
        states[name] = engine.setup(tokenizer, vocab)
        figures[name] = {"setup_s": time.perf_counter() - start, "schemas": {}}
        for sname, schema, _ in SCHEMAS:
            start = time.perf_counter()
            compiled[name, sname] = engine.compile(states[name], schema)
            figures[name]["schemas"][sname] = {"compile_ms": 1e3 * (time.perf_counter() - start)}
    steps: dict[tuple[str, str], list[float]] = {key: [] for key in compiled}
    mask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    for _ in range(rounds):
        for sname, _, _ in SCHEMAS:
            for name, engine in loaded.items():
                key = (name, sname)
                steps[key] += _walk(engine, states[name], compiled[key], docs[sname], mask)
    rows = []
    for (name, sname), times in steps.items():
        entry = figures[name]["schemas"][sname]
        entry["steps"] = len(times)
        entry["mask_us_median"] = 1e6 * statistics.median(times)
        entry["mask_us_p90"] = 1e6 * sorted(times)[int(0.9 * (len(times) - 1))]
        rows.append(
            {
                "engine": name,
                "schema": sname,
                "setup_s": figures[name]["setup_s"],
                "compile_ms": entry["compile_ms"],
                "mask_us_median": entry["mask_us_median"],
                "mask_us_p90": entry["mask_us_p90"],
            }
        )
    for name in loaded:
        all_steps = [t for (n, _), ts in steps.items() if n == name for t in ts]
        figures[name]["mask_us_median_all"] = 1e6 * statistics.median(all_steps)
    print_table(
        rows, ["engine", "schema", "setup_s", "compile_ms", "mask_us_median", "mask_us_p90"]
    )
    for name, why in missing.items():
        print(f"{name}: not installed ({why})")
    result = {"vocab": vocab, "rounds": rounds, "engines": figures, "missing": missing}
    if json_out is not None:
        write_json(json_out, result)
        print(f"wrote {json_out}")
    return result
