"""A plain float64 numpy transcription of spec/GROK1.md §2, for checking the engine.

Deliberately simple and independent of grokcpu's kernels: full dequantized matrices,
full attention, every expert evaluated, no KV cache (decode = prefill of the longer sequence,
with the reference's decode mask for the last row).
"""

import numpy as np

from grokcpu.checkpoint import Checkpoint


def dequant(qw) -> np.ndarray:
    """A QWeight's float64 values (an array, e.g. decoded from a GGUF, is taken as it is)."""
    if isinstance(qw, np.ndarray):
        return qw.astype(np.float64)
    w = qw.w.astype(np.float64)
    s = qw.s.astype(np.float64)
    nb, R = s.shape[-2], w.shape[-2]
    return w * np.repeat(s, R // nb, axis=-2)


def rmsnorm(x, scale, eps):
    return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def rope(x, pos, base):            # x [T, H, d]
    d = x.shape[-1]
    inv = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ph = pos[:, None] * inv[None, :]                     # [T, d/2]
    c, s = np.cos(ph)[:, None, :], np.sin(ph)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def gelu(z):
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))


def forward(ck: Checkpoint, tokens, return_experts=False):
    """Logits [T, V] for every position of `tokens`, computed from scratch (prefill mask)."""
    c = ck.config
    tok = np.asarray(tokens)
    T = len(tok)
    emb = ck.embeddings.astype(np.float64)
    h = emb[tok] * c.embedding_multiplier_scale
    allow = np.tril(np.ones((T, T), bool)) & (tok > 0)[None, :]
    pos = np.arange(T, dtype=np.float64)
    H, G, d = c.num_q_heads, c.num_kv_heads, c.key_size
    experts = []
    for lw in ck.layers:
        x = rmsnorm(h, lw.attn_norm, c.rms_norm_eps)
        q = rope((x @ dequant(lw.wq)).reshape(T, H, d), pos, c.rope_base)
        k = rope((x @ dequant(lw.wk)).reshape(T, G, d), pos, c.rope_base)
        v = (x @ dequant(lw.wv)).reshape(T, G, d)
        kk = np.repeat(k, H // G, axis=1)
        vv = np.repeat(v, H // G, axis=1)
        s = np.einsum("thd,shd->hts", q, kk) * c.attn_output_multiplier
        s = c.attn_logit_cap * np.tanh(s / c.attn_logit_cap)
        s = np.where(allow[None], s, -1e30)
        s = s - s.max(-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", p, vv).reshape(T, H * d)
        h = h + rmsnorm(o @ dequant(lw.wo), lw.attn_post_norm, c.rms_norm_eps)
        x = rmsnorm(h, lw.moe_norm, c.rms_norm_eps)
        logits = x @ lw.router.astype(np.float64)
        pr = np.exp(logits - logits.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        idx = np.argsort(-pr, axis=-1, kind="stable")[:, : c.num_selected_experts]
        experts.append(idx)
        wg, wu, wd = dequant(lw.w_gate), dequant(lw.w_up), dequant(lw.w_down)
        m = np.zeros_like(h)
        for t in range(T):
            for e in idx[t]:
                m[t] += pr[t, e] * ((gelu(x[t] @ wg[e]) * (x[t] @ wu[e])) @ wd[e])
        h = h + rmsnorm(m, lw.moe_post_norm, c.rms_norm_eps)
    hf = rmsnorm(h, ck.final_norm, c.rms_norm_eps)
    out = (hf @ emb.T) * c.output_multiplier_scale
    if return_experts:
        return out, np.stack(experts)        # [L, T, k]
    return out
