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


# lambda's own Adam learning rate. Adam moves every coordinate by about its lr per step, whatever
# the gradient's size, and with P, Q orthonormal ||P diag(lambda) Q||_2 = max|lambda|: at the
# run's lr (1e-3) delta W can grow by only ~1e-3 per upper step. A LoRA's B (d_out x r entries,
# each moving by lr) grows ||s B A||_2 by ~0.05 per step at lr 1e-3 on SmolLM2's width (rank 8,
# alpha 16: 1.55 after 32 steps in `bench/bilora_experiment.py --toy`); 5e-2 lets max|lambda|
# grow as fast per upper step. The paper's value is not known here (spec silent, no official code).
LAMBDA_LR = 5e-2


@dataclass(frozen=True)
class BiLoRAConfig:
    """BiLoRA's own settings (ride in TrainConfig.extra, so train_config.json records them).

    lambda_lr: Adam learning rate of every lambda (its own parameter group; P and Q keep the
    run's --lr); the run's warmup / cosine schedule scales it as it scales --lr.
    warm_start: optimizer steps of joint training (P, Q and lambda together, on D1 batches)
    before the alternation starts (0: alternate from the first step, as the paper does).
    """

    bilevel: str = "first"
    bilevel_split: float = 0.8
    ortho_weight: float = 0.1
    lambda_lr: float = LAMBDA_LR
    warm_start: int = 0

    def __post_init__(self):
        if self.bilevel not in BILEVEL:
            raise LorafleetError(
                f"--bilevel must be one of {', '.join(BILEVEL)}, got {self.bilevel!r}"
            )
        if not 0 < self.bilevel_split < 1:
            raise LorafleetError(f"--bilevel-split must be in (0, 1), got {self.bilevel_split}")
        if self.ortho_weight < 0:
            raise LorafleetError(f"--ortho-weight must be >= 0, got {self.ortho_weight}")
        if not self.lambda_lr > 0:
            raise LorafleetError(f"--lambda-lr must be > 0, got {self.lambda_lr}")
        if self.warm_start < 0:
            raise LorafleetError(f"--warm-start must be >= 0, got {self.warm_start}")
        if self.warm_start and self.bilevel == "joint":
            raise LorafleetError("--warm-start applies to --bilevel first | second, not joint")

    @classmethod
    def of(cls, cfg: TrainConfig) -> BiLoRAConfig:
        """The settings recorded in `cfg.extra` (a setting it lacks keeps its default)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: cfg.extra[k] for k in names if k in cfg.extra})


def bilora_options(
    method: str,
    bilevel=None,
    bilevel_split=None,
    ortho_weight=None,
    lambda_lr=None,
    warm_start=None,
) -> dict:
    """TrainConfig.extra for the CLI's BiLoRA options (checked); they need a method trained by
    this module's trainer kind (--method bilora)."""
    from lorafleet.adapters.methods import lookup, with_trainer

    given = {
        "bilevel": bilevel,
        "bilevel_split": bilevel_split,
        "ortho_weight": ortho_weight,
        "lambda_lr": lambda_lr,
        "warm_start": warm_start,
    }
    given = {k: v for k, v in given.items() if v is not None}
    spec = lookup(method)
    if spec is None or spec.trainer != TRAINER_KIND:
        if given:
            flag = "--" + next(iter(given)).replace("_", "-")
            names = " | ".join(with_trainer(TRAINER_KIND))
            raise LorafleetError(f"{flag} applies to --method {names} only")
        return {}
    return asdict(BiLoRAConfig(**given))
