"""A federated run's settings as a typed dataclass that checks itself (simulation and Flower),
with the aggregation rules' names and the parsed `--split`; light (no torch, no numpy), so the
CLI reads its defaults without importing the model stack."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

from lorafleet.adapters.methods import NAMES, PEFT_TRAINER, get_method
from lorafleet.errors import LorafleetError

# The aggregation rules by name (fed.aggregate implements them).
AGGREGATIONS = ("fedex", "fedavg", "ffa")


@dataclass(frozen=True)
class SplitSpec:
    """A parsed `--split` value: kind "iid" or "dirichlet", with ALPHA for the latter."""

    kind: str
    alpha: float | None = None

    def __post_init__(self):
        if self.kind not in ("iid", "dirichlet"):
            raise LorafleetError(f"unknown split kind {self.kind!r}: use iid or dirichlet:ALPHA")
        if self.kind == "dirichlet" and not (self.alpha is not None and self.alpha > 0):
            raise LorafleetError(f"dirichlet:ALPHA needs a positive ALPHA, got {self.alpha!r}")

    @classmethod
    def parse(cls, text: str) -> SplitSpec:
        text = text.strip().lower()
        if text == "iid":
            return cls("iid")
        kind, _, alpha = text.partition(":")
        if kind != "dirichlet" or not alpha:
            raise LorafleetError(f"--split {text!r}: use iid or dirichlet:ALPHA (e.g. 0.5)")
        try:
            return cls("dirichlet", float(alpha))
        except ValueError:
            raise LorafleetError(f"--split {text!r}: ALPHA must be a number") from None

    def __str__(self) -> str:
        return "iid" if self.kind == "iid" else f"dirichlet:{self.alpha:g}"


# The residual math needs plain s * B @ A updates, trained through PEFT's layers by each client.
FED_METHODS = tuple(
    m.name for m in map(get_method, NAMES) if m.factored and m.trainer == PEFT_TRAINER
)


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
