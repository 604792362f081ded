"""Experiment: rank stability of LoRA (alpha/r) vs rsLoRA (alpha/sqrt(r)).

Same data, steps, lr and alpha for every run; ranks 4..256. The rsLoRA paper's claim: with
alpha/r, higher ranks stop helping because the adapter's output and gradients shrink like
1/sqrt(r); with alpha/sqrt(r) they stay flat and loss keeps improving with rank. Reported per
run: final training loss (mean of the last 5 steps), validation loss, mean gradient norm, and
||gamma B A x|| / ||W0 x|| on a mid-depth q_proj after training.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from lorafleet.bench import print_table, write_json


@torch.no_grad()
def _update_ratio(trainer) -> float:
    """||scale * B A x|| / ||W0 x|| at a mid-depth q_proj, on one training batch."""
    layers = trainer.model.base_model.model.model.layers
    layer = layers[len(layers) // 2].self_attn.q_proj
    captured = {}
    hook = layer.register_forward_hook(lambda m, args, out: captured.setdefault("x", args[0]))
    batch = trainer.collate(trainer.train[: trainer.cfg.batch_size])
    trainer.model.eval()
    trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hook.remove()
    x = captured["x"]
    base = layer.base_layer(x)
    delta = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    return float(delta.norm() / base.norm())


def run(
    base: str,
    data: str,
    ranks: list[int],
    alpha: float,
    steps: int,
    lr: float,
    batch_size: int,
    max_length: int,
    train_limit: int,
    eval_limit: int,
    chat: bool,
    out_dir: str | Path,
    json_out: str | Path,
) -> dict:
    from lorafleet.train import TrainConfig, Trainer

    rows = []
    for method in ("lora", "rslora"):
        for rank in ranks:
            out = Path(out_dir) / f"{method}-r{rank}"
            cfg = TrainConfig(
                base=base,
                data=data,
                out=out,
                method=method,
                rank=rank,
                alpha=alpha,
                steps=steps,
                lr=lr,
                batch_size=batch_size,
                max_length=max_length,
                train_limit=train_limit,
                eval_limit=eval_limit,
                val_metrics=("perplexity",),
                chat=chat,
                max_grad_norm=0.0,
                save_every=steps,
                keep_checkpoints=1,
                seed=0,
            )
            trainer = Trainer(cfg)
            result = trainer.run()
            logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in logged if r["split"] == "train"]
            rows.append(
                {
                    "method": method,
                    "rank": rank,
                    "scale": alpha / (rank**0.5 if method == "rslora" else rank),
                    "train_loss_last5": statistics.fmean(r["loss"] for r in train[-5:]),
                    "val_loss": (result.get("validation") or {}).get("val_loss"),
                    "grad_norm_mean": statistics.fmean(r["grad_norm"] for r in train),
                    "update_ratio": _update_ratio(trainer),
                }
            )
            print_table(rows[-1:], list(rows[-1]))
    columns = [
        "method",
        "rank",
        "scale",
        "train_loss_last5",
        "val_loss",
        "grad_norm_mean",
        "update_ratio",
    ]
    print_table(rows, columns)
    figures = {
        "benchmark": "rslora",
        "base": base,
        "data": data,
        "alpha": alpha,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "rows": rows,
    }
    print(f"wrote {write_json(json_out, figures)}")
    return figures
