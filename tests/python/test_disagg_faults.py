"""Disaggregated serving with real processes, each `fdrt serve` or `fdrt router` its own.

Two of each: `fdrt router` in front of two prefill and two decode instances answers greedy
requests exactly as one mixed instance does, and both decode instances take blocks.

Faults: `fdrt router` in front of one prefill and two decode instances, and instances killed
with SIGKILL (no drain, no goodbye: what a crash or an OOM kill does) at the moments that matter.

- A decode instance killed while it streams an answer: the stream ends (an error event, then the
  end) well within a deadline, and the router serves the next requests with the other one.
- A decode instance killed while it waits for a transfer from a busy prefill instance: the
  request is retried on the other decode instance and completes; the prefill instance serves on.
- The prefill instance killed while requests queue in it: every request completes (the decode
  instances compute the prompts themselves).

Every request here has a deadline; a hang fails the test. Run by scripts/test.sh; needs FDRT_BIN
and FDRT_TEST_PLAN (SmolLM2), as test_openai_client.py does.
"""

import concurrent.futures
import json
import time
import unittest
import urllib.error
import urllib.request

from tests.python.test_openai_client import API_KEY, MODEL, SERVE, ServerProcess

DEADLINE = 90
BLOCK = ["--block-size", "16", "--threads", "1"]


def metrics(address):
    request = urllib.request.Request(f"http://{address}/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    return urllib.request.urlopen(request, timeout=10).read().decode()


def value(text, name, labels=""):
    """The first sample of `name` whose labels contain `labels`."""
    for line in text.splitlines():
        if line.startswith(name + "{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def post(address, body, timeout=DEADLINE):
    """POST /v1/completions; returns (status, parsed body)."""
    request = urllib.request.Request(
        f"http://{address}/v1/completions", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def prompt(seed, length):
    return [1000 + (seed * 7919 + i * 104729) % 40000 for i in range(length)]


def completion(tokens, max_tokens, stream=False):
    return {"model": MODEL, "prompt": tokens, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}


def wait_until(condition, what, timeout=60):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Deployment:
    """A router, one prefill instance (one request at a time, so others queue in it) and two
    decode instances."""

    def __init__(self):
        # SERVE's --max-num-seqs 4, made 1 for the prefill instance.
        one_at_a_time = [("1" if prev == "--max-num-seqs" else a) for prev, a in zip([None] + SERVE, SERVE)]
        self.prefill = ServerProcess(
            one_at_a_time + BLOCK + ["--role", "prefill", "--kv-transfer-port", "0"],
            wait_for=(r"http://([0-9.]+:[0-9]+)/v1", r"KV transfers to decode instances at ([0-9.]+:[0-9]+)"))
        self.decode = [ServerProcess(SERVE + BLOCK + ["--role", "decode", "--kv-source", self.prefill.found[1]])
                       for _ in range(2)]
        self.router = ServerProcess(["router", "--port", "0", "--prefill", self.prefill.address]
                                    + sum((["--decode", d.address] for d in self.decode), []))
        self.processes = [self.router, *self.decode, self.prefill]

    def kill(self, process):
        process.process.kill()
        process.process.wait(timeout=30)

    def close(self):
        for p in self.processes:
            if p.process.poll() is None:
                p.process.kill()
                p.process.wait(timeout=30)

    def outstanding(self, decode):
        text = metrics(self.router.address)
        return value(text, "fdrt_router:instance_outstanding_requests", f'address="{decode.address}"') or 0

    def healthy_serving(self, n=3):
        """`n` requests through the router, each answered in full."""
        for i in range(n):
            status, body = post(self.router.address, completion(prompt(100 + i, 40), 4))
            assert status == 200, (status, body)
            assert body["usage"]["completion_tokens"] == 4, body


class TwoOfEachTest(unittest.TestCase):
    def test_two_prefill_and_two_decode_instances_answer_as_one_mixed_instance(self):
        mixed = ServerProcess(SERVE + BLOCK)
        prefill = [ServerProcess(SERVE + BLOCK + ["--role", "prefill", "--kv-transfer-port", "0"],
                                 wait_for=(r"http://([0-9.]+:[0-9]+)/v1",
                                           r"KV transfers to decode instances at ([0-9.]+:[0-9]+)"))
                   for _ in range(2)]
        sources = sum((["--kv-source", p.found[1]] for p in prefill), [])
        decode = [ServerProcess(SERVE + BLOCK + ["--role", "decode"] + sources) for _ in range(2)]
        router = ServerProcess(["router", "--port", "0"]
                               + sum((["--prefill", p.address] for p in prefill), [])
                               + sum((["--decode", d.address] for d in decode), []))
        processes = [router, *decode, *prefill, mixed]
        try:
            shared = prompt(7, 48)
            prompts = [prompt(20 + i, 40 + 23 * i) for i in range(6)] + [shared + prompt(30 + i, 9 + i) for i in range(4)]
            for i, tokens in enumerate(prompts):
                body = completion(tokens, 8)
                status, want = post(mixed.address, body)
                self.assertEqual(status, 200, want)
                status, got = post(router.address, body)
                self.assertEqual(status, 200, got)
                self.assertEqual(got["choices"][0]["text"], want["choices"][0]["text"], f"prompt {i}")
            text = metrics(router.address)
            for d in decode:
                self.assertGreater(value(text, "fdrt_router:instance_requests_total", f'address="{d.address}"'), 0)
            received = sum(value(metrics(d.address), "fdrt:kv_transfer_received_blocks_total") for d in decode)
            sent = [value(metrics(p.address), "fdrt:kv_transfer_sent_blocks_total") for p in prefill]
            self.assertGreater(received, 0)
            self.assertEqual(received, sum(sent))
        finally:
            for p in processes:
                self.assertEqual(p.stop(), 0, "".join(p.log))


class DisaggFaultTest(unittest.TestCase):
    def setUp(self):
        self.d = Deployment()
        self.addCleanup(self.d.close)

    def test_a_decode_instance_killed_mid_stream_ends_the_stream_and_the_other_serves(self):
        body = json.dumps(completion(prompt(1, 48), 900, stream=True)).encode()
        request = urllib.request.Request(
            f"http://{self.d.router.address}/v1/completions", data=body, method="POST",
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        start = time.monotonic()
        response = urllib.request.urlopen(request, timeout=DEADLINE)
        lines = []
        # Some tokens first, so the answer is under way.
        while len([l for l in lines if l.startswith(b"data: {")]) < 3:
            lines.append(response.readline())
        victim = next(d for d in self.d.decode if self.d.outstanding(d) > 0)
        self.d.kill(victim)
        for line in response:
            lines.append(line)
            self.assertLess(time.monotonic() - start, DEADLINE, "the stream hung")
        text = b"".join(lines).decode()
        self.assertIn('"error"', text, "an error event tells the client the answer broke off")
        self.assertTrue(text.rstrip().endswith("data: [DONE]"), text[-300:])
        self.d.healthy_serving()

    def test_a_decode_instance_killed_during_a_transfer_is_retried_elsewhere(self):
        # A long prompt ahead in the prefill instance (one request at a time) keeps the second
        # request's transfer waiting there.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, self.d.router.address, completion(prompt(2, 900), 2))
            wait_until(lambda: value(metrics(self.d.prefill.address), "fdrt:num_requests_running") == 1,
                       "the long prompt running in the prefill instance")
            second = pool.submit(post, self.d.router.address, completion(prompt(3, 600), 3))
            wait_until(lambda: value(metrics(self.d.prefill.address), "fdrt:kv_transfers_active") == 2,
                       "both transfers under way")
            # The decode instance waiting for the second prompt's blocks (the first's may be
            # on the same one: then both are retried).
            victim = next(d for d in self.d.decode if self.d.outstanding(d) > 0)
            self.d.kill(victim)
            for future in (first, second):
                status, body = future.result(timeout=DEADLINE)
                self.assertEqual(status, 200, body)
                self.assertGreater(body["usage"]["completion_tokens"], 0)
        self.assertIsNone(self.d.prefill.process.poll(), "the prefill instance serves on")
        survivor = next(d for d in self.d.decode if d is not victim)
        before = value(metrics(survivor.address), "fdrt:kv_transfer_received_blocks_total")
        self.d.healthy_serving()
        status, _ = post(self.d.router.address, completion(prompt(4, 200), 2))
        self.assertEqual(status, 200)
        after = value(metrics(survivor.address), "fdrt:kv_transfer_received_blocks_total")
        self.assertGreater(after, before, "blocks still move from the surviving prefill instance")

    def test_the_prefill_instance_killed_while_requests_queue_in_it_loses_none(self):
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(post, self.d.router.address, completion(prompt(10 + i, 700), 2)) for i in range(3)]
            wait_until(lambda: (value(metrics(self.d.prefill.address), "fdrt:num_requests_waiting") or 0) >= 1,
                       "requests queued in the prefill instance")
            self.d.kill(self.d.prefill)
            start = time.monotonic()
            for future in futures:
                status, body = future.result(timeout=DEADLINE)
                self.assertEqual(status, 200, body)
                self.assertEqual(body["usage"]["completion_tokens"], 2)
            self.assertLess(time.monotonic() - start, DEADLINE)
        failures = sum(value(metrics(d.address), "fdrt:kv_transfer_failures_total") for d in self.d.decode)
        self.assertGreaterEqual(failures, 1, "the decode instances saw the transfers fail")
        self.d.healthy_serving()


if __name__ == "__main__":
    unittest.main()
