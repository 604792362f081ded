#!/usr/bin/env bash
# Trans-LoRA (issue 17, section 3): move task adapters from SmolLM2-135M (`default`) to Gemma 3
# 270M (`gemma-270m`) with no task data, and compare on the same held-out rows.
#
#   bench/translora_experiment.sh [OUT]          (sizes: the variables below, e.g. N_SYNTH=256)
#
# Per task (sst2: accuracy; clutrr: exact match) and seed:
#   source        a LoRA trained on the source base from TRAIN_ROWS real rows (the adapter to move)
#   kit           `transfer prepare`: SEEDS_N seed rows + a discriminator (KIT_REAL real inputs)
#   trans-lora    `transfer run`: N_SYNTH target-generated inputs, filtered, teacher-labelled
#   unfiltered    the same candidates (--candidates), --no-filter
#   ceiling       a LoRA on the target base trained on the same TRAIN_ROWS real rows
#   target-zero   the target base alone
# Every configuration is scored on the first EVAL_ROWS validation rows. Writes OUT/eval/*.json,
# OUT/table.md (mean over seeds), OUT/results.json and OUT/examples.md (kept/rejected inputs).
# Each step is skipped when its output exists, so a rerun continues where it stopped.
set -euo pipefail
OUT=${1:-runs/translora-exp}
LF=${LF:-.venv/bin/lorafleet}
PY=${PY:-.venv/bin/python}
SOURCE=${SOURCE:-default}
TARGET=${TARGET:-gemma-270m}
TASKS=${TASKS:-"sst2 clutrr"}
RUN_SEEDS=${RUN_SEEDS:-"0"}    # "0 1 2" for 3 seeds where time allows
TRAIN_ROWS=${TRAIN_ROWS:-256}  # real rows: source adapter and ceiling
STEPS=${STEPS:-40}             # every LoRA training (source, ceiling, transferred)
LR=${LR:-5e-4}
RANK=${RANK:-8}
BATCH=${BATCH:-8}
SEEDS_N=${SEEDS_N:-5}          # seed rows in the kit
KIT_REAL=${KIT_REAL:-32}       # real inputs for the discriminator (+ as many synthetic)
DISC_STEPS=${DISC_STEPS:-30}
N_SYNTH=${N_SYNTH:-64}         # candidates the target base generates
EVAL_ROWS=${EVAL_ROWS:-100}
declare -A NEW_TOKENS=([sst2]=48 [clutrr]=96 [gsm8k]=128 [strategyqa]=48)  # per synthetic input
declare -A LABEL_TOKENS=([sst2]=8 [clutrr]=24 [gsm8k]=160 [strategyqa]=8)  # teacher / eval

mkdir -p "$OUT/eval"
# Gemma 3 270M is a base model: use chat prompts on it only if its tokenizer has a template.
TARGET_CHAT=$($PY -c "from lorafleet.models import load_base
from lorafleet.models.chat import has_chat_template
print(int(has_chat_template(load_base('$TARGET').tokenizer)))")
NOCHAT=(); [ "$TARGET_CHAT" = 1 ] || NOCHAT=(--no-chat)
echo "target $TARGET chat template: $TARGET_CHAT"

run_eval() {  # NAME TASK BASE [ARGS...]
  local name=$1 task=$2 base=$3; shift 3
  local out="$OUT/eval/$name--$task.json"
  [ -e "$out" ] && return 0
  $LF eval -b "$base" -d "$task" --limit "$EVAL_ROWS" --max-new-tokens "${LABEL_TOKENS[$task]}" \
    "$@" --json "$out"
}
train() {  # BASE TASK SEED OUT [ARGS...]
  local base=$1 task=$2 seed=$3 out=$4; shift 4
  [ -e "$out/adapter_config.json" ] && return 0
  local resume=(); [ -d "$out/checkpoints" ] && resume=(--resume)
  $LF train -b "$base" -d "$task" --train-limit "$TRAIN_ROWS" --steps "$STEPS" --lr "$LR" \
    --rank "$RANK" --alpha $((2 * RANK)) --batch-size "$BATCH" --eval-limit 8 --seed "$seed" \
    -o "$out" "${resume[@]}" "$@"
}

for task in $TASKS; do
  run_eval target-zero "$task" "$TARGET" "${NOCHAT[@]}"
  for s in $RUN_SEEDS; do
    R="$OUT/$task/seed$s"
    train "$SOURCE" "$task" "$s" "$R/source"
    run_eval "source--s$s" "$task" "$SOURCE" --adapter "$R/source"
    [ -e "$R/kit/kit.json" ] || $LF transfer prepare -b "$SOURCE" -a "$R/source" -d "$task" \
      -o "$R/kit" --seeds "$SEEDS_N" --real "$KIT_REAL" --disc-steps "$DISC_STEPS" \
      --batch-size "$BATCH" --max-new-tokens "${NEW_TOKENS[$task]}" --seed "$s" --overwrite
    common=(-k "$R/kit" -t "$TARGET" -n "$N_SYNTH" --steps "$STEPS" --lr "$LR" --rank "$RANK"
            --alpha $((2 * RANK)) --batch-size "$BATCH" --max-new-tokens "${NEW_TOKENS[$task]}"
            --label-tokens "${LABEL_TOKENS[$task]}" --seed "$s" "${NOCHAT[@]}")
    [ -e "$R/trans-lora/adapter/adapter_config.json" ] || \
      $LF transfer run "${common[@]}" -o "$R/trans-lora"
    [ -e "$R/unfiltered/adapter/adapter_config.json" ] || \
      $LF transfer run "${common[@]}" --no-filter --candidates "$R/trans-lora/generated.jsonl" \
        -o "$R/unfiltered"
    run_eval "trans-lora--s$s" "$task" "$TARGET" --adapter "$R/trans-lora/adapter" "${NOCHAT[@]}"
    run_eval "unfiltered--s$s" "$task" "$TARGET" --adapter "$R/unfiltered/adapter" "${NOCHAT[@]}"
    train "$TARGET" "$task" "$s" "$R/ceiling" "${NOCHAT[@]}"
    run_eval "ceiling--s$s" "$task" "$TARGET" --adapter "$R/ceiling" "${NOCHAT[@]}"
  done
done

$PY - "$OUT" "$TASKS" "$RUN_SEEDS" <<'EOF'
import json, statistics, sys
from pathlib import Path
out, tasks, seeds = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split()
def score(name, task):
    f = out / "eval" / f"{name}--{task}.json"
    if not f.exists():
        return None
    r = json.loads(f.read_text())
    return r.get("accuracy", r.get("exact_match"))
def state(task, s, run):
    f = out / task / f"seed{s}" / run / "state.json"
    return json.loads(f.read_text())["stages"] if f.exists() else {}
configs = ["target-zero", "source", "unfiltered", "trans-lora", "ceiling"]
results, lines = {}, []
lines.append("| configuration | " + " | ".join(tasks) + " |")
lines.append("|---" * (len(tasks) + 1) + "|")
for c in configs:
    cells = []
    for t in tasks:
        vals = [score(c, t)] if c == "target-zero" else [score(f"{c}--s{s}", t) for s in seeds]
        vals = [v for v in vals if v is not None]
        results.setdefault(c, {})[t] = vals
        if not vals:
            cells.append("-")
        elif len(vals) == 1:
            cells.append(f"{vals[0]:.3f}")
        else:
            cells.append(f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f} (n={len(vals)})")
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
lines.append("")
examples = []
for t in tasks:
    for s in seeds:
        st = state(t, s, "trans-lora")
        if st:
            f, g = st.get("filter", {}), st.get("generate", {})
            metrics = out / t / f"seed{s}" / "trans-lora" / "train" / "metrics.jsonl"
            train = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
            train_tps = next((r["tokens_per_s"] for r in reversed(train) if r.get("split") == "train"), None)
            train_tps = f"{train_tps:.0f}" if train_tps else "-"
            lines.append(f"- {t} seed {s}: generated {g.get('generated')} at "
                         f"{g.get('tokens_per_s')} tok/s; accept rate {f.get('accept_rate')}; "
                         f"target LoRA training {train_tps} tok/s")
            results.setdefault("runs", {})[f"{t}/seed{s}"] = st
        run = out / t / f"seed{s}" / "trans-lora"
        kept = run / "filtered.jsonl"
        if kept.exists():
            rows = [json.loads(x) for x in kept.read_text().splitlines()]
            gen = [json.loads(x)["input"] for x in (run / "generated.jsonl").read_text().splitlines()]
            taken = {r["input"] for r in rows}
            examples.append(f"## {t} seed {s}\n\nkept:\n")
            examples += [f"- {' '.join(r['input'].split())[:200]}  (P(real)={r['p_real']:.2f})" for r in rows[:4]]
            examples.append("\nrejected:\n")
            examples += [f"- {' '.join(x.split())[:200]}" for x in gen if x not in taken][:4]
            lab = run / "labelled.jsonl"
            if lab.exists():
                examples.append("\nteacher outputs:\n")
                examples += [f"- {' '.join(r['input'].split())[:120]} -> {r['output'][:80]}"
                             for r in map(json.loads, lab.read_text().splitlines()[:4])]
            examples.append("")
(out / "table.md").write_text("\n".join(lines) + "\n")
(out / "examples.md").write_text("\n".join(examples) + "\n")
(out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
print("\n".join(lines))
EOF
