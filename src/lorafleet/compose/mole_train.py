"""`lorafleet mole train`: train only MoLE's gates (experts and base frozen) on mixed-task data.

Task-balanced (mole_balance): every step's rows are drawn evenly across the --data sources and
the task loss is the mean over tasks of their rows' mean token loss, so a task with long answers
does not outweigh one with two-token answers. The trainer's step runner (train/step.py) does
each step with `MoleStep` as its TrainStep;
checkpoints here hold the gates + optimizer + scheduler + RNG (the Trainer's own checkpoints
snapshot a PEFT adapter, which a MoLE model does not have), and resume replays the same order.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorafleet.compose.mole import MoleError, attach_mole, read_experts, save_mole
from lorafleet.compose.mole_balance import TASK_KEY, TaskBatches, row_losses, task_balanced
from lorafleet.data import load_examples
from lorafleet.fsutil import atomic_write
from lorafleet.layers.mole import DEFAULT_VARIANT, balance_loss
from lorafleet.models import load_base
from lorafleet.train import (
    Batch,
    DataConfig,
    OptimizerConfig,
    ParamGroup,
    ScheduleConfig,
    StepOutput,
    StepRunner,
    build_data,
    build_optimizer,
    build_scheduler,
    train_only,
)
from lorafleet.train.checkpoint import rng_state, set_rng_state


@dataclass
class MoleTrainConfig:
    base: str
    experts: list[tuple[str, str]]  # (name, adapter dir)
    data: list[str]  # TASK_OR_FILE[@WEIGHT]
    out: Path
    steps: int = 300
    lr: float = 5e-3
    batch_size: int = 12
    balance_weight: float = 0.5  # the paper's beta
    temperature: float = 1.0
    variant: str = DEFAULT_VARIANT
    train_limit: int | None = None  # rows per source
    max_length: int = 512
    chat: bool = True
    warmup: float = 0.0
    seed: int = 0
    save_every: int = 50
    resume: bool = False
    extra: dict = field(default_factory=dict)


class MoleStep:
    """The task-balanced loss (`task_balanced` over each row's mean token loss) +
    balance_weight x MoLE's balancing loss; only the gates train. Logs the balancing loss,
    each task's loss (`task<i>`) and the gates' mean temperature (`tau`)."""

    def __init__(self, balance_weight: float):
        self.balance_weight = balance_weight

    def param_groups(self, model):
        return [ParamGroup("gates", list(model.mole_gates.parameters()))]

    def loss(self, model, batch: Batch) -> StepOutput:
        gates = model.mole_gates
        gates.take_recorded()
        inputs = dict(batch.inputs)
        tasks = inputs.pop(TASK_KEY, None)
        task, per_task = task_balanced(row_losses(model, inputs), tasks)
        bal = balance_loss(gates.take_recorded(), inputs["attention_mask"].reshape(-1))
        # The runner logs share-weighted sums over a step's micro-batches (one per task): the
        # task and balancing losses come out as their means over tasks; a task's own loss,
        # seen in its micro-batch only, is divided by the share to come out as itself.
        logs = {"balance": bal, "task_loss": task}
        logs.update({f"task{t}": v / batch.share for t, v in per_task.items()})
        temps = gates.temperatures()
        logs["tau"] = sum(temps.values()) / max(1, len(temps))
        return StepOutput(batch.share * (task + self.balance_weight * bal), logs)


def parse_source(spec: str) -> tuple[str, float]:
    """TASK_OR_FILE[@WEIGHT] -> (source, weight)."""
    source, sep, weight = spec.rpartition("@")
    if not sep:
        return spec, 1.0
    try:
        w = float(weight)
    except ValueError:
        raise MoleError(f"--data {spec!r}: the weight after @ must be a number") from None
    if not w > 0:
        raise MoleError(f"--data {spec!r}: the weight must be positive")
    return source, w


def mixed_examples(specs: list[str], tokenizer, cfg: MoleTrainConfig):
    """Each source's training rows, encoded, taken in proportion to the sources' weights (as
    many as the scarcest source allows); returns (rows per source, per-source counts)."""
    if not specs:
        raise MoleError("give at least one --data source")
    sources = [parse_source(s) for s in specs]
    encoded = []
    for source, _ in sources:
        examples = load_examples(
            source, tokenizer, split="train", chat=cfg.chat, limit=cfg.train_limit
        )
        encoded.append(build_data(examples, tokenizer, DataConfig(cfg.max_length))[0])
    unit = min(len(e) / w for e, (_, w) in zip(encoded, sources, strict=True))
    counts = {s: max(1, int(unit * w)) for s, w in sources}
    gen = torch.Generator().manual_seed(cfg.seed)
    per_source = []
    for rows, (source, _) in zip(encoded, sources, strict=True):
        pick = torch.randperm(len(rows), generator=gen)[: counts[source]].tolist()
        per_source.append([rows[i] for i in sorted(pick)])
    return per_source, counts


def _ckpt_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def latest_state(out: Path) -> Path | None:
    files = sorted(_ckpt_dir(out).glob("step-*.pt"))
    return files[-1] if files else None


def _save_state(out: Path, step: int, model, optimizer, scheduler) -> Path:
    state = {
        "step": step,
        "gates": {k: v.detach().cpu().clone() for k, v in model.mole_gates.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
    }
    path = _ckpt_dir(out) / f"step-{step:07d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    for old in sorted(_ckpt_dir(out).glob("step-*.pt"))[:-2]:
        old.unlink()
    return path


def _restore(out: Path, model, optimizer, scheduler) -> int:
    path = latest_state(out)
    if path is None:
        raise MoleError(f"{_ckpt_dir(out)}: no checkpoint to resume from")
    state = torch.load(path, weights_only=True)
    model.mole_gates.load_state_dict(state["gates"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    step = int(state["step"])
    metrics = Path(out) / "metrics.jsonl"
    if metrics.exists():
        kept = [ln for ln in metrics.read_text().splitlines() if json.loads(ln)["step"] <= step]
        metrics.write_text("".join(ln + "\n" for ln in kept))
    return step


def train_mole(cfg: MoleTrainConfig, on_step=None) -> dict:
    """Train the gates for cfg.steps steps; write the MoLE directory cfg.out; a summary."""
    out = Path(cfg.out)
    if not cfg.resume and latest_state(out) is not None:
        raise MoleError(f"{out} already holds checkpoints: pass --resume or choose another --out")
    torch.manual_seed(cfg.seed)
    base = load_base(cfg.base)
    experts = read_experts(cfg.experts)
    data, counts = mixed_examples(cfg.data, base.tokenizer, cfg)
    mole = attach_mole(base.model, experts, variant=cfg.variant, temperature=cfg.temperature)
    model = mole.model.train()
    step_fn = MoleStep(cfg.balance_weight)
    groups = step_fn.param_groups(model)
    train_only(model, groups)
    optimizer = build_optimizer(groups, OptimizerConfig(lr=cfg.lr))
    scheduler = build_scheduler(optimizer, ScheduleConfig(cfg.steps, cfg.warmup))
    # Each source is a task: drawn evenly per step, each weighing the same in the loss (the
    # @WEIGHT of --data sets how many of its rows are read, not its weight in the loss).
    batches = TaskBatches(
        data,
        batch_size=cfg.batch_size,
        pad_token_id=base.tokenizer.pad_token_id,
        seed=cfg.seed,
        device=next(model.parameters()).device,
    )
    runner = StepRunner(model, step_fn, batches, optimizer, scheduler)
    start = _restore(out, model, optimizer, scheduler) if cfg.resume else 0
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if _run(cfg, runner, model, optimizer, scheduler, start, on_step):
        return {"interrupted": True, "checkpoint": str(latest_state(out))}
    summary = {
        "steps": cfg.steps,
        "experts": mole.names,
        "data": counts,
        "variant": mole.gates.variant,
        "temperature": cfg.temperature,
        "learnt_temperature": _mean(mole.gates.temperatures().values()),
    }
    train = {
        k: v
        for k, v in asdict(cfg).items()
        if k in ("steps", "lr", "batch_size", "seed", "balance_weight", "data")
    }
    train["loss"] = "task-balanced"
    save_mole(out, mole, experts, base.fingerprint, {"train": train, **cfg.extra})
    summary["out"] = str(out)
    return summary


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


def _run(cfg, runner, model, optimizer, scheduler, start, on_step) -> bool:
    """The steps from `start`, logged and checkpointed; True when on_step or a signal
    (SIGINT / SIGTERM: after the current step, with a checkpoint) stopped the run."""
    stop = []
    try:
        previous = {
            s: signal.signal(s, lambda *_: stop.append(1)) for s in (signal.SIGINT, signal.SIGTERM)
        }
    except ValueError:  # not the main thread: no handlers
        previous = {}
    try:
        return _steps(cfg, runner, model, optimizer, scheduler, start, on_step, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _steps(cfg, runner, model, optimizer, scheduler, start, on_step, stop) -> bool:
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    with tqdm(total=cfg.steps, initial=start, desc="MoLE gates", unit="step") as bar:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            result = runner(step)
            record = {
                "split": "train",
                "step": step + 1,
                "loss": result.loss,
                "grad_norm": result.grad_norm,
                "seconds": time.perf_counter() - t0,
                **result.logs,
            }
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(
                loss=f"{result.loss:.4f}",
                balance=f"{result.logs['balance']:.3f}",
                tau=f"{result.logs['tau']:.3f}",
            )
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                _save_state(out, step + 1, model, optimizer, scheduler)
            stopped = (on_step is not None and on_step(step + 1) is False) or stop
            if stopped and step + 1 < cfg.steps:
                _save_state(out, step + 1, model, optimizer, scheduler)
                return True
    return False
