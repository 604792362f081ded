"""`load_examples`: one entry point for built-in task names and user data files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafleet.data.examples import DataError, ExampleSet
from lorafleet.data.files import load_file
from lorafleet.data.tasks import BUILTIN_TASKS, load_builtin

SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "val": "validation",
    "dev": "validation",
    # No task here has a labelled test split, so "test" means the held-out validation data.
    "test": "validation",
}


def split_name(split: str) -> str:
    """Normalise a split name to "train" or "validation" (val, dev, test mean validation)."""
    name = SPLIT_ALIASES.get(str(split).strip().lower())
    if name is None:
        raise DataError(
            f"unknown split {split!r} (expected train or validation; val, dev, test also work)"
        )
    return name


def load_examples(
    data: str | Path,
    tokenizer: Any,
    *,
    split: str = "train",
    chat: bool = True,
    limit: int | None = None,
) -> ExampleSet:
    """Examples from a built-in task name (sst2, clutrr, strategyqa, gsm8k) or a data file.

    `split` picks a built-in task's split (files have one); `chat` wraps templated prompts in
    the tokenizer's chat template when it has one; `limit` keeps the first N rows, and only
    those are templated, so a small limit on a large file stays fast.
    """
    split = split_name(split)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive whole number, got {limit!r}")
    name = str(data).strip()
    task = BUILTIN_TASKS.get(name.lower())
    if task is not None:
        return load_builtin(task, split, tokenizer, chat=chat, limit=limit)
    path = Path(name).expanduser()
    if not path.suffix and not path.exists():
        tasks = ", ".join(BUILTIN_TASKS)
        raise DataError(
            f"{name}: not a built-in task ({tasks}) nor a data file "
            "(.jsonl, .json, .csv, .tsv, .parquet)"
        )
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give a data file or a built-in task name")
    return load_file(path, tokenizer, chat=chat, limit=limit)
