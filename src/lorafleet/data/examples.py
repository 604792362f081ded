"""The data model every trainer and evaluator consumes: examples, example sets, data errors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from lorafleet.errors import LorafleetError

ACCURACY = "accuracy"
EXACT_MATCH = "exact_match"


class DataError(LorafleetError):
    """A data file or task that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One training or evaluation example: the loss (and generation) is on `target` only."""

    prompt: str  # exact text placed before the target (chat template already applied if used)
    target: str  # text the loss is on; for choice tasks = choices[label]
    choices: tuple[str, ...] | None = None  # candidate targets, scored by log-likelihood
    label: int | None = None  # index of the correct choice
    source: str = ""  # "file:line", for messages


@dataclass
class ExampleSet:
    """Examples plus what the evaluator needs to score them."""

    examples: list[Example]
    name: str  # built-in task name or file name
    metric: str  # "accuracy" (choices) | "exact_match" (generation)
    # Exact match compares the text after the LAST marker (stripped, case-insensitive);
    # None compares the whole text.
    answer_marker: str | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]
