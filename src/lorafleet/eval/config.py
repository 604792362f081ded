"""How `evaluate` and `lorafleet eval` score: the metric names and EvalConfig (no torch here, so
the CLI can read its defaults without importing the model stack)."""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.errors import LorafleetError

METRICS = ("accuracy", "exact_match", "contains", "perplexity")


@dataclass(frozen=True)
class EvalConfig:
    """How `evaluate` scores: its metrics (None: the data set's own and perplexity), rows per
    forward pass, new tokens per generated answer and tokens per row (prompt + target)."""

    metrics: tuple[str, ...] | None = None
    batch_size: int = 16
    max_new_tokens: int = 32
    max_length: int = 1024

    def __post_init__(self):
        unknown = [m for m in self.metrics or () if m not in METRICS]
        if unknown:
            raise LorafleetError(f"unknown metric {unknown[0]!r}: use {', '.join(METRICS)}")
        for name in ("batch_size", "max_new_tokens", "max_length"):
            if not getattr(self, name) >= 1:
                raise LorafleetError(f"{name} must be >= 1, got {getattr(self, name)!r}")
