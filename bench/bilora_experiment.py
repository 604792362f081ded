"""Issue 29's BiLoRA experiment: do the defaults learn, and does BiLoRA over-fit less than LoRA?

Every run is `lorafleet train`'s own TrainConfig and trainer (its equivalent command line is
recorded), in one process: LoRA, the P-Lambda-Q joint control (`--bilevel joint`) and BiLoRA
first-order (the default), each seed, on the first ROWS sst2 training rows. Held-out rows: the
first VAL rows of sst2's validation split, scored only after training (accuracy and the
label-token loss, -log p(label | prompt) without the end-of-turn token); nothing is chosen on
them. After each run the same figures on its own training rows (the first TRAIN_EVAL of them:
scoring costs about a third of training) give the train - validation gap, and max / median
||delta W||_2 over the adapted linears says how far the weights moved.

    # the measurement: one job per seed through the slot runner (~20 min each, single-threaded)
    bash /work/notes/exp_run.sh LOG .venv/bin/python bench/bilora_experiment.py \
        --runs runs/bilora29 --out bench/results/bilora29 --seeds 0
    bash /work/notes/exp_run.sh LOG .venv/bin/python bench/bilora_experiment.py \
        --runs runs/bilora29 --out bench/results/bilora29 --seeds 1 --no-base

    python bench/bilora_experiment.py --runs runs/bilora29 --out bench/results/bilora29
    python bench/bilora_experiment.py --toy --runs runs/bilora29-toy   # the lambda-lr diagnosis

`--toy`: a randomly initialised one-layer Llama as wide as SmolLM2 (576 / 1536), 32 steps of 8
sst2 rows at lr 1e-3: ||delta W||_2 for LoRA and for joint / first-order BiLoRA with lambda at
the run's lr (the old default) and at 2e-2 (minutes: the 49k-word head dominates).
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import time
import traceback
from pathlib import Path

import torch

VARIANTS = ("lora", "joint", "first")


def delta_norms(model) -> list[float]:
    """||delta W||_2 of every adapted linear: P diag(lambda) Q for BiLoRA, s B A for LoRA."""
    from peft.tuners.lora import LoraLayer

    from lorafleet.layers.bilora import pseudo_svd_layers

    parts = pseudo_svd_layers(model)
    with torch.no_grad():
        if parts:
            deltas = [p.delta() for p in parts.values()]
        else:
            deltas = [
                m.get_delta_weight("default")
                for m in model.modules()
                if isinstance(m, LoraLayer) and "default" in m.lora_A
            ]
        return [float(torch.linalg.matrix_norm(d.float(), ord=2)) for d in deltas]


def train_kwargs(args, variant: str, seed: int, base: str) -> tuple[dict, dict]:
    """TrainConfig keywords and BiLoRA extra options of one run."""
    method = "lora" if variant.startswith("lora") else "bilora"
    kw = dict(
        base=base,
        data="sst2",
        method=method,
        rank=args.rank,
        alpha=2.0 * args.rank,  # LoRA's usual alpha = 2r; BiLoRA always uses alpha = r (scale 1)
        lr=args.lr,
        steps=args.steps,
        batch_size=args.batch,
        train_limit=args.rows,
        eval_limit=args.val,
        eval_every=args.eval_every,
        max_length=256,
        seed=seed,
        save_every=10_000,
        keep_checkpoints=1,
    )
    extra = {}
    if method == "bilora":
        extra["bilevel"] = variant.split("@")[0]
        if "@" in variant:  # e.g. first@0.001: an explicit --lambda-lr
            extra["lambda_lr"] = float(variant.split("@")[1])
    return kw, extra


def cli_command(kw: dict, extra: dict, out: str) -> str:
    """The `lorafleet train` command line that makes the same run."""
    names = ("base", "data", "method", "rank", "alpha", "lr", "steps", "batch_size")
    names += ("train_limit", "eval_limit", "eval_every", "max_length", "seed")
    flags = {n.replace("_", "-"): kw[n] for n in names}
    flags.update({k.replace("_", "-"): v for k, v in extra.items()})
    flags["out"] = out
    return " ".join(
        ["lorafleet", "train"] + [f"--{k} {shlex.quote(str(v))}" for k, v in flags.items()]
    )


def one_run(args, variant: str, seed: int, base: str) -> dict:
    from lorafleet.data import load_examples
    from lorafleet.eval import evaluate
    from lorafleet.train import TrainConfig, trainer_for
    from lorafleet.train.bilora import bilora_options

    name = f"{variant}-s{seed}"
    out = args.runs / name
    kw, extra = train_kwargs(args, variant, seed, base)
    record = {
        "name": name,
        "variant": variant,
        "seed": seed,
        "command": cli_command(kw, extra, str(out)),
    }
    cfg = TrainConfig(out=out, extra=bilora_options(kw["method"], **extra), **kw)
    stamps: list[float] = []
    trainer = trainer_for(cfg, on_step=lambda step, loss: stamps.append(time.perf_counter()))
    start = time.perf_counter()
    result = trainer.run()
    record["wall_s"] = time.perf_counter() - start
    diffs = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    record["median_step_s"] = statistics.median(diffs) if diffs else None
    record["extra"] = cfg.extra
    val = result.get("validation") or {}
    record.update({k: v for k, v in val.items() if k.startswith("val_")})
    tok = trainer.base.tokenizer
    if not args.toy:  # the run's own training rows: the train side of the gap
        rows = load_examples("sst2", tok, split="train", limit=min(args.rows, args.train_eval))
        figures = evaluate(trainer.model, tok, rows, metrics=("accuracy",), batch_size=32)
        record["train_accuracy"] = figures["accuracy"]
        record["train_label_loss"] = figures["label_loss"]
        record["gap_accuracy"] = record["train_accuracy"] - record.get("val_accuracy", float("nan"))
        record["gap_label_loss"] = (
            record.get("val_label_loss", float("nan")) - record["train_label_loss"]
        )
    norms = delta_norms(trainer.model)
    record["delta_max"] = max(norms)
    record["delta_median"] = statistics.median(norms)
    record["status"] = "ok"
    del trainer
    gc.collect()
    return record


def base_record(args, base: str) -> dict:
    """The base model alone on the held-out rows (where every run starts)."""
    from lorafleet.data import load_examples
    from lorafleet.eval import evaluate
    from lorafleet.models import load_base

    loaded = load_base(base)
    tok = loaded.tokenizer
    val = load_examples("sst2", tok, split="validation", limit=args.val)
    train = load_examples("sst2", tok, split="train", limit=min(args.rows, args.train_eval))
    v = evaluate(loaded.model, tok, val, metrics=("accuracy",), batch_size=32)
    t = evaluate(loaded.model, tok, train, metrics=("accuracy",), batch_size=32)
    return {
        "name": "base",
        "variant": "base",
        "status": "ok",
        "val_accuracy": v["accuracy"],
        "val_label_loss": v["label_loss"],
        "train_accuracy": t["accuracy"],
        "train_label_loss": t["label_loss"],
        "gap_accuracy": t["accuracy"] - v["accuracy"],
        "gap_label_loss": v["label_loss"] - t["label_loss"],
    }


def toy_base(runs: Path) -> str:
    """A random one-layer Llama of SmolLM2's width with the real tokenizer, saved under runs."""
    from transformers import LlamaForCausalLM

    from lorafleet.models.tiny import default_tokenizer, tiny_llama_config

    path = runs / "toy-base"
    if not (path / "config.json").is_file():
        tok = default_tokenizer()
        config = tiny_llama_config(vocab_size=len(tok), hidden=576, layers=1)
        config.intermediate_size, config.initializer_range = 1536, 0.02  # SmolLM2's
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
        tok.save_pretrained(path)
    return str(path)


COLUMNS = (
    ("val_accuracy", "val acc"),
    ("train_accuracy", "train acc"),
    ("gap_accuracy", "gap (acc)"),
    ("val_label_loss", "val label loss"),
    ("train_label_loss", "train label loss"),
    ("gap_label_loss", "gap (label loss)"),
    ("val_loss", "val 2-token loss"),
    ("delta_max", "max ||dW||_2"),
    ("median_step_s", "s/step"),
)


def summarise(records: list[dict]) -> str:
    """A markdown table: per variant, mean ± sd over seeds of each column."""
    by: dict[str, list[dict]] = {}
    for r in records:
        if r.get("status") == "ok":
            by.setdefault(r["variant"], []).append(r)
    lines = [
        "| variant | seeds | " + " | ".join(h for _, h in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for variant, rows in by.items():
        cells = []
        for key, _ in COLUMNS:
            xs = [r[key] for r in rows if isinstance(r.get(key), int | float)]
            if not xs:
                cells.append("")
            elif len(xs) == 1:
                cells.append(f"{xs[0]:.3f}")
            else:
                cells.append(f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}")
        lines.append(f"| {variant} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True, help="Run dirs and runs.jsonl go here.")
    ap.add_argument("--out", type=Path, help="runs.jsonl and table.md are copied here.")
    ap.add_argument("--base", default="default")
    ap.add_argument("--toy", action="store_true", help="The lambda-lr diagnosis (see above).")
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="lora, joint, first, second; joint@LR / first@LR: with --lambda-lr LR.",
    )
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--rows", type=int, default=256, help="sst2 training rows (first N).")
    ap.add_argument("--val", type=int, default=120, help="held-out sst2 validation rows (first N).")
    ap.add_argument(
        "--train-eval",
        type=int,
        default=128,
        help="Score the first N of the training rows for the train side of the gap.",
    )
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=0, help="0: validation at the end only.")
    ap.add_argument("--no-base", action="store_true", help="Skip the base model's figures.")
    args = ap.parse_args()
    if args.toy:
        args.steps, args.val, args.no_base = 32, 8, True
        if args.variants == ",".join(VARIANTS):
            args.variants = f"lora,joint@{args.lr},first@{args.lr},joint@0.02,first@0.02"
    args.runs.mkdir(parents=True, exist_ok=True)
    base = toy_base(args.runs) if args.toy else args.base
    log = args.runs / "runs.jsonl"
    t0 = time.perf_counter()
    records = [] if args.no_base else [base_record(args, base)]
    with open(log, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for seed in [int(s) for s in args.seeds.split(",")]:
            for variant in args.variants.split(","):
                print(
                    f"bilora29: {variant} seed {seed} at {time.perf_counter() - t0:.0f}s",
                    flush=True,
                )
                try:
                    rec = one_run(args, variant, seed, base)
                except Exception as exc:  # noqa: BLE001 - log it, go on with the next run
                    traceback.print_exc()
                    rec = {
                        "name": f"{variant}-s{seed}",
                        "variant": variant,
                        "seed": seed,
                        "status": f"failed: {exc.__class__.__name__}: {exc}"[:500],
                    }
                records.append(rec)
                f.write(json.dumps(rec) + "\n")
                f.flush()
                print(f"bilora29: {json.dumps(rec)[:600]}", flush=True)
    # Every run in the log (a job per seed may share it): the latest line of each name counts.
    latest = {}
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        latest[rec["name"]] = rec
    table = summarise(list(latest.values()))
    (args.runs / "table.md").write_text(table)
    print(table, flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("runs.jsonl", log.read_text()), ("table.md", table)):
            tmp = args.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(args.out / name)
    print(f"bilora29: done in {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
