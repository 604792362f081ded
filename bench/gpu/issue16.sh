#!/usr/bin/env bash
# Issue 16's two experiments (BiLoRA vs LoRA on sst2; Bone / Bat / LoRA on clutrr), then the
# tables and charts into $OUT (tables.md, bilora.png, bone.png, runs.jsonl, metrics.tar.gz).
#
#   bash bench/gpu/issue16.sh                      # full size, --base default (~5 min on a H200)
#   LF16_QUICK=1 bash bench/gpu/issue16.sh         # a handful of steps, one seed / lr
#   LF16_QUICK=1 LF16_BASE=/tmp/lf16/shape-model bash bench/gpu/issue16.sh   # before the GGUF
# Runs go to $LF16_RUNS (default /tmp/lf16/runs); a failed run is logged and the next one runs;
# after LF16_BUDGET_S seconds (default 400) no new run starts, and the summary is written anyway;
# then `bench train --method` (step time per method) if the 600 s command limit leaves room.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
start=$(date +%s)
# shellcheck source=/dev/null
LF16_SETUP_QUIET=${LF16_SETUP_QUIET:-} source "$HERE/setup.sh"
OUT=${OUT:-/tmp/out16}
RUNS=${LF16_RUNS:-$LF16_TMP/runs}
PY=$LF16_PYTHON
mkdir -p "$OUT" "$RUNS"
quick=()
[ -n "${LF16_QUICK:-}" ] && quick=(--quick)
timeout "${LF16_TIMEOUT_S:-560}" "$PY" "$HERE/run16.py" --runs "$RUNS" \
  --base "${LF16_BASE:-default}" --budget-s "${LF16_BUDGET_S:-400}" "${quick[@]}" 2>&1 | tee "$RUNS/run16.log"
rc=${PIPESTATUS[0]}
echo "issue16: runs finished or stopped after $(( $(date +%s) - start ))s (rc $rc; 124 = timeout)"
"$PY" "$HERE/summarise16.py" --runs "$RUNS" --out "$OUT" || echo "issue16: summariser FAILED" >&2
# Time per training step of each method next to LoRA's (`lorafleet bench train --method ...`, as
# a library call: the machine's typer is not lorafleet's), if the 600 s command limit allows.
left=$(( ${LF16_LIMIT_S:-590} - ($(date +%s) - start) ))
methods='["dora", "bone", "bat", "bilora", "bilora-second"]'
[ -n "${LF16_QUICK:-}" ] && methods='["bone", "bilora-second"]'
if [ "$left" -gt 60 ]; then
  echo "issue16: bench train --method (${left}s left)"
  timeout $(( left - 10 )) "$PY" -c "
import json, sys
from lorafleet.bench.train_step import run
run('${LF16_BASE:-default}', 'sst2', 8, 6 if not '${LF16_QUICK:-}' else 2, 1, True,
    '$OUT/train_step_methods.json', '$LF16_TMP/bench-train', methods=json.loads(sys.argv[1]),
    rank=16)" "$methods" 2>&1 | grep -v -i warn | tail -12
else
  echo "issue16: no time left for bench train --method (${left}s)"
fi
ls -la "$OUT"
