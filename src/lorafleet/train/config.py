"""The training run's settings as typed dataclasses that check themselves: TrainConfig and the
builders' small configs (light: the CLI reads their defaults without importing torch)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorafleet.adapters import METHODS, MethodConfig
from lorafleet.errors import LorafleetError
from lorafleet.models.device import check_device


@dataclass(frozen=True)
class DataConfig:
    """How examples become token sequences."""

    max_length: int = 512
    on_overflow: str = "truncate"
    packing: bool = False

    def __post_init__(self):
        if self.max_length < 2:
            raise LorafleetError(f"max_length must be >= 2, got {self.max_length}")
        if self.on_overflow not in ("truncate", "drop"):
            raise LorafleetError(f"on_overflow must be truncate or drop, got {self.on_overflow!r}")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW's defaults for every parameter group that does not set its own, and clipping."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping

    def __post_init__(self):
        if not self.lr > 0:
            raise LorafleetError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise LorafleetError("weight_decay and max_grad_norm must be >= 0")


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup over `warmup` x total_steps, then cosine decay to zero."""

    total_steps: int
    warmup: float = 0.05

    def __post_init__(self):
        if self.total_steps < 1:
            raise LorafleetError(f"total_steps must be positive, got {self.total_steps}")
        if not 0 <= self.warmup < 1:
            raise LorafleetError(f"warmup is a fraction in [0, 1), got {self.warmup}")


DTYPES = ("fp32", "bf16")
DEFAULT_STEPS = 100  # when neither steps nor epochs is given


@dataclass
class TrainConfig:
    """One fine-tuning run. `batch_size` is per process and micro-step; the global batch is
    batch_size x grad_accum x world size. The adapter's own settings (method, rank, alpha,
    targets, dropout) default to the adapter method's (adapters.MethodConfig); `lorafleet
    train` reads every default from here."""

    base: str
    data: str
    out: Path
    val: str | None = None  # None: the built-in task's validation split, if any
    method: str = MethodConfig.method
    rank: int = MethodConfig.rank
    alpha: float = MethodConfig.alpha
    targets: list[str] | None = MethodConfig.targets  # None: every linear layer of the blocks
    dropout: float = MethodConfig.dropout
    steps: int | None = None
    epochs: float | None = None
    # The optimizer's, schedule's and data's settings keep their one default in their own
    # configs (OptimizerConfig, ScheduleConfig, DataConfig above); a run reads them from there.
    lr: float = OptimizerConfig.lr
    weight_decay: float = OptimizerConfig.weight_decay
    warmup: float = ScheduleConfig.warmup  # fraction of the steps
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = OptimizerConfig.max_grad_norm
    max_length: int = DataConfig.max_length
    on_overflow: str = DataConfig.on_overflow
    packing: bool = DataConfig.packing
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
    # auto | cpu | cuda (models/device.py): auto = CUDA when torch sees a GPU, as before the
    # option; under torchrun, cuda is each process's LOCAL_RANK GPU (train/distributed.py).
    device: str = "auto"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.out = Path(self.out)
        self.device = check_device(self.device)
        if self.method not in METHODS:
            raise LorafleetError(f"unknown --method {self.method!r}: use {', '.join(METHODS)}")
        if self.steps is None and self.epochs is None:
            self.steps = DEFAULT_STEPS
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
