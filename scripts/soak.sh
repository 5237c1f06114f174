#!/usr/bin/env bash
# Soak test of `fdrt serve` (not part of the test suite): serves the SmolLM2 plan on loopback,
# drives it with scripts/soak.py's mixed traffic for MINUTES (30 by default) while sampling
# memory, descriptors, threads, KV blocks and latencies, then stops the server with SIGTERM and
# checks that it drains and exits cleanly. Results go to OUT (default .cache/soak/<UTC time>):
# timeline.jsonl, summary.json, server.log.
#
#   scripts/soak.sh [MINUTES] [OUT] [soak.py options...]
#
# SOAK_SERVER_ARGS adds options to `fdrt serve` (e.g. a --speculative-config).
#
# The server runs with a small queue (--max-waiting 8) so that bursts overflow it, and a KV pool
# smaller than --max-num-seqs full contexts so that long prompts cause preemption.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
minutes="${1:-30}"
out="${2:-.cache/soak/$(date -u +%Y%m%dT%H%M%SZ)}"
shift $(( $# < 2 ? $# : 2 ))
port="${SOAK_PORT:-8431}"
target_dir="${CARGO_TARGET_DIR:-target}"

model="$(scripts/fetch-model.sh | tail -n 1)"
cargo build --release --locked --bin fdc --bin fdrt
mkdir -p "$out" .cache/plans
# Private copies: another build into the same target directory must not replace the binary
# under a running server.
cp "$target_dir/release/fdrt" "$target_dir/release/fdc" "$out/"
plan=.cache/plans/smollm2-q4_1-soak.fdp
"$out/fdc" compile "$model" -o "$plan" >/dev/null

"$out/fdrt" serve "$plan" --port "$port" --max-num-seqs 4 --max-waiting 8 \
    --max-context 2048 --kv-cache-memory 96MiB --drain-timeout 20 ${SOAK_SERVER_ARGS:-} \
    >"$out/server.log" 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "the server exited while starting:" >&2
        cat "$out/server.log" >&2
        exit 1
    fi
    sleep 0.5
done

status=0
python3 scripts/soak.py --port "$port" --pid "$server_pid" --minutes "$minutes" --out "$out" "$@" || status=$?

# A clean stop: SIGTERM, drain, exit 0.
kill -TERM "$server_pid"
server_status=0
wait "$server_pid" || server_status=$?
trap - EXIT
echo "server exit status after SIGTERM: $server_status" | tee -a "$out/summary.txt"
if [[ $server_status -ne 0 ]]; then status=1; fi
echo "soak results in $out (pass: $([[ $status -eq 0 ]] && echo yes || echo no))"
exit "$status"
