"""Norms, rotary embeddings, attention, activations and routing."""

import math

import numpy as np
from numba import njit, prange


@njit(cache=True, fastmath=True, inline="always", error_model="numpy")
def _inv_rms(row, eps):
    ss = 0.0
    for i in range(row.shape[0]):
        v = np.float64(row[i])
        ss += v * v
    return np.float32(1.0 / math.sqrt(ss / row.shape[0] + eps))


@njit(cache=True, fastmath=True, error_model="numpy")
def rmsnorm(x, scale, eps, out):
    """out[T, D] = scale * x / sqrt(mean(x^2) + eps), row by row (x and out may alias)."""
    for t in range(x.shape[0]):
        inv = _inv_rms(x[t], eps)
        for i in range(x.shape[1]):
            out[t, i] = scale[i] * (x[t, i] * inv)


@njit(cache=True, fastmath=True, error_model="numpy")
def add_rmsnorm(h, x, scale, eps):
    """h[T, D] += rmsnorm(x) (the sandwich post-norm on a branch output, then the residual)."""
    for t in range(x.shape[0]):
        inv = _inv_rms(x[t], eps)
        for i in range(x.shape[1]):
            h[t, i] += scale[i] * (x[t, i] * inv)


@njit(cache=True)
def rope_tables(inv_freq, pos, cos, sin):
    """cos/sin [T, d/2] of phase = float32(pos[t]) * inv_freq, as the reference forms it in float32."""
    for t in range(pos.shape[0]):
        p = np.float32(pos[t])
        for j in range(inv_freq.shape[0]):
            ph = p * inv_freq[j]
            cos[t, j] = np.float32(math.cos(np.float64(ph)))
            sin[t, j] = np.float32(math.sin(np.float64(ph)))


@njit(cache=True, fastmath=True)
def rope(x, cos, sin):
    """Rotate x[T, heads, d] in place, half-split (dim j pairs with j + d/2)."""
    T, nh, d = x.shape
    half = d // 2
    for t in range(T):
        for h in range(nh):
            for j in range(half):
                a = x[t, h, j]
                b = x[t, h, j + half]
                c = cos[t, j]
                s = sin[t, j]
                x[t, h, j] = a * c - b * s
                x[t, h, j + half] = b * c + a * s


@njit(cache=True, fastmath=True, inline="always", error_model="numpy")
def tanh_f32(x):
    """tanh in float32 by the rational approximation XLA and Eigen use for float32 on CPU
    (odd degree-13 over even degree-6, input clamped to +-7.9053), a few ulp from the true value.
    Unlike a libm call it vectorizes (with error_model="numpy": Python's zero-division check
    on `/` would stop that)."""
    c = np.float32(7.90531110763549805)
    y = min(max(x, -c), c)
    y2 = y * y
    p = y2 * np.float32(-2.76076847742355e-16) + np.float32(2.00018790482477e-13)
    p = y2 * p + np.float32(-8.60467152213735e-11)
    p = y2 * p + np.float32(5.12229709037114e-08)
    p = y2 * p + np.float32(1.48572235717979e-05)
    p = y2 * p + np.float32(6.37261928875436e-04)
    p = y2 * p + np.float32(4.89352455891786e-03)
    q = y2 * np.float32(1.19825839466702e-06) + np.float32(1.18534705686654e-04)
    q = y2 * q + np.float32(2.26843463243900e-03)
    q = y2 * q + np.float32(4.89352518554385e-03)
    t = y * p / q
    return x if abs(x) < np.float32(0.0004) else t


@njit(cache=True, error_model="numpy")
def _exp_reduce(x):
    """exp(x) for -87 < x <= 0 as (y, k) with exp(x) = y * 2**k, y in [0.7, 1.5]: Cephes'
    float32 polynomial after a two-constant (Cody-Waite) range reduction, ~1 ulp. Compiled
    without fastmath, so the reduction is not reassociated; the caller adds k to y's exponent
    bits, which keeps the loop over keys vectorizable (math.exp there is a scalar call)."""
    k = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = (x - k * np.float32(0.693359375)) - k * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4) * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * (r * r) + r + np.float32(1.0)
    return y, np.int32(k)


@njit(parallel=True, cache=True, fastmath=True, nogil=True, error_model="numpy")
def attention(q, kc, vc, pos0, key_ok, mult, cap, n_uniform, out, scores, threads):
    """Causal attention of T new queries against the cache.

    q [T, H, d] (rotated); kc, vc [G, S, d] one layer's cache, rows 0..pos0+T-1 filled;
    key_ok [S] uint8: keys a query may see (besides causality); out [T, H, d];
    scores [H, S] scratch. Logits: (q.k) * mult, then cap*tanh(./cap), then mask, softmax.
    A query that may see no key gets the reference's uniform softmax over `n_uniform` rows
    (rows past the filled ones hold zeros, so it is the sum of the filled rows / n_uniform).
    The soft-cap's tanh and the softmax's exp are vectorized (tanh_f32, _exp_reduce): libm
    calls would cost several times the time of reading the KV cache.

    The heads sharing a KV group are taken together (Grok-1: 6 query heads per group): each
    key and value row is read once for all of them rather than once per head. The scores go two
    keys x two heads per loop, the weighted values four keys per pass over an output row (a
    chain in key order, as one key at a time): with rows of 128, a loop's setup and runtime
    alias checks cost as much as its work. A group's heads are split across threads only when
    there are fewer groups than `threads`; a head's result does not depend on the split.
    """
    T, H, d = q.shape
    G = kc.shape[0]
    grp = H // G
    S = scores.shape[1]
    lowest = np.float32(-3.0e38)
    parts = max(1, min(grp, threads // G))
    per = (grp + parts - 1) // parts
    for j in prange(G * parts):
        g = j // parts
        h0 = g * grp + (j % parts) * per
        h1 = min((g + 1) * grp, h0 + per)
        if h1 <= h0:
            continue
        expo = np.empty(S, np.int32)
        inv = np.empty(h1 - h0, np.float32)
        for t in range(T):
            n = pos0 + t + 1
            s = 0
            while s + 2 <= n:                     # two keys x two heads per pass
                ka = kc[g, s]
                kb = kc[g, s + 1]
                h = h0
                while h + 1 < h1:
                    qa = q[t, h]
                    qb = q[t, h + 1]
                    aa = np.float32(0.0)
                    ab = np.float32(0.0)
                    ba = np.float32(0.0)
                    bb = np.float32(0.0)
                    for i in range(d):
                        aa += qa[i] * ka[i]
                        ab += qa[i] * kb[i]
                        ba += qb[i] * ka[i]
                        bb += qb[i] * kb[i]
                    scores[h, s] = aa
                    scores[h, s + 1] = ab
                    scores[h + 1, s] = ba
                    scores[h + 1, s + 1] = bb
                    h += 2
                if h < h1:
                    qv = q[t, h]
                    a = np.float32(0.0)
                    b = np.float32(0.0)
                    for i in range(d):
                        a += qv[i] * ka[i]
                        b += qv[i] * kb[i]
                    scores[h, s] = a
                    scores[h, s + 1] = b
                s += 2
            if s < n:
                kv = kc[g, s]
                for h in range(h0, h1):
                    qv = q[t, h]
                    a = np.float32(0.0)
                    for i in range(d):
                        a += qv[i] * kv[i]
                    scores[h, s] = a
            seen = False
            for s in range(n):
                seen = seen or key_ok[s] != 0
            for h in range(h0, h1):
                out[t, h, :] = 0.0
            if not seen:                          # no visible key
                for s in range(n):
                    vv = vc[g, s]
                    for h in range(h0, h1):
                        o = out[t, h]
                        for i in range(d):
                            o[i] += vv[i]
                for h in range(h0, h1):
                    o = out[t, h]
                    for i in range(d):
                        o[i] /= n_uniform
                continue
            for h in range(h0, h1):
                sc = scores[h]
                bits = sc.view(np.int32)
                # the soft cap and mask; the max gets a loop of its own, so that this one
                # vectorizes
                for s in range(n):
                    a = cap * tanh_f32(sc[s] * mult / cap)
                    sc[s] = a if key_ok[s] != 0 else lowest
                m = lowest
                for s in range(n):
                    m = max(m, sc[s])
                for s in range(n):
                    # masked keys (and any below e^-87, 1e-38 of the largest) count as zero
                    x = max(sc[s] - m, np.float32(-87.0))
                    y, k = _exp_reduce(x)
                    live = x > np.float32(-87.0)
                    sc[s] = y if live else np.float32(0.0)
                    expo[s] = k if live else np.int32(0)
                for s in range(n):
                    bits[s] += expo[s] << 23          # y * 2**k; exact while the result is normal
                tot = np.float32(0.0)
                for s in range(n):
                    tot += sc[s]
                inv[h - h0] = np.float32(1.0) / tot
            s = 0
            while s + 4 <= n:                     # four values per pass over an output row
                v0, v1, v2, v3 = vc[g, s], vc[g, s + 1], vc[g, s + 2], vc[g, s + 3]
                for h in range(h0, h1):
                    ih = inv[h - h0]
                    p0, p1 = scores[h, s] * ih, scores[h, s + 1] * ih
                    p2, p3 = scores[h, s + 2] * ih, scores[h, s + 3] * ih
                    o = out[t, h]
                    for i in range(d):            # a chain in key order, as one key at a time
                        a = o[i] + p0 * v0[i]
                        a += p1 * v1[i]
                        a += p2 * v2[i]
                        o[i] = a + p3 * v3[i]
                s += 4
            while s < n:
                vv = vc[g, s]
                for h in range(h0, h1):
                    p = scores[h, s] * inv[h - h0]
                    o = out[t, h]
                    for i in range(d):
                        o[i] += p * vv[i]
                s += 1


@njit(cache=True, fastmath=True, error_model="numpy")
def gelu_mul(g, u):
    """g[:] = gelu_tanh(g) * u  (the gated expert activation, in place)."""
    k = np.float32(math.sqrt(2.0 / math.pi))
    for i in range(g.shape[0]):
        z = g[i]
        g[i] = np.float32(0.5) * z * (np.float32(1.0) + tanh_f32(k * (z + np.float32(0.044715) * z * z * z))) * u[i]


@njit(cache=True)
def route(x, router, k, idx, gate, probs):
    """Router: softmax(x[T, D] @ router[D, E]) in float32; top-k per token, ties to the lower index.

    idx [T, k] int64 and gate [T, k] float32 (raw probabilities, not renormalised);
    probs [T, E] float32 receives the whole softmax.
    """
    T, D = x.shape
    E = router.shape[1]
    logits = np.zeros(E, np.float64)
    acc = np.empty(E, np.float32)
    for t in range(T):
        # each logit summed over i in order, as a scalar loop per expert would, but a row of the
        # router at a time: its E entries are contiguous, so the loop over experts vectorizes
        acc[:] = 0.0
        for i in range(D):
            xi = x[t, i]
            for e in range(E):
                acc[e] += xi * router[i, e]
        for e in range(E):
            logits[e] = acc[e]
        m = logits.max()
        tot = 0.0
        for e in range(E):
            logits[e] = math.exp(np.float32(logits[e] - m))
            tot += logits[e]
        for e in range(E):
            logits[e] = np.float32(logits[e] / tot)
            probs[t, e] = logits[e]
        for j in range(k):
            best = -1
            for e in range(E):
                if logits[e] >= 0 and (best < 0 or logits[e] > logits[best]):
                    best = e
            idx[t, j] = best
            gate[t, j] = logits[best]
            logits[best] = -1.0
