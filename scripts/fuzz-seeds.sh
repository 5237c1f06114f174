#!/usr/bin/env bash
# Regenerates the checked-in seed corpora of the fuzz targets (fuzz/seeds/<target>/): compiles
# the tiny llama checkpoint into a plan and a plan in parts, copies the tiny HF configs, and runs
# fuzz/src/bin/make_seeds.rs for the rest. Needs cargo-fuzz (see scripts/fuzz-smoke.sh).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
target_directory() {
    cargo metadata --no-deps --format-version 1 |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
}
target_dir="$(target_directory)"
cargo build --release --locked --bin fdc
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$target_dir/release/fdc" compile tests/golden/tiny/llama -o "$work/tiny.fdp" >/dev/null
mkdir -p "$work/parts"
"$target_dir/release/fdc" compile tests/golden/tiny/llama --part-size 200KB -o "$work/parts/tiny.fdp" >/dev/null

seeds=fuzz/seeds
mkdir -p "$seeds/hf_config"
for config in tests/golden/tiny/*/config.json; do
    cp "$config" "$seeds/hf_config/$(basename "$(dirname "$config")")"
done

# make_seeds is an ordinary program; build it with the fuzz targets' flags to share their build.
fuzz_target_dir="$(cd fuzz && unset CARGO_TARGET_DIR && target_directory)"
(cd fuzz && env -u CARGO_TARGET_DIR RUSTC_BOOTSTRAP=1 cargo fuzz build --sanitizer none --debug-assertions make_seeds)
"$fuzz_target_dir/x86_64-unknown-linux-gnu/release/make_seeds" "$seeds" "$work/tiny.fdp" \
    "$work/parts/tiny.fdp" "$work/parts/tiny.part0.fdw" tests/data/tiny-llama-v2.fdp
echo "seeds written under $seeds"
