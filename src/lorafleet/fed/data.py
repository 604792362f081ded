"""Each client's share of the training data, computed the same way in every process."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from lorafleet.data import Encoded, ExampleSet, encode_all, load_examples
from lorafleet.data.readers import iter_rows
from lorafleet.data.tasks import BUILTIN_TASKS
from lorafleet.errors import LorafleetError
from lorafleet.fed.config import FedConfig
from lorafleet.fed.partition import label_histogram, partition
from lorafleet.paths import data_dir


@dataclass
class Partition:
    """Which examples of the training set each client holds, and their label mix."""

    parts: list[list[int]]
    histogram: list[dict[str, int]]
    train: ExampleSet

    def encoded(self, client: int, tokenizer, max_length: int) -> list[Encoded]:
        """Client `client`'s examples, tokenised (prompts cut from the left when too long)."""
        rows = [self.train[i] for i in self.parts[client]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # truncation is reported once per run, not per client
            encoded, _ = encode_all(rows, tokenizer, max_length, on_overflow="truncate")
        return encoded


def _train_file(data: str) -> Path:
    task = BUILTIN_TASKS.get(data.strip().lower())
    if task is None:
        return Path(data).expanduser()
    root = data_dir()
    if root is None:
        raise LorafleetError(f"built-in task {task.name} has no data dir (set $LORAFLEET_DATA)")
    return root / task.files["train"]


def split_keys(train: ExampleSet, data: str, split_by: str) -> list:
    """One key per example: its label, or the value of field `split_by` in its data row."""
    if split_by == "label":
        labels = [ex.label for ex in train]
        if any(label is None for label in labels):
            raise LorafleetError(
                f"{data}: examples have no labels to split by; use --split iid or --split-by FIELD"
            )
        return labels
    path = _train_file(data)
    rows = dict(iter_rows(path))  # {"file:line": row}; examples remember their row's place
    keys = []
    for ex in train:
        row = rows.get(ex.source)
        if row is None or split_by not in row:
            raise LorafleetError(f'{ex.source or path}: no field "{split_by}" to split by')
        value = row[split_by]
        keys.append(value if isinstance(value, (str, int, float, bool)) else repr(value))
    return keys


def make_partition(cfg: FedConfig, tokenizer) -> Partition:
    """Load the training split and divide it among `cfg.clients` (seeded, deterministic)."""
    train = load_examples(cfg.data, tokenizer, split="train", chat=cfg.chat, limit=cfg.train_limit)
    spec = cfg.split_spec
    keys = split_keys(train, cfg.data, cfg.split_by) if spec.kind == "dirichlet" else None
    parts = partition(len(train), cfg.clients, spec, cfg.seed, keys)
    hist_keys = keys if keys is not None else [ex.label for ex in train]
    return Partition(parts, label_histogram(parts, hist_keys), train)


def validation_set(cfg: FedConfig, tokenizer) -> ExampleSet | None:
    """The held-out examples the global model is scored on each round (None: none known)."""
    source = cfg.val
    if source is None and cfg.data.strip().lower() in BUILTIN_TASKS:
        source = cfg.data
    if source is None:
        return None
    return load_examples(source, tokenizer, split="validation", chat=cfg.chat, limit=cfg.eval_limit)
