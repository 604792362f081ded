#!/usr/bin/env bash
# MoLE (the paper's block gate, task-balanced) vs arithmetic merges over the three demo task
# adapters (issue 29), on held-out validation rows, two gate seeds + paired bootstrap over rows.
#
#   bench/mole_experiment.sh [DEMO_ADAPTERS_DIR] [OUT] [RESULTS]
#
# 1. copies the experts (sst2, strategyqa, clutrr) next to each other under OUT/adapters and
#    merges them (linear = normalised average at 1/3 each, TIES and DARE-TIES at density 0.5);
# 2. trains MoLE gates (block gate: one per transformer block on the experts' outputs, learnable
#    temperature, balance weight 0.5; task-balanced: rows drawn evenly per task, each task's
#    mean row loss weighing the same) for each seed in SEEDS on TRAIN_LIMIT train-split rows per
#    task (one row per task per step, 150 steps, lr 1e-2), and (LINEAR=1) the per-linear gate
#    with the same recipe for seed 0;
# 3. scores each configuration on the demo's held-out rows (validation split: sst2 150,
#    strategyqa 150, clutrr 50; never seen by the gates) with bench/mole_eval.py: each task's own
#    expert (= the oracle), the merges and the MoLEs; then the table, the paired bootstrap of
#    MoLE's average minus the best merge's, and the gates' loss curves (RESULTS/gate_loss.png).
set -euo pipefail
A=${1:-runs/demo/adapters}
OUT=${2:-runs/mole29}
RESULTS=${3:-bench/results/mole29}
LF=${LF:-.venv/bin/lorafleet}
PY=${PY:-.venv/bin/python}
BASE=${BASE:-default}
STEPS=${STEPS:-150}              # gate steps (the loss curve's quarters are checked for a plateau)
BATCH=${BATCH:-3}                # rows per step: 1 per task (one micro-batch per task)
LR=${LR:-1e-2}
TRAIN_LIMIT=${TRAIN_LIMIT:-128}  # train-split rows per task
SEEDS=${SEEDS:-"0 1"}
LINEAR=${LINEAR:-0}             # 1: also the per-linear gate (seed 0)
TASK_ROWS=${TASK_ROWS:-}        # e.g. sst2=8,strategyqa=8,clutrr=4 for a toy run
TASKS=(sst2 strategyqa clutrr)

mkdir -p "$OUT/adapters"
for t in "${TASKS[@]}"; do
  [ -e "$OUT/adapters/$t" ] || cp -r "$A/$t" "$OUT/adapters/$t"
done
E=$OUT/adapters
experts=(); for t in "${TASKS[@]}"; do experts+=(-a "$t=$E/$t:1"); done
third=(); for t in "${TASKS[@]}"; do third+=(-a "$t=$E/$t:0.3333333"); done
[ -e "$E/linear-avg" ] || $LF merge -b "$BASE" "${third[@]}" -m linear -o "$E/linear-avg"
[ -e "$E/ties" ] || $LF merge -b "$BASE" "${experts[@]}" -m ties --density 0.5 -o "$E/ties"
[ -e "$E/dare-ties" ] || $LF merge -b "$BASE" "${experts[@]}" -m dare_ties --density 0.5 --seed 0 \
  -o "$E/dare-ties"

mole=(); for t in "${TASKS[@]}"; do mole+=(-e "$t=$E/$t"); done
train_gates() {  # DIR GATE SEED
  local dir=$1 gate=$2 seed=$3
  [ -e "$dir/mole_config.json" ] && return 0
  local resume=(); [ -d "$dir/checkpoints" ] && resume=(--resume)
  $LF mole train -b "$BASE" "${mole[@]}" -d sst2 -d strategyqa -d clutrr \
    --train-limit "$TRAIN_LIMIT" --steps "$STEPS" --batch-size "$BATCH" --lr "$LR" \
    --max-length 320 --gate "$gate" --balance-weight 0.5 --seed "$seed" -o "$dir" "${resume[@]}"
}
eval_() { $PY bench/mole_eval.py eval "$OUT" --base "$BASE" --tasks "$TASK_ROWS" "$@"; }
report() { $PY bench/mole_eval.py report "$OUT" --results "$RESULTS" --tasks "$TASK_ROWS"; }
# The baselines first: each expert on its own task (the oracle), then the merges.
base_configs=()
for t in "${TASKS[@]}"; do base_configs+=("expert-$t=adapter:$E/$t@$t"); done
for m in linear-avg ties dare-ties; do base_configs+=("$m=adapter:$E/$m"); done
eval_ "${base_configs[@]}"
for s in $SEEDS; do
  train_gates "$E/mole-block-s$s" block "$s"
  eval_ "mole-block-s$s=mole:$E/mole-block-s$s"
  report
done
if [ "$LINEAR" = 1 ]; then
  train_gates "$E/mole-linear-s0" linear 0
  eval_ "mole-linear-s0=mole:$E/mole-linear-s0"
  report
fi
