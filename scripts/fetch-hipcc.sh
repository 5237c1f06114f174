#!/usr/bin/env bash
# Makes sure a HIP compiler is here for `fdc compile --target dcu` (the DCU's kernels are built
# for gfx906 ahead of time; no GPU needed). Uses FD_HIPCC, hipcc on the PATH or ROCm's
# /opt/rocm/bin/hipcc when present; otherwise installs Debian's `hipcc` package (clang 15 and the
# ROCm device libraries, about 12 s), with sudo when not root.
#
# Safe to run again. Prints the compiler's path on the last line.
set -euo pipefail

find_hipcc() {
    if [[ -n "${FD_HIPCC:-}" && -x "$FD_HIPCC" ]]; then
        echo "$FD_HIPCC"
    elif command -v hipcc >/dev/null 2>&1; then
        command -v hipcc
    elif [[ -x /opt/rocm/bin/hipcc ]]; then
        echo /opt/rocm/bin/hipcc
    else
        return 1
    fi
}

if ! find_hipcc >/dev/null; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: no HIP compiler and no apt-get to install Debian's hipcc; install one (ROCm's hipcc) or set FD_HIPCC" >&2
        exit 1
    fi
    sudo=()
    if [[ "$(id -u)" != 0 ]]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "error: no HIP compiler, and installing Debian's hipcc needs root or sudo; install it (apt-get install hipcc) or set FD_HIPCC" >&2
            exit 1
        fi
        sudo=(sudo)
    fi
    echo "installing Debian's hipcc for the DCU target's tests" >&2
    "${sudo[@]}" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq hipcc >&2
fi
find_hipcc
