"""One decode token's blocks in a few compiled calls on a preallocated workspace (the CPU
backend's one-row path): the attention block and the router in one call, each routed expert in
one (or, with 1 or 2 threads and the experts resident, all of them in one region:
`experts_whole`), and one call to finish the MoE block. A token's many short products would
otherwise pay Python's argument checks and small allocations per call. The arithmetic is the
kernels of the many-row path in the same order, or kernels bitwise theirs.
"""

import numpy as np
from numba import njit, prange

from .layers import add_rmsnorm, attention, gelu_mul, rmsnorm, rope, route
from .matvec import _out_group, _range_into, _split, qmatvec, qmatvec_multi, qmatvec_qkv, qmatvec_t


@njit(cache=True, nogil=True)
def attn_block(h, x, norms, wq, sq, wk, sk, wv, sv, wo, so, cos, sin, kc, vc, pos,
               key_ok, eps, consts, q, kv, attn, a, scores, part_q, part_kv, part_o):
    """h[1, D] += RMSNorm_1(Attention(RMSNorm_0(h))) for the token at `pos`, its key and value
    written into kc/vc [G, S, d].

    norms [3, D]: the layer's attn_norm, attn_post_norm and moe_norm. consts float32: the
    attention multiplier, the logit cap, the uniform-softmax row count. kv [2, G*d]: the new
    key and value, made with the query in one region (qmatvec_qkv; part_kv [2, P, G*d],
    part_q [P, H*d]: P is the thread count).
    """
    mult, cap, n_uniform = consts[0], consts[1], consts[2]
    H, d = q.shape[1], q.shape[2]
    G = kc.shape[0]
    rmsnorm(h, norms[0], eps, x)
    qmatvec_qkv(x[0], wq, sq, wk, sk, wv, sv, q.reshape(H * d), kv, part_q, part_kv)
    k = kv[0].reshape(1, G, d)
    rope(q, cos, sin)
    rope(k, cos, sin)
    kc[:, pos, :] = k[0]
    vc[:, pos, :] = kv[1].reshape(G, d)
    attention(q, kc, vc, pos, key_ok, mult, cap, n_uniform, attn, scores, part_q.shape[0])
    qmatvec(attn.reshape(H * d), wo, so, a[0], part_o)
    add_rmsnorm(h, a, norms[1], eps)


@njit(cache=True, nogil=True)
def attn_route(h, x, norms, wq, sq, wk, sk, wv, sv, wo, so, router, cos, sin, kc, vc, pos, key_ok, eps, consts,
               q, kv, attn, a, scores, part_q, part_kv, part_o, xr, idx, gate, probs):
    """attn_block, then xr = RMSNorm_2(h) and the router's top-k into idx/gate (probs: the
    softmax): a decode layer's attention and routing in one call."""
    attn_block(h, x, norms, wq, sq, wk, sk, wv, sv, wo, so, cos, sin, kc, vc, pos, key_ok, eps, consts,
               q, kv, attn, a, scores, part_q, part_kv, part_o)
    rmsnorm(h, norms[2], eps, xr)
    route(xr, router, idx.shape[1], idx, gate, probs)


@njit(cache=True, nogil=True)
def expert(x, wg, sg, wu, su, wd, sd, down_t, gu, y, part_f, part_d):
    """y[D] = down(gelu(x @ gate) * (x @ up)) for one token: gate/up [D, F] input-major (one
    qmatvec_multi into gu [2, F], part_f [2, Q, F]); down output-major [D, F] (the expert
    cache's layout) when down_t, else [F, D] as in the file."""
    qmatvec_multi(x, (wg, wu), (sg, su), gu, part_f)
    gelu_mul(gu[0], gu[1])
    if down_t:
        qmatvec_t(gu[0], wd, sd, y)
    else:
        qmatvec(gu[0], wd, sd, y, part_d)


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def experts_whole(x, pool, slots, es, sg, su, sd, gus, ys):
    """ys[j] = expert es[j] of x[D] for each j, its weights in pool slot slots[j] (the expert
    cache's layout, down output-major); sg, su [E, nb, F] and sd [E, nb, D] a layer's scales,
    gus [k, 2, F] scratch. One work item per expert: a thread runs gate, up, GELU and down of
    its expert with no barrier between them, where `expert` takes four parallel regions.

    For 1 or 2 threads with Grok's two experts (`DecodeWorkspace.whole`). Bitwise `expert`'s
    result when its gate/up take one row range per matrix (pair_parts 1); the down product does
    not depend on its split.
    """
    D = x.shape[0]
    F = gus.shape[2]
    wide, chunk, _ = _split(D, F, 1)
    for j in prange(slots.shape[0]):
        slot = pool[slots[j]].reshape(3, D, F)
        e = es[j]
        g, u = gus[j, 0], gus[j, 1]
        _range_into(x, slot[0], sg[e], g, 0, D, chunk, wide)
        _range_into(x, slot[1], su[e], u, 0, D, chunk, wide)
        gelu_mul(g, u)
        for c in range((D + 7) // 8):
            _out_group(g, slot[2], sd[e], ys[j], c)


@njit(cache=True, nogil=True)
def moe_resident(x, idx, gate, pool, slot_of, sg, su, sd, gus, ys, es, gates, slots, h, norm, eps, out):
    """A decode layer's MoE block, h[1, D] += RMSNorm_3(sum_j gate[j] * expert_idx[j](x)), when
    every routed expert is in the expert cache (slot_of [E]: a layer's slots, -1 if absent):
    experts_whole, then moe_finish, experts in id order. Returns False, with nothing done, when
    one is not resident. es, gates: the experts and their gates in id order; slots: theirs."""
    k = idx.shape[0]
    for j in range(k):                       # insertion sort by expert id
        e, g = idx[j], gate[j]
        i = j
        while i > 0 and es[i - 1] > e:
            es[i] = es[i - 1]
            gates[i] = gates[i - 1]
            i -= 1
        es[i] = e
        gates[i] = g
    for j in range(k):
        slots[j] = slot_of[es[j]]
        if slots[j] < 0:
            return False
    experts_whole(x, pool, slots, es, sg, su, sd, gus, ys)
    moe_finish(h, ys, gates, norm, eps, out)
    return True


@njit(cache=True, nogil=True)
def moe_resident_attn(x, idx, gate, pool, slot_of, sg, su, sd, gus, ys, es, gates, slots, h, norm, eps, out,
                      hn, xn, norms, wq, sq, wk, sk, wv, sv, wo, so, router, cos, sin, kc, vc, pos, key_ok, eps_n,
                      consts, q, kv, attn, a, scores, part_q, part_kv, part_o, xr, idx_n, gate_n, probs_n):
    """moe_resident for one layer and, when it ran, attn_route for the next (its arguments
    after `out`) in the same call: one call per decode layer while the experts are resident."""
    if not moe_resident(x, idx, gate, pool, slot_of, sg, su, sd, gus, ys, es, gates, slots, h, norm, eps, out):
        return False
    attn_route(hn, xn, norms, wq, sq, wk, sk, wv, sv, wo, so, router, cos, sin, kc, vc, pos, key_ok, eps_n,
               consts, q, kv, attn, a, scores, part_q, part_kv, part_o, xr, idx_n, gate_n, probs_n)
    return True


@njit(cache=True, nogil=True)
def moe_finish(h, ys, gate, norm, eps, out):
    """h[1, D] += RMSNorm_3(sum_j gate[j] * ys[j]); ys in expert order (as the general path sums)."""
    out[:] = 0.0
    for j in range(ys.shape[0]):
        gj = gate[j]
        for i in range(ys.shape[1]):
            out[0, i] += gj * ys[j, i]
    add_rmsnorm(h, out, norm, eps)


class DecodeWorkspace:
    """The buffers of one decode token, made once per session."""

    def __init__(self, c, context: int, parts: int, pair_parts: int):
        D, H, G, d, F = c.emb_size, c.num_q_heads, c.num_kv_heads, c.key_size, c.ffn_size
        k = c.num_selected_experts
        f32 = np.float32
        self.h, self.x, self.a, self.moe = (np.empty((1, D), f32) for _ in range(4))
        self.q = np.empty((1, H, d), f32)
        self.kv = np.empty((2, G * d), f32)
        self.attn = np.empty((1, H, d), f32)
        self.scores = np.empty((H, context), f32)
        self.cos = np.empty((1, d // 2), f32)
        self.sin = np.empty((1, d // 2), f32)
        self.pos = np.empty(1, np.int64)
        self.gu = np.empty((2, F), f32)
        # one thread per routed expert, whole (experts_whole), where that is bitwise `expert`
        self.whole = pair_parts == 1 and k % parts == 0
        self.gus = np.empty((k if self.whole else 0, 2, F), f32)
        self.ys = np.empty((k, D), f32)
        self.gates = np.empty(k, f32)
        self.part_q = np.empty((parts, H * d), f32)
        self.part_kv = np.empty((2, parts, G * d), f32)
        self.part_o = np.empty((parts, D), f32)
        self.part_f = np.empty((2, pair_parts, F), f32)
        self.part_d = np.empty((parts, D), f32)
        self.slots = np.empty(k, np.int64)      # experts_whole's pool slots and expert ids
        self.es = np.empty(k, np.int64)
        self.ahead = -1                          # a layer whose attention already ran (moe_resident_attn)
