"""A federated run's settings as a typed dataclass that checks itself (simulation and Flower)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

from lorafleet.errors import LorafleetError
from lorafleet.fed.aggregate import AGGREGATIONS
from lorafleet.fed.partition import SplitSpec

FED_METHODS = ("lora", "rslora")  # the residual math needs plain B @ A updates


@dataclass
class FedConfig:
    """N clients x R rounds x S local steps on partitions of one data set. Each round every
    client starts from the global model, trains S steps with a fresh AdamW (as the FedEx-LoRA
    reference does), and the server aggregates with `aggregation`."""

    base: str
    data: str
    out: Path
    clients: int = 4
    rounds: int = 3
    local_steps: int = 10
    aggregation: str = "fedex"
    split: str = "iid"
    split_by: str = "label"  # "label", or a field of the data rows
    val: str | None = None  # None: the built-in task's validation split, if any
    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] | None = None
    lr: float = 1e-3
    batch_size: int = 8
    max_length: int = 512
    warmup: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_limit: int | None = 200
    train_limit: int | None = None
    min_clients: int = 1
    client_timeout: float | None = None  # seconds per client and round
    norm_bound: float = 10.0  # drop a client whose update norm is over this x the median
    save_clients: bool = False
    chat: bool = True
    resume: bool = False

    def __post_init__(self):
        self.out = Path(self.out)
        if self.aggregation not in AGGREGATIONS:
            raise LorafleetError(
                f"unknown --aggregation {self.aggregation!r}: use {', '.join(AGGREGATIONS)}"
            )
        if self.method not in FED_METHODS:
            raise LorafleetError(
                f"--method {self.method!r} cannot be federated here: use {', '.join(FED_METHODS)}"
            )
        SplitSpec.parse(self.split)  # raises on a bad value
        positive = {
            "--clients": self.clients,
            "--rounds": self.rounds,
            "--local-steps": self.local_steps,
            "--rank": self.rank,
            "--alpha": self.alpha,
            "--lr": self.lr,
            "--batch-size": self.batch_size,
            "--max-length": self.max_length,
            "--min-clients": self.min_clients,
        }
        for name, value in positive.items():
            if not value > 0:
                raise LorafleetError(f"{name} must be positive, got {value}")
        if self.min_clients > self.clients:
            raise LorafleetError(
                f"--min-clients {self.min_clients} is more than --clients {self.clients}"
            )
        if not 0 <= self.warmup < 1:
            raise LorafleetError(f"--warmup is a fraction in [0, 1), got {self.warmup}")
        if self.max_grad_norm < 0 or self.norm_bound < 0:
            raise LorafleetError("--max-grad-norm and --norm-bound must be >= 0")
        if self.client_timeout is not None and not self.client_timeout > 0:
            raise LorafleetError(f"--client-timeout must be positive, got {self.client_timeout}")
        for name, value in (("--eval-limit", self.eval_limit), ("--train-limit", self.train_limit)):
            if value is not None and value < 1:
                raise LorafleetError(f"{name} must be positive, got {value}")

    @property
    def split_spec(self) -> SplitSpec:
        return SplitSpec.parse(self.split)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d

    # What must not change when a run is resumed (the rest, e.g. rounds, may).
    RESUME_KEYS = (
        "base",
        "data",
        "clients",
        "aggregation",
        "split",
        "split_by",
        "method",
        "rank",
        "alpha",
        "targets",
        "seed",
        "train_limit",
        "chat",
    )

    def to_flower(self) -> dict:
        """The run config Flower carries (TOML values: no None, no lists)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "targets":
                value = ",".join(value or [])
            elif value is None:
                value = 0 if f.name in ("eval_limit", "train_limit", "client_timeout") else ""
            elif isinstance(value, Path):
                value = str(value)
            out[f.name.replace("_", "-")] = value
        return out

    @classmethod
    def from_flower(cls, config: dict) -> FedConfig:
        """Inverse of `to_flower` (unknown keys are ignored)."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            key = f.name.replace("_", "-")
            if key not in config:
                continue
            value = config[key]
            if f.name == "targets":
                value = [t for t in str(value).split(",") if t] or None
            elif f.name in ("eval_limit", "train_limit", "client_timeout", "val") and not value:
                value = None
            kwargs[f.name] = value
        return cls(**kwargs)
