#!/usr/bin/env bash
# Real fine-tuning runs on the `default` model (2 CPU cores): zero-shot baseline, a rank-16 LoRA,
# and the adapter's score, for sst2 (accuracy) and clutrr (exact match after ####).
# Usage: bash bench/real_runs.sh   (about 45 minutes on 2 cores; figures in bench/results/)
set -euo pipefail
cd "$(dirname "$0")/.."
L="env PYTHONPATH=${SNAP_SRC:-src} .venv/bin/lorafleet"
RUNS=${RUNS:-runs}
R=bench/results
mkdir -p "$R" "$RUNS"
stamp() { date +%s; }

t0=$(stamp)
$L eval --base default --data sst2 --no-chat --limit 500 --json $R/sst2-base.json
t1=$(stamp)
$L train --base default --data sst2 --no-chat --steps 200 --batch-size 8 --lr 5e-4 \
  --train-limit 8000 --eval-limit 100 --val-metric perplexity --out "$RUNS/sst2"
t2=$(stamp)
$L eval --base default --adapter "$RUNS/sst2" --data sst2 --no-chat --limit 500 --json $R/sst2-lora.json
t3=$(stamp)
$L eval --base default --data clutrr --no-chat --limit 200 --max-new-tokens 20 --json $R/clutrr-base.json
t4=$(stamp)
$L train --base default --data clutrr --no-chat --steps 150 --batch-size 4 --lr 5e-4 \
  --max-length 256 --train-limit 4000 --eval-limit 50 --val-metric perplexity --out "$RUNS/clutrr"
t5=$(stamp)
$L eval --base default --adapter "$RUNS/clutrr" --data clutrr --no-chat --limit 200 --max-new-tokens 20 \
  --json $R/clutrr-lora.json
t6=$(stamp)
cat > $R/real_runs_times.json <<JSON
{"sst2_eval_base_s": $((t1-t0)), "sst2_train_s": $((t2-t1)), "sst2_eval_lora_s": $((t3-t2)),
 "clutrr_eval_base_s": $((t4-t3)), "clutrr_train_s": $((t5-t4)), "clutrr_eval_lora_s": $((t6-t5))}
JSON
echo "done: $R"
