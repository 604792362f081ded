"""train.trainer_for: the trainer comes from the method's declared trainer kind."""

from __future__ import annotations

import pytest

from lorafleet.adapters.methods import NAMES, PEFT_TRAINER, get_method
from lorafleet.train import TrainConfig, Trainer, trainer_for
from lorafleet.train.bilora import BiLoRATrainer
from lorafleet.train.trainers import TRAINERS


@pytest.mark.parametrize("name", NAMES)
def test_trainer_for_follows_the_methods_trainer_kind(name, tmp_path):
    trainer = trainer_for(TrainConfig(base="b", data="d", out=tmp_path, method=name))
    kind = get_method(name).trainer
    assert type(trainer) is TRAINERS[kind]
    assert (type(trainer) is Trainer) == (kind == PEFT_TRAINER)
    assert isinstance(trainer, BiLoRATrainer) == (name == "bilora")
