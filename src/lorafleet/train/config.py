"""The training run's settings as a typed dataclass that checks itself."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorafleet.adapters import METHODS
from lorafleet.errors import LorafleetError
from lorafleet.train.builders import DataConfig, OptimizerConfig

DTYPES = ("fp32", "bf16")


@dataclass
class TrainConfig:
    """One fine-tuning run. `batch_size` is per process and micro-step; the global batch is
    batch_size x grad_accum x world size."""

    base: str
    data: str
    out: Path
    val: str | None = None  # None: the built-in task's validation split, if any
    method: str = "lora"
    rank: int = 16
    alpha: float = 32.0
    targets: list[str] | None = None
    dropout: float = 0.0
    steps: int | None = None
    epochs: float | None = None
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    max_length: int = 512
    on_overflow: str = "truncate"
    packing: bool = False
    seed: int = 0
    dtype: str = "fp32"
    gradient_checkpointing: bool = False
    eval_every: int = 0  # 0 = only at the end
    eval_limit: int | None = 200
    val_metrics: tuple[str, ...] | None = None  # None: the validation set's own metric
    train_limit: int | None = None
    save_every: int = 50
    keep_checkpoints: int = 2
    chat: bool = True
    resume: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.out = Path(self.out)
        if self.method not in METHODS:
            raise LorafleetError(f"unknown --method {self.method!r}: use {', '.join(METHODS)}")
        if self.steps is None and self.epochs is None:
            self.steps = 100
        if self.steps is not None and self.epochs is not None:
            raise LorafleetError("give --steps or --epochs, not both")
        positive = {
            "--steps": self.steps,
            "--epochs": self.epochs,
            "--lr": self.lr,
            "--rank": self.rank,
            "--alpha": self.alpha,
            "--batch-size": self.batch_size,
            "--grad-accum": self.grad_accum,
            "--max-length": self.max_length,
            "--save-every": self.save_every,
            "--keep-checkpoints": self.keep_checkpoints,
        }
        for name, value in positive.items():
            if value is not None and not value > 0:
                raise LorafleetError(f"{name} must be positive, got {value}")
        if not 0 <= self.warmup < 1:
            raise LorafleetError(
                f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}"
            )
        if self.on_overflow not in ("truncate", "drop"):
            raise LorafleetError(
                f"--on-overflow must be truncate or drop, got {self.on_overflow!r}"
            )
        if self.dtype not in DTYPES:
            raise LorafleetError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.eval_every < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise LorafleetError("--eval-every, --max-grad-norm and --weight-decay must be >= 0")

    def data_config(self) -> DataConfig:
        return DataConfig(self.max_length, self.on_overflow, self.packing)

    def optimizer_config(self) -> OptimizerConfig:
        return OptimizerConfig(self.lr, self.weight_decay, self.max_grad_norm)

    def total_steps(self, n_examples: int, global_batch: int) -> int:
        """`steps`, or the steps that cover `epochs` passes over `n_examples`."""
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * n_examples / global_batch))
        return int(self.steps)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d
