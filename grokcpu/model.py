"""The Grok-1 decoder: one forward pass, in the order of spec/GROK1.md §2.

    h = Emb[tokens] * embedding_multiplier
    per layer:
        h += RMSNorm_1(Attention(RMSNorm_0(h)))          K/V of the new tokens into the cache
        x = RMSNorm_2(h);  top-2 of softmax(x @ router)
        h += RMSNorm_3(sum_j gate_j * Expert_j(x))        experts through the expert cache
    logits = RMSNorm_final(h) @ Emb.T * output_multiplier

`forward` is that loop, once, for every caller: prefill (one session, T tokens), decode (one
session, one token) and `decode_batch` (one token of each of B sessions). Each block is a call
on the model's backend (`backends/cpu.py`, or `backends/cuda.py` under offload="dense"), so the
routing trace, expert prefetch, finite checks and statistics are the same on every backend.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from .backends import cpu
from .checkpoint import Checkpoint, LayerWeights, QWeight
from .config import GrokConfig
from .errors import CheckpointError, GrokError
from .expert_cache import ExpertCache, budget_bytes
from .kv_cache import KVCache
from .options import OptionError, Options, resolve_pins
from .trace import TraceWriter


class Model:
    """A loaded checkpoint, ready to run. Create sessions to generate; `close()` when done."""

    def __init__(self, ckpt: Checkpoint, options: Options | None = None):
        self.ckpt = ckpt
        self.config: GrokConfig = ckpt.config
        self.options = options = Options.make() if options is None else options
        c = self.config
        self.threads = cpu.usable_threads(options.threads)
        self.context = c.sequence_len if options.context is None else options.context
        if self.context > c.sequence_len:
            raise OptionError("context", f"{{name}} {self.context} is longer than the model's sequence_len "
                              f"{c.sequence_len}", hint=f"use a context of at most {c.sequence_len}")
        _check_kv_fits(c, self.context)
        pins = resolve_pins(options.pin_experts, c.num_layers, c.num_experts)
        self._lock = threading.RLock()      # one forward at a time: kernels use every core already
        self._closed = False
        self.experts: ExpertCache | None = None
        self.trace: TraceWriter | None = None
        self.backend = None
        try:
            gguf = getattr(ckpt, "format", "ckpt-0") == "gguf"
            if gguf:
                _gguf_options(options)
            if options.expert_cache_gb != "off":
                budget = budget_bytes(options.expert_cache_gb, ckpt, self.context)
                # Under a budget smaller than the experts, misses bypass the page cache (or their
                # file pages are dropped) so RAM holds one copy; when all fit, the page cache
                # keeps them for the next run.
                every = c.num_layers * c.num_experts * ckpt.expert_bytes
                self.experts = ExpertCache(ckpt, budget, policy=options.expert_cache_policy,
                                           prefetch=options.prefetch, drop_page_cache=budget < every,
                                           reads=options.expert_reads)
                if pins:
                    self.experts.pin(pins)
            elif pins:
                raise OptionError("pin_experts", "{name} needs the expert cache",
                                  hint="drop expert_cache_gb='off' (--expert-cache-gb off) or the pins")
            # weights read through the map (a GGUF's dense matrices, experts without the cache):
            # a file that shrank would be a SIGBUS, so each step checks first
            self.mapped = gguf or self.experts is None
            if options.routing_trace is not None:
                self.trace = TraceWriter(options.routing_trace)
            if options.offload == "dense":
                from .backends.cuda import CudaBackend
                self.backend = CudaBackend(self)
            else:
                self.backend = cpu.CpuBackend(self)
        except BaseException:
            self.close()
            raise

    @property
    def layers(self) -> list[LayerWeights]:
        return self.ckpt.layers

    def new_session(self) -> "Session":
        self._check_open()
        return Session(self)

    def stats(self) -> dict:
        out = {"threads": self.threads, "checkpoint_bytes": self.ckpt.nbytes, "unembed": self.options.unembed,
               "activations": self.options.activations, "offload": self.options.offload}
        gpu = getattr(self.backend, "device_name", None)
        if gpu is not None:
            out["gpu"] = {"device": gpu, "bytes": self.backend.nbytes}
        if self.experts is not None:
            out["expert_cache"] = self.experts.stats.as_dict(self.experts)
        return out

    def close(self) -> None:
        """Free the expert cache, GPU memory and files. The model cannot run afterwards."""
        if self._closed:
            return
        self._closed = True
        for part in (self.backend, self.experts, self.trace):
            if part is not None and hasattr(part, "close"):
                part.close()
        self.ckpt.close()

    def _check_open(self) -> None:
        if self._closed:
            raise GrokError("this model has been closed", hint="load it again with grokcpu.load")


class Session:
    """One sequence: its KV cache. `prefill` many tokens, then `decode` one at a time."""

    def __init__(self, model: Model):
        self.model = model
        self.kv = KVCache(model.backend, model.config, model.context)
        self.ws = model.backend.workspace(self.kv)
        self.trace: list | None = None   # set to [] to record (layer, expert ids [T, k], probs [T, E])

    @property
    def pos(self) -> int:
        return self.kv.pos

    @property
    def tokens(self) -> list[int]:
        return self.kv.tokens

    def reset(self) -> None:
        """Forget the sequence (keeps the buffers)."""
        self.kv.reset()

    def truncate(self, n: int) -> None:
        """Keep the first n tokens and forget the rest."""
        self.kv.truncate(n)

    def prefill(self, token_ids, logits: str = "all", chunk: int = 512) -> np.ndarray:
        """Run the tokens through the model; return logits float32 [T, V] (or [V] with logits='last').

        From a fresh session this is exactly the reference's prefill (pad keys masked). Long
        inputs run in chunks of `chunk` tokens with the same result.
        """
        if logits not in ("all", "last"):
            raise GrokError(f"prefill(logits={logits!r}): expected 'all' or 'last'")
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise GrokError(f"prefill(chunk={chunk!r}): expected a positive whole number of tokens")
        toks = _token_ids(token_ids, self.model.config.vocab_size)
        if toks.size == 0:
            raise GrokError("prefill needs at least one token")
        self.kv.check_room(toks.size)
        outs = []
        for i in range(0, toks.size, chunk):
            part = toks[i:i + chunk]
            hf = forward(self.model, Step([self], part, decode=False))
            if logits == "all" or i + chunk >= toks.size:
                outs.append(self.model.backend.logits(hf if logits == "all" else hf[-1:], self.ws))
        out = np.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
        return out if logits == "all" else out[-1]

    def decode(self, token_id) -> np.ndarray:
        """Feed one token at the next position; return the next-token logits float32 [V]."""
        tok = _token_id(token_id, self.model.config.vocab_size)
        self.kv.check_room(1)
        hf = forward(self.model, Step([self], np.array([tok], np.int64), decode=True))
        return self.model.backend.logits(hf, self.ws)[0]


def decode_batch(sessions: list[Session], token_ids) -> np.ndarray:
    """One decode step for several sessions at once: logits float32 [B, V].

    Every weight is read once for the whole batch (the rows share the products; each row
    attends over its own session's cache). One session gives exactly `s.decode(t)`; several,
    the same up to float32 summation order.
    """
    sessions = list(sessions)
    if not sessions:
        return np.empty((0, 0), np.float32)
    model = sessions[0].model
    if any(not isinstance(s, Session) or s.model is not model for s in sessions) or \
            len(set(map(id, sessions))) != len(sessions):
        raise GrokError("decode_batch needs distinct sessions of one model")
    if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__len__") or len(token_ids) != len(sessions):
        raise GrokError("decode_batch needs one token id per session")
    toks = np.array([_token_id(t, model.config.vocab_size) for t in token_ids], np.int64)
    for s in sessions:
        s.kv.check_room(1)
    hf = forward(model, Step(sessions, toks, decode=True))
    return model.backend.logits(hf, sessions[0].ws)


class Step:
    """The rows of one forward pass: one session's consecutive tokens, or one token of each of
    several sessions. segments: (kv cache, first row, row count, key mask) per session."""

    def __init__(self, sessions: list[Session], toks: np.ndarray, decode: bool):
        self.sessions = sessions
        self.toks = toks
        self.T = toks.size
        self.decode = decode
        self.ws = sessions[0].ws
        if len(sessions) == 1:
            kv = sessions[0].kv
            self.pos = kv.pos + np.arange(self.T, dtype=np.int64)
            self.segments = [(kv, 0, self.T, kv.key_mask(toks, decode))]
        else:
            self.pos = np.array([s.kv.pos for s in sessions], np.int64)
            self.segments = [(s.kv, b, 1, s.kv.key_mask(toks[b:b + 1], decode)) for b, s in enumerate(sessions)]
        self.trace = sessions[0].trace if len(sessions) == 1 else None


def forward(model: Model, step: Step) -> np.ndarray:
    """Run the step's tokens through the decoder (spec §2); return the final-normed hidden
    states [T, D] and move each session past its tokens."""
    model._check_open()
    be, cache, L = model.backend, model.experts, model.config.num_layers
    with model._lock, be.running(step):
        try:
            if cache is not None:
                cache.next_step()
            if model.mapped:
                model.ckpt.check_intact()
            h = be.embed(step)
            for li in range(L):
                be.attention(li, h, step)                       # h += RMSNorm_1(Attn(RMSNorm_0(h)))
                x, idx, gate, probs = be.route(li, h, step)      # x = RMSNorm_2(h); top-k experts
                experts = sorted(set(idx.ravel().tolist()))
                if experts[0] < 0:                              # NaN/Inf in x: no expert wins
                    _not_finite(model, li, step)
                _note_routing(model, step, li, idx, probs)
                if cache is not None:
                    _fetch_experts(model, li, experts, h, step)
                be.moe(li, h, x, idx, gate, step)              # h += RMSNorm_3(MoE(x))
            hf = be.final(h, step)
            if not math.isfinite(hf.sum(dtype=np.float64)):     # NaN and Inf survive the sum
                _not_finite(model, L, step)
        except BaseException:
            for kv, _, n, _ in step.segments:                   # keep rows past the fill empty
                kv.discard(n)
            raise
        finally:
            if model.trace is not None:
                model.trace.flush()
        for kv, r0, n, _ in step.segments:
            kv.advance(step.toks[r0:r0 + n])
    return hf


def _gguf_options(options: Options) -> None:
    """What a GGUF model cannot do yet, as one-line errors."""
    if options.offload != "none":
        raise OptionError("offload", "{name} dense runs ckpt-0 models only: GGUF matrices are not on the GPU",
                          hint="leave it at none for a GGUF model")


def _note_routing(model: Model, step: Step, li: int, idx: np.ndarray, probs: np.ndarray) -> None:
    """Layer li's routing into the session's trace list and the routing-trace file."""
    if step.trace is not None:
        step.trace.append((li, idx.copy(), probs.copy()))
    if model.trace is not None:
        model.trace.write(step.pos, li, idx)


def _fetch_experts(model: Model, li: int, experts: list, h, step: Step) -> None:
    """Start reading every expert layer li needs (all misses in flight at once) and guess layer
    li+1's from the residual h, starting those reads too: always in a prefill chunk of several
    tokens (they use most of a layer's experts, so the guesses are mostly right and the reads
    overlap this layer's compute), otherwise only with prefetch on (in decode a wrong guess
    costs a needed read)."""
    cache = model.experts
    cache.request([(li, e) for e in experts])
    chunk = not step.decode and step.T > 1
    if (cache.prefetch_enabled or chunk) and li + 1 < model.config.num_layers:
        guess = model.backend.guess(li + 1, h, step)
        cache.prefetch([(li + 1, e) for e in sorted(set(guess.ravel().tolist()))], only_if_idle=step.decode,
                       force=chunk)


def _not_finite(model: Model, li: int, step: Step) -> None:
    """NaN or Inf in the activations before layer li's experts (li = L: after the last layer)
    means a damaged checkpoint: raise, naming the tensor it came from."""
    where = "after the last layer" if li == model.config.num_layers else f"before layer {li}'s experts"
    culprit = _nonfinite_weight(model, li, step)
    raise CheckpointError(
        f"the activations became NaN/Inf {where}"
        + (f": {culprit} holds NaN or Inf values" if culprit else " (they overflowed float32)"),
        hint="the checkpoint is damaged: verify it (grok-cli info --verify) or download it again")


def _nonfinite_weight(model: Model, li: int, step: Step) -> str | None:
    """The first weight that the activations of layer li passed through holding NaN/Inf."""
    layers = model.layers
    cands = [("the embedding", model.ckpt.embedding_rows(np.unique(step.toks)))]
    for lj in range(min(li + 1, len(layers))):
        lw = layers[lj]
        cands += [(f"layer {lj}'s {name}", getattr(lw, name)) for name in ("attn_norm", "attn_post_norm", "moe_norm")]
        cands += [(f"layer {lj}'s {name} scales", getattr(lw, name).s) for name in ("wq", "wk", "wv", "wo")
                  if isinstance(getattr(lw, name), QWeight)]           # a GGUF's block scales are not checked
        cands.append((f"layer {lj}'s router", lw.router))
        if lj < li:
            cands += [(f"layer {lj}'s {name} scales", getattr(lw, name).s) for name in ("w_gate", "w_up", "w_down")
                      if isinstance(getattr(lw, name), QWeight)]
            cands.append((f"layer {lj}'s moe_post_norm", lw.moe_post_norm))
    if li == len(layers):
        cands.append(("the final norm", model.ckpt.final_norm))
    for name, a in cands:
        if not np.isfinite(np.asarray(a, dtype=np.float32)).all():
            return name
    return None


def _check_kv_fits(c: GrokConfig, context: int) -> None:
    """One session's KV cache must fit in this machine's RAM (it is allocated lazily)."""
    import psutil
    need, total = c.kv_cache_bytes(context), psutil.virtual_memory().total
    if need > total:
        raise OptionError("context", f"{{name}} {context}: one session's KV cache would take {need / 1e9:.1f} GB, "
                          f"more than this machine's {total / 1e9:.1f} GB of RAM",
                          hint=f"use a shorter context (at most {max(1, context * total // need // 2)})")


def _token_id(value, vocab: int) -> int:
    """One token id: a Python or numpy integer in 0..vocab-1."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise GrokError(f"a token id must be an integer, not {_describe(value)}",
                        hint="pass one int (decode) or a sequence of ints (prefill)")
    if not 0 <= value < vocab:
        raise GrokError(f"token id {_clip(value)} is outside the vocabulary 0..{vocab - 1}",
                        hint="the tokenizer does not fit this model")
    return int(value)


def _token_ids(values, vocab: int) -> np.ndarray:
    """A 1-D sequence of token ids (ints or numpy integers) as int64, every one checked."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or values.dtype.kind not in "iu":
            raise GrokError(f"token ids must be a 1-D integer array, not {values.dtype} with shape {values.shape}",
                            hint="pass a list of ints")
        if values.size and (values.min() < 0 or values.max() >= vocab):
            bad = values[(values < 0) | (values >= vocab)][0]
            raise GrokError(f"token id {_clip(bad)} is outside the vocabulary 0..{vocab - 1}",
                            hint="the tokenizer does not fit this model")
        return values.astype(np.int64)
    if isinstance(values, (str, bytes, dict, set)) or not hasattr(values, "__iter__"):
        raise GrokError(f"token ids must be a sequence of ints, not {_describe(values)}",
                        hint="pass a list of ints, e.g. [1, 422, 2198]")
    return np.array([_token_id(v, vocab) for v in values], np.int64)


def _describe(value) -> str:
    return f"a {type(value).__name__}" if not isinstance(value, (int, float)) else f"{_clip(value)}"


def _clip(value) -> str:
    r = repr(value) if not isinstance(value, int) or value.bit_length() < 200 else "a huge integer"
    return r if len(r) <= 40 else r[:37] + "..."
