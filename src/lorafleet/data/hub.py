"""Built-in tasks' public hub datasets, read with `datasets` when no local data files exist."""

from __future__ import annotations

import ast
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.data.examples import DataError
from lorafleet.paths import cache_dir

HUB_DIR_ENV = "LORAFLEET_HUB_DIR"  # a folder of local copies of hub dataset repos (<owner>/<name>)


@dataclass(frozen=True)
class HubSource:
    """Where a built-in task lives on the hub; `row` turns a hub row into the local files' shape."""

    dataset: str  # the hub id, e.g. "openai/gsm8k"
    config: str | None = None
    splits: dict[str, str] = field(default_factory=dict)  # our split -> the hub's split
    row: Callable[[dict], dict] | None = None

    def split(self, split: str) -> str:
        return self.splits.get(split, split)


def clutrr_row(row: dict) -> dict:
    """A CLUTRR/v1 row as the local clutrr files hold it: question + "chain #### kinship"."""
    head, tail = ast.literal_eval(str(row["query"]))  # "('Donald', 'Dorothy')"
    question = f"{row['story']}\nQuestion: How is [{tail}] related to [{head}]?"
    return {"question": question, "answer": f"{row['f_comb']} #### {row['target_text']}"}


def hub_location(source: HubSource) -> str:
    """The hub id, or its local copy under `$LORAFLEET_HUB_DIR` when that is set."""
    mirror = os.environ.get(HUB_DIR_ENV)
    return str(Path(mirror).expanduser() / source.dataset) if mirror else source.dataset


def hub_rows(source: HubSource, split: str, task: str, hint: str) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of one split, fetched once and then cached by `datasets`.

    `hint` ends the one-line error raised when the dataset cannot be fetched (offline)."""
    name = source.split(split)
    try:
        table = _load(hub_location(source), source.config, name)
    except Exception as exc:  # offline, unknown id, changed repo: all end the same way
        why = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise DataError(
            f"built-in task '{task}': no local files, and the hub dataset {source.dataset} "
            f"(split {name}) could not be fetched ({why}); {hint}"
        ) from None
    for i, row in enumerate(table):
        yield f"{source.dataset}:{name}:{i + 1}", source.row(row) if source.row else row


def _load(location: str, config: str | None, split: str):
    """`datasets.load_dataset`, its retry warnings kept quiet (a failure ends in one line)."""
    import datasets
    from huggingface_hub.utils import logging as hub_logging

    levels = (datasets.logging.get_verbosity(), hub_logging.get_verbosity())
    datasets.logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    try:
        return datasets.load_dataset(
            location, config, split=split, cache_dir=str(cache_dir() / "datasets")
        )
    finally:
        datasets.logging.set_verbosity(levels[0])
        hub_logging.set_verbosity(levels[1])
