"""Sizes and speeds: the memory plan of a checkpoint, and the pp/tg benchmark.

The memory plan (what a run holds, and the bytes read per token) is in plan.py.

`run_bench(model_path, prompt_tokens, gen_tokens, threads, reps)` measures prompt processing
(pp: one prefill of `prompt_tokens`) and token generation (tg: `gen_tokens` greedy decode
steps) separately, like llama-bench: a warm-up first (compiles the kernels, touches the
pages), then `reps` timed repetitions; median, mean and stddev of tok/s, and the effective
bandwidth of tg (weight bytes read per token x tok/s). Tokenization and sampling are not timed.
"""

from __future__ import annotations

import statistics
from time import perf_counter

import numpy as np

from .errors import GrokError


from .plan import memory_plan, read_per_token  # noqa: F401  (memory_plan: its old home)


def _summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "mean": statistics.fmean(xs),
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "runs": xs}


def run_bench(model_path, prompt_tokens: int = 128, gen_tokens: int = 32, threads: int | None = None,
              reps: int = 3, model=None, **load_options) -> dict:
    """Measure pp (prefill) and tg (decode) speed; see the module docstring. Returns a dict.

    Pass `model` to reuse a loaded model (then model_path is only reported).
    """
    import psutil

    import grokcpu

    checks = [("--prompt-tokens", prompt_tokens, 1), ("--gen-tokens", gen_tokens, 1), ("--reps", reps, 1)]
    for name, v, lo in checks:
        if int(v) != v or v < lo:
            raise GrokError(f"{name} {v} is out of range", hint=f"use an integer >= {lo}")
    if model is None:
        model = grokcpu.load(model_path, threads=threads, **load_options)
    c = model.config
    if prompt_tokens + gen_tokens > model.context:
        raise GrokError(f"--prompt-tokens {prompt_tokens} + --gen-tokens {gen_tokens} exceed the context of {model.context}",
                        hint="use fewer tokens")
    rng = np.random.default_rng(0)
    lo = min(4, c.vocab_size - 1)                 # skip [PAD] [BOS] [EOS] [UNK]
    prompt = rng.integers(lo, c.vocab_size, prompt_tokens).tolist()

    # One session, emptied before each run, as llama-bench clears its context's KV cache: a
    # fresh session's first prefill also pays for mapping its KV cache (0.5-0.6 s of system
    # time on scaled-16), which the warm-up takes.
    s = model.new_session()

    def once(n_prompt: int, n_gen: int) -> tuple[float, float]:
        s.reset()
        t = perf_counter()
        logits = s.prefill(prompt[:n_prompt], logits="last")
        pp = perf_counter() - t
        tok = int(np.argmax(logits))
        t = perf_counter()
        for _ in range(n_gen):
            tok = int(np.argmax(s.decode(tok)))
        return pp, perf_counter() - t

    t0 = perf_counter()
    once(prompt_tokens, min(gen_tokens, 8))   # warm-up: compile both paths, page in the experts
    warmup_s = perf_counter() - t0
    unembed = model.stats().get("unembed", "f32")
    ckpt = getattr(model, "ckpt", None)
    if ckpt is None:
        from .checkpoint import Checkpoint
        ckpt = Checkpoint(model_path)
    per_token = read_per_token(ckpt, unembed)["total"]
    # The read ceiling is measured before and after every repetition: on a shared machine it
    # moves by 1.5x within minutes, so each run's fraction is taken against its own neighbours.
    probe = ReadProbe(getattr(model, "threads", threads))
    ceilings = [probe.measure()]
    pp_runs, tg_runs, fractions = [], [], []
    for _ in range(reps):
        pp, tg = once(prompt_tokens, gen_tokens)
        ceilings.append(probe.measure())
        pp_runs.append(prompt_tokens / pp)
        tg_runs.append(gen_tokens / tg)
        fractions.append(per_token * tg_runs[-1] / 1e9 / ((ceilings[-2] + ceilings[-1]) / 2))
    probe.close()
    tg = _summary(tg_runs)
    pp = _summary(pp_runs)
    stats = model.stats()
    return {
        # the llama-bench-like headline figures
        "prefill_tok_s": pp["median"],
        "decode_tok_s": tg["median"],
        "ttft_s": prompt_tokens / pp["median"],
        "decode_bytes_per_token": per_token,
        "decode_gb_s": per_token * tg["median"] / 1e9,
        "read_gb_s": statistics.median(ceilings),
        "read_gb_s_runs": ceilings,
        # median over repetitions of (that run's GB/s) / (the ceiling measured just before and after it)
        "decode_fraction_of_read": statistics.median(fractions),
        "decode_fraction_runs": fractions,
        "unembed": unembed,
        "model": str(model_path),
        "threads": getattr(model, "threads", threads),
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "reps": reps,
        "warmup_s": warmup_s,
        "pp_tps": _summary(pp_runs),
        "tg_tps": tg,
        "read_per_token_bytes": per_token,
        "tg_gb_s": per_token * tg["median"] / 1e9,
        "peak_rss_bytes": _peak_rss(psutil),
        "expert_cache": {k: v for k, v in stats.get("expert_cache", {}).items() if k != "per_layer"},
    }


class ReadProbe:
    """Memory read bandwidth in GB/s: a float32 sum over a buffer made once (256 MB, 8x a large
    L3), on the decode's thread count; `measure()` gives the median of `reps` passes."""

    def __init__(self, threads: int | None = None, nbytes: int = 256 << 20, reps: int = 5):
        from .kernels.matvec import read_sum
        self.threads, self.reps, self.read_sum = threads, reps, read_sum
        self.a = np.ones(nbytes // 4, np.float32)

    def measure(self) -> float:
        import numba
        saved = numba.get_num_threads()
        if self.threads:
            numba.set_num_threads(min(int(self.threads), numba.config.NUMBA_NUM_THREADS))
        try:
            self.read_sum(self.a)
            ts = []
            for _ in range(self.reps):
                t = perf_counter()
                self.read_sum(self.a)
                ts.append(perf_counter() - t)
        finally:
            numba.set_num_threads(saved)
        return self.a.nbytes / statistics.median(ts) / 1e9

    def close(self) -> None:
        self.a = None


def _peak_rss(psutil) -> int:
    try:
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024   # Linux: KiB
    except (ImportError, OSError):
        return int(psutil.Process().memory_info().rss)
