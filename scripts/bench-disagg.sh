#!/usr/bin/env bash
# Disaggregated against mixed serving, the same processes and cores (not part of the test suite):
# SmolLM2 on the CPU, two instances each pinned to a core of its own behind `fdrt router`,
# first as a prefill and a decode instance, then as two mixed instances; the same workload
# against each: chat clients (short prompts, longer answers) beside long-prompt clients (long
# prompts, a few tokens), two `fdrt bench-serve` runs at once. Prints TTFT and inter-token
# latency percentiles per class and mode, the KV transfer throughput the decode instance saw,
# and the loopback TCP bandwidth of the machine. Results go to OUT (default
# .cache/bench-disagg/<UTC time>).
#
#   scripts/bench-disagg.sh [OUT]
#
# CHAT="--concurrency 3 --requests 24 --input-len 96 --output-len 96" and
# LONG="--concurrency 1 --requests 6 --input-len 1600 --output-len 4" override the workload.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-.cache/bench-disagg/$(date -u +%Y%m%dT%H%M%SZ)}"
target_dir="${CARGO_TARGET_DIR:-target}"
chat_args="${CHAT:---concurrency 3 --requests 24 --input-len 96 --output-len 96}"
long_args="${LONG:---concurrency 1 --requests 6 --input-len 1600 --output-len 4}"
cores="$(nproc)"
if (( cores < 2 )); then
    echo "needs 2 cores, one per instance" >&2
    exit 1
fi

model="$(scripts/fetch-model.sh | tail -n 1)"
cargo build --release --locked --bin fdc --bin fdrt
mkdir -p "$out" .cache/plans
cp "$target_dir/release/fdrt" "$target_dir/release/fdc" "$out/"
plan=.cache/plans/smollm2-bf16-disagg.fdp
"$out/fdc" compile --dtype bf16 "$model" -o "$plan" >/dev/null

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

wait_ready() { # PORT LOG
    for _ in $(seq 1 600); do
        if curl -sf "http://127.0.0.1:$1/health" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    echo "port $1 did not come up:" >&2
    cat "$2" >&2
    exit 1
}

# One instance on core CORE: serve PORT ROLE-ARGS...
instance() { # CORE PORT NAME ARGS...
    local core=$1 port=$2 name=$3
    shift 3
    taskset -c "$core" "$out/fdrt" serve "$plan" --port "$port" --threads 1 \
        --max-num-seqs 4 --max-context 2048 --max-batch-tokens 256 "$@" \
        >"$out/$name.log" 2>&1 &
    pids+=($!)
    wait_ready "$port" "$out/$name.log"
}

router() { # NAME ARGS...
    local name=$1
    shift
    "$out/fdrt" router --port 8600 "$@" >"$out/$name-router.log" 2>&1 &
    pids+=($!)
    wait_ready 8600 "$out/$name-router.log"
}

workload() { # NAME
    "$out/fdrt" bench-serve --address 127.0.0.1:8600 $chat_args --seed 1 --json \
        >"$out/$1-chat.json" &
    local chat=$!
    "$out/fdrt" bench-serve --address 127.0.0.1:8600 $long_args --seed 2 --token-range 1000..20000 \
        --json >"$out/$1-long.json"
    wait "$chat"
}

echo "== disaggregated: prefill on core 0, decode on core 1"
instance 0 8601 prefill --role prefill --kv-transfer-port 8611
instance 1 8602 decode --role decode --kv-source 127.0.0.1:8611
router disagg --prefill 127.0.0.1:8601 --decode 127.0.0.1:8602
workload disagg
curl -s http://127.0.0.1:8602/metrics >"$out/disagg-decode-metrics.txt"
cleanup
pids=()

echo "== disaggregated, prompts under 512 tokens computed on the decode instance"
instance 0 8601 prefill-min --role prefill --kv-transfer-port 8611
instance 1 8602 decode-min --role decode --kv-source 127.0.0.1:8611 --kv-transfer-min-tokens 512
router disagg-min --prefill 127.0.0.1:8601 --decode 127.0.0.1:8602
workload disagg-min
cleanup
pids=()

echo "== mixed: two mixed instances, one per core"
instance 0 8601 mixed0
instance 1 8602 mixed1
router mixed --decode 127.0.0.1:8601 --decode 127.0.0.1:8602
workload mixed
cleanup
pids=()
trap - EXIT

python3 - "$out" <<'EOF'
import json, re, socket, sys, threading, time
out = sys.argv[1]

def loopback_bandwidth(total=2 << 30, chunk=8 << 20):
    # One TCP connection on loopback, one writer thread, the reader here: bytes per second.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    def write():
        c = socket.create_connection(("127.0.0.1", port))
        block = b"\0" * chunk
        for _ in range(total // chunk):
            c.sendall(block)
        c.close()
    t = threading.Thread(target=write)
    t.start()
    conn, _ = server.accept()
    buf = bytearray(chunk)
    got, start = 0, time.perf_counter()
    while True:
        n = conn.recv_into(buf)
        if n == 0:
            break
        got += n
    elapsed = time.perf_counter() - start
    t.join()
    return got / elapsed

rows = []
for mode in ("disagg", "disagg-min", "mixed"):
    for cls in ("chat", "long"):
        r = json.load(open(f"{out}/{mode}-{cls}.json"))
        rows.append((mode, cls, r))
print("| mode | class | requests (failed) | TTFT p50 / p99 ms | ITL p50 / p99 ms | output tok/s |")
print("| --- | --- | --- | --- | --- | --- |")
for mode, cls, r in rows:
    ttft, itl = r["ttft"], r["itl"]
    print(f"| {mode} | {cls} | {r['completed']} ({r['failed']}) | {ttft['p50_ms']:.0f} / {ttft['p99_ms']:.0f} | "
          f"{itl['p50_ms']:.1f} / {itl['p99_ms']:.1f} | {r['output_throughput']:.1f} |")
metrics = open(f"{out}/disagg-decode-metrics.txt").read()
def value(name):
    m = re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", metrics, re.M)
    return float(m.group(1)) if m else 0.0
blocks, size, secs = (value("fdrt:kv_transfer_received_blocks_total"),
                      value("fdrt:kv_transfer_received_bytes_total"),
                      value("fdrt:kv_transfer_seconds_total"))
print(f"KV transfer: {blocks:.0f} blocks, {size / 1e6:.1f} MB in {secs:.2f} s of transfers "
      f"(including the prefill they waited for): {size / max(secs, 1e-9) / 1e9:.3f} GB/s; "
      f"failures {value('fdrt:kv_transfer_failures_total'):.0f}")
print(f"loopback TCP bandwidth: {loopback_bandwidth() / 1e9:.2f} GB/s")
EOF
cargo build --release --locked -p runtime --example kv_transfer_bench
"$target_dir/release/examples/kv_transfer_bench" "$plan" 1600 5 | tee "$out/kv-transfer.txt"
echo "results in $out"
