#!/usr/bin/env python3
"""Expert cache benchmark: decoding a checkpoint whose experts do not fit the budget.

    python tools/make_checkpoint.py --preset scaled-16 --out /data/scaled16
    python tools/bench_expert_cache.py --model /data/scaled16 --budget-gb 1.5 --tokens 24

In one run it measures (1) the disk's cold sequential read bandwidth on the checkpoint's own
expert bytes (64 MiB preads after dropping them from the page cache), then decodes from a cold
page cache (2) with the expert cache and prefetch, (3) with the cache and no prefetch, and
(4) with the cache off: experts read from the memory map, the kernel deciding what stays.
Reported: tok/s, hit rate, GB read, read GB/s while reading (and as a fraction of (1)), and
the time compute stalled on reads against the time reads were in flight.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402

import grokcpu  # noqa: E402
from grokcpu.checkpoint import Checkpoint  # noqa: E402


def drop_cache(paths) -> None:
    """Flush and drop these files from the page cache (needs no privileges)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_gbs(ranges, limit: int, block: int = 64 << 20) -> float:
    """Cold sequential read bandwidth over these (path, offset, length) ranges, GB/s."""
    drop_cache({p for p, _, _ in ranges})
    buf = bytearray(block)
    mv = memoryview(buf)
    done = 0
    t = time.perf_counter()
    for path, off, n in ranges:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            pos = 0
            while pos < n and done < limit:
                r = os.preadv(fd, [mv[:min(block, n - pos)]], off + pos)
                if r <= 0:
                    break
                pos += r
                done += r
        finally:
            os.close(fd)
        if done >= limit:
            break
    return done / (time.perf_counter() - t) / 1e9


def run(model_path, files, tokens, threads, prompt_tokens=8, **opts) -> dict:
    drop_cache(files)
    m = grokcpu.load(model_path, threads=threads, **opts)
    s = m.new_session()
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, m.config.vocab_size, prompt_tokens).tolist()
    t0 = time.perf_counter()
    logits = s.prefill(prompt, logits="last")
    t1 = time.perf_counter()
    for _ in range(tokens):
        logits = s.decode(int(logits.argmax()))
    t2 = time.perf_counter()
    st = m.stats().get("expert_cache", {})
    m.close()
    out = {"mode": opts, "prefill_s": t1 - t0, "decode_tok_s": tokens / (t2 - t1)}
    for k in ("hit_rate", "bytes_read", "read_gb_s", "io_busy_seconds", "stall_seconds", "misses",
              "prefetch_hits", "prefetch_issued", "prefetch_wasted", "slots"):
        if k in st:
            out[k] = st[k]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--budget-gb", type=float, required=True)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-mmap", action="store_true", help="skip the cache-off baseline")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    ck = Checkpoint(a.model)
    c = ck.config
    files = [str(p) for p in ck.files]
    expert_total = c.num_layers * c.num_experts * 3 * c.emb_size * c.ffn_size
    ranges = [r for layer in range(c.num_layers) for e in range(c.num_experts) for r in ck.expert_ranges(layer, e)]
    ck.close()
    disk = disk_gbs(ranges, limit=min(2 << 30, expert_total))
    results = {"model": a.model, "expert_gb": expert_total / 1e9, "budget_gb": a.budget_gb,
               "disk_read_gb_s": disk, "runs": []}
    modes = [dict(expert_cache_gb=a.budget_gb, prefetch=True), dict(expert_cache_gb=a.budget_gb, prefetch=False)]
    if not a.skip_mmap:
        modes.append(dict(expert_cache_gb="off"))
    for opts in modes:
        r = run(a.model, files, a.tokens, a.threads, a.prompt_tokens, **opts)
        if "read_gb_s" in r:
            r["read_fraction_of_disk"] = r["read_gb_s"] / disk
        results["runs"].append(r)
        if not a.json:
            print(json.dumps(r), file=sys.stderr)
    if a.json:
        print(json.dumps(results))
        return 0
    print(f"experts {results['expert_gb']:.2f} GB, budget {a.budget_gb} GB, disk cold sequential read {disk:.2f} GB/s")
    print(f"{'mode':<26} {'tok/s':>6} {'hit':>5} {'GB read':>8} {'read GB/s':>9} {'of disk':>7} {'io busy s':>9} {'stall s':>8}")
    for r in results["runs"]:
        mode = ("cache+prefetch" if r["mode"].get("prefetch") else "cache, no prefetch") \
            if r["mode"]["expert_cache_gb"] != "off" else "mmap (cache off)"
        if "hit_rate" in r:
            print(f"{mode:<26} {r['decode_tok_s']:>6.2f} {r['hit_rate']:>5.2f} {r['bytes_read'] / 1e9:>8.2f} "
                  f"{r['read_gb_s']:>9.2f} {r['read_fraction_of_disk']:>7.0%} {r['io_busy_seconds']:>9.2f} "
                  f"{r['stall_seconds']:>8.2f}")
        else:
            print(f"{mode:<26} {r['decode_tok_s']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
