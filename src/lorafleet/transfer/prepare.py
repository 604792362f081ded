"""`lorafleet transfer prepare`: while the task data exists, make the kit (seeds, discriminator)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from lorafleet.adapters import content_digest, fingerprint_status, read_adapter, write_adapter
from lorafleet.fsutil import atomic_dir
from lorafleet.models import load_base
from lorafleet.models.chat import has_chat_template
from lorafleet.transfer.discriminator import disc_sets, train_discriminator
from lorafleet.transfer.kit import DISC_DIR, write_kit
from lorafleet.transfer.synth import generate_inputs
from lorafleet.transfer.task import TransferError, split_rows, task_format, task_rows


@dataclass
class PrepareConfig:
    base: str
    adapter: Path
    data: str
    out: Path
    seeds: int = 5
    real: int = 64  # real inputs the discriminator learns from (and as many synthetic ones)
    disc_steps: int = 60
    disc_rank: int = 8
    disc_lr: float = 1e-3
    batch_size: int = 8
    held_out: float = 0.25  # fraction of each class kept aside to report the accuracy
    temperature: float = 0.9
    max_new_tokens: int = 96
    chat: bool = True
    seed: int = 0
    overwrite: bool = False

    def check(self) -> None:
        if self.seeds < 1:
            raise TransferError(f"--seeds must be >= 1, got {self.seeds}")
        if self.real < 2:
            raise TransferError(f"--real must be >= 2, got {self.real}")
        if not 0 < self.held_out < 1:
            raise TransferError(f"--held-out must be in (0, 1), got {self.held_out}")
        out = Path(self.out)
        if out.exists() and any(out.iterdir()) and not self.overwrite:
            raise TransferError(f"{out} exists and is not empty; pass --overwrite or another --out")


def prepare(cfg: PrepareConfig) -> dict:
    """Seeds, synthetic inputs from the source base, the discriminator, the kit; a report."""
    cfg.check()
    adapter = read_adapter(cfg.adapter)  # one line if missing or not an adapter
    rows = task_rows(cfg.data)
    task = task_format(cfg.data, rows[0], rows)
    seeds, real_rows = split_rows(rows, cfg.seeds, cfg.real, cfg.seed)
    real = [task.input_of(r) for r in real_rows]
    seed_inputs = [task.input_of(r) for r in seeds]
    base = load_base(cfg.base)
    if fingerprint_status(adapter, base.fingerprint) == "mismatch":
        raise TransferError(
            f"{cfg.adapter}: the source adapter was trained on another base "
            f"than --base {cfg.base} ({base.fingerprint})"
        )
    synthetic, gen = generate_inputs(
        base,
        task.kind,
        seed_inputs,
        len(real),
        seed=cfg.seed,
        temperature=cfg.temperature,
        max_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        desc="synthetic (source)",
    )
    if len(synthetic) < 2:
        raise TransferError(
            f"the source base produced {len(synthetic)} usable synthetic inputs; "
            "try a higher --temperature"
        )
    chat = cfg.chat and has_chat_template(base.tokenizer)
    train, held = disc_sets(
        base.tokenizer, chat, task.kind, real, synthetic, cfg.held_out, cfg.seed
    )
    del base
    out = Path(cfg.out)
    work = out.parent / f".{out.name}.disc-work"
    disc = train_discriminator(
        cfg.base,
        work,
        train,
        held,
        steps=cfg.disc_steps,
        rank=cfg.disc_rank,
        lr=cfg.disc_lr,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    trained = read_adapter(work)
    trained.meta["translora"] = {
        "role": "discriminator",
        "choices": ["real", "generated"],
        "held_out_accuracy": disc["held_out_accuracy"],
    }
    info = {
        "task": task.to_dict(),
        "chat": chat,
        "source_base": {"name": cfg.base, "fingerprint": trained.meta.get("base_fingerprint")},
        "source_adapter": {
            "path": str(Path(cfg.adapter).resolve()),
            "sha256": content_digest(cfg.adapter),
        },
        "discriminator": disc,
        "synthetic_for_discriminator": {
            "generated": gen.generated,
            "sampled": gen.sampled,
            "tokens_per_s": round(gen.tokens_per_s, 1),
        },
        "seed": cfg.seed,
    }
    with atomic_dir(out) as tmp:
        write_adapter(tmp / DISC_DIR, trained)
        write_kit(tmp, info, seeds)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "kit": str(out),
        "seeds": len(seeds),
        "real_inputs": len(real),
        "synthetic_inputs": len(synthetic),
        "generation_tokens_per_s": gen.tokens_per_s,
        "held_out_accuracy": disc["held_out_accuracy"],
        "synthetic_examples": synthetic[:3],
    }
