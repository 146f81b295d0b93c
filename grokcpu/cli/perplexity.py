"""grok-cli perplexity: a quantized model against the exact one over the same text, as llama.cpp's
`llama-perplexity --kl-divergence`: both perplexities, KL(reference || model), top-1 agreement,
the largest logit error (the figures: grokcpu/perplexity.py)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from .. import perplexity as ppl
from ..demo import corpus_text
from ..errors import GrokError
from .app import Loaded, Run, command, err, gb, model_stats_line, out
from .generate import read_text_file

DEFAULT_CTX = 512


@command()
def perplexity(
    run: Run,
    reference: Annotated[Optional[Path], typer.Option(
        "--reference", show_default=False, help="the exact model (ckpt-0 folder or GGUF) to compare --model with")] = None,
    text_file: Annotated[Optional[Path], typer.Option(
        "--text", show_default=False, help="the text to score (default: the built-in demo corpus)")] = None,
    ctx: Annotated[Optional[int], typer.Option(
        "--ctx", show_default=False,
        help=f"tokens per chunk (default {DEFAULT_CTX}, or the models' sequence_len if smaller)")] = None,
    chunks: Annotated[Optional[int], typer.Option(
        "--chunks", show_default=False, help="score at most this many chunks (default: all the text holds)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of text")] = False,
):
    """Measure a model (e.g. a quantized GGUF) against the exact one: perplexity of both,
    KL divergence, top-1 agreement and logit error over the same text.

    The text is cut into chunks of --ctx tokens, each run as one prefill; the second half of
    each chunk is scored (every scored token sees at least ctx/2 tokens before it). The
    reference runs first and its logits wait in a temporary file, so only one model is in
    memory at a time. --unembed and --activations apply to --model; the reference runs exact."""
    if run.model is None or reference is None:
        raise GrokError("perplexity needs --model (the model to measure) and --reference (the exact one)",
                        hint="e.g. grok-cli perplexity --model grok-1-q4_k.gguf --reference grok-1/")
    if chunks is not None and chunks < 1:
        raise GrokError(f"--chunks {chunks} is out of range", hint="use an integer >= 1")
    text = read_text_file(text_file, "--text") if text_file is not None else corpus_text()
    tok, ctx, vocab = check_pair(run, reference, ctx)
    todo = ppl.make_chunks(tok.encode(text), ctx, chunks)
    # The reference runs over every chunk first, its float32 logits of the scored positions going
    # to a file (N x ctx/2 x V x 4 bytes), rather than both models chunk by chunk: then only one
    # model is ever in RAM, and each one's 'auto' expert cache may take what is free.
    run = dataclasses.replace(run, options=dataclasses.replace(run.options, context=run.options.context or ctx))
    with tempfile.TemporaryDirectory(prefix="grokcpu-perplexity-") as tmp:
        store = Path(tmp) / "reference-logits.f32"
        shape = (len(todo), ppl.scored(ctx), vocab)
        need, free = 4 * int(np.prod(shape)), shutil.disk_usage(tmp).free
        if need > free:
            raise GrokError(f"the reference's logits need {gb(need)} in {tmp}, which has {gb(free)} free",
                            hint="pass fewer --chunks, or point TMPDIR at a larger disk")
        # the options that trade accuracy for speed are --model's: the reference runs exact
        exact = dataclasses.replace(run, options=dataclasses.replace(run.options, unembed="f32", activations="f32"))
        with open(store, "wb") as f:
            ref_scores = one_model(exact, reference, "reference", todo, save=f)
        saved = np.memmap(store, np.float32, "r", shape=shape)
        scores = one_model(run, run.model, "model", todo, reference=saved)
        del saved                                   # unmapped before the folder goes
    res, ref = ppl.summary(scores), ppl.summary(ref_scores)
    err(f"perplexity: {chunk_count(len(todo))} of {ctx} tokens: reference {ref['seconds']:.2f} s "
        f"({ref['tokens_per_s']:.1f} tok/s), model {res['seconds']:.2f} s ({res['tokens_per_s']:.1f} tok/s)")
    doc = {"model": str(run.model), "reference": str(reference),
           "text": str(text_file) if text_file is not None else "demo corpus", "ctx": ctx, **res,
           "reference_seconds": ref["seconds"], "reference_tokens_per_s": ref["tokens_per_s"]}
    out(json.dumps(doc, indent=1) + "\n" if as_json else report(doc))


def check_pair(run: Run, reference: Path, ctx: int | None):
    """Before any weights are read: both models open and share one vocabulary, and --ctx fits
    them. Returns (the tokenizer, ctx, vocab size)."""
    import grokcpu
    from ..tokenizer import model_tokenizer
    configs = []
    for path in (run.model, reference):
        ck = grokcpu.open_checkpoint(path, weights=False)
        configs.append(ck.config)
        ck.close()
    vocab, ref_vocab = configs[0].vocab_size, configs[1].vocab_size
    if vocab != ref_vocab:
        raise GrokError(f"the models do not share a vocabulary: --model has {vocab} tokens, --reference {ref_vocab}",
                        hint="compare a model with the one it was quantized from")
    tok = model_tokenizer(run.model, run.tokenizer)
    if run.tokenizer is None and not tok.same_pieces(model_tokenizer(reference, None)):
        raise GrokError("the models' tokenizers differ (the same ids are other pieces)",
                        hint="compare a model with the one it was quantized from, or pass --tokenizer for both")
    tok.check_fits(vocab)
    seq = min(c.sequence_len for c in configs)
    ctx = min(DEFAULT_CTX, seq) if ctx is None else ctx
    if not 2 <= ctx <= seq:
        raise GrokError(f"--ctx {ctx} is out of range: the models' sequence_len is {seq}",
                        hint=f"use an integer from 2 to {seq}")
    if run.options.context is not None and ctx > run.options.context:
        raise GrokError(f"--ctx {ctx} is longer than --context {run.options.context}",
                        hint="leave --context out: the KV cache is sized to --ctx")
    return tok, ctx, vocab


def one_model(run: Run, path: Path, label: str, todo: np.ndarray, **score_kw) -> list[ppl.ChunkScore]:
    """Load one model, score every chunk (progress per chunk on stderr), close it."""
    L = Loaded(dataclasses.replace(run, model=path), need_tokenizer=False)
    try:
        L.warm()
        scores = []
        for c in ppl.score(L.model, todo, **score_kw):
            scores.append(c)
            s = ppl.summary(scores)
            kl = f", KL {s['kl_mean']:.6f}, top-1 {s['top1']:.2%}" if "kl_mean" in s else ""
            err(f"perplexity: {label} chunk {c.index + 1}/{len(todo)}: ppl {s['ppl']:.4f}{kl} "
                f"({c.tokens / c.seconds:.1f} tok/s)")
        if run.stats:
            err(f"stats: {label}: " + model_stats_line(L.model.stats()))
        return scores
    finally:
        L.model.close()


def chunk_count(n: int) -> str:
    return f"{n} chunk" if n == 1 else f"{n} chunks"


def report(d: dict) -> str:
    """The figures as a few aligned lines (the running figures were on stderr)."""
    def num(x, fmt):
        return "n/a" if x is None else format(x, fmt)
    rel = d["max_logit_diff_rel"]
    return "\n".join([
        f"model        {d['model']}",
        f"reference    {d['reference']}",
        f"text         {d['text']}: {chunk_count(d['chunks'])} of {d['ctx']} tokens, {d['scored_tokens']} scored "
        "(each chunk's second half)",
        f"PPL          model {d['ppl']:.4f}, reference {d['ppl_reference']:.4f}",
        f"KL           mean {d['kl_mean']:.6f} ± {num(d['kl_stderr'], '.6f')}, median {d['kl_median']:.6f}, "
        f"p99 {d['kl_p99']:.6f}, max {d['kl_max']:.6f}",
        f"top-1        {d['top1']:.2%} of positions agree",
        f"max |Δlogit| {d['max_logit_diff']:.4g} ({num(None if rel is None else 100 * rel, '.3g')} % of the "
        f"largest |reference logit|, {d['max_ref_logit']:.4g})",
        f"RMS Δp       {100 * d['rms_dp']:.3f} % (p of the next token)",
    ]) + "\n"
