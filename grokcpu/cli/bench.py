"""grok-cli bench: prompt processing (pp) and token generation (tg) speed, llama-bench style."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .app import Loaded, Run, command, gb, out, print_stats


@command()
def bench(
    run: Run,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", "-p", help="prompt length for pp")] = 128,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", "-g", help="tokens generated for tg")] = 32,
    reps: Annotated[int, typer.Option("--reps", "-r", help="repetitions (after one warm-up)")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of a table")] = False,
):
    """Measure prompt processing (pp) and token generation (tg) speed, llama-bench style.

    A warm-up run (kernel compile, page-in) comes first and is not in the figures."""
    from ..bench import run_bench
    L = Loaded(run, need_tokenizer=False)
    L.warm()
    r = run_bench(L.path, prompt_tokens, gen_tokens, run.options.threads, reps, model=L.model)
    if as_json:
        out(json.dumps(r, indent=1) + "\n")
    else:
        name = "demo" if L.demo else L.path.name
        out("| model | threads | test | t/s |\n|---|---:|---|---:|\n")
        for test, k, n in (("pp", "pp_tps", prompt_tokens), ("tg", "tg_tps", gen_tokens)):
            x = r[k]
            out(f"| {name} | {r['threads']} | {test}{n} | {x['median']:.2f} ± {x['std']:.2f} |\n")
        out(f"\ntg reads {gb(r['read_per_token_bytes'])} of weights per token: {r['tg_gb_s']:.2f} GB/s effective; "
            f"peak RSS {gb(r['peak_rss_bytes'])}; median of {reps} after a {r['warmup_s']:.2f} s warm-up\n")
    if run.stats:
        print_stats(None, L.model)
