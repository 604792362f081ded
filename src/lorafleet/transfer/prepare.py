"""`lorafleet transfer prepare`: while the task data exists, make the kit (seeds, discriminator)."""

from __future__ import annotations

import shutil
from pathlib import Path

from lorafleet.adapters import content_digest, fingerprint_status, read_adapter, write_adapter
from lorafleet.fsutil import atomic_dir
from lorafleet.models import load_base
from lorafleet.models.chat import has_chat_template
from lorafleet.transfer.config import PrepareConfig
from lorafleet.transfer.discriminator import (
    disc_examples,
    held_out_accuracy,
    load_judge,
    split_held,
    train_discriminator,
)
from lorafleet.transfer.kit import DISC_DIR, write_kit
from lorafleet.transfer.synth import generate_inputs
from lorafleet.transfer.task import TransferError, split_rows, task_format, task_rows


def prepare(cfg: PrepareConfig) -> dict:
    """Seeds, synthetic inputs from the source base, the discriminator, the kit; a report."""
    cfg.check()
    adapter = read_adapter(cfg.adapter)  # one line if missing or not an adapter
    rows = task_rows(cfg.data)
    task = task_format(cfg.data, rows[0], rows)
    wanted = cfg.real + cfg.held_out
    seeds, real_rows = split_rows(rows, cfg.seeds, wanted, cfg.seed)
    if len(real_rows) < wanted:
        raise TransferError(
            f"{cfg.data}: {len(rows)} rows; the kit needs --seeds {cfg.seeds} + --real "
            f"{cfg.real} + --held-out {cfg.held_out} distinct rows"
        )
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
        wanted,
        seed=cfg.seed,
        temperature=cfg.temperature,
        max_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        desc="synthetic (source)",
    )
    if len(synthetic) < wanted:
        raise TransferError(
            f"the source base produced {len(synthetic)} distinct synthetic inputs of the "
            f"{wanted} the discriminator needs (--real + --held-out); try a higher --temperature"
        )
    chat = cfg.chat and has_chat_template(base.tokenizer)
    (train_real, train_synth), (held_real, held_synth) = split_held(
        real, synthetic, cfg.held_out, cfg.seed
    )
    train = disc_examples(base.tokenizer, chat, task.kind, train_real, train_synth, cfg.seed)
    del base
    out = Path(cfg.out)
    work = out.parent / f".{out.name}.disc-work"
    disc = train_discriminator(
        cfg.base,
        work,
        train,
        steps=cfg.disc_steps,
        rank=cfg.disc_rank,
        lr=cfg.disc_lr,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    # Held-out accuracy: real and synthetic inputs it did not train on, by the filter's rule.
    score = load_judge(load_base(cfg.base), work, chat, task.kind, batch_size=cfg.batch_size)
    disc = {
        **held_out_accuracy(score(held_real), score(held_synth)),
        "train_real": len(train_real),
        "train_synthetic": len(train_synth),
        **disc,
    }
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
        "discriminator_train": f"{len(train_real)} real + {len(train_synth)} synthetic",
        "held_out": f"{len(held_real)} real + {len(held_synth)} synthetic",
        "generation_tokens_per_s": gen.tokens_per_s,
        "held_out_accuracy": disc["held_out_accuracy"],
        "held_out_real_accuracy": disc["held_out_real_accuracy"],
        "held_out_synthetic_accuracy": disc["held_out_synthetic_accuracy"],
        "synthetic_examples": synthetic[:3],
    }
