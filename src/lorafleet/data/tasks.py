"""The built-in tasks (sst2, strategyqa, clutrr, gsm8k): local files, else their hub datasets."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.data.examples import ACCURACY, EXACT_MATCH, DataError, Example, ExampleSet
from lorafleet.data.files import field
from lorafleet.data.hub import HubSource, clutrr_row, hub_rows
from lorafleet.data.prompts import Prompter
from lorafleet.data.readers import iter_rows
from lorafleet.paths import data_dir

SST2_CHAT = (
    "Is the sentiment of this movie review positive or negative?\n"
    "Review: {sentence}\nAnswer with one word."
)
SST2_PLAIN = "Review: {sentence}\nSentiment:"
STRATEGYQA_CHAT = "{question}\nAnswer with yes or no."
STRATEGYQA_PLAIN = "Question: {question}\nAnswer (yes or no):"
CLUTRR_CHAT = (
    "{question}\nAnswer as: relation chain #### kinship word "
    "(for example: father-sister #### aunt)."
)
CLUTRR_PLAIN = "{question}\nAnswer:"
GSM8K_CHAT = "{question}\nSolve it step by step, then give the final answer after ####."
GSM8K_PLAIN = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class BuiltinTask:
    """A named task over files under `data_dir()`; `convert` turns one row into an Example."""

    name: str
    description: str
    files: dict[str, str]  # split ("train" | "validation") -> path relative to data_dir()
    metric: str
    convert: Callable[[dict, str, Prompter], Example]
    answer_marker: str | None = None
    # When > 0 the validation split is the LAST `holdout` rows of the train file (gsm8k ships
    # one file), and train is the rest, so the two never overlap.
    holdout: int = 0
    hub: HubSource | None = None  # read when neither $LORAFLEET_DATA nor ../shared/data exists


def _choice(prompt: str, names: tuple[str, ...], label: int, where: str, p: Prompter) -> Example:
    choices = tuple(p.answer(n) for n in names)
    return Example(prompt, choices[label], choices, label, where)


def _sst2(row: dict, where: str, p: Prompter) -> Example:
    sentence = field(row, "sentence", where)
    label = str(field(row, "label", where, (int, str))).strip()
    if label not in ("0", "1"):
        raise DataError(f"{where}: label {label!r} must be 0 (negative) or 1 (positive)")
    prompt = p.prompt(
        SST2_CHAT.format(sentence=sentence), SST2_PLAIN.format(sentence=sentence), where
    )
    return _choice(prompt, ("negative", "positive"), int(label), where, p)


def _strategyqa(row: dict, where: str, p: Prompter) -> Example:
    question = field(row, "question", where)
    answer = field(row, "answer", where, bool)
    prompt = p.prompt(
        STRATEGYQA_CHAT.format(question=question), STRATEGYQA_PLAIN.format(question=question), where
    )
    return _choice(prompt, ("no", "yes"), int(answer), where, p)


def _generation(chat: str, plain: str) -> Callable[[dict, str, Prompter], Example]:
    def convert(row: dict, where: str, p: Prompter) -> Example:
        question = field(row, "question", where)
        answer = field(row, "answer", where)
        prompt = p.prompt(chat.format(question=question), plain.format(question=question), where)
        return Example(prompt=prompt, target=p.answer(answer), source=where)

    return convert


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    task.name: task
    for task in (
        BuiltinTask(
            "sst2",
            "SST-2 movie-review sentiment (negative / positive)",
            {"train": "sst2/train.tsv", "validation": "sst2/validation.tsv"},
            ACCURACY,
            _sst2,
            hub=HubSource("stanfordnlp/sst2"),
        ),
        BuiltinTask(
            "clutrr",
            'CLUTRR kinship reasoning, answer "relation chain #### kinship"',
            {"train": "clutrr/train.jsonl", "validation": "clutrr/dev.jsonl"},
            EXACT_MATCH,
            _generation(CLUTRR_CHAT, CLUTRR_PLAIN),
            answer_marker="####",
            hub=HubSource("CLUTRR/v1", "gen_train234_test2to10", row=clutrr_row),
        ),
        BuiltinTask(
            "strategyqa",
            "StrategyQA yes/no questions needing implicit reasoning",
            {"train": "strategyqa/train.jsonl", "validation": "strategyqa/dev.jsonl"},
            ACCURACY,
            _strategyqa,
            hub=HubSource("ChilleD/StrategyQA", splits={"validation": "test"}),
        ),
        BuiltinTask(
            "gsm8k",
            "GSM8K grade-school math, final answer after ####",
            {"train": "gsm8k/train.jsonl", "validation": "gsm8k/train.jsonl"},
            EXACT_MATCH,
            _generation(GSM8K_CHAT, GSM8K_PLAIN),
            answer_marker="####",
            holdout=500,
            hub=HubSource("openai/gsm8k", "main", splits={"validation": "train"}),
        ),
    )
}


def load_builtin(
    task: BuiltinTask, split: str, tokenizer: Any, *, chat: bool, limit: int | None
) -> ExampleSet:
    """The examples of one split of a built-in task (the first `limit` rows when given)."""
    root = data_dir()
    rows = _local_rows(task, split, root) if root is not None else _hub_rows(task, split)
    if task.holdout:
        every = list(rows)  # row parsing is cheap; only the kept rows get templated
        rows = iter(every[-task.holdout :] if split == "validation" else every[: -task.holdout])
    prompter = Prompter.for_tokenizer(tokenizer, chat)
    examples = [task.convert(row, where, prompter) for where, row in itertools.islice(rows, limit)]
    if not examples:
        raise DataError(f"built-in task '{task.name}' ({split}): no usable rows (empty data)")
    return ExampleSet(examples, task.name, task.metric, task.answer_marker)


def _wanted(task: BuiltinTask) -> tuple[str, str]:
    """The task's folder and its file names, for the messages that say where to put them."""
    folder = task.files["train"].split("/")[0]
    return folder, ", ".join(sorted({f.split("/")[-1] for f in task.files.values()}))


def _local_rows(task: BuiltinTask, split: str, root: Path) -> Iterator[tuple[str, dict]]:
    folder, wanted = _wanted(task)
    path = root / task.files[split]
    if not path.is_file():
        raise DataError(
            f"built-in task '{task.name}': {path} not found; put the {folder} files ({wanted}) "
            f"in {root / folder} or set $LORAFLEET_DATA to a folder that has {folder}/"
        )
    return iter_rows(path)


def _hub_rows(task: BuiltinTask, split: str) -> Iterator[tuple[str, dict]]:
    folder, wanted = _wanted(task)
    hint = f"to use local files, put {folder}/ ({wanted}) in a folder and set $LORAFLEET_DATA to it"
    if task.hub is None:
        raise DataError(f"built-in task '{task.name}' needs its data files: {hint}")
    return hub_rows(task.hub, split, task.name, hint)
