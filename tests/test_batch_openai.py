"""grok-cli batch on OpenAI's batch format: bodies answered as the server answers them, error
records shaped as OpenAI's, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, greedy_direct
from test_cli import cli, read_jsonl, sub, with_threads

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def line(cid, body, url=COMPLETIONS, method="POST"):
    return json.dumps({"custom_id": cid, "method": method, "url": url, "body": body})


@pytest.fixture(scope="module")
def server_client(model, tok):
    """The server's app in this process, on the same model."""
    from starlette.testclient import TestClient
    from grokcpu.server.app import Settings, create_app
    app = create_app(Settings(model_name="demo-v1"), model=model, tokenizer=tok)
    with TestClient(app) as c:
        deadline = time.time() + 60
        while c.get("/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        yield c


BODIES = {
    "greedy": (COMPLETIONS, {"model": "x", "prompt": "The model", "max_tokens": 6, "temperature": 0, "ignore_eos": True}),
    "ids": (COMPLETIONS, {"prompt": [[5, 6, 7], [9]], "max_tokens": 3, "temperature": 0, "ignore_eos": True}),
    "seeded": (COMPLETIONS, {"prompt": "memory", "max_tokens": 8, "temperature": 0.9, "seed": 42, "n": 2,
                             "top_k": 40, "frequency_penalty": 0.5, "ignore_eos": True}),
    "chat": (CHAT, {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello there"},
                                 {"role": "user", "content": "And now?"}], "max_tokens": 7, "temperature": 0}),
    "stop": (CHAT, {"messages": [{"role": "user", "content": "What is a mixture of experts?"}], "max_tokens": 12,
                    "temperature": 0.7, "seed": 5, "stop": ["e"]}),
}


def test_bodies_are_the_servers(server_client, model, tok, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(line(cid, body, url) + "\n" for cid, (url, body) in BODIES.items()), encoding="utf-8")
    r = cli("batch", "-i", inp, "-o", out, "--batch-size", 3)
    assert r.exit_code == 0, r.stderr
    assert "(OpenAI batch format)" in r.stderr
    recs = {rec["custom_id"]: rec for rec in read_jsonl(out)}
    assert sorted(recs) == sorted(BODIES)
    for cid, (url, body) in BODIES.items():
        rec = recs[cid]
        assert rec["error"] is None and rec["id"].startswith("batch_req_") and rec["response"]["status_code"] == 200
        got = rec["response"]["body"]
        want = server_client.post(url, json=body).json()
        for k in ("object", "model", "choices", "usage"):
            assert got[k] == want[k], (cid, k)
        assert got["id"].startswith("chatcmpl-" if url == CHAT else "cmpl-")
        assert set(got["timings"]) == set(want["timings"])
    # greedy is the model's argmax chain, computed without the engine
    ids = tok.encode("The model")
    assert recs["greedy"]["response"]["body"]["choices"][0]["text"] == tok.decode(greedy_direct(model, ids, 6))
    assert recs["greedy"]["response"]["body"]["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6,
                                                            "total_tokens": len(ids) + 6}
    ch = recs["ids"]["response"]["body"]["choices"]
    assert [c["text"] for c in ch] == [tok.decode(greedy_direct(model, p, 3)) for p in ([5, 6, 7], [9])]
    seeded = [c["text"] for c in recs["seeded"]["response"]["body"]["choices"]]
    assert len(seeded) == 2 and seeded[0] != seeded[1]            # choice j: seed + j
    assert "e" not in recs["stop"]["response"]["body"]["choices"][0]["message"]["content"]


def test_seed_equals_generate(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    body = {"prompt": "The answer", "max_tokens": 8, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
            "seed": 11, "ignore_eos": True}
    inp.write_text(line("s", body) + "\n", encoding="utf-8")
    assert cli("batch", "-i", inp, "-o", out).exit_code == 0
    g = cli("generate", "--prompt", "The answer", "-n", 8, "--seed", 11, "--ignore-eos")
    assert g.exit_code == 0
    assert read_jsonl(out)[0]["response"]["body"]["choices"][0]["text"] + "\n" == g.stdout


def test_error_records_and_rerun(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ok = {"prompt": "The model", "max_tokens": 2, "temperature": 0}
    lines = [line("ok", ok),
             "{not json",
             line("url", ok, url="/v1/embeddings"),
             line("get", ok, method="GET"),
             line("stream", dict(ok, stream=True)),
             line("typo", dict(ok, temprature=0.5)),
             line("long", dict(ok, prompt="word " * 80)),
             line("ok", ok),
             json.dumps({"id": 1, "prompt": "ours"}),
             line("chat", {"messages": [{"role": "assistant", "content": "x"}]}, url=CHAT),
             ""]
    inp.write_text("\n".join(lines), encoding="utf-8")
    args = ["batch", "-i", inp, "-o", out, "--context", 64]
    r = cli(*args)
    assert r.exit_code == 0, r.stderr
    recs = read_jsonl(out)
    assert len(recs) == 10 and all(set(x) == {"id", "custom_id", "response", "error"} for x in recs)
    by = {}
    for x in recs:
        by.setdefault(x["custom_id"], []).append(x)
    assert len(by["ok"]) == 2 and sum(x["error"] is None for x in by["ok"]) == 1
    dup = [x for x in by["ok"] if x["error"] is not None][0]
    assert dup["response"] is None and dup["error"] == {"code": "duplicate_custom_id",
                                                        "message": "line 8: duplicate custom_id 'ok'"}
    nulls = by[None]
    assert [x["error"]["code"] for x in nulls] == ["invalid_json", "invalid_request"]
    assert nulls[0]["error"]["message"].startswith("line 2 is not valid JSON")
    assert "use one format per file" in nulls[1]["error"]["message"]
    assert by["url"][0]["error"]["code"] == "invalid_url" and by["url"][0]["response"] is None
    assert by["get"][0]["error"]["code"] == "invalid_method"

    def bad(cid, param, code):
        x = by[cid][0]
        assert x["response"]["status_code"] == 400 and x["response"]["body"]["error"]["param"] == param
        assert x["error"] == {"code": code, "message": x["response"]["body"]["error"]["message"]}
    bad("stream", "stream", "invalid_request_error")
    bad("typo", "temprature", "unknown_parameter")
    assert "did you mean 'temperature'" in by["typo"][0]["error"]["message"]
    bad("long", "prompt", "context_length_exceeded")
    assert by["long"][0]["error"]["message"].startswith("the prompt has 81 tokens but the context holds 64")
    bad("chat", "messages", "invalid_request_error")
    before = out.read_bytes()
    r = cli(*args)                                         # every record is there: nothing is written again
    assert r.exit_code == 0 and "10 already done, 0 to run" in r.stderr and out.read_bytes() == before


def test_a_killed_batch_resumes(tmp_path):
    """Kill a batch mid-way; rerun; every custom_id once, every line whole, and the sampled texts
    (--seed: one stream per custom_id) equal an uninterrupted run with other batching."""
    inp, out, ref = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    n = 40
    words = ["The", "A model", "memory", "experts"]
    inp.write_text("".join(line(f"c{i}", {"prompt": words[i % 4], "max_tokens": 8, "ignore_eos": True} if i % 2 else
                                {"messages": [{"role": "user", "content": words[i % 4]}], "max_tokens": 8,
                                 "ignore_eos": True}, url=COMPLETIONS if i % 2 else CHAT) + "\n"
                           for i in range(n)), encoding="utf-8")
    args = ["batch", "-i", inp, "-o", out, "--seed", 3, "--batch-size", 4]
    proc = subprocess.Popen([sys.executable, "grok-cli.py", *with_threads(args)], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the batch finished before it could be killed"
    partial = read_jsonl(out)
    assert 3 <= len(partial) < n
    p = sub(*args)
    assert p.returncode == 0, p.stderr
    assert f"{len(partial)} already done, {n - len(partial)} to run" in p.stderr
    recs = read_jsonl(out)
    assert sorted(x["custom_id"] for x in recs) == sorted(f"c{i}" for i in range(n))
    assert all(x["error"] is None for x in recs)
    r = cli("batch", "-i", inp, "-o", ref, "--seed", 3, "--batch-size", 3)
    assert r.exit_code == 0

    def texts(rs):
        return {x["custom_id"]: json.dumps([c.get("text", c.get("message")) for c in x["response"]["body"]["choices"]])
                for x in rs}
    assert texts(read_jsonl(ref)) == texts(recs)
