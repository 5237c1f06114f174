#!/usr/bin/env bash
# Fetches NVRTC, the CUDA compiler library that `fdc compile --target cuda-*` uses, from the PyPI
# wheel nvidia-cuda-nvrtc (no CUDA toolkit, driver or GPU needed), into .cache/nvrtc. Pinned to
# 13.0 so the PTX it writes loads on drivers of CUDA 13.0 and later.
#
# Safe to run again. Prints the library folder on the last line: put it on LD_LIBRARY_PATH.
set -euo pipefail

readonly REQUIREMENT="nvidia-cuda-nvrtc==13.0.*"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="$repo_root/.cache/nvrtc"
lib="$target/nvidia/cu13/lib"

if [[ ! -f "$lib/libnvrtc.so.13" ]]; then
    echo "installing $REQUIREMENT into $target ..." >&2
    python3 -m pip install --quiet --disable-pip-version-check --target "$target" "$REQUIREMENT" >&2
fi
echo "$lib"
