"""int8-weight products: decode matvec, prefill dequantization tiles, the tied unembedding."""

import numpy as np
from numba import njit, prange

# Columns per work item of the decode matvec. Wide items keep each thread's reads in long
# contiguous runs (rows are input-major, so a column range is a strided slice).
COL_CHUNK = 4096
# Matrices at least this wide use qmatvec (eight rows per step); narrower ones qmatvec4.
WIDE_COLS = 4096
NARROW_CHUNK = 2048


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def qmatvec(x, w, s, out, part):
    """out[C] = x[R] @ (w[R, C] * s[r // (R/nb), C]).

    part [P, C] float32 scratch: the rows are split into P contiguous ranges (one stream per
    thread), each summed into its own row of `part`, then added up. Eight rows per step share
    the loads and stores of the accumulator (summed as a tree, so the additions do not form
    one long dependency chain); the scale of a row block is applied once per block.
    """
    R, C = w.shape
    nb = s.shape[0]
    rb = R // nb
    P = part.shape[0]
    nch = (C + COL_CHUNK - 1) // COL_CHUNK
    rows_per = ((R + P - 1) // P + 7) // 8 * 8
    for j in prange(P * nch):
        p = j // nch
        c0 = (j % nch) * COL_CHUNK
        c1 = min(C, c0 + COL_CHUNK)
        n = c1 - c0
        o = part[p, c0:c1]
        o[:] = 0.0
        acc = np.empty(n, np.float32)
        r = p * rows_per
        r1 = min(R, r + rows_per)
        while r < r1:
            b = r // rb
            bend = min(r1, (b + 1) * rb)
            acc[:] = 0.0
            while r + 8 <= bend:
                x0, x1, x2, x3 = x[r], x[r + 1], x[r + 2], x[r + 3]
                x4, x5, x6, x7 = x[r + 4], x[r + 5], x[r + 6], x[r + 7]
                w0, w1, w2, w3 = w[r, c0:c1], w[r + 1, c0:c1], w[r + 2, c0:c1], w[r + 3, c0:c1]
                w4, w5, w6, w7 = w[r + 4, c0:c1], w[r + 5, c0:c1], w[r + 6, c0:c1], w[r + 7, c0:c1]
                for c in range(n):
                    acc[c] += (((x0 * np.float32(w0[c]) + x1 * np.float32(w1[c]))
                                + (x2 * np.float32(w2[c]) + x3 * np.float32(w3[c])))
                               + ((x4 * np.float32(w4[c]) + x5 * np.float32(w5[c]))
                                  + (x6 * np.float32(w6[c]) + x7 * np.float32(w7[c]))))
                r += 8
            while r < bend:
                x0 = x[r]
                w0 = w[r, c0:c1]
                for c in range(n):
                    acc[c] += x0 * np.float32(w0[c])
                r += 1
            sb = s[b, c0:c1]
            for c in range(n):
                o[c] += sb[c] * acc[c]
    for c in range(C):
        t = part[0, c]
        for p in range(1, P):
            t += part[p, c]
        out[c] = t


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def qmatvec4(x, w, s, out, part):
    """qmatvec for narrow matrices (C < WIDE_COLS): four rows per step measured faster there.

    out[C] = x[R] @ (w[R, C] * s[r // (R/nb), C]).

    part [P, C] float32 scratch: the rows are split into P contiguous ranges (one stream per
    thread), each summed into its own row of `part`, then added up. Four rows per step share
    the loads of the accumulator; the scale of a row block is applied once per block.
    """
    R, C = w.shape
    nb = s.shape[0]
    rb = R // nb
    P = part.shape[0]
    nch = (C + NARROW_CHUNK - 1) // NARROW_CHUNK
    rows_per = ((R + P - 1) // P + 3) // 4 * 4
    for j in prange(P * nch):
        p = j // nch
        c0 = (j % nch) * NARROW_CHUNK
        c1 = min(C, c0 + NARROW_CHUNK)
        n = c1 - c0
        o = part[p, c0:c1]
        o[:] = 0.0
        acc = np.empty(n, np.float32)
        r = p * rows_per
        r1 = min(R, r + rows_per)
        while r < r1:
            b = r // rb
            bend = min(r1, (b + 1) * rb)
            acc[:] = 0.0
            while r + 4 <= bend:
                x0 = x[r]
                x1 = x[r + 1]
                x2 = x[r + 2]
                x3 = x[r + 3]
                w0 = w[r, c0:c1]
                w1 = w[r + 1, c0:c1]
                w2 = w[r + 2, c0:c1]
                w3 = w[r + 3, c0:c1]
                for c in range(n):
                    acc[c] += (x0 * np.float32(w0[c]) + x1 * np.float32(w1[c])
                               + x2 * np.float32(w2[c]) + x3 * np.float32(w3[c]))
                r += 4
            while r < bend:
                x0 = x[r]
                w0 = w[r, c0:c1]
                for c in range(n):
                    acc[c] += x0 * np.float32(w0[c])
                r += 1
            sb = s[b, c0:c1]
            for c in range(n):
                o[c] += sb[c] * acc[c]
    for c in range(C):
        t = part[0, c]
        for p in range(1, P):
            t += part[p, c]
        out[c] = t


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def qmatmul_small(x, w, s, out, part):
    """out[T, C] = x[T, R] @ (w[R, C] * s[block, C]) for a few rows T: the weights are read once.

    part [P, T, C] float32 scratch, as in qmatvec. Four weight rows at a time are widened to
    float32 once into a small buffer and reused for every one of the T rows.
    """
    T, R = x.shape
    C = w.shape[1]
    nb = s.shape[0]
    rb = R // nb
    P = part.shape[0]
    nch = (C + COL_CHUNK - 1) // COL_CHUNK
    rows_per = ((R + P - 1) // P + 3) // 4 * 4
    for j in prange(P * nch):
        p = j // nch
        c0 = (j % nch) * COL_CHUNK
        c1 = min(C, c0 + COL_CHUNK)
        n = c1 - c0
        for t in range(T):
            part[p, t, c0:c1] = 0.0
        acc = np.empty((T, n), np.float32)
        wf = np.empty((4, n), np.float32)
        r = p * rows_per
        r1 = min(R, r + rows_per)
        while r < r1:
            b = r // rb
            bend = min(r1, (b + 1) * rb)
            acc[:] = 0.0
            while r < bend:
                m = min(4, bend - r)
                for i in range(m):
                    wr = w[r + i, c0:c1]
                    wfi = wf[i]
                    for c in range(n):
                        wfi[c] = np.float32(wr[c])
                for i in range(m, 4):
                    wf[i, :] = 0.0
                w0 = wf[0]
                w1 = wf[1]
                w2 = wf[2]
                w3 = wf[3]
                for t in range(T):
                    x0 = x[t, r]
                    x1 = x[t, r + 1] if m > 1 else np.float32(0.0)
                    x2 = x[t, r + 2] if m > 2 else np.float32(0.0)
                    x3 = x[t, r + 3] if m > 3 else np.float32(0.0)
                    a = acc[t]
                    for c in range(n):
                        a[c] += x0 * w0[c] + x1 * w1[c] + x2 * w2[c] + x3 * w3[c]
                r += m
            sb = s[b, c0:c1]
            for t in range(T):
                o = part[p, t, c0:c1]
                a = acc[t]
                for c in range(n):
                    o[c] += sb[c] * a[c]
    for t in range(T):
        for c in range(C):
            v = part[0, t, c]
            for p in range(1, P):
                v += part[p, t, c]
            out[t, c] = v


@njit(parallel=True, cache=True, nogil=True)
def dequant_cols(w, s, c0, out):
    """out[R, n] = w[:, c0:c0+n] * s[block(r), c0:c0+n] as float32 (a tile for BLAS)."""
    R = w.shape[0]
    n = out.shape[1]
    rb = R // s.shape[0]
    for r in prange(R):
        sb = s[r // rb, c0:c0 + n]
        wr = w[r, c0:c0 + n]
        o = out[r]
        for c in range(n):
            o[c] = np.float32(wr[c]) * sb[c]


@njit(parallel=True, cache=True, nogil=True)
def quantize_rows(a, q, scale):
    """q[V, D] int8, scale[V]: per-row absmax int8 (round to nearest) of a[V, D] float32."""
    V, D = a.shape
    for v in prange(V):
        row = a[v]
        m = np.float32(0.0)
        for i in range(D):
            x = abs(row[i])
            if x > m:
                m = x
        s = m / np.float32(127.0) if m > 0 else np.float32(1.0)
        scale[v] = s
        inv = np.float32(1.0) / s
        for i in range(D):
            q[v, i] = np.int8(round(row[i] * inv))


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def unembed(h, table, rs, scale, out):
    """out[V] = rs[v] * (table[V, D] @ h[D]) * scale: the tied output layer, one row.

    table is the float32 embedding (rs = ones) or its int8 copy with per-row scales rs.
    Four table rows per step share the loads of h.
    """
    V, D = table.shape
    nblk = (V + 255) // 256
    for j in prange(nblk):
        v0 = j * 256
        v1 = min(V, v0 + 256)
        v = v0
        while v + 4 <= v1:
            e0 = table[v]
            e1 = table[v + 1]
            e2 = table[v + 2]
            e3 = table[v + 3]
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for i in range(D):
                hi = h[i]
                a0 += np.float32(e0[i]) * hi
                a1 += np.float32(e1[i]) * hi
                a2 += np.float32(e2[i]) * hi
                a3 += np.float32(e3[i]) * hi
            out[v] = a0 * rs[v] * scale
            out[v + 1] = a1 * rs[v + 1] * scale
            out[v + 2] = a2 * rs[v + 2] * scale
            out[v + 3] = a3 * rs[v + 3] * scale
            v += 4
        while v < v1:
            e0 = table[v]
            a0 = np.float32(0.0)
            for i in range(D):
                a0 += np.float32(e0[i]) * h[i]
            out[v] = a0 * rs[v] * scale
            v += 1


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def unembed_q8_rows(h, q, rs, scale, out):
    """out[T, V] = rs[v] * (h[T, D] @ q[V, D].T) * scale, reading the int8 table once for all rows."""
    T, D = h.shape
    V = q.shape[0]
    nblk = (V + 63) // 64
    for j in prange(nblk):
        v0 = j * 64
        v1 = min(V, v0 + 64)
        row = np.empty(D, np.float32)
        for v in range(v0, v1):
            qv = q[v]
            for i in range(D):
                row[i] = np.float32(qv[i])
            f = rs[v] * scale
            for t in range(T):
                ht = h[t]
                a = np.float32(0.0)
                for i in range(D):
                    a += row[i] * ht[i]
                out[t, v] = a * f


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def read_sum(a):
    """Sum of a float32 array: streams it once, the read-bandwidth ceiling decode is held to."""
    acc = np.float32(0.0)
    for i in prange(a.shape[0]):
        acc += a[i]
    return acc
