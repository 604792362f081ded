"""What a task's input is and how an (input, output) pair becomes an Example for any tokenizer.

Trans-LoRA moves *inputs* between models: the raw text a task row holds (sst2's sentence, a
clutrr question, a file's prompt). `TaskFormat` names that field and rebuilds the task's own
prompt around a new input, with the chat template of whichever base is being prompted, so the
teacher (source base) and the student (target base) each see the task as it was trained.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.data import BUILTIN_TASKS, DataError, Example
from lorafleet.data.files import detect_shape, sorted_labels
from lorafleet.data.prompts import LABELLED_CHAT, LABELLED_PLAIN, Prompter
from lorafleet.data.readers import iter_rows
from lorafleet.errors import LorafleetError
from lorafleet.paths import data_dir

# The field that holds the input of each built-in task's rows.
BUILTIN_INPUTS = {
    "sst2": "sentence",
    "strategyqa": "question",
    "clutrr": "question",
    "gsm8k": "question",
}
# What the few-shot generation prompt calls the inputs.
BUILTIN_KINDS = {
    "sst2": "movie review sentences",
    "strategyqa": "yes/no questions",
    "clutrr": "short family stories, each ending in a kinship question",
    "gsm8k": "grade-school math word problems",
}


class TransferError(LorafleetError):
    """A Trans-LoRA input that cannot be used (one line)."""


@dataclass(frozen=True)
class TaskFormat:
    """A task as Trans-LoRA sees it: where the input is and how to rebuild its prompt."""

    name: str  # the built-in task name, or the data file's name
    shape: str  # "builtin" | "labelled" | "completion"
    input_key: str
    kind: str  # what the inputs are, in words (for the generation prompt)
    labels: tuple[str, ...] = ()  # a labelled file's label names (its choices)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TaskFormat:
        return cls(d["name"], d["shape"], d["input_key"], d["kind"], tuple(d.get("labels", ())))

    def input_of(self, row: dict) -> str:
        value = row.get(self.input_key)
        if value is None and self.shape == "labelled":
            value = row.get("sentence")
        if not isinstance(value, str) or not value.strip():
            raise DataError(f'{self.name}: a row has no text in field "{self.input_key}"')
        return value

    def example(self, tokenizer: Any, chat: bool, text: str, template: dict) -> Example:
        """The task's Example for input `text` (`template`: a seed row giving the other fields;
        the target is the template's until `with_output` sets the real one)."""
        prompter = Prompter.for_tokenizer(tokenizer, chat)
        if self.shape == "builtin":
            row = {**template, self.input_key: text}
            return BUILTIN_TASKS[self.name].convert(row, self.name, prompter)
        if self.shape == "labelled":
            options = ", ".join(self.labels)
            prompt = prompter.prompt(
                LABELLED_CHAT.format(text=text, options=options), LABELLED_PLAIN.format(text=text)
            )
            choices = tuple(prompter.answer(label) for label in self.labels)
            return Example(prompt, choices[0], choices, 0, self.name)
        return Example(prompt=text, target=str(template.get("completion", "")), source=self.name)

    def with_output(self, example: Example, output: str | int, tokenizer: Any, chat: bool):
        """`example` with the teacher's output as its target (a choice index for choice tasks)."""
        if example.choices:
            k = int(output)
            return dataclasses.replace(example, target=example.choices[k], label=k)
        answer = str(output) if self.shape == "completion" else output.strip()
        if self.shape != "completion":
            answer = Prompter.for_tokenizer(tokenizer, chat).answer(answer)
        return dataclasses.replace(example, target=answer)


def task_format(data: str, first_row: dict, all_rows: list[dict]) -> TaskFormat:
    """The format of a built-in task name or of a data file (from its rows' shape)."""
    name = str(data).strip()
    if name.lower() in BUILTIN_TASKS:
        key = name.lower()
        return TaskFormat(key, "builtin", BUILTIN_INPUTS[key], BUILTIN_KINDS[key])
    shape = detect_shape(first_row, name)
    if shape == "labelled":
        labels = sorted_labels({str(r.get("label", "")).strip() for r in all_rows} - {""})
        key = "text" if "text" in first_row else "sentence"
        return TaskFormat(Path(name).name, "labelled", key, "short texts", labels)
    if shape == "completion":
        return TaskFormat(Path(name).name, "completion", "prompt", "task prompts")
    raise TransferError(
        f"{name}: Trans-LoRA needs one input per row: a built-in task, text/label rows or "
        f"prompt/completion rows ({shape} rows are not supported)"
    )


def task_rows(data: str) -> list[dict]:
    """The training rows of a built-in task (its local files) or of a data file."""
    name = str(data).strip()
    task = BUILTIN_TASKS.get(name.lower())
    if task is None:
        path = Path(name).expanduser()
        if not path.is_file():
            raise DataError(f"{name}: not a built-in task ({', '.join(BUILTIN_TASKS)}) nor a file")
        rows = [row for _, row in iter_rows(path)]
    else:
        root = data_dir()
        if root is None or not (root / task.files["train"]).is_file():
            raise DataError(
                f"built-in task '{task.name}': its train file is not under $LORAFLEET_DATA "
                f"({root}); Trans-LoRA prepare reads the local files"
            )
        rows = [row for _, row in iter_rows(root / task.files["train"])]
        rows = rows[: -task.holdout] if task.holdout else rows
    if not rows:
        raise DataError(f"{name}: no rows")
    return rows


def split_rows(rows: list[dict], n_seeds: int, n_real: int, seed: int):
    """(seeds, real rows for the discriminator): disjoint, drawn at random with `seed`."""
    if n_seeds < 1:
        raise TransferError(f"--seeds must be >= 1, got {n_seeds}")
    if len(rows) < n_seeds + 2:
        raise TransferError(f"the task has {len(rows)} rows; need more than --seeds {n_seeds} + 1")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    seeds = [rows[i] for i in order[:n_seeds]]
    real = [rows[i] for i in order[n_seeds : n_seeds + n_real]]
    return seeds, real
