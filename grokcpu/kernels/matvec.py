"""int8-weight products: decode matvecs, prefill dequantization tiles, the int8 unembedding table."""

import numpy as np
from numba import njit, prange

# The decode matvec reads each thread's rows as few long streams: the hardware prefetcher
# keeps DRAM busy only along streams it has learned, and short interleaved ones (a few rows of
# a narrow matrix, 1-6 KB each) run at about half speed.
# Matrices at most NARROW_COLS wide go one whole row at a time (one stream; the accumulator,
# <= 8 KB, stays in L1).
NARROW_COLS = 2048
# Wider ones take eight rows per step over up to COL_CHUNK columns (eight streams, each up to
# 32 KB long; the accumulator, up to 128 KB, stays in L2).
COL_CHUNK = 32768
# qmatmul_small's work item: columns whose T accumulator rows fill SMALL_ACC floats (128 KB, in
# L2; wide so that each weight row is a long stream), and row blocks of SMALL_BLOCK bytes that
# stay in L2 while each pair of rows of x uses them.
SMALL_ACC = 32768
SMALL_BLOCK = 96 << 10


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _rows_into(x, w, s, acc, o, r, r1, c0, c1, wide):
    """o[:c1-c0] += x[r:r1] @ (w[r:r1, c0:c1] * scales), one scale block at a time; acc is
    scratch of at least c1-c0. Wide: eight rows per step (see qmatvec), else one."""
    rb = w.shape[0] // s.shape[0]
    n = c1 - c0
    while r < r1:
        b = r // rb
        bend = min(r1, (b + 1) * rb)
        acc[:n] = 0.0
        while wide and r + 8 <= bend:
            x0, x1, x2, x3 = x[r], x[r + 1], x[r + 2], x[r + 3]
            x4, x5, x6, x7 = x[r + 4], x[r + 5], x[r + 6], x[r + 7]
            w0, w1, w2, w3 = w[r, c0:c1], w[r + 1, c0:c1], w[r + 2, c0:c1], w[r + 3, c0:c1]
            w4, w5, w6, w7 = w[r + 4, c0:c1], w[r + 5, c0:c1], w[r + 6, c0:c1], w[r + 7, c0:c1]
            for c in range(n):
                a = acc[c] + x0 * np.float32(w0[c])
                a += x1 * np.float32(w1[c])
                a += x2 * np.float32(w2[c])
                a += x3 * np.float32(w3[c])
                a += x4 * np.float32(w4[c])
                a += x5 * np.float32(w5[c])
                a += x6 * np.float32(w6[c])
                acc[c] = a + x7 * np.float32(w7[c])
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


@njit(cache=True, nogil=True, inline="always")
def _split(R, C, parts):
    """(wide, column chunk, rows per part) of the decode matvec's partition."""
    wide = C > NARROW_COLS
    step = 8 if wide else 1
    nch = (C + COL_CHUNK - 1) // COL_CHUNK
    chunk = ((C + nch - 1) // nch + 63) // 64 * 64
    rows_per = ((R + parts - 1) // parts + step - 1) // step * step
    return wide, chunk, rows_per


@njit(cache=True, fastmath=True, nogil=True)
def _range_into(x, w, s, o, r0, r1, chunk, wide):
    """o[:] = x[r0:r1] @ (w[r0:r1] * scales), column chunk by column chunk (see qmatvec_multi).

    A call, not inlined (nor is _out_group): inlined into every region that uses them, they
    double the first decode's compile time for the same bits and speed."""
    C = w.shape[1]
    o[:] = 0.0
    acc = np.empty(min(C, chunk), np.float32)
    for c0 in range(0, C, chunk):
        c1 = min(C, c0 + chunk)
        _rows_into(x, w, s, acc, o[c0:c1], r0, r1, c0, c1, wide)


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def qmatvec_multi(x, ws, ss, outs, part):
    """outs[k] = x @ (ws[k] * scales ss[k]) for a tuple of K matrices of one shape sharing x.

    part [K, Q, C] float32 scratch: each matrix's rows are split into Q contiguous ranges, each
    summed into its own row of `part`, then added up. A matrix's result does not depend on K:
    the same rows, ranges and order either way. With an expert's gate and up (K = 2) and Q =
    threads / 2, two threads each read one whole matrix as one stream, with no barrier between
    the products and no partial sums.

    On wide matrices eight rows per step share the loads and stores of the accumulator and are
    added to it one after another: a chain of fused multiply-adds is fewer instructions than a
    tree of products and sums, and as the loop runs across columns the chain's latency is
    hidden. Narrow matrices go row by row (see NARROW_COLS). The scale of a row block is
    applied once per block.
    """
    R, C = ws[0].shape
    K, Q = part.shape[0], part.shape[1]
    wide, chunk, rows_per = _split(R, C, Q)
    for j in prange(K * Q):
        k = j // Q
        q = j % Q
        r0 = q * rows_per
        _range_into(x, ws[k], ss[k], part[k, q], r0, min(R, r0 + rows_per), chunk, wide)
    for k in range(K):
        _sum_parts(part[k], outs[k])


@njit(cache=True, nogil=True, inline="always")
def _sum_parts(part, out):
    """out[c] = part[0, c] + part[1, c] + ... in that order."""
    for c in range(out.shape[0]):
        t = part[0, c]
        for q in range(1, part.shape[0]):
            t += part[q, c]
        out[c] = t


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def qmatvec_qkv(x, wq, sq, wk, sk, wv, sv, q, kv, part_q, part_kv):
    """q = x @ wq, kv[0] = x @ wk, kv[1] = x @ wv (int8 with block scales) in one parallel
    region: work item p takes row range p of all three, the ranges qmatvec and qmatvec_multi
    use with P = part_q.shape[0] parts, so the results are bitwise theirs. One region instead
    of two saves a fork, a join and the cold start of a short product (part_kv [2, P, Ckv])."""
    R, Cq = wq.shape
    P = part_q.shape[0]
    wide_q, chunk_q, rows_q = _split(R, Cq, P)
    wide_kv, chunk_kv, rows_kv = _split(R, wk.shape[1], P)
    for p in prange(P):
        r0 = p * rows_q
        _range_into(x, wq, sq, part_q[p], r0, min(R, r0 + rows_q), chunk_q, wide_q)
        r0 = p * rows_kv
        _range_into(x, wk, sk, part_kv[0, p], r0, min(R, r0 + rows_kv), chunk_kv, wide_kv)
        _range_into(x, wv, sv, part_kv[1, p], r0, min(R, r0 + rows_kv), chunk_kv, wide_kv)
    _sum_parts(part_q, q)
    _sum_parts(part_kv[0], kv[0])
    _sum_parts(part_kv[1], kv[1])


@njit(cache=True, nogil=True)
def qmatvec(x, w, s, out, part):
    """out[C] = x[R] @ (w[R, C] * s[r // (R/nb), C]): qmatvec_multi with one matrix, its rows
    in P = part.shape[0] ranges (one per thread); part [P, C] float32 scratch."""
    P, C = part.shape
    qmatvec_multi(x, (w,), (s,), out.reshape(1, C), part.reshape(1, P, C))


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def qmatmul_small(x, w, s, out, part):
    """out[T, C] = x[T, R] @ (w[R, C] * s[block, C]) for a few rows T: the weights come from
    memory once for all rows.

    part [P, T, C] float32 scratch, as in qmatvec. Each pass widens four weight rows and adds
    them into two rows of accumulators (eight x values in registers); a block of weight rows
    (SMALL_BLOCK bytes) serves every pair of rows of x while it sits in L2. An odd T pairs its last
    row with a zero row.
    """
    T, R = x.shape
    C = w.shape[1]
    nb = s.shape[0]
    rb = R // nb
    P = part.shape[0]
    Tp = T + (T & 1)
    width = min(C, max(64, SMALL_ACC // Tp // 64 * 64))
    nch = (C + width - 1) // width
    rblock = max(4, SMALL_BLOCK // width // 4 * 4)
    rows_per = ((R + P - 1) // P + 3) // 4 * 4
    for j in prange(P * nch):
        p = j // nch
        c0 = (j % nch) * width
        c1 = min(C, c0 + width)
        n = c1 - c0
        acc = np.zeros((Tp, n), np.float32)
        xp = np.zeros((Tp, 4), np.float32)
        for t in range(T):
            part[p, t, c0:c1] = 0.0
        r = p * rows_per
        r1 = min(R, r + rows_per)
        while r < r1:
            b = r // rb
            bend = min(r1, (b + 1) * rb)
            acc[:] = 0.0
            while r < bend:
                rend = min(bend, r + rblock)
                for t0 in range(0, Tp, 2):
                    a0 = acc[t0]
                    a1 = acc[t0 + 1]
                    q = r
                    while q < rend:
                        m = min(4, rend - q)
                        for t in range(t0, min(T, t0 + 2)):
                            for i in range(4):
                                xp[t, i] = x[t, q + i] if i < m else np.float32(0.0)
                        x00, x01, x02, x03 = xp[t0, 0], xp[t0, 1], xp[t0, 2], xp[t0, 3]
                        x10, x11, x12, x13 = xp[t0 + 1, 0], xp[t0 + 1, 1], xp[t0 + 1, 2], xp[t0 + 1, 3]
                        w0 = w[q, c0:c1]
                        w1 = w[min(q + 1, R - 1), c0:c1]
                        w2 = w[min(q + 2, R - 1), c0:c1]
                        w3 = w[min(q + 3, R - 1), c0:c1]
                        for c in range(n):
                            f0 = np.float32(w0[c])
                            f1 = np.float32(w1[c])
                            f2 = np.float32(w2[c])
                            f3 = np.float32(w3[c])
                            a0[c] += x00 * f0 + x01 * f1 + x02 * f2 + x03 * f3
                            a1[c] += x10 * f0 + x11 * f1 + x12 * f2 + x13 * f3
                        q += m
                r = rend
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



@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def qmatvec_t(x, wt, s, out):
    """out[C] = x[R] @ (wt[C, R] * s[r // (R/nb), c]).T: the weights stored output-major.

    Each output is a dot product along a contiguous row, so the sums stay in registers (no
    accumulator row goes through memory, as in qmatvec). Eight rows per step share the loads
    of x. The expert cache stores the down projection this way (on that narrow shape it beats
    the input-major kernel); wt may also be float32 (scales of one).
    """
    for j in prange((wt.shape[0] + 7) // 8):
        _out_group(x, wt, s, out, j)


@njit(cache=True, fastmath=True, nogil=True)
def _out_group(x, wt, s, out, j):
    """Outputs 8j .. 8j+7 of qmatvec_t (fewer in the last group)."""
    C, R = wt.shape
    nb = s.shape[0]
    rb = R // nb
    c = j * 8
    if c + 8 <= C:
        o0 = o1 = o2 = o3 = o4 = o5 = o6 = o7 = np.float32(0.0)
        for b in range(nb):
            # slices and a loop from 0: `range(b * rb, (b + 1) * rb)` is not vectorized
            r0 = b * rb
            r1 = r0 + rb
            xb = x[r0:r1]
            w0, w1, w2, w3 = wt[c, r0:r1], wt[c + 1, r0:r1], wt[c + 2, r0:r1], wt[c + 3, r0:r1]
            w4, w5, w6, w7 = wt[c + 4, r0:r1], wt[c + 5, r0:r1], wt[c + 6, r0:r1], wt[c + 7, r0:r1]
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
            for r in range(rb):
                xr = xb[r]
                a0 += xr * np.float32(w0[r])
                a1 += xr * np.float32(w1[r])
                a2 += xr * np.float32(w2[r])
                a3 += xr * np.float32(w3[r])
                a4 += xr * np.float32(w4[r])
                a5 += xr * np.float32(w5[r])
                a6 += xr * np.float32(w6[r])
                a7 += xr * np.float32(w7[r])
            o0 += s[b, c] * a0
            o1 += s[b, c + 1] * a1
            o2 += s[b, c + 2] * a2
            o3 += s[b, c + 3] * a3
            o4 += s[b, c + 4] * a4
            o5 += s[b, c + 5] * a5
            o6 += s[b, c + 6] * a6
            o7 += s[b, c + 7] * a7
        out[c], out[c + 1], out[c + 2], out[c + 3] = o0, o1, o2, o3
        out[c + 4], out[c + 5], out[c + 6], out[c + 7] = o4, o5, o6, o7
    else:
        for ci in range(c, C):
            o0 = np.float32(0.0)
            for b in range(nb):
                xb = x[b * rb:(b + 1) * rb]
                w0 = wt[ci, b * rb:(b + 1) * rb]
                a0 = np.float32(0.0)
                for r in range(rb):
                    a0 += xb[r] * np.float32(w0[r])
                o0 += s[b, ci] * a0
            out[ci] = o0


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def dot_rows(x, a, scale, out, parts):
    """out[T, C] = scale * (x[T, R] @ a[C, R].T) for a float32 table a (the exact unembedding)
    and a few rows T (a decode step or batch): each table row is read once for all T.

    Row by row, each of `parts` contiguous row ranges one sequential stream: with no int8 to
    widen, the extra loads of x cost less than the streams of an eight-row step.
    """
    C, R = a.shape
    T = x.shape[0]
    per = (C + parts - 1) // parts
    for p in prange(parts):
        for c in range(p * per, min(C, (p + 1) * per)):
            row = a[c]
            for t in range(T):
                acc = np.float32(0.0)
                for r in range(R):
                    acc += x[t, r] * row[r]
                out[t, c] = scale * acc


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def qmatmul_small_t(x, wt, s, out):
    """out[T, C] = x[T, R] @ (wt[C, R] * s[block, c]).T for a few rows T, wt output-major:
    four outputs x two rows at a time, their eight sums in registers."""
    T, R = x.shape
    C = wt.shape[0]
    nb = s.shape[0]
    rb = R // nb
    ng = (C + 3) // 4
    for j in prange(ng):
        c = j * 4
        m = min(4, C - c)
        ca, cb, cc, cd = c, min(c + 1, C - 1), min(c + 2, C - 1), min(c + 3, C - 1)
        for t0 in range(0, T, 2):
            t1 = min(t0 + 1, T - 1)
            o = np.zeros(8, np.float32)
            for b in range(nb):
                r0 = b * rb
                r1 = r0 + rb
                xa = x[t0, r0:r1]
                xb = x[t1, r0:r1]
                w0, w1, w2, w3 = wt[ca, r0:r1], wt[cb, r0:r1], wt[cc, r0:r1], wt[cd, r0:r1]
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
                for r in range(rb):
                    f0 = np.float32(w0[r])
                    f1 = np.float32(w1[r])
                    f2 = np.float32(w2[r])
                    f3 = np.float32(w3[r])
                    u = xa[r]
                    v = xb[r]
                    a0 += u * f0
                    a1 += u * f1
                    a2 += u * f2
                    a3 += u * f3
                    b0 += v * f0
                    b1 += v * f1
                    b2 += v * f2
                    b3 += v * f3
                o[0] += s[b, ca] * a0
                o[1] += s[b, cb] * a1
                o[2] += s[b, cc] * a2
                o[3] += s[b, cd] * a3
                o[4] += s[b, ca] * b0
                o[5] += s[b, cb] * b1
                o[6] += s[b, cc] * b2
                o[7] += s[b, cd] * b3
            for i in range(m):
                out[t0, c + i] = o[i]
                if t1 != t0:
                    out[t1, c + i] = o[4 + i]


@njit(parallel=True, cache=True, nogil=True)
def dequant_rows_t(wt, s, c0, out):
    """out[n, R] = wt[c0:c0+n, :] * s[block(r), c0:c0+n].T as float32 (a tile for BLAS)."""
    n, R = out.shape
    nb = s.shape[0]
    rb = R // nb
    for i in prange(n):
        for b in range(nb):          # one scale per block: the inner loop vectorizes
            sc = s[b, c0 + i]
            wr = wt[c0 + i, b * rb:(b + 1) * rb]
            o = out[i, b * rb:(b + 1) * rb]
            for r in range(rb):
                o[r] = np.float32(wr[r]) * sc


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
def quantize_rows_t(a, qt, scale):
    """Per-row absmax int8 of a[V, D] float32 (round to nearest), stored transposed:
    qt[D, V] int8 and scale[V]. Transposed, the int8 unembedding is an input-major matrix with
    per-column scales, which qmatvec streams faster than any output-major kernel on short rows."""
    V, D = a.shape
    for j in prange((V + 63) // 64):
        v0 = j * 64
        v1 = min(V, v0 + 64)
        inv = np.empty(v1 - v0, np.float32)
        for v in range(v0, v1):
            row = a[v]
            m = np.float32(0.0)
            for i in range(D):
                x = abs(row[i])
                if x > m:
                    m = x
            sv = m / np.float32(127.0) if m > 0 else np.float32(1.0)
            scale[v] = sv
            inv[v - v0] = np.float32(1.0) / sv
        for i in range(D):
            for v in range(v0, v1):
                qt[i, v] = np.int8(round(a[v, i] * inv[v - v0]))


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def read_sum(a):
    """Sum of a float32 array: streams it once, the read-bandwidth ceiling decode is held to."""
    acc = np.float32(0.0)
    for i in prange(a.shape[0]):
        acc += a[i]
    return acc
