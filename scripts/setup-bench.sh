#!/usr/bin/env bash
# Installs the llama.cpp baseline used by scripts/bench-llama-cpp.py: llama-cpp-python from PyPI,
# which compiles llama.cpp from source for this machine's CPU (tens of minutes on 2 cores).
# Safe to run again: does nothing when llama_cpp already imports.
set -euo pipefail

if version="$(python3 -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null)"; then
    echo "llama-cpp-python $version already installed"
    exit 0
fi

echo "building llama-cpp-python from source (this takes a while) ..."
# GGML_NATIVE: compile for the host CPU's instruction set, as a local llama.cpp build would.
CMAKE_ARGS="-DGGML_NATIVE=ON" python3 -m pip install --no-binary llama-cpp-python llama-cpp-python

python3 -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "installed")'
