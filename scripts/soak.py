#!/usr/bin/env python3
"""Soak load for `fdrt serve`: mixed traffic for a fixed time while sampling the server's health.

Drives a running server on loopback with what production sends: chat and completions, streamed
and not, short and long prompts, prompts sharing a system prefix, clients that hang up
mid-stream, invalid and oversized bodies, and bursts beyond `--max-waiting`. Every request is
classified: `ok`, a defined error (an OpenAI error body with a 4xx or 503 status), an intended
disconnect, or `lost` (no response, a malformed one, a 5xx other than 503): the run passes only
with no lost request.

Every `--sample-every` seconds it records the server process's resident memory, open file
descriptors and threads (from /proc), the KV blocks in use (from /metrics) and the latency
percentiles of the requests finished in that window, as one JSON line in `timeline.jsonl`.
At the end it waits for the server to go idle and checks that every KV block is free and that
descriptors and threads are back to their idle values, then writes `summary.json`.

With `--instance NAME:PORT:PID` (repeatable) the server at `--port` is a front door (`fdrt
router`) and each instance behind it is sampled and checked the same way (memory, descriptors,
threads; KV blocks and queues summed over the instances).

Standard library only (http.client, threads), so it runs with any Python 3.8+.
"""

import argparse
import http.client
import json
import os
import random
import re
import statistics
import sys
import threading
import time

SYSTEM_PROMPT = (
    "You are a concise assistant for a hardware store. Answer in one or two sentences, "
    "name the aisle when you know it, and never invent prices. "
) * 4
SHORT_QUESTIONS = [
    "Where are the screws?",
    "What is a torque wrench for?",
    "Do you sell paint?",
    "How do I fix a squeaky hinge?",
    "What glue works on ceramics?",
    "Which drill bit goes through tile?",
]
LONG_TEXT_WORDS = (
    "the committee met on tuesday to review the quarterly figures and agreed that the new "
    "warehouse would open in spring after the roof inspection and the electrical survey were "
    "complete while the staff training would start two weeks before the opening date"
).split()


def long_prompt(rng, words):
    return " ".join(rng.choice(LONG_TEXT_WORDS) for _ in range(words))


class Recorder:
    """Outcome counters and per-window latencies, shared by the client threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.outcomes = {}
        self.lost_examples = []
        self.window_latencies = []
        self.window_ttfts = []
        self.all_latencies = []
        self.all_ttfts = []
        self.requests = 0
        # The outcome of the calling thread's latest request.
        self.last = threading.local()

    def record(self, kind, outcome, latency=None, ttft=None, detail=None):
        self.last.outcome = outcome
        with self.lock:
            self.requests += 1
            key = f"{kind}:{outcome}"
            self.outcomes[key] = self.outcomes.get(key, 0) + 1
            if outcome == "lost" and len(self.lost_examples) < 20:
                self.lost_examples.append({"kind": kind, "detail": detail, "at": time.time()})
            if latency is not None:
                self.window_latencies.append(latency)
                self.all_latencies.append(latency)
            if ttft is not None:
                self.window_ttfts.append(ttft)
                self.all_ttfts.append(ttft)

    def take_window(self):
        with self.lock:
            lat, ttft = self.window_latencies, self.window_ttfts
            self.window_latencies, self.window_ttfts = [], []
            return lat, ttft


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    index = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[index]


class Client:
    def __init__(self, host, port, model, api_key, timeout):
        self.host, self.port, self.model, self.timeout = host, port, model, timeout
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def connect(self):
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request(self, method, path, body=None, raw=None):
        """Whole response: (status, parsed JSON or None, text)."""
        conn = self.connect()
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            conn.request(method, path, body=data, headers=self.headers)
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            return response.status, parsed, text
        finally:
            conn.close()


def defined_error(status, parsed):
    """An error the API defines: a 4xx or 503 with an OpenAI error body."""
    return (400 <= status < 500 or status == 503) and isinstance(parsed, dict) and "error" in parsed


def run_whole(client, rec, kind, path, body):
    start = time.monotonic()
    try:
        status, parsed, text = client.request("POST", path, body)
    except (OSError, http.client.HTTPException) as e:
        rec.record(kind, "lost", detail=f"{type(e).__name__}: {e}")
        return
    latency = time.monotonic() - start
    if status == 200 and isinstance(parsed, dict) and parsed.get("choices"):
        rec.record(kind, "ok", latency=latency)
    elif status == 429 and defined_error(status, parsed):
        rec.record(kind, "rejected_429")
    elif defined_error(status, parsed):
        rec.record(kind, f"error_{status}")
    else:
        rec.record(kind, "lost", detail=f"status {status}: {text[:200]}")


def run_stream(client, rec, kind, path, body, hang_up_after=None):
    """A streamed request; with `hang_up_after`, the client closes after that many chunks."""
    start = time.monotonic()
    conn = client.connect()
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers=client.headers)
        response = conn.getresponse()
        if response.status != 200:
            text = response.read().decode("utf-8", "replace")
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            if response.status == 429 and defined_error(response.status, parsed):
                rec.record(kind, "rejected_429")
            elif defined_error(response.status, parsed):
                rec.record(kind, f"error_{response.status}")
            else:
                rec.record(kind, "lost", detail=f"status {response.status}: {text[:200]}")
            return
        chunks, ttft, done, finish = 0, None, False, None
        while True:
            line = response.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            payload = line[6:]
            if payload == b"[DONE]":
                done = True
                break
            event = json.loads(payload)
            if "error" in event:
                rec.record(kind, "error_in_stream", detail=str(event)[:200])
                return
            chunks += 1
            for choice in event.get("choices", []):
                finish = choice.get("finish_reason") or finish
                # The first chunk with generated text; the chat role chunk carries none.
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if ttft is None and text:
                    ttft = time.monotonic() - start
            if hang_up_after is not None and chunks >= hang_up_after:
                rec.record(kind, "hung_up", ttft=ttft)
                return
        if done and finish is not None:
            rec.record(kind, "ok", latency=time.monotonic() - start, ttft=ttft)
        else:
            rec.record(kind, "lost", detail=f"stream ended without [DONE] after {chunks} chunks")
    except (OSError, http.client.HTTPException, ValueError) as e:
        rec.record(kind, "lost", detail=f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def one_request(client, rec, rng, max_body_bytes):
    """One request of a kind drawn from the traffic mix."""
    roll = rng.random()
    model = client.model
    if roll < 0.22:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": rng.choice(SHORT_QUESTIONS)}],
            "max_tokens": rng.randint(4, 24),
            "temperature": rng.choice([0, 0.7]),
        }
        run_whole(client, rec, "chat_short", "/v1/chat/completions", body)
    elif roll < 0.40:
        body = {
            "model": model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": rng.choice(SHORT_QUESTIONS)},
            ],
            "max_tokens": rng.randint(8, 32),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        run_stream(client, rec, "chat_shared_prefix_stream", "/v1/chat/completions", body)
    elif roll < 0.52:
        body = {
            "model": model,
            "prompt": long_prompt(rng, rng.randint(500, 1300)),
            "max_tokens": rng.randint(4, 16),
            "temperature": 0.8,
            "seed": rng.randint(0, 1 << 30),
        }
        run_whole(client, rec, "completion_long", "/v1/completions", body)
    elif roll < 0.62:
        body = {
            "model": model,
            "prompt": long_prompt(rng, rng.randint(20, 80)),
            "max_tokens": rng.randint(16, 48),
            "stream": True,
            "n": rng.choice([1, 2]),
            "logprobs": rng.choice([None, 2]),
        }
        run_stream(client, rec, "completion_stream", "/v1/completions", body)
    elif roll < 0.74:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": long_prompt(rng, rng.randint(50, 400))}],
            "max_tokens": 64,
            "stream": True,
            "ignore_eos": True,
        }
        run_stream(client, rec, "chat_stream_hang_up", "/v1/chat/completions", body,
                   hang_up_after=rng.randint(1, 6))
    elif roll < 0.88:
        run_invalid(client, rec, rng, max_body_bytes)
    else:
        status = None
        try:
            status, _, _ = client.request("GET", rng.choice(["/v1/models", "/health", "/metrics"]))
        except (OSError, http.client.HTTPException) as e:
            rec.record("get", "lost", detail=f"{type(e).__name__}: {e}")
            return
        rec.record("get", "ok" if status == 200 else "lost", detail=f"status {status}")


def run_invalid(client, rec, rng, max_body_bytes):
    """A request the server must refuse with a defined error, never a 5xx or a hang."""
    model = client.model
    cases = [
        ("/v1/chat/completions", b"{not json"),
        ("/v1/chat/completions", json.dumps({"model": model, "messages": []}).encode()),
        ("/v1/chat/completions", json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": -3}).encode()),
        ("/v1/completions", json.dumps({"model": "no-such-model", "prompt": "hi"}).encode()),
        ("/v1/completions", json.dumps({"model": model, "prompt": [1, 2, 10 ** 9]}).encode()),
        ("/v1/completions", json.dumps({"model": model, "prompt": "hi", "max_tokens": 10 ** 7}).encode()),
        ("/v1/completions", json.dumps({"model": model, "prompt": "hi", "temperature": "hot"}).encode()),
        ("/v1/completions", json.dumps({"model": model, "prompt": "hi", "n": 1000}).encode()),
        ("/v1/completions", b"\xff\xfe" + os.urandom(64)),
        ("/v1/completions", b"x" * (max_body_bytes + 1)),
        ("/v1/no/such/endpoint", b"{}"),
    ]
    path, raw = rng.choice(cases)
    kind = "invalid"
    try:
        status, parsed, text = client.request("POST", path, raw=raw)
    except (OSError, http.client.HTTPException) as e:
        rec.record(kind, "lost", detail=f"{type(e).__name__}: {e} ({path}, {raw[:60]!r})")
        return
    if defined_error(status, parsed) and status != 503:
        rec.record(kind, f"error_{status}")
    else:
        rec.record(kind, "lost", detail=f"status {status} for {raw[:60]!r}: {text[:200]}")


def burst(client, rec, rng, size):
    """`size` short requests at once, beyond the queue bound: each must be served or get 429."""
    threads = []
    for _ in range(size):
        body = {
            "model": client.model,
            "prompt": rng.choice(SHORT_QUESTIONS),
            "max_tokens": rng.randint(2, 8),
        }
        t = threading.Thread(target=run_whole, args=(client, rec, "burst", "/v1/completions", body))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()


class ServerProcess:
    """/proc figures of one watched process."""

    def __init__(self, pid):
        self.pid = pid

    def alive(self):
        return os.path.exists(f"/proc/{self.pid}")

    def sample(self):
        status = open(f"/proc/{self.pid}/status").read()
        rss_kib = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
        threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
        fds, regions = 0, 0
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            # Shared-memory regions of KV transfers, kept for reuse (a bounded pool): counted
            # apart from the descriptors that must return to idle.
            if target.startswith("/memfd:fdrt-kv"):
                regions += 1
            else:
                fds += 1
        return {"rss_mib": round(rss_kib / 1024, 1), "fds": fds, "kv_regions": regions, "threads": threads}


class Watched:
    """The processes a run watches: the server the load goes to (named `server`) and, behind a
    router, its instances. Each is sampled from /proc; the scheduler figures are summed over
    every process that has them."""

    def __init__(self, front_pid, front_client, instances, api_key):
        self.processes = [("server", ServerProcess(front_pid), front_client)]
        for name, port, pid in instances:
            client = Client("127.0.0.1", port, None, api_key, timeout=60)
            self.processes.append((name, ServerProcess(pid), client))

    def names(self):
        return [name for name, _, _ in self.processes]

    def alive(self):
        return all(p.alive() for _, p, _ in self.processes)

    def sample(self):
        """One flat row: `NAME_rss_mib`, `NAME_fds`, `NAME_threads` per process (plain `rss_mib`,
        `fds`, `threads` for the server), then the summed scheduler figures."""
        row = {}
        totals = {}
        for name, process, client in self.processes:
            prefix = "" if name == "server" else name + "_"
            for key, value in process.sample().items():
                row[prefix + key] = value
            for key, value in scrape(client).items():
                totals[key] = totals.get(key, 0) + value
        row.update(totals)
        return row


def scrape(client):
    _, _, text = client.request("GET", "/metrics")
    values = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            pass

    def gauge(prefix):
        return sum(v for k, v in values.items() if k.split("{")[0] == prefix)

    return {
        "kv_blocks_used": gauge("fdrt:kv_cache_used_blocks"),
        "kv_blocks_total": gauge("fdrt:kv_cache_total_blocks"),
        "running": gauge("fdrt:num_requests_running"),
        "waiting": gauge("fdrt:num_requests_waiting"),
        "preemptions": gauge("fdrt:num_preemptions_total"),
        # Zero unless the server runs with --speculative-config.
        "spec_draft_tokens": gauge("fdrt:spec_decode_num_draft_tokens_total"),
        "spec_accepted_tokens": gauge("fdrt:spec_decode_num_accepted_tokens_total"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pid", type=int, required=True, help="the server's process id")
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--burst-every", type=float, default=120, help="seconds between bursts")
    parser.add_argument("--burst-size", type=int, default=24)
    parser.add_argument("--sample-every", type=float, default=20)
    parser.add_argument("--warmup-minutes", type=float, default=5)
    parser.add_argument("--max-body-bytes", type=int, default=4 << 20)
    parser.add_argument("--api-key")
    parser.add_argument("--out", required=True, help="directory for timeline.jsonl and summary.json")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--instance", action="append", default=[], metavar="NAME:PORT:PID",
                        help="an instance behind the server at --port (a router) to sample and check too")
    args = parser.parse_args()
    instances = []
    for spec in args.instance:
        name, port, pid = spec.split(":")
        instances.append((name, int(port), int(pid)))

    os.makedirs(args.out, exist_ok=True)
    client = Client("127.0.0.1", args.port, None, args.api_key, timeout=600)
    _, models, _ = client.request("GET", "/v1/models")
    client.model = models["data"][0]["id"]
    server = Watched(args.pid, client, instances, args.api_key)
    rec = Recorder()
    stop = threading.Event()
    start = time.monotonic()
    deadline = start + args.minutes * 60

    # One completion first: the kernels' worker pool starts its threads on first use, and they
    # stay (a pool, not a leak); the idle baseline is the server after that. Its prompt is long
    # enough to move KV blocks behind a router, so a prefill instance computes too.
    client.request(
        "POST",
        "/v1/completions",
        {"model": client.model, "prompt": SYSTEM_PROMPT + "Warm up.", "max_tokens": 2, "temperature": 0},
    )
    idle_before = server.sample()

    def worker(index):
        rng = random.Random(args.seed * 1000 + index)
        while not stop.is_set():
            rec.last.outcome = None
            one_request(client, rec, rng, args.max_body_bytes)
            # A refused client backs off as a real one would, rather than spinning on 429s.
            if rec.last.outcome == "rejected_429":
                stop.wait(rng.uniform(0.5, 2.0))

    def burster():
        rng = random.Random(args.seed)
        while not stop.wait(args.burst_every):
            burst(client, rec, rng, args.burst_size)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.clients)]
    threads.append(threading.Thread(target=burster, daemon=True))
    for t in threads:
        t.start()

    timeline = open(os.path.join(args.out, "timeline.jsonl"), "w")
    samples = []
    while time.monotonic() < deadline:
        time.sleep(min(args.sample_every, max(0.0, deadline - time.monotonic())))
        if not server.alive():
            print("a watched process is gone", file=sys.stderr)
            break
        row = {"t_s": round(time.monotonic() - start, 1)}
        row.update(server.sample())
        lat, ttft = rec.take_window()
        row.update({
            "finished": len(lat),
            "e2e_p50_s": percentile(lat, 50),
            "e2e_p99_s": percentile(lat, 99),
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99),
            "requests_so_far": rec.requests,
        })
        samples.append(row)
        timeline.write(json.dumps(row) + "\n")
        timeline.flush()
        print(json.dumps(row), flush=True)

    stop.set()
    for t in threads:
        t.join(timeout=900)
    # Idle: wait for the scheduler to empty (hung-up streams are cancelled at their next step).
    alive = server.alive()
    idle_after = None
    if alive:
        for _ in range(120):
            m = server.sample()
            if m["running"] == 0 and m["waiting"] == 0 and m["kv_blocks_used"] == 0:
                break
            time.sleep(0.5)
        # Idle threads of the async runtime's blocking pool (shared-memory transfers use it)
        # end after 10 s.
        time.sleep(12)
        idle_after = server.sample()

    warm = [s for s in samples if s["t_s"] >= args.warmup_minutes * 60]
    lost = sum(v for k, v in rec.outcomes.items() if k.endswith(":lost") or k.endswith(":error_in_stream"))
    rss_warm = [s["rss_mib"] for s in warm]
    summary = {
        "minutes": round((time.monotonic() - start) / 60, 1),
        "requests": rec.requests,
        "outcomes": dict(sorted(rec.outcomes.items())),
        "lost": lost,
        "lost_examples": rec.lost_examples,
        "e2e_p50_s": percentile(rec.all_latencies, 50),
        "e2e_p99_s": percentile(rec.all_latencies, 99),
        "ttft_p50_s": percentile(rec.all_ttfts, 50),
        "ttft_p99_s": percentile(rec.all_ttfts, 99),
        "mean_e2e_s": statistics.mean(rec.all_latencies) if rec.all_latencies else None,
        "rss_mib_after_warmup": {"first": rss_warm[0], "min": min(rss_warm), "max": max(rss_warm),
                                 "last": rss_warm[-1]} if rss_warm else None,
        "kv_blocks_used_max": max((s["kv_blocks_used"] for s in samples), default=None),
        "idle_before": idle_before,
        "idle_after": idle_after,
        "server_alive": alive,
    }
    checks = {
        "server_alive": alive,
        "no_request_lost": lost == 0,
        "kv_free_at_end": bool(idle_after) and idle_after["kv_blocks_used"] == 0
        and idle_after["running"] == 0 and idle_after["waiting"] == 0,
    }
    for name in server.names():
        prefix = "" if name == "server" else name + "_"
        label = "" if name == "server" else "_" + name
        checks["fds_back_to_idle" + label] = bool(idle_after) and idle_after[prefix + "fds"] <= idle_before[prefix + "fds"]
        checks["threads_back_to_idle" + label] = bool(idle_after) and idle_after[prefix + "threads"] <= idle_before[prefix + "threads"]
        # Transfer regions (decode side) and mappings (prefill side): at most 8 transfers at once
        # and 4 kept for reuse.
        checks["kv_regions_bounded" + label] = all(s_[prefix + "kv_regions"] <= 12 for s_ in samples)
        # Flat after warm-up: the last third's peak within 10% of the first third's after warm-up.
        rss = [s[prefix + "rss_mib"] for s in warm]
        checks["rss_flat_after_warmup" + label] = bool(rss) and max(rss[-max(1, len(rss) // 3):]) \
            <= 1.10 * max(rss[: max(1, len(rss) // 3)])
    summary["checks"] = checks
    summary["pass"] = all(checks.values())
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
