"""Fine-tuning: a composable trainer (builders, a pluggable step, in-memory data), checkpoints."""

from lorafleet.train.builders import (
    DataConfig,
    InMemoryExamples,
    OptimizerConfig,
    ParamGroup,
    ScheduleConfig,
    build_data,
    build_model,
    build_optimizer,
    build_scheduler,
    example_set,
    train_only,
)
from lorafleet.train.checkpoint import latest_checkpoint, load_checkpoint
from lorafleet.train.config import TrainConfig
from lorafleet.train.distributed import Distributed
from lorafleet.train.loop import Trainer
from lorafleet.train.step import (
    Batch,
    Batches,
    LanguageModelStep,
    StepOutput,
    StepResult,
    StepRunner,
    TrainStep,
)

__all__ = [
    "Batch",
    "Batches",
    "DataConfig",
    "Distributed",
    "InMemoryExamples",
    "LanguageModelStep",
    "OptimizerConfig",
    "ParamGroup",
    "ScheduleConfig",
    "StepOutput",
    "StepResult",
    "StepRunner",
    "TrainConfig",
    "TrainStep",
    "Trainer",
    "build_data",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "example_set",
    "latest_checkpoint",
    "load_checkpoint",
    "train_only",
]
