#!/usr/bin/env bash
# FedEx-LoRA vs FedAvg vs FFA-LoRA vs centralised on sst2 with the `default` model (2 CPU cores):
# 4 clients, Dirichlet(0.5) non-IID split over the labels of the first $TRAIN_ROWS training rows,
# $ROUNDS rounds x $STEPS local steps (batch 4, rank 8, alpha 16, lr 1e-3, max length 128); the
# global model is scored on the first $EVAL_ROWS validation rows before training and after
# every round. Centralised = `lorafleet train` on the union of the same rows, with the same
# total number of steps (clients x rounds x local steps), scored at the same points.
# Usage: nice -n 10 bash bench/fed_experiment.sh   (about two hours on 2 busy shared cores)
#   AGGS="fedex fedavg" CENTRAL=0 ... runs a subset (two such invocations can run side by side).
# Outputs under $OUT (runs/fed-exp); figures in bench/results/fed_sst2.json.
set -euo pipefail
cd "$(dirname "$0")/.."
L="env PYTHONPATH=${SNAP_SRC:-src} .venv/bin/lorafleet"
OUT=${OUT:-runs/fed-exp}
CLIENTS=${CLIENTS:-4}
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-15}
TRAIN_ROWS=${TRAIN_ROWS:-4000}
EVAL_ROWS=${EVAL_ROWS:-200}
ALPHA_SPLIT=${ALPHA_SPLIT:-0.5}
R=bench/results
mkdir -p "$R" "$OUT"
COMMON=(--base default --data sst2 --no-chat --batch-size 4 --rank 8 --alpha 16 --lr 1e-3
        --max-length 128 --train-limit "$TRAIN_ROWS" --seed 0)

for agg in ${AGGS:-fedex fedavg ffa}; do
  if [[ ! -f "$OUT/$agg/state/round-$ROUNDS/state.json" ]]; then
    resume=()
    [[ -d "$OUT/$agg/state" ]] && resume=(--resume)
    $L fed simulate "${COMMON[@]}" --clients "$CLIENTS" --rounds "$ROUNDS" --local-steps "$STEPS" \
      --aggregation "$agg" --split "dirichlet:$ALPHA_SPLIT" --eval-limit "$EVAL_ROWS" \
      --out "$OUT/$agg" "${resume[@]}"
  fi
done

TOTAL=$((CLIENTS * ROUNDS * STEPS))
if [[ "${CENTRAL:-1}" == 1 && ! -f "$OUT/central/adapter_model.safetensors" ]]; then
  rm -rf "$OUT/central"
  $L train "${COMMON[@]}" --steps "$TOTAL" --warmup 0 --eval-every $((CLIENTS * STEPS)) \
    --eval-limit "$EVAL_ROWS" --save-every 100000 --out "$OUT/central"
fi

.venv/bin/python - "$OUT" "$R/fed_sst2.json" "$CLIENTS" "$STEPS" <<'PY'
import json, sys
from pathlib import Path

out, target, clients, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
result = {"task": "sst2", "base": "default", "clients": clients, "local_steps": steps, "runs": {}}
for agg in ("fedex", "fedavg", "ffa"):
    path = out / agg / "metrics.json"
    if not path.exists():
        continue
    m = json.loads(path.read_text())
    result["partition"] = m.get("partition")
    result["runs"][agg] = [
        {k: r.get(k) for k in ("round", "accuracy", "loss", "aggregation_error", "client_loss",
                               "seconds")}
        for r in m["rounds"]
    ]
central = out / "central" / "metrics.jsonl"
if central.exists():
    rows = [json.loads(line) for line in central.read_text().splitlines() if line.strip()]
    val = [r for r in rows if r.get("split") == "val"]
    result["runs"]["centralised"] = [
        {"round": r["step"] // (clients * steps), "step": r["step"], "accuracy": r.get("val_accuracy"),
         "loss": r.get("val_loss")}
        for r in val
    ]
target.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result["runs"], indent=1))
PY
echo "done: $R/fed_sst2.json"
