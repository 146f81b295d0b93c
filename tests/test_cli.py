"""grok-cli through typer's CliRunner and as a real subprocess (`python grok-cli.py ...`), on the
demo model and on the reference fixtures."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

import grokcpu
from conftest import greedy_direct, FIXTURES, ROOT, need_shared
from grokcpu import demo
from grokcpu.cli import app

BANNER_HINT = "--model /path/to/grok-1 --tokenizer /path/to/tokenizer.model"


def with_threads(args):
    args = [str(a) for a in args]
    return args if "--threads" in args or "--help" in args else args + T1


def cli(*args, input=None):
    return CliRunner().invoke(app, with_threads(args), input=input, catch_exceptions=False)


def sub(*args, input=None, timeout=120):
    return subprocess.run([sys.executable, "grok-cli.py", *with_threads(args)], cwd=ROOT, input=input,
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def error_lines(stderr):
    """stderr without the demo's note lines."""
    return [line for line in stderr.splitlines() if line and not line.startswith("note:")]


GREEDY = ["--temperature", "0", "--ignore-eos"]
T1 = ["--threads", "1"]      # numba's threads spin; on a small shared machine one thread is faster


# -- generate -----------------------------------------------------------------------------------

def test_generate_greedy_on_demo_is_exact(model, tok):
    prompt = "The answer to life the universe and everything is"
    want = tok.decode(greedy_direct(model, tok.encode(prompt), 10)) + "\n"
    r = cli("generate", "--prompt", prompt, "-n", 10, *GREEDY)
    assert r.exit_code == 0
    assert r.stdout == want
    assert "RANDOM weights" in r.stderr and BANNER_HINT in r.stderr
    p = sub("generate", "--prompt", prompt, "-n", 10, *GREEDY, "--stats", "--threads", 2)   # the default count
    assert p.returncode == 0, p.stderr
    assert p.stdout == want                       # only the text on stdout
    assert "stats: prompt 15 tokens" in p.stderr and "generated 10 tokens" in p.stderr
    assert "finish: length" in p.stderr and "expert cache" in p.stderr


def test_generate_on_a_fixture_with_an_explicit_tokenizer(demo_path, tok):
    need_shared()
    fx = FIXTURES / "p2_e4_l3_softcap"                       # vocab 1024 = the demo tokenizer's
    m = grokcpu.load(fx, threads=1)
    want = tok.decode(greedy_direct(m, tok.encode("Running a model"), 8)) + "\n"
    r = cli("generate", "-p", "Running a model", "-n", 8, *GREEDY, "--model", fx,
            "--tokenizer", demo_path / "tokenizer.model", "--threads", 1, "--no-prefetch",
            "--expert-cache-gb", "0.001", "--expert-cache-policy", "lfu", "--expert-reads", "direct")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == want
    assert "RANDOM" not in r.stderr


def test_generate_reads_a_prompt_file_and_stdin(model, tok, tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("Memory bandwidth", encoding="utf-8")
    want = tok.decode(greedy_direct(model, tok.encode("Memory bandwidth"), 5)) + "\n"
    assert cli("generate", "--prompt-file", f, "-n", 5, *GREEDY).stdout == want
    assert cli("generate", "--prompt-file", "-", "-n", 5, *GREEDY, input="Memory bandwidth").stdout == want


def test_generate_stop_string(model, tok):
    prompt = "The answer to life the universe and everything is"
    full = tok.decode(greedy_direct(model, tok.encode(prompt), 10))
    stop = full[3:5]
    r = cli("generate", "-p", prompt, "-n", 10, *GREEDY, "--stop", stop, "--stop", "zzzz", "--stats")
    assert r.stdout == full[:full.index(stop)] + "\n"
    assert "finish: stop" in r.stderr


# -- errors: one line, exit 1, no traceback -----------------------------------------------------

def corrupt_copy(tmp_path, how):
    need_shared()
    dst = tmp_path / "ck"
    shutil.copytree(FIXTURES / "p1_e8_l2_basic", dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    f = dst / "ckpt-0" / "tensor00005_000"
    if how == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    elif how == "delete":
        f.unlink()
    elif how == "flip":
        b = bytearray(f.read_bytes())
        b[-10] ^= 0xFF                                       # inside the int8 payload: still loads
        f.write_bytes(bytes(b))
    return dst


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/dir"], "error: no such checkpoint folder: '/no/such/dir' (hint: pass the folder that contains ckpt-0/"),
    (["--model", "{p1}"], "error: no tokenizer.model beside the checkpoint"),
    (["--model", "{p1}", "--tokenizer", "{demo_tok}"], "error: tokenizer does not fit the model: tokenizer.model has 1024 tokens, the model's vocabulary has 512"),
    (["--model", "{p1}", "--tokenizer", "/no/tok.model"], "error: no tokenizer file at '/no/tok.model'"),
    (["--model", "{truncate}"], "error: "),
    (["--model", "{delete}"], "error: "),
    (["--top-p", "2"], "error: --top-p 2.0 is out of range (hint: use a value in (0, 1] (1 = off))"),
    (["--temperature", "-1"], "error: --temperature -1.0 is out of range"),
    (["--max-tokens", "0"], "error: --max-tokens 0 is out of range"),
    (["--expert-cache-policy", "bogus"], "error: --expert-cache-policy 'bogus' is not known (hint: use one of: lru, lfu)"),
    (["--expert-cache-gb", "lots"], "error: --expert-cache-gb 'lots' is not a size"),
    (["--expert-reads", "mmap"], "error: --expert-reads 'mmap' is not known (hint: use one of: auto, direct, buffered)"),
    (["--threads", "0"], "error: --threads 0 is out of range"),
    (["--context", "8"], "error: the prompt has 15 tokens but the context holds 8 (hint: shorten the prompt"),
    (["--context", "99999"], "error: --context 99999 is longer than the model's sequence_len 2048"),
])
def test_generate_errors(demo_path, tmp_path, args, message):
    need_shared()
    subs = {"{p1}": str(FIXTURES / "p1_e8_l2_basic"), "{demo_tok}": str(demo_path / "tokenizer.model")}
    args = [subs.get(a, a) for a in args]
    if "{truncate}" in args or "{delete}" in args:
        how = "truncate" if "{truncate}" in args else "delete"
        args = [str(corrupt_copy(tmp_path, how)) if a == "{" + how + "}" else a for a in args]
    r = cli("generate", "-p", "The answer to life the universe and everything is", *args)
    assert r.exit_code == 1
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr
    assert r.stdout == ""
    assert "Traceback" not in r.output


def test_corrupt_checkpoint_messages(tmp_path):
    r = cli("info", "--model", corrupt_copy(tmp_path / "a", "truncate"))
    assert r.exit_code == 1 and "tensor00005_000" in error_lines(r.stderr)[0]
    r = cli("info", "--model", corrupt_copy(tmp_path / "b", "delete"))
    assert r.exit_code == 1 and error_lines(r.stderr)[0].startswith("error: ") and "tensor00005_000" in r.stderr


def test_prompt_sources(model, tok, tmp_path):
    """The prompt: an argument, -p/--prompt, --prompt-file, or stdin when none is given; once."""
    want = tok.decode(greedy_direct(model, tok.encode("Memory bandwidth"), 4)) + "\n"
    assert cli("generate", "Memory bandwidth", "-n", 4, *GREEDY).stdout == want
    assert cli("generate", "-n", 4, *GREEDY, input="Memory bandwidth").stdout == want     # stdin, not a tty
    r = cli("generate", input="")
    assert r.exit_code == 1 and error_lines(r.stderr) == ["error: the prompt is empty (hint: give at least one token of text)"]
    r = cli("generate", "x", "-p", "y")
    assert r.exit_code == 1 and error_lines(r.stderr)[0].startswith("error: give the prompt once")
    r = cli("generate", "-p", "x", "-f", "y")
    assert r.exit_code == 1


def test_debug_shows_the_traceback():
    r = cli("generate", "-p", "x", "--top-p", "2", "--debug")
    assert r.exit_code == 1 and "Traceback" in r.stderr and "error: --top-p 2.0 is out of range" in r.stderr


@pytest.mark.parametrize("args, line", [
    (["generate", "--no-such-flag"], "error: no such option: --no-such-flag (hint: see grok-cli generate --help)"),
    (["generate", "--tmp", "1"], "error: no such option: --tmp (hint: did you mean"),
    (["generate", "-p", "x", "--threads", "abc"], "error: invalid value for '--threads'"),
    (["generate", "-p", "x", "-n", "1.5"], "error: invalid value for '--max-tokens'"),
    (["generate", "-p"], "error: option '-p' requires an argument"),
    (["genrate"], "error: no such command 'genrate' (hint: did you mean generate?"),
    (["batch"], "error: missing option '--input'"),
    (["info", "extra"], "error: got unexpected extra argument"),
])
def test_usage_errors_are_one_line(args, line):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert r.stderr.splitlines() == [r.stderr.strip()] and r.stderr.startswith(line), r.stderr
    assert "╭" not in r.output and "Traceback" not in r.output and r.stdout == ""


def test_version_and_help():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.startswith(f"grok-cli {grokcpu.__version__}")
    r = CliRunner().invoke(app, [])
    assert r.exit_code == 0 and "generate" in r.stdout and "warmup" in r.stdout
    for cmd in ("chat", "generate", "batch", "info", "bench", "warmup"):
        r = CliRunner().invoke(app, [cmd, "--help"])
        assert r.exit_code == 0 and "--model" in r.stdout and "--threads" in r.stdout, cmd


def test_errors_in_a_subprocess(demo_path):
    need_shared()
    p = sub("generate", "-p", "hi", "--model", FIXTURES / "p1_e8_l2_basic", "--tokenizer", demo_path / "tokenizer.model")
    assert p.returncode == 1
    assert p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        "error: tokenizer does not fit the model: tokenizer.model has 1024 tokens, the model's vocabulary has 512 "
        "(hint: pass --tokenizer with the tokenizer.model that belongs to this checkpoint)"]


# -- chat (stdin not a terminal: one message per line) -------------------------------------------

def chat_answer(model, tok, message, n, system=None):
    from grokcpu.engine import DEFAULT_SYSTEM
    ids = tok.encode((system or DEFAULT_SYSTEM) + "\n") + tok.encode_continuation(f"\nUser: {message}\nAssistant:")
    text = tok.decode(greedy_direct(model, ids, n))
    return text.split("\nUser:")[0].lstrip()


def test_chat_from_a_pipe(model, tok, tmp_path):
    save = tmp_path / "conv.json"
    script = f"hello\n/stats\n/set temperature 0.5\n/set nope 1\n/save {save}\n/reset\n/stats\n/load {save}\n/stats\n/bogus\n/exit\nnot read\n"
    r = cli("chat", "-n", 6, *GREEDY, input=script)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == chat_answer(model, tok, "hello", 6) + "\n"        # only the answer on stdout
    err = r.stderr
    assert "conversation: 1 turns" in err and "temperature = 0.5" in err
    assert "error: /set: unknown key 'nope'" in err and "error: unknown command /bogus (hint: /help lists the commands)" in err
    assert "conversation cleared" in err and "conversation: 0 turns" in err and "loaded 1 turns" in err
    saved = json.loads(save.read_text())
    assert saved["turns"][0]["user"] == "hello" and saved["template"] == "User: {user}\nAssistant:"
    p = sub("chat", "-n", 6, *GREEDY, input="hello\n")             # EOF ends the chat
    assert p.returncode == 0 and p.stdout == r.stdout


def test_chat_remembers_and_respects_system(model, tok):
    r = cli("chat", "-n", 4, *GREEDY, "--system", "Be brief.", "--stats", input="one\ntwo\n")
    assert r.exit_code == 0
    first = chat_answer(model, tok, "one", 4, system="Be brief.")
    assert r.stdout.splitlines()[0] == first
    assert r.stderr.count("stats: prompt") == 2
    r = cli("chat", "--template", "no placeholder", input="x\n")
    assert r.exit_code == 1 and "must contain {user} exactly once" in r.stderr


def test_chat_and_batch_on_a_fixture(demo_path, tok, tmp_path):
    need_shared()
    fx = FIXTURES / "p2_e4_l3_softcap"                       # vocab 1024, context 64
    m = grokcpu.load(fx, threads=1)
    tk = ["--model", fx, "--tokenizer", demo_path / "tokenizer.model"]
    r = cli("chat", "-n", 5, *GREEDY, "--system", "", *tk, input="Hi\n")
    assert r.exit_code == 0, r.stderr
    ids = tok.encode("User: Hi\nAssistant:")                 # no system text: the turn comes first
    assert r.stdout == tok.decode(greedy_direct(m, ids, 5)).split("\nUser:")[0].lstrip() + "\n"
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": 1, "prompt": "Running a model"}\n{"id": 2, "prompt": "Experts", "max_tokens": 2}\n')
    r = cli("batch", "-i", inp, "-o", out, "-n", 6, *GREEDY, *tk)
    assert r.exit_code == 0, r.stderr
    got = {x["id"]: x for x in read_jsonl(out)}
    assert got[1]["text"] == tok.decode(greedy_direct(m, tok.encode("Running a model"), 6))
    assert got[2]["text"] == tok.decode(greedy_direct(m, tok.encode("Experts"), 2))


# -- batch ----------------------------------------------------------------------------------------

def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_batch_records_errors_and_resume(model, tok, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps({"id": "a", "prompt": "The model"}),
             json.dumps({"id": 2, "prompt": "Tokens", "max_tokens": 3}),
             "{not json",
             json.dumps({"id": "a", "prompt": "duplicate"}),
             json.dumps({"prompt": "no id"}),
             json.dumps({"id": "t", "prompt": "x", "temperature": -1}),
             json.dumps({"id": "long", "prompt": "word " * 80}),
             json.dumps({"id": "s", "prompt": "The model", "stop": "zz", "seed": 4, "temperature": 0.7}),
             ""]
    inp.write_text("\n".join(lines), encoding="utf-8")
    args = ["batch", "-i", inp, "-o", out, "-n", 5, *GREEDY, "--batch-size", 2, "--context", 64]
    r = cli(*args)
    assert r.exit_code == 0, r.stderr
    recs = read_jsonl(out)
    by_line = {rec["line"]: rec for rec in recs}
    assert sorted(by_line) == [1, 2, 3, 4, 5, 6, 7, 8] and len(recs) == 8
    a = by_line[1]
    assert a["id"] == "a" and a["text"] == tok.decode(greedy_direct(model, tok.encode("The model"), 5))
    assert (a["generated_tokens"], a["prompt_tokens"], a["finish_reason"]) == (5, len(tok.encode("The model")), "length")
    assert a["decode_tps"] > 0 and a["prefill_tps"] > 0 and a["ttft_s"] > 0
    assert by_line[2]["id"] == 2 and by_line[2]["generated_tokens"] == 3
    assert by_line[3]["id"] is None and by_line[3]["error"].startswith("line 3 is not valid JSON")
    assert by_line[4] == {"id": "a", "error": "duplicate id 'a' (line 4)", "line": 4}
    assert by_line[5]["error"] == 'no "id"'
    assert by_line[6]["error"].startswith("--temperature -1 is out of range")
    assert by_line[7]["error"].startswith("the prompt has 81 tokens but the context holds 64")
    assert by_line[8]["generated_tokens"] == 5 and "error" not in by_line[8]
    assert "[" in r.stderr and "8 records" in r.stderr                   # progress bar
    before = out.read_bytes()
    r = cli(*args)                                                       # nothing left to do
    assert out.read_bytes() == before and "8 already done, 0 to run" in r.stderr
    # a torn last line (a run killed mid-write) is dropped and its prompt run again
    keep = [rec for rec in recs if rec["line"] != 2]
    out.write_text("".join(json.dumps(x) + "\n" for x in keep) + '{"id": 2, "text": "to', encoding="utf-8")
    r = cli(*args)
    assert "dropped a partial last line" in r.stderr
    again = read_jsonl(out)
    assert len(again) == 8 and sorted(x["line"] for x in again) == list(range(1, 9))
    redo = [x for x in again if x["line"] == 2][0]
    same = ("id", "text", "generated_tokens", "prompt_tokens", "finish_reason")
    assert {k: redo[k] for k in same} == {k: by_line[2][k] for k in same}


def test_batch_survives_sigkill(tmp_path):
    """Kill a batch mid-way; rerun; every id exactly once, every line whole, and the sampled texts
    equal an uninterrupted run with other batching (per-id seeds)."""
    inp, out, ref = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    n = 80
    words = ["The", "A model", "memory", "experts", "the model", "text"]      # 1-2 tokens each
    inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": words[i % len(words)]}) + "\n"
                           for i in range(n)), encoding="utf-8")
    args = ["batch", "-i", inp, "-o", out, "-n", 10, "--seed", 3, "--ignore-eos", "--batch-size", 4]
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
    partial = read_jsonl(out)                                           # every line parses
    assert 3 <= len(partial) < n
    p = sub(*args)
    assert p.returncode == 0, p.stderr
    assert f"{len(partial)} already done, {n - len(partial)} to run" in p.stderr
    recs = read_jsonl(out)
    ids = [r["id"] for r in recs]
    assert sorted(ids) == sorted(f"p{i}" for i in range(n)) and len(set(ids)) == n
    assert all("error" not in r and r["generated_tokens"] == 10 for r in recs)
    r = cli("batch", "-i", inp, "-o", ref, "-n", 10, "--seed", 3, "--ignore-eos", "--batch-size", 3)
    assert r.exit_code == 0
    assert {x["id"]: x["text"] for x in read_jsonl(ref)} == {x["id"]: x["text"] for x in recs}


def test_batch_input_errors(tmp_path):
    r = cli("batch", "-i", tmp_path / "missing.jsonl", "-o", tmp_path / "o.jsonl")
    assert r.exit_code == 1 and error_lines(r.stderr)[0].startswith("error: cannot read --input")
    f = tmp_path / "in.jsonl"
    f.write_text("{}\n")
    r = cli("batch", "-i", f, "-o", f)
    assert r.exit_code == 1 and "same file" in r.stderr


# -- info -----------------------------------------------------------------------------------------

def test_info_on_a_fixture(tmp_path):
    need_shared()
    fx = FIXTURES / "p1_e8_l2_basic"
    r = cli("info", "--model", fx, "--verify")
    assert r.exit_code == 0, r.stderr
    out = r.stdout
    assert "checksums    ok: 26 files match config.json" in out
    assert "config       vocab 512, context 64, emb 128, layers 2, q-heads 16, kv-heads 8, head size 8, experts 8 (2 per token), expert ffn 176" in out
    assert "26 files" in out and "memory plan" in out and "expert budget" in out and "read per token" in out
    r = cli("info", "--model", fx, "--json", "--context", 32, "--expert-cache-gb", "0.0001")
    d = json.loads(r.stdout)
    p = d["memory_plan"]
    D, F, L, E, V = 128, 176, 2, 8, 512
    one = 3 * D * F + 2 * (F + F + 8 * D)                     # int8 weights + bf16 scales of one expert
    assert p["one_expert_bytes"] == one and p["expert_bytes"] == L * E * one
    assert p["dense_bytes"] + p["expert_bytes"] == p["payload_bytes"]
    assert p["embedding_bytes"] == V * D * 4
    assert p["kv_cache_bytes"] == 2 * L * 32 * 8 * 8 * 4       # K and V, layers, context, kv heads x head size, f32
    assert p["expert_budget_bytes"] == 100000 and p["experts_held"] == 100000 // (3 * D * F)
    # per token: attention (int8 + float32 scales), 4 norms, router per layer; final norm; one
    # embedding row in; the output table; 2 experts per layer (scales as float32 in the engine)
    attn = 2 * D * D + 2 * D * 64 + 4 * (D + 64 + 64 + 8 * D)
    layer = attn + 4 * D * 4 + D * 8 * 4
    one_held = 3 * D * F + 4 * (F + F + 8 * D)
    parts = p["read_per_token_parts"]
    assert parts == {"layers_dense": L * layer, "final_norm": D * 4, "embedding_row": D * 4,
                     "output_table": V * D * 4, "experts": L * 2 * one_held}
    assert p["read_per_token_bytes"] == sum(parts.values())
    assert d["files"] == 26 and d["config"]["transformer"]["num_layers"] == 2
    assert d["checksums"] == "not verified (pass --verify)"
    r = cli("info", "--model", corrupt_copy(tmp_path, "flip"), "--verify")
    assert r.exit_code == 1
    assert "checksums    MISMATCH in 1 files: tensor00005_000" in r.stdout
    assert error_lines(r.stderr) == ["error: 1 file(s) do not match their sha256: tensor00005_000 "
                                     "(hint: download these files again)"]


def test_info_demo_subprocess(demo_path):
    p = sub("info")
    assert p.returncode == 0, p.stderr
    assert "vocab 1024, context 2048, emb 256, layers 4, q-heads 8, kv-heads 4" in p.stdout
    assert "tokenizer.model (1024 pieces)" in p.stdout and "RANDOM" in p.stderr


# -- bench ----------------------------------------------------------------------------------------

def test_bench(demo_path):
    r = cli("bench", "-p", 8, "-g", 4, "-r", 2, "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["prompt_tokens"] == 8 and d["gen_tokens"] == 4 and d["reps"] == 2
    assert len(d["pp_tps"]["runs"]) == 2 and d["pp_tps"]["median"] > 0 and d["tg_tps"]["median"] > 0
    assert d["tg_gb_s"] > 0 and d["peak_rss_bytes"] > 0
    need_shared()
    r = cli("bench", "--model", FIXTURES / "p3_e8_l12_order", "-p", 8, "-g", 4, "-r", 1)   # no tokenizer needed
    assert r.exit_code == 0, r.stderr
    assert "| p3_e8_l12_order |" in r.stdout and "| pp8 |" in r.stdout and "| tg4 |" in r.stdout
    r = cli("bench", "--model", FIXTURES / "p3_e8_l12_order", "-p", 30, "-g", 5)
    assert r.exit_code == 1 and "exceed the context of 32" in r.stderr
    p = sub("bench", "--model", FIXTURES / "p1_e8_l2_basic", "-p", 6, "-g", 3, "-r", 2, "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["model"].endswith("p1_e8_l2_basic") and len(d["tg_tps"]["runs"]) == 2 and d["tg_tps"]["median"] > 0


# -- engine flags: expert cache, routing trace, unembedding, offload ------------------------------

def test_engine_flags(model, tok, tmp_path):
    prompt = "Memory bandwidth"
    want = tok.decode(greedy_direct(model, tok.encode(prompt), 6)) + "\n"
    trace = tmp_path / "trace.jsonl"
    r = cli("generate", "-p", prompt, "-n", 6, *GREEDY, "--expert-cache-gb", "off", "--routing-trace", trace)
    assert r.exit_code == 0 and r.stdout == want
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    n_prompt = len(tok.encode(prompt))
    assert len(rows) == (n_prompt + 5) * model.config.num_layers        # prompt + 5 decode steps
    r = cli("generate", "-p", prompt, "-n", 6, *GREEDY, "--pin-experts", f"{trace}:3", "--expert-cache-gb", "0.004")
    assert r.exit_code == 0 and r.stdout == want
    r = cli("generate", "-p", prompt, "-n", 6, *GREEDY, "--unembed", "int8")
    assert r.exit_code == 0 and len(r.stdout) > 1
    for args, msg in ((("--pin-experts", "99:0"), "outside"), (("--unembed", "f16"), "--unembed"),
                      (("--offload", "tpu"), "--offload"), (("--expert-cache-gb", "0.0001"), "cannot hold")):
        r = cli("generate", "-p", prompt, "-n", 2, *args)
        assert r.exit_code != 0
        lines = error_lines(r.stderr)
        assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0]


def test_offload_dense_without_a_gpu_is_one_clear_line():
    from grokcpu.backends.cuda import cuda_status
    if cuda_status()[0]:
        pytest.skip("a CUDA device is present")
    r = cli("generate", "-p", "hi", "-n", 2, "--offload", "dense")
    assert r.exit_code != 0
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "--offload dense needs a CUDA GPU" in lines[0]
