"""What `lorafleet demo` trains and evaluates: one plan per task, full and --quick sizes."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lorafleet.errors import LorafleetError


@dataclass(frozen=True)
class TaskPlan:
    """One task adapter: how it is trained and on how many held-out rows it is scored."""

    task: str
    steps: int
    batch_size: int
    lr: float
    max_length: int
    eval_limit: int
    max_new_tokens: int = 32  # generation tasks (the trainer's validation uses 32 too)
    rank: int = 16
    alpha: float = 32.0
    train_limit: int | None = None

    def __post_init__(self):
        for what in ("steps", "batch_size", "max_length", "eval_limit", "max_new_tokens", "rank"):
            value = getattr(self, what)
            if not isinstance(value, int) or value < 1:
                raise LorafleetError(f"demo plan {self.task}: {what} must be >= 1, got {value!r}")

    def key(self) -> dict:
        """What decides whether a cached adapter / cached figures still fit this plan."""
        return asdict(self)


# Sized so each task trains in a few minutes on 2 CPU cores (about 2 s per step of 8 rows).
FULL = {
    "sst2": TaskPlan("sst2", steps=80, batch_size=8, lr=5e-4, max_length=128, eval_limit=150),
    "strategyqa": TaskPlan(
        "strategyqa", steps=80, batch_size=8, lr=5e-4, max_length=128, eval_limit=150
    ),
    "clutrr": TaskPlan("clutrr", steps=100, batch_size=4, lr=5e-4, max_length=320, eval_limit=50),
}
# --quick (CI's end-to-end test): the whole pipeline in a minute or two, figures meaningless.
QUICK = {
    name: TaskPlan(
        name,
        steps=2,
        batch_size=2,
        lr=5e-4,
        max_length=96,
        eval_limit=4,
        max_new_tokens=8,
        train_limit=16,
    )
    for name in FULL
}


def plans(tasks: list[str] | None, quick: bool) -> list[TaskPlan]:
    table = QUICK if quick else FULL
    tasks = tasks or list(table)
    unknown = [t for t in tasks if t not in table]
    if unknown:
        raise LorafleetError(f"unknown demo task {unknown[0]!r}: choose from {', '.join(table)}")
    return [table[t] for t in tasks]
