"""The fine-tuning loop.

A plain PyTorch loop over a PEFT model rather than transformers' Trainer or TRL's SFTTrainer:
resuming must replay the exact data order and RNG (the order is a pure function of seed and
step, see order.py), data parallelism only needs the adapter's gradients summed (see
distributed.py), and BiLoRA's bi-level steps and MoLE's gate training will plug in their own
`train_step`. Everything else (models, PEFT layers, loss) is transformers and PEFT.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import set_peft_model_state_dict

from lorafleet.adapters import MethodConfig, adapter_from_model, new_adapter, write_adapter
from lorafleet.data import Collator, Encoded, encode_all, load_examples, pack
from lorafleet.errors import LorafleetError
from lorafleet.eval import evaluate
from lorafleet.models import load_base
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
from lorafleet.train.order import global_batch, rank_slice
from lorafleet.train.plot import plot_metrics

METRICS_FILE = "metrics.jsonl"


def lr_lambda(total: int, warmup: float) -> Callable[[int], float]:
    """Linear warmup over `warmup` x total steps, then cosine decay to zero."""
    warm = int(round(warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _target_tokens(e: Encoded) -> int:
    return sum(1 for label in e.labels[1:] if label != -100)  # position 0 is never predicted


class Trainer:
    """Build with a TrainConfig, call `run()`. `on_step(step, loss)` is called after every
    optimizer step; `request_stop()` (wired to SIGINT/SIGTERM) ends the run after the current
    step with a checkpoint."""

    def __init__(self, cfg: TrainConfig, *, on_step: Callable[[int, float], None] | None = None):
        self.cfg = cfg
        self.on_step = on_step
        self.stop_signal: int | None = None
        self.dist = Distributed.from_env()

    # --- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, dist = self.cfg, self.dist
        torch.manual_seed(cfg.seed)
        self.base = load_base(cfg.base, device=str(dist.device))
        tok = self.base.tokenizer
        train_set = load_examples(
            cfg.data, tok, split="train", chat=cfg.chat, limit=cfg.train_limit
        )
        encoded, self.data_stats = encode_all(
            train_set, tok, cfg.max_length, on_overflow=cfg.on_overflow
        )
        self.train = pack(encoded, cfg.max_length) if cfg.packing else encoded
        if not self.train:
            raise LorafleetError(f"{cfg.data}: no training examples left after length handling")
        self.val_set = self._val_set(train_set)
        self.global_batch = cfg.batch_size * cfg.grad_accum * dist.world
        if cfg.epochs is not None:
            self.total_steps = max(1, math.ceil(cfg.epochs * len(self.train) / self.global_batch))
        else:
            self.total_steps = cfg.steps
        method = MethodConfig(cfg.method, cfg.rank, cfg.alpha, cfg.targets, cfg.dropout)
        self.model = new_adapter(self.base.model, method)
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, cfg.warmup)
        )
        self.collate = Collator(tok.pad_token_id)
        self.autocast = (
            torch.autocast(dist.device.type, dtype=torch.bfloat16)
            if cfg.dtype == "bf16"
            else nullcontext()
        )

    def _val_set(self, train_set):
        cfg = self.cfg
        source = cfg.val
        if source is None and train_set.name == cfg.data and not Path(cfg.data).exists():
            source = cfg.data  # a built-in task: use its validation split
        if source is None:
            return None
        return load_examples(
            source, self.base.tokenizer, split="validation", chat=cfg.chat, limit=cfg.eval_limit
        )

    # --- one optimizer step --------------------------------------------------------------
    def train_step(self, step: int) -> tuple[float, float, int]:
        """Forward/backward over this rank's share of global batch `step`, sum the adapter
        gradients across ranks, clip, update. Returns (loss, grad norm, input tokens)."""
        cfg, dist = self.cfg, self.dist
        indices = global_batch(len(self.train), self.global_batch, step, cfg.seed)
        # Normalise by the global batch's target tokens so the summed gradient is the gradient
        # of the mean token loss, whatever the split across ranks and micro-batches.
        n_tokens = max(1, sum(_target_tokens(self.train[i]) for i in indices))
        mine = rank_slice(indices, dist.rank, dist.world)
        loss_sum = torch.zeros((), device=dist.device)
        input_tokens = 0
        for start in range(0, len(mine), cfg.batch_size):
            batch = self.collate([self.train[i] for i in mine[start : start + cfg.batch_size]])
            batch = {k: v.to(dist.device) for k, v in batch.items()}
            with self.autocast:
                out = self.model(**batch, num_items_in_batch=n_tokens)  # loss = sum NLL / n_tokens
            out.loss.backward()
            loss_sum += out.loss.detach() * n_tokens
            input_tokens += int(batch["attention_mask"].sum())
        grads = [p.grad for p in self.params if p.grad is not None]
        dist.sum_(grads + [loss_sum])
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss_sum) / n_tokens, float(norm), input_tokens * dist.world

    # --- checkpoints and metrics -----------------------------------------------------------
    def _adapter(self, meta: dict | None = None):
        return adapter_from_model(
            self.model, base_fingerprint=self.base.fingerprint, extra_meta=meta
        )

    def _save(self, step: int) -> Path | None:
        path = None
        if self.dist.is_main:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
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

    def _log(self, record: dict) -> None:
        if self.dist.is_main:
            with open(self.cfg.out / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    def validate(self, step: int) -> dict | None:
        if self.val_set is None or not self.dist.is_main:
            self.dist.barrier()
            return None
        figures = evaluate(
            self.model, self.base.tokenizer, self.val_set, metrics=self.cfg.val_metrics,
            batch_size=self.cfg.batch_size, max_length=self.cfg.max_length,
        )  # fmt: skip
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
                loss, norm, step_tokens = self.train_step(step)
                step += 1
                tokens += step_tokens
                elapsed = time.perf_counter() - clock
                record = {
                    "split": "train", "step": step, "loss": loss, "grad_norm": norm,
                    "lr": self.scheduler.get_last_lr()[0], "tokens": step_tokens,
                    "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
                    "epoch": step * self.global_batch / len(self.train),
                }  # fmt: skip
                self._log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s'] or 0:.0f}")
                if self.on_step:
                    self.on_step(step, loss)
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
        result = {"steps": step, "total_steps": self.total_steps, "interrupted": interrupted,
                  "out": str(cfg.out), "data": self.data_stats}  # fmt: skip
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
            (cfg.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            result["plot"] = str(plot_metrics(cfg.out / METRICS_FILE, cfg.out / "loss.png"))
        dist.close()
        return result

    def _agreed_stop(self) -> bool:
        """Stop when any rank was signalled (all ranks must leave the loop together)."""
        flag = torch.tensor([1.0 if self.stop_signal is not None else 0.0], device=self.dist.device)
        self.dist.sum_([flag])
        return bool(flag.item() > 0)
