"""Perplexity, and a model's distance from a reference, over one text (llama.cpp's
`llama-perplexity --kl-divergence`). Never prints.

    chunks = make_chunks(tok.encode(text), ctx=512)           # int64 [N, ctx]
    saved = [c for c in score(reference, chunks, save=f)]     # the reference's logits -> file f
    ref = np.memmap(f.name, np.float32, "r", shape=(N, scored(512), V))
    got = [c for c in score(model, chunks, reference=ref)]    # compared row by row
    figures = summary(got)                                    # ppl, KL, top-1, logit error

Each chunk is one fresh prefill (no context carried between chunks). Scored positions: the
second half of each chunk's tokens (ctx//2 .. ctx-1), each predicted from all the chunk's tokens
before it, so every scored token has at least ctx/2 tokens of context, as in llama.cpp (the
first tokens of a chunk, guessed from almost nothing, would otherwise dominate the figures).
Like the reference runner, no [BOS] is put before a chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from time import perf_counter
from typing import BinaryIO, Iterator

import numpy as np

from .errors import GrokError

ROWS = 16        # positions compared at a time: bounds the float64 temporaries (V=131072: 17 MB each)


@dataclass(frozen=True)
class ChunkScore:
    """One chunk: its tokens run through the model in `seconds`, and per scored position the
    float64 figures of `position_stats`."""
    index: int
    tokens: int
    seconds: float
    stats: dict


def scored(ctx: int) -> int:
    """Scored positions per chunk of ctx tokens: its second half."""
    return ctx - ctx // 2


def make_chunks(ids, ctx: int, max_chunks: int | None = None) -> np.ndarray:
    """The whole chunks of ctx tokens in `ids` (at most max_chunks of them): int64 [N, ctx]."""
    n = len(ids) // ctx
    if n == 0:
        raise GrokError(f"the text has {len(ids)} tokens, fewer than one chunk of --ctx {ctx}",
                        hint="give a longer --text, or a smaller --ctx")
    if max_chunks is not None:
        n = min(n, max_chunks)
    return np.asarray(ids[:n * ctx], np.int64).reshape(n, ctx)


def score(model, chunks: np.ndarray, save: BinaryIO | None = None,
          reference: np.ndarray | None = None) -> Iterator[ChunkScore]:
    """Run each chunk through `model` as one prefill; yield its ChunkScore.

    save: a file to append the scored positions' float32 logits to, chunk after chunk
    ([N, scored(ctx), V] in all). reference: those logits of the exact model ([N, scored, V],
    e.g. that file mapped), to compare with."""
    ctx = chunks.shape[1]
    first = ctx // 2
    session = model.new_session()
    for i, chunk in enumerate(chunks):
        session.reset()
        t0 = perf_counter()
        logits = session.prefill(chunk, logits="all")[first - 1:ctx - 1]    # row j predicts token first + j
        seconds = perf_counter() - t0
        if save is not None:
            logits.tofile(save)
        ref = None if reference is None else reference[i]
        yield ChunkScore(i, ctx, seconds, position_stats(logits, chunk[first:], ref))


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    """log softmax of float32 logit rows [n, V], in float64."""
    x = rows.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def position_stats(logits: np.ndarray, targets: np.ndarray, reference: np.ndarray | None = None) -> dict:
    """Per position (logit rows [n, V] and the next tokens [n]), float64: nll = -log p(target).
    With the reference's rows also: nll_ref, kl = KL(reference || model), top1 (the same argmax),
    dp = p(target) - p_ref(target), and the row's largest |logit - reference logit| (max_diff)
    and |reference logit| (max_ref)."""
    parts = []
    for i in range(0, len(targets), ROWS):
        got, t = logits[i:i + ROWS], targets[i:i + ROWS]
        k = np.arange(len(t))
        lm = _log_softmax(got)
        d = {"nll": -lm[k, t]}
        if reference is not None:
            ref = np.asarray(reference[i:i + ROWS])
            lr = _log_softmax(ref)
            d.update(nll_ref=-lr[k, t], kl=(np.exp(lr) * (lr - lm)).sum(axis=1),
                     top1=got.argmax(axis=1) == ref.argmax(axis=1),
                     dp=np.exp(lm[k, t]) - np.exp(lr[k, t]),
                     max_diff=np.abs(got.astype(np.float64) - ref).max(axis=1),
                     max_ref=np.abs(ref).max(axis=1).astype(np.float64))
        parts.append(d)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def summary(chunks: list[ChunkScore]) -> dict:
    """The figures over every scored position of `chunks`, JSON-ready (plain floats, unrounded).

    ppl = exp(mean nll). With a reference: kl_mean and its standard error (std / sqrt(n)),
    median / 99th percentile (numpy's linear interpolation) / max; top1 (the fraction of
    positions whose argmax agrees); the largest logit error, also as a fraction of the largest
    |reference logit|; rms_dp, the RMS over positions of p(next token) - p_ref(next token)
    (llama.cpp's "RMS Δp")."""
    s = {key: np.concatenate([c.stats[key] for c in chunks]) for key in chunks[0].stats}
    n = len(s["nll"])
    seconds = sum(c.seconds for c in chunks)
    tokens = sum(c.tokens for c in chunks)
    out = {"chunks": len(chunks), "scored_tokens": n, "ppl": math.exp(s["nll"].mean()),
           "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else 0.0}
    if "kl" in s:
        kl = s["kl"]
        max_ref = float(s["max_ref"].max())
        out.update(ppl_reference=math.exp(s["nll_ref"].mean()), kl_mean=float(kl.mean()),
                   kl_stderr=float(kl.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
                   kl_median=float(np.median(kl)), kl_p99=float(np.percentile(kl, 99)), kl_max=float(kl.max()),
                   top1=float(s["top1"].mean()), max_logit_diff=float(s["max_diff"].max()),
                   max_ref_logit=max_ref, max_logit_diff_rel=float(s["max_diff"].max()) / max_ref if max_ref else None,
                   rms_dp=math.sqrt(float(np.mean(s["dp"] ** 2))))
    return out
