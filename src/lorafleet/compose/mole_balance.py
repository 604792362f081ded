"""Task-balanced gate training for MoLE: batches drawn evenly per task, loss = mean over tasks of
the mean over their rows of each row's mean token loss (so long answers do not outweigh short)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from lorafleet.data.encode import Collator, Encoded
from lorafleet.train import Batch

IGNORE_INDEX = -100
TASK_KEY = "task_ids"  # the batch's [B] task index per row, taken out before the forward


def task_slots(
    counts: Sequence[int], batch_size: int, step: int, seed: int
) -> list[tuple[int, int]]:
    """Step `step`'s rows as (task, row index within the task), a pure function of its arguments.

    Position p = step * batch_size + i goes to task p % T (so every batch holds the tasks as
    evenly as its size allows) and to that task's j-th draw, j = p // T: each task's rows are
    shuffled once per pass over them (pass j // n_t, seeded by (seed, task, pass))."""
    if not counts or min(counts) < 1:
        raise ValueError("every task needs at least one training row")
    T, out = len(counts), []
    for p in range(step * batch_size, (step + 1) * batch_size):
        t, j = p % T, p // T
        n = counts[t]
        gen = torch.Generator().manual_seed(((seed * 1_000_003 + t) * 1_000_003) + j // n)
        out.append((t, int(torch.randperm(n, generator=gen)[j % n])))
    return out


class TaskBatches:
    """The Batches interface StepRunner uses (`for_step`, `dist`), over per-task rows: each
    step draws `batch_size` rows evenly across the tasks (`task_slots`) and yields one
    micro-batch per task present (padded to that task's longest row only, so a short-answer
    task's rows are not padded to a long one's), each with share 1 / (tasks present): the
    step's summed loss is then the mean over its tasks. Inputs carry TASK_KEY ([B] long)."""

    def __init__(
        self,
        tasks: Sequence[Sequence[Encoded]],
        *,
        batch_size: int,
        pad_token_id: int | None,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        from lorafleet.train import Distributed

        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.tasks, self.batch_size, self.seed = [list(t) for t in tasks], batch_size, seed
        self.counts = [len(t) for t in self.tasks]
        self.dist = Distributed(device=torch.device(device))
        self.collate = Collator(pad_token_id)

    def __len__(self) -> int:
        return sum(self.counts)

    def for_step(self, step: int) -> Iterator[Batch]:
        picks = task_slots(self.counts, self.batch_size, step, self.seed)
        present = sorted({t for t, _ in picks})
        for task in present:
            rows = [self.tasks[t][i] for t, i in picks if t == task]
            inputs = self.collate(rows)
            inputs[TASK_KEY] = torch.full((len(rows),), task, dtype=torch.long)
            inputs = {k: v.to(self.dist.device) for k, v in inputs.items()}
            num_items = int((inputs["labels"] != IGNORE_INDEX).sum())
            yield Batch(inputs, max(1, num_items), 1.0 / len(present), step)


def row_losses(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """[B] each row's mean next-token loss over its target tokens (labels != -100).

    Only the target positions go through the output head (logits_to_keep, a [B, L] bool mask
    of the positions that predict a target): the vocabulary projection is most of the cost."""
    labels = inputs["labels"]  # [B, L]
    targets = labels[:, 1:] != IGNORE_INDEX  # [B, L-1]: position p predicts token p+1
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets
    out = model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=keep
    )
    logits = out.logits.reshape(-1, out.logits.shape[-1])  # [N, V], rows in row-major order
    nll = nn.functional.cross_entropy(logits.float(), labels[:, 1:][targets], reduction="none")
    rows = targets.nonzero()[:, 0]  # [N] the row of each target
    per_row = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device)
    per_row = per_row.index_add(0, rows, nll)
    return per_row / targets.sum(1).clamp_min(1).to(nll.dtype)


def task_balanced(row_loss: Tensor, task_ids: Tensor | None) -> tuple[Tensor, dict[int, Tensor]]:
    """(mean over the tasks present of the mean of their rows' losses, {task: that mean}).

    row_loss: [B]; task_ids: [B] (None: one task). Every task weighs the same whatever its
    answers' length or its number of rows in the batch."""
    if task_ids is None:
        task_ids = torch.zeros_like(row_loss, dtype=torch.long)
    per_task = {int(t): row_loss[task_ids == t].mean() for t in torch.unique(task_ids)}
    return torch.stack(list(per_task.values())).mean(), per_task
