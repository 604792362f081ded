"""Laplace-LoRA figures on validation rows disjoint from the 100 used to pick the val-tuned prior.

Usage: python bench/laplace_heldout.py ADAPTER_DIR TASK START STOP OUT_JSON
(rows START..STOP-1 of the task's validation split; MAP, evidence-tuned and val-tuned Laplace).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lorafleet.adapters import load_adapter
from lorafleet.bayes import evaluate_bayes, load_factors
from lorafleet.bayes.io import read_info
from lorafleet.data import ExampleSet, load_examples
from lorafleet.models import load_base


def main(adapter: str, task: str, start: int, stop: int, out: str) -> None:
    base = load_base("default")
    _, model = load_adapter(adapter, base.model, base_fingerprint=base.fingerprint)
    factors = load_factors(adapter)
    grid = read_info(adapter)["tuning"]["val_grid"]
    best = min(grid, key=lambda row: row["nll"])["prior_precision"]
    rows = load_examples(task, base.tokenizer, split="validation", limit=stop)
    held = ExampleSet(rows.examples[start:stop], rows.name, rows.metric, rows.answer_marker)
    figures = evaluate_bayes(
        model,
        base.tokenizer,
        factors,
        held,
        max_length=128,
        also={"val_tuned": best},
        show_progress=True,
        plot=Path(out).with_suffix(".png"),
    )
    figures["rows"] = [start, stop]
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    tmp.write_text(json.dumps(figures, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps({k: figures[k] for k in ("map", "laplace", "laplace_val_tuned")}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
