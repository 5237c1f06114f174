#!/usr/bin/env bash
# Runs the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer) for SECONDS each, one after the other,
# from the checked-in seeds (fuzz/seeds/<target>) plus the corpus earlier runs grew
# (fuzz/corpus/<target>, not checked in). Prints one line per target (executions, seconds, new
# corpus size, crashes) and exits non-zero if any target crashed; crashing inputs are kept in
# fuzz/artifacts/<target>/ and each one becomes a regression test next to the code it fixes.
#
#   scripts/fuzz.sh SECONDS [TARGET...]        (CI: scripts/fuzz.sh 20; long runs: fuzz-long.sh)
#
# The targets need nightly-only compiler flags; on a stable toolchain RUSTC_BOOTSTRAP=1 allows
# them. No sanitizer (the code under test is safe Rust around a few reviewed mmap calls, and
# ASan would halve the executions on small machines); debug assertions stay on, so arithmetic
# overflow is a crash.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
seconds="${1:?usage: scripts/fuzz.sh SECONDS [TARGET...]}"
shift
if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list | grep -v '^make_seeds$')
fi
# The fuzz workspace has its own target directory: its flags differ from the main build's.
unset CARGO_TARGET_DIR
fuzz_target_dir() {
    cargo metadata --no-deps --format-version 1 |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
}
export RUSTC_BOOTSTRAP=1
cargo fuzz build --sanitizer none --debug-assertions
bin_dir="$(fuzz_target_dir)/x86_64-unknown-linux-gnu/release"
log_dir="$(mktemp -d)"
trap 'rm -rf "$log_dir"' EXIT

failed=0
printf '%-20s %12s %8s %8s %8s\n' target executions seconds corpus crashes
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    status=0
    "$bin_dir/$target" "corpus/$target" "seeds/$target" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -artifact_prefix="artifacts/$target/" -print_final_stats=1 \
        >"$log_dir/$target.log" 2>&1 || status=$?
    runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log_dir/$target.log" | grep -o '[0-9]*$' || echo 0)"
    took="$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log_dir/$target.log" | grep -o 'in [0-9]*' | grep -o '[0-9]*' || echo "$seconds")"
    corpus="$(find "corpus/$target" -type f | wc -l)"
    crashes="$(find "artifacts/$target" -type f | wc -l)"
    printf '%-20s %12s %8s %8s %8s\n' "$target" "$runs" "$took" "$corpus" "$crashes"
    if [[ $status -ne 0 ]]; then
        failed=1
        echo "== $target failed (status $status); the end of its log:" >&2
        tail -n 40 "$log_dir/$target.log" >&2
    fi
done
exit "$failed"
