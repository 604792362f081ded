#!/usr/bin/env bash
# Laplace-LoRA on the `default` model (2 CPU cores): fine-tune a rank-8 q,v LoRA to
# over-confidence on a few hundred rows (6 epochs), fit KFAC factors + tune the prior precision
# (`lorafleet calibrate`), then MAP vs Laplace accuracy / ECE / NLL / Brier (`eval --bayes`).
# Usage: nice -n 10 bash bench/laplace_experiment.sh [train|calibrate|eval|heldout|all]
# (default all). Outputs under $OUT (runs/bayes-exp); figures in bench/results/laplace_<task>.json
# ("heldout": the same comparison on validation rows 100-299, disjoint from the rows that
# picked the val-tuned prior precision). About 1.5 hours on 2 busy CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
# One torch thread: on a shared 2-core machine, thread hand-offs cost more than they give.
# SNAP_SRC: run from a copy of src (others may edit the tree meanwhile); the data then has to be
# named, as it is no longer "beside the checkout".
export LORAFLEET_DATA=${LORAFLEET_DATA:-$(cd .. && pwd)/shared/data}
PY="env OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH=${SNAP_SRC:-src} .venv/bin/python"
L="$PY .venv/bin/lorafleet"
OUT=${OUT:-runs/bayes-exp}
TASKS=${TASKS:-"sst2 strategyqa"}
TRAIN_ROWS=${TRAIN_ROWS:-96}
EVAL_ROWS=${EVAL_ROWS:-200}
STAGE=${1:-all}
R=bench/results
mkdir -p "$R" "$OUT"
stamp() { date +%s.%N; }
want() { [[ "$STAGE" == "$1" || "$STAGE" == all ]]; }

for task in $TASKS; do
  dir="$OUT/$task"
  mkdir -p "$dir"
  if want train && [[ ! -f "$dir/adapter/adapter_model.safetensors" ]]; then
    t0=$(stamp)
    $L train --base default --data "$task" --train-limit "$TRAIN_ROWS" --epochs 6 --rank 8 \
      --alpha 16 --targets q_proj,v_proj --lr 1e-3 --max-length 128 --batch-size 8 \
      --eval-limit 50 --save-every 1000 --out "$dir/adapter"
    t1=$(stamp)
    echo "$t0 $t1" | awk '{print $2 - $1}' > "$dir/train_seconds"
  fi
  if want calibrate; then
    t0=$(stamp)
    # Factors from the rows the adapter was trained on; the prior precision by the Laplace
    # marginal likelihood. The first 100 validation rows are reported (and their best prior
    # precision is shown beside by eval --bayes); the evaluation below uses the first
    # EVAL_ROWS validation rows, so the two overlap: the val-tuned figures are optimistic.
    $L calibrate --base default --adapter "$dir/adapter" --data "$task" \
      --train-limit "$TRAIN_ROWS" --val "$task" --val-limit 100 --max-length 128 \
      --n-kfac 16 --weight-samples "${WEIGHT_SAMPLES:-4}" --json "$dir/calibrate.json"
    t1=$(stamp)
    echo "$t0 $t1" | awk '{print $2 - $1}' > "$dir/calibrate_seconds"
  fi
  if want heldout; then
    $PY bench/laplace_heldout.py "$dir/adapter" "$task" 100 300 "$dir/heldout.json"
  fi
  if want eval || want heldout; then
    [[ "$STAGE" == heldout ]] || \
    $L eval --base default --adapter "$dir/adapter" --data "$task" --limit "$EVAL_ROWS" \
      --max-length 128 --bayes --json "$dir/eval.json"  # + eval.reliability.png
    .venv/bin/python - "$dir" "$R/laplace_$task.json" "$task" <<'PY'
import json, os, sys
from pathlib import Path
d, out, task = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
fig = json.loads((d / "eval.json").read_text())
fig["task"] = task
fig["train_seconds"] = float((d / "train_seconds").read_text()) if (d / "train_seconds").exists() else None
fig["calibrate_seconds"] = float((d / "calibrate_seconds").read_text())
cal = json.loads((d / "calibrate.json").read_text())
fig["calibrate_report"] = {k: v for k, v in cal.items() if k not in ("base", "adapter", "data")}
if (d / "heldout.json").exists():
    fig["heldout_rows_100_299"] = json.loads((d / "heldout.json").read_text())
if fig["train_seconds"]:
    fig["calibrate_over_train"] = fig["calibrate_seconds"] / fig["train_seconds"]
    fig["fit_over_train"] = cal["fit_seconds"] / fig["train_seconds"]
tmp = out.with_name(out.name + ".tmp")
tmp.write_text(json.dumps(fig, indent=2) + "\n")
os.replace(tmp, out)
print(f"wrote {out}")
PY
  fi
done
echo "done: $OUT"
