#!/usr/bin/env bash
# `make bench-peers`: builds llama.cpp (llama-server + shared libraries) and the llama-cpp-python
# binding from the llama-cpp-python source package on PyPI, for `lorafleet bench engine --peers`.
#
# One cmake build of the llama.cpp sources vendored in that sdist gives both peers: llama-server
# and the libllama/libggml shared libraries, which the binding (installed into its own venv with
# -DLLAMA_BUILD=OFF) loads through LLAMA_CPP_LIB_PATH. Same sources, same flags (Release,
# GGML_NATIVE) as `pip install llama-cpp-python` would compile, but compiled once: on 2 cores
# the build takes tens of minutes. Everything lands under build/peers/ (git-ignored).
set -euo pipefail
VENV=${VENV:-.venv}
PEERS=${PEERS_DIR:-build/peers}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${CMAKE_BUILD_PARALLEL_LEVEL:-1}
mkdir -p "$PEERS"
sdist="$PEERS/llama_cpp_python-$VERSION.tar.gz"
src="$PEERS/llama_cpp_python-$VERSION"
if [ ! -f "$sdist" ]; then
  "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: \
    "llama-cpp-python==$VERSION" -d "$PEERS"
fi
[ -d "$src" ] || tar xzf "$sdist" -C "$PEERS"
cmake -S "$src/vendor/llama.cpp" -B "$PEERS/llama.cpp" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
nice -n 19 cmake --build "$PEERS/llama.cpp" --target llama-server -j "$JOBS"
if [ ! -x "$PEERS/venv/bin/python" ]; then
  "$VENV/bin/python" -m venv "$PEERS/venv"
fi
CMAKE_ARGS="-DLLAMA_BUILD=OFF" "$PEERS/venv/bin/pip" install -q "$sdist"
echo "peers built: $PEERS/llama.cpp/bin/llama-server, binding in $PEERS/venv"
