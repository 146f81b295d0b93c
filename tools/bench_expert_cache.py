#!/usr/bin/env python3
"""Expert cache benchmark: decoding a checkpoint whose experts do not fit the budget.

    python tools/make_checkpoint.py --preset scaled-16 --out /data/scaled16
    python tools/bench_expert_cache.py --model /data/scaled16 --budget-gb 1.5 --tokens 24

In one run it measures (1) the disk's cold read bandwidth on the checkpoint's own expert bytes
(after dropping them from the page cache: one stream of 64 MiB preads, and as many reads in
flight as the cache keeps, buffered and direct; the best is the disk rate), then decodes from a cold page cache
(2) with the expert cache (the default: no prefetch), (3) with the cache and prefetch, and
with the cache off: experts read from the memory map, the kernel deciding what stays, (4) with
the same memory as the cache run (a ballast holds the rest of RAM: the page cache gets what
the budget, dense weights and KV cache took) and (5) with all of RAM.
Reported: tok/s (all of the decode, and its second half, "late", after most experts' first
use), hit rate, GB read, read GB/s while reading (and as a fraction of (1); for prefill and
decode apart too: prefill's includes the pool's first fill), the time compute stalled on reads
against the time reads were in flight, and what the kernel read from disk while decoding
(/proc/self/io; for mmap this is the only measure of its misses).
"""

import argparse
import json
import mmap
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402

import grokcpu  # noqa: E402
from grokcpu.checkpoint import Checkpoint  # noqa: E402
from grokcpu.expert_cache import ExpertCache  # noqa: E402


def drop_cache(paths) -> None:
    """Flush and drop these files from the page cache (needs no privileges)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_read_bytes() -> int | None:
    """Bytes this process has caused to be read from storage (Linux /proc/self/io)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def disk_gbs(ranges, limit: int, block: int = 64 << 20, workers: int = 1, direct: bool = False) -> float:
    """Cold read bandwidth over the first `limit` bytes of these (path, offset, length) ranges,
    GB/s: `block`-byte reads, `workers` of them in flight at once (1: one sequential stream);
    direct: O_DIRECT reads of the aligned blocks around each piece (0.0 where refused)."""
    from concurrent.futures import ThreadPoolExecutor
    drop_cache({p for p, _, _ in ranges})
    align = ExpertCache.ALIGN
    pieces, total = [], 0
    for path, off, n in ranges:
        for pos in range(0, n, block):
            if total >= limit:
                break
            k = min(block, n - pos, limit - total)
            a0 = (off + pos) // align * align if direct else off + pos
            a1 = -(-(off + pos + k) // align) * align if direct else off + pos + k
            pieces.append((path, a0, a1 - a0))
            total += k
    fds = {}
    try:
        for path, _, _ in pieces:
            if path not in fds:
                fds[path] = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
                if not direct:
                    os.posix_fadvise(fds[path], 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (OSError, AttributeError):
        for fd in fds.values():
            os.close(fd)
        return 0.0
    bufs = [mmap.mmap(-1, block + 2 * align) for _ in range(workers)]    # page-aligned

    def read(w: int) -> int:
        done = 0
        for path, off, k in pieces[w::workers]:
            done += min(k, os.preadv(fds[path], [memoryview(bufs[w])[:k]], off))
        return done

    t = time.perf_counter()
    try:
        with ThreadPoolExecutor(workers) as ex:
            done = sum(ex.map(read, range(workers)))
    except OSError:
        return 0.0
    finally:
        for fd in fds.values():
            os.close(fd)
    return min(done, total) / (time.perf_counter() - t) / 1e9


def run(model_path, files, tokens, threads, prompt_tokens=8, memory_bytes=None, **opts) -> dict:
    """One cold decode run. memory_bytes: hold RAM aside (a ballast) so that only this much
    stays available to the run: the cache-off baseline at the cache run's memory."""
    import psutil
    drop_cache(files)
    ballast = None
    if memory_bytes is not None:
        extra = psutil.virtual_memory().available - int(memory_bytes)
        if extra > 0:
            ballast = np.ones(extra, np.uint8)        # written, so resident (no swap assumed)
    m = grokcpu.load(model_path, threads=threads, **opts)
    c = m.config
    dense = m.ckpt.nbytes - c.all_expert_bytes
    budget = m.experts.budget_bytes if m.experts is not None else None
    s = m.new_session()
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, m.config.vocab_size, prompt_tokens).tolist()
    t0 = time.perf_counter()
    logits = s.prefill(prompt, logits="last")
    t1 = time.perf_counter()
    pre = m.stats().get("expert_cache", {})
    io0 = disk_read_bytes()
    steps = []
    for _ in range(tokens):
        t = time.perf_counter()
        logits = s.decode(int(logits.argmax()))
        steps.append(time.perf_counter() - t)
    t2 = time.perf_counter()
    io1 = disk_read_bytes()
    st = m.stats().get("expert_cache", {})
    m.close()
    del ballast
    out = {"mode": {**opts, **({"memory_gb": memory_bytes / 1e9} if memory_bytes is not None else {})},
           "prefill_s": t1 - t0, "decode_tok_s": tokens / (t2 - t1),
           # the second half of the decode: after the first uses of most experts (cold misses)
           "late_tok_s": len(steps[tokens // 2:]) / sum(steps[tokens // 2:]) if tokens >= 2 else None,
           # what the run needs besides spare RAM: the budget, dense weights and the KV cache
           "footprint_bytes": (budget + dense + c.kv_cache_bytes(m.context)) if budget is not None else None,
           # what the kernel read from disk for this process while decoding (page faults included)
           "decode_disk_gb": (io1 - io0) / 1e9 if io0 is not None and io1 is not None else None}
    for k in ("hit_rate", "bytes_read", "read_gb_s", "io_busy_seconds", "stall_seconds", "misses",
              "prefetch_hits", "prefetch_issued", "prefetch_wasted", "slots"):
        if k in st:
            out[k] = st[k]
    for k in ("io_busy_seconds", "stall_seconds", "bytes_read", "misses", "prefetch_hits"):
        if k in pre:
            out["prefill_" + k] = pre[k]
            out["decode_" + k] = st[k] - pre[k]
    for phase in ("prefill", "decode"):       # each phase's miss reads: GB over the time reads were in flight
        if out.get(phase + "_io_busy_seconds"):
            out[phase + "_read_gb_s"] = out[phase + "_bytes_read"] / 1e9 / out[phase + "_io_busy_seconds"]
    return out


def _gb(v) -> str:
    return "?" if v is None else f"{v:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--budget-gb", required=True, help="GB, or auto")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-mmap", action="store_true", help="skip the cache-off baseline")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    ck = Checkpoint(a.model)
    c = ck.config
    files = [str(p) for p in ck.files]
    expert_total = c.all_expert_bytes
    ranges = [r for layer in range(c.num_layers) for e in range(c.num_experts) for r in ck.expert_ranges(layer, e)]
    ck.close()
    limit = min(2 << 30, expert_total)
    single = disk_gbs(ranges, limit)
    # the drive with as many reads in flight as the cache's misses keep, buffered and direct
    deep = disk_gbs(ranges, limit, ExpertCache.READ_CHUNK, ExpertCache.IO_THREADS)
    direct = disk_gbs(ranges, limit, ExpertCache.READ_CHUNK, ExpertCache.IO_THREADS, direct=True)
    disk = max(single, deep, direct)
    results = {"model": a.model, "expert_gb": expert_total / 1e9, "budget_gb": a.budget_gb,
               "disk_read_gb_s": disk, "disk_single_stream_gb_s": single, "disk_buffered_gb_s": deep,
               "disk_direct_gb_s": direct, "runs": []}
    modes = [dict(expert_cache_gb=a.budget_gb, prefetch=False), dict(expert_cache_gb=a.budget_gb, prefetch=True)]
    if not a.skip_mmap:
        # the kernel's page cache given the memory the cache run had (its footprint), then all RAM
        modes += [dict(expert_cache_gb="off", same_memory=True), dict(expert_cache_gb="off")]
    footprint = None
    for opts in modes:
        opts = dict(opts)
        mem = footprint if opts.pop("same_memory", False) else None
        r = run(a.model, files, a.tokens, a.threads, a.prompt_tokens, memory_bytes=mem, **opts)
        footprint = footprint or r["footprint_bytes"]
        for k in ("", "prefill_", "decode_"):
            if k + "read_gb_s" in r:
                r[k + "read_fraction_of_disk"] = r[k + "read_gb_s"] / disk
        results["runs"].append(r)
        if a.json:              # one object per mode, each with the disk rate of this run
            print(json.dumps({k: v for k, v in results.items() if k != "runs"} | r), flush=True)
        else:
            print(json.dumps(r), file=sys.stderr)
    if a.json:
        return 0
    for r in results["runs"]:
        if "prefill_stall_seconds" in r:
            rates = "; ".join(f"{p} read {r[p + '_read_gb_s']:.2f} GB/s ({r[p + '_read_fraction_of_disk']:.0%})"
                              for p in ("prefill", "decode") if p + "_read_gb_s" in r)
            print(f"{'prefetch' if r['mode'].get('prefetch') else 'no prefetch'}: prefill {r['prefill_s']:.1f} s, "
                  f"stalled {r['prefill_stall_seconds']:.1f} s of {r['prefill_io_busy_seconds']:.1f} s reading; "
                  f"decode stalled {r['decode_stall_seconds']:.1f} s of {r['decode_io_busy_seconds']:.1f} s reading; "
                  + rates)
    print(f"experts {results['expert_gb']:.2f} GB, budget {a.budget_gb} GB, disk cold read {disk:.2f} GB/s "
          f"(the best of: {ExpertCache.IO_THREADS} x {ExpertCache.READ_CHUNK >> 20} MiB in flight, buffered "
          f"{deep:.2f} and direct {direct:.2f} GB/s; one stream {single:.2f} GB/s)")
    print(f"{'mode':<26} {'tok/s':>6} {'late':>6} {'hit':>5} {'GB read':>8} {'read GB/s':>9} {'of disk':>7} "
          f"{'io busy s':>9} {'stall s':>8} {'decode disk GB':>14}")
    base = [r for r in results["runs"] if "memory_gb" in r["mode"]]
    for r in results["runs"]:
        if base and "hit_rate" in r:
            r["vs_mmap_same_memory"] = r["decode_tok_s"] / base[0]["decode_tok_s"]
            r["late_vs_mmap_same_memory"] = (r["late_tok_s"] or 0) / (base[0]["late_tok_s"] or 1)
    for r in results["runs"]:
        mode = ("cache+prefetch" if r["mode"].get("prefetch") else "cache, no prefetch") \
            if r["mode"]["expert_cache_gb"] != "off" else \
            ("mmap, same memory" if "memory_gb" in r["mode"] else "mmap, all RAM")
        late = f"{r['late_tok_s']:>6.2f}" if r["late_tok_s"] else f"{'':>6}"
        if "hit_rate" in r:
            print(f"{mode:<26} {r['decode_tok_s']:>6.2f} {late} {r['hit_rate']:>5.2f} {r['bytes_read'] / 1e9:>8.2f} "
                  f"{r['read_gb_s']:>9.2f} {r['read_fraction_of_disk']:>7.0%} {r['io_busy_seconds']:>9.2f} "
                  f"{r['stall_seconds']:>8.2f} {_gb(r['decode_disk_gb']):>14}"
                  + (f"  {r['vs_mmap_same_memory']:.2f}x / {r['late_vs_mmap_same_memory']:.2f}x mmap (same memory)"
                     if "vs_mmap_same_memory" in r else ""))
        else:
            print(f"{mode:<26} {r['decode_tok_s']:>6.2f} {late} {'':>5} {'':>8} {'':>9} {'':>7} {'':>9} {'':>8} "
                  f"{_gb(r['decode_disk_gb']):>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
