"""The Grok-1 decoder: prefill and single-token decode through a KV cache.

Reads like spec/GROK1.md §2. Per layer:
    a = Attention(RMSNorm_0(h));  h += RMSNorm_1(a)
    m = MoE(RMSNorm_2(h));        h += RMSNorm_3(m)
then logits = RMSNorm_final(h) @ Emb.T * output_multiplier. Activations are float32; int8
weights are dequantized inside the kernels (decode) or in column tiles for BLAS (prefill).
"""

from __future__ import annotations

import numpy as np

from .backends import cpu
from .checkpoint import Checkpoint, LayerWeights
from .config import GrokConfig
from .errors import ContextFullError, GrokError
from .expert_cache import ExpertCache, budget_bytes
from .kernels import decode as KD
from .kernels import layers as K
from .options import Options, resolve_pins


class Model:
    """A loaded checkpoint, ready to run. Create sessions to generate."""

    def __init__(self, ckpt: Checkpoint, options: Options | None = None):
        options = Options.make() if options is None else options
        self.options = options
        threads, context = options.threads, options.context
        expert_cache_gb, expert_cache_policy = options.expert_cache_gb, options.expert_cache_policy
        prefetch, routing_trace = options.prefetch, options.routing_trace
        unembed, offload = options.unembed, options.offload
        pin_experts = resolve_pins(options.pin_experts, ckpt.config.num_layers, ckpt.config.num_experts)
        self.ckpt = ckpt
        self.config: GrokConfig = ckpt.config
        self.threads = cpu.set_threads(threads)
        c = self.config
        self.context = c.sequence_len if context is None else int(context)
        if not 1 <= self.context <= c.sequence_len:
            raise GrokError(f"context {self.context} is outside 1..{c.sequence_len}",
                            hint=f"pass a context length up to the model's sequence_len {c.sequence_len}")
        self.experts: ExpertCache | None = None
        self._decode_args: tuple | None = None
        self._resident_args: tuple | None = None
        if not (isinstance(expert_cache_gb, str) and expert_cache_gb.strip().lower() == "off"):
            budget = budget_bytes(expert_cache_gb, ckpt, self.context)
            # Under a budget smaller than the experts, file pages are dropped after each read so
            # RAM holds one copy; when everything fits, the page cache keeps them for the next run.
            self.experts = ExpertCache(ckpt, budget, policy=expert_cache_policy, prefetch=prefetch,
                                       drop_page_cache=budget < c.all_expert_bytes)
            if pin_experts:
                self.experts.pin(pin_experts)
        # "off": experts are read straight from the memory map and the kernel's page cache decides
        # what stays (the baseline the cache is measured against).
        self._trace_file = open(routing_trace, "a", encoding="utf-8") if routing_trace else None
        if unembed not in ("f32", "int8"):
            raise GrokError(f"unknown unembedding precision {unembed!r}", hint="choose f32 (exact) or int8")
        self.unembed = unembed
        # int8 copy of the tied embedding with per-row scales, for the output layer only:
        # 4x fewer bytes per token (Grok-1: 0.8 GB instead of 3.2 GB); the input lookup stays exact.
        self.unembed_q = cpu.quantize_embedding(ckpt.embeddings) if unembed == "int8" else None
        if offload not in ("none", "dense"):
            raise GrokError(f"unknown offload {offload!r}", hint="choose none or dense")
        self.offload = offload
        self.dense = None
        d = c.key_size
        self.inv_freq = (1.0 / (np.float32(c.rope_base) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
                         ).astype(np.float32)
        if offload == "dense":       # attention, norms, router, embeddings on the GPU; experts here
            from .backends.cuda import CudaDense
            self.dense = CudaDense(self)

    @property
    def layers(self) -> list[LayerWeights]:
        return self.ckpt.layers

    def decode_args(self) -> tuple[list[tuple], list[list[tuple]]]:
        """Decode's per-layer arguments, made once: the dense ones of `kernels.decode.attn_router`
        (norms [3, D]: attn_norm, attn_post_norm, moe_norm; q, k, v, o weights and scales; the
        router), and each expert's gate, up and down scales."""
        if self._decode_args is None:
            dense = [(np.stack([lw.attn_norm, lw.attn_post_norm, lw.moe_norm]), lw.wq.w, lw.wq.s,
                      lw.wk.w, lw.wk.s, lw.wv.w, lw.wv.s, lw.wo.w, lw.wo.s, lw.router) for lw in self.layers]
            scales = [[(lw.w_gate.s[e], lw.w_up.s[e], lw.w_down.s[e]) for e in range(self.config.num_experts)]
                      for lw in self.layers]
            self._decode_args = dense, scales
        return self._decode_args

    def resident_args(self) -> tuple | None:
        """`kernels.decode.resident_layers`'s per-layer arguments, made once: norms [L, 3, D], the
        attention weights, scales and routers as tuples by layer, the experts' scales [E, nb, F]
        by layer, then the MoE post norms [L, D]; None where a tuple's arrays are not all of one
        numba type (indexed by layer, they must be), and decode then goes layer by layer.

        Tuples, not numba typed lists: numba types a typed list argument by running Python (its
        `_numba_type_` property) inside the call and drops a KeyboardInterrupt raised there, so
        a Ctrl-C that landed in one of a token's 13 such lookups was lost and the answer ran to
        its end. A tuple of arrays is typed in C. The kernel compiles once per layer count
        (cached on disk)."""
        if self._resident_args is None:
            import numba
            dense, _ = self.decode_args()
            by_layer = [tuple(d[i] for d in dense) for i in range(1, 10)]
            by_layer += [tuple(getattr(lw, name).s for lw in self.layers) for name in ("w_gate", "w_up", "w_down")]
            uniform = all(len({numba.typeof(a) for a in t}) == 1 for t in by_layer)
            self._resident_args = (np.stack([d[0] for d in dense]), *by_layer,
                                   np.stack([lw.moe_post_norm for lw in self.layers])) if uniform else ()
        return self._resident_args or None

    def new_session(self) -> "Session":
        return Session(self)

    def stats(self) -> dict:
        out = {"threads": self.threads, "checkpoint_bytes": self.ckpt.nbytes, "unembed": self.unembed,
               "offload": self.offload}
        if self.dense is not None:
            out["gpu"] = {"device": self.dense.device_name, "bytes": self.dense.nbytes}
        if self.experts is not None:
            out["expert_cache"] = self.experts.stats.as_dict(self.experts)
        return out

    def close(self) -> None:
        if self.dense is not None:
            self.dense.close()
        if self.experts is not None:
            self.experts.close()
        if self._trace_file is not None:
            self._trace_file.close()
        self.ckpt.close()


class Session:
    """One sequence: its KV cache and position. `prefill` many tokens, then `decode` one at a time."""

    def __init__(self, model: Model):
        self.model = model
        c = model.config
        S = model.context
        # KV cache [L, G, S, d]; np.zeros maps lazily, so memory grows with use.
        self.k = np.zeros((c.num_layers, c.num_kv_heads, S, c.key_size), np.float32)
        self.v = np.zeros_like(self.k)
        self.key_ok = np.zeros(S, np.uint8)
        self.pos = 0
        self.tokens: list[int] = []
        self.trace: list | None = None   # set to [] to record (layer, expert ids [T,k], probs [T,E])
        self._all = np.ones(S, np.uint8)
        self._none = np.zeros(S, np.uint8)
        self._ws: KD.DecodeWorkspace | None = None    # decode's buffers, made on first use

    def reset(self) -> None:
        """Forget the sequence (keeps the buffers)."""
        n = self.pos
        self.k[:, :, :n] = 0.0
        self.v[:, :, :n] = 0.0
        self.key_ok[:n] = 0
        self.pos = 0
        self.tokens = []

    def truncate(self, n: int) -> None:
        """Keep the first n tokens and forget the rest (rewinds the KV cache to position n)."""
        n = int(n)
        if not 0 <= n <= self.pos:
            raise GrokError(f"cannot truncate a session of {self.pos} tokens to {n}")
        self.k[:, :, n:self.pos] = 0.0      # rows past the fill must read as zeros (see attention)
        self.v[:, :, n:self.pos] = 0.0
        self.key_ok[n:self.pos] = 0
        self.pos = n
        del self.tokens[n:]
        cache = getattr(self, "cuda_cache", None)
        if cache is not None and hasattr(cache, "truncate"):
            cache.truncate(n)

    def _check(self, token_ids) -> np.ndarray:
        toks = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        V = self.model.config.vocab_size
        if toks.size and (toks.min() < 0 or toks.max() >= V):
            bad = int(toks[(toks < 0) | (toks >= V)][0])
            raise GrokError(f"token id {bad} is outside the vocabulary 0..{V - 1}",
                            hint="the tokenizer does not fit this model")
        if self.pos + toks.size > self.model.context:
            raise ContextFullError(
                f"{self.pos + toks.size} tokens do not fit the context of {self.model.context}",
                hint="shorten the prompt or start a new session")
        return toks

    def prefill(self, token_ids, logits: str = "all", chunk: int = 512) -> np.ndarray:
        """Run the tokens through the model; return logits float32 [T, V] (or [V] with logits='last').

        From a fresh session this is exactly the reference's prefill (pad keys masked).
        Long inputs run in chunks of `chunk` tokens with the same result.
        """
        if logits not in ("all", "last"):
            raise GrokError(f"prefill(logits={logits!r}): expected 'all' or 'last'")
        if int(chunk) < 1:
            raise GrokError(f"prefill(chunk={chunk!r}): expected a positive number of tokens")
        toks = self._check(token_ids)
        T = toks.size
        if T == 0:
            raise GrokError("prefill needs at least one token")
        outs = []
        for i in range(0, T, chunk):
            part = toks[i:i + chunk]
            h = self._forward(part)
            if logits == "all" or i + chunk >= T:
                outs.append(self._logits(h if logits == "all" else h[-1:]))
        out = np.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
        return out if logits == "all" else out[-1]

    def decode(self, token_id: int) -> np.ndarray:
        """Feed one token at the next position; return the next-token logits float32 [V]."""
        toks = self._check([token_id])
        if self.model.dense is None:
            h = _decode_one(self.model, self, int(toks[0]))
        else:
            h = _forward(self.model, [self], toks, decode=True)
        return self._logits(h)[0]

    def _forward(self, toks: np.ndarray) -> np.ndarray:
        return _forward(self.model, [self], toks, decode=False)

    def _logits(self, hf: np.ndarray) -> np.ndarray:
        m = self.model
        if m.dense is not None:
            return m.dense.logits(hf)
        if m.unembed_q is not None:
            return cpu.unembed_q8(hf, *m.unembed_q, m.config.output_multiplier_scale)
        return cpu.unembed(hf, m.ckpt.embeddings, m.config.output_multiplier_scale)


def decode_batch(sessions: list[Session], token_ids) -> np.ndarray:
    """One decode step for several sessions at once: logits float32 [B, V].

    Every weight is read once for the whole batch (the rows share the matrix products; each
    row attends over its own session's cache). Same results as `s.decode(t)` one by one, up to
    float32 summation order.
    """
    if len(sessions) != len(token_ids):
        raise GrokError("decode_batch needs one token per session")
    if not sessions:
        return np.empty((0, 0), np.float32)
    model = sessions[0].model
    if any(s.model is not model for s in sessions) or len(set(map(id, sessions))) != len(sessions):
        raise GrokError("decode_batch needs distinct sessions of one model")
    toks = np.concatenate([s._check([t]) for s, t in zip(sessions, token_ids)])
    h = _forward(model, sessions, toks, decode=True)
    return sessions[0]._logits(h)


def _forward(m: Model, sessions: list[Session], toks: np.ndarray, decode: bool) -> np.ndarray:
    """Run rows of tokens through the decoder; return the final-normed hidden states [T, D].

    Either one session with T consecutive tokens (prefill, or a decode step when T == 1), or
    one decode token for each of B sessions (rows share every weight read).
    """
    with cpu.blas_phase(toks.size):
        return _forward_rows(m, sessions, toks, decode)


def _forward_rows(m: Model, sessions: list[Session], toks: np.ndarray, decode: bool) -> np.ndarray:
    c = m.config
    T = toks.size
    eps = c.rms_norm_eps
    H, G, d = c.num_q_heads, c.num_kv_heads, c.key_size
    single = len(sessions) == 1
    if single:
        s0 = sessions[0]
        pos = s0.pos + np.arange(T, dtype=np.int64)
        rows = [(s0, 0, T)]
    else:
        pos = np.array([s.pos for s in sessions], dtype=np.int64)
        rows = [(s, b, 1) for b, s in enumerate(sessions)]
    for s, r0, n in rows:
        s.key_ok[s.pos:s.pos + n] = toks[r0:r0 + n] > c.pad_token
    if m.dense is not None:          # the GPU runs the dense part; experts come back to the CPU
        key_oks = [((s._all if toks[r0] > c.pad_token else s._none) if decode else s.key_ok)
                   for s, r0, n in rows]
        h = m.dense.forward_batch(sessions, toks, key_oks, m.dense.cpu_moe_fn(), rows=[n for _, _, n in rows])
        for s, r0, n in rows:
            s.pos += n
            s.tokens.extend(int(t) for t in toks[r0:r0 + n])
        return h
    cos = np.empty((T, d // 2), np.float32)
    sin = np.empty((T, d // 2), np.float32)
    K.rope_tables(m.inv_freq, pos, cos, sin)
    cache = m.experts
    if cache is not None:
        cache.next_step()

    h = np.asarray(m.ckpt.embeddings[toks], dtype=np.float32) * np.float32(c.embedding_multiplier_scale)
    x = np.empty_like(h)
    attn = np.empty((T, H, d), np.float32)
    scores = np.empty((H, int(pos.max()) + 1), np.float32)
    k_top = c.num_selected_experts
    idx, gate, probs = np.empty((T, k_top), np.int64), np.empty((T, k_top), np.float32), \
        np.empty((T, c.num_experts), np.float32)
    xg, idx_g, gate_g, probs_g = np.empty_like(x), np.empty_like(idx), np.empty_like(gate), np.empty_like(probs)
    mult, cap, n_uniform = np.float32(c.attn_output_multiplier), np.float32(c.attn_logit_cap), \
        np.float32(c.sequence_len)
    for li, lw in enumerate(m.layers):
        # -- attention block: h += RMSNorm_1(Attention(RMSNorm_0(h)))
        K.rmsnorm(h, lw.attn_norm, eps, x)
        q = cpu.qmatmul(x, lw.wq, "q").reshape(T, H, d)
        k = cpu.qmatmul(x, lw.wk, "k").reshape(T, G, d)
        v = cpu.qmatmul(x, lw.wv, "v").reshape(T, G, d)
        K.rope(q, cos, sin)
        K.rope(k, cos, sin)
        for s, r0, n in rows:
            p0 = s.pos
            s.k[li, :, p0:p0 + n] = k[r0:r0 + n].transpose(1, 0, 2)
            s.v[li, :, p0:p0 + n] = v[r0:r0 + n].transpose(1, 0, 2)
            if decode:   # reference quirk: a pad query masks every key; cached pads are not re-checked
                key_ok = s._all if toks[r0] > c.pad_token else s._none
            else:
                key_ok = s.key_ok
            K.attention(q[r0:r0 + n], s.k[li], s.v[li], p0, key_ok, mult, cap, n_uniform,
                        attn[r0:r0 + n], scores, cpu._nparts())
        a = cpu.qmatmul(attn.reshape(T, H * d), lw.wo, "o")
        K.add_rmsnorm(h, a, lw.attn_post_norm, eps)
        # -- MoE block: h += RMSNorm_3(MoE(RMSNorm_2(h)))
        K.rmsnorm(h, lw.moe_norm, eps, x)
        K.route(x, lw.router, k_top, idx, gate, probs)
        if single and s0.trace is not None:
            s0.trace.append((li, idx.copy(), probs.copy()))
        if m._trace_file is not None:
            for t in range(T):
                _trace_write(m, int(pos[t]), li, idx[t].tolist())
        if cache is not None:
            cache.request([(li, int(e)) for e in np.unique(idx)])       # all misses in flight at once
            _guess_next_layer(m, li, h, xg, idx_g, gate_g, probs_g, only_if_idle=decode)
        moe = cpu.moe(x, lw, idx, gate, cache, li)
        K.add_rmsnorm(h, moe, lw.moe_post_norm, eps)
    if m._trace_file is not None:
        m._trace_file.flush()
    for s, r0, n in rows:
        s.pos += n
        s.tokens.extend(int(t) for t in toks[r0:r0 + n])
    K.rmsnorm(h, m.ckpt.final_norm, eps, h)
    return h


def _trace_write(m: Model, pos: int, layer: int, experts: list) -> None:
    """One line of the routing trace (--routing-trace; read back by `replay.read_trace`)."""
    m._trace_file.write(f'{{"pos": {pos}, "layer": {layer}, "experts": {experts}}}\n')


def _guess_next_layer(m: Model, li: int, h, xg, idx_g, gate_g, probs_g, only_if_idle: bool) -> None:
    """With prefetch on: guess layer li+1's experts from the residual h after layer li's
    attention (its MoE norm and router, into the given buffers), and start reading them."""
    cache = m.experts
    if li + 1 < len(m.layers) and cache.prefetch_enabled:
        nxt = m.layers[li + 1]
        K.rmsnorm(h, nxt.moe_norm, m.config.rms_norm_eps, xg)
        K.route(xg, nxt.router, idx_g.shape[1], idx_g, gate_g, probs_g)
        cache.prefetch([(li + 1, int(e)) for e in np.unique(idx_g)], only_if_idle=only_if_idle)


def _decode_one(m: Model, s: Session, tok: int) -> np.ndarray:
    """One decode token of one session on the CPU: the same arithmetic as `_forward_rows`
    with T = 1 (bitwise), in three compiled calls per layer on the session's workspace, or
    (with the expert cache, prefetch off) in one call for every run of layers whose experts
    are all resident (`kernels.decode.resident_layers`)."""
    c = m.config
    ws = s._ws
    if ws is None:
        ws = s._ws = KD.DecodeWorkspace(c, m.context, cpu._nparts(), cpu.pair_parts())
    if ws.kv_of is not s.k:                               # per-layer views of the KV cache
        ws.layer_kv = [(s.k[li], s.v[li]) for li in range(c.num_layers)]
        ws.kv_of = s.k
    dense, scales = m.decode_args()
    eps = c.rms_norm_eps
    pos = s.pos
    s.key_ok[pos] = tok > c.pad_token
    key_ok = s._all if tok > c.pad_token else s._none    # reference quirk, as in _forward_rows
    ws.pos[0] = pos
    K.rope_tables(m.inv_freq, ws.pos, ws.cos, ws.sin)
    cache = m.experts
    if cache is not None:
        cache.next_step()
    h = ws.h
    np.multiply(m.ckpt.embeddings[tok], np.float32(c.embedding_multiplier_scale), out=h[0])
    attn_bufs = (ws.q, ws.kv, ws.attn, ws.a, ws.scores, ws.part_q, ws.part_kv, ws.part_o)
    moe_bufs = (ws.gu, ws.ys, ws.gates, ws.part_f, ws.part_d, ws.moe)
    by_layer = m.resident_args() if cache is not None and not cache.prefetch_enabled else None
    L = c.num_layers
    li = 0
    while li < L:
        if by_layer is not None:
            stop = KD.resident_layers(li, h, ws.x, *by_layer[:10], ws.cos, ws.sin, s.k, s.v, pos, key_ok, eps,
                                      ws.consts, *attn_bufs, ws.idx_all, ws.gate_all, ws.probs_all,
                                      cache.pool_view, cache.slot_of, *by_layer[10:], *moe_bufs, ws.whole, ws.gus)
            for lj in range(li, stop):
                _note_routing(m, s, pos, lj, ws)
            cache.note_used([(lj, e) for lj in range(li, stop) for e in sorted(ws.idx_all[lj].tolist())])
            if stop == L:
                break
            li = stop                        # its attention and routing are done; its MoE is ours
        else:
            KD.attn_router(h, ws.x, *dense[li], ws.cos, ws.sin, *ws.layer_kv[li], pos, key_ok, eps, ws.consts,
                           *attn_bufs, ws.idx_all[li:li + 1], ws.gate_all[li:li + 1], ws.probs_all[li:li + 1])
        _note_routing(m, s, pos, li, ws)
        _decode_moe(m, li, ws, scales)
        li += 1
    if m._trace_file is not None:
        m._trace_file.flush()
    s.pos += 1
    s.tokens.append(tok)
    out = h.copy()
    K.rmsnorm(out, m.ckpt.final_norm, eps, out)
    return out


def _note_routing(m: Model, s: Session, pos: int, li: int, ws) -> None:
    """Record layer li's routing in the session's trace and the --routing-trace file."""
    if s.trace is not None:
        s.trace.append((li, ws.idx_all[li:li + 1].copy(), ws.probs_all[li:li + 1].copy()))
    if m._trace_file is not None:
        _trace_write(m, pos, li, ws.idx_all[li].tolist())


def _decode_moe(m: Model, li: int, ws, scales) -> None:
    """Layer li's MoE block of a decode token, its routing in the workspace: the experts through
    the cache (missing ones read now, resident ones computed first), summed in expert order."""
    lw = m.layers[li]
    cache = m.experts
    x, gu, ys, part_f, part_d = ws.x[0], ws.gu, ws.ys, ws.part_f, ws.part_d
    chosen = sorted(zip(ws.idx_all[li].tolist(), ws.gate_all[li].tolist()))   # summed in expert order
    experts = [e for e, _ in chosen]
    ws.gates[:] = [gt for _, gt in chosen]
    order = experts
    if cache is not None:
        cache.request([(li, e) for e in experts])
        _guess_next_layer(m, li, ws.h, ws.xg, ws.idx_g, ws.gate_g, ws.probs_g, only_if_idle=True)
        order = cache.ready_first(li, experts)
    for e in order:
        j = experts.index(e)
        sg, su, sd = scales[li][e]
        if cache is None:
            KD.expert(x, lw.w_gate.w[e], sg, lw.w_up.w[e], su, lw.w_down.w[e], sd, False,
                      gu, ys[j], part_f, part_d)
            continue
        wg, wu, wd = cache.acquire(li, e)
        try:
            KD.expert(x, wg, sg, wu, su, wd, sd, True, gu, ys[j], part_f, part_d)
        finally:
            cache.release(li, e)
    KD.moe_finish(ws.h, ys, ws.gates, lw.moe_post_norm, m.config.rms_norm_eps, ws.moe)
