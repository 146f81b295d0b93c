"""Products and dequantization on ggml's block formats, with float32 activations.

A matrix is uint8 [N_out, row_bytes]: each row holds K input values as consecutive blocks of
one ggml type. dequant_rows decodes Q8_0, Q4_K and Q6_K with a loop each, the grid i-quants
(IQ1_S .. IQ3_S) with one block decoder, and every other type the same way: a block becomes its
quant values as float32 (q) and, per sub-block s of SUB values, a scale and an offset, so that
value = scale[s] * q - offset[s]. The non-linear types' value tables come in as one Tables.
The hot types (Q8_0, Q4_K, Q5_K, Q6_K; IQ3_XXS, IQ3_S) have a dedicated decode product each
(rows_f32, run by kernels/ggml.py; matvec_iq3); grokcpu.quant.matvec multiplies the others by tiles of dequant_rows.
Opt-in, the K-quants also have decode products on x rounded to 8 bits (quantize_x8, rows8, or
kernels/simd.py with AVX2: integer sums, faster, not exact).
"""

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from .prefetch import prefetch_bytes

# ggml type ids (ggml.h's enum ggml_type), and the ones these kernels read
F32, F16, Q4_0, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, BF16 = (
    0, 1, 2, 8, 10, 11, 12, 13, 14, 20, 23, 30)
IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ3_S, IQ2_S, IQ1_M = 16, 17, 18, 19, 21, 22, 29
TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
              10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
              17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
              23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
              30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}
# type id -> (values per block, bytes per block, values per sub-block) for the types read here
LAYOUT = {F32: (32, 128, 32), F16: (32, 64, 32), BF16: (32, 64, 32), Q8_0: (32, 34, 32),
          Q4_0: (32, 18, 32), IQ4_NL: (32, 18, 32), Q4_K: (256, 144, 32), Q5_K: (256, 176, 32),
          Q6_K: (256, 210, 16), Q2_K: (256, 84, 16), Q3_K: (256, 110, 16), IQ4_XS: (256, 136, 32),
          IQ3_XXS: (256, 98, 32), IQ3_S: (256, 110, 32), IQ2_XXS: (256, 66, 32), IQ2_XS: (256, 74, 16),
          IQ2_S: (256, 82, 16), IQ1_S: (256, 50, 32), IQ1_M: (256, 56, 16)}
IQ1S_DELTA = np.float32(0.125)            # ggml's IQ1S_DELTA: IQ1_S/IQ1_M values are dl * (grid +- delta)


class Tables(NamedTuple):
    """The value tables of the non-linear types, one argument to the kernels (filled by
    grokcpu.quant from gguf-py's classes). Grids: row g holds the values of grid index g."""
    kvalues: np.ndarray     # float32 [16]: IQ4_NL's and IQ4_XS's levels (ggml's kvalues_iq4nl)
    ksigns: np.ndarray      # uint8 [128]: 7 stored sign bits -> 8, the 8th giving even parity
    iq2xxs: np.ndarray      # float32 [256, 8]
    iq2xs: np.ndarray       # float32 [512, 8]
    iq2s: np.ndarray        # float32 [1024, 8]
    iq3xxs: np.ndarray      # float32 [256, 4]
    iq3s: np.ndarray        # float32 [512, 4]
    iq1s: np.ndarray        # float32 [2048, 8] of -1, 0, 1 (IQ1_S and IQ1_M)
    iq3xxs_packed: np.ndarray   # uint32 [256]: iq3xxs's rows, a value a byte (the decode products)
    iq3s_packed: np.ndarray     # uint32 [512]


@njit(cache=True, nogil=True, inline="always")
def _layout(qt):
    """(values per block, bytes per block, values per sub-block) of type qt (LAYOUT in numba)."""
    if qt == Q8_0:
        return 32, 34, 32
    if qt == Q4_K:
        return 256, 144, 32
    if qt == Q6_K:
        return 256, 210, 16
    if qt == Q5_K:
        return 256, 176, 32
    if qt == Q4_0 or qt == IQ4_NL:
        return 32, 18, 32
    if qt == Q2_K:
        return 256, 84, 16
    if qt == Q3_K:
        return 256, 110, 16
    if qt == IQ4_XS:
        return 256, 136, 32
    if qt == IQ3_XXS:
        return 256, 98, 32
    if qt == IQ3_S:
        return 256, 110, 32
    if qt == IQ2_XXS:
        return 256, 66, 32
    if qt == IQ2_XS:
        return 256, 74, 16
    if qt == IQ2_S:
        return 256, 82, 16
    if qt == IQ1_S:
        return 256, 50, 32
    if qt == IQ1_M:
        return 256, 56, 16
    if qt == F32:
        return 32, 128, 32
    return 32, 64, 32                     # F16, BF16


@njit(cache=True, nogil=True)
def f16_to_f32(lo, hi):
    """The IEEE half with bytes lo, hi (little-endian) as float32, exactly (products of
    powers of two: no libm call on the hot path)."""
    h = (np.int32(hi) << 8) | np.int32(lo)
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:
        v = np.float32(m) * np.float32(5.9604645e-08)          # subnormal: m * 2**-24
    elif e == 31:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    else:
        v = np.float32(1024 + m) * np.float32(1 << e) * np.float32(2.9802322e-08)   # * 2**-25
    return -v if h & 0x8000 else v


@njit(cache=True, nogil=True)
def _k4_scales(r, o, d, dmin, scale, off):
    """Q4_K/Q5_K's eight 6-bit scales and mins, packed in the 12 bytes r[o:o+12] (ggml's
    get_scale_min_k4), times the block's d and dmin."""
    for j in range(8):
        if j < 4:
            s = np.int32(r[o + j]) & 63
            m = np.int32(r[o + j + 4]) & 63
        else:
            s = (np.int32(r[o + j + 4]) & 15) | ((np.int32(r[o + j - 4]) >> 6) << 4)
            m = (np.int32(r[o + j + 4]) >> 4) | ((np.int32(r[o + j]) >> 6) << 4)
        scale[j] = d * np.float32(s)
        off[j] = dmin * np.float32(m)


@njit(cache=True, nogil=True)
def _decode(qt, r, o, q, qu, scale, off, kv, n32):
    """The block at r[o:o+bytes] -> quant values q[QK] (float32; qu is q's uint32 view),
    scale[nsub] and off[nsub], for the types without a loop of their own in dequant_rows.
    Indexing, not slicing: a slice costs a reference count.
    n32 is 32, passed at run time: LLVM unrolls a literal 32-iteration loop into scalar code
    rather than vectorizing it (four times slower here)."""
    n16 = n32 // 2
    if qt == Q5_K:
        _k4_scales(r, o + 4, f16_to_f32(r[o], r[o + 1]), f16_to_f32(r[o + 2], r[o + 3]), scale, off)
        for j in range(4):
            for i in range(n32):
                b = r[o + 48 + 32 * j + i]
                h = r[o + 16 + i] >> (2 * j)
                q[64 * j + i] = np.float32((b & 15) | ((h & 1) << 4))
                q[64 * j + 32 + i] = np.float32((b >> 4) | ((h & 2) << 3))
    elif qt == Q4_0 or qt == IQ4_NL:
        scale[0] = f16_to_f32(r[o], r[o + 1])
        off[0] = 0.0
        for i in range(n16):
            b = r[o + 2 + i]
            if qt == Q4_0:
                q[i] = np.float32(np.int32(b & 15) - 8)
                q[16 + i] = np.float32(np.int32(b >> 4) - 8)
            else:
                q[i] = kv[b & 15]
                q[16 + i] = kv[b >> 4]
    elif qt == IQ4_XS:
        d = f16_to_f32(r[o], r[o + 1])
        sh = (np.int32(r[o + 3]) << 8) | np.int32(r[o + 2])
        for j in range(8):
            ls = ((np.int32(r[o + 4 + j // 2]) >> (4 * (j % 2))) & 15) | (((sh >> (2 * j)) & 3) << 4)
            scale[j] = d * np.float32(ls - 32)
            off[j] = 0.0
            for i in range(n16):
                b = r[o + 8 + 16 * j + i]
                q[32 * j + i] = kv[b & 15]
                q[32 * j + 16 + i] = kv[b >> 4]
    elif qt == Q2_K:
        d = f16_to_f32(r[o + 80], r[o + 81])
        dmin = f16_to_f32(r[o + 82], r[o + 83])
        for j in range(16):
            scale[j] = d * np.float32(r[o + j] & 15)
            off[j] = dmin * np.float32(r[o + j] >> 4)
        for h in range(2):
            for s in range(4):
                for i in range(n32):
                    q[128 * h + 32 * s + i] = np.float32((r[o + 16 + 32 * h + i] >> (2 * s)) & 3)
    elif qt == Q3_K:
        d = f16_to_f32(r[o + 108], r[o + 109])
        for j in range(16):
            lo = (np.int32(r[o + 96 + j % 8]) >> (4 * (j // 8))) & 15
            hi = (np.int32(r[o + 104 + j % 4]) >> (2 * (j // 4))) & 3
            scale[j] = d * np.float32((lo | (hi << 4)) - 32)
            off[j] = 0.0
        for h in range(2):
            for s in range(4):
                for i in range(n32):
                    v = (np.int32(r[o + 32 + 32 * h + i]) >> (2 * s)) & 3
                    if not (np.int32(r[o + i]) >> (4 * h + s)) & 1:
                        v -= 4                  # a clear high bit means minus four
                    q[128 * h + 32 * s + i] = np.float32(v)
    elif qt == F16:
        scale[0] = 1.0
        off[0] = 0.0
        for i in range(n32):
            q[i] = f16_to_f32(r[o + 2 * i], r[o + 2 * i + 1])
    else:                                 # F32, or BF16: the high half of a float32
        scale[0] = 1.0
        off[0] = 0.0
        for i in range(n32):
            if qt == F32:
                qu[i] = (np.uint32(r[o + 4 * i]) | (np.uint32(r[o + 4 * i + 1]) << 8)
                         | (np.uint32(r[o + 4 * i + 2]) << 16) | (np.uint32(r[o + 4 * i + 3]) << 24))
            else:
                qu[i] = (np.uint32(r[o + 2 * i]) << 16) | (np.uint32(r[o + 2 * i + 1]) << 24)


@njit(cache=True, nogil=True)
def _block_values(qt, r, o, q, qu, scale, off, kv, n32, SUB, v):
    """v[QK] = the values of the block at r[o:]: scale and offset applied per sub-block."""
    _decode(qt, r, o, q, qu, scale, off, kv, n32)
    for s in range(q.shape[0] // SUB):
        sc = scale[s]
        m = off[s]
        for i in range(SUB):
            v[s * SUB + i] = sc * q[s * SUB + i] - m


@njit(cache=True, nogil=True)
def _deq_q8_0(row, o, n32):
    """One Q8_0 row into o: d * q per block (a vector loop: n32 = 32 at run time)."""
    for b in range(o.shape[0] // 32):
        d = f16_to_f32(row[b * 34], row[b * 34 + 1])
        for i in range(n32):
            o[b * 32 + i] = d * np.float32(np.int8(row[b * 34 + 2 + i]))


@njit(cache=True, nogil=True)
def _deq_q4_K(row, o, scale, off, n32):
    """One Q4_K row into o: per 32 values d*sc * nibble - dmin*m."""
    for b in range(o.shape[0] // 256):
        k = b * 144
        _k4_scales(row, k + 4, f16_to_f32(row[k], row[k + 1]), f16_to_f32(row[k + 2], row[k + 3]), scale, off)
        for j in range(4):
            s0, m0, s1, m1 = scale[2 * j], off[2 * j], scale[2 * j + 1], off[2 * j + 1]
            q = k + 16 + 32 * j
            v = b * 256 + 64 * j
            for i in range(n32):
                c = row[q + i]
                o[v + i] = s0 * np.float32(c & 15) - m0
                o[v + 32 + i] = s1 * np.float32(c >> 4) - m1


@njit(cache=True, nogil=True)
def _deq_q6_K(row, o, n32):
    """One Q6_K row into o: d*sc * (q - 32), sc per 16 values, q from low nibbles and bit pairs."""
    for b in range(o.shape[0] // 256):
        k = b * 210
        d = f16_to_f32(row[k + 208], row[k + 209])
        for h in range(2):
            ql, qh, sc, v = k + 64 * h, k + 128 + 32 * h, k + 192 + 8 * h, b * 256 + 128 * h
            for i in range(n32):
                a, c, e = row[ql + i], row[ql + 32 + i], row[qh + i]
                is_ = i // 16
                o[v + i] = (d * np.float32(np.int8(row[sc + is_]))) * np.float32(np.int32((a & 15) | ((e & 3) << 4)) - 32)
                o[v + 32 + i] = (d * np.float32(np.int8(row[sc + 2 + is_]))) * \
                    np.float32(np.int32((c & 15) | (((e >> 2) & 3) << 4)) - 32)
                o[v + 64 + i] = (d * np.float32(np.int8(row[sc + 4 + is_]))) * \
                    np.float32(np.int32((a >> 4) | (((e >> 4) & 3) << 4)) - 32)
                o[v + 96 + i] = (d * np.float32(np.int8(row[sc + 6 + is_]))) * \
                    np.float32(np.int32((c >> 4) | (((e >> 6) & 3) << 4)) - 32)


# ---- The grid i-quants (IQ1_*, IQ2_*, IQ3_*): a block of 256 values holds per group of 8
# (IQ3: 4) values an index into a grid of value vectors, per 32 (or 16) values a scale, and
# per value a sign (IQ1: per 8 values a shift +-delta instead). The values are computed in
# gguf-py's (and ggml's dequantize_row_iq*) order of float32 operations: the same bits.

@njit(cache=True, nogil=True, inline="always")
def _u16(r, o):
    """The little-endian uint16 at r[o:o+2], as int32."""
    return np.int32(r[o]) | (np.int32(r[o + 1]) << 8)


@njit(cache=True, nogil=True, inline="always")
def _u32(r, o):
    """The little-endian uint32 at r[o:o+4]."""
    return (np.uint32(r[o]) | (np.uint32(r[o + 1]) << 8) | (np.uint32(r[o + 2]) << 16)
            | (np.uint32(r[o + 3]) << 24))


@njit(cache=True, nogil=True, inline="always")
def _signed(out, v, db, grid, g, signs):
    """out[v:v+w] = db * grid[g] (w its width), value j negated where bit j of signs is set."""
    for j in range(grid.shape[1]):
        a = db * grid[g, j]
        out[v + j] = -a if (signs >> j) & 1 else a


@njit(cache=True, nogil=True, inline="always")
def _shifted(out, v, dl, grid, g, delta):
    """out[v:v+8] = dl * (grid[g] + delta) (IQ1_S, IQ1_M)."""
    for j in range(8):
        out[v + j] = dl * (grid[g, j] + delta)


@njit(cache=True, nogil=True, inline="always")
def _half_scale(d, s, quarter):
    """d * (0.5 + s) * (0.25 or 0.5): the IQ2 and IQ3_XXS scales, in gguf-py's order."""
    return d * (np.float32(0.5) + np.float32(s)) * (np.float32(0.25) if quarter else np.float32(0.5))


@njit(cache=True, nogil=True)
def _deq_grid_block(qt, r, o, out, v, tb):
    """out[v:v+256] = the values of the grid i-quant block at r[o:] (qt: its type)."""
    if qt == IQ1_M:                       # its four uint16 of 3-bit scales carry d in their top nibbles
        sc0, sc1, sc2, sc3 = _u16(r, o + 48), _u16(r, o + 50), _u16(r, o + 52), _u16(r, o + 54)
        hd = (sc0 >> 12) | ((sc1 >> 8) & 0xF0) | ((sc2 >> 4) & 0xF00) | (sc3 & 0xF000)
        d = f16_to_f32(hd & 255, hd >> 8)
    else:
        d = f16_to_f32(r[o], r[o + 1])
    if qt == IQ3_XXS:                     # 64 grid bytes, then per 32 values a uint32: 4 x 7 sign bits, scale
        for ib in range(8):
            aux = _u32(r, o + 66 + 4 * ib)
            db = _half_scale(d, aux >> 28, False)
            for l in range(4):
                s = tb.ksigns[(aux >> (7 * l)) & 127]
                q = o + 2 + 8 * ib + 2 * l
                _signed(out, v + 32 * ib + 8 * l, db, tb.iq3xxs, r[q], s)
                _signed(out, v + 32 * ib + 8 * l + 4, db, tb.iq3xxs, r[q + 1], s >> 4)
    elif qt == IQ3_S:                     # 64 grid low bytes, 8 of ninth bits, 32 of signs, 4 of scales
        for ib in range(8):
            db = d * np.float32(1 + 2 * ((np.int32(r[o + 106 + ib // 2]) >> (4 * (ib % 2))) & 15))
            h = np.int32(r[o + 66 + ib])
            for l in range(4):
                s = r[o + 74 + 4 * ib + l]
                q = o + 2 + 8 * ib + 2 * l
                _signed(out, v + 32 * ib + 8 * l, db, tb.iq3s, np.int32(r[q]) | (((h >> (2 * l)) & 1) << 8), s)
                _signed(out, v + 32 * ib + 8 * l + 4, db, tb.iq3s,
                        np.int32(r[q + 1]) | (((h >> (2 * l + 1)) & 1) << 8), s >> 4)
    elif qt == IQ2_XXS:                   # per 32 values: 4 grid bytes, a uint32 of 4 x 7 sign bits and scale
        for ib in range(8):
            aux = _u32(r, o + 6 + 8 * ib)
            db = _half_scale(d, aux >> 28, True)
            for l in range(4):
                _signed(out, v + 32 * ib + 8 * l, db, tb.iq2xxs, r[o + 2 + 8 * ib + l],
                        tb.ksigns[(aux >> (7 * l)) & 127])
    elif qt == IQ2_XS:                    # uint16s of 9-bit grid index and 7 sign bits, then 8 scale bytes
        for ib in range(8):
            db0, db1 = _half_scale(d, r[o + 66 + ib] & 15, True), _half_scale(d, r[o + 66 + ib] >> 4, True)
            for l in range(4):
                g = _u16(r, o + 2 + 8 * ib + 2 * l)
                _signed(out, v + 32 * ib + 8 * l, db0 if l < 2 else db1, tb.iq2xs, g & 511, tb.ksigns[g >> 9])
    elif qt == IQ2_S:                     # 32 grid low bytes, 32 of signs, 8 of high bit pairs, 8 of scales
        for ib in range(8):
            db0, db1 = _half_scale(d, r[o + 74 + ib] & 15, True), _half_scale(d, r[o + 74 + ib] >> 4, True)
            h = np.int32(r[o + 66 + ib])
            for l in range(4):
                _signed(out, v + 32 * ib + 8 * l, db0 if l < 2 else db1, tb.iq2s,
                        np.int32(r[o + 2 + 4 * ib + l]) | (((h >> (2 * l)) & 3) << 8), r[o + 34 + 4 * ib + l])
    elif qt == IQ1_S:                     # 32 grid low bytes; per 32 values a uint16: 4 x 3 high bits,
        for ib in range(8):               # 3-bit scale, delta's sign
            h = _u16(r, o + 34 + 2 * ib)
            dl = d * np.float32(2 * ((h >> 12) & 7) + 1)
            delta = -IQ1S_DELTA if h & 0x8000 else IQ1S_DELTA
            for l in range(4):
                g = np.int32(r[o + 2 + 4 * ib + l]) | (((h >> (3 * l)) & 7) << 8)
                _shifted(out, v + 32 * ib + 8 * l, dl, tb.iq1s, g, delta)
    else:                                 # IQ1_M: 32 grid low bytes, 16 bytes of (3 high bits, delta's sign)
        for ib in range(8):               # nibbles, then the scales (above)
            sc = (sc0, sc1, sc2, sc3)[ib // 2] >> (6 * (ib % 2))
            for l in range(4):
                h = np.int32(r[o + 32 + 2 * ib + l // 2]) >> (4 * (l % 2))
                dl = d * np.float32(2 * ((sc >> (3 * (l // 2))) & 7) + 1)
                _shifted(out, v + 32 * ib + 8 * l, dl, tb.iq1s, np.int32(r[o + 4 * ib + l]) | ((h & 7) << 8),
                         -IQ1S_DELTA if h & 8 else IQ1S_DELTA)


@njit(cache=True, nogil=True, inline="always")
def _is_grid(qt):
    """Whether qt is one of the grid i-quants (_deq_grid_block's types)."""
    return (qt == IQ3_XXS or qt == IQ3_S or qt == IQ2_XXS or qt == IQ2_XS or qt == IQ2_S or qt == IQ1_S
            or qt == IQ1_M)


@njit(parallel=True, cache=True, nogil=True)
def dequant_rows(qt, w, r0, r1, out, tb, n32):
    """out[r1-r0, K] = rows r0..r1-1 of the ggml matrix w of type qt, as float32 (a tile for
    BLAS). Q8_0, Q4_K and Q6_K (the prefill types of Q8_0 and Q4_K_M files) have a loop each,
    6-15x faster than the generic block decoder the others take; the same values to the bit.
    The grid i-quants decode a block at a time straight into the row. tb: Tables; n32: 32
    (see _decode)."""
    K = out.shape[1]
    QK, BB, SUB = _layout(qt)
    kv = tb.kvalues
    for r in prange(r1 - r0):
        row = w[r0 + r]
        o = out[r]
        if qt == Q8_0:
            _deq_q8_0(row, o, n32)
        elif qt == Q6_K:
            _deq_q6_K(row, o, n32)
        elif qt == Q4_K:
            _deq_q4_K(row, o, np.empty(8, np.float32), np.empty(8, np.float32), n32)
        elif _is_grid(qt):
            for b in range(K // 256):
                _deq_grid_block(qt, row, b * BB, o, b * 256, tb)
        else:
            scale = np.empty(QK // SUB, np.float32)
            off = np.empty(QK // SUB, np.float32)
            q = np.empty(QK, np.float32)
            qu = q.view(np.uint32)
            for b in range(K // QK):
                _block_values(qt, row, b * BB, q, qu, scale, off, kv, n32, SUB, o[b * QK:(b + 1) * QK])


# ---- Dedicated decode products for the hot types: out[T, N] = x[T, K] @ W.T, one kernel per
# type, index arithmetic only. Q8_0: a loop over eight lanes takes lane l of every group of
# eight values of eight blocks, each block's share times its d. K-quants: a loop over eight
# lanes (n8 = 8 at run time: one 8-wide vector iteration; a literal 8 is unrolled into scalar
# code) takes lane l of every group of eight values of a whole block (Q4_K, Q5_K) or half block (Q6_K),
# sums quant * x per sub-block and adds those sums times the sub-blocks' scales, decoded once
# per block, into eight lane accumulators summed once per row; Q4_K/Q5_K offsets go through
# xs, the sums of x over each 32-value sub-block. Quants are cast through int32 (int64 has no
# vector conversion to float); the per-block helpers are inlined (a call in the lane loop stops
# it vectorizing). Each of `parts` threads takes a contiguous range of output rows (one
# stream) in a serial function: the same loops inside the parallel region ran 2.6x slower.
# A block is decoded again for each row of x. w16 is w viewed as uint16, f16 = f16_table():
# a half is one load.
# Software prefetch (kernels/prefetch.py): the hardware prefetchers alone kept one stream per
# thread far below the memory's speed (a 2-core Xeon VM: Q8_0 at a third of its speed from L2).
# Q8_0 asks for the whole next row at the start of each row; the K-quants ask, per block, for
# the bytes AHEAD further on in w (pf: w's flat offset of that point for the row's start).
# Same bits out; 1.1-2x on DRAM-sized matrices, 0-13 % slower at L2 size (docs/PERFORMANCE.md).
AHEAD = 3072


def f16_table():
    """float32 [65536]: the value of each IEEE half bit pattern."""
    return np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _q8_lane(row, o, xt, xo, l):
    """Lane l of one Q8_0 block's dot product: its int8 at o + l, o + 8 + l, .. times x."""
    return ((np.float32(np.int8(row[o + l])) * xt[xo + l] + np.float32(np.int8(row[o + 8 + l])) * xt[xo + 8 + l])
            + (np.float32(np.int8(row[o + 16 + l])) * xt[xo + 16 + l]
               + np.float32(np.int8(row[o + 24 + l])) * xt[xo + 24 + l]))


@njit(cache=True, fastmath=True, nogil=True)
def _row_q8_0(row, r16, xt, f16, acc, n8, n32):
    """The dot product of x with one Q8_0 row (34-byte blocks: half d, 32 int8). Eight blocks
    per lane iteration, each lane's sum scaled by its block's d: no horizontal sum per block
    (1.4-1.6x the block-at-a-time loop). Blocks past the last whole eight: one at a time."""
    acc[:] = 0.0
    K = xt.shape[0]
    for g in range(K // 256):
        o = g * 272 + 2
        h = g * 136
        d0, d1, d2, d3 = f16[r16[h]], f16[r16[h + 17]], f16[r16[h + 34]], f16[r16[h + 51]]
        d4, d5, d6, d7 = f16[r16[h + 68]], f16[r16[h + 85]], f16[r16[h + 102]], f16[r16[h + 119]]
        xo = g * 256
        for l in range(n8):
            acc[l] += (((d0 * _q8_lane(row, o, xt, xo, l) + d1 * _q8_lane(row, o + 34, xt, xo + 32, l))
                        + (d2 * _q8_lane(row, o + 68, xt, xo + 64, l) + d3 * _q8_lane(row, o + 102, xt, xo + 96, l)))
                       + ((d4 * _q8_lane(row, o + 136, xt, xo + 128, l) + d5 * _q8_lane(row, o + 170, xt, xo + 160, l))
                          + (d6 * _q8_lane(row, o + 204, xt, xo + 192, l)
                             + d7 * _q8_lane(row, o + 238, xt, xo + 224, l))))
    tot = acc.sum()
    for b in range(K // 256 * 8, K // 32):
        s = np.float32(0.0)
        for i in range(n32):
            s += np.float32(np.int8(row[b * 34 + 2 + i])) * xt[b * 32 + i]
        tot += f16[r16[b * 17]] * s
    return tot


@njit(cache=True, fastmath=True, nogil=True)
def _rows_q8_0(w, w16, x, xs, out, f16, n0, n1, n32):
    """Rows n0..n1-1 of Q8_0, the next row's bytes prefetched as each row starts."""
    rb = w.shape[1]
    acc = np.empty(8, np.float32)
    for n in range(n0, n1):
        prefetch_bytes(w, (n + 1) * rb, rb)
        for t in range(x.shape[0]):
            out[t, n] = _row_q8_0(w[n], w16[n], x[t], f16, acc, n32 // 4, n32)


@njit(cache=True, nogil=True)
def _k4_pair(r, o, j):
    """Scales and mins (6 bits each) of sub-blocks 2j and 2j+1 of the Q4_K/Q5_K block at r[o:]
    (ggml's get_scale_min_k4 on its 12 bytes at o + 4)."""
    k = o + 2 * j
    if j < 2:
        return (np.int32(r[k + 4]) & 63, np.int32(r[k + 8]) & 63,
                np.int32(r[k + 5]) & 63, np.int32(r[k + 9]) & 63)
    return ((np.int32(r[k + 8]) & 15) | ((np.int32(r[k]) >> 6) << 4),
            (np.int32(r[k + 8]) >> 4) | ((np.int32(r[k + 4]) >> 6) << 4),
            (np.int32(r[k + 9]) & 15) | ((np.int32(r[k + 1]) >> 6) << 4),
            (np.int32(r[k + 9]) >> 4) | ((np.int32(r[k + 5]) >> 6) << 4))


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _k4_block(r, o, d, dmin, xs, t, k):
    """The eight scales d*sc of the Q4_K/Q5_K block at r[o:], and its offsets' share of the
    dot product: dmin * sum of m * (sum of x over the sub-block), xs[t, k:k+8] those sums."""
    sc0, m0, sc1, m1 = _k4_pair(r, o, 0)
    sc2, m2, sc3, m3 = _k4_pair(r, o, 1)
    sc4, m4, sc5, m5 = _k4_pair(r, o, 2)
    sc6, m6, sc7, m7 = _k4_pair(r, o, 3)
    mins = dmin * (((np.float32(m0) * xs[t, k] + np.float32(m1) * xs[t, k + 1])
                    + (np.float32(m2) * xs[t, k + 2] + np.float32(m3) * xs[t, k + 3]))
                   + ((np.float32(m4) * xs[t, k + 4] + np.float32(m5) * xs[t, k + 5])
                      + (np.float32(m6) * xs[t, k + 6] + np.float32(m7) * xs[t, k + 7])))
    return (d * np.float32(sc0), d * np.float32(sc1), d * np.float32(sc2), d * np.float32(sc3),
            d * np.float32(sc4), d * np.float32(sc5), d * np.float32(sc6), d * np.float32(sc7), mins)


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _nibbles(r, q, xt, i, h, sh, five):
    """Lane sums of one Q4_K/Q5_K sub-block pair: low nibbles of bytes q, q+8, q+16, q+24 times
    x at i, i+8, .., high nibbles times x at i+32, ..; Q5_K (five): plus 16 where bit sh (low)
    or sh+1 (high) of the byte at h + 8m is set."""
    c0 = np.int32(r[q])
    c1 = np.int32(r[q + 8])
    c2 = np.int32(r[q + 16])
    c3 = np.int32(r[q + 24])
    l0, l1, l2, l3 = c0 & 15, c1 & 15, c2 & 15, c3 & 15
    h0, h1, h2, h3 = c0 >> 4, c1 >> 4, c2 >> 4, c3 >> 4
    if five:
        e0 = np.int32(r[h]) >> sh
        e1 = np.int32(r[h + 8]) >> sh
        e2 = np.int32(r[h + 16]) >> sh
        e3 = np.int32(r[h + 24]) >> sh
        l0, l1, l2, l3 = l0 | ((e0 & 1) << 4), l1 | ((e1 & 1) << 4), l2 | ((e2 & 1) << 4), l3 | ((e3 & 1) << 4)
        h0, h1, h2, h3 = h0 | ((e0 & 2) << 3), h1 | ((e1 & 2) << 3), h2 | ((e2 & 2) << 3), h3 | ((e3 & 2) << 3)
    s0 = ((np.float32(np.int32(l0)) * xt[i] + np.float32(np.int32(l1)) * xt[i + 8])
          + (np.float32(np.int32(l2)) * xt[i + 16] + np.float32(np.int32(l3)) * xt[i + 24]))
    s1 = ((np.float32(np.int32(h0)) * xt[i + 32] + np.float32(np.int32(h1)) * xt[i + 40])
          + (np.float32(np.int32(h2)) * xt[i + 48] + np.float32(np.int32(h3)) * xt[i + 56]))
    return s0, s1


@njit(cache=True, fastmath=True, nogil=True)
def _row_q4_K(row, r16, xt, xs, t, f16, acc, n8, w, pf):
    """The dot product of x[t] with one Q4_K row (144-byte blocks: half d, half dmin, 12 bytes
    of 6-bit scales and mins, 128 bytes of nibbles; a value is d*sc*q - dmin*m)."""
    acc[:] = 0.0
    mins = np.float32(0.0)
    for b in range(xt.shape[0] // 256):
        o = b * 144
        prefetch_bytes(w, pf + o, 144)
        a0, a1, a2, a3, a4, a5, a6, a7, m = _k4_block(row, o, f16[r16[o // 2]], f16[r16[o // 2 + 1]], xs, t, 8 * b)
        mins += m
        q = o + 16
        xo = b * 256
        for l in range(n8):
            s0, s1 = _nibbles(row, q + l, xt, xo + l, 0, 0, False)
            s2, s3 = _nibbles(row, q + 32 + l, xt, xo + 64 + l, 0, 0, False)
            s4, s5 = _nibbles(row, q + 64 + l, xt, xo + 128 + l, 0, 0, False)
            s6, s7 = _nibbles(row, q + 96 + l, xt, xo + 192 + l, 0, 0, False)
            acc[l] += ((a0 * s0 + a1 * s1) + (a2 * s2 + a3 * s3)) + ((a4 * s4 + a5 * s5) + (a6 * s6 + a7 * s7))
    return acc.sum() - mins


@njit(cache=True, fastmath=True, nogil=True)
def _row_q5_K(row, r16, xt, xs, t, f16, acc, n8, w, pf):
    """The dot product of x[t] with one Q5_K row (176-byte blocks: Q4_K's, with 32 bytes of
    fifth bits before the nibbles). A separate function from Q4_K's so that LLVM sees `five`
    as a constant: a run-time flag inside the lane loop stops it vectorizing."""
    acc[:] = 0.0
    mins = np.float32(0.0)
    for b in range(xt.shape[0] // 256):
        o = b * 176
        prefetch_bytes(w, pf + o, 176)
        a0, a1, a2, a3, a4, a5, a6, a7, m = _k4_block(row, o, f16[r16[o // 2]], f16[r16[o // 2 + 1]], xs, t, 8 * b)
        mins += m
        q = o + 48
        xo = b * 256
        for l in range(n8):
            s0, s1 = _nibbles(row, q + l, xt, xo + l, o + 16 + l, 0, True)
            s2, s3 = _nibbles(row, q + 32 + l, xt, xo + 64 + l, o + 16 + l, 2, True)
            s4, s5 = _nibbles(row, q + 64 + l, xt, xo + 128 + l, o + 16 + l, 4, True)
            s6, s7 = _nibbles(row, q + 96 + l, xt, xo + 192 + l, o + 16 + l, 6, True)
            acc[l] += ((a0 * s0 + a1 * s1) + (a2 * s2 + a3 * s3)) + ((a4 * s4 + a5 * s5) + (a6 * s6 + a7 * s7))
    return acc.sum() - mins


@njit(cache=True, fastmath=True, nogil=True)
def _rows_q45_K(w, w16, x, xs, out, f16, n0, n1, n8, five):
    """Rows n0..n1-1 of Q4_K or (five) Q5_K."""
    acc = np.empty(8, np.float32)
    for n in range(n0, n1):
        pf = n * w.shape[1] + AHEAD
        for t in range(x.shape[0]):
            if five:
                out[t, n] = _row_q5_K(w[n], w16[n], x[t], xs, t, f16, acc, n8, w, pf)
            else:
                out[t, n] = _row_q4_K(w[n], w16[n], x[t], xs, t, f16, acc, n8, w, pf)


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _q6_quarter(r, ql, qh, sh, xt, i):
    """Lane sums of a quarter of a Q6_K block: values from the low nibbles of bytes ql + 8m
    (x at i + 8m, 16 values per scale: u0 for m < 2, v0 for m >= 2) and their high nibbles
    (x at i + 64 + 8m: u1, v1); the top two bits are bits sh, sh+1 (low) and sh+4, sh+5
    (high) of the bytes qh + 8m. Quants are stored plus 32."""
    q0 = np.int32(r[ql])
    q1 = np.int32(r[ql + 8])
    q2 = np.int32(r[ql + 16])
    q3 = np.int32(r[ql + 24])
    e0 = np.int32(r[qh]) >> sh
    e1 = np.int32(r[qh + 8]) >> sh
    e2 = np.int32(r[qh + 16]) >> sh
    e3 = np.int32(r[qh + 24]) >> sh
    u0 = (np.float32(np.int32(((q0 & 15) | ((e0 & 3) << 4)) - 32)) * xt[i]
          + np.float32(np.int32(((q1 & 15) | ((e1 & 3) << 4)) - 32)) * xt[i + 8])
    v0 = (np.float32(np.int32(((q2 & 15) | ((e2 & 3) << 4)) - 32)) * xt[i + 16]
          + np.float32(np.int32(((q3 & 15) | ((e3 & 3) << 4)) - 32)) * xt[i + 24])
    u1 = (np.float32(np.int32(((q0 >> 4) | (e0 & 48)) - 32)) * xt[i + 64]
          + np.float32(np.int32(((q1 >> 4) | (e1 & 48)) - 32)) * xt[i + 72])
    v1 = (np.float32(np.int32(((q2 >> 4) | (e2 & 48)) - 32)) * xt[i + 80]
          + np.float32(np.int32(((q3 >> 4) | (e3 & 48)) - 32)) * xt[i + 88])
    return u0, v0, u1, v1


@njit(cache=True, fastmath=True, nogil=True)
def _row_q6_K(row, r16, xt, f16, acc, n8, w, pf):
    """The dot product of x[t] with one Q6_K row (210-byte blocks: 128 bytes of low nibbles,
    64 of high bit pairs, 16 int8 scales, half d; a value is d*sc*(q - 32), sc per 16 values).
    One lane iteration per half block (128 values, eight scales)."""
    acc[:] = 0.0
    for b in range(xt.shape[0] // 256):
        o = b * 210
        prefetch_bytes(w, pf + o, 210)
        d = f16[r16[o // 2 + 104]]
        for h in range(2):
            sc = o + 192 + 8 * h
            a0 = d * np.float32(np.int8(row[sc]))
            a1 = d * np.float32(np.int8(row[sc + 1]))
            a2 = d * np.float32(np.int8(row[sc + 2]))
            a3 = d * np.float32(np.int8(row[sc + 3]))
            a4 = d * np.float32(np.int8(row[sc + 4]))
            a5 = d * np.float32(np.int8(row[sc + 5]))
            a6 = d * np.float32(np.int8(row[sc + 6]))
            a7 = d * np.float32(np.int8(row[sc + 7]))
            ql = o + 64 * h
            qh = o + 128 + 32 * h
            xo = b * 256 + 128 * h
            for l in range(n8):
                u0, v0, u1, v1 = _q6_quarter(row, ql + l, qh + l, 0, xt, xo + l)
                u2, v2, u3, v3 = _q6_quarter(row, ql + 32 + l, qh + l, 2, xt, xo + 32 + l)
                acc[l] += (((a0 * u0 + a1 * v0) + (a4 * u1 + a5 * v1))
                           + ((a2 * u2 + a3 * v2) + (a6 * u3 + a7 * v3)))
    return acc.sum()


@njit(cache=True, fastmath=True, nogil=True)
def _rows_q6_K(w, w16, x, xs, out, f16, n0, n1, n8):
    """Rows n0..n1-1 of Q6_K."""
    acc = np.empty(8, np.float32)
    for n in range(n0, n1):
        pf = n * w.shape[1] + AHEAD
        for t in range(x.shape[0]):
            out[t, n] = _row_q6_K(w[n], w16[n], x[t], f16, acc, n8, w, pf)


@njit(cache=True, nogil=True)
def rows_f32(qt, w, w16, x, xs, out, f16, n0, n1, n8):
    """Rows n0..n1-1 of out[T, N] = x[T, K] @ W.T for Q8_0, Q4_K, Q5_K or Q6_K (qt); xs [T, K/32]:
    the sums of x over each 32 values (read by Q4_K and Q5_K). n8 is 8 (see kernels/ggml.py)."""
    if qt == Q8_0:
        _rows_q8_0(w, w16, x, xs, out, f16, n0, n1, 4 * n8)
    elif qt == Q4_K or qt == Q5_K:
        _rows_q45_K(w, w16, x, xs, out, f16, n0, n1, n8, qt == Q5_K)
    else:
        _rows_q6_K(w, w16, x, xs, out, f16, n0, n1, n8)


# ---- Decode products for IQ3_XXS and IQ3_S (the bulk of the published IQ3_XS file). Per block,
# a scalar pass writes each of its 64 grid entries' scale (dbe), sign bits (sg) and, for IQ3_S,
# 9-bit grid index (gi) into scratch; then one loop over the 64 entries, a sum (no stores: the
# gathers of grid entries would defeat LLVM's alias checks on a store), gathers each entry's
# four values packed in one uint32 (tb.iq3xxs_packed / iq3s_packed) and takes x from xp, x in
# kernel order (x_order_iq3: value 4e + j of each 256 at 64j + e), in 8- or 16-wide loads. A
# loop over a sub-block's 8 entries alone ran scalar: LLVM sizes a reduction's vector loop
# for more iterations than that. The signed grid values are integers: exact products.

def x_order_iq3(x):
    """x [T, K] -> float32 [T, K] in the IQ3 products' order (value 256b + 4e + j at 256b + 64j + e)."""
    T, K = x.shape
    return np.ascontiguousarray(x.reshape(T, K // 256, 64, 4).transpose(0, 1, 3, 2)).reshape(T, K)


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _grid_value(u, sb, j):
    """Byte j of u as float32, negated where bit j of sb is set (a two's complement negation)."""
    m = -((sb >> j) & 1)
    return np.float32(np.int32((((u >> (8 * j)) & 255) ^ m) - m))


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _row_iq3(row, r16, xp, f16, tb, dbe, sg, gi, n64, w, pf, xxs):
    """The dot product of xp (kernel order) with one IQ3_XXS (xxs) or IQ3_S row; dbe, sg, gi:
    float32 [64], int32 [64], int32 [64] scratch."""
    BB = 98 if xxs else 110
    grid = tb.iq3xxs_packed if xxs else tb.iq3s_packed
    tot = np.float32(0.0)
    for b in range(xp.shape[0] // 256):
        o = b * BB
        prefetch_bytes(w, pf + o, BB)
        d = f16[r16[o // 2]]
        for ib in range(8):
            if xxs:                       # 4 x 7 sign bits (each pair of entries: ksigns' 8) and the scale
                aux = _u32(row, o + 66 + 4 * ib)
                db = _half_scale(d, aux >> 28, False)
                for p in range(4):
                    k = np.int32(tb.ksigns[(aux >> (7 * p)) & 127])
                    sg[8 * ib + 2 * p] = k
                    sg[8 * ib + 2 * p + 1] = k >> 4
            else:                         # a byte of ninth index bits, 4 sign bytes, a 4-bit scale
                db = d * np.float32(1 + 2 * ((np.int32(row[o + 106 + ib // 2]) >> (4 * (ib % 2))) & 15))
                h = np.int32(row[o + 66 + ib])
                for l in range(8):
                    gi[8 * ib + l] = np.int32(row[o + 2 + 8 * ib + l]) | (((h >> l) & 1) << 8)
                    sg[8 * ib + l] = np.int32(row[o + 74 + 4 * ib + l // 2]) >> (4 * (l % 2))
            for l in range(8):
                dbe[8 * ib + l] = db
        xo = b * 256
        s = np.float32(0.0)
        for e in range(n64):
            u = grid[np.int32(row[o + 2 + e])] if xxs else grid[gi[e]]
            sb = sg[e]
            s += dbe[e] * ((_grid_value(u, sb, 0) * xp[xo + e] + _grid_value(u, sb, 1) * xp[xo + 64 + e])
                           + (_grid_value(u, sb, 2) * xp[xo + 128 + e] + _grid_value(u, sb, 3) * xp[xo + 192 + e]))
        tot += s
    return tot


@njit(cache=True, fastmath=True, nogil=True)
def _row_iq3_xxs(row, r16, xp, f16, tb, dbe, sg, gi, n64, w, pf):
    """_row_iq3 for IQ3_XXS (its own function: `xxs` a constant to LLVM)."""
    return _row_iq3(row, r16, xp, f16, tb, dbe, sg, gi, n64, w, pf, True)


@njit(cache=True, fastmath=True, nogil=True)
def _row_iq3_s(row, r16, xp, f16, tb, dbe, sg, gi, n64, w, pf):
    """_row_iq3 for IQ3_S."""
    return _row_iq3(row, r16, xp, f16, tb, dbe, sg, gi, n64, w, pf, False)


@njit(cache=True, fastmath=True, nogil=True)
def _rows_iq3(qt, w, w16, xp, out, f16, tb, n0, n1, n64):
    """Rows n0..n1-1 of IQ3_XXS or IQ3_S (qt)."""
    dbe = np.empty(64, np.float32)
    sg = np.empty(64, np.int32)
    gi = np.empty(64, np.int32)
    for n in range(n0, n1):
        pf = n * w.shape[1] + AHEAD
        for t in range(xp.shape[0]):
            if qt == IQ3_XXS:
                out[t, n] = _row_iq3_xxs(w[n], w16[n], xp[t], f16, tb, dbe, sg, gi, n64, w, pf)
            else:
                out[t, n] = _row_iq3_s(w[n], w16[n], xp[t], f16, tb, dbe, sg, gi, n64, w, pf)


@njit(parallel=True, cache=True, nogil=True)
def matvec_iq3(qt, w, w16, xp, out, f16, tb, parts, n64):
    """out[T, N] = x[T, K] @ W.T for IQ3_XXS or IQ3_S (qt), xp = x_order_iq3(x), `parts` ranges
    of rows in parallel; n64 is 64 at run time (a literal loop would be unrolled, not vectorized)."""
    N = w.shape[0]
    parts = max(1, min(N, parts))
    per = (N + parts - 1) // parts
    for p in prange(parts):
        _rows_iq3(qt, w, w16, xp, out, f16, tb, p * per, min(N, p * per + per), n64)


# ---- 8-bit activations (opt-in) for the K-quants. x is rounded once per call to int8 steps
# with one scale per 256 values (quantize_x8; llama.cpp's Q8_K), so that every product inside a
# block is an integer: per block one int32 sum, then one float multiply-add (d * xd * sum; for
# Q4_K/Q5_K minus dmin * xd * the sum of min * the integer sum of x over each sub-block). The
# sums are exact (bounds at each kernel); the only error is x's rounding.
# x is stored as int16 in kernel order: each 32 values as their 16 even-indexed, then their 16
# odd-indexed ones, so that a uint16 word of quants (two bytes: values 2m and 2m+1) meets x at
# m and m + 16 of its chunk. The kernels read the matrix as words (w16) and take the quants out
# with shifts and masks: the word lanes are int16 already, with no widening shuffle. A quant
# times its sub-block's integer scale still fits int16; its products with x are summed into
# one int32 over a loop of 16 words (n16, at run time: see _decode), which LLVM turns into
# pmaddwd (eight words per instruction with 256-bit vectors, vpdpwssd with VNNI). The loop must
# run at least as many words as one vector iteration takes (8 to 32 with interleaving, by
# target): hence 16 words per iteration's index, and for Q6_K, whose sub-blocks are 8 words, a
# scale chosen per word rather than a loop of 8.

@njit(cache=True, nogil=True)
def quantize_x8(x, qx, xd, qs, bs=None):
    """x [T, K] to 8 bits: qx[T, K] = x / d rounded to nearest (ties to even), d = xd[t, b] =
    amax / 127 over each 256 values; qs[t, c] = the sum of qx over each 32 values. qx int16: in
    the kernel order above; int8 (with bs [T, K/16] int16, the sums over each 16 values): in
    natural order, for kernels/simd.py. A non-finite value makes its d NaN or inf and its
    block's quants zero, so that the products come out NaN as in float32."""
    T, K = x.shape
    for t in range(T):
        for b in range(K // 256):
            amax = np.float32(0.0)
            for i in range(256 * b, 256 * b + 256):
                a = abs(x[t, i])
                if a > amax or a != a:
                    amax = a
                    if a != a:
                        break
            xd[t, b] = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if np.isfinite(amax) and amax > 0 else np.float32(0.0)
            for c in range(256 * b, 256 * b + 256, 32):
                if bs is not None:
                    for h in range(2):
                        tot = np.int32(0)
                        for i in range(c + 16 * h, c + 16 * h + 16):
                            v = np.int8(np.rint(x[t, i] * inv))
                            qx[t, i] = v
                            tot += np.int32(v)
                        bs[t, c // 16 + h] = tot
                    qs[t, c // 32] = np.int32(bs[t, c // 16]) + np.int32(bs[t, c // 16 + 1])
                else:
                    tot = np.int32(0)
                    for m in range(16):
                        qx[t, c + m] = np.int16(np.rint(x[t, c + 2 * m] * inv))
                        qx[t, c + 16 + m] = np.int16(np.rint(x[t, c + 2 * m + 1] * inv))
                        tot += np.int32(qx[t, c + m]) + np.int32(qx[t, c + 16 + m])
                    qs[t, c // 32] = tot


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _sq(s, v, x):
    """(s * v) * x as int32, for a scale and a quant whose product fits int16 and an int16 x:
    summed over a loop, the form LLVM makes pmaddwd of (the quant cast to int16 first: without
    it LLVM keeps the arithmetic in int64)."""
    return np.int32(np.int16(s * np.int16(v))) * np.int32(x)


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _k4_ints(r, o):
    """The eight 6-bit scales and mins of the Q4_K/Q5_K block at r[o:], as ints."""
    sc0, m0, sc1, m1 = _k4_pair(r, o, 0)
    sc2, m2, sc3, m3 = _k4_pair(r, o, 1)
    sc4, m4, sc5, m5 = _k4_pair(r, o, 2)
    sc6, m6, sc7, m7 = _k4_pair(r, o, 3)
    return sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7, m0, m1, m2, m3, m4, m5, m6, m7


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _k4_group(w, h, j, s0, s1, qx, i, five):
    """The products of word w of a Q4_K/Q5_K group j (64 values: its bytes' low nibbles in
    sub-block 2j, scale s0; high nibbles in 2j+1, s1), for Q5_K (five) with fifth bits 2j, 2j+1
    of the bytes of word h; x at qx[i], i+16 (sub-block 2j) and i+32, i+48. A quant is at most
    31, times a scale at most 63: 1953 fits int16; a block's sum at most 256 * 1953 * 127."""
    q0, q1, q2, q3 = w & 15, (w >> 8) & 15, (w >> 4) & 15, w >> 12
    if five:
        q0 |= ((h >> (2 * j)) & 1) << 4
        q1 |= ((h >> (8 + 2 * j)) & 1) << 4
        q2 |= ((h >> (2 * j + 1)) & 1) << 4
        q3 |= ((h >> (9 + 2 * j)) & 1) << 4
    return ((_sq(s0, q0, qx[i]) + _sq(s0, q1, qx[i + 16]))
            + (_sq(s1, q2, qx[i + 32]) + _sq(s1, q3, qx[i + 48])))


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _row8_k45(row, r16, qx, xd, qs, t, f16, n16, five, w, pf):
    """The dot product of x[t] (8-bit) with one Q4_K or (five) Q5_K row."""
    BB = 176 if five else 144
    tot = np.float32(0.0)
    xt = qx[t]
    for b in range(xt.shape[0] // 256):
        o = b * BB
        prefetch_bytes(w, pf + o, BB)
        sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7, m0, m1, m2, m3, m4, m5, m6, m7 = _k4_ints(row, o)
        k = 8 * b
        mins = (((m0 * qs[t, k] + m1 * qs[t, k + 1]) + (m2 * qs[t, k + 2] + m3 * qs[t, k + 3]))
                + ((m4 * qs[t, k + 4] + m5 * qs[t, k + 5]) + (m6 * qs[t, k + 6] + m7 * qs[t, k + 7])))
        s0, s1, s2, s3 = np.int16(sc0), np.int16(sc1), np.int16(sc2), np.int16(sc3)
        s4, s5, s6, s7 = np.int16(sc4), np.int16(sc5), np.int16(sc6), np.int16(sc7)
        q = o // 2 + (24 if five else 8)
        hw = o // 2 + 8
        xo = b * 256
        acc = np.int32(0)
        for m in range(n16):
            h = np.int32(r16[hw + m]) if five else np.int32(0)
            acc = np.int32(acc + (_k4_group(np.int32(r16[q + m]), h, 0, s0, s1, xt, xo + m, five)
                                  + _k4_group(np.int32(r16[q + 16 + m]), h, 1, s2, s3, xt, xo + 64 + m, five))
                           + (_k4_group(np.int32(r16[q + 32 + m]), h, 2, s4, s5, xt, xo + 128 + m, five)
                              + _k4_group(np.int32(r16[q + 48 + m]), h, 3, s6, s7, xt, xo + 192 + m, five)))
        tot += xd[t, b] * (f16[r16[o // 2]] * np.float32(acc) - f16[r16[o // 2 + 1]] * np.float32(mins))
    return tot


@njit(cache=True, fastmath=True, nogil=True)
def _row8_q4_K(row, r16, qx, xd, qs, t, f16, n16, w, pf):
    """_row8_k45 for Q4_K (its own function: `five` a constant to LLVM)."""
    return _row8_k45(row, r16, qx, xd, qs, t, f16, n16, False, w, pf)


@njit(cache=True, fastmath=True, nogil=True)
def _row8_q5_K(row, r16, qx, xd, qs, t, f16, n16, w, pf):
    """_row8_k45 for Q5_K."""
    return _row8_k45(row, r16, qx, xd, qs, t, f16, n16, True, w, pf)


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _q6_word(a, h, ns, hs, s, qx, i):
    """The products of the two Q6_K quants of word a (its bytes' nibbles at bit ns: 0 low, 4
    high; top bits from word h at bits hs and hs + 8), minus 32, times the sub-block's scale s;
    x at qx[i] and qx[i + 16]. |s * (q - 32)| <= 128 * 32 fits int16; a block's sum is at most
    256 * 4096 * 127."""
    qe = ((a >> ns) & 15) | (((h >> hs) & 3) << 4)
    qo = ((a >> (ns + 8)) & 15) | (((h >> (hs + 8)) & 3) << 4)
    return _sq(s, qe - 32, qx[i]) + _sq(s, qo - 32, qx[i + 16])


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _q6_half(r16, p, ph, m, qx, i, s0, s1, s2, s3, s4, s5, s6, s7):
    """The products of word m (of 16) of each group of half a Q6_K block (128 values): nibble
    words at p (low nibbles: values 2m, 2m+1 of group 0; high: group 2) and p + 16 (groups 1,
    3), top bits at ph; x from qx[i]. Words 8..15 hold the second 16-value sub-block of their
    group: s0..s7 are the scales of sub-blocks 0..7 of the half."""
    u = m >= 8
    a = np.int32(r16[p + m])
    b = np.int32(r16[p + 16 + m])
    h = np.int32(r16[ph + m])
    return ((_q6_word(a, h, 0, 0, s1 if u else s0, qx, i + m) + _q6_word(b, h, 0, 2, s3 if u else s2, qx, i + 32 + m))
            + (_q6_word(a, h, 4, 4, s5 if u else s4, qx, i + 64 + m)
               + _q6_word(b, h, 4, 6, s7 if u else s6, qx, i + 96 + m)))


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _q6_scales(row, k):
    """The eight int8 scales row[k:k+8] as int16."""
    return (np.int16(np.int8(row[k])), np.int16(np.int8(row[k + 1])), np.int16(np.int8(row[k + 2])),
            np.int16(np.int8(row[k + 3])), np.int16(np.int8(row[k + 4])), np.int16(np.int8(row[k + 5])),
            np.int16(np.int8(row[k + 6])), np.int16(np.int8(row[k + 7])))


@njit(cache=True, fastmath=True, nogil=True)
def _row8_q6_K(row, r16, qx, xd, t, f16, n16, w, pf):
    """The dot product of x[t] (8-bit) with one Q6_K row (both halves of a block in one loop)."""
    tot = np.float32(0.0)
    xt = qx[t]
    for b in range(xt.shape[0] // 256):
        o = b * 210
        prefetch_bytes(w, pf + o, 210)
        a0, a1, a2, a3, a4, a5, a6, a7 = _q6_scales(row, o + 192)
        c0, c1, c2, c3, c4, c5, c6, c7 = _q6_scales(row, o + 200)
        p = o // 2
        xo = b * 256
        acc = np.int32(0)
        for m in range(n16):
            acc = np.int32(acc + _q6_half(r16, p, p + 64, m, xt, xo, a0, a1, a2, a3, a4, a5, a6, a7)
                           + _q6_half(r16, p + 32, p + 80, m, xt, xo + 128, c0, c1, c2, c3, c4, c5, c6, c7))
        tot += f16[r16[p + 104]] * xd[t, b] * np.float32(acc)
    return tot


@njit(cache=True, fastmath=True, nogil=True)
def rows8(qt, w, w16, qx, xd, qs, out, f16, n0, n1, n16):
    """Rows n0..n1-1 of Q4_K, Q5_K or Q6_K (qt) against 8-bit x, each row of x in turn."""
    for n in range(n0, n1):
        row = w[n]
        r16 = w16[n]
        pf = n * w.shape[1] + AHEAD
        for t in range(qx.shape[0]):
            if qt == Q4_K:
                out[t, n] = _row8_q4_K(row, r16, qx, xd, qs, t, f16, n16, w, pf)
            elif qt == Q5_K:
                out[t, n] = _row8_q5_K(row, r16, qx, xd, qs, t, f16, n16, w, pf)
            else:
                out[t, n] = _row8_q6_K(row, r16, qx, xd, t, f16, n16, w, pf)
