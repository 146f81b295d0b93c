#!/usr/bin/env python3
"""Replay a routing trace against expert-cache policies and budgets, offline.

    grok-cli generate --model M --routing-trace trace.jsonl ...      # record a trace
    python tools/cache_replay.py --trace trace.jsonl --model M --budget-gb 8,16,32
    python tools/cache_replay.py --trace trace.jsonl --slots 16,32,64 --json

Prints, for each budget and policy (lru, lfu, and the Belady optimum as the ceiling), the hit
rate, the misses and the GB a run would read; and the most used experts to pin.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grokcpu.errors import GrokError  # noqa: E402
from grokcpu.replay import replay  # noqa: E402
from grokcpu.trace import most_used, read_trace  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--model", help="checkpoint, for the size of one expert (else --expert-gb)")
    ap.add_argument("--expert-gb", type=float, help="bytes of one expert, in GB")
    ap.add_argument("--budget-gb", help="comma-separated budgets in GB")
    ap.add_argument("--slots", help="comma-separated budgets in experts")
    ap.add_argument("--policies", default="lru,lfu,belady")
    ap.add_argument("--pins", type=int, default=8, help="how many most-used experts to list")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    try:
        acc = read_trace(a.trace)
        if a.model:
            from grokcpu import open_checkpoint
            ck = open_checkpoint(a.model)
            eb = ck.expert_bytes / 1e9
            ck.close()
        else:
            eb = a.expert_gb
        if a.slots:
            slots = [int(s) for s in a.slots.split(",")]
        elif a.budget_gb and eb:
            slots = [int(float(b) / eb) for b in a.budget_gb.split(",")]
        else:
            raise GrokError("give --slots, or --budget-gb with --model or --expert-gb")
        rows = [dict(replay(acc, n, p), gb_read=(replay(acc, n, p)["misses"] * eb if eb else None))
                for n in slots for p in a.policies.split(",")]
    except (GrokError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pins = [f"{layer}:{e}" for layer, e in most_used(acc, a.pins)]
    if a.json:
        print(json.dumps({"accesses": len(acc), "expert_gb": eb, "results": rows, "most_used": pins}))
        return 0
    print(f"{len(acc)} expert uses" + (f", {eb:.3f} GB per expert" if eb else ""))
    print(f"{'slots':>6} {'policy':>7} {'hit rate':>9} {'misses':>8} {'GB read':>9}")
    for r in rows:
        gb = f"{r['gb_read']:.2f}" if r["gb_read"] is not None else "-"
        print(f"{r['slots']:>6} {r['policy']:>7} {r['hit_rate']:>9.3f} {r['misses']:>8} {gb:>9}")
    print("most used (for --pin-experts):", ",".join(pins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
