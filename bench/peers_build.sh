#!/usr/bin/env bash
# `make bench-peers`: builds llama.cpp's llama-server, llama-batched-bench, llama-perplexity and
# llama-quantize (+ its shared libraries) from the sources vendored in the llama-cpp-python
# source package on PyPI, for `lorafleet bench engine --peers`, `bench serve --peers` and
# `bench quality`'s llama.cpp rows.
#
# One cmake build of those sources (Release, GGML_NATIVE: the flags `pip install
# llama-cpp-python` compiles with), compiled once: on 2 cores it takes tens of minutes. The
# same tree holds convert_hf_to_gguf.py / convert_lora_to_gguf.py and gguf-py, which the
# benchmarks run to make GGUFs of the same weights. Everything lands under build/peers/
# (git-ignored); rerunning resumes the cmake build.
set -euo pipefail
VENV=${VENV:-.venv}
PEERS=${PEERS_DIR:-build/peers}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${CMAKE_BUILD_PARALLEL_LEVEL:-1}
TARGETS="llama-server llama-batched-bench llama-perplexity llama-quantize"
mkdir -p "$PEERS"
sdist="$PEERS/llama_cpp_python-$VERSION.tar.gz"
src="$PEERS/llama_cpp_python-$VERSION"
if [ ! -f "$sdist" ]; then
  "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: \
    "llama-cpp-python==$VERSION" -d "$PEERS"
fi
[ -d "$src" ] || tar xzf "$sdist" -C "$PEERS"
# convert_hf_to_gguf.py (bench/peer_ggufs.py: F32 / BF16 / Q8_0 GGUFs of a base) runs in this
# venv and imports sentencepiece even for BPE tokenizers (the `peers` extra).
"$VENV/bin/python" -m pip install -q 'sentencepiece>=0.2'
cmake -S "$src/vendor/llama.cpp" -B "$PEERS/llama.cpp" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
# shellcheck disable=SC2086 (one target per word)
nice -n 19 cmake --build "$PEERS/llama.cpp" --target $TARGETS -j "$JOBS"
echo "peers built: $TARGETS in $PEERS/llama.cpp/bin"
