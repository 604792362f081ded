#!/usr/bin/env bash
# Issue 29's Laplace-LoRA experiment (about 25 min per seed on one thread; outputs in
# runs/laplace29/, tables in bench/results/laplace29/laplace_overconf_seedN.{json,md}):
#   bash bench/laplace29_experiment.sh --seeds 0; bash bench/laplace29_experiment.sh --seeds 1
# Per seed an over-confident sst2 adapter (LoRA on q, v
# and lm_head, 32 training rows x 15 epochs), KFAC-expand on training rows 0-499, the prior
# tuned by the evidence (100 Adam steps, and the grid), MAP vs Laplace (all, last_layer) on
# validation rows 0-299, which nothing else saw.
set -euo pipefail
cd "$(dirname "$0")/.."
export LORAFLEET_DATA=${LORAFLEET_DATA:-/work/shared/data} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python bench/laplace_overconf.py --train-rows 32 --epochs 15 \
    --fit-rows 500 --eval-rows 300 --out runs/laplace29 --results bench/results/laplace29 "$@"
