"""Tokenise examples with the loss masked to the target, pack them, and pad them into batches."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorafleet.data.examples import DataError, Example, ExampleSet

IGNORE_INDEX = -100  # the label value torch's cross-entropy (and transformers) ignores
OVERFLOW_MODES = ("truncate", "drop")


@dataclass
class Encoded:
    """One token sequence; `labels` is -100 on prompt tokens, the token id on target + EOS."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def _check(max_length: int, on_overflow: str) -> None:
    if on_overflow not in OVERFLOW_MODES:
        modes = ", ".join(OVERFLOW_MODES)
        raise DataError(f"on_overflow must be one of {modes}, got {on_overflow!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be a whole number >= 2, got {max_length!r}")


def bos_to_add(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer adds one by default (Llama-style), else None.

    Prompt and target are tokenised without special tokens so that the loss boundary is exact;
    this puts back the BOS the model was trained to see first."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos if with_special[:1] == [bos] and without[:1] != [bos] else None


def _build(
    prompt: list[int],
    target: list[int],
    *,
    bos: int | None,
    eos: int | None,
    max_length: int,
    on_overflow: str,
) -> tuple[Encoded | None, bool]:
    """(encoded or None when dropped, whether it was cut)."""
    if bos is not None and prompt[:1] != [bos]:
        prompt = [bos, *prompt]
    target = [*target, eos] if eos is not None else list(target)
    if len(prompt) + len(target) <= max_length:
        return Encoded(prompt + target, [IGNORE_INDEX] * len(prompt) + target), False
    if on_overflow == "drop":
        return None, False
    if len(target) >= max_length:
        # Nothing of the prompt fits: keep the start of the target (its end is what goes).
        target = target[:max_length]
        return Encoded(target, list(target)), True
    room = max_length - len(target)
    # Cut from the left: the end of the prompt (the question, the chat turn header) matters
    # most for predicting the target. A leading BOS stays when there is room for more.
    head = prompt[:1] if bos is not None and prompt[:1] == [bos] and room > 1 else []
    kept = head + prompt[len(prompt) - (room - len(head)) :]
    return Encoded(kept + target, [IGNORE_INDEX] * len(kept) + target), True


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode(
    example: Example, tokenizer: Any, max_length: int, *, on_overflow: str = "truncate"
) -> Encoded | None:
    """Token ids of prompt + target + EOS, labels masked on the prompt; None when dropped.

    Too long: "truncate" cuts prompt tokens from the left (then the target's end if the target
    alone is too long); "drop" returns None."""
    _check(max_length, on_overflow)
    (prompt,), (target,) = _ids(tokenizer, [example.prompt]), _ids(tokenizer, [example.target])
    encoded, _ = _build(
        prompt,
        target,
        bos=bos_to_add(tokenizer),
        eos=tokenizer.eos_token_id,
        max_length=max_length,
        on_overflow=on_overflow,
    )
    return encoded


def encode_all(
    examples: ExampleSet | Sequence[Example],
    tokenizer: Any,
    max_length: int,
    *,
    on_overflow: str = "truncate",
) -> tuple[list[Encoded], dict]:
    """Encode many examples (batched tokenisation); returns (encoded, stats) with stats
    {"examples", "truncated", "dropped", "tokens"}, and warns once if any were cut or dropped."""
    _check(max_length, on_overflow)
    items = list(examples.examples if isinstance(examples, ExampleSet) else examples)
    prompts = _ids(tokenizer, [e.prompt for e in items])
    targets = _ids(tokenizer, [e.target for e in items])
    bos, eos = bos_to_add(tokenizer), tokenizer.eos_token_id
    encoded: list[Encoded] = []
    truncated = dropped = 0
    for prompt, target in zip(prompts, targets, strict=True):
        item, cut = _build(
            prompt, target, bos=bos, eos=eos, max_length=max_length, on_overflow=on_overflow
        )
        if item is None:
            dropped += 1
            continue
        truncated += int(cut)
        encoded.append(item)
    stats = {
        "examples": len(items),
        "truncated": truncated,
        "dropped": dropped,
        "tokens": sum(len(e) for e in encoded),
    }
    if truncated or dropped:
        warnings.warn(
            f"{truncated} of {len(items)} examples truncated and {dropped} dropped "
            f"(longer than max_length {max_length})",
            stacklevel=2,
        )
    return encoded, stats


def pack(encoded: Sequence[Encoded], max_length: int) -> list[Encoded]:
    """Greedily concatenate consecutive examples into blocks of at most `max_length` tokens.

    Simple packing as in most trainers: attention crosses example boundaries (there is no
    per-example mask), and labels are kept as they were, so an example's opening prompt
    tokens stay masked and the model is not trained to predict one example from the last.
    A sequence longer than `max_length` (encoded with a larger limit) is split into chunks."""
    if max_length < 1:
        raise DataError(f"max_length must be >= 1, got {max_length!r}")
    blocks: list[Encoded] = []
    ids: list[int] = []
    labels: list[int] = []
    for item in encoded:
        chunks = [
            (item.input_ids[i : i + max_length], item.labels[i : i + max_length])
            for i in range(0, len(item.input_ids), max_length)
        ]
        for chunk_ids, chunk_labels in chunks:
            if ids and len(ids) + len(chunk_ids) > max_length:
                blocks.append(Encoded(ids, labels))
                ids, labels = [], []
            ids.extend(chunk_ids)
            labels.extend(chunk_labels)
    if ids:
        blocks.append(Encoded(ids, labels))
    return blocks


class Collator:
    """Right-pads a batch to its longest row: input_ids (pad id), attention_mask, labels (-100)."""

    def __init__(self, pad_token_id: int | None):
        # The pad id only fills masked positions, so any valid id works when a tokenizer has
        # none; 0 keeps embedding lookups in range.
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)

    def __call__(self, batch: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("Collator got an empty batch")
        width = max(len(item.input_ids) for item in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(batch):
            n = len(item.input_ids)
            input_ids[row, :n] = torch.tensor(item.input_ids, dtype=torch.long)
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.tensor(item.labels, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
