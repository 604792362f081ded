"""Malformed data: every problem is a one-line DataError naming the file and the line."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorafleet.data import DataError, load_examples, split_name
from lorafleet.errors import LorafleetError

PC = '{"prompt": "p", "completion": "c"}'
CHAT_OK = '{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}'
MC_OK = '{"question": "q", "choices": ["a", "b"], "answer": 0}'

# (file name, content, where the error is, words the message must contain)
CASES = {
    "bad json": ("d.jsonl", PC + "\n{oops\n", ":2", "invalid JSON"),
    "not an object": ("d.jsonl", PC + "\n[1, 2]\n", ":2", "expected a JSON object"),
    "missing completion": ("d.jsonl", f'{PC}\n{PC}\n{{"prompt": "p"}}\n', ":3", '"completion"'),
    "completion not a string": (
        "d.jsonl",
        f'{PC}\n{{"prompt": "p", "completion": 4}}\n',
        ":2",
        "must be str, found int",
    ),
    "unknown shape": ("d.jsonl", '{"foo": 1}\n', ":1", "cannot tell the row shape"),
    "empty messages": ("d.jsonl", f'{CHAT_OK}\n{{"messages": []}}\n', ":2", "is empty"),
    "messages not a list": ("d.jsonl", '{"messages": "hi"}\n', ":1", "must be list"),
    "last message not assistant": (
        "d.jsonl",
        '{"messages": [{"role": "user", "content": "u"}]}\n',
        ":1",
        'last message must be from "assistant"',
    ),
    "bad role": (
        "d.jsonl",
        '{"messages": [{"role": "bot", "content": "u"}, {"role": "assistant", "content": "a"}]}\n',
        ":1",
        "role 'bot'",
    ),
    "content not a string": (
        "d.jsonl",
        '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}\n',
        ":1",
        '"content"',
    ),
    "label wrong type": (
        "d.jsonl",
        '{"text": "t", "label": 1}\n{"text": "t", "label": 1.5}\n',
        ":2",
        "must be int or str, found float",
    ),
    "label bool": ("d.jsonl", '{"text": "t", "label": true}\n', ":1", "found bool"),
    "label missing": ("d.jsonl", '{"text": "t", "label": 0}\n{"text": "u"}\n', ":2", '"label"'),
    "text missing": ("d.jsonl", '{"label": 0}\n', ":1", 'missing field "text"'),
    "answer out of range": (
        "d.jsonl",
        MC_OK + '\n{"question": "q", "choices": ["a", "b"], "answer": 2}\n',
        ":2",
        "out of range (0..1)",
    ),
    "answer not a choice": (
        "d.jsonl",
        '{"question": "q", "choices": ["a", "b"], "answer": "c"}\n',
        ":1",
        "not one of the choices",
    ),
    "choices not strings": (
        "d.jsonl",
        '{"question": "q", "choices": [1, 2], "answer": 0}\n',
        ":1",
        "non-empty list of strings",
    ),
    "csv wrong field count": ("d.csv", "prompt,completion\na,b\na,b,c\n", ":3", "3 fields"),
    "csv choices not json": ("d.csv", "question,choices,answer\nq,a|b,0\n", ":2", "JSON list"),
    "tsv missing cell": ("d.tsv", "label\tsentence\n1\n", ":2", "1 fields"),
    "json not a list": ("d.json", '{"prompt": "p"}', "", "expected a JSON list"),
    "json bad syntax": ("d.json", '[\n  {"prompt": "p",\n', ":3", "invalid JSON"),
    "json bad item": (
        "d.json",
        '[\n  {"prompt": "p", "completion": "c"},\n  {"prompt": "p"}\n]',
        ":3",
        '"completion"',
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_rows(case, write, tokenizer):
    name, content, where, words = CASES[case]
    path = write(name, content)
    with pytest.raises(DataError) as info:
        load_examples(path, tokenizer)
    message = str(info.value)
    assert message.startswith(f"{path}{where}"), message
    assert words in message
    assert "\n" not in message
    assert isinstance(info.value, LorafleetError)


def test_parquet_row_error_names_the_row(tmp_path, tokenizer):
    path = tmp_path / "d.parquet"
    pq.write_table(
        pa.table({"question": ["q", "q"], "choices": [["a"], ["a"]], "answer": [0, 5]}), path
    )
    with pytest.raises(DataError, match=r"d\.parquet: row 2: answer 5 out of range"):
        load_examples(path, tokenizer)


@pytest.mark.parametrize(
    "name, content",
    [("e.jsonl", ""), ("e.jsonl", "\n\n  \n"), ("e.csv", "prompt,completion\n"), ("e.json", "[]")],
)
def test_empty_file(name, content, write, tokenizer):
    path = write(name, content)
    with pytest.raises(DataError, match="no usable rows"):
        load_examples(path, tokenizer)


def test_unknown_extension_missing_file_and_unknown_name(tmp_path, write, tokenizer):
    with pytest.raises(DataError, match=r"unknown file type '\.txt'"):
        load_examples(write("d.txt", "x"), tokenizer)
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl", tokenizer)
    with pytest.raises(DataError, match="not a built-in task"):
        load_examples("sst3", tokenizer)


def test_chat_rows_need_a_chat_template(write, char_tokenizer):
    path = write("chat.jsonl", CHAT_OK + "\n")
    with pytest.raises(DataError, match="chat template"):
        load_examples(path, char_tokenizer)


def test_split_names_and_limit():
    assert [split_name(s) for s in ("train", "val", "dev", "test", "Validation")] == [
        "train",
        *["validation"] * 4,
    ]
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        split_name("holdout")
    with pytest.raises(DataError, match="limit"):
        load_examples("sst2", None, limit=0)
