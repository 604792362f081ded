"""Synthetic task inputs: few-shot prompts from the seeds, sampled in batches through the engine."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from lorafleet.data import bos_to_add
from lorafleet.errors import LorafleetError
from lorafleet.models import Base
from lorafleet.serve import Engine, SamplingParams

HEADER = "Here are {kind}, one per example. Every example is different.\n\n"
SHOT = "Example {i}:\n{text}\n\n"
STOP = ("\n\n", "\nExample")
MAX_ROUNDS = 4  # rounds of sampling for the candidates that de-duplication removed


@dataclass
class GenerationStats:
    requested: int
    generated: int  # unique candidates kept
    sampled: int  # completions sampled (duplicates and empties included)
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def few_shot_prompt(kind: str, seeds: Sequence[str], rng: random.Random) -> str:
    """A plain-text prompt (base and instruct models both continue it): the seeds in a random
    order, numbered, then the next number for the model to fill."""
    order = list(seeds)
    rng.shuffle(order)
    shots = "".join(SHOT.format(i=i + 1, text=t.strip()) for i, t in enumerate(order))
    return HEADER.format(kind=kind) + shots + f"Example {len(order) + 1}:\n"


def normalise(text: str) -> str:
    """The key two inputs are duplicates under: lower case, whitespace collapsed."""
    return re.sub(r"\s+", " ", text).strip().lower()


def clean(text: str) -> str:
    return text.replace("\ufffd", "").strip()


def seq_len(base: Base, wanted: int) -> int:
    """The engine's KV length for sequences up to `wanted` tokens (within the model's limit):
    KV memory is preallocated for the whole batch at this length."""
    limit = int(getattr(base.model.config, "max_position_embeddings", 2048))
    return max(2, min(wanted, limit))


def engine_generate(
    engine: Engine,
    prompts: list[str],
    params: list[SamplingParams],
    adapter: str | None = None,
    on_done=None,
) -> list[str]:
    """Every prompt to completion in the engine's continuous batches; texts in input order.
    `on_done(n_finished, engine)` is called after every step that finished some."""
    bos = bos_to_add(engine.tokenizer)
    ids = []
    for prompt, p in zip(prompts, params, strict=True):
        tokens = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tokens = [bos, *tokens] if bos is not None and tokens[:1] != [bos] else tokens
        ids.append(engine.add_request(tokens, adapter, p))
    results = {}
    while len(results) < len(ids):
        done = engine.step()
        results.update((out.request_id, out) for out in done)
        if done and on_done is not None:
            on_done(len(done), engine)
    failed = [results[i].error for i in ids if results[i].finish_reason == "error"]
    if failed:
        raise LorafleetError(f"generation failed: {failed[0]}")
    return [results[i].text for i in ids]


class CandidateStream:
    """Distinct synthetic inputs from `base` prompted with the seeds, sampled on demand in the
    engine's batches: `next(n)` samples `n` completions and returns those that are new (not
    empty, not a seed, not returned before), so it may return fewer than `n`. Close it (or use
    it as a context manager) to free the engine."""

    def __init__(
        self,
        base: Base,
        kind: str,
        seeds: Sequence[str],
        *,
        seed: int = 0,
        temperature: float = 0.9,
        top_p: float = 0.95,
        max_tokens: int = 96,
        batch_size: int = 16,
        on_tokens=None,
    ):
        self.kind, self.seeds = kind, list(seeds)
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.rng = random.Random(seed)
        self.seen = {normalise(s) for s in seeds}
        self.sampled = 0
        self.on_tokens = on_tokens  # called as on_tokens(tokens so far, seconds so far)
        longest = len(base.tokenizer(few_shot_prompt(kind, seeds, random.Random(0)))["input_ids"])
        self.engine = Engine(
            base,
            max_slots=0,
            max_batch_size=batch_size,
            seed=seed,
            max_seq_len=seq_len(base, longest + 32 + max_tokens),
            max_batch_tokens=max(2048, 2 * longest),
        )
        self.start = time.perf_counter()

    @property
    def new_tokens(self) -> int:
        return self.engine.generated_tokens

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def next(self, n: int) -> list[str]:
        prompts = [few_shot_prompt(self.kind, self.seeds, self.rng) for _ in range(n)]
        params = [
            SamplingParams(
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                stop=STOP,
                seed=self.rng.randrange(2**31),
            )
            for _ in prompts
        ]
        texts = engine_generate(self.engine, prompts, params, on_done=self._show)
        self.sampled += len(texts)
        fresh = []
        for text in map(clean, texts):
            key = normalise(text)
            if key and key not in self.seen:
                self.seen.add(key)
                fresh.append(text)
        return fresh

    def _show(self, _finished: int, engine: Engine) -> None:
        if self.on_tokens is not None:
            self.on_tokens(engine.generated_tokens, self.seconds)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> CandidateStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def generate_inputs(
    base: Base,
    kind: str,
    seeds: Sequence[str],
    n: int,
    *,
    seed: int = 0,
    temperature: float = 0.9,
    top_p: float = 0.95,
    max_tokens: int = 96,
    batch_size: int = 16,
    desc: str = "generating",
) -> tuple[list[str], GenerationStats]:
    """`n` distinct inputs (fewer only if MAX_ROUNDS of sampling could not find them) that
    differ from the seeds, sampled from `base` prompted with the seeds; progress bar + tok/s."""
    from tqdm.auto import tqdm

    kept: list[str] = []
    bar = tqdm(total=n, desc=desc, unit="input")

    def show(tokens: int, seconds: float) -> None:
        bar.set_postfix(tok_s=f"{tokens / max(seconds, 1e-9):.0f}")

    stream = CandidateStream(
        base,
        kind,
        seeds,
        seed=seed,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        batch_size=batch_size,
        on_tokens=show,
    )
    try:
        for _ in range(MAX_ROUNDS):
            missing = n - len(kept)
            if missing <= 0:
                break
            fresh = stream.next(missing)[:missing]
            kept += fresh
            bar.update(len(fresh))
    finally:
        bar.close()
        stream.close()
    stats = GenerationStats(n, len(kept), stream.sampled, stream.new_tokens, stream.seconds)
    return kept, stats
