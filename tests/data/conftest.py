"""Fixtures for the data tests: a character-level tokenizer with exact lengths, a file writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


class CharTokenizer:
    """One token per character (id = ord + 10), BOS 1 added by default, EOS 2, no chat template.

    Lengths are predictable, so truncation and packing can be checked token by token."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0
    chat_template = None

    def _ids(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [ord(c) + 10 for c in text]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def __call__(self, text, add_special_tokens: bool = True):
        if isinstance(text, str):
            return {"input_ids": self._ids(text, add_special_tokens)}
        return {"input_ids": [self._ids(t, add_special_tokens) for t in text]}

    def decode(self, ids) -> str:
        return "".join(chr(i - 10) for i in ids if i >= 10)


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def write(tmp_path):
    """write(name, rows_or_text) -> path; rows (dicts) become JSON lines or a JSON list."""

    def write(name: str, content) -> Path:
        path = tmp_path / name
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        elif name.endswith(".json"):
            path.write_text(json.dumps(content, indent=2), encoding="utf-8")
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in content), encoding="utf-8")
        return path

    return write
