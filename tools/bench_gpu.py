#!/usr/bin/env python3
"""Prefill and decode speed with and without the GPU offload of the dense layers.

    python tools/bench_gpu.py --model /data/scaled16 [--prompt 128] [--decode 32] [--repeats 3] [--json]

Prints the GPU found (or why there is none; then only the CPU half runs), then per path the
median tok/s of one prefill of --prompt random tokens and of --decode greedy decode steps,
after a warm-up that compiles the kernels. `offload` runs attention, norms, router and the
unembedding on the GPU (grokcpu/backends/cuda.py) and the experts on the CPU. Both paths start
from the same prompt; the largest logit difference between them is printed as a check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from time import perf_counter

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grokcpu  # noqa: E402
from grokcpu.errors import GrokError  # noqa: E402


def measure(model, prompt, n_decode, repeats):
    """Median prefill and decode tok/s over `repeats` runs after a warm-up; the first run's
    last-position prefill logits, to compare the paths."""
    def once(n_prompt, n_gen):
        s = model.new_session()
        t = perf_counter()
        logits = s.prefill(prompt[:n_prompt], logits="last")
        pp = perf_counter() - t
        first = logits
        tok = int(np.argmax(logits))
        t = perf_counter()
        for _ in range(n_gen):
            tok = int(np.argmax(s.decode(tok)))
        return pp, perf_counter() - t, first

    t = perf_counter()
    once(min(len(prompt), 8), min(n_decode, 2))         # warm-up: compiles every kernel
    warm = perf_counter() - t
    pp, tg = [], []
    first = None
    for _ in range(repeats):
        a, b, first = once(len(prompt), n_decode)
        pp.append(len(prompt) / a)
        tg.append(n_decode / b)
    return {"warmup_s": warm, "prefill_tps": statistics.median(pp), "decode_tps": statistics.median(tg),
            "prefill_runs": pp, "decode_runs": tg}, first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder (holding ckpt-0/)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    ap.add_argument("--decode", type=int, default=32, help="decode steps (default 32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--context", type=int, default=None, help="KV-cache length (default: prompt + decode)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = ap.parse_args(argv)
    if a.prompt < 1 or a.decode < 1 or a.repeats < 1:
        ap.error("--prompt, --decode and --repeats must be >= 1")

    from grokcpu.backends import cuda as gc   # only numba.cuda's import; no GPU is touched yet
    ok, what = gc.cuda_status()
    say = (lambda *x: None) if a.json else (lambda *x: print(*x, flush=True))
    say(f"GPU: {what}" if ok else f"no CUDA GPU found ({what}): running the CPU half only")

    try:
        context = a.context or a.prompt + a.decode
        model = grokcpu.load(a.model, threads=a.threads, context=context)
    except GrokError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = model.config
    rng = np.random.default_rng(0)
    prompt = rng.integers(min(4, c.vocab_size - 1), c.vocab_size, a.prompt).tolist()
    result = {"model": a.model, "gpu": what if ok else None, "no_gpu_reason": None if ok else what,
              "threads": model.threads, "prompt": a.prompt, "decode": a.decode, "repeats": a.repeats}

    def line(name, r):
        say(f"{name:8s} prefill {r['prefill_tps']:9.2f} tok/s   decode {r['decode_tps']:8.2f} tok/s"
            f"   (warm-up {r['warmup_s']:.1f} s)")

    say(f"model: {a.model}  D={c.emb_size} L={c.num_layers} E={c.num_experts} V={c.vocab_size}  "
        f"threads={model.threads}  prompt={a.prompt} decode={a.decode} repeats={a.repeats}")
    result["cpu"], cpu_first = measure(model, prompt, a.decode, a.repeats)
    line("cpu", result["cpu"])
    if ok:
        t = perf_counter()
        gpu = grokcpu.load(a.model, threads=a.threads, context=context, offload="dense")
        result["upload_s"] = perf_counter() - t
        result["gpu_dense_bytes"] = nbytes = gpu.stats()["gpu"]["bytes"]
        result["offload"], gpu_first = measure(gpu, prompt, a.decode, a.repeats)
        result["max_abs_logit_diff"] = float(np.abs(gpu_first - cpu_first).max())
        line("offload", result["offload"])
        say(f"load + upload {result['upload_s']:.1f} s ({nbytes / 1e9:.2f} GB of dense weights on the GPU); "
            f"last prompt position, offload vs cpu: max |logit diff| {result['max_abs_logit_diff']:.2e}")
    if a.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
