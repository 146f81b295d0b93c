"""grok-cli on hostile or unusual input: every case ends in a clean outcome (a result, an error
record, or one line on stderr with the right exit code), never a traceback."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from conftest import FIXTURES, ROOT, greedy_direct, need_shared
from grokcpu.cli import app
from grokcpu.cli.batch import check_record, encode_record

T1 = ["--threads", "1"]
GREEDY = ["--temperature", "0", "--ignore-eos"]


def cli(*args, input=None):
    args = [str(a) for a in args]
    return CliRunner().invoke(app, args + ([] if "--threads" in args else T1), input=input, catch_exceptions=False)


def sub(*args, input=None, env=None, timeout=180):
    return subprocess.run([sys.executable, "grok-cli.py", *[str(a) for a in args], *T1], cwd=ROOT, input=input,
                          capture_output=True, timeout=timeout, env=env or dict(os.environ))


def problems(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line and not line.startswith(("note:", "stats:"))]


def read_jsonl(data: str):
    return [json.loads(line) for line in data.splitlines()]


# -- batch: one bad line is one error record ------------------------------------------------------

POISON = [
    ('{"id": "ok1", "prompt": "The model"}', None),
    ('{"id": "sur", "prompt": "bad \\ud800 text"}', "not valid Unicode"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"id": 1e400, "prompt": "x"}', "not a finite number"),
    ('{"id": NaN, "prompt": "x"}', "not a finite number"),
    ('{"id": 1.5, "prompt": "x"}', "must be a string or an integer"),
    ('{"id": true, "prompt": "x"}', "must be a string or an integer"),
    ('{"id": "\\udc80", "prompt": "x"}', "not valid Unicode"),
    ('{"id": "t", "prompt": "x", "temprature": 0.5}', 'unknown field "temprature" (hint: did you mean "temperature"?)'),
    ('{"id": "z", "prompt": "x", "zzz": 1}', 'unknown field "zzz" (hint: fields are id, prompt'),
    ('{"id": "inf", "prompt": "x", "temperature": 1e400}', "--temperature inf is out of range"),
    ('{"id": "nan", "prompt": "x", "top_p": NaN}', "--top-p nan is out of range"),
    ('{"id": "neg", "prompt": "x", "max_tokens": -3}', "--max-tokens -3 is out of range"),
    ('{"id": "big", "prompt": "x", "seed": 123456789012345678901234567890}', None),
    ('{"id": "stop", "prompt": "x", "stop": [1]}', "must be a string or a list of strings"),
    ('{"id": 7, "prompt": "Tokens"}', None),
]


def test_batch_poison_lines_become_error_records_and_the_rest_run(model, tok, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    raw = "\n".join(line for line, _ in POISON).encode() + b"\n" + b'{"id": "bytes", "prompt": "\xff\xfe"}\n'
    inp.write_bytes(raw)
    args = ["batch", "-i", inp, "-o", out, "-n", 3, *GREEDY, "--batch-size", 2]
    r = cli(*args)
    assert r.exit_code == 0, r.stderr
    text = out.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    recs = read_jsonl(text)                                          # every line is valid JSON
    by_line = {rec["line"]: rec for rec in recs}
    assert sorted(by_line) == list(range(1, len(POISON) + 2))
    for n, (_, problem) in enumerate(POISON, 1):
        rec = by_line[n]
        if problem is None:
            assert "error" not in rec and rec["generated_tokens"] == 3, rec
        else:
            assert problem in rec["error"], (n, rec)
            assert rec["id"] is None or isinstance(rec["id"], (str, int))
    assert by_line[1]["text"] == tok.decode(greedy_direct(model, tok.encode("The model"), 3))
    assert by_line[len(POISON) + 1]["error"] == f"line {len(POISON) + 1} is not UTF-8 text"
    assert "Traceback" not in r.output
    # a rerun resumes: nothing is run or written again
    before = out.read_bytes()
    r = cli(*args)
    assert r.exit_code == 0 and out.read_bytes() == before
    assert f"{len(POISON) + 1} already done, 0 to run" in r.stderr


def test_error_records_are_always_valid_json():
    assert json.loads(encode_record({"id": None, "error": "x\ud800y", "line": 1}))["error"] == "x\ud800y"
    assert b"\xed" not in encode_record({"id": "\udc80", "error": "e", "line": 2})      # escaped, not raw
    with pytest.raises(ValueError):
        encode_record({"x": float("inf")})                          # never written: ids are checked first
    assert check_record({"id": float("inf"), "prompt": "x"}).startswith('"id" is not a finite number')


def test_batch_stdin_to_stdout(model, tok):
    lines = '{"id": "a", "prompt": "The model"}\n{"id": "b"}\n'
    r = cli("batch", "-i", "-", "-o", "-", "-n", 3, *GREEDY, input=lines)
    assert r.exit_code == 0, r.stderr
    recs = {x["id"]: x for x in read_jsonl(r.stdout)}             # only records on stdout
    assert recs["a"]["text"] == tok.decode(greedy_direct(model, tok.encode("The model"), 3))
    assert recs["b"]["error"] == 'no "prompt" string'
    assert "wrote 2 records to stdout" in r.stderr


def test_batch_size_is_checked_before_the_model_loads(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"id": 1, "prompt": "x"}\n')
    r = cli("batch", "-i", f, "-o", tmp_path / "o.jsonl", "--batch-size", 0)
    assert r.exit_code == 1 and problems(r.stderr) == ["error: --batch-size 0 is out of range (hint: use an integer >= 1)"]
    assert "RANDOM" not in r.stderr                                  # no model was opened


# -- prompts and stdin that are not UTF-8 ---------------------------------------------------------

def test_non_utf8_stdin_and_argv_are_replaced_with_a_note(demo_path):
    env = dict(os.environ, GROKCPU_CACHE=str(demo_path.parent))
    p = sub("generate", "-n", 2, *GREEDY, input=b"caf\xe9 \xff\xfe text", env=env)
    assert p.returncode == 0, p.stderr
    err = p.stderr.decode()
    assert "note: stdin has bytes that are not UTF-8; they were replaced with U+FFFD" in err and not problems(err)
    p = subprocess.run([sys.executable, "grok-cli.py", "generate", b"caf\xe9 au lait", "-n", "2", *T1], cwd=ROOT,
                       capture_output=True, env=env, timeout=180)
    assert p.returncode == 0, p.stderr
    assert "the prompt has bytes that are not UTF-8" in p.stderr.decode() and not problems(p.stderr.decode())
    p = sub("chat", "-n", 2, *GREEDY, input=b"hello \xff there\n", env=env)      # chat from a pipe
    assert p.returncode == 0 and not problems(p.stderr.decode()), p.stderr


def test_lone_surrogate_prompt_is_one_line():
    r = cli("generate", "-p", "bad \ud800 text", "-n", 2)
    assert r.exit_code == 0 and "not UTF-8" in r.stderr              # replaced, with a note
    from grokcpu.errors import TokenizerError
    from grokcpu.tokenizer import check_text
    with pytest.raises(TokenizerError, match="lone surrogate U\\+D800 at character 4"):
        check_text("bad \ud800")


# -- files that are empty, missing or unwritable --------------------------------------------------

def test_empty_tokenizer_file(tmp_path, demo_path):
    empty = tmp_path / "tokenizer.model"
    empty.write_bytes(b"")
    r = cli("generate", "-p", "x", "--tokenizer", empty)
    assert r.exit_code == 1 and problems(r.stderr) == [
        f"error: tokenizer '{empty}' is empty (hint: pass --tokenizer PATH to a SentencePiece tokenizer.model)"]
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00\x01junk")
    r = cli("generate", "-p", "x", "--tokenizer", junk)
    assert r.exit_code == 1 and len(problems(r.stderr)) == 1 and "Traceback" not in r.output


@pytest.mark.parametrize("trace, message", [
    ("/no/such/folder/trace.jsonl", "error: --routing-trace: folder '/no/such/folder' does not exist"),
    ("{tmp}", "is a folder"),
])
def test_bad_routing_trace_is_one_line(tmp_path, trace, message):
    r = cli("generate", "-p", "x", "-n", 2, "--routing-trace", trace.replace("{tmp}", str(tmp_path)))
    assert r.exit_code == 1
    lines = problems(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: --routing-trace") and message.split(": ", 1)[-1] in lines[0]


@pytest.mark.parametrize("path, message", [
    ("/proc/self/t.jsonl", "error: --routing-trace '/proc/self/t.jsonl': cannot write: No such file or directory"),
    ("/dev/full", "error: --routing-trace '/dev/full': cannot write: No space left on device"),   # at the flush
])
def test_unwritable_routing_trace_is_one_line(path, message):
    if not os.path.exists(os.path.dirname(path)) or (path == "/dev/full" and not os.path.exists(path)):
        pytest.skip(f"no {path} here")
    r = cli("generate", "-p", "x", "-n", 2, "--routing-trace", path)
    assert r.exit_code == 1 and problems(r.stderr) == [message + " (hint: give a writable file path, or leave "
                                                        "--routing-trace out)"], r.stderr


@pytest.mark.parametrize("args, flag", [
    (["--expert-cache-gb", "-1"], "--expert-cache-gb"), (["--threads", "5000"], "--threads"),
    (["--context", "0"], "--context"), (["--unembed", "f16"], "--unembed"),
    (["--pin-experts", "a:b"], "--pin-experts"), (["--expert-cache-policy", "mru"], "--expert-cache-policy"),
])
def test_option_errors_name_the_flag(args, flag):
    r = cli("generate", "-p", "x", *args)
    assert r.exit_code == 1
    lines = problems(r.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}"), lines


# -- notes: too many threads, a full context ------------------------------------------------------

def test_threads_above_the_core_count_is_a_note():
    n = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) + 1
    r = CliRunner().invoke(app, ["generate", "-p", "x", "-n", "1", "--threads", str(n)])
    assert r.exit_code == 0 and f"note: --threads {n} is more than the" in r.stderr


def test_a_full_context_is_a_note(model, tok, tmp_path):
    r = cli("generate", "-p", "The model", "-n", 50, *GREEDY, "--context", 12)
    assert r.exit_code == 0
    assert "note: the context (12 tokens) is full: stopped after" in r.stderr
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "The model"}\n')
    r = cli("batch", "-i", inp, "-o", "-", "-n", 50, *GREEDY, "--context", 12)
    rec = json.loads(r.stdout)
    assert rec["context_full"] is True and rec["finish_reason"] == "length"
    assert "1 prompt(s) stopped early because the context (12 tokens) was full" in r.stderr


# -- chat: multi-line messages --------------------------------------------------------------------

def test_chat_multiline_messages():
    from grokcpu.cli.chat import read_message

    class Lines:
        def __init__(self, lines):
            self.lines, self.prompts = list(lines), []

        def readline(self, prompt):
            self.prompts.append(prompt)
            return self.lines.pop(0) if self.lines else None

    r = Lines(["first \\", "second \\", "third", "next"])
    assert read_message(r) == "first \nsecond \nthird" and r.prompts == ["> ", "... ", "... "]
    assert read_message(Lines(['"""', "a", "", "b", '"""'])) == "a\n\nb"
    assert read_message(Lines(['"""one line"""'])) == "one line"
    assert read_message(Lines(['"""start', 'end"""'])) == "start\nend"
    assert read_message(Lines(['"""never closed'])) == "never closed"        # EOF sends what there is
    assert read_message(Lines([])) is None


def test_chat_multiline_from_a_pipe(model, tok):
    r = cli("chat", "-n", 3, *GREEDY, input='"""\nline one\nline two\n"""\n/stats\n')
    assert r.exit_code == 0, r.stderr
    assert "conversation: 1 turns" in r.stderr


# -- info's figures add up ------------------------------------------------------------------------

def test_info_memory_plan_adds_up():
    need_shared()
    r = cli("info", "--model", FIXTURES / "p1_e8_l2_basic", "--json")
    p = json.loads(r.stdout)["memory_plan"]
    assert p["dense_bytes"] + p["expert_bytes"] == p["payload_bytes"]
    assert sum(p["read_per_token_parts"].values()) == p["read_per_token_bytes"]
    a = p["auto_budget_parts"]
    assert a["available"] - a["resident_non_expert"] - a["kv_cache"] - a["margin"] == a["unclamped"]
    want = p["expert_budget_bytes"] if not a["clamped"] else a["unclamped"]
    assert a["unclamped"] == want
    r = cli("info", "--model", FIXTURES / "p1_e8_l2_basic")
    assert "= attention/norms/routers" in r.stdout and "- safety margin" in r.stdout


# -- first use: the compile note, the marker, warmup, Ctrl-C during the compile --------------------

def test_first_use_note_then_silence(tmp_path, demo_path):
    from grokcpu.cli import firstuse
    env = dict(os.environ, GROKCPU_CACHE=str(tmp_path))
    os.symlink(demo_path, tmp_path / demo_path.name)
    p = sub("generate", "hi", "-n", 2, "--stats", env=env)
    err = p.stderr.decode()
    assert p.returncode == 0 and "note: compiling kernels for this CPU, once" in err
    assert "stats: warm-up (kernel compile)" in err and "not in the figures below" in err
    assert len(list(tmp_path.glob("kernels-compiled-*"))) == 1
    p = sub("generate", "hi", "-n", 2, env=env)
    assert p.returncode == 0 and "compiling kernels" not in p.stderr.decode()
    assert firstuse.marker().name.startswith("kernels-compiled-")


def test_warmup_command(tmp_path, demo_path):
    env = dict(os.environ, GROKCPU_CACHE=str(tmp_path))
    os.symlink(demo_path, tmp_path / demo_path.name)
    p = sub("warmup", env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    err = p.stderr.decode()
    assert "warmup: demo, expert cache: " in err and "warmup: demo, no expert cache: " in err
    assert p.stdout.decode().startswith("warmup: kernels compiled and cached in ")
    assert len(list(tmp_path.glob("kernels-compiled-*"))) == 1


@pytest.mark.parametrize("delay", [0.0, 0.5, 1.0, 4.0])
def test_ctrl_c_during_the_first_compile(tmp_path, demo_path, delay):
    """A fresh numba cache (NUMBA_CACHE_DIR) makes the kernels compile; SIGINT during it exits 130
    with `interrupted` and nothing else."""
    env = dict(os.environ, GROKCPU_CACHE=str(tmp_path), NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    os.symlink(demo_path, tmp_path / demo_path.name)
    p = subprocess.Popen([sys.executable, "grok-cli.py", "generate", "hi", "-n", "2", *T1], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    deadline = time.time() + 120
    os.set_blocking(p.stderr.fileno(), False)
    while b"compiling kernels" not in seen and time.time() < deadline:
        chunk = p.stderr.read() or b""
        seen += chunk
        time.sleep(0.05)
    assert b"compiling kernels" in seen
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    os.set_blocking(p.stderr.fileno(), True)
    out, rest = p.communicate(timeout=60)
    err = (seen + rest).decode()
    assert p.returncode == 130, err
    assert err.rstrip().endswith("interrupted")
    assert "Traceback" not in err and "Exception ignored" not in err and "KeyboardInterrupt" not in err
    assert not list(tmp_path.glob("kernels-compiled-*"))            # no marker for an interrupted compile
