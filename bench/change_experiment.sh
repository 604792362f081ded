#!/usr/bin/env bash
# LoRA of Change (issue 18): train LoC with and without LoRA Reverse on 1 thread, then score both
# and the baselines on held-out photos; writes bench/results/change/{results.json,grid.png}.
set -euo pipefail
export OMP_NUM_THREADS=1
OUT=${OUT:-runs/change}
lorafleet change train --out "$OUT/loc" --seed 0 --resume
lorafleet change train --out "$OUT/loc-no-reverse" --seed 0 --no-reverse --resume
lorafleet change eval -m "LoC=$OUT/loc" -m "LoC no Reverse=$OUT/loc-no-reverse" \
    --per-edit 8 --seed 0 --out bench/results/change
