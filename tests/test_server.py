"""The HTTP server (grokcpu.server), started as a real subprocess on a loopback port and driven
with the official `openai` client and httpx. Every wait is bounded."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from conftest import FIXTURES, ROOT, TOKENIZER, greedy_direct, need_shared  # noqa: E402
from grokcpu import engine  # noqa: E402
from grokcpu.sampling import make_sampler  # noqa: E402

KEY = "s3cret-key"
START_TIMEOUT = 240          # the first start may compile the numba kernels


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args, env=None, cmd=("-m", "grokcpu.server")):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.devnull, "w")
        e = dict(os.environ, **(env or {}))
        self.proc = subprocess.Popen([sys.executable, *cmd, "--port", str(self.port),
                                      "--threads", "1", *args], cwd=ROOT, env=e,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.out = []
        self.reader = threading.Thread(target=lambda: self.out.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "server exited:\n" + "".join(self.out)
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200 and r.json() == {"status": "ok"}:
                    return self
                assert r.status_code == 503 and r.json()["status"] == "loading"
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("server not ready in time:\n" + "".join(self.out))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.reader.join(5)

    def client(self, key="unused", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, timeout=60, max_retries=0, **kw)

    def post(self, path, body=None, raw=None, headers=None, timeout=60):
        content = raw if raw is not None else json.dumps(body)
        return httpx.post(self.url + path, content=content, headers=headers, timeout=timeout)

    def metric(self, name, headers=None):
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=10).text
        for line in text.splitlines():
            if line.startswith("grokcpu_" + name + " "):
                return float(line.split()[1])
        raise KeyError(name)


@pytest.fixture(scope="module")
def server(demo_path):
    s = Server("--model", str(demo_path), "--parallel", "4", "--queue", "16")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def small_server(demo_path):
    """A fixture checkpoint (context 64, vocab 1024) with the demo tokenizer (1024 pieces), an API
    key, one slot and one queue place, and a small body limit."""
    need_shared()
    s = Server("--model", str(FIXTURES / "p2_e4_l3_softcap"), "--tokenizer", str(demo_path / "tokenizer.model"),
               "--api-key", KEY, "--parallel", "1", "--queue", "1", "--max-body-bytes", "4096")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


PROMPTS = ["The key and value cache", "Experts are read", "A mixture of experts", "The router picks two",
           "Hello world", "Once upon a time", "Numbers 1 2 3", "Attention is all"]


# -- endpoints ------------------------------------------------------------------------------------

def test_health_models_tokenize(server, tok):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = server.client().models.list().data
    assert [m.id for m in models] == ["demo-v1"]
    ids = tok.encode("The key and value cache")
    assert server.post("/tokenize", {"content": "The key and value cache"}).json() == {"tokens": ids}
    assert server.post("/detokenize", {"tokens": ids}).json() == {"content": tok.decode(ids)}
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'grokcpu_requests_total{endpoint="/tokenize",status="200"}' in r.text
    for name in ("generated_tokens_total", "requests_running", "requests_waiting", "tokens_per_second",
                 "expert_cache_hit_rate", "expert_cache_bytes_read_total"):
        assert f"grokcpu_{name} " in r.text, name
    assert "access-control-allow-origin" not in r.headers          # no CORS unless asked


def test_completion_greedy_equals_direct_session(server, model, tok):
    c = server.client()
    ids = tok.encode(PROMPTS[0])
    want = tok.decode(greedy_direct(model, ids, 16))
    r = c.completions.create(model="anything", prompt=PROMPTS[0], max_tokens=16, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.model == "demo-v1"
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 16)
    chunks = list(c.completions.create(model="x", prompt=PROMPTS[0], max_tokens=16, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices
    # prompt as token ids gives the same
    r2 = c.completions.create(model="x", prompt=ids, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    assert r2.choices[0].text == want


def test_logprobs_are_the_log_softmax_of_the_logits(server, model, tok):
    ids = tok.encode(PROMPTS[1])
    s = model.new_session()
    logits = s.prefill(ids, logits="last").astype(np.float64)
    lsm = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    first = int(np.argmax(logits))
    r = server.client().completions.create(model="x", prompt=PROMPTS[1], max_tokens=3, temperature=0, logprobs=3,
                                           extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 3
    assert lp.token_logprobs[0] == pytest.approx(lsm[first], abs=1e-5)
    top = sorted(lp.top_logprobs[0].values(), reverse=True)
    assert top == pytest.approx(sorted(lsm, reverse=True)[:3], abs=1e-5)
    ch = server.client().chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=2, temperature=0, logprobs=True, top_logprobs=2)
    content = ch.choices[0].logprobs.content
    assert content and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)


def test_chat_uses_the_chat_template(server, model, tok):
    msgs = [{"role": "user", "content": "What is a mixture of experts?"}]
    conv = engine.Conversation(model, tok)
    want = [ev for ev in conv.reply(msgs[0]["content"], make_sampler(temperature=0), 12)
            if isinstance(ev, engine.Result)][0]
    c = server.client()
    r = c.chat.completions.create(model="grok", messages=msgs, max_tokens=12, temperature=0)
    m = r.choices[0].message
    assert m.role == "assistant" and m.content == want.text
    assert r.usage.prompt_tokens == len(conv.history_ids([])) + len(conv._user_ids(msgs[0]["content"], False))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in
                       c.chat.completions.create(model="grok", messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True))
    assert streamed == want.text
    # a system message replaces the system text; earlier turns are part of the prompt
    conv2 = engine.Conversation(model, tok, system="You are terse.")
    conv2.turns = [engine.Turn("Hi", "Hello there")]
    want2 = [ev for ev in conv2.reply("And now?", make_sampler(temperature=0), 8) if isinstance(ev, engine.Result)][0]
    r2 = c.chat.completions.create(model="grok", max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": [{"type": "text", "text": "And now?"}]}])
    assert r2.choices[0].message.content == want2.text


def test_seeded_sampling_equals_generate(server, model, tok):
    ids = tok.encode(PROMPTS[2])
    settings = dict(temperature=0.9, top_k=40, top_p=0.95, min_p=0.05)
    want = [ev for ev in engine.generate(model, tok, ids, make_sampler(**settings, seed=42), 16)
            if isinstance(ev, engine.Result)][0]
    r = server.client().completions.create(model="x", prompt=PROMPTS[2], max_tokens=16, seed=42, n=2,
                                           temperature=0.9, top_p=0.95, extra_body={"top_k": 40, "min_p": 0.05})
    assert r.choices[0].text == want.text
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == len(ids)


def test_frequency_penalty(server, model, tok):
    ids = tok.encode(PROMPTS[0])
    s = model.new_session()
    logits = s.prefill(ids, logits="last")
    counts = np.zeros(logits.shape[0], np.float32)
    out = []
    for _ in range(8):                                   # OpenAI: logit -= 1.5 * count
        t = int(np.argmax(logits - np.float32(1.5) * counts))
        out.append(t)
        counts[t] += 1
        logits = s.decode(t)
    r = server.client().completions.create(model="x", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                           frequency_penalty=1.5, extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode(out)


# -- concurrency ----------------------------------------------------------------------------------

def _complete(server, prompt, n=12):
    r = server.post("/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_eight_clients_get_the_answers_of_one_at_a_time(server):
    one_by_one = [_complete(server, p) for p in PROMPTS]
    steps = server.metric("decode_steps_total")
    with ThreadPoolExecutor(8) as ex:
        together = list(ex.map(lambda p: _complete(server, p), PROMPTS, timeout=120))
    assert together == one_by_one
    # decoded together: fewer batched steps than the 8 x 11 that one at a time takes
    assert server.metric("decode_steps_total") - steps < 8 * 11


def test_a_client_killed_mid_stream_frees_its_slot(server):
    body = {"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as cl:
        with cl.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            it = r.iter_lines()
            got = [line for _, line in zip(range(6), it) if line.startswith("data:")]
            assert got
    deadline = time.monotonic() + 20
    while server.metric("requests_running") != 0:
        assert time.monotonic() < deadline, "the killed stream still holds its slot"
        time.sleep(0.1)
    assert _complete(server, "Hello world", 4)


# -- bad requests ---------------------------------------------------------------------------------

BAD = [
    (b"{not json", 400, None),
    (b"", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"prompt": "x", "max_tokens": NaN}', 400, None),
    (b'{"prompt": "x", "temperature": 1e999}', 400, "temperature"),
    (b'{"prompt": "\\ud800"}', 400, "prompt"),
    (b"\xff\xfe", 400, None),
    (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
    (json.dumps({"prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"prompt": ["a", 3]}).encode(), 400, "prompt"),
    (json.dumps({"prompt": [1, 99999]}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "x", "max_tokens": -1}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "max_tokens": "8"}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "max_tokens": 10 ** 40}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "temperature": True}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "x", "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({"prompt": "x", "n": 0}).encode(), 400, "n"),
    (json.dumps({"prompt": "x", "stop": [1]}).encode(), 400, "stop"),
    (json.dumps({"prompt": "x", "seed": "1"}).encode(), 400, "seed"),
    (json.dumps({"prompt": "x", "presence_penalty": 3}).encode(), 400, "presence_penalty"),
    (json.dumps({"prompt": "x", "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"prompt": ""}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "x", "logit_bias": {"5": 10}}).encode(), 400, "logit_bias"),
    (json.dumps({"prompt": "x", "echo": True}).encode(), 400, "echo"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_completion_requests_get_a_4xx_error_body(server, i):
    raw, status, param = BAD[i]
    r = server.post("/v1/completions", raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


@pytest.mark.parametrize("body", [
    {"messages": []}, {"messages": "hi"}, {"messages": [{"role": "robot", "content": "x"}]},
    {"messages": [{"role": "user", "content": 7}]}, {"messages": [{"role": "user", "content": [{"type": "image"}]}]},
    {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
    {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
])
def test_bad_chat_requests(server, body):
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["message"], r.text


def test_other_bad_requests(server):
    assert server.post("/tokenize", {"content": 3}).status_code == 400
    assert server.post("/detokenize", {"tokens": [1, True]}).status_code == 400
    r = httpx.get(server.url + "/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.get(server.url + "/v1/completions").status_code == 405


# -- limits, auth, the queue (one slot, one queue place, context 64) --------------------------------

def _auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def test_api_key(small_server):
    assert httpx.get(small_server.url + "/health").status_code == 200           # /health needs no key
    for headers in (None, _auth("wrong"), {"Authorization": KEY}):
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(small_server.url + path, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = small_server.post("/v1/completions", {"prompt": "x"}, headers=headers)
        assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        small_server.client("wrong").completions.create(model="x", prompt="hi", max_tokens=2)
    r = small_server.client(KEY).completions.create(model="x", prompt="hi", max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_prompt_longer_than_the_context_and_body_limit(small_server):
    r = small_server.post("/v1/completions", {"prompt": list(range(1, 70))}, headers=_auth())
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "64" in r.json()["error"]["message"]
    r = small_server.post("/v1/completions", {"prompt": "word " * 2000}, headers=_auth())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # max_tokens beyond the room left is clipped: the answer ends at the full context
    r = small_server.post("/v1/completions", {"prompt": list(range(1, 61)), "max_tokens": 500, "ignore_eos": True},
                          headers=_auth())
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 64 - 60 + 1


def test_a_flood_beyond_the_queue_gets_503_and_the_server_stays_up(small_server):
    body = {"prompt": "hi", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    go = threading.Barrier(12)

    def one(_):
        go.wait(10)
        return small_server.post("/v1/completions", body, headers=_auth(), timeout=60)

    with ThreadPoolExecutor(12) as ex:
        rs = list(ex.map(one, range(12), timeout=120))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
    busy = next(r for r in rs if r.status_code == 503)
    assert busy.headers["retry-after"] and busy.json()["error"]["code"] == "queue_full"
    ok = small_server.post("/v1/completions", {"prompt": "hi", "max_tokens": 3}, headers=_auth())
    assert ok.status_code == 200
    assert small_server.metric("requests_running", _auth()) == 0


def test_a_tokenizer_that_does_not_fit_stops_the_server_with_one_line(demo_path):
    need_shared()
    s = Server("--model", str(FIXTURES / "p1_e8_l2_basic"), "--tokenizer", str(TOKENIZER))
    try:
        assert s.proc.wait(120) == 1
    finally:
        s.stop()
    errors = [line for line in s.out if line.startswith("error:")]
    assert len(errors) == 1 and "tokenizer does not fit" in errors[0], s.out


def test_grok_cli_serve(demo_path):
    s = Server("--model", str(demo_path), cmd=(str(ROOT / "grok-cli.py"), "serve"))
    try:
        s.wait_ready()
        r = s.post("/v1/completions", {"prompt": "hi", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        s.stop()
