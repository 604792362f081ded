#!/usr/bin/env bash
# Issue 16's two experiments (BiLoRA vs LoRA on sst2; Bone / Bat / LoRA on clutrr), then the
# tables and charts into $OUT (tables.md, bilora.png, bone.png, runs.jsonl, metrics.tar.gz).
#
#   bash bench/gpu/issue16.sh                      # full size, --base default (~5 min on a H200)
#   LF16_QUICK=1 bash bench/gpu/issue16.sh         # a handful of steps, one seed / lr
#   LF16_QUICK=1 LF16_BASE=/tmp/lf16/shape-model bash bench/gpu/issue16.sh   # before the GGUF
# Runs go to $LF16_RUNS (default /tmp/lf16/runs); a failed run is logged and the next one runs;
# after LF16_BUDGET_S seconds (default 480) no new run starts, and the summary is written anyway.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=/dev/null
LF16_SETUP_QUIET=${LF16_SETUP_QUIET:-} source "$HERE/setup.sh"
OUT=${OUT:-/tmp/out16}
RUNS=${LF16_RUNS:-$LF16_TMP/runs}
PY=$LF16_PYTHON
mkdir -p "$OUT" "$RUNS"
quick=()
[ -n "${LF16_QUICK:-}" ] && quick=(--quick)
start=$(date +%s)
timeout "${LF16_TIMEOUT_S:-560}" "$PY" "$HERE/run16.py" --runs "$RUNS" \
  --base "${LF16_BASE:-default}" "${quick[@]}" 2>&1 | tee "$RUNS/run16.log"
rc=${PIPESTATUS[0]}
echo "issue16: runs finished or stopped after $(( $(date +%s) - start ))s (rc $rc; 124 = timeout)"
"$PY" "$HERE/summarise16.py" --runs "$RUNS" --out "$OUT" || echo "issue16: summariser FAILED" >&2
ls -la "$OUT"
