"""grok-cli batch --ray on a local Ray cluster (loopback, two workers on this machine): the records
equal a plain local batch of the same file; a worker killed mid-run loses and repeats nothing; a
killed driver's rerun resumes; a model missing on a worker is one line."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[test]' (or '.[ray]') for the --ray tests")

from conftest import FIXTURES, ROOT, need_shared            # noqa: E402
from test_cli import cli, error_lines, read_jsonl, with_threads   # noqa: E402

SAME = ("id", "text", "generated_tokens", "prompt_tokens", "finish_reason", "error", "context_full")
WORDS = ["The", "A model", "memory", "experts", "the model", "text"]


@pytest.fixture(scope="module")
def cluster(demo_path):
    """One local Ray instance for the module; its workers see the tests' demo model (GROKCPU_CACHE)."""
    ray.init(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def results(path):
    """The records by input line, without the timings (which differ from run to run)."""
    recs = read_jsonl(path)
    by_line = {r["line"]: {k: r[k] for k in SAME if k in r} for r in recs}
    assert len(by_line) == len(recs), "a line was written twice"
    return by_line


def many(path, n):
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": WORDS[i % len(WORDS)]}) + "\n" for i in range(n)),
                    encoding="utf-8")
    return path


MANY = 36
MANY_ARGS = ["-n", 10, "--seed", 3, "--ignore-eos", "--batch-size", 4]


@pytest.fixture(scope="module")
def many_reference(demo_path, tmp_path_factory):
    """A plain local batch of MANY seeded prompts: what every --ray run of that file must write."""
    d = tmp_path_factory.mktemp("ray-ref")
    out = d / "ref.jsonl"
    r = cli("batch", "-i", many(d / "in.jsonl", MANY), "-o", out, *MANY_ARGS)
    assert r.exit_code == 0, r.stderr
    return results(out)


def test_ray_equals_local_on_the_demo_sampled_and_greedy(cluster, tmp_path):
    lines = [json.dumps({"id": i, "prompt": WORDS[i % len(WORDS)] + " cache", **extra})
             for i, extra in enumerate([{}, {"temperature": 0}, {"seed": 11}, {"max_tokens": 3}, {"stop": "e"},
                                        {}, {"temperature": 0, "max_tokens": 12}, {"top_k": 3}, {}, {}])]
    lines[5] = json.dumps({"id": 2, "prompt": "a duplicate id"})
    lines.insert(3, "{not json")
    lines.append(json.dumps({"id": "long", "prompt": "word " * 80}))
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = ["batch", "-i", inp, "-n", 8, "--seed", 5, "--batch-size", 3, "--context", 64]
    local = cli(*args, "-o", tmp_path / "local.jsonl")
    assert local.exit_code == 0, local.stderr
    r = cli(*args, "-o", tmp_path / "ray.jsonl", "--ray", "--ray-actors", 2, "--stats")
    assert r.exit_code == 0, r.stderr
    want = results(tmp_path / "local.jsonl")
    assert len(want) == 12 and sum("error" in x for x in want.values()) == 3
    assert results(tmp_path / "ray.jsonl") == want
    assert "2 Ray workers ready" in r.stderr and "(2 x 1 threads)" in r.stderr      # 2 cores, 2 workers
    assert r.stderr.count("stats: grokcpu-batch-") == 2
    bar = [line for line in r.stderr.splitlines() if line.startswith("[")][-1]
    assert "12/12 records, 3 errors" in bar and "tok/s; " in bar                  # per-node tok/s


def test_ray_equals_local_on_a_fixture_greedy(cluster, demo_path, tmp_path):
    need_shared()
    fx = FIXTURES / "p2_e4_l3_softcap"                       # vocab 1024 = the demo tokenizer's, context 64
    inp = many(tmp_path / "in.jsonl", 8)
    args = ["batch", "-i", inp, "-n", 6, "--temperature", 0, "--ignore-eos", "--batch-size", 2,
            "--model", fx, "--tokenizer", demo_path / "tokenizer.model"]
    assert cli(*args, "-o", tmp_path / "local.jsonl").exit_code == 0
    r = cli(*args, "-o", tmp_path / "ray.jsonl", "--ray", "--ray-actors", 2)
    assert r.exit_code == 0, r.stderr
    assert "RANDOM" not in r.stderr
    want = results(tmp_path / "local.jsonl")
    assert len(want) == 8 and results(tmp_path / "ray.jsonl") == want


def test_a_worker_killed_mid_run_loses_and_repeats_nothing(cluster, many_reference, tmp_path):
    inp, out = many(tmp_path / "in.jsonl", MANY), tmp_path / "out.jsonl"
    killed = []

    def kill_one():
        deadline = time.time() + 120
        while time.time() < deadline:
            names = [n for n in ray.util.list_named_actors() if n.startswith("grokcpu-batch-")]
            if len(names) == 2 and out.exists() and out.read_bytes().count(b"\n") >= 4:
                ray.kill(ray.get_actor(sorted(names)[0]))
                killed.append(out.read_bytes().count(b"\n"))
                return
            time.sleep(0.01)

    t = threading.Thread(target=kill_one)
    t.start()
    r = cli("batch", "-i", inp, "-o", out, *MANY_ARGS, "--ray", "--ray-actors", 2)
    t.join()
    assert r.exit_code == 0, r.stderr
    assert killed and killed[0] < MANY, "the batch finished before a worker could be killed"
    note = [line for line in r.stderr.splitlines() if "stopped" in line]
    assert len(note) == 1 and "unfinished prompt(s) run on the other workers" in note[0]
    assert int(note[0].split("its ")[1].split()[0]) >= 1            # it held prompts when it died
    assert results(out) == many_reference


def test_a_killed_driver_resumes_from_the_output(cluster, many_reference, tmp_path):
    inp, out = many(tmp_path / "in.jsonl", MANY), tmp_path / "out.jsonl"
    args = with_threads(["batch", "-i", inp, "-o", out, *MANY_ARGS, "--ray", cluster, "--ray-actors", 2])
    proc = subprocess.Popen([sys.executable, "grok-cli.py", *args], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the batch finished before it could be killed"
    partial = read_jsonl(out)                                 # every line whole
    assert 3 <= len(partial) < MANY
    r = cli(*args)
    assert r.exit_code == 0, r.stderr
    assert f"{len(partial)} already done, {MANY - len(partial)} to run" in r.stderr
    assert results(out) == many_reference


def test_a_model_missing_on_a_worker_is_one_line(cluster, tmp_path):
    inp = many(tmp_path / "in.jsonl", 2)
    r = cli("batch", "-i", inp, "-o", tmp_path / "out.jsonl", "--model", tmp_path / "nowhere", "--ray")
    assert r.exit_code == 1
    lines = [line for line in error_lines(r.stderr) if not line.startswith("batch: ")]
    assert len(lines) == 1 and lines[0].startswith("error: the Ray worker on node "), r.stderr
    assert "no such checkpoint folder" in lines[0] and str(tmp_path / "nowhere") in lines[0]
    assert "every node needs the model" in lines[0]
    assert not (tmp_path / "out.jsonl").read_bytes()


def test_ray_option_errors(tmp_path, monkeypatch):
    inp = many(tmp_path / "in.jsonl", 1)
    r = cli("batch", "-i", inp, "-o", tmp_path / "o.jsonl", "--ray-actors", 2)
    assert r.exit_code == 1 and error_lines(r.stderr) == ["error: --ray-actors needs --ray (hint: add --ray [ADDRESS], or leave --ray-actors out)"]
    r = cli("batch", "-i", inp, "-o", tmp_path / "o.jsonl", "--ray", "--ray-actors", 0)
    assert r.exit_code == 1 and error_lines(r.stderr)[0].startswith("error: --ray-actors 0 is out of range")
    r = cli("batch", "-i", inp, "-o", tmp_path / "o.jsonl", "--ray", "--routing-trace", tmp_path / "t.jsonl")
    assert r.exit_code == 1 and "--routing-trace does not work with --ray" in r.stderr
    monkeypatch.setitem(sys.modules, "ray", None)              # as if ray were not installed
    r = cli("batch", "-i", inp, "-o", tmp_path / "o.jsonl", "--ray")
    assert r.exit_code == 1
    assert error_lines(r.stderr) == ["error: --ray needs the ray package (hint: pip install 'grokcpu[ray]' on every node)"]
    assert not (tmp_path / "o.jsonl").exists()


def test_bare_ray_takes_no_value():
    from grokcpu.cli.app import fill_optional_values
    assert fill_optional_values(["batch", "--ray"]) == ["batch", "--ray", ""]
    assert fill_optional_values(["batch", "--ray", "-i", "x"]) == ["batch", "--ray", "", "-i", "x"]
    assert fill_optional_values(["batch", "--ray", "10.0.0.1:6379"]) == ["batch", "--ray", "10.0.0.1:6379"]
    assert fill_optional_values(["--ray=auto", "--", "--ray"]) == ["--ray=auto", "--", "--ray"]


def test_an_address_nothing_answers_is_an_error_at_once():
    from grokcpu.cli.ray_batch import check_reachable
    from grokcpu.errors import GrokError
    t = time.perf_counter()
    with pytest.raises(GrokError, match=r"cannot reach the Ray cluster at 127\.0\.0\.1:1: .*ray start --head"):
        check_reachable("127.0.0.1:1")
    assert time.perf_counter() - t < 10
    check_reachable("ray://head:10001")                        # Ray Client and Ray's own words are Ray's to check
    check_reachable("auto")


def test_ray_equals_local_on_openai_lines(cluster, tmp_path):
    def line(cid, url, body):
        return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})
    lines = [line("c", "/v1/completions", {"prompt": ["The", "memory"], "max_tokens": 5, "n": 2}),
             line("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                                   "seed": 9, "temperature": 1.0}),
             line("long", "/v1/completions", {"prompt": "word " * 80}),
             line("vocab", "/v1/completions", {"prompt": [1, 10 ** 6]})]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = ["batch", "-i", inp, "--seed", 5, "--batch-size", 3, "--context", 64]
    assert cli(*args, "-o", tmp_path / "local.jsonl").exit_code == 0
    r = cli(*args, "-o", tmp_path / "ray.jsonl", "--ray", "--ray-actors", 2)
    assert r.exit_code == 0, r.stderr

    def answers(path):
        return {x["custom_id"]: (x["error"], x["response"] and x["response"]["body"].get("choices"),
                                 x["response"] and x["response"]["body"].get("usage")) for x in read_jsonl(path)}
    want = answers(tmp_path / "local.jsonl")
    assert answers(tmp_path / "ray.jsonl") == want
    assert len(want["c"][1]) == 4 and want["c"][2]["completion_tokens"] <= 20
    assert want["long"][0]["code"] == "context_length_exceeded"
    assert want["vocab"][0]["code"] == "invalid_request_error" and "outside the vocabulary" in want["vocab"][0]["message"]
