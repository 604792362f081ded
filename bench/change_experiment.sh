#!/usr/bin/env bash
# LoRA of Change (issue 29): train the default LoC (residual editor, flipped-pair query, random
# <A, A'> exchange, LoRA Reverse on invertible edits) with two seeds on 1 thread, then score
# them against identity, "G alone", copy and difference per edit family on held-out photos;
# writes $RESULTS/{results.json,grid.png,table.md,times.txt} (and $RESULTS/seed0/: the first
# seed alone, scored as soon as it is trained). Run it through the slot runner:
#   nohup bash /work/notes/exp_run.sh /work/notes/exp_loc.log bash bench/change_experiment.sh &
# Toy size (a minute or two): STEPS=20 EDITOR_STEPS=10 PER_EDIT=1 OUT=runs/change29-toy \
#   RESULTS=runs/change29-toy/eval bash bench/change_experiment.sh
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OUT=${OUT:-runs/change29}
RESULTS=${RESULTS:-bench/results/loc29}
STEPS=${STEPS:-2000}
EDITOR_STEPS=${EDITOR_STEPS:-500}
PER_EDIT=${PER_EDIT:-12}
SEEDS=${SEEDS:-"0 1"}
LORAFLEET=${LORAFLEET:-.venv/bin/lorafleet}
mkdir -p "$RESULTS"
: > "$RESULTS/times.txt"

score() {  # score DIR MODEL_ARGS...: evaluate on the held-out quads (seed 0), write DIR/table.md
    local dir=$1
    shift
    local start
    start=$(date +%s)
    "$LORAFLEET" change eval "$@" --per-edit "$PER_EDIT" --seed 0 --out "$dir" | tee "$dir.table.md"
    mv "$dir.table.md" "$dir/table.md"
    echo "eval $dir: $(($(date +%s) - start)) s" >> "$RESULTS/times.txt"
}

models=()
for s in $SEEDS; do
    start=$(date +%s)
    "$LORAFLEET" change train --out "$OUT/loc-s$s" --seed "$s" --steps "$STEPS" \
        --editor-steps "$EDITOR_STEPS" --resume --quiet
    echo "train seed $s: $(($(date +%s) - start)) s" >> "$RESULTS/times.txt"
    models+=(-m "LoC=$OUT/loc-s$s")
    if [ ${#models[@]} -eq 2 ]; then  # the first seed alone, in case the run is cut short
        score "$RESULTS/seed$s" "${models[@]}"
    fi
done
score "$RESULTS" "${models[@]}"
cat "$RESULTS/times.txt"
