"""Throughput of the HTTP server under concurrent clients (continuous batching).

    python tools/bench_server.py                                  # starts a server on the demo model
    python tools/bench_server.py --model /tmp/scaled16 --tokenizer ../shared/data/grok1-tokenizer.model -g 16
    python tools/bench_server.py --url http://127.0.0.1:8080 --json

For each number of concurrent clients C (default 1, 2, 4, 8), C clients each send R streamed
completion requests one after another (greedy, ignore_eos, exactly -g tokens each, distinct
prompts). Reported per C: wall time, aggregate generated tok/s (all tokens / wall), its
speedup over C=1, each request's decode tok/s (tokens after the first / time after the first)
and time to first token (median, p90). A first request warms the server up (kernels, caches).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the key value cache expert router layer token attention model weight batch stream "
         "prompt decode prefill context memory number answer").split()


def prompt(i: int, words: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words))


def one_request(url: str, headers: dict, text: str, max_tokens: int, timeout: float) -> dict:
    """One streamed completion; times of the first and last text chunks, token count from usage."""
    body = {"prompt": text, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=timeout) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
            if d.get("choices") and d["choices"][0].get("finish_reason") is None:
                now = time.perf_counter()
                first = now if first is None else first
                last = now
    t_end = time.perf_counter()
    first = first or t_end
    last = last or t_end
    return {"ttft_s": first - t0, "total_s": t_end - t0, "tokens": tokens,
            "decode_tps": (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0}


def run_level(url, headers, clients: int, per_client: int, max_tokens: int, words: int, timeout: float) -> dict:
    def client(c):
        return [one_request(url, headers, prompt(c * per_client + k, words), max_tokens, timeout)
                for k in range(per_client)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        results = [r for rs in ex.map(client, range(clients), timeout=timeout * per_client) for r in rs]
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft_s"] for r in results)
    tps = [r["decode_tps"] for r in results]
    total = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": total, "wall_s": round(wall, 3),
            "aggregate_tps": round(total / wall, 2), "request_decode_tps_median": round(statistics.median(tps), 2),
            "ttft_ms_median": round(statistics.median(ttft) * 1e3, 1),
            "ttft_ms_p90": round(ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))] * 1e3, 1)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, parallel: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "grokcpu.server", "--port", str(port), "--parallel", str(parallel), "--queue", "256"]
    for flag in ("model", "tokenizer", "threads", "context"):
        v = getattr(args, flag)
        if v is not None:
            cmd += [f"--{flag}", str(v)]
    log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with status {proc.returncode} (see --server-log)")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("error: the server did not become ready in 600 s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start one)")
    p.add_argument("--api-key", default=os.environ.get("GROKCPU_API_KEY"))
    p.add_argument("-m", "--model", help="checkpoint for the started server (default: the demo model)")
    p.add_argument("--tokenizer")
    p.add_argument("-t", "--threads", type=int)
    p.add_argument("-c", "--context", type=int)
    p.add_argument("--clients", default="1,2,4,8", help="concurrency levels (default 1,2,4,8)")
    p.add_argument("-r", "--requests-per-client", type=int, default=2)
    p.add_argument("-g", "--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("-p", "--prompt-words", type=int, default=12)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--server-log", help="write the started server's output here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.clients.split(",")]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    proc = None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            proc, url = start_server(args, max(levels))
        info = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]
        # warm-up: one request, then one short round at the highest concurrency (batched kernels, caches)
        one_request(url, headers, prompt(999, args.prompt_words), args.max_tokens, args.timeout)
        run_level(url, headers, max(levels), 1, 4, args.prompt_words, args.timeout)
        rows = [run_level(url, headers, c, args.requests_per_client, args.max_tokens, args.prompt_words,
                          args.timeout) for c in levels]
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    base = next((r["aggregate_tps"] for r in rows if r["clients"] == 1), rows[0]["aggregate_tps"])
    for r in rows:
        r["speedup"] = round(r["aggregate_tps"] / base, 2) if base else None
    doc = {"model": info["id"], "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
           "prompt_words": args.prompt_words, "levels": rows}
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"model {info['id']}, {args.max_tokens} tokens per request (greedy), {args.requests_per_client} "
          f"requests per client, prompts of {args.prompt_words} words")
    print(f"{'clients':>7} {'requests':>8} {'wall s':>8} {'agg tok/s':>10} {'vs 1':>6} {'req tok/s':>10} "
          f"{'ttft ms':>9} {'ttft p90':>9}")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['wall_s']:>8.2f} {r['aggregate_tps']:>10.1f} "
              f"{r['speedup']:>5.2f}x {r['request_decode_tps_median']:>10.1f} {r['ttft_ms_median']:>9.1f} "
              f"{r['ttft_ms_p90']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
