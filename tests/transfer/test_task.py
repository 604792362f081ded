"""TaskFormat rebuilds a task's own prompt around a new input, for any tokenizer."""

from __future__ import annotations

import json

import pytest

from lorafleet.data import load_examples
from lorafleet.models.tiny_gemma import tiny_gemma_tokenizer
from lorafleet.transfer.task import TransferError, split_rows, task_format, task_rows


@pytest.mark.parametrize("task", ["sst2", "clutrr"])
@pytest.mark.parametrize("which", ["smollm2", "gemma"])
def test_a_rebuilt_example_is_the_tasks_own(task, which, tokenizer):
    """The prompt (and choices) for a row's input equal `load_examples`' for that row, so a
    transferred adapter is trained on exactly what `lorafleet eval -d TASK` scores."""
    tok = tokenizer if which == "smollm2" else tiny_gemma_tokenizer()
    rows = task_rows(task)[:3]
    fmt = task_format(task, rows[0], rows)
    official = load_examples(task, tok, split="train", limit=3)
    for row, want in zip(rows, official, strict=True):
        got = fmt.example(tok, True, fmt.input_of(row), template=rows[0])
        assert got.prompt == want.prompt and got.choices == want.choices
        output = want.label if want.choices else want.target
        labelled = fmt.with_output(got, output, tok, True)
        assert labelled.target == want.target and labelled.label == want.label


def test_labelled_and_completion_files(tmp_path, tokenizer):
    labelled = tmp_path / "l.jsonl"
    rows = [{"text": f"t{i}", "label": ["b", "a", "c"][i % 3]} for i in range(6)]
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fmt = task_format(str(labelled), rows[0], rows)
    assert fmt.labels == ("a", "b", "c") and fmt.input_key == "text"
    official = load_examples(labelled, tokenizer)
    e = fmt.with_output(fmt.example(tokenizer, True, "t0", rows[0]), 1, tokenizer, True)
    assert e.prompt == official[0].prompt and e.choices == official[0].choices
    assert e.target == official[0].target and e.label == 1  # "b"
    comp = [{"prompt": "2+2=", "completion": " 4"}]
    fmt = task_format("c.jsonl", comp[0], comp)
    e = fmt.with_output(fmt.example(tokenizer, True, "3+3=", comp[0]), " 6", tokenizer, True)
    assert (e.prompt, e.target) == ("3+3=", " 6")
    with pytest.raises(TransferError, match="not supported"):
        task_format("m.jsonl", {"messages": []}, [])


def test_seeds_and_real_rows_are_disjoint_and_seeded():
    rows = [{"text": str(i)} for i in range(20)]
    seeds, real = split_rows(rows, 5, 10, seed=3)
    assert len(seeds) == 5 and len(real) == 10
    assert not {r["text"] for r in seeds} & {r["text"] for r in real}
    assert (seeds, real) == split_rows(rows, 5, 10, seed=3)
    assert seeds != split_rows(rows, 5, 10, seed=4)[0]
    with pytest.raises(TransferError, match="--seeds"):
        split_rows(rows, 0, 10, seed=0)
