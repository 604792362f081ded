#!/usr/bin/env bash
# Trans-LoRA (issue 29): move an sst2 adapter from SmolLM2-135M (`default`) to Gemma 3 270M
# (`gemma-270m`) with no task data; the filtered and unfiltered arms train on the same K rows.
#
#   bench/translora_experiment.sh [OUT]     (sizes: the variables below, e.g. K=64 RUN_SEEDS="0 1 2")
#
# Per task and seed:
#   source        a LoRA trained on the source base from TRAIN_ROWS real rows (the adapter to move;
#                 one per task, seed SOURCE_SEED, shared by the seeds: the adapter a user moves),
#                 scored with the source base: "source" in the claim filtered >= unfiltered >= source
#   kit           `transfer prepare`: SEEDS_N seed rows + a discriminator trained on KIT_REAL real +
#                 KIT_REAL synthetic inputs, its accuracy on KIT_HELD more of each (not trained on)
#   trans-lora    `transfer run`: target candidates drawn and judged until K pass (rejection
#                 sampling, at most MAX_CAND drawn), teacher-labelled, a LoRA on the target
#   unfiltered    the same candidates in the same order (--candidates), --no-filter: the first K'
#                 where K' = the rows the filtered arm kept (K unless the cap was hit)
#   ceiling       (CEILING=1) a LoRA on the target base trained on the TRAIN_ROWS real rows
#   target-zero   the target base alone
# Held-out rows: every configuration is scored on the first EVAL_ROWS sst2 validation rows, which
# no training, kit or setting saw (the kit's real rows come from the train split).
# Writes OUT/eval/*.json and RESULTS/{table.md,results.json,examples.md}. Each step is skipped when
# its output exists, so a rerun continues where it stopped.
set -euo pipefail
OUT=${1:-runs/translora29}
RESULTS=${RESULTS:-bench/results/translora29}
LF=${LF:-.venv/bin/lorafleet}
PY=${PY:-.venv/bin/python}
SOURCE=${SOURCE:-default}
TARGET=${TARGET:-gemma-270m}
TASKS=${TASKS:-sst2}
RUN_SEEDS=${RUN_SEEDS:-"0 1"}  # each: its own kit (seed rows, discriminator), candidates, LoRAs
SOURCE_SEED=${SOURCE_SEED:-0}
TRAIN_ROWS=${TRAIN_ROWS:-256}  # real rows: source adapter (and ceiling)
SRC_STEPS=${SRC_STEPS:-40}     # source adapter (and ceiling) training steps
STEPS=${STEPS:-24}             # each transferred LoRA's training steps (6 epochs of K=32)
LR=${LR:-5e-4}
RANK=${RANK:-8}
BATCH=${BATCH:-8}
SEEDS_N=${SEEDS_N:-5}          # seed rows in the kit
KIT_REAL=${KIT_REAL:-128}      # discriminator training: real inputs (+ as many synthetic); >= 128
KIT_HELD=${KIT_HELD:-32}       # held-out inputs per class for its reported accuracy
DISC_STEPS=${DISC_STEPS:-32}
K=${K:-32}                     # rows each transferred LoRA trains on
MAX_CAND=${MAX_CAND:-480}      # cap on candidates the target draws
EVAL_ROWS=${EVAL_ROWS:-200}
CEILING=${CEILING:-0}
declare -A NEW_TOKENS=([sst2]=48 [clutrr]=96 [gsm8k]=128 [strategyqa]=48)  # per synthetic input
declare -A LABEL_TOKENS=([sst2]=8 [clutrr]=24 [gsm8k]=160 [strategyqa]=8)  # teacher / eval

mkdir -p "$OUT/eval" "$RESULTS"
# Gemma 3 270M is a base model: use chat prompts on it only if its tokenizer has a template.
TARGET_CHAT=$($PY -c "from lorafleet.models import load_base
from lorafleet.models.chat import has_chat_template
print(int(has_chat_template(load_base('$TARGET').tokenizer)))")
NOCHAT=(); [ "$TARGET_CHAT" = 1 ] || NOCHAT=(--no-chat)
echo "target $TARGET chat template: $TARGET_CHAT"
stamp() { echo "$(date +%T) $*"; }

run_eval() {  # NAME TASK BASE [ARGS...]
  local name=$1 task=$2 base=$3; shift 3
  local out="$OUT/eval/$name--$task.json"
  [ -e "$out" ] && return 0
  stamp "eval $name $task"
  $LF eval -b "$base" -d "$task" --limit "$EVAL_ROWS" --max-new-tokens "${LABEL_TOKENS[$task]}" \
    "$@" --json "$out"
}
train() {  # BASE TASK SEED OUT [ARGS...]
  local base=$1 task=$2 seed=$3 out=$4; shift 4
  [ -e "$out/adapter_config.json" ] && return 0
  stamp "train $out"
  local resume=(); [ -d "$out/checkpoints" ] && resume=(--resume)
  $LF train -b "$base" -d "$task" --train-limit "$TRAIN_ROWS" --steps "$SRC_STEPS" --lr "$LR" \
    --rank "$RANK" --alpha $((2 * RANK)) --batch-size "$BATCH" --eval-limit 8 --seed "$seed" \
    -o "$out" "${resume[@]}" "$@"
}

for task in $TASKS; do
  run_eval target-zero "$task" "$TARGET" "${NOCHAT[@]}"
  train "$SOURCE" "$task" "$SOURCE_SEED" "$OUT/$task/source"
  run_eval source "$task" "$SOURCE" --adapter "$OUT/$task/source"
  for s in $RUN_SEEDS; do
    R="$OUT/$task/seed$s"
    if [ ! -e "$R/kit/kit.json" ]; then
      stamp "prepare $R/kit"
      $LF transfer prepare -b "$SOURCE" -a "$OUT/$task/source" -d "$task" -o "$R/kit" --seeds "$SEEDS_N" \
        --real "$KIT_REAL" --held-out "$KIT_HELD" --disc-steps "$DISC_STEPS" \
        --batch-size "$BATCH" --max-new-tokens "${NEW_TOKENS[$task]}" --seed "$s" --overwrite
    fi
    common=(-k "$R/kit" -t "$TARGET" --steps "$STEPS" --lr "$LR" --rank "$RANK"
            --alpha $((2 * RANK)) --batch-size "$BATCH" --max-new-tokens "${NEW_TOKENS[$task]}"
            --label-tokens "${LABEL_TOKENS[$task]}" --seed "$s" "${NOCHAT[@]}")
    if [ ! -e "$R/trans-lora/adapter/adapter_config.json" ]; then
      stamp "transfer run (filtered) $R"
      $LF transfer run "${common[@]}" -n "$K" --max-candidates "$MAX_CAND" -o "$R/trans-lora"
    fi
    # The unfiltered arm trains on as many rows as the filtered one kept (K unless the cap hit).
    kept=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['stages']['filter']['kept'])" \
      "$R/trans-lora/state.json")
    if [ ! -e "$R/unfiltered/adapter/adapter_config.json" ]; then
      stamp "transfer run (unfiltered, first $kept) $R"
      $LF transfer run "${common[@]}" -n "$kept" --no-filter \
        --candidates "$R/trans-lora/generated.jsonl" -o "$R/unfiltered"
    fi
    run_eval "trans-lora--s$s" "$task" "$TARGET" --adapter "$R/trans-lora/adapter" "${NOCHAT[@]}"
    run_eval "unfiltered--s$s" "$task" "$TARGET" --adapter "$R/unfiltered/adapter" "${NOCHAT[@]}"
    if [ "$CEILING" = 1 ]; then
      train "$TARGET" "$task" "$s" "$R/ceiling" "${NOCHAT[@]}"
      run_eval "ceiling--s$s" "$task" "$TARGET" --adapter "$R/ceiling" "${NOCHAT[@]}"
    fi
  done
done
stamp "summary"

$PY - "$OUT" "$RESULTS" "$TASKS" "$RUN_SEEDS" "$EVAL_ROWS" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
out, results_dir = Path(sys.argv[1]), Path(sys.argv[2])
tasks, seeds, eval_rows = sys.argv[3].split(), sys.argv[4].split(), int(sys.argv[5])
def score(name, task):
    f = out / "eval" / f"{name}--{task}.json"
    if not f.exists():
        return None
    r = json.loads(f.read_text())
    return r.get("accuracy", r.get("exact_match"))
def stages(task, s, run):
    f = out / task / f"seed{s}" / run / "state.json"
    return json.loads(f.read_text())["stages"] if f.exists() else {}
def kit(task, s):
    f = out / task / f"seed{s}" / "kit" / "kit.json"
    return json.loads(f.read_text()) if f.exists() else {}
def fmt(v):
    return "-" if v is None else f"{v:.3f}"
def mean_sd(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"
configs = [("target-zero", "target base zero-shot"), ("source", "source adapter on the source base"),
           ("unfiltered", "target LoRA, unfiltered (first K candidates)"),
           ("trans-lora", "target LoRA, filtered (first K that pass; Trans-LoRA)"),
           ("ceiling", "target LoRA on the real rows (ceiling)")]
results, lines, examples = {"eval_rows": eval_rows, "seeds": seeds}, [], []
for t in tasks:
    lines += [f"### {t} (accuracy on the first {eval_rows} validation rows)", "",
              "| configuration | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |",
              "|---" * (len(seeds) + 2) + "|"]
    table = {}
    for c, label in configs:
        shared = c in ("target-zero", "source")  # one base / one source adapter for every seed
        vals = [score(c, t)] * len(seeds) if shared else [score(f"{c}--s{s}", t) for s in seeds]
        if all(v is None for v in vals):
            continue
        table[c] = vals
        cells = [fmt(v) for v in vals]
        if c == "trans-lora":
            cells = [f"{fmt(v)} ({stages(t, s, 'trans-lora').get('filter', {}).get('kept')} rows)"
                     for v, s in zip(vals, seeds)]
        if c == "unfiltered":
            cells = [f"{fmt(v)} ({stages(t, s, 'unfiltered').get('filter', {}).get('kept')} rows)"
                     for v, s in zip(vals, seeds)]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {fmt(vals[0]) if shared else mean_sd(vals)} |")
    diffs = {}
    for a, b in (("trans-lora", "unfiltered"), ("unfiltered", "source"), ("trans-lora", "source")):
        if a in table and b in table:
            d = [x - y if x is not None and y is not None else None for x, y in zip(table[a], table[b])]
            diffs[f"{a} - {b}"] = d
            lines.append(f"| {a} − {b} | " + " | ".join(f"{v:+.3f}" if v is not None else "-" for v in d)
                         + f" | {mean_sd(d)} |")
    lines += ["", "| stage | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    rows = {"discriminator: trained on (real + synthetic)": [], "discriminator held-out accuracy (real / synthetic)": [],
            "candidates drawn until K passed (cap)": [], "accept rate": [], "candidates/s (generation + judging), tok/s": []}
    for s in seeds:
        d = kit(t, s).get("discriminator", {})
        g = stages(t, s, "trans-lora").get("generate", {})
        rows["discriminator: trained on (real + synthetic)"].append(f"{d.get('train_real')} + {d.get('train_synthetic')}")
        rows["discriminator held-out accuracy (real / synthetic)"].append(
            f"{fmt(d.get('held_out_accuracy'))} ({fmt(d.get('held_out_real_accuracy'))} / "
            f"{fmt(d.get('held_out_synthetic_accuracy'))}) on {d.get('held_out_examples')}")
        rows["candidates drawn until K passed (cap)"].append(
            f"{g.get('needed')} of {g.get('generated')} judged ({g.get('max_generated')}{', CAP HIT' if g.get('cap_hit') else ''})")
        rows["accept rate"].append(f"{g.get('accept_rate')} ({g.get('passed')} / {g.get('generated')})")
        rows["candidates/s (generation + judging), tok/s"].append(f"{g.get('candidates_per_s')}, {g.get('tokens_per_s')}")
        results.setdefault("runs", {})[f"{t}/seed{s}"] = {
            "kit": kit(t, s), "trans-lora": stages(t, s, "trans-lora"), "unfiltered": stages(t, s, "unfiltered")}
        run = out / t / f"seed{s}" / "trans-lora"
        gen = run / "generated.jsonl"
        if gen.exists():
            cands = [json.loads(x) for x in gen.read_text().splitlines()]
            examples.append(f"## {t} seed {s}\n\npassed (P(real) >= threshold):\n")
            examples += [f"- {' '.join(c['input'].split())[:200]}  (P(real)={c['p_real']:.2f})"
                         for c in cands if c.get("accepted")][:5]
            examples.append("\nrejected:\n")
            examples += [f"- {' '.join(c['input'].split())[:200]}  (P(real)={c['p_real']:.2f})"
                         for c in cands if not c.get("accepted")][:5]
            lab = run / "labelled.jsonl"
            if lab.exists():
                examples.append("\nteacher outputs:\n")
                examples += [f"- {' '.join(r['input'].split())[:120]} -> {r['output'][:80]}"
                             for r in map(json.loads, lab.read_text().splitlines()[:4])]
            examples.append("")
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    results.setdefault("scores", {})[t] = table
    results.setdefault("differences", {})[t] = diffs
results_dir.mkdir(parents=True, exist_ok=True)
(results_dir / "table.md").write_text("\n".join(lines) + "\n")
(results_dir / "examples.md").write_text("\n".join(examples) + "\n")
(results_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
print("\n".join(lines))
PYEOF
