"""Loss masking, truncation, packing and padding."""

from __future__ import annotations

import pytest
import torch

from lorafleet.data import (
    Collator,
    DataError,
    Encoded,
    Example,
    encode,
    encode_all,
    load_examples,
    pack,
)

IGNORE = -100


def test_labels_mask_exactly_the_prompt(write, tokenizer):
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]
    example = load_examples(write("c.jsonl", [{"messages": messages}]), tokenizer).examples[0]
    encoded = encode(example, tokenizer, max_length=512)
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert encoded.input_ids[:n] == prompt_ids
    assert encoded.labels[:n] == [IGNORE] * n
    assert IGNORE not in encoded.labels[n:]
    assert encoded.labels[n:] == encoded.input_ids[n:]
    assert encoded.input_ids[-1] == tokenizer.eos_token_id
    kept = [t for t in encoded.labels if t != IGNORE]
    assert tokenizer.decode(kept) == "Blue." + tokenizer.eos_token
    # The chat markup became special tokens, not text pieces.
    assert prompt_ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


def test_bos_prepended_when_the_tokenizer_adds_one(char_tokenizer):
    encoded = encode(Example("ab", "c"), char_tokenizer, 16)
    assert encoded.input_ids == [1, ord("a") + 10, ord("b") + 10, ord("c") + 10, 2]
    assert encoded.labels == [IGNORE, IGNORE, IGNORE, ord("c") + 10, 2]


def test_truncate_cuts_the_prompt_from_the_left(char_tokenizer):
    t = char_tokenizer
    encoded = encode(Example("abcdefgh", "xy"), t, 6)
    # BOS stays, then the END of the prompt, then the whole target + EOS.
    assert encoded.input_ids == [1, *t("gh", False)["input_ids"], *t("xy", False)["input_ids"], 2]
    assert encoded.labels[:3] == [IGNORE] * 3
    assert t.decode([x for x in encoded.labels if x != IGNORE]) == "xy"


def test_truncate_cuts_the_target_end_when_it_alone_is_too_long(char_tokenizer):
    encoded = encode(Example("prompt", "0123456789"), char_tokenizer, 5)
    assert char_tokenizer.decode(encoded.input_ids) == "01234"
    assert encoded.labels == encoded.input_ids


def test_truncate_real_tokenizer_keeps_the_prompt_end(tokenizer):
    example = Example("one two three four five six seven eight nine ten", " eleven")
    full = encode(example, tokenizer, 512)
    cut = encode(example, tokenizer, 6)
    assert len(cut.input_ids) == 6
    assert cut.input_ids == full.input_ids[-6:]
    assert cut.labels == full.labels[-6:]


def test_drop_and_stats(char_tokenizer):
    examples = [Example("ab", "c"), Example("a" * 20, "c"), Example("b" * 30, "d"), Example("", "")]
    with pytest.warns(UserWarning, match="2 of 4 examples truncated and 0 dropped"):
        kept, stats = encode_all(examples, char_tokenizer, 8)
    assert stats == {"examples": 4, "truncated": 2, "dropped": 0, "tokens": 5 + 8 + 8 + 2}
    assert all(len(e) <= 8 for e in kept)
    with pytest.warns(UserWarning, match="0 of 4 examples truncated and 2 dropped"):
        kept, stats = encode_all(examples, char_tokenizer, 8, on_overflow="drop")
    assert stats == {"examples": 4, "truncated": 0, "dropped": 2, "tokens": 5 + 2}
    assert encode(examples[1], char_tokenizer, 8, on_overflow="drop") is None
    with pytest.raises(DataError, match="on_overflow"):
        encode_all(examples, char_tokenizer, 8, on_overflow="cut")


def test_encode_all_matches_encode(write, tokenizer):
    data = load_examples("sst2", tokenizer, split="validation", limit=8)
    batch, stats = encode_all(data, tokenizer, 256)
    assert batch == [encode(e, tokenizer, 256) for e in data]
    assert stats["tokens"] == sum(len(e.input_ids) for e in batch)


def _encoded(lengths: list[int]) -> list[Encoded]:
    items = []
    for i, n in enumerate(lengths):
        ids = [100 + i] * n
        labels = [IGNORE] * (n // 2) + ids[n // 2 :]
        items.append(Encoded(ids, labels))
    return items


def test_pack_blocks_fit_and_keep_every_label():
    items = _encoded([3, 5, 2, 7, 1, 8, 4])
    blocks = pack(items, 8)
    assert all(len(b.input_ids) <= 8 for b in blocks)
    assert all(len(b.input_ids) == len(b.labels) for b in blocks)
    # Greedy, in order: [3+5], [2], ... concatenation is unchanged.
    assert [len(b) for b in blocks] == [8, 2, 8, 8, 4]
    assert sum((b.input_ids for b in blocks), []) == sum((e.input_ids for e in items), [])
    assert sum((b.labels for b in blocks), []) == sum((e.labels for e in items), [])


def test_pack_splits_an_oversized_sequence():
    blocks = pack(_encoded([10]), 4)
    assert [len(b) for b in blocks] == [4, 4, 2]


def test_collator_pads_right_with_masks():
    batch = Collator(pad_token_id=7)([Encoded([5, 6, 8], [IGNORE, 6, 8]), Encoded([9], [9])])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 8], [9, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 8], [9, IGNORE, IGNORE]]
    assert Collator(None)([Encoded([5], [5]), Encoded([5, 5], [5, 5])])["input_ids"][0, 1] == 0
