"""grok-cli batch on Ray workers against the local batch, on one machine.

    python tools/bench_ray.py                                     # demo model, 48 prompts x 32 tokens
    python tools/bench_ray.py --model /data/scaled16 --tokenizer grok1-tokenizer.model -p 16 -g 16

Starts one local Ray instance (this machine's cores), then runs the same seeded input through
`grok-cli batch` locally and with --ray --ray-actors N for each N of --actors, alternating, in
processes of their own. Reported per run: generation time and tok/s (from the first prompt handed out to
the last record, i.e. without loading the model), the workers' start-up and the driver's calls to
the workers per prompt; then (ray x1 - local) / prompts, and the round trip of one call to an idle
worker: the driver's cost per call, which the workers' queued prompts hide from their compute.
Every run's records are checked equal (text and counts) to the local run's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORDS = ("the key value cache expert router layer token attention model weight batch stream "
         "prompt decode prefill context memory number answer").split()


def run_cli(argv: list[str]) -> tuple[str, str]:
    """grok-cli in a process of its own, as a user runs it: (stdout, stderr)."""
    p = subprocess.run([sys.executable, str(ROOT / "grok-cli.py"), *argv], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"grok-cli {' '.join(argv)} failed:\n{p.stderr}")
    return p.stdout, p.stderr


def figures(stderr: str) -> dict:
    m = re.search(r"batch: wrote (\d+) records .*; (\d+) tokens in ([0-9.]+) s", stderr)
    ready = re.search(r"Ray workers ready in ([0-9.]+) s", stderr)
    return {"records": int(m.group(1)), "tokens": int(m.group(2)), "gen_s": float(m.group(3)),
            "start_s": float(ready.group(1)) if ready else 0.0,
            "calls": sum(int(c) for c in re.findall(r"(\d+) Ray calls", stderr))}


def round_trip(ray, n: int = 300) -> float:
    """Seconds of one step() call with nothing to do: what the driver pays per call to a worker."""
    from grokcpu.cli.app import Run
    from grokcpu.cli.ray_batch import Worker
    w = ray.remote(num_cpus=0)(Worker).remote(Run(), 1, 1)
    ray.get(w.step.remote([], 0))
    t = time.perf_counter()
    for _ in range(n):
        ray.get(w.step.remote([], 0))
    dt = (time.perf_counter() - t) / n
    ray.kill(w)
    return dt


def records(text: str) -> dict:
    keep = ("text", "generated_tokens", "prompt_tokens", "finish_reason")
    return {r["id"]: {k: r.get(k) for k in keep} for r in map(json.loads, text.splitlines())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", "-m")
    ap.add_argument("--tokenizer")
    ap.add_argument("--prompts", "-p", type=int, default=48)
    ap.add_argument("--gen-tokens", "-g", type=int, default=32)
    ap.add_argument("--batch-size", "-b", type=int, default=8)
    ap.add_argument("--threads", "-t", type=int, help="threads of the local run and of every worker "
                    "(default: all cores, shared by the workers on a node)")
    ap.add_argument("--actors", default="1,2", help="Ray worker counts to run, comma-separated")
    ap.add_argument("--repeat", "-r", type=int, default=2, help="rounds; medians are reported")
    ap.add_argument("--stdout", action="store_true", help="records to stdout: no fsync per record (which the "
                    "local run pays between decode steps, and the Ray driver while the workers compute)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    import ray
    ray.init(include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20, logging_level="ERROR")
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    inp = tmp / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(6))})
                           + "\n" for i in range(a.prompts)))
    common = ["batch", "-i", str(inp), "-n", str(a.gen_tokens), "--seed", "1", "--ignore-eos", "-b", str(a.batch_size),
              "--stats"]          # --stats: the local run warms its kernels up before its clock starts, as workers do
    common += (["--model", a.model] if a.model else []) + (["--tokenizer", a.tokenizer] if a.tokenizer else [])
    common += ["--threads", str(a.threads)] if a.threads else []
    address = ray.get_runtime_context().gcs_address
    variants = [("local", [])] + [(f"ray x{n}", ["--ray", address, "--ray-actors", n]) for n in a.actors.split(",")]
    runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
    want = None
    for r in range(a.repeat):
        for name, extra in variants:
            out = "-" if a.stdout else tmp / f"out-{r}-{name.replace(' ', '')}.jsonl"
            stdout, stderr = run_cli(common + ["-o", str(out)] + extra)
            f = figures(stderr)
            got = records(stdout if a.stdout else out.read_text())
            want = want or got
            if got != want or f["records"] != a.prompts:
                raise SystemExit(f"{name}: the records differ from the local run's")
            runs[name].append(f)
            print(f"round {r + 1} {name}: {f['gen_s']:.2f} s, start {f['start_s']:.1f} s", file=sys.stderr)
    rtt = round_trip(ray)
    ray.shutdown()

    rows = []
    for name, fs in runs.items():
        gen = statistics.median(f["gen_s"] for f in fs)
        rows.append({"run": name, "gen_s": gen, "tok_s": fs[0]["tokens"] / gen,
                     "start_s": statistics.median(f["start_s"] for f in fs),
                     "calls_per_prompt": statistics.median(f["calls"] for f in fs) / a.prompts})
    base = rows[0]["gen_s"]
    one = next((r for r in rows if r["run"] == "ray x1"), None)
    overhead = (one["gen_s"] - base) / a.prompts if one else None
    if a.json:
        print(json.dumps({"rows": rows, "ray_minus_local_per_prompt_s": overhead, "round_trip_s": rtt,
                          "cores": os.cpu_count(), "threads": a.threads}))
        return
    print(f"{a.prompts} prompts x {a.gen_tokens} tokens, batch size {a.batch_size}, {os.cpu_count()} cores, "
          f"threads {a.threads or 'default'}, records to {'stdout' if a.stdout else 'a file'}, median of {a.repeat}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'run':<8} {'generation':>11} {'tok/s':>8} {'vs local':>9} {'worker start':>13} {'calls/prompt':>13}")
    for r in rows:
        print(f"{r['run']:<8} {r['gen_s']:>9.2f} s {r['tok_s']:>8.1f} {base / r['gen_s']:>8.2f}x {r['start_s']:>11.1f} s "
              f"{r['calls_per_prompt']:>13.2f}")
    if overhead is not None:
        print(f"(ray x1 - local) / prompts: {overhead * 1000:.1f} ms")
    print(f"one Ray call to a worker (round trip, nothing to do): {rtt * 1000:.2f} ms")


if __name__ == "__main__":
    main()
