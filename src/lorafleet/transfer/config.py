"""The configs of `transfer prepare` and `transfer run` (light: the CLI reads their defaults)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lorafleet.transfer.rejection import RejectionConfig
from lorafleet.transfer.task import TransferError

CAP_FACTOR = 10  # default cap on candidates drawn: 10 x K (an accept rate down to 0.1 reaches K)


# Trans-LoRA's discriminator needs enough of each class to tell them apart: at least this many
# real and as many synthetic training rows (issue 29; 32 + 32 gave 0.56-0.75 held-out accuracy).
MIN_DISC_ROWS = 128


@dataclass
class PrepareConfig:
    """`transfer prepare`: the kit's seeds and its discriminator (trained on `real` real +
    `real` synthetic inputs, its accuracy measured on `held_out` more of each)."""

    base: str
    adapter: Path
    data: str
    out: Path
    seeds: int = 5
    real: int = MIN_DISC_ROWS  # real inputs the discriminator trains on (as many synthetic)
    disc_steps: int = 60
    disc_rank: int = 8
    disc_lr: float = 1e-3
    batch_size: int = 8
    held_out: int = 32  # more inputs of each class, never trained on, for the reported accuracy
    temperature: float = 0.9
    max_new_tokens: int = 96
    chat: bool = True
    seed: int = 0
    overwrite: bool = False

    def check(self) -> None:
        if self.seeds < 1:
            raise TransferError(f"--seeds must be >= 1, got {self.seeds}")
        if self.real < MIN_DISC_ROWS:
            raise TransferError(
                f"--real must be >= {MIN_DISC_ROWS} (the discriminator trains on at least "
                f"{MIN_DISC_ROWS} real + {MIN_DISC_ROWS} synthetic inputs), got {self.real}"
            )
        if self.held_out < 1:
            raise TransferError(f"--held-out must be >= 1 (inputs per class), got {self.held_out}")
        out = Path(self.out)
        if out.exists() and any(out.iterdir()) and not self.overwrite:
            raise TransferError(f"{out} exists and is not empty; pass --overwrite or another --out")


@dataclass
class RunConfig:
    """`transfer run`: K = `synthetic` rows for the target LoRA; with `filter`, candidates are
    drawn and judged until K pass or `max_candidates` (default CAP_FACTOR x K) were drawn."""

    kit: Path
    target_base: str
    synthetic: int  # K: the rows the target LoRA trains on (with the filter: K that passed)
    out: Path
    source_base: str | None = None  # None: the base named in the kit
    source_adapter: Path | None = None  # None: the path recorded in the kit
    filter: bool = True
    threshold: float = 0.5  # keep an input when the discriminator's P(real) >= this
    max_candidates: int | None = None  # the cap on candidates drawn; None: CAP_FACTOR x K
    chat: bool | None = None  # None: as the kit was prepared
    steps: int = 100
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-3
    batch_size: int = 8
    temperature: float = 0.9
    max_new_tokens: int = 96  # per synthetic input
    label_tokens: int = 64  # per teacher reply (generation tasks)
    seed: int = 0
    candidates: Path | None = None  # a generated.jsonl to reuse instead of generating

    def check(self) -> None:
        if self.synthetic < 1:
            raise TransferError(f"--synthetic must be >= 1, got {self.synthetic}")
        if self.max_candidates is not None and self.max_candidates < self.synthetic:
            raise TransferError(
                f"--max-candidates ({self.max_candidates}) must be >= --synthetic "
                f"({self.synthetic})"
            )
        if not 0 <= self.threshold <= 1:
            raise TransferError(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.steps < 1 or self.rank < 1 or self.batch_size < 1 or not self.lr > 0:
            raise TransferError("--steps, --rank, --batch-size and --lr must be positive")

    @property
    def cap(self) -> int:
        return self.max_candidates or CAP_FACTOR * self.synthetic

    def rejection(self, cap: int | None = None) -> RejectionConfig:
        return RejectionConfig(
            k=self.synthetic,
            max_generated=self.cap if cap is None else cap,
            threshold=self.threshold,
            chunk=self.batch_size,
        )

    def settings(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("kit", "out", "source_adapter")}
        return json.loads(json.dumps(d, default=str))
