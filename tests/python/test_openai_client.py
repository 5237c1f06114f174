"""`fdrt serve` driven by the official `openai` Python package.

Starts `fdrt serve` on a free loopback port with the SmolLM2 plan, then checks what an OpenAI
client sees: models.list, chat (whole and streamed, with usage), completions, logprobs, seeded
sampling, stop sequences, and the exceptions for bad requests, an unknown model and a wrong key.
On the way out the server gets SIGTERM and must drain and exit with status 0.

With FDRT_TEST_DISAGG=1 the same checks run through `fdrt router` in front of a prefill and a
decode instance (`fdrt serve --role prefill|decode`) instead, and all three must stop cleanly.

Environment: FDRT_BIN (default target/debug/fdrt) and FDRT_TEST_PLAN (default
.cache/plans/smollm2-bf16.fdp), both relative to the repository root unless absolute.
Run: python -m unittest tests/python/test_openai_client.py (scripts/test.sh does).
"""

import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import unittest
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key"
MODEL = "smollm2"


def _path(variable, default):
    value = Path(os.environ.get(variable) or default)
    return value if value.is_absolute() else ROOT / value


class ServerProcess:
    """An `fdrt` child process (`serve` or `router`); its log is kept for failure messages, and
    the addresses it prints are read from it."""

    def __init__(self, args, wait_for=(r"http://([0-9.]+:[0-9]+)/v1",)):
        binary = _path("FDRT_BIN", "target/debug/fdrt")
        plan = _path("FDRT_TEST_PLAN", ".cache/plans/smollm2-bf16.fdp")
        for p in (binary, plan):
            if not p.exists():
                raise RuntimeError(f"{p} is missing: build fdrt and compile the SmolLM2 plan first (scripts/test.sh does)")
        command = [str(binary)] + [str(plan) if a == "PLAN" else a for a in args]
        env = dict(os.environ, RUST_LOG="info", NO_COLOR="1", FDRT_API_KEY=API_KEY)
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.log = []
        self.found = [None] * len(wait_for)
        ready = threading.Event()

        def read_log():
            for line in self.process.stderr:
                self.log.append(line)
                for i, pattern in enumerate(wait_for):
                    match = re.search(pattern, line)
                    if match and self.found[i] is None:
                        self.found[i] = match.group(1)
                if all(self.found):
                    ready.set()
            ready.set()

        threading.Thread(target=read_log, daemon=True).start()
        if not ready.wait(timeout=300) or not all(self.found):
            self.process.kill()
            raise RuntimeError(f"fdrt {args[0]} did not start:\n" + "".join(self.log))
        self.address = self.found[0]

    def stop(self):
        """SIGTERM, then the exit status (a server drains and exits 0)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return None


SERVE = ["serve", "PLAN", "--port", "0", "--max-num-seqs", "4", "--max-context", "1024",
         "--served-model-name", MODEL, "--drain-timeout", "20"]


def start_processes():
    """The server the client talks to, and every process to stop at the end (servers last)."""
    if os.environ.get("FDRT_TEST_DISAGG") != "1":
        server = ServerProcess(SERVE)
        return server, [server]
    # Blocks of 16 positions, so that even the chat prompts here move blocks; both instances
    # hold the same transfer key.
    key = tempfile.NamedTemporaryFile("w", suffix=".key", delete=False)
    key.write("a secret shared by this test's instances\n")
    key.close()
    KEY_FILES.append(key.name)
    blocks = ["--block-size", "16", "--kv-transfer-key-file", key.name]
    prefill = ServerProcess(SERVE + blocks + ["--role", "prefill", "--kv-transfer-port", "0"],
                            wait_for=(r"http://([0-9.]+:[0-9]+)/v1", r"KV transfers to decode instances at ([0-9.]+:[0-9]+)"))
    decode = ServerProcess(SERVE + blocks + ["--role", "decode", "--kv-source", prefill.found[1]])
    router = ServerProcess(["router", "--port", "0", "--prefill", prefill.address, "--decode", decode.address])
    return router, [router, decode, prefill]


SERVER = None
KEY_FILES = []


PROCESSES = []


def setUpModule():
    global SERVER, PROCESSES
    SERVER, PROCESSES = start_processes()


def tearDownModule():
    for name in KEY_FILES:
        os.unlink(name)
    if len(PROCESSES) > 1:
        # The decode instance took KV blocks from the prefill instance, and none failed.
        import urllib.request
        request = urllib.request.Request(f"http://{PROCESSES[1].address}/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
        text = urllib.request.urlopen(request, timeout=30).read().decode()
        def value(name):
            found = re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M)
            return float(found.group(1)) if found else None
        # Both instances are on this host: the blocks came through shared memory.
        if (not value("fdrt:kv_transfer_received_blocks_total") or value("fdrt:kv_transfer_failures_total") != 0
                or value("fdrt:kv_transfer_received_shared_memory_blocks_total") != value("fdrt:kv_transfer_received_blocks_total")):
            raise AssertionError("the decode instance's transfers:\n" + text)
    for process in PROCESSES:
        status = process.stop()
        log = "".join(process.log)
        if status != 0:
            raise AssertionError(f"fdrt exited with {status} after SIGTERM:\n" + log)
        if process is not PROCESSES[0] or len(PROCESSES) == 1:
            if "drained" not in log:
                raise AssertionError("the server did not log its drain:\n" + log)


def client(key=API_KEY):
    return openai.OpenAI(base_url=f"http://{SERVER.address}/v1", api_key=key, max_retries=0, timeout=120)


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class OpenAIClientTest(unittest.TestCase):
    def test_models_list(self):
        ids = [m.id for m in client().models.list()]
        self.assertEqual(ids, [MODEL])

    def test_chat_whole_and_streamed_agree(self):
        c = client()
        whole = c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
        choice = whole.choices[0]
        self.assertIn("Paris", choice.message.content)
        self.assertEqual(choice.message.role, "assistant")
        self.assertIn(choice.finish_reason, ("stop", "length"))
        self.assertTrue(whole.id.startswith("chatcmpl-"))
        self.assertGreater(whole.usage.prompt_tokens, 5)
        self.assertEqual(whole.usage.total_tokens, whole.usage.prompt_tokens + whole.usage.completion_tokens)

        stream = c.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, usage = "", None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c_ in chunk.choices:
                text += c_.delta.content or ""
                finish = c_.finish_reason or finish
        self.assertEqual(text, choice.message.content)
        self.assertEqual(finish, choice.finish_reason)
        self.assertEqual(usage.completion_tokens, whole.usage.completion_tokens)
        self.assertEqual(usage.prompt_tokens, whole.usage.prompt_tokens)

    def test_completions_text_and_several_choices(self):
        out = client().completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
        self.assertEqual(len(out.choices), 1)
        self.assertTrue(out.choices[0].text.strip())
        self.assertIn(out.choices[0].finish_reason, ("stop", "length"))
        two = client().completions.create(
            model=MODEL, prompt=["The capital of France is", "One, two,"], max_tokens=4, temperature=0,
        )
        self.assertEqual([c.index for c in two.choices], [0, 1])
        self.assertEqual(two.choices[0].text, out.choices[0].text[: len(two.choices[0].text)])

    def test_logprobs(self):
        out = client().chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
        )
        content = out.choices[0].logprobs.content
        self.assertTrue(content)
        for entry in content:
            self.assertEqual(len(entry.top_logprobs), 2)
            self.assertEqual(entry.token, entry.top_logprobs[0].token)
            self.assertGreaterEqual(entry.top_logprobs[0].logprob, entry.top_logprobs[1].logprob)
            self.assertLessEqual(entry.logprob, 0.0)

    def test_seed_reproduces_a_sample(self):
        def sample(seed):
            return client().completions.create(
                model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.2, seed=seed,
            ).choices[0].text

        self.assertEqual(sample(1234), sample(1234))
        self.assertNotEqual(sample(1234), sample(99))

    def test_penalties_change_a_repetitive_greedy_text(self):
        def complete(**penalties):
            return client().completions.create(
                model=MODEL, prompt="One, two, three, four,", max_tokens=16, temperature=0, **penalties,
            ).choices[0].text

        plain = complete()
        self.assertNotEqual(complete(frequency_penalty=2.0), plain)
        self.assertNotEqual(complete(presence_penalty=2.0), plain)
        # The client passes vLLM's extra fields through `extra_body`.
        self.assertNotEqual(complete(extra_body={"repetition_penalty": 1.5}), plain)

    def test_stop_sequence_cuts_the_text(self):
        c = client()
        full = c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
        text = full.choices[0].message.content
        self.assertIn("Paris", text)
        cut = c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, stop=["Paris"])
        self.assertEqual(cut.choices[0].message.content, text[: text.index("Paris")])
        self.assertEqual(cut.choices[0].finish_reason, "stop")

    def test_errors_raise_the_matching_exceptions(self):
        with self.assertRaises(openai.BadRequestError) as bad:
            client().chat.completions.create(model=MODEL, messages=QUESTION, temperature=-1)
        self.assertEqual(bad.exception.status_code, 400)
        self.assertIn("temperature", str(bad.exception))
        with self.assertRaises(openai.NotFoundError):
            client().chat.completions.create(model="gpt-4o", messages=QUESTION)
        with self.assertRaises(openai.AuthenticationError):
            client(key="wrong").models.list()


if __name__ == "__main__":
    unittest.main()
