"""The user's choice of method, rank, alpha, targets and dropout, turned into PEFT's config by
the chosen method's module; parsing --targets; PEFT's config class from an adapter_config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorafleet.adapters.methods.base import PeftOptions
from lorafleet.adapters.methods.registry import NAMES, get_method
from lorafleet.errors import LorafleetError

if TYPE_CHECKING:  # a type name only: the CLI reads MethodConfig's defaults without PEFT
    from peft import PeftConfig

# "A Note on LoRA": adapt every linear layer of the blocks; small ranks suffice.
DEFAULT_RANK = 16
DEFAULT_ALPHA = 32.0


@dataclass
class MethodConfig:
    """What the user chooses; `peft_config()` turns it into PEFT's config object."""

    method: str = "lora"
    rank: int = DEFAULT_RANK
    alpha: float = DEFAULT_ALPHA
    targets: list[str] | None = None  # None = every linear layer of the transformer blocks
    dropout: float = 0.0

    def __post_init__(self):
        if self.method not in NAMES:
            raise LorafleetError(f"unknown method {self.method!r}: use one of {', '.join(NAMES)}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise LorafleetError(f"--rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise LorafleetError(f"--alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LorafleetError(f"--dropout must be in [0, 1), got {self.dropout!r}")
        if self.targets is not None and not self.targets:
            raise LorafleetError("--targets is empty")

    def peft_config(self, default_targets: list[str]) -> PeftConfig:
        """The method's PEFT config (adapters/methods/<method>.py) for these choices."""
        targets = list(self.targets or default_targets)
        options = PeftOptions(self.rank, self.alpha, targets, self.dropout)
        return get_method(self.method).peft_config(options)


def parse_targets(text: str | None) -> list[str] | None:
    """`all-linear` (or nothing) means the default; otherwise a comma-separated list."""
    if text is None or text.strip() in ("", "all-linear", "all"):
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def peft_config_from_dict(config: dict) -> PeftConfig:
    """Build PEFT's config class from an adapter_config.json dict, ignoring unknown keys
    (written by newer PEFT versions) the way PEFT itself does."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls = PEFT_TYPE_TO_CONFIG_MAPPING[str(config["peft_type"]).upper()]
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.items() if k in known and k != "peft_type"}
    return cls(**kwargs)
