#!/usr/bin/env bash
# The full test suite, as CI runs it: fetch the reference model once (the tests never touch the
# network), then every test of the workspace, then the official `openai` Python client against
# `fdrt serve` (the only step that needs PyPI, for the `openai` package, installed once into
# .cache/venv).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
model="$(scripts/fetch-model.sh | tail -n 1)"
# NVRTC from its wheel, so the CUDA targets' compile-to-cubin tests run here too (no GPU needed);
# FD_REQUIRE_NVRTC turns their "skipped: no NVRTC" into a failure.
nvrtc_lib="$(scripts/fetch-nvrtc.sh | tail -n 1)"
export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FD_REQUIRE_NVRTC=1
# A HIP compiler, so the DCU target's plans are compiled for gfx906 and checked here too;
# FD_REQUIRE_HIPCC turns their "skipped: no HIP compiler" into a failure.
FD_HIPCC="$(scripts/fetch-hipcc.sh | tail -n 1)"
export FD_HIPCC FD_REQUIRE_HIPCC=1
cargo test --workspace --locked
# The HIP backend builds only with its feature: its test checks the HIP runtime's clear errors
# on a machine without a DCU (the runtime library comes with hipcc).
cargo test --locked -p runtime --features hip --lib hip::

# ---- OpenAI client test ----
cargo build --locked --bin fdc --bin fdrt
mkdir -p .cache/plans
plan=.cache/plans/smollm2-bf16.fdp
# Compiled every run: a plan left from an older format would be refused.
target/debug/fdc compile --dtype bf16 "$model" -o "$plan" >/dev/null

readonly OPENAI_REQUIREMENT="openai>=1.40,<3"
# A venv without pip (python3-venv missing its ensurepip) is useless: start over then.
if [[ ! -x .cache/venv/bin/pip ]]; then
    rm -rf .cache/venv
    python3 -m venv .cache/venv >/dev/null 2>&1 || rm -rf .cache/venv
fi
if [[ -x .cache/venv/bin/pip ]]; then
    python=.cache/venv/bin/python
    "$python" -m pip install --quiet --disable-pip-version-check "$OPENAI_REQUIREMENT"
else
    # No working venv module (Debian without python3-venv): a private target directory.
    python3 -m pip install --quiet --disable-pip-version-check --target .cache/pydeps "$OPENAI_REQUIREMENT"
    export PYTHONPATH="$PWD/.cache/pydeps${PYTHONPATH:+:$PYTHONPATH}"
    python=python3
fi
FDRT_BIN=target/debug/fdrt FDRT_TEST_PLAN="$plan" "$python" -m unittest -v tests/python/test_openai_client.py
# The same client through `fdrt router` in front of a prefill and a decode instance.
FDRT_TEST_DISAGG=1 FDRT_BIN=target/debug/fdrt FDRT_TEST_PLAN="$plan" "$python" -m unittest -v tests/python/test_openai_client.py
# Disaggregated serving with instances killed (SIGKILL) mid-stream, mid-transfer and while
# requests queue in the prefill instance.
FDRT_BIN=target/debug/fdrt FDRT_TEST_PLAN="$plan" "$python" -m unittest -v tests/python/test_disagg_faults.py
