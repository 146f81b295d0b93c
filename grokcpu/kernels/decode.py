"""One decode token's blocks in a few compiled calls on a preallocated workspace (the CPU
backend's one-row path): the attention block and the router in one call, each routed expert in
one and one call to finish the MoE block, or, with the experts resident in the expert cache,
the MoE block and the next layer's attention in one (`moe_resident_attn`; ckpt-0 with 1 or 2
threads, its experts in one region: `experts_whole`). A token's many short products would
otherwise pay Python's argument checks and small allocations per call. The arithmetic is the
kernels of the many-row path in the same order, or kernels bitwise theirs.

The blocks serve both formats: a matrix argument is ckpt-0's (int8 w [R, C], float32 scales
[nb, C]) or a GGUF model's (ggml type, bytes [N, row_bytes], their uint16 view: see
grokcpu.quant.prepared), and the products (qkv, out_proj, gate_up, down) compile to the
format's kernels: kernels/matvec.py's, or kernels/ggml.py's rows_product, the product of the
GGUF many-row path. `scratch` is the format's product buffers (DecodeWorkspace.scratch).
"""

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .ggml import F16_TABLE, rows_products
from .layers import add_rmsnorm, attention, gelu_mul, rmsnorm, rope, route
from .matvec import _out_group, _range_into, _split, qmatvec, qmatvec_multi, qmatvec_qkv, qmatvec_t


def _ggml(m) -> bool:
    """Whether a matrix argument's numba type is a GGUF model's (ggml type, bytes, words)."""
    return isinstance(m, types.BaseTuple) and isinstance(m.types[0], types.Integer)


@njit(cache=True, nogil=True)
def ggml_rows(ms, x, outs, scratch):
    """outs[i][N_i] = W_i @ x[K] for GGUF matrices ms (a tuple): rows_products on one row, x
    prepared once, with the session's scratch (xs, qx, xd, qs, qb, bs, f16, q8, parts, n16)
    (see DecodeWorkspace)."""
    xs, qx, xd, qs, qb, bs, f16, q8, parts, n16 = scratch
    K = x.shape[0]
    rows_products(ms, x.reshape(1, K), outs, xs[:K // 32].reshape(1, K // 32), qx[:K].reshape(1, K),
                  xd[:K // 256].reshape(1, K // 256), qs[:K // 32].reshape(1, K // 32), qb[:K].reshape(1, K),
                  bs[:K // 16].reshape(1, K // 16), f16, q8, parts, n16)


@njit(cache=True, nogil=True, inline="always")
def _row(v):
    return v.reshape(1, v.shape[0])


def qkv(x, wq, wk, wv, q, kv, scratch):
    """q = x @ Wq, kv[0] = x @ Wk, kv[1] = x @ Wv for one row x [D]."""


def out_proj(x, w, out, scratch):
    """out = x @ W, the attention's output projection."""


def gate_up(x, wg, wu, gu, scratch):
    """gu[0] = x @ Wg, gu[1] = x @ Wu, an expert's gate and up projections."""


def down(x, w, down_t, y, scratch):
    """y = x @ W, an expert's down projection (ckpt-0: W output-major [D, F] when down_t, the
    expert cache's layout)."""


@overload(qkv)
def _qkv(x, wq, wk, wv, q, kv, scratch):
    if _ggml(wq):
        def impl(x, wq, wk, wv, q, kv, scratch):        # one parallel region for the three
            ggml_rows((wq, wk, wv), x, (_row(q), _row(kv[0]), _row(kv[1])), scratch)
        return impl

    def impl(x, wq, wk, wv, q, kv, scratch):          # one parallel region for the three
        qmatvec_qkv(x, wq[0], wq[1], wk[0], wk[1], wv[0], wv[1], q, kv, scratch[0], scratch[1])
    return impl


@overload(out_proj)
def _out_proj(x, w, out, scratch):
    if _ggml(w):
        def impl(x, w, out, scratch):
            ggml_rows((w,), x, (_row(out),), scratch)
        return impl

    def impl(x, w, out, scratch):
        qmatvec(x, w[0], w[1], out, scratch[2])
    return impl


@overload(gate_up)
def _gate_up(x, wg, wu, gu, scratch):
    if _ggml(wg):
        def impl(x, wg, wu, gu, scratch):             # one region, x prepared once
            ggml_rows((wg, wu), x, (_row(gu[0]), _row(gu[1])), scratch)
        return impl

    def impl(x, wg, wu, gu, scratch):                 # both matrices in one parallel region
        qmatvec_multi(x, (wg[0], wu[0]), (wg[1], wu[1]), gu, scratch[3])
    return impl


@overload(down)
def _down(x, w, down_t, y, scratch):
    if _ggml(w):
        def impl(x, w, down_t, y, scratch):
            ggml_rows((w,), x, (_row(y),), scratch)
        return impl

    def impl(x, w, down_t, y, scratch):
        if down_t:
            qmatvec_t(x, w[0], w[1], y)
        else:
            qmatvec(x, w[0], w[1], y, scratch[4])
    return impl


@njit(cache=True, nogil=True)
def attn_block(h, x, norms, wq, wk, wv, wo, cos, sin, kc, vc, pos, key_ok, eps, consts, q, kv, attn, a, scores,
               threads, scratch):
    """h[1, D] += RMSNorm_1(Attention(RMSNorm_0(h))) for the token at `pos`, its key and value
    written into kc/vc [G, S, d].

    norms [3, D]: the layer's attn_norm, attn_post_norm and moe_norm. consts float32: the
    attention multiplier, the logit cap, the uniform-softmax row count. kv [2, G*d]: the new
    key and value (ckpt-0: made with the query in one region, qmatvec_qkv).
    """
    mult, cap, n_uniform = consts[0], consts[1], consts[2]
    H, d = q.shape[1], q.shape[2]
    G = kc.shape[0]
    rmsnorm(h, norms[0], eps, x)
    qkv(x[0], wq, wk, wv, q.reshape(H * d), kv, scratch)
    k = kv[0].reshape(1, G, d)
    rope(q, cos, sin)
    rope(k, cos, sin)
    kc[:, pos, :] = k[0]
    vc[:, pos, :] = kv[1].reshape(G, d)
    attention(q, kc, vc, pos, key_ok, mult, cap, n_uniform, attn, scores, threads)
    out_proj(attn.reshape(H * d), wo, a[0], scratch)
    add_rmsnorm(h, a, norms[1], eps)


@njit(cache=True, nogil=True)
def attn_route(h, x, norms, wq, wk, wv, wo, router, cos, sin, kc, vc, pos, key_ok, eps, consts,
               q, kv, attn, a, scores, threads, scratch, xr, idx, gate, probs):
    """attn_block, then xr = RMSNorm_2(h) and the router's top-k into idx/gate (probs: the
    softmax): a decode layer's attention and routing in one call."""
    attn_block(h, x, norms, wq, wk, wv, wo, cos, sin, kc, vc, pos, key_ok, eps, consts, q, kv, attn, a, scores,
               threads, scratch)
    rmsnorm(h, norms[2], eps, xr)
    route(xr, router, idx.shape[1], idx, gate, probs)


@njit(cache=True, nogil=True)
def expert(x, wg, wu, wd, down_t, gu, y, scratch):
    """y[D] = down(gelu(x @ gate) * (x @ up)) for one token, into gu [2, F] and y. ckpt-0:
    gate/up [D, F] input-major, down output-major [D, F] (the expert cache's layout) when
    down_t, else [F, D] as in the file."""
    gate_up(x, wg, wu, gu, scratch)
    gelu_mul(gu[0], gu[1])
    down(gu[0], wd, down_t, y, scratch)


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


@njit(parallel=True, cache=True, nogil=True)
def ggml_experts_whole(x, pool, slots, gt, go, gn, gr, ut, uo, un, ur, dt, do, dn, dr, gus, ys, xs, qx, xd, qs, qb, bs,
                       f16, q8, n16):
    """ys[j] = expert j of a GGUF model's layer for x[D], its weights in pool slot slots[j]
    (gt, go, gn, gr: the gate's (type, byte offset, rows, row bytes) in a slot, as the layout of
    resident_experts; u.., d..: up's, down's; scalars, since a parallel loop takes no tuple): one
    work item per expert, each `expert` on its own buffers (gus [k, 2, F]; xs .. bs [k, ...],
    rows_products') on its thread alone: one parallel region for the layer's experts where
    `expert` takes two each. Bitwise `expert`: a row's product does not depend on the split."""
    for j in prange(slots.shape[0]):
        s = slots[j]
        expert(x, _slot_matrix(pool, s, (gt, go, gn, gr)), _slot_matrix(pool, s, (ut, uo, un, ur)),
               _slot_matrix(pool, s, (dt, do, dn, dr)), True, gus[j], ys[j],
               (xs[j], qx[j], xd[j], qs[j], qb[j], bs[j], f16, q8, 1, n16))


def resident_experts(x, pool, slots, es, layout, work, ys):
    """ys[j] = expert es[j] of x[D] for each j, its weights in pool slot slots[j]. layout: how a
    slot holds the layer's experts; work: the products' buffers. ckpt-0: the layer's scales
    (sg, su, sd) and gus [k, 2, F] (experts_whole); a GGUF: each matrix's (type, byte offset,
    rows, row bytes) in the slot, and either the buffers of one thread per expert (gus [k, 2, F],
    then ggml_experts_whole's) or (gu [2, F], scratch), the experts one after another."""


@overload(resident_experts)
def _resident_experts(x, pool, slots, es, layout, work, ys):
    if isinstance(layout.types[0], types.BaseTuple):
        if work.types[0].ndim == 3:
            def impl(x, pool, slots, es, layout, work, ys):
                gus, xs, qx, xd, qs, qb, bs, f16, q8, n16 = work
                (gt, go, gn, gr), (ut, uo, un, ur), (dt, do, dn, dr) = layout
                ggml_experts_whole(x, pool, slots, gt, go, gn, gr, ut, uo, un, ur, dt, do, dn, dr, gus, ys,
                                   xs, qx, xd, qs, qb, bs, f16, q8, n16)
            return impl

        def impl(x, pool, slots, es, layout, work, ys):
            gu, scratch = work
            for j in range(slots.shape[0]):
                expert(x, _slot_matrix(pool, slots[j], layout[0]), _slot_matrix(pool, slots[j], layout[1]),
                       _slot_matrix(pool, slots[j], layout[2]), True, gu, ys[j], scratch)
        return impl

    def impl(x, pool, slots, es, layout, work, ys):
        experts_whole(x, pool, slots, es, layout[0], layout[1], layout[2], work, ys)
    return impl


@njit(cache=True, nogil=True)
def _slot_matrix(pool, slot, m):
    """A GGUF matrix (type, bytes, words) in expert cache slot `slot`: m = (type, byte offset,
    rows, row bytes) (see CpuBackend.slot_layouts)."""
    qt, off, N, rb = m
    w = pool[slot, off:off + N * rb].reshape(N, rb)
    return qt, w, w.view(np.uint16)


@njit(cache=True, nogil=True)
def moe_resident(x, idx, gate, pool, slot_of, layout, work, ys, es, gates, slots, h, norm, eps, out):
    """A decode layer's MoE block, h[1, D] += RMSNorm_3(sum_j gate[j] * expert_idx[j](x)), when
    every routed expert is in the expert cache (slot_of [E]: a layer's slots, -1 if absent):
    resident_experts, then moe_finish, experts in id order. Returns False, with nothing done, when
    one is not resident. es, gates: the experts and their gates in id order; slots: theirs.
    layout, work: see resident_experts."""
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
    resident_experts(x, pool, slots, es, layout, work, ys)
    moe_finish(h, ys, gates, norm, eps, out)
    return True


@njit(cache=True, nogil=True)
def moe_resident_attn(x, idx, gate, pool, slot_of, layout, work, ys, es, gates, slots, h, norm, eps, out,
                      hn, xn, norms, wq, wk, wv, wo, router, cos, sin, kc, vc, pos, key_ok, eps_n,
                      consts, q, kv, attn, a, scores, threads, scratch, xr, idx_n, gate_n, probs_n):
    """moe_resident for one layer and, when it ran, attn_route for the next (its arguments
    after `out`) in the same call: one call per decode layer while the experts are resident."""
    if not moe_resident(x, idx, gate, pool, slot_of, layout, work, ys, es, gates, slots, h, norm, eps, out):
        return False
    attn_route(hn, xn, norms, wq, wk, wv, wo, router, cos, sin, kc, vc, pos, key_ok, eps_n,
               consts, q, kv, attn, a, scores, threads, scratch, xr, idx_n, gate_n, probs_n)
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
    """The buffers of one decode token, made once per session. ggml_q8: None for a ckpt-0
    model; for a GGUF model, whether its K-quant products take x rounded to 8 bits
    (activations="q8")."""

    def __init__(self, c, context: int, parts: int, pair_parts: int, ggml_q8: bool | None = None):
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
        # the resident experts of a layer in one call (moe_resident), one thread per routed expert
        # when the threads divide them (ckpt-0: where that is bitwise `expert`, experts_whole;
        # a GGUF: ggml_experts_whole); else a GGUF's one after another, each as `expert`
        per_expert = k % parts == 0 and (ggml_q8 is not None or pair_parts == 1)
        self.whole = ggml_q8 is not None or per_expert
        self.gus = np.empty((k if per_expert else 0, 2, F), f32)
        self.ys = np.empty((k, D), f32)
        self.gates = np.empty(k, f32)
        self.slots = np.empty(k, np.int64)      # experts_whole's pool slots and expert ids
        self.es = np.empty(k, np.int64)
        self.ahead = -1                          # a layer whose attention already ran (moe_resident_attn)
        if ggml_q8 is None:
            # the row-range partial sums of the int8 products: qkv's, the output projection's,
            # gate/up's and down's
            self.scratch = (np.empty((parts, H * d), f32), np.empty((2, parts, G * d), f32),
                            np.empty((parts, D), f32), np.empty((2, pair_parts, F), f32),
                            np.empty((parts, D), f32))
        else:
            # rows_products' buffers for the longest rows: x's sums per 32 values, or x in 8 bits
            # (int16 values, scales per 256, sums per 32, int8 values, sums per 16); the f16
            # table; the row-range count; n16. ggml_experts_whole: those per expert.
            K = max(D, H * d, F)
            shapes = ((K // 32, f32), (K, np.int16), (max(1, K // 256), f32), (K // 32, np.int32), (K, np.int8),
                      (K // 16, np.int16))
            self.scratch = (*(np.empty(n, t) for n, t in shapes), F16_TABLE, bool(ggml_q8), parts, 16)
            if per_expert:
                work = (self.gus, *(np.empty((k, n), t) for n, t in shapes), F16_TABLE, bool(ggml_q8), 16)
            else:
                work = (self.gu, self.scratch)
        self.resident_work = self.gus if ggml_q8 is None else work      # see resident_experts
