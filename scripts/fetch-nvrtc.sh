#!/usr/bin/env bash
# Fetches NVRTC, the CUDA compiler library that `fdc compile --target cuda-*` uses, from the PyPI
# wheel nvidia-cuda-nvrtc (no CUDA toolkit, driver or GPU needed), into .cache/nvrtc. Pinned to
# 13.0 so the PTX it writes loads on drivers of CUDA 13.0 and later. The wheel is downloaded and
# unpacked rather than pip-installed, so a system Python that refuses installs still works.
#
# Safe to run again. Prints the library folder on the last line: put it on LD_LIBRARY_PATH.
set -euo pipefail

readonly REQUIREMENT="nvidia-cuda-nvrtc==13.0.*"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/wheel.sh
source "$repo_root/scripts/lib/wheel.sh"
target="$repo_root/.cache/nvrtc"
lib="$target/nvidia/cu13/lib"

if [[ ! -f "$lib/libnvrtc.so.13" ]]; then
    work_dir="$(mktemp -d)"
    trap 'rm -rf "$work_dir"' EXIT
    wheel_file="$(download_wheel "$REQUIREMENT" "$work_dir")"
    mkdir -p "$target"
    # A wheel is a zip file; the standard library unpacks it.
    python3 -m zipfile -e "$wheel_file" "$target"
    if [[ ! -f "$lib/libnvrtc.so.13" ]]; then
        echo "error: $wheel_file has no nvidia/cu13/lib/libnvrtc.so.13" >&2
        exit 1
    fi
fi
echo "$lib"
