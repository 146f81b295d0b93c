#!/usr/bin/env python3
"""Prefill (pp) and decode (tg) speed, like llama-bench, with the memory ceiling measured in the same run.

    python tools/bench.py --model /data/scaled16 --prompt-tokens 512 --gen-tokens 128 --threads 2
    python tools/bench.py --model /data/scaled16 --unembed int8 --json

Warm-up first (compiles the kernels, fills the expert cache), then the median of --reps runs.
decode GB/s = weight bytes one decode step streams x tok/s; read GB/s = a float32 sum over
256 MB on the same threads, measured before and after every run: the ceiling a memory-bound
decode is held to. Each run's fraction is taken against the ceilings around it; the median
of those is `decode_fraction_of_read`.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grokcpu.bench import run_bench  # noqa: E402
from grokcpu.errors import GrokError  # noqa: E402
from grokcpu.options import OptionError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--unembed", choices=("f32", "int8"), default="f32")
    ap.add_argument("--activations", choices=("f32", "q8"), default="f32", help="GGUF models: q8 rounds x to 8 bits")
    ap.add_argument("--expert-cache-gb", default="auto")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    try:
        r = run_bench(a.model, a.prompt_tokens, a.gen_tokens, a.threads, a.reps,
                      unembed=a.unembed, activations=a.activations, expert_cache_gb=a.expert_cache_gb)
    except OptionError as e:
        print(f"error: {e.render('--' + e.param.replace('_', '-'))}", file=sys.stderr)
        return 2
    except GrokError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(r))
        return 0
    name = Path(a.model).name
    print(f"activations {a.activations}")
    print("| model | threads | unembed | test | t/s |")
    print("|---|---:|---|---|---:|")
    print(f"| {name} | {r['threads']} | {r['unembed']} | pp{a.prompt_tokens} | {r['pp_tps']['median']:.2f} ± {r['pp_tps']['std']:.2f} |")
    print(f"| {name} | {r['threads']} | {r['unembed']} | tg{a.gen_tokens} | {r['tg_tps']['median']:.2f} ± {r['tg_tps']['std']:.2f} |")
    lo, hi = min(r["read_gb_s_runs"]), max(r["read_gb_s_runs"])
    runs = ", ".join(f"{f:.0%}" for f in r["decode_fraction_runs"])
    print(f"\ndecode streams {r['decode_bytes_per_token'] / 1e9:.3f} GB/token: {r['decode_gb_s']:.1f} GB/s; "
          f"read ceiling {r['read_gb_s']:.1f} GB/s ({lo:.1f}-{hi:.1f}, measured around every run); "
          f"each run against its own ceiling: {runs}, median {r['decode_fraction_of_read']:.0%}; "
          f"time to first token {r['ttft_s']:.2f} s; median of {a.reps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
