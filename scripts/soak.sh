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
# SOAK_DISAGG=1 soaks a disaggregated deployment instead: `fdrt router` on the port, in front of
# one prefill and one decode instance (each with the server options below, blocks of 16 so that
# most prompts move blocks, a shared transfer key); every process is sampled and checked.
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

serve_args=(--max-num-seqs 4 --max-waiting 8 --max-context 2048 --kv-cache-memory 96MiB --drain-timeout 20)
wait_healthy() { # PORT PID LOG
    for _ in $(seq 1 600); do
        if curl -sf "http://127.0.0.1:$1/health" >/dev/null 2>&1; then return 0; fi
        if ! kill -0 "$2" 2>/dev/null; then
            echo "a server exited while starting:" >&2
            cat "$3" >&2
            exit 1
        fi
        sleep 0.5
    done
}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
instances=()
if [[ "${SOAK_DISAGG:-0}" == 1 ]]; then
    head -c 32 /dev/urandom | base64 >"$out/kv.key"
    disagg=(--block-size 16 --kv-transfer-key-file "$out/kv.key")
    "$out/fdrt" serve "$plan" --port $((port + 1)) --role prefill --kv-transfer-port $((port + 2)) \
        "${serve_args[@]}" "${disagg[@]}" ${SOAK_SERVER_ARGS:-} >"$out/prefill.log" 2>&1 &
    pids+=($!)
    wait_healthy $((port + 1)) "${pids[-1]}" "$out/prefill.log"
    "$out/fdrt" serve "$plan" --port $((port + 3)) --role decode --kv-source 127.0.0.1:$((port + 2)) \
        "${serve_args[@]}" "${disagg[@]}" ${SOAK_SERVER_ARGS:-} >"$out/decode.log" 2>&1 &
    pids+=($!)
    wait_healthy $((port + 3)) "${pids[-1]}" "$out/decode.log"
    instances=(--instance "prefill:$((port + 1)):${pids[0]}" --instance "decode:$((port + 3)):${pids[1]}")
    "$out/fdrt" router --port "$port" --prefill 127.0.0.1:$((port + 1)) --decode 127.0.0.1:$((port + 3)) \
        >"$out/server.log" 2>&1 &
else
    "$out/fdrt" serve "$plan" --port "$port" "${serve_args[@]}" ${SOAK_SERVER_ARGS:-} \
        >"$out/server.log" 2>&1 &
fi
server_pid=$!
pids+=("$server_pid")
wait_healthy "$port" "$server_pid" "$out/server.log"

status=0
python3 scripts/soak.py --port "$port" --pid "$server_pid" --minutes "$minutes" --out "$out" "${instances[@]}" "$@" || status=$?

# A clean stop: SIGTERM, drain, exit 0 (the front door first, then the instances behind it).
for pid in "$server_pid" "${pids[@]:0:${#pids[@]}-1}"; do
    kill -TERM "$pid" 2>/dev/null || true
    pid_status=0
    wait "$pid" || pid_status=$?
    echo "process $pid exit status after SIGTERM: $pid_status" | tee -a "$out/summary.txt"
    if [[ $pid_status -ne 0 ]]; then status=1; fi
done
trap - EXIT
echo "soak results in $out (pass: $([[ $status -eq 0 ]] && echo yes || echo no))"
exit "$status"
