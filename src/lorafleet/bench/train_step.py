"""Benchmark: lorafleet's training step vs a plain PEFT + transformers loop on the same model,
adapter, data and batches; or (`methods`) lorafleet's step for each adapter method next to
LoRA's. Each variant runs in its own spawned process (so its peak memory is its own); variants
alternate over rounds and the median step time is compared.

Methods: lora, rslora, dora, bone, bat, and bilora / bilora-second / bilora-joint (BiLoRA's
first-order, unrolled second-order and joint steps; BiLoRA's time is the mean over its
alternating upper / lower steps, since the median would pick one kind)."""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time
from pathlib import Path

from lorafleet.bench import print_table, write_json
from lorafleet.errors import LorafleetError

METHOD_NAMES = ("lora", "rslora", "dora", "bone", "bat", "bilora", "bilora-second", "bilora-joint")


def _lorafleet_steps(
    base, data, batch_size, steps, warmup, out, chat, method="lora", rank=16
) -> list[float]:
    from lorafleet.train import TrainConfig, trainer_for
    from lorafleet.train.bilora import bilora_options

    total = warmup + steps
    name, _, bilevel = method.partition("-")
    cfg = TrainConfig(
        base=base,
        data=data,
        out=out,
        batch_size=batch_size,
        steps=total,
        train_limit=batch_size * total,
        chat=chat,
        eval_limit=None,
        method=name,
        rank=rank,
        alpha=2.0 * rank,
        extra=bilora_options(name, bilevel or None),
    )
    trainer = trainer_for(cfg)
    trainer.setup()
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        trainer.train_step(step)
        times.append(time.perf_counter() - start)
    return times[warmup:]


def _plain_peft_steps(base, data, batch_size, steps, warmup, out, chat) -> list[float]:
    """The loop a PEFT user writes by hand: model(**batch).loss, backward, clip, step."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lorafleet.data import Collator, encode_all, load_examples
    from lorafleet.models import load_base, target_names
    from lorafleet.train.loop import lr_lambda
    from lorafleet.train.order import global_batch

    loaded = load_base(base)
    tok = loaded.tokenizer
    examples = load_examples(data, tok, chat=chat, limit=batch_size * (warmup + steps))
    encoded, _ = encode_all(examples, tok, 512)
    config = LoraConfig(
        r=16, lora_alpha=32, target_modules=target_names(loaded.model), task_type="CAUSAL_LM"
    )
    model = get_peft_model(loaded.model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup + steps, 0.05))
    collate = Collator(tok.pad_token_id)
    torch.manual_seed(0)
    times = []
    for step in range(warmup + steps):
        batch = collate([encoded[i] for i in global_batch(len(encoded), batch_size, step, 0)])
        start = time.perf_counter()
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[warmup:]


VARIANTS = {"lorafleet": _lorafleet_steps, "peft+transformers": _plain_peft_steps}


def _child(name, args, queue) -> None:
    if name in VARIANTS:
        times = VARIANTS[name](*args)
    else:  # a method: lorafleet's step with that adapter
        times = _lorafleet_steps(*args[:-1], method=name, rank=args[-1])
    queue.put((times, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))  # MiB


def run(
    base: str,
    data: str,
    batch_size: int,
    steps: int,
    rounds: int,
    chat: bool,
    json_out: str | Path,
    scratch: str | Path,
    methods: list[str] | None = None,
    rank: int = 16,
) -> dict:
    """Time the variants; with `methods`, lorafleet's step per method (LoRA added first)."""
    unknown = [m for m in methods or () if m not in METHOD_NAMES]
    if unknown:
        raise LorafleetError(f"unknown --method {unknown[0]!r}: use {', '.join(METHOD_NAMES)}")
    if methods:
        return _run_methods(
            base, data, batch_size, steps, rounds, chat, json_out, scratch, methods, rank
        )
    results = _timed(list(VARIANTS), rounds, base, data, batch_size, steps, chat, scratch, None)
    rows = []
    for name, r in results.items():
        rows.append(
            {
                "variant": name,
                "median_step_s": statistics.median(r["times"]),
                "mean_step_s": statistics.fmean(r["times"]),
                "steps": len(r["times"]),
                "peak_rss_mib": round(r["peak_rss_mib"]),
            }
        )
    ratio = rows[0]["median_step_s"] / rows[1]["median_step_s"]
    print_table(rows, ["variant", "median_step_s", "mean_step_s", "steps", "peak_rss_mib"])
    print(f"step time ratio lorafleet / (peft+transformers) = {ratio:.3f} (target <= 1.05)")
    figures = {
        "benchmark": "train_step",
        "base": base,
        "data": data,
        "batch_size": batch_size,
        "rows": rows,
        "ratio": ratio,
    }
    print(f"wrote {write_json(json_out, figures)}")
    return figures


def _timed(names, rounds, base, data, batch_size, steps, chat, scratch, rank) -> dict:
    """Each variant in its own spawned process per round, the order alternating by round."""
    ctx = mp.get_context("spawn")
    results = {name: {"times": [], "peak_rss_mib": 0.0} for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else list(reversed(names)):
            queue = ctx.Queue()
            args = (base, data, batch_size, steps, 2, Path(scratch) / f"{name}-{r}", chat)
            if rank is not None:
                args += (rank,)
            proc = ctx.Process(target=_child, args=(name, args, queue))
            proc.start()
            times, rss = queue.get()
            proc.join()
            results[name]["times"] += times
            results[name]["peak_rss_mib"] = max(results[name]["peak_rss_mib"], rss)
    return results


def _run_methods(
    base, data, batch_size, steps, rounds, chat, json_out, scratch, methods, rank
) -> dict:
    names = ["lora"] + [m for m in dict.fromkeys(methods) if m != "lora"]
    results = _timed(names, rounds, base, data, batch_size, steps, chat, scratch, rank)
    rows = []
    for name, r in results.items():
        # BiLoRA alternates upper / lower steps of different cost: its mean is its step time.
        typical = statistics.fmean if name.startswith("bilora") else statistics.median
        rows.append(
            {
                "method": name,
                "step_s": typical(r["times"]),
                "median_step_s": statistics.median(r["times"]),
                "mean_step_s": statistics.fmean(r["times"]),
                "steps": len(r["times"]),
                "peak_rss_mib": round(r["peak_rss_mib"]),
            }
        )
    for row in rows:
        row["vs_lora"] = row["step_s"] / rows[0]["step_s"]
    print_table(
        rows,
        ["method", "step_s", "vs_lora", "median_step_s", "mean_step_s", "steps", "peak_rss_mib"],
    )
    figures = {
        "benchmark": "train_step_methods",
        "base": base,
        "data": data,
        "rank": rank,
        "batch_size": batch_size,
        "rows": rows,
    }
    print(f"wrote {write_json(json_out, figures)}")
    return figures
