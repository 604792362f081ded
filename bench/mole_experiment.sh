#!/usr/bin/env bash
# MoLE vs arithmetic merges over the three demo task adapters (issue 15), on held-out rows.
#
#   bench/mole_experiment.sh [DEMO_ADAPTERS_DIR] [OUT]
#
# Copies the experts (sst2, strategyqa, clutrr) next to each other under OUT/adapters, merges
# them (normalised average = linear at 1/3 each, TIES and DARE-TIES at density 0.5), trains MoLE gates on a small mixed set from
# the training splits, then scores on each task's validation rows (the same rows for every
# configuration): MoLE, each expert alone (-> the oracle), the merges, and MoLE with each
# expert masked. Writes OUT/eval/*.json and OUT/table.md. Sizes via the variables below.
set -euo pipefail
A=${1:-runs/demo/adapters}
OUT=${2:-runs/mole-exp}
LF=${LF:-.venv/bin/lorafleet}
BASE=${BASE:-default}
STEPS=${STEPS:-60}            # gate training steps
TRAIN_LIMIT=${TRAIN_LIMIT:-64}  # training rows per task (mixed 1:1:1)
BATCH=${BATCH:-8}
GATE=${GATE:-outputs}
TASKS=(sst2 strategyqa clutrr)
declare -A LIMIT=([sst2]=${SST2_LIMIT:-150} [strategyqa]=${SQA_LIMIT:-150} [clutrr]=${CLUTRR_LIMIT:-50})
declare -A MAXLEN=([sst2]=128 [strategyqa]=128 [clutrr]=320)

mkdir -p "$OUT/adapters" "$OUT/eval"
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

run_eval() {  # NAME TASK ARGS...
  local name=$1 task=$2; shift 2
  local out="$OUT/eval/$name--$task.json"
  [ -e "$out" ] && return 0
  $LF eval -b "$BASE" -d "$task" --limit "${LIMIT[$task]}" --max-length "${MAXLEN[$task]}" "$@" --json "$out"
}
# The merge baselines first (issue 14's table), then the gates and MoLE's rows.
for task in "${TASKS[@]}"; do
  for t in "${TASKS[@]}"; do run_eval "expert-$t" "$task" --adapter "$E/$t"; done
  for m in linear-avg ties dare-ties; do run_eval "$m" "$task" --adapter "$E/$m"; done
done
mole=(); for t in "${TASKS[@]}"; do mole+=(-e "$t=$E/$t"); done
if [ ! -e "$E/mole/mole_config.json" ]; then
  resume=(); [ -d "$E/mole/checkpoints" ] && resume=(--resume)
  $LF mole train -b "$BASE" "${mole[@]}" -d sst2 -d strategyqa -d clutrr --train-limit "$TRAIN_LIMIT" \
    --steps "$STEPS" --batch-size "$BATCH" --max-length 320 --gate "$GATE" -o "$E/mole" "${resume[@]}"
fi

for task in "${TASKS[@]}"; do
  run_eval mole "$task" --mole "$E/mole"
  for t in "${TASKS[@]}"; do run_eval "mole-mask-$t" "$task" --mole "$E/mole" --mask "$t"; done
done

.venv/bin/python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1]); tasks = ["sst2", "strategyqa", "clutrr"]
def score(name, task):
    f = out / "eval" / f"{name}--{task}.json"
    if not f.exists():
        return None
    r = json.loads(f.read_text())
    return r.get("accuracy", r.get("exact_match"))
rows = ["mole", *[f"expert-{t}" for t in tasks], "oracle", "linear-avg", "ties", "dare-ties",
        *[f"mole-mask-{t}" for t in tasks]]
lines = ["| configuration | " + " | ".join(tasks) + " | average |", "|---" * (len(tasks) + 2) + "|"]
for name in rows:
    vals = [score(f"expert-{t}", t) if name == "oracle" else score(name, t) for t in tasks]
    avg = sum(vals) / len(vals) if all(v is not None for v in vals) else None
    cells = ["-" if v is None else f"{v:.3f}" for v in [*vals, avg]]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
shown = [r for r in rows if all(
    (score(f"expert-{t}", t) if r == "oracle" else score(r, t)) is not None for t in tasks)]
fig, ax = plt.subplots(figsize=(10, 4))
width = 0.8 / max(len(shown), 1)
for i, name in enumerate(shown):
    vals = [score(f"expert-{t}", t) if name == "oracle" else score(name, t) for t in tasks]
    ax.bar([k + i * width for k in range(len(tasks))], vals, width, label=name)
ax.set_xticks([k + 0.4 - width / 2 for k in range(len(tasks))], tasks)
ax.set_ylabel("held-out score"); ax.set_ylim(0, 1)
ax.legend(fontsize=7, ncol=3); fig.tight_layout(); fig.savefig(out / "mole_vs_merges.png", dpi=120)
EOF
