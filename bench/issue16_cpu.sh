#!/usr/bin/env bash
# Issue 16's two experiments at the size a 2-core CPU runs in about 2 hours (BENCHMARKS.md,
# "BiLoRA / Bone / Bat"): bench/gpu/run16.py with smaller sizes, then the tables and charts.
#
#   bash bench/issue16_cpu.sh                 # every run -> runs/issue16-cpu, bench/results/issue16
#   ONLY=bilora-lora-s2,bilora-joint-s2 bash bench/issue16_cpu.sh   # just these runs, appended
#
# Sizes: BiLoRA: the first 256 sst2 training rows, 64 steps of 8 (2 epochs), lr 1e-3, rank 8,
# validation accuracy on the first 120 validation rows every 16 steps, seeds 0-2. Bone / Bat /
# LoRA: the first 600 clutrr training rows, 40 steps of 4, max length 256, Bone / Bat rank 32 and
# LoRA rank 16 (equal trainable counts), lr 1e-4 / 3e-4 / 1e-3, validation loss on 40 rows every
# 20 steps, exact match on those 40 rows at the end. Run it alone: two torch jobs thrash 2 cores.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUNS=${RUNS:-runs/issue16-cpu}
OUT=${OUT:-bench/results/issue16}
export LF16_BI_ROWS=256 LF16_BI_VAL=120 LF16_BI_STEPS=64 LF16_BI_EVERY=16 LF16_BI_BATCH=8
export LF16_BI_LR=1e-3 LF16_BONE_ROWS=600 LF16_BONE_VAL=40 LF16_BONE_STEPS=40 LF16_BONE_EVERY=20
export LF16_BONE_BATCH=4 LF16_BONE_MAX_LENGTH=256 LF16_EM_ROWS=40
PY=${PY:-.venv/bin/python}
if [ -n "${ONLY:-}" ]; then  # a separate runs dir, then its run dirs and lines join the main one
  part="$RUNS-part"
  "$PY" bench/gpu/run16.py --runs "$part" --base default --budget-s 1e9 --bone-rank 32 \
    --only "$ONLY" --no-base
  for name in ${ONLY//,/ }; do rm -rf "${RUNS:?}/$name" && mv "$part/$name" "$RUNS/$name"; done
  "$PY" - "$RUNS/runs.jsonl" "$part/runs.jsonl" "$ONLY" <<'PYEOF'
import json, sys
main, part, only = sys.argv[1], sys.argv[2], set(sys.argv[3].split(","))
keep = [l for l in open(main) if json.loads(l).get("name") not in only]  # drop earlier tries
new = [l for l in open(part) if json.loads(l).get("experiment") != "meta"]
open(main, "w").writelines(keep + new)
PYEOF
else
  "$PY" bench/gpu/run16.py --runs "$RUNS" --base default --budget-s 1e9 --bone-rank 32
fi
MPLBACKEND=Agg "$PY" bench/gpu/summarise16.py --runs "$RUNS" --out "$OUT"
