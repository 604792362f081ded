"""Issue 16's experiments: BiLoRA vs LoRA on small sst2, Bone / Bat / LoRA on clutrr (one process).

Each run is exactly `lorafleet train` (the same TrainConfig and Trainer / BiLoRATrainer the CLI
builds; its equivalent command is recorded), run in-process so the 21 runs do not pay 21
interpreter + CUDA starts. After each run: sst2 -> accuracy on its own training rows (the
train - validation gap); clutrr -> exact match on the validation rows (the curves use the cheap
teacher-forced val loss). One JSON line per run goes to RUNS/runs.jsonl, failures included.

    python3 bench/gpu/run16.py --runs /tmp/lf16/runs [--quick] [--base default] [--budget-s 480]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import time
import traceback
from pathlib import Path

import torch

from lorafleet.data import load_examples
from lorafleet.eval import evaluate
from lorafleet.linear_layers import block_linear_modules
from lorafleet.models import load_base
from lorafleet.train import TrainConfig, Trainer
from lorafleet.train.bilora import BiLoRATrainer, bilora_options

SEEDS = (0, 1, 2)
LRS = (1e-4, 3e-4, 1e-3)
BILORA_VARIANTS = ("lora", "joint", "first", "second")  # joint: P-Lambda-Q, all data, no bi-level
BONE_METHODS = ("lora", "bone", "bat")


def sizes(quick: bool) -> dict:
    """Run sizes; LF16_* environment variables override the full-size ones."""
    env = lambda k, d: type(d)(os.environ.get(f"LF16_{k}", d))  # noqa: E731
    if quick:
        return dict(
            bi_rows=32,
            bi_val=8,
            bi_steps=4,
            bi_every=2,
            bi_batch=8,
            bone_rows=32,
            bone_val=8,
            bone_steps=4,
            bone_every=2,
            bone_batch=4,
            em_rows=8,
            bi_lr=5e-4,
            bone_max_length=384,
            seeds=(0,),
            lrs=(3e-4,),
        )
    return dict(
        bi_rows=env("BI_ROWS", 256),
        bi_val=env("BI_VAL", 300),
        bi_steps=env("BI_STEPS", 128),
        bi_every=env("BI_EVERY", 16),
        bi_batch=env("BI_BATCH", 16),
        bi_lr=env("BI_LR", 5e-4),
        bone_rows=env("BONE_ROWS", 1200),
        bone_val=env("BONE_VAL", 100),
        bone_steps=env("BONE_STEPS", 120),
        bone_every=env("BONE_EVERY", 20),
        bone_batch=env("BONE_BATCH", 8),
        bone_max_length=env("BONE_MAX_LENGTH", 384),
        em_rows=env("EM_ROWS", 100),
        seeds=SEEDS,
        lrs=LRS,
    )


def matched_ranks(model, bone_rank: int, bi_rank: int) -> dict:
    """Ranks with equal trainable counts: Bone/Bat hold r x d_out per linear, LoRA r x (d_in +
    d_out); BiLoRA's P-Lambda-Q holds r x (d_in + d_out) + r, LoRA of the same rank 1/(d_in +
    d_out) less (a ~0.1% difference). Bone's rank is cut to divide every dimension (Bat needs
    it)."""
    shapes = [tuple(m.weight.shape) for m in block_linear_modules(model).values()]
    r = bone_rank
    while any(o % r or i % r for o, i in shapes):
        r //= 2
    sum_out, sum_io = sum(o for o, _ in shapes), sum(o + i for o, i in shapes)
    return {
        "bone": r,
        "lora_vs_bone": max(1, round(r * sum_out / sum_io)),
        "bilora": bi_rank,
        "linears": len(shapes),
    }


def plan(sz: dict, ranks: dict, base: str) -> list[dict]:
    """Every run, interleaved so a budget cut still leaves comparable rows of both experiments."""
    bi, bone = [], []
    for seed in sz["seeds"]:
        bi.append(
            [
                dict(experiment="bilora", variant=v, seed=seed, lr=sz["bi_lr"])
                for v in BILORA_VARIANTS
            ]
        )
    order = sorted(sz["lrs"], key=lambda lr: lr != 3e-4)  # the middle lr first
    for lr in order:
        bone.append([dict(experiment="bone", variant=m, seed=0, lr=lr) for m in BONE_METHODS])
    runs = []
    for i in range(max(len(bi), len(bone))):
        runs += (bi[i] if i < len(bi) else []) + (bone[i] if i < len(bone) else [])
    for run in runs:
        run.update(config(run, sz, ranks, base))
    return runs


def config(run: dict, sz: dict, ranks: dict, base: str) -> dict:
    """The `lorafleet train` options of one run (as keyword arguments of TrainConfig)."""
    if run["experiment"] == "bilora":
        v = run["variant"]
        method, r = ("lora", ranks["bilora"]) if v == "lora" else ("bilora", ranks["bilora"])
        extra = {} if v == "lora" else {"bilevel": v}
        kw = dict(
            data="sst2",
            train_limit=sz["bi_rows"],
            eval_limit=sz["bi_val"],
            steps=sz["bi_steps"],
            eval_every=sz["bi_every"],
            batch_size=sz["bi_batch"],
            max_length=256,
        )
        name = f"bilora-{v}-s{run['seed']}"
    else:
        method = run["variant"]
        r = ranks["lora_vs_bone"] if method == "lora" else ranks["bone"]
        extra = {}
        kw = dict(
            data="clutrr",
            train_limit=sz["bone_rows"],
            eval_limit=sz["bone_val"],
            steps=sz["bone_steps"],
            eval_every=sz["bone_every"],
            batch_size=sz["bone_batch"],
            max_length=sz["bone_max_length"],
            val_metrics=("perplexity",),
        )
        name = f"bone-{method}-lr{run['lr']:g}"
    kw.update(
        base=base,
        method=method,
        rank=r,
        alpha=2.0 * r,
        lr=run["lr"],
        seed=run["seed"],
        save_every=10_000,
        keep_checkpoints=1,
    )
    return {"name": name, "train": kw, "extra": extra}


def cli_command(kw: dict, extra: dict, out: str) -> str:
    """The `lorafleet train` command line that makes the same run."""
    flags = {
        "base": kw["base"],
        "data": kw["data"],
        "method": kw["method"],
        "rank": kw["rank"],
        "alpha": kw["alpha"],
        "lr": kw["lr"],
        "steps": kw["steps"],
        "batch-size": kw["batch_size"],
        "train-limit": kw["train_limit"],
        "eval-limit": kw["eval_limit"],
        "eval-every": kw["eval_every"],
        "max-length": kw["max_length"],
        "seed": kw["seed"],
        "out": out,
    }
    if extra.get("bilevel"):
        flags["bilevel"] = extra["bilevel"]
    parts = ["lorafleet", "train"] + [f"--{k} {shlex.quote(str(v))}" for k, v in flags.items()]
    parts += [f"--val-metric {m}" for m in kw.get("val_metrics") or ()]
    return " ".join(parts)


def after_run(trainer, run: dict, sz: dict) -> dict:
    """sst2: accuracy on the run's own training rows; clutrr: exact match on validation rows."""
    tok, model = trainer.base.tokenizer, trainer.model
    if run["experiment"] == "bilora":
        rows = load_examples("sst2", tok, split="train", limit=sz["bi_rows"])
        figures = evaluate(model, tok, rows, metrics=("accuracy",), batch_size=32)
        return {"train_accuracy": figures["accuracy"], "train_loss": figures.get("loss")}
    rows = load_examples("clutrr", tok, split="validation", limit=sz["em_rows"])
    figures = evaluate(
        model,
        tok,
        rows,
        metrics=("exact_match",),
        batch_size=50,
        max_new_tokens=24,
        max_length=sz["bone_max_length"],
    )
    return {"val_exact_match": figures["exact_match"]}


def one_run(run: dict, sz: dict, runs_dir: Path) -> dict:
    out = runs_dir / run["name"]
    kw, extra = run["train"], run["extra"]
    record = {k: run[k] for k in ("experiment", "variant", "seed", "lr", "name")}
    record["command"] = cli_command(kw, extra, str(out))
    cfg = TrainConfig(out=out, extra=bilora_options(kw["method"], **extra), **kw)
    stamps: list[float] = []
    on_step = lambda step, loss: stamps.append(time.perf_counter())  # noqa: E731
    trainer = (
        BiLoRATrainer(cfg, on_step=on_step)
        if kw["method"] == "bilora"
        else Trainer(cfg, on_step=on_step)
    )
    start = time.perf_counter()
    result = trainer.run()
    if result.get("interrupted"):  # SIGINT / SIGTERM: the trainer saved a checkpoint; stop here
        raise KeyboardInterrupt(f"{run['name']} stopped by a signal at step {result['steps']}")
    record["wall_s"] = time.perf_counter() - start
    record["trainable_params"] = sum(
        p.numel() for p in trainer.model.parameters() if p.requires_grad
    )
    diffs = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    record["median_step_s"] = statistics.median(diffs) if diffs else None
    val = result.get("validation") or {}
    record.update({k: v for k, v in val.items() if k.startswith("val_")})
    record.update(after_run(trainer, run, sz))
    record["status"] = "ok"
    del trainer
    return record


def base_record(model, tok, sz: dict, base: str) -> list[dict]:
    """The base model alone on both validation sets (the curves' starting point)."""
    sst2 = load_examples("sst2", tok, split="validation", limit=sz["bi_val"])
    clutrr = load_examples("clutrr", tok, split="validation", limit=sz["em_rows"])
    a = evaluate(model, tok, sst2, metrics=("accuracy",), batch_size=32)
    e = evaluate(
        model,
        tok,
        clutrr,
        metrics=("exact_match", "perplexity"),
        batch_size=50,
        max_new_tokens=24,
        max_length=sz["bone_max_length"],
    )
    return [
        {
            "experiment": "bilora",
            "variant": "base",
            "name": "base",
            "status": "ok",
            "val_accuracy": a["accuracy"],
            "val_loss": a.get("loss"),
            "base": base,
        },
        {
            "experiment": "bone",
            "variant": "base",
            "name": "base",
            "status": "ok",
            "val_exact_match": e["exact_match"],
            "val_loss": e.get("loss"),
            "base": base,
        },
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True, help="Run dirs and runs.jsonl go here.")
    ap.add_argument("--base", default=os.environ.get("LF16_BASE", "default"))
    ap.add_argument("--quick", action="store_true", help="A handful of steps per run.")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=float(os.environ.get("LF16_BUDGET_S", 480)),
        help="Start no new run after this many seconds.",
    )
    ap.add_argument("--bone-rank", type=int, default=int(os.environ.get("LF16_BONE_RANK", 64)))
    ap.add_argument("--bilora-rank", type=int, default=int(os.environ.get("LF16_BI_RANK", 8)))
    ap.add_argument(
        "--only",
        default="",
        help="Comma-separated run names: run just these "
        "(e.g. a seed left out earlier); runs.jsonl gets only their lines.",
    )
    ap.add_argument("--no-base", action="store_true", help="Skip the base model's evaluation.")
    args = ap.parse_args()
    t0 = time.perf_counter()
    args.runs.mkdir(parents=True, exist_ok=True)
    log = args.runs / "runs.jsonl"
    log.unlink(missing_ok=True)
    sz = sizes(args.quick)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_base(args.base, device=device)  # converts a GGUF once (cached)
    ranks = matched_ranks(loaded.model, args.bone_rank, args.bilora_rank)
    header = {
        "experiment": "meta",
        "name": "meta",
        "base": args.base,
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch": torch.__version__,
        "quick": args.quick,
        "ranks": ranks,
        "sizes": {k: v for k, v in sz.items()},
        "load_s": loaded.load_seconds,
    }
    records = [header]
    if not args.no_base:
        records += base_record(loaded.model, loaded.tokenizer, sz, args.base)
    del loaded
    runs = plan(sz, ranks, args.base)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {r["name"] for r in runs}
        if unknown:
            ap.error(f"--only: no run named {sorted(unknown)[0]!r}")
        runs = [r for r in runs if r["name"] in wanted]
    print(f"run16: {len(runs)} runs on {device}; ranks {ranks}", flush=True)
    with open(log, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for i, run in enumerate(runs):
            elapsed = time.perf_counter() - t0
            if elapsed > args.budget_s:
                rec = {
                    **{k: run[k] for k in ("experiment", "variant", "seed", "lr", "name")},
                    "status": "skipped (time budget)",
                }
            else:
                print(f"run16: [{i + 1}/{len(runs)}] {run['name']} at {elapsed:.0f}s", flush=True)
                try:
                    rec = one_run(run, sz, args.runs)
                except Exception as exc:  # noqa: BLE001 - log it, go on with the next run
                    traceback.print_exc()
                    rec = {
                        **{k: run[k] for k in ("experiment", "variant", "seed", "lr", "name")},
                        "status": f"failed: {exc.__class__.__name__}: {exc}"[:500],
                    }
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            f.write(json.dumps(rec) + "\n")
            f.flush()
            print(f"run16: {json.dumps(rec)[:400]}", flush=True)
    print(f"run16: done in {time.perf_counter() - t0:.0f}s -> {log}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
