"""ggml matrices times a few rows of x, as one compiled entry: the decode product of each type
in kernels/quants.py or kernels/simd.py (rows_f32, or the 8-bit rows after quantize_x8), with
the inputs that kernel takes. grokcpu.quant.matvec calls it from Python, the fused decode kernels
(kernels/decode.py) from compiled code, so both run the same arithmetic.

A matrix is (qtype, w, w16): w uint8 [N, row_bytes] read-only, w16 its uint16 view
(grokcpu.quant.prepared makes one).
"""

import numpy as np
from numba import njit, prange
from numba.extending import overload

from . import simd
from .quants import Q4_K, Q5_K, Q6_K, Q8_0, f16_table, quantize_x8, rows8, rows_f32

AVX2 = simd.AVX2                    # a constant to numba: the branch not taken is never compiled

F16_TABLE = f16_table()             # the kernels' f16 argument: the value of each half
F16_TABLE.flags.writeable = False
ROWS = (Q8_0, Q4_K, Q5_K, Q6_K)     # the types with a decode product (rows_product)
# the types whose decode product can take x rounded to 8 bits (activations="q8"). Q8_0 only with
# AVX2's byte rows (kernels/simd.py), rows of whole 256s: its int16-word product measured no
# faster than float32
Q8_ACT = (Q4_K, Q5_K, Q6_K) + ((Q8_0,) if AVX2 else ())


@njit(cache=True, nogil=True, inline="always")
def takes_q8(qt, K):
    """Whether rows of K values of type qt take 8-bit x (qt in Q8_ACT, Q8_0 with K % 256 == 0)."""
    return qt == Q4_K or qt == Q5_K or qt == Q6_K or (AVX2 and qt == Q8_0 and K % 256 == 0)


@njit(cache=True, nogil=True)
def sums32(x, xs):
    """xs[t, c] = the sum of x[t, 32c:32c+32] in numpy's order, bit for bit what
    x.reshape(T, -1, 32).sum(axis=2, dtype=np.float32) gives: zero plus numpy's pairwise sum of
    32 values (eight running sums, combined as a tree). No fastmath: the order is the result."""
    for t in range(x.shape[0]):
        for c in range(x.shape[1] // 32):
            o = 32 * c
            r0, r1, r2, r3 = x[t, o], x[t, o + 1], x[t, o + 2], x[t, o + 3]
            r4, r5, r6, r7 = x[t, o + 4], x[t, o + 5], x[t, o + 6], x[t, o + 7]
            for i in range(o + 8, o + 32, 8):
                r0 += x[t, i]
                r1 += x[t, i + 1]
                r2 += x[t, i + 2]
                r3 += x[t, i + 3]
                r4 += x[t, i + 4]
                r5 += x[t, i + 5]
                r6 += x[t, i + 6]
                r7 += x[t, i + 7]
            xs[t, c] = np.float32(0.0) + (((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)))


@njit(cache=True, nogil=True)
def prepare_x(q0, q1, q2, x, xs, qx, xd, qs, qb, bs, q8):
    """x [T, K] in the forms matrices of types q0, q1, q2 read: with q8 (activations="q8") and a
    type that takes it, rounded to 8 bits into xd [T, K/256], qs [T, K/32] and, with AVX2,
    qb [T, K] (int8) and bs [T, K/16] (int16), else qx [T, K] (int16); for Q4_K and Q5_K in
    float32, its sums over each 32 values into xs [T, K/32]. Unread buffers: any shape."""
    K = x.shape[1]
    eight = False
    sums = False
    for qt in (q0, q1, q2):
        if q8 and takes_q8(qt, K):
            eight = True
        elif qt == Q4_K or qt == Q5_K:
            sums = True
    if eight:
        if AVX2:
            quantize_x8(x, qb, xd, qs, bs)
        else:
            quantize_x8(x, qx, xd, qs)
    if sums:
        sums32(x, xs)


@njit(cache=True, nogil=True)
def rows_range(qt, w, w16, x, out, xs, qx, xd, qs, qb, bs, f16, q8, n16, n0, n1):
    """Rows max(n0, 0)..min(n1, N)-1 of out[T, N] = x[T, K] @ W.T on this thread, x prepared
    (prepare_x)."""
    n0 = max(n0, 0)
    n1 = min(n1, w.shape[0])
    if n1 <= n0:
        return
    if q8 and takes_q8(qt, x.shape[1]):
        if AVX2:
            simd.rows(qt, w, qb, xd, bs, out, n0, n1)
        else:
            rows8(qt, w, w16, qx, xd, qs, out, f16, n0, n1, n16)
    else:
        rows_f32(qt, w, w16, x, xs, out, f16, n0, n1, n16 // 2)


@njit(parallel=True, cache=True, nogil=True)
def _rows3(q0, w0, v0, o0, q1, w1, v1, o1, q2, w2, v2, o2, x, xs, qx, xd, qs, qb, bs, f16, q8, parts, n16):
    """rows_products for three matrices (one not used has no rows: w[:0]), spelled out: a
    parallel loop takes arrays and scalars, not tuples holding arrays."""
    prepare_x(q0, q1, q2, x, xs, qx, xd, qs, qb, bs, q8)
    total = w0.shape[0] + w1.shape[0] + w2.shape[0]
    parts = max(1, min(total, parts))
    if parts == 1:
        _span3(q0, w0, v0, o0, q1, w1, v1, o1, q2, w2, v2, o2, x, xs, qx, xd, qs, qb, bs, f16, q8, n16, 0, total)
        return
    per = (total + parts - 1) // parts
    for p in prange(parts):
        _span3(q0, w0, v0, o0, q1, w1, v1, o1, q2, w2, v2, o2, x, xs, qx, xd, qs, qb, bs, f16, q8, n16,
               p * per, min(total, p * per + per))


@njit(cache=True, nogil=True)
def _span3(q0, w0, v0, o0, q1, w1, v1, o1, q2, w2, v2, o2, x, xs, qx, xd, qs, qb, bs, f16, q8, n16, a, b):
    """Rows a..b-1 of the three matrices counted one after another."""
    N0, N1 = w0.shape[0], w1.shape[0]
    rows_range(q0, w0, v0, x, o0, xs, qx, xd, qs, qb, bs, f16, q8, n16, a, b)
    rows_range(q1, w1, v1, x, o1, xs, qx, xd, qs, qb, bs, f16, q8, n16, a - N0, b - N0)
    rows_range(q2, w2, v2, x, o2, xs, qx, xd, qs, qb, bs, f16, q8, n16, a - N0 - N1, b - N0 - N1)


def rows_products(ms, x, outs, xs, qx, xd, qs, qb, bs, f16, q8, parts, n16):
    """outs[i][T, N_i] = x[T, K] @ W_i.T for each of one to three matrices ms (a tuple of
    (qtype, w, w16), types in ROWS, one K): x prepared once (prepare_x: q8 and the buffers), the
    rows of all, one after another, in `parts` ranges in parallel; on the calling thread when
    parts is 1 (so a caller's own parallel loop may call it). f16: F16_TABLE.

    n16 is 16, an argument from Python: the kernels take their loop lengths (16, 32) at run
    time, and a literal passed from compiled code would make numba compile them for that
    constant, which LLVM unrolls into scalar code that sums in another order."""


@overload(rows_products)
def _rows_products(ms, x, outs, xs, qx, xd, qs, qb, bs, f16, q8, parts, n16):
    n = len(ms)
    if n == 1:
        def impl(ms, x, outs, xs, qx, xd, qs, qb, bs, f16, q8, parts, n16):
            (q0, w0, v0), o0 = ms[0], outs[0]
            _rows3(q0, w0, v0, o0, q0, w0[:0], v0[:0], o0, q0, w0[:0], v0[:0], o0,
                   x, xs, qx, xd, qs, qb, bs, f16, q8, parts, n16)
    elif n == 2:
        def impl(ms, x, outs, xs, qx, xd, qs, qb, bs, f16, q8, parts, n16):
            (q0, w0, v0), (q1, w1, v1) = ms
            _rows3(q0, w0, v0, outs[0], q1, w1, v1, outs[1], q0, w0[:0], v0[:0], outs[0],
                   x, xs, qx, xd, qs, qb, bs, f16, q8, parts, n16)
    elif n == 3:
        def impl(ms, x, outs, xs, qx, xd, qs, qb, bs, f16, q8, parts, n16):
            (q0, w0, v0), (q1, w1, v1), (q2, w2, v2) = ms
            _rows3(q0, w0, v0, outs[0], q1, w1, v1, outs[1], q2, w2, v2, outs[2],
                   x, xs, qx, xd, qs, qb, bs, f16, q8, parts, n16)
    else:
        return None
    return impl


@njit(cache=True, nogil=True)
def rows_product(qt, w, w16, x, out, xs, qx, xd, qs, qb, bs, f16, q8, parts, n16):
    """out[T, N] = x[T, K] @ W.T for one matrix of a type in ROWS: rows_products."""
    rows_products(((qt, w, w16),), x, (out,), xs, qx, xd, qs, qb, bs, f16, q8, parts, n16)
