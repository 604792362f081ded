#!/usr/bin/env bash
# Issue 30: the engine on a lent GPU: greedy parity with transformers + PEFT, then throughput
# (bench/gpu/engine_gpu.py). Prints "no GPU: skipped" and exits 0 when torch sees no GPU.
#
#   bash bench/gpu/engine_gpu.sh                     # --base default (setup.sh's GGUF), ~1-2 min
#   ENGINE_GPU_BASE=/tmp/lf16/shape-model bash bench/gpu/engine_gpu.sh   # before the GGUF
#   bash bench/gpu/engine_gpu.sh --quick             # extra arguments go to engine_gpu.py
# Figures: $OUT/engine_gpu.json (and the log on stdout).
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=/dev/null
LF16_SETUP_QUIET=${LF16_SETUP_QUIET:-1} source "$HERE/setup.sh"
OUT=${OUT:-/tmp/out30}
mkdir -p "$OUT"
timeout "${ENGINE_GPU_TIMEOUT_S:-540}" "$LF16_PYTHON" "$HERE/engine_gpu.py" \
  --base "${ENGINE_GPU_BASE:-default}" --out "$OUT" "$@" 2>&1 | tee "$OUT/engine_gpu.log"
exit "${PIPESTATUS[0]}"
