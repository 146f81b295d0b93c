"""Q4_K matrices times many rows of x rounded to 8 bits, on AVX-512 VNNI (prefill under
activations="q8").

`vpdpbusd` multiplies 64 unsigned bytes by 64 signed bytes and adds each four products into
one of 16 int32 lanes. Here the lanes are 16 tokens: x is laid out in tiles of 16 rows, four
consecutive values of each row side by side (xt), and four weights (a Q4_K row's nibbles, unpacked
to bytes once per row for all tiles) are broadcast to every lane. Four rows share each vector of
x. Per 256 values everything is an exact integer: the dot products of the eight 32-value parts
times their 6-bit scales (int32), and x's sums per part times the mins (float32, below 2**24);
then float32: d * that - dmin * this, times x's step. The Q4_K formula of kernels/simd.py's rows,
for a tile of tokens at once; 2-3x the float32 GEMM on dequantized tiles here.

x is rounded as quantize_x8 rounds it (per 256 values, ties to even), so prefill and decode
under activations="q8" round x the same way. Compiled only where the CPU has AVX-512 VNNI
(`VNNI`); elsewhere the caller keeps the float32 tiles and BLAS.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .quants import _k4_pair, quantize_x8
from .simd import _F32, _I8, _I32, _elem, _fn, _Ops, compiles_for

LANES = 16              # tokens per tile: one int32 lane each
ROWS = 4                # weight rows per pass: each x vector serves four


VNNI = compiles_for("avx512f", "avx512bw", "avx512vnni")

_V16D, _V16F = ir.VectorType(_I32, 16), ir.VectorType(_F32, 16)


@intrinsic
def _block4(typingctx, w, wo, ws, xt, xo, sc, mn, so, ns, dd, dm, do, nb, xd, xdo, xq, xqo, acc):
    """One 256-value unit of four unpacked Q4_K rows against a tile of 16 rows of x:
    acc[16r + l] += xd[xdo + l] * (dd[do + r*nb] * sum_j sc[so + j + r*ns] * S_rj(l)
    - dm[do + r*nb] * sum_j mn[so + j + r*ns] * xq[xqo + 16j + l]) over its eight 32-value parts j,
    S_rj(l) the exact int32 dot product of part j of row r (bytes w[wo + r*ws + 32j ..]) with lane
    l's values (xt from xo: 64-byte vectors, value 4i + k of lane l at byte 64i + 4l + k).
    sc int32 scales; mn float32 mins; xq float32 sums of x over each part (integers: exact)."""
    sig = types.void(w, wo, ws, xt, xo, sc, mn, so, ns, dd, dm, do, nb, xd, xdo, xq, xqo, acc)

    def codegen(context, builder, sig, args):
        b = builder
        ip = context.get_value_type(types.intp)

        def base(k):
            return context.make_array(sig.args[k])(context, b, args[k]).data

        def idx(k):
            return context.cast(b, args[k], sig.args[k], types.intp)

        def vec(p, k, ty):           # a vector at element k of p
            return b.load(b.bitcast(b.gep(p, [k]), ty.as_pointer()), align=1)

        wp, xp = b.gep(base(0), [idx(1)]), b.gep(base(3), [idx(4)])
        ws_, so_, ns_, do_, nb_ = idx(2), idx(7), idx(8), idx(11), idx(12)
        scp, mnp, ddp, dmp = base(5), base(6), base(9), base(10)
        xqp = b.gep(base(15), [idx(16)])
        op = _Ops(b)
        dp = _fn(b, "llvm.x86.avx512.vpdpbusd.512", _V16D, _V16D, _V16D, _V16D)
        tot = [ir.Constant(_V16D, None)] * ROWS
        mins = [ir.Constant(_V16F, None)] * ROWS
        for j in range(8):
            sums = [ir.Constant(_V16D, None)] * ROWS
            for i in range(8):
                xv = vec(xp, ip(512 * j + 64 * i), _V16D)
                for r in range(ROWS):
                    off = b.add(b.mul(ws_, ip(r)), ip(32 * j + 4 * i))
                    wv = b.load(b.bitcast(b.gep(wp, [off]), _I32.as_pointer()), align=1)
                    sums[r] = b.call(dp, [sums[r], op.splat(_V16D, wv), xv])
            q = vec(xqp, ip(LANES * j), _V16F)
            for r in range(ROWS):
                k = b.add(b.add(so_, ip(j)), b.mul(ns_, ip(r)))
                tot[r] = b.add(tot[r], b.mul(sums[r], op.splat(_V16D, b.load(b.gep(scp, [k])))))
                mins[r] = b.fadd(mins[r], b.fmul(op.splat(_V16F, b.load(b.gep(mnp, [k]))), q))
        xdv = vec(b.gep(base(13), [idx(14)]), ip(0), _V16F)
        accp = base(17)
        for r in range(ROWS):
            k = b.add(do_, b.mul(nb_, ip(r)))
            v = b.fsub(b.fmul(b.sitofp(tot[r], _V16F), op.splat(_V16F, b.load(b.gep(ddp, [k])))),
                       b.fmul(mins[r], op.splat(_V16F, b.load(b.gep(dmp, [k])))))
            ap = b.bitcast(b.gep(accp, [ip(LANES * r)]), _V16F.as_pointer())
            b.store(b.fadd(b.load(ap, align=4), b.fmul(v, xdv)), ap, align=4)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _nibbles(typingctx, src, so, dst, do):
    """dst[do + i] = src[so + i] & 15 and dst[do + 32 + i] = src[so + i] >> 4 for i < 32 (a Q4_K
    pair of parts, unpacked to bytes), as three vector operations."""
    sig = types.void(src, so, dst, do)

    def codegen(context, builder, sig, args):
        b, op = builder, _Ops(builder)
        v32 = ir.VectorType(_I8, 32)
        v = op.load(_elem(context, b, sig, args, 0), 0, v32)
        d = _elem(context, b, sig, args, 2)
        b.store(b.and_(v, ir.Constant(v32, [15] * 32)), b.bitcast(d, v32.as_pointer()), align=1)
        b.store(b.lshr(v, ir.Constant(v32, [4] * 32)), b.bitcast(op.at(d, 32), v32.as_pointer()), align=1)
        return context.get_dummy_value()
    return sig, codegen


@njit(cache=True, nogil=True)
def _unpack_q4k(w, w16, f16, n, K, q, qo, sc, mn, so, dd, dm, do):
    """Row n of a Q4_K matrix: its values' nibbles as bytes into q[qo:qo+K], the 6-bit scale and
    min of each 32 values into sc (int32) and mn (float32) [so:so+K/32] (ggml's
    get_scale_min_k4), each 256's d and dmin into dd/dm[do:do+K/256]."""
    row = w[n]
    for blk in range(K // 256):
        o = blk * 144
        dd[do + blk] = f16[w16[n, o // 2]]
        dm[do + blk] = f16[w16[n, o // 2 + 1]]
        for j in range(4):
            s0, m0, s1, m1 = _k4_pair(row, o, j)
            sc[so + blk * 8 + 2 * j], sc[so + blk * 8 + 2 * j + 1] = s0, s1
            mn[so + blk * 8 + 2 * j], mn[so + blk * 8 + 2 * j + 1] = np.float32(m0), np.float32(m1)
            _nibbles(row, o + 16 + 32 * j, q, qo + blk * 256 + 64 * j)


@njit(parallel=True, cache=True, nogil=True)
def prepare_tiles(x, xt, xdv, xqv, qx, xd, qs, bs):
    """x [T, K] rounded to 8 bits (quantize_x8 into qx, xd, qs, bs) and laid out in tiles of 16
    rows: xt [tiles, K*16] (value k of row 16t + l at 64(k // 4) + 4l + k % 4), xdv [tiles,
    K/256*16] x's step, xqv [tiles, K/32*16] the sums over each 32 (float32, exact). Rows past
    T are zero."""
    T, K = x.shape
    tiles = xt.shape[0]
    for tile in prange(tiles):
        t0, t1 = tile * LANES, min(T, tile * LANES + LANES)
        quantize_x8(x[t0:t1], qx[t0:t1], xd[t0:t1], qs[t0:t1], bs[t0:t1])
        xt[tile] = 0
        xdv[tile] = 0.0
        xqv[tile] = 0.0
        for t in range(t0, t1):
            lane = t - t0
            for k in range(K):
                xt[tile, 64 * (k // 4) + 4 * lane + k % 4] = qx[t, k]
            for blk in range(K // 256):
                xdv[tile, blk * LANES + lane] = xd[t, blk]
            for s in range(K // 32):
                xqv[tile, s * LANES + lane] = np.float32(qs[t, s])


@njit(parallel=True, cache=True, nogil=True)
def q4k_tiles(w, w16, f16, xt, xdv, xqv, out, parts):
    """out[T, N] = x @ W.T for a Q4_K matrix w [N, row_bytes] (N >= 4) and x prepared by
    prepare_tiles; the rows split over `parts` threads in groups of four (the last group
    overlaps the one before when 4 does not divide N: the same values written twice)."""
    N = w.shape[0]
    T = out.shape[0]
    K = xt.shape[1] // LANES
    ns, nb = K // 32, K // 256
    groups = (N + ROWS - 1) // ROWS
    tiles = xt.shape[0]
    for p in prange(parts):
        q = np.empty(ROWS * K, np.uint8)
        sc = np.empty(ROWS * ns, np.int32)
        mn = np.empty(ROWS * ns, np.float32)
        dd = np.empty(ROWS * nb, np.float32)
        dm = np.empty(ROWS * nb, np.float32)
        acc = np.empty(ROWS * LANES, np.float32)
        for g in range(p * groups // parts, (p + 1) * groups // parts):
            n0 = min(g * ROWS, N - ROWS)
            for r in range(ROWS):
                _unpack_q4k(w, w16, f16, n0 + r, K, q, r * K, sc, mn, r * ns, dd, dm, r * nb)
            for tile in range(tiles):
                acc[:] = 0.0
                for u in range(nb):
                    _block4(q, 256 * u, K, xt[tile], 4096 * u, sc, mn, 8 * u, ns, dd, dm, u, nb,
                            xdv[tile], u * LANES, xqv[tile], 8 * u * LANES, acc)
                for r in range(ROWS):
                    for lane in range(min(LANES, T - tile * LANES)):
                        out[tile * LANES + lane, n0 + r] = acc[r * LANES + lane]


def q4k_product(w: np.ndarray, x: np.ndarray, out: np.ndarray, f16: np.ndarray, threads: int) -> np.ndarray:
    """out[T, N] = x[T, K] @ W.T for a Q4_K matrix w (uint8 [N, row_bytes], N >= 4), x rounded
    to 8 bits per 256 values; the rows in `threads` parts, on as many threads as numba has."""
    T, K = x.shape
    tiles = -(-T // LANES)
    xt = np.empty((tiles, K * LANES), np.int8)
    xdv = np.empty((tiles, K // 256 * LANES), np.float32)
    xqv = np.empty((tiles, K // 32 * LANES), np.float32)
    qx = np.empty((T, K), np.int8)
    xd = np.empty((T, K // 256), np.float32)
    qs = np.empty((T, K // 32), np.int32)
    bs = np.empty((T, K // 16), np.int16)
    saved = numba.get_num_threads()         # a many-row step runs numba on one thread (BLAS's turn)
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        prepare_tiles(x, xt, xdv, xqv, qx, xd, qs, bs)
        q4k_tiles(w, w.view(np.uint16), f16, xt, xdv, xqv, out, max(1, min(threads, -(-w.shape[0] // ROWS))))
    finally:
        numba.set_num_threads(saved)
    return out
