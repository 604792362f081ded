"""Adapter methods by name (lora, rslora, dora, bone, bat, bilora) as PEFT configs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from peft import LoraConfig, MissConfig, PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

from lorafleet.errors import LorafleetError

METHODS = ("lora", "rslora", "dora", "bone", "bat", "bilora")
# Bone / Bat live on in PEFT as MiSS: Bone is its default init (a block-sharing delta, LoRA with
# A fixed to [I_r ... I_r]); Bat (init_weights="bat") is the paper's first form, W' = W (I + b) + b
# per r x r block, and needs every adapted linear's in and out features divisible by r.
MISS_INIT = {"bone": True, "bat": "bat"}
# "A Note on LoRA": adapt every linear layer of the blocks; small ranks suffice.
DEFAULT_RANK = 16
DEFAULT_ALPHA = 32.0


@dataclass
class MethodConfig:
    """What the user chooses; `peft_config()` turns it into PEFT's config object."""

    method: str = "lora"
    rank: int = DEFAULT_RANK
    alpha: float = DEFAULT_ALPHA
    targets: list[str] | None = None  # None = every linear layer of the transformer blocks
    dropout: float = 0.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise LorafleetError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise LorafleetError(f"--rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise LorafleetError(f"--alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LorafleetError(f"--dropout must be in [0, 1), got {self.dropout!r}")
        if self.targets is not None and not self.targets:
            raise LorafleetError("--targets is empty")

    def peft_config(self, default_targets: list[str]) -> PeftConfig:
        targets = list(self.targets or default_targets)
        if self.method in MISS_INIT:
            return MissConfig(
                r=self.rank,
                target_modules=targets,
                miss_dropout=self.dropout,
                init_weights=MISS_INIT[self.method],
                task_type="CAUSAL_LM",
            )
        # BiLoRA trains P diag(lambda) Q (train/bilora.py) and is saved as plain LoRA with
        # B = P diag(lambda), A = Q and alpha = r, so its scale is exactly 1.
        return LoraConfig(
            r=self.rank,
            lora_alpha=float(self.rank) if self.method == "bilora" else self.alpha,
            target_modules=targets,
            lora_dropout=self.dropout,
            use_rslora=self.method == "rslora",
            use_dora=self.method == "dora",
            task_type="CAUSAL_LM",
        )


def parse_targets(text: str | None) -> list[str] | None:
    """`all-linear` (or nothing) means the default; otherwise a comma-separated list."""
    if text is None or text.strip() in ("", "all-linear", "all"):
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def peft_config_from_dict(config: dict) -> PeftConfig:
    """Build PEFT's config class from an adapter_config.json dict, ignoring unknown keys
    (written by newer PEFT versions) the way PEFT itself does."""
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[str(config["peft_type"]).upper()]
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.items() if k in known and k != "peft_type"}
    return cls(**kwargs)
