"""BiLoRA's own training settings and the trainer kind that runs them (light: the CLI reads their
defaults without importing torch; the trainer itself is in train/bilora.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from lorafleet.adapters.methods.base import BILEVEL_TRAINER
from lorafleet.errors import LorafleetError

if TYPE_CHECKING:
    from lorafleet.train.config import TrainConfig

# The trainer kind a method declares (adapters/methods/) to be trained by BiLoRATrainer.
TRAINER_KIND = BILEVEL_TRAINER
BILEVEL = ("first", "second", "joint")


@dataclass(frozen=True)
class BiLoRAConfig:
    """BiLoRA's own settings (ride in TrainConfig.extra, so train_config.json records them)."""

    bilevel: str = "first"
    bilevel_split: float = 0.8
    ortho_weight: float = 0.1

    def __post_init__(self):
        if self.bilevel not in BILEVEL:
            raise LorafleetError(
                f"--bilevel must be one of {', '.join(BILEVEL)}, got {self.bilevel!r}"
            )
        if not 0 < self.bilevel_split < 1:
            raise LorafleetError(f"--bilevel-split must be in (0, 1), got {self.bilevel_split}")
        if self.ortho_weight < 0:
            raise LorafleetError(f"--ortho-weight must be >= 0, got {self.ortho_weight}")

    @classmethod
    def of(cls, cfg: TrainConfig) -> BiLoRAConfig:
        """The settings recorded in `cfg.extra` (a setting it lacks keeps its default)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: cfg.extra[k] for k in names if k in cfg.extra})


def bilora_options(method: str, bilevel=None, bilevel_split=None, ortho_weight=None) -> dict:
    """TrainConfig.extra for the CLI's BiLoRA options (checked); they need a method trained by
    this module's trainer kind (--method bilora)."""
    from lorafleet.adapters.methods import lookup, with_trainer

    given = {"bilevel": bilevel, "bilevel_split": bilevel_split, "ortho_weight": ortho_weight}
    given = {k: v for k, v in given.items() if v is not None}
    spec = lookup(method)
    if spec is None or spec.trainer != TRAINER_KIND:
        if given:
            flag = "--" + next(iter(given)).replace("_", "-")
            names = " | ".join(with_trainer(TRAINER_KIND))
            raise LorafleetError(f"{flag} applies to --method {names} only")
        return {}
    return asdict(BiLoRAConfig(**given))
