"""One optimizer step, with the loss pluggable: the `TrainStep` protocol and its runner.

A `TrainStep` says which parameter groups the optimizer gets and, given the model and a
micro-batch, returns the loss (optionally with extra figures to log). `StepRunner` does the
rest the same way for every step: the data order (a pure function of seed and step), micro-
batches, the gradient sum across data-parallel ranks, clipping and the optimizer update.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from lorafleet.data import Collator, Encoded
from lorafleet.errors import LorafleetError
from lorafleet.train.builders import ParamGroup
from lorafleet.train.distributed import Distributed
from lorafleet.train.order import global_batch, rank_slice


@dataclass
class Batch:
    """One micro-batch of one optimizer step, on the training device.

    The gradients of all micro-batches on all ranks are summed, so a step's loss should be its
    share of the global batch's loss: the language-model loss is normalised by `num_items`
    (target tokens in the whole global batch), and a per-batch term is weighted by `share`."""

    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, labels: [batch, length]
    num_items: int  # target tokens in the global batch (all micro-batches, all ranks)
    share: float  # this micro-batch's fraction of the global batch's examples
    step: int  # the optimizer step (0-based)


@dataclass
class StepOutput:
    """A step's loss plus figures to log (each logged as its share-weighted mean)."""

    loss: torch.Tensor
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class TrainStep(Protocol):
    """What a caller plugs into the trainer to change what is trained and how."""

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        """The parameters to train, in groups (each may set its own lr); the rest are frozen."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor | StepOutput:
        """This micro-batch's contribution to the step's loss (backpropagated by the runner)."""
        ...


class LanguageModelStep:
    """The default step: next-token loss on the target tokens; every trainable parameter in
    one group at the run's learning rate."""

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        return [ParamGroup("trainable", [p for p in model.parameters() if p.requires_grad])]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        # transformers divides the summed token NLL by num_items_in_batch.
        return model(**batch.inputs, num_items_in_batch=batch.num_items).loss


def target_tokens(e: Encoded) -> int:
    """Tokens of `e` the loss is on (position 0 is never predicted)."""
    return sum(1 for label in e.labels[1:] if label != -100)


class Batches:
    """The micro-batches of every optimizer step: which examples is a pure function of
    (seed, step), so resuming needs no iterator state and all ranks agree on the global batch."""

    def __init__(
        self,
        data: Sequence[Encoded],
        *,
        batch_size: int,
        pad_token_id: int | None,
        grad_accum: int = 1,
        seed: int = 0,
        dist: Distributed | None = None,
    ):
        if not data:
            raise LorafleetError("no training examples to batch")
        if batch_size < 1 or grad_accum < 1:
            raise LorafleetError("batch_size and grad_accum must be positive")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.dist = dist or Distributed()
        self.global_size = batch_size * grad_accum * self.dist.world
        self.collate = Collator(pad_token_id)

    def __len__(self) -> int:
        return len(self.data)

    def for_step(self, step: int) -> Iterator[Batch]:
        """This rank's micro-batches of global batch `step`."""
        indices = global_batch(len(self.data), self.global_size, step, self.seed)
        num_items = max(1, sum(target_tokens(self.data[i]) for i in indices))
        mine = rank_slice(indices, self.dist.rank, self.dist.world)
        for start in range(0, len(mine), self.batch_size):
            chunk = mine[start : start + self.batch_size]
            inputs = self.collate([self.data[i] for i in chunk])
            inputs = {k: v.to(self.dist.device) for k, v in inputs.items()}
            yield Batch(inputs, num_items, len(chunk) / len(indices), step)


@dataclass
class StepResult:
    loss: float  # the step's loss summed over micro-batches and ranks
    grad_norm: float  # before clipping
    tokens: int  # input tokens (this rank's x world size)
    logs: dict[str, float]  # the step's extra figures, share-weighted means


class StepRunner:
    """Runs optimizer steps: forward/backward every micro-batch through `step.loss`, sum the
    trainable gradients across ranks (one all-reduce), clip, update, advance the schedule."""

    def __init__(
        self,
        model: nn.Module,
        step: TrainStep,
        batches: Batches,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        max_grad_norm: float = 1.0,
        autocast: AbstractContextManager | None = None,
    ):
        self.model, self.step, self.batches = model, step, batches
        self.optimizer, self.scheduler = optimizer, scheduler
        self.max_grad_norm = max_grad_norm
        self.autocast = autocast or nullcontext()
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def __call__(self, step: int) -> StepResult:
        dist = self.batches.dist
        loss_sum = torch.zeros((), device=dist.device)
        figures: dict[str, torch.Tensor] = {}
        input_tokens = 0
        for batch in self.batches.for_step(step):
            with self.autocast:
                out = self.step.loss(self.model, batch)
            out = out if isinstance(out, StepOutput) else StepOutput(out)
            out.loss.backward()
            loss_sum += out.loss.detach().float()
            for name, value in out.logs.items():
                value = torch.as_tensor(value, dtype=torch.float32, device=dist.device)
                figures[name] = figures.get(name, 0.0) + batch.share * value.detach()
            input_tokens += int(batch.inputs["attention_mask"].sum())
        names = sorted(figures)  # every rank logs the same names, so the order agrees
        grads = [p.grad for p in self.params if p.grad is not None]
        dist.sum_(grads + [loss_sum] + [figures[n] for n in names])
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        logs = {n: float(figures[n]) for n in names}
        return StepResult(float(loss_sum), float(norm), input_tokens * dist.world, logs)
