"""Fine-tuning: the training loop, resumable checkpoints, data parallelism."""

from lorafleet.train.checkpoint import latest_checkpoint, load_checkpoint
from lorafleet.train.config import TrainConfig
from lorafleet.train.loop import Trainer

__all__ = ["TrainConfig", "Trainer", "latest_checkpoint", "load_checkpoint"]
