"""The fine-tuning recipe: build the pieces, run the steps, checkpoint, log.

A plain PyTorch loop over a PEFT model rather than transformers' Trainer or TRL's SFTTrainer:
resuming must replay the exact data order and RNG (the order is a pure function of seed and
step, see order.py), data parallelism only needs the trainable gradients summed (see
distributed.py), and BiLoRA's bi-level steps, MoLE's gate training and Trans-LoRA's synthetic
data plug in through public seams: a `TrainStep` (step.py), in-memory examples and a model
builder (builders.py). Everything else (models, PEFT layers, loss) is transformers and PEFT.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import set_peft_model_state_dict

from lorafleet.adapters import adapter_from_model, write_adapter, write_init
from lorafleet.adapters.methods import PEFT_TRAINER, get_method
from lorafleet.data import ExampleSet, load_examples
from lorafleet.errors import LorafleetError
from lorafleet.eval import evaluate
from lorafleet.fsutil import atomic_write_json
from lorafleet.models import load_base
from lorafleet.train.builders import (
    InMemoryExamples,
    ModelBuilder,
    ScheduleConfig,
    build_data,
    build_model,
    build_optimizer,
    build_scheduler,
    example_set,
    lr_lambda,
    train_only,
)
from lorafleet.train.checkpoint import (
    checkpoints_dir,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lorafleet.train.config import TrainConfig
from lorafleet.train.distributed import Distributed
from lorafleet.train.plot import plot_metrics
from lorafleet.train.step import Batches, LanguageModelStep, StepResult, StepRunner, TrainStep

__all__ = ["METRICS_FILE", "Trainer", "lr_lambda"]

METRICS_FILE = "metrics.jsonl"


class Trainer:
    """Build with a TrainConfig, call `run()`.

    `step` replaces the loss and the parameter groups (default: next-token loss on every
    adapter parameter); `examples` / `val_examples` replace `cfg.data` / the validation data
    with in-memory examples (`cfg.data` then only names them); `model_builder(base model,
    cfg)` builds the trained model (default: a fresh adapter of `cfg`'s method).
    `on_step(step, loss)` is called after every optimizer step; `request_stop()` (wired to
    SIGINT/SIGTERM) ends the run after the current step with a checkpoint."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        step: TrainStep | None = None,
        examples: InMemoryExamples | None = None,
        val_examples: InMemoryExamples | None = None,
        model_builder: ModelBuilder = build_model,
        on_step: Callable[[int, float], None] | None = None,
    ):
        if step is not None and not isinstance(step, TrainStep):
            raise LorafleetError("step must have param_groups(model) and loss(model, batch)")
        self.cfg = cfg
        self.step = step or LanguageModelStep()
        self.examples, self.val_examples = examples, val_examples
        self.model_builder = model_builder
        self.on_step = on_step
        self.stop_signal: int | None = None
        self.dist = Distributed.from_env(cfg.device)

    # --- setup: the recipe, top to bottom -------------------------------------------------
    def setup(self) -> None:
        cfg, dist = self.cfg, self.dist
        torch.manual_seed(cfg.seed)
        self.base = load_base(cfg.base, device=str(dist.device))
        tok = self.base.tokenizer
        train_set = self._train_set()
        self.train, self.data_stats = build_data(train_set, tok, cfg.data_config())
        self.val_set = self._val_set(train_set)
        self.model = self.model_builder(self.base.model, cfg).train()
        self.batches = Batches(
            self.train,
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            seed=cfg.seed,
            pad_token_id=tok.pad_token_id,
            dist=dist,
        )
        self.collate = self.batches.collate  # pads a list of Encoded into a model batch
        self.total_steps = cfg.total_steps(len(self.train), self.batches.global_size)
        groups = self.step.param_groups(self.model)
        train_only(self.model, groups)
        self.optimizer = build_optimizer(groups, cfg.optimizer_config())
        self.scheduler = build_scheduler(
            self.optimizer, ScheduleConfig(self.total_steps, cfg.warmup)
        )
        autocast = (
            torch.autocast(dist.device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16" else None
        )
        self.runner = StepRunner(
            self.model,
            self.step,
            self.batches,
            self.optimizer,
            self.scheduler,
            max_grad_norm=cfg.max_grad_norm,
            autocast=autocast,
        )

    def _train_set(self) -> ExampleSet:
        cfg, tok = self.cfg, self.base.tokenizer
        if self.examples is not None:
            return example_set(
                self.examples, tok, name=cfg.data, chat=cfg.chat, limit=cfg.train_limit
            )
        return load_examples(cfg.data, tok, split="train", chat=cfg.chat, limit=cfg.train_limit)

    def _val_set(self, train_set: ExampleSet) -> ExampleSet | None:
        cfg, tok = self.cfg, self.base.tokenizer
        if self.val_examples is not None:
            return example_set(
                self.val_examples,
                tok,
                name=cfg.val or f"{cfg.data} (validation)",
                chat=cfg.chat,
                limit=cfg.eval_limit,
            )
        source = cfg.val
        from_file = self.examples is not None or Path(cfg.data).exists()
        if source is None and train_set.name == cfg.data and not from_file:
            source = cfg.data  # a built-in task: use its validation split
        if source is None:
            return None
        return load_examples(source, tok, split="validation", chat=cfg.chat, limit=cfg.eval_limit)

    # --- one optimizer step --------------------------------------------------------------
    def train_step(self, step: int) -> StepResult:
        """Optimizer step `step` (0-based) through the runner: forward/backward over this
        rank's share of the global batch, gradients summed across ranks, clip, update."""
        return self.runner(step)

    # --- checkpoints and metrics -----------------------------------------------------------
    def _adapter(self, meta: dict | None = None):
        return adapter_from_model(
            self.model, base_fingerprint=self.base.fingerprint, extra_meta=meta
        )

    def _trainable(self):
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _save(self, step: int) -> Path | None:
        path = None
        if self.dist.is_main:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
                # Every trained parameter, adapter or not (a MoLE gate, a norm), by name.
                "trainable": {n: p.detach().cpu().clone() for n, p in self._trainable()},
            }
            path = save_checkpoint(
                self.cfg.out, step, self._adapter(), state, self.cfg.keep_checkpoints
            )
        self.dist.barrier()
        return path

    def _restore(self) -> int:
        ckpt = latest_checkpoint(self.cfg.out)
        if ckpt is None:
            raise LorafleetError(f"{checkpoints_dir(self.cfg.out)}: no checkpoint to resume from")
        adapter, state = load_checkpoint(ckpt)
        set_peft_model_state_dict(self.model, adapter.tensors)
        saved = state.get("trainable", {})
        with torch.no_grad():
            for name, p in self._trainable():
                if name in saved:
                    p.copy_(saved[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step = int(state["step"])
        if self.dist.is_main:  # drop metrics logged after the checkpoint: they are replayed
            metrics = self.cfg.out / METRICS_FILE
            if metrics.exists():
                kept = [
                    line
                    for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= step
                ]
                metrics.write_text("".join(line + "\n" for line in kept))
        return step

    def _train_record(self, step: int, result: StepResult, tokens_per_s: float | None) -> dict:
        lrs = self.scheduler.get_last_lr()
        record = {
            "split": "train",
            "step": step,
            "loss": result.loss,
            "grad_norm": result.grad_norm,
            "lr": lrs[0],
            "tokens": result.tokens,
            "tokens_per_s": tokens_per_s,
            "epoch": step * self.batches.global_size / len(self.train),
        }
        if len(lrs) > 1:  # one lr per named parameter group
            groups = self.optimizer.param_groups
            record.update({f"lr_{g['name']}": lr for g, lr in zip(groups, lrs, strict=True)})
        clash = sorted(set(result.logs) & set(record))
        if clash:
            raise LorafleetError(f"the step logs {clash[0]!r}, a name the trainer logs itself")
        record.update(result.logs)
        return record

    def _log(self, record: dict) -> None:
        if self.dist.is_main:
            with open(self.cfg.out / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    def validate(self, step: int) -> dict | None:
        if self.val_set is None or not self.dist.is_main:
            self.dist.barrier()
            return None
        figures = evaluate(
            self.model,
            self.base.tokenizer,
            self.val_set,
            metrics=self.cfg.val_metrics,
            batch_size=self.cfg.batch_size,
            max_length=self.cfg.max_length,
        )
        self.model.train()
        record = {"split": "val", "step": step, "val_loss": figures.get("loss")}
        record.update({f"val_{k}": v for k, v in figures.items() if k != "loss"})
        self._log(record)
        self.dist.barrier()
        return record

    # --- the run -----------------------------------------------------------------------------
    def request_stop(self, signum: int = signal.SIGINT) -> None:
        self.stop_signal = signum

    def _install_signals(self):
        def handler(signum, frame):
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self.request_stop(signum)

        try:
            return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: no handlers, request_stop() still works
            return {}

    def _prepare_out(self) -> int:
        cfg = self.cfg
        if cfg.resume:
            return self._restore()
        if latest_checkpoint(cfg.out) is not None:
            raise LorafleetError(
                f"{cfg.out} already holds checkpoints: pass --resume to continue that run, "
                "or choose another --out"
            )
        if self.dist.is_main:
            cfg.out.mkdir(parents=True, exist_ok=True)
            (cfg.out / METRICS_FILE).unlink(missing_ok=True)
            method = get_method(cfg.method)
            if method.factored and method.trainer == PEFT_TRAINER:
                # Laplace's centred prior (`calibrate --prior init`) needs the random init of A
                # (of a plain s * B @ A adapter initialised by PEFT's own layers).
                write_init(cfg.out, self._adapter().tensors)
        return 0

    def run(self) -> dict:
        """Train to the last step (or until stopped); write the adapter, metrics and plot."""
        self.setup()
        cfg, dist = self.cfg, self.dist
        start = self._prepare_out()
        dist.barrier()
        previous = self._install_signals()
        bar = None
        if dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=start, desc="training", unit="step")
        step, last_saved, tokens, clock = start, start, 0, time.perf_counter()
        try:
            while step < self.total_steps:
                result = self.train_step(step)
                step += 1
                tokens += result.tokens
                elapsed = time.perf_counter() - clock
                record = self._train_record(step, result, tokens / elapsed if elapsed > 0 else None)
                self._log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{result.loss:.4f}", tok_s=f"{record['tokens_per_s'] or 0:.0f}"
                    )
                if self.on_step:
                    self.on_step(step, result.loss)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_steps:
                    self.validate(step)
                stop = self._agreed_stop()
                if step % cfg.save_every == 0 or stop:
                    self._save(step)
                    last_saved = step
                if stop:
                    break
        finally:
            if bar is not None:
                bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        interrupted = step < self.total_steps
        result = {
            "steps": step,
            "total_steps": self.total_steps,
            "interrupted": interrupted,
            "out": str(cfg.out),
            "data": self.data_stats,
        }
        if interrupted:
            result["checkpoint"] = str(latest_checkpoint(cfg.out))
            dist.close()
            return result
        if last_saved != step:
            self._save(step)
        result["validation"] = self.validate(step)
        if dist.is_main:
            train_meta = {"steps": step, "data": cfg.data, "seed": cfg.seed, "lr": cfg.lr}
            write_adapter(cfg.out, self._adapter({"train": train_meta}))
            atomic_write_json(cfg.out / "train_config.json", cfg.to_dict())
            result["plot"] = str(plot_metrics(cfg.out / METRICS_FILE, cfg.out / "loss.png"))
        dist.close()
        return result

    def _agreed_stop(self) -> bool:
        """Stop when any rank was signalled (all ranks must leave the loop together)."""
        flag = torch.tensor([1.0 if self.stop_signal is not None else 0.0], device=self.dist.device)
        self.dist.sum_([flag])
        return bool(flag.item() > 0)
