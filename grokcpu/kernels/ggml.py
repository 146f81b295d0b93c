"""A ggml matrix times a few rows of x, as one compiled entry: the decode product of its type
in kernels/quants.py (matvec_fast, or matvec_q8 after quantize_x8), with the inputs that
kernel takes. grokcpu.quant.matvec calls it from Python, the fused decode kernels
(kernels/decode.py) from compiled code, so both run the same arithmetic.

A matrix is (qtype, w, w16): w uint8 [N, row_bytes] read-only, w16 its uint16 view
(grokcpu.quant.prepared makes one).
"""

import numpy as np
from numba import njit

from . import simd
from .quants import Q4_K, Q5_K, Q6_K, Q8_0, f16_table, matvec_fast, matvec_q8, quantize_x8

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
def rows_product(qt, w, w16, x, out, xs, qx, xd, qs, qb, bs, f16, q8, parts, n16):
    """out[T, N] = x[T, K] @ W.T for a matrix of a type in ROWS, `parts` ranges of
    its rows in parallel. q8 (activations="q8"), for the types that take it: x rounded to 8
    bits first, into xd [T, K/256], qs [T, K/32] and, with AVX2, qb [T, K] (int8) and bs
    [T, K/16] (int16), else qx [T, K] (int16); the other layout's buffers are unread. Otherwise xs [T, K/32]
    receives x's sums over each 32 values, for Q4_K and Q5_K (unread by the others: any
    shape). f16: F16_TABLE.

    n16 is 16, an argument from Python: the kernels take their loop lengths (16, 32) at run
    time, and a literal passed from compiled code would make numba compile them for that
    constant, which LLVM unrolls into scalar code that sums in another order."""
    if q8 and takes_q8(qt, x.shape[1]):
        if AVX2:
            quantize_x8(x, qb, xd, qs, bs)
            simd.matvec_q8(qt, w, qb, xd, bs, out, parts)
        else:
            quantize_x8(x, qx, xd, qs)
            matvec_q8(qt, w, w16, qx, xd, qs, out, f16, parts, n16)
        return
    if qt == Q4_K or qt == Q5_K:
        sums32(x, xs)
    matvec_fast(qt, w, w16, x, xs, out, f16, parts, 2 * n16)
