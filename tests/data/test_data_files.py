"""User data files: each row shape from jsonl, json, csv, tsv and parquet."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from lorafleet.data import Example, ExampleSet, load_examples

SMOL_SYSTEM = "<|im_start|>system\n"
ASSISTANT_TURN = "<|im_start|>assistant\n"


def test_prompt_completion_jsonl_used_as_is(write, tokenizer):
    rows = [
        {"prompt": "2+2=", "completion": " 4"},
        {"prompt": "Capital of France?", "completion": "Paris"},
    ]
    path = write("pc.jsonl", rows)
    data = load_examples(str(path), tokenizer)
    assert isinstance(data, ExampleSet)
    assert (data.name, data.metric, data.answer_marker) == ("pc.jsonl", "exact_match", None)
    assert data.examples[0] == Example("2+2=", " 4", source=f"{path}:1")
    assert data.examples[1].prompt == "Capital of France?"  # no chat template on this shape


def test_blank_lines_skipped_and_limit_takes_first_rows(write, tokenizer):
    rows = [json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(10)]
    text = "\n\n".join(rows) + "\n"  # a blank line between rows
    data = load_examples(write("pc.jsonl", text), tokenizer, limit=3)
    assert [e.prompt for e in data] == ["p0", "p1", "p2"]
    assert data.examples[2].source.endswith("pc.jsonl:5")  # line numbers count blank lines


def test_chat_rows_apply_the_chat_template(write, tokenizer):
    messages = [
        {"role": "system", "content": "You answer tersely."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi."},
    ]
    data = load_examples(write("chat.jsonl", [{"messages": messages}]), tokenizer)
    example = data.examples[0]
    expected = tokenizer.apply_chat_template(
        messages[:-1], add_generation_prompt=True, tokenize=False
    )
    assert example.prompt == expected
    assert example.prompt.startswith("<|im_start|>system\nYou answer tersely.")
    assert example.prompt.endswith(ASSISTANT_TURN)
    assert example.target == "Hi."
    assert data.metric == "exact_match"


def test_labelled_jsonl_chat_and_plain(write, tokenizer):
    rows = [{"text": "good", "label": 10}, {"text": "bad", "label": 2}, {"text": "meh", "label": 2}]
    path = write("lab.jsonl", rows)
    chat = load_examples(path, tokenizer)
    # ints sort numerically: 2 before 10
    assert chat.examples[0].choices == ("2", "10")
    assert [e.label for e in chat] == [1, 0, 0]
    assert chat.examples[0].target == "10"
    assert chat.examples[0].prompt.startswith(SMOL_SYSTEM)
    assert "good\n\nReply with one label from: 2, 10." in chat.examples[0].prompt
    assert chat.metric == "accuracy"
    plain = load_examples(path, tokenizer, chat=False)
    assert plain.examples[0].prompt == "good\nLabel:"
    assert plain.examples[0].choices == (" 2", " 10")
    assert plain.examples[0].target == " 10"


def test_labelled_choices_come_from_the_whole_file_even_with_limit(write, tokenizer):
    rows = [
        {"text": "a", "label": "cat"},
        {"text": "b", "label": "dog"},
        {"text": "c", "label": "ant"},
    ]
    data = load_examples(write("lab.jsonl", rows), tokenizer, limit=1, chat=False)
    assert len(data) == 1
    assert data.examples[0].choices == (" ant", " cat", " dog")
    assert data.examples[0].label == 1


def test_tsv_with_sentence_header(write, tokenizer):
    path = write("sst.tsv", "label\tsentence\n0\tdull , lifeless\n1\ta joy\n")
    data = load_examples(path, tokenizer, chat=False)
    assert [e.prompt for e in data] == ["dull , lifeless\nLabel:", "a joy\nLabel:"]
    assert [e.label for e in data] == [0, 1]
    assert data.examples[1].source.endswith("sst.tsv:3")


def test_csv_prompt_completion_and_quoted_cells(write, tokenizer):
    path = write("pc.csv", 'prompt,completion\n"Hello, world",hi\n"multi\nline",x\n')
    data = load_examples(path, tokenizer)
    assert [(e.prompt, e.target) for e in data] == [("Hello, world", "hi"), ("multi\nline", "x")]


def test_csv_multiple_choice_with_json_choices(write, tokenizer):
    path = write("mc.csv", 'question,choices,answer\nSky?,"[""blue"", ""green""]",blue\n')
    data = load_examples(path, tokenizer, chat=False)
    example = data.examples[0]
    assert example.choices == (" blue", " green") and example.label == 0
    assert example.prompt == "Question: Sky?\nOptions:\n- blue\n- green\nAnswer:"


def test_multiple_choice_jsonl_index_and_text_answers(write, tokenizer):
    rows = [
        {"question": "1+1?", "choices": ["1", "2", "3"], "answer": 1},
        {"question": "Red?", "choices": ["apple", "sky"], "answer": "apple"},
    ]
    data = load_examples(write("mc.jsonl", rows), tokenizer)
    assert [e.label for e in data] == [1, 0]
    assert [e.target for e in data] == ["2", "apple"]
    assert data.examples[0].choices == ("1", "2", "3")
    assert "1+1?\nOptions:\n- 1\n- 2\n- 3\nReply with the correct option" in data.examples[0].prompt
    assert data.metric == "accuracy"


def test_json_list_file(write, tokenizer):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    data = load_examples(write("list.json", rows), tokenizer)
    assert [e.target for e in data] == ["b", "d"]
    assert data.examples[1].source.endswith("list.json:6")  # line where item 2 starts


def test_parquet_file(tmp_path, tokenizer):
    path = tmp_path / "lab.parquet"
    pq.write_table(pa.table({"text": ["x", "y", "z"], "label": [1, 0, 1]}), path)
    data = load_examples(path, tokenizer, chat=False, limit=2)
    assert [e.label for e in data] == [1, 0]
    assert data.examples[0].choices == (" 0", " 1")
    assert data.examples[1].source.endswith("lab.parquet: row 2")


def test_no_chat_template_gives_plain_prompts(write, char_tokenizer):
    data = load_examples(write("lab.jsonl", [{"text": "t", "label": "a"}]), char_tokenizer)
    assert data.examples[0].prompt == "t\nLabel:"
    assert data.examples[0].target == " a"
