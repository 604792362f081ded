"""Small builders a training recipe composes: data, model, parameter groups, optimizer, schedule.

Each takes a small typed config that checks itself (torchtune's manner), so a caller (the
`lorafleet train` recipe, a federated client, BiLoRA, MoLE, Trans-LoRA) builds only the pieces
it needs and the rest of the loop stays shared.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafleet.adapters import MethodConfig, new_adapter
from lorafleet.data import DataError, Encoded, Example, ExampleSet, encode_all, load_examples, pack
from lorafleet.data.examples import ACCURACY, EXACT_MATCH
from lorafleet.errors import LorafleetError
from lorafleet.train.config import DataConfig, OptimizerConfig, ScheduleConfig

# What a caller may hand the trainer instead of a path: an ExampleSet, Example objects, or
# rows shaped like a data file's (prompt/completion, messages, text/label, question/choices).
InMemoryExamples = ExampleSet | Sequence[Example] | Sequence[dict]


# --- configs (DataConfig, OptimizerConfig, ScheduleConfig: in train/config.py) ------------
@dataclass
class ParamGroup:
    """Parameters the optimizer updates together; lr / weight_decay None take the run's."""

    name: str
    params: list[nn.Parameter]
    lr: float | None = None
    weight_decay: float | None = None

    def __post_init__(self):
        self.params = list(self.params)
        if not self.params:
            raise LorafleetError(f"parameter group {self.name!r} has no parameters")
        if self.lr is not None and not self.lr > 0:
            raise LorafleetError(f"parameter group {self.name!r}: lr must be positive")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise LorafleetError(f"parameter group {self.name!r}: weight_decay must be >= 0")


# --- data --------------------------------------------------------------------------------------
def example_set(
    examples: InMemoryExamples,
    tokenizer: Any,
    *,
    name: str,
    chat: bool = True,
    limit: int | None = None,
) -> ExampleSet:
    """In-memory examples as an ExampleSet. Dict rows are read exactly as the same rows in a
    .jsonl file would be (same shapes, chat template and errors, located as `name[i]`)."""
    if isinstance(examples, ExampleSet):
        return ExampleSet(
            examples.examples[:limit], examples.name, examples.metric, examples.answer_marker
        )
    items = list(examples)[:limit]
    if not items:
        raise DataError(f"{name}: no examples given")
    if all(isinstance(e, Example) for e in items):
        metric = ACCURACY if all(e.choices for e in items) else EXACT_MATCH
        return ExampleSet(items, name, metric)
    if all(isinstance(e, dict) for e in items):
        return _rows_set(items, tokenizer, name=name, chat=chat)
    kinds = sorted({type(e).__name__ for e in items})
    raise DataError(
        f"{name}: examples must be all Example objects or all dict rows, found {', '.join(kinds)}"
    )


def _rows_set(rows: list[dict], tokenizer: Any, *, name: str, chat: bool) -> ExampleSet:
    with tempfile.TemporaryDirectory(prefix="lorafleet-rows-") as tmp:
        path = Path(tmp) / "rows.jsonl"
        try:
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        except TypeError as exc:
            raise DataError(f"{name}: rows must hold JSON values only ({exc})") from exc
        try:
            loaded = load_examples(path, tokenizer, chat=chat)
        except DataError as exc:  # "/tmp/.../rows.jsonl:3: ..." -> "name[2]: ..."
            raise DataError(_relocate(str(exc), path, name)) from None
    examples = [dataclasses.replace(e, source=_relocate(e.source, path, name)) for e in loaded]
    return ExampleSet(examples, name, loaded.metric, loaded.answer_marker)


def _relocate(text: str, path: Path, name: str) -> str:
    prefix = f"{path}:"
    if not text.startswith(prefix):
        return text.replace(str(path), name)
    line, colon, rest = text[len(prefix) :].partition(":")
    where = f"{name}[{int(line) - 1}]" if line.isdigit() else name
    return f"{where}{colon}{rest}"


def build_data(
    examples: ExampleSet | Sequence[Example], tokenizer: Any, cfg: DataConfig
) -> tuple[list[Encoded], dict]:
    """Token sequences to train on (loss on targets only; packed when asked) and their stats."""
    encoded, stats = encode_all(examples, tokenizer, cfg.max_length, on_overflow=cfg.on_overflow)
    sequences = pack(encoded, cfg.max_length) if cfg.packing else encoded
    if not sequences:
        name = getattr(examples, "name", "the examples")
        raise LorafleetError(f"{name}: no training examples left after length handling")
    return sequences, stats


# --- model and optimizer -----------------------------------------------------------------------
ModelBuilder = Callable[[nn.Module, Any], nn.Module]


def build_model(base_model: nn.Module, cfg: Any) -> nn.Module:
    """A fresh adapter of `cfg`'s method over `base_model` (a TrainConfig), in train mode."""
    method = MethodConfig(cfg.method, cfg.rank, cfg.alpha, cfg.targets, cfg.dropout)
    model = new_adapter(base_model, method)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def train_only(model: nn.Module, groups: Sequence[ParamGroup]) -> None:
    """Make exactly the groups' parameters trainable (each in one group only); freeze the rest."""
    chosen: dict[int, str] = {}
    for group in groups:
        for p in group.params:
            if id(p) in chosen:
                raise LorafleetError(
                    f"a parameter is in both group {chosen[id(p)]!r} and {group.name!r}"
                )
            chosen[id(p)] = group.name
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise LorafleetError(f"parameter group names repeat: {', '.join(names)}")
    known = {id(p) for p in model.parameters()}
    if not set(chosen) <= known:
        raise LorafleetError("a parameter group holds parameters the model does not have")
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)


def build_optimizer(groups: Sequence[ParamGroup], cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over the groups; each group keeps its name (shown in logs and checkpoints)."""
    torch_groups = [
        {
            "name": g.name,
            "params": g.params,
            "lr": cfg.lr if g.lr is None else g.lr,
            "weight_decay": cfg.weight_decay if g.weight_decay is None else g.weight_decay,
        }
        for g in groups
    ]
    return torch.optim.AdamW(torch_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_lambda(total: int, warmup: float) -> Callable[[int], float]:
    """Linear warmup over `warmup` x total steps, then cosine decay to zero."""
    warm = int(round(warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """The warmup-then-cosine factor applied to every group's own lr."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.total_steps, cfg.warmup))
