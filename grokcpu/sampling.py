"""Choosing the next token from logits: penalties, temperature, filters, one random draw.

    sample = make_sampler(temperature=0.8, top_p=0.95, seed=42)
    token = sample(logits, history)         # logits float32 [V]; history: ids so far

Order of operations (each step a small pure function below, easy to test on its own):
1. repeat penalty over the last `repeat_last_n` ids of `history` (llama.cpp: a positive logit
   is divided by the penalty, a negative one multiplied; each distinct id once);
2. temperature 0 -> greedy: argmax (lowest id on ties), no random number is drawn;
3. logits / temperature (the reference divides first, spec GROK1.md §6);
4. top-k (llama.cpp: keep exactly the k largest; lower ids win ties), top-p (the
   reference's nucleus rule, §6), min-p (llama.cpp: keep p >= min_p * p_max), each on the
   temperature-scaled logits and each removing tokens by setting them to -inf;
5. one draw by inverse CDF: u ~ U[0,1) from a numpy Generator seeded once, and the first id
   (in id order) whose cumulative probability exceeds u * total. One uniform per token, so the
   same seed and the same logits always give the same ids, independent of the vocab size.
   (The reference uses Gumbel-max via jax.random.categorical; both sample exactly the
   filtered softmax distribution, but no CPU engine can reproduce JAX's random stream.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NEG_INF = np.float32(-np.inf)


def apply_repeat_penalty(logits: np.ndarray, history, penalty: float, last_n: int = 64) -> np.ndarray:
    """llama.cpp's repeat penalty over the distinct ids among the last `last_n` of history."""
    if penalty == 1.0 or not len(history) or last_n == 0:
        return logits
    recent = history[-last_n:] if last_n > 0 else history
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < logits.shape[0])]
    out = logits.copy()
    v = out[ids]
    out[ids] = np.where(v > 0, v / np.float32(penalty), v * np.float32(penalty))
    return out


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep exactly the k largest logits (llama.cpp); among equal values at the cut, the lower
    ids win. k <= 0 keeps everything."""
    if k <= 0 or k >= logits.shape[0]:
        return logits
    kth = np.partition(logits, -k)[-k]
    keep = logits > kth
    ties = np.flatnonzero(logits == kth)[:k - int(keep.sum())]
    keep[ties] = True
    return np.where(keep, logits, NEG_INF)


def apply_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """The reference's nucleus filter (runners.py:top_p_filter, spec §6).

    Sort ascending, softmax, cumulative sum; the threshold is the FIRST sorted index whose
    cumulative probability is >= 1 - top_p; every logit >= the logit there is kept (ties at
    the threshold are kept). top_p >= 1 keeps everything. Computed in float64.
    """
    if top_p >= 1.0:
        return logits
    s = np.sort(logits.astype(np.float64))
    p = np.exp(s - s[-1])
    c = np.cumsum(p / p.sum())
    i = int(np.argmax(c >= 1.0 - top_p)) if (c >= 1.0 - top_p).any() else len(s) - 1
    return np.where(logits >= s[i], logits, NEG_INF)


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """llama.cpp's min-p: keep tokens whose probability is >= min_p x the largest probability."""
    if min_p <= 0.0:
        return logits
    # p_i / p_max = exp(l_i - l_max) >= min_p  <=>  l_i >= l_max + log(min_p)
    m = logits.max()
    return np.where(logits.astype(np.float64) >= float(m) + np.log(min_p), logits, NEG_INF)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """softmax in float64 (-inf entries get probability 0)."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


def filtered_logits(logits: np.ndarray, history=(), *, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, min_p: float = 0.0, repeat_penalty: float = 1.0,
                    repeat_last_n: int = 64) -> np.ndarray:
    """Steps 1, 3, 4: the logits the random draw samples from (temperature must be > 0)."""
    x = np.asarray(logits, dtype=np.float32)
    x = apply_repeat_penalty(x, history, repeat_penalty, repeat_last_n)
    x = x / np.float32(temperature)
    x = apply_top_k(x, top_k)
    x = apply_top_p(x, top_p)
    x = apply_min_p(x, min_p)
    return x


@dataclass
class Sampler:
    """A configured sampler; call it as sampler(logits, history) -> token id."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_settings(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                       min_p=self.min_p, repeat_penalty=self.repeat_penalty, repeat_last_n=self.repeat_last_n)
        self.rng = np.random.default_rng(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: np.ndarray, history=()) -> int:
        if self.greedy:
            x = apply_repeat_penalty(np.asarray(logits, dtype=np.float32), history,
                                     self.repeat_penalty, self.repeat_last_n)
            return int(np.argmax(x))
        x = filtered_logits(logits, history, temperature=self.temperature, top_k=self.top_k,
                            top_p=self.top_p, min_p=self.min_p, repeat_penalty=self.repeat_penalty,
                            repeat_last_n=self.repeat_last_n)
        return draw(probabilities(x), self.rng.random())


def draw(p: np.ndarray, u: float) -> int:
    """Inverse CDF: the first id whose cumulative probability exceeds u * total."""
    c = np.cumsum(p)
    i = int(np.searchsorted(c, u * c[-1], side="right"))
    i = min(i, len(p) - 1)
    while p[i] == 0.0 and i > 0:          # rounding at the very end: step back to a kept id
        i -= 1
    return i


def check_settings(*, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                   repeat_last_n=64, max_tokens=None, **_ignored) -> None:
    """Raise GrokError for a sampling value outside its range (the flags' names in the message).
    The one check of these settings (and of max_tokens): the CLI, batch records, /set and the
    engine all come here."""
    from .errors import GrokError

    def bad(flag, value, want):
        raise GrokError(f"--{flag} {value} is out of range", hint=f"use {want}")

    if not (np.isfinite(temperature) and temperature >= 0):
        bad("temperature", temperature, "a value >= 0 (0 = greedy)")
    if int(top_k) != top_k or top_k < 0:
        bad("top-k", top_k, "an integer >= 0 (0 = off)")
    if not (0.0 < top_p <= 1.0):
        bad("top-p", top_p, "a value in (0, 1] (1 = off)")
    if not (0.0 <= min_p <= 1.0):
        bad("min-p", min_p, "a value in [0, 1] (0 = off)")
    if not (np.isfinite(repeat_penalty) and repeat_penalty > 0):
        bad("repeat-penalty", repeat_penalty, "a value > 0 (1 = off)")
    if int(repeat_last_n) != repeat_last_n or repeat_last_n < -1:
        bad("repeat-last-n", repeat_last_n, "an integer >= 0, or -1 for the whole history")
    if max_tokens is not None and (isinstance(max_tokens, bool) or int(max_tokens) != max_tokens or max_tokens < 1):
        bad("max-tokens", max_tokens, "an integer >= 1")


def settings(*, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, repeat_last_n=64,
             seed=None, max_tokens=256) -> dict:
    """Checked settings as a dict (a negative seed means a random one, as in llama.cpp)."""
    check_settings(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                   repeat_last_n=repeat_last_n, max_tokens=max_tokens)
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                repeat_last_n=repeat_last_n, seed=None if seed is None or seed < 0 else seed, max_tokens=max_tokens)


def make_sampler(temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 repeat_penalty: float = 1.0, repeat_last_n: int = 64, seed: int | None = None) -> Sampler:
    """A sampler with llama.cpp's flag names and defaults; temperature 0 = greedy.

    seed None draws a fresh random seed (so runs differ); any int makes runs repeatable.
    """
    return Sampler(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                   min_p=float(min_p), repeat_penalty=float(repeat_penalty),
                   repeat_last_n=int(repeat_last_n), seed=seed)
