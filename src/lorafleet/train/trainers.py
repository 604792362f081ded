"""Which trainer a run uses: its method's trainer kind (declared in adapters/methods/) -> a class.

A method trained through PEFT's own layers (get_peft_model) has kind PEFT_TRAINER and runs on
the plain composable Trainer; a method with its own training declares another kind, which this
table maps to that kind's trainer. No method is named here.
"""

from __future__ import annotations

from lorafleet.adapters.methods import PEFT_TRAINER, get_method
from lorafleet.errors import LorafleetError
from lorafleet.train import bilora
from lorafleet.train.config import TrainConfig
from lorafleet.train.loop import Trainer

TRAINERS: dict[str, type[Trainer]] = {
    PEFT_TRAINER: Trainer,
    bilora.TRAINER_KIND: bilora.BiLoRATrainer,
}


def trainer_for(cfg: TrainConfig, **kw) -> Trainer:
    """The trainer for `cfg.method`'s trainer kind, built with `cfg` (and Trainer's keywords)."""
    kind = get_method(cfg.method).trainer
    if kind not in TRAINERS:
        raise LorafleetError(f"--method {cfg.method}: no trainer of kind {kind!r} in train/")
    return TRAINERS[kind](cfg, **kw)
