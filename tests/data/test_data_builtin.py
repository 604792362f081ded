"""The four built-in tasks on the real shared data, and the error when the data is missing."""

from __future__ import annotations

import json

import pytest

import lorafleet.data.tasks as tasks
from lorafleet.data import BUILTIN_TASKS, DataError, load_examples
from lorafleet.paths import data_dir

DATA = data_dir()
needs_data = pytest.mark.skipif(
    DATA is None or not (DATA / "sst2").is_dir(), reason="shared data sets not found"
)
ASSISTANT_TURN = "<|im_start|>assistant\n"


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_builtin_task_names():
    assert set(BUILTIN_TASKS) == {"sst2", "clutrr", "strategyqa", "gsm8k"}


@needs_data
def test_sst2(tokenizer):
    val = load_examples("sst2", tokenizer, split="validation")
    assert len(val) == 2000
    assert (val.name, val.metric, val.answer_marker) == ("sst2", "accuracy", None)
    raw = (DATA / "sst2" / "validation.tsv").read_text().splitlines()[1:]
    assert [e.label for e in val] == [int(line.split("\t")[0]) for line in raw]
    first = val.examples[0]
    assert first.choices == ("negative", "positive")
    assert first.target == first.choices[first.label]
    assert raw[0].split("\t")[1] in first.prompt
    assert "positive or negative" in first.prompt and first.prompt.endswith(ASSISTANT_TURN)
    train = load_examples("sst2", tokenizer, split="train", limit=5, chat=False)
    assert len(train) == 5 and train.examples[4].source.endswith("train.tsv:6")
    assert train.examples[0].prompt.startswith("Review: ") and train.examples[0].prompt.endswith(
        "\nSentiment:"
    )
    assert train.examples[0].choices == (" negative", " positive")


@needs_data
def test_strategyqa(tokenizer):
    dev = load_examples("strategyqa", tokenizer, split="dev")
    raw = _jsonl(DATA / "strategyqa" / "dev.jsonl")
    assert len(dev) == 499
    assert [e.label for e in dev] == [int(r["answer"]) for r in raw]
    assert dev.examples[0].choices == ("no", "yes")
    assert dev.metric == "accuracy"
    assert raw[0]["question"] in dev.examples[0].prompt
    train = load_examples("strategyqa", tokenizer, limit=3)
    assert [e.target for e in train] == [
        "yes" if r["answer"] else "no" for r in _jsonl(DATA / "strategyqa" / "train.jsonl")[:3]
    ]


@needs_data
def test_clutrr(tokenizer):
    dev = load_examples("clutrr", tokenizer, split="val")
    raw = _jsonl(DATA / "clutrr" / "dev.jsonl")
    assert len(dev) == 1000
    assert (dev.metric, dev.answer_marker) == ("exact_match", "####")
    assert [e.target for e in dev] == [r["answer"] for r in raw]
    assert dev.examples[0].choices is None and dev.examples[0].label is None
    assert raw[0]["question"] in dev.examples[0].prompt
    assert "relation chain #### kinship word" in dev.examples[0].prompt
    plain = load_examples("clutrr", tokenizer, limit=2, chat=False)
    assert plain.examples[0].prompt.endswith("\nAnswer:")
    assert plain.examples[0].target.startswith(" ") and "####" in plain.examples[0].target


@needs_data
def test_gsm8k_validation_is_the_last_500_rows(tokenizer):
    raw = _jsonl(DATA / "gsm8k" / "train.jsonl")
    val = load_examples("gsm8k", tokenizer, split="test")
    assert len(val) == 500
    assert [e.target for e in val] == [r["answer"] for r in raw[-500:]]
    assert (val.metric, val.answer_marker) == ("exact_match", "####")
    train = load_examples("gsm8k", tokenizer, chat=False)  # plain: no templating, fast
    assert len(train) == len(raw) - 500
    assert train.examples[-1].target == " " + raw[-501]["answer"]
    assert {e.source for e in train}.isdisjoint(e.source for e in val)


@needs_data
def test_limit_keeps_the_first_rows(tokenizer):
    for name in BUILTIN_TASKS:
        data = load_examples(name, tokenizer, limit=4)
        assert len(data) == 4
        assert data.examples == load_examples(name, tokenizer, limit=7).examples[:4]


def test_missing_data_dir_says_where_to_put_files(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("LORAFLEET_DATA", str(tmp_path))
    with pytest.raises(DataError) as info:
        load_examples("sst2", tokenizer)
    message = str(info.value)
    assert "sst2" in message and "$LORAFLEET_DATA" in message and str(tmp_path) in message
    assert "\n" not in message
    monkeypatch.setattr(tasks, "data_dir", lambda: None)  # then the hub: here an empty mirror
    monkeypatch.setenv("LORAFLEET_HUB_DIR", str(tmp_path / "no-hub"))
    with pytest.raises(DataError, match=r"gsm8k.*openai/gsm8k.*\$LORAFLEET_DATA"):
        load_examples("gsm8k", tokenizer, split="validation")
