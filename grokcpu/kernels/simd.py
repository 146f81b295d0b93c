"""Byte dot products of one K-quant block with 8-bit x, as AVX2 vector code (numba intrinsics).

LLVM's loop vectorizer widens a byte product to int16 lanes (pmaddwd: 16 products per
256-bit instruction). AVX2's pmaddubsw multiplies 32 unsigned bytes by 32 signed bytes into
16 int16 pair sums in one instruction, and pmaddwd by a vector of scales then sums those pairs
into int32: the sequence llama.cpp's K-quant kernels are built on, written here as LLVM IR.
Each function returns one block's integer sum (exact: bounds at each function); the caller
scales it by the block's d and x's step. Compiled only where `AVX2` is true (the intrinsics
do not exist elsewhere): kernels/quants.py keeps portable int16 kernels for other CPUs.

x is int8 [K] in natural order (quantize_x8 with bytes=True), blocks of 256 values.
"""

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .prefetch import prefetch_bytes
from .quants import AHEAD, Q4_K, Q5_K, Q8_0, _k4_ints


def _avx2() -> bool:
    """Whether numba compiles for a CPU with AVX2 (the host's, unless NUMBA_CPU_NAME/FEATURES
    say otherwise)."""
    feats = numba.config.CPU_FEATURES
    if feats:
        return "+avx2" in feats.split(",")
    if numba.config.CPU_NAME not in (None, "host"):
        return False
    return bool(llvm.get_host_cpu_features().get("avx2"))


AVX2 = _avx2()

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_V32B, _V16W, _V8D = ir.VectorType(_I8, 32), ir.VectorType(_I16, 16), ir.VectorType(_I32, 8)


def _fn(builder, name, ret, *args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, list(args)), name)


class _Ops:
    """IR helpers over one builder: 32-byte loads, splats, the two multiply-adds."""

    def __init__(self, context, builder, sig, args):
        self.b = builder
        self.ctx = context
        self.sig = sig
        self.args = args

    def ptr(self, k, off_arg):
        """i8* to element args[off_arg] of the uint8/int8 array args[k]."""
        ary = self.ctx.make_array(self.sig.args[k])(self.ctx, self.b, self.args[k])
        idx = self.ctx.cast(self.b, self.args[off_arg], self.sig.args[off_arg], types.intp)
        return self.b.bitcast(self.b.gep(ary.data, [idx]), _I8.as_pointer())

    def load32(self, p, off):
        """32 bytes at p + off (unaligned)."""
        q = self.b.gep(p, [ir.Constant(_I32, off)])
        return self.b.load(self.b.bitcast(q, _V32B.as_pointer()), align=1)

    def splat(self, vt, v):
        return ir.Constant(vt, [v] * vt.count) if isinstance(v, int) else self._splat(vt, v)

    def _splat(self, vt, v):
        undef = ir.Constant(vt, ir.Undefined)
        one = self.b.insert_element(undef, v, ir.Constant(_I32, 0))
        return self.b.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_I32, vt.count), [0] * vt.count))

    def maddubs(self, u, s):
        """16 int16: u[2i]*s[2i] + u[2i+1]*s[2i+1], u unsigned and s signed bytes."""
        return self.b.call(_fn(self.b, "llvm.x86.avx2.pmadd.ub.sw", _V16W, _V32B, _V32B), [u, s])

    def maddwd(self, a, c):
        """8 int32: a[2i]*c[2i] + a[2i+1]*c[2i+1]."""
        return self.b.call(_fn(self.b, "llvm.x86.avx2.pmadd.wd", _V8D, _V16W, _V16W), [a, c])

    def hsum(self, v):
        return self.b.call(_fn(self.b, "llvm.vector.reduce.add.v8i32", _I32, _V8D), [v])

    def scale(self, k):
        """Argument k (an integer scale) splat to 16 int16."""
        v = self.ctx.cast(self.b, self.args[k], self.sig.args[k], types.int16)
        return self._splat(_V16W, v)


def _k45_dot(five: bool):
    @intrinsic
    def dot(typingctx, w, o, x, xo, s0, s1, s2, s3, s4, s5, s6, s7):
        """sum over the Q4_K (or Q5_K) block at w[o:] of sc[sub] * q * x[xo + i], the quants
        q (0..15, or 0..31 with the fifth bits) times x's int8 and their sub-block's 6-bit
        scale s0..s7. Pair sums at most 2*31*127 (int16), times a scale at most 63: the
        block's sum stays below 2**31."""
        sig = types.int32(w, o, x, xo, s0, s1, s2, s3, s4, s5, s6, s7)

        def codegen(context, builder, sig, args):
            op = _Ops(context, builder, sig, args)
            wp, xp = op.ptr(0, 1), op.ptr(2, 3)
            b = builder
            m15, m1 = op.splat(_V32B, 15), op.splat(_V32B, 1)
            qs = 48 if five else 16
            h = op.load32(wp, 16) if five else None
            acc = ir.Constant(_V8D, None)
            for j in range(4):
                q = op.load32(wp, qs + 32 * j)
                lo = b.and_(q, m15)
                hi = b.lshr(q, op.splat(_V32B, 4))
                if five:        # fifth bits: bit 2j of byte i for value i, bit 2j+1 for i + 32
                    lo = b.or_(lo, b.shl(b.and_(b.lshr(h, op.splat(_V32B, 2 * j)), m1), op.splat(_V32B, 4)))
                    hi = b.or_(hi, b.shl(b.and_(b.lshr(h, op.splat(_V32B, 2 * j + 1)), m1), op.splat(_V32B, 4)))
                pl = op.maddubs(lo, op.load32(xp, 64 * j))
                ph = op.maddubs(hi, op.load32(xp, 64 * j + 32))
                acc = b.add(acc, b.add(op.maddwd(pl, op.scale(4 + 2 * j)), op.maddwd(ph, op.scale(5 + 2 * j))))
            return op.hsum(acc)
        return sig, codegen
    return dot


q4k_dot = _k45_dot(False)
q5k_dot = _k45_dot(True)


@intrinsic
def q6k_dot(typingctx, w, o, x, xo, bs, bo):
    """sum over the Q6_K block at w[o:] of sc[sub] * (q - 32) * x[xo + i]: q (0..63) from the
    low nibbles (128 bytes) and bit pairs (64 bytes), sc the block's 16 int8 scales (one per
    16 values, at o + 192); bs[bo:bo+16] the sums of x over each 16 values (int16) give the
    minus-32 share. Pair sums at most 2*63*127, times |sc| <= 128: within int32."""
    sig = types.int32(w, o, x, xo, bs, bo)

    def codegen(context, builder, sig, args):
        op = _Ops(context, builder, sig, args)
        b = builder
        wp, xp = op.ptr(0, 1), op.ptr(2, 3)
        bsa = context.make_array(sig.args[4])(context, builder, args[4])
        bsi = context.cast(builder, args[5], sig.args[5], types.intp)
        bsp = b.bitcast(b.gep(bsa.data, [bsi]), _V16W.as_pointer())
        sc8 = b.load(b.bitcast(b.gep(wp, [ir.Constant(_I32, 192)]), ir.VectorType(_I8, 16).as_pointer()), align=1)
        sc = b.sext(sc8, _V16W)                                    # the 16 scales as int16
        undef = ir.Constant(_V16W, ir.Undefined)
        m15, m3 = op.splat(_V32B, 15), op.splat(_V32B, 3)
        acc = ir.Constant(_V8D, None)
        for n in range(2):
            A = op.load32(wp, 64 * n)
            B = op.load32(wp, 64 * n + 32)
            H = op.load32(wp, 128 + 32 * n)
            top = [b.shl(b.and_(b.lshr(H, op.splat(_V32B, 2 * t)), m3), op.splat(_V32B, 4)) for t in range(4)]
            vals = (b.or_(b.and_(A, m15), top[0]), b.or_(b.and_(B, m15), top[1]),
                    b.or_(b.lshr(A, op.splat(_V32B, 4)), top[2]), b.or_(b.lshr(B, op.splat(_V32B, 4)), top[3]))
            for g, v in enumerate(vals):             # 32 values: scales 8n+2g (first 16), 8n+2g+1
                s = 8 * n + 2 * g
                scv = b.shuffle_vector(sc, undef, ir.Constant(ir.VectorType(_I32, 16), [s] * 8 + [s + 1] * 8))
                p = op.maddubs(v, op.load32(xp, 128 * n + 32 * g))
                acc = b.add(acc, op.maddwd(p, scv))
        corr = op.maddwd(b.load(bsp, align=1), sc)               # sum of sc * (x's sums per 16)
        acc = b.sub(acc, b.shl(corr, op.splat(_V8D, 5)))          # minus 32 of each
        return op.hsum(acc)
    return sig, codegen


@intrinsic
def q80_dot8(typingctx, w, o, x, xo):
    """sum over the eight Q8_0 blocks at w[o:] (34 bytes each: half d, 32 int8) of d * (the
    block's integer sum of q * x[xo + i]), as float32. |q| <= 128 (its magnitude as an unsigned
    byte, x given q's sign): pair sums at most 2*128*127, within int16."""
    sig = types.float32(w, o, x, xo)

    def codegen(context, builder, sig, args):
        op = _Ops(context, builder, sig, args)
        b = builder
        wp, xp = op.ptr(0, 1), op.ptr(2, 3)
        f32, v8f = ir.FloatType(), ir.VectorType(ir.FloatType(), 8)
        absf = _fn(b, "llvm.abs.v32i8", _V32B, _V32B, ir.IntType(1))
        sign = _fn(b, "llvm.x86.avx2.psign.b", _V32B, _V32B, _V32B)
        ones = op.splat(_V16W, 1)
        acc = ir.Constant(v8f, None)
        for k in range(8):
            hp = b.bitcast(b.gep(wp, [ir.Constant(_I32, 34 * k)]), ir.HalfType().as_pointer())
            d = b.fpext(b.load(hp, align=1), f32)
            q = op.load32(wp, 34 * k + 2)
            p = op.maddubs(b.call(absf, [q, ir.Constant(ir.IntType(1), 0)]),
                           b.call(sign, [op.load32(xp, 32 * k), q]))
            f = b.sitofp(op.maddwd(p, ones), v8f)
            acc = b.fadd(acc, b.fmul(f, op._splat(v8f, d)))
        red = _fn(b, "llvm.vector.reduce.fadd.v8f32", f32, f32, v8f)
        return b.call(red, [ir.Constant(f32, 0.0), acc], fastmath=("reassoc",))
    return sig, codegen


# ---- Rows: out[t, n] = x[t] . W[n] for Q4_K, Q5_K or Q6_K against x from quantize_x8 (bytes).
# Per block one integer sum from the functions above, then d * xd * sum (Q4_K/Q5_K minus dmin *
# xd * the mins times x's sums per 32). The integer sums are exact, so the results equal
# quants.matvec_q8's int16 kernels' up to the float32 order of the per-block terms.

@njit(cache=True, fastmath=True, nogil=True)
def _row_k45(row, r16, xt, xd, qs, t, f16, five, w, pf):
    BB = 176 if five else 144
    tot = np.float32(0.0)
    for b in range(xt.shape[0] // 256):
        o = b * BB
        prefetch_bytes(w, pf + o, BB)
        sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7, m0, m1, m2, m3, m4, m5, m6, m7 = _k4_ints(row, o)
        k = 8 * b
        mins = (((m0 * qs[t, k] + m1 * qs[t, k + 1]) + (m2 * qs[t, k + 2] + m3 * qs[t, k + 3]))
                + ((m4 * qs[t, k + 4] + m5 * qs[t, k + 5]) + (m6 * qs[t, k + 6] + m7 * qs[t, k + 7])))
        if five:
            acc = q5k_dot(row, o, xt, 256 * b, sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7)
        else:
            acc = q4k_dot(row, o, xt, 256 * b, sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7)
        tot += xd[t, b] * (f16[r16[o // 2]] * np.float32(acc) - f16[r16[o // 2 + 1]] * np.float32(mins))
    return tot


@njit(cache=True, fastmath=True, nogil=True)
def _row_q6(row, r16, xt, xd, bs, t, f16, w, pf):
    tot = np.float32(0.0)
    bt = bs[t]
    for b in range(xt.shape[0] // 256):
        o = b * 210
        prefetch_bytes(w, pf + o, 210)
        tot += f16[r16[o // 2 + 104]] * xd[t, b] * np.float32(q6k_dot(row, o, xt, 256 * b, bt, 16 * b))
    return tot


@njit(cache=True, fastmath=True, nogil=True)
def _row_q8_0(row, xt, xd, t):
    tot = np.float32(0.0)
    for g in range(xt.shape[0] // 256):
        tot += xd[t, g] * q80_dot8(row, 272 * g, xt, 256 * g)
    return tot


@njit(cache=True, fastmath=True, nogil=True)
def _rows(qt, w, w16, qx, xd, qs, bs, out, f16, n0, n1):
    for n in range(n0, n1):
        row = w[n]
        r16 = w16[n]
        pf = n * w.shape[1] + AHEAD
        if qt == Q8_0:
            prefetch_bytes(w, (n + 1) * w.shape[1], w.shape[1])
        for t in range(qx.shape[0]):
            if qt == Q8_0:
                out[t, n] = _row_q8_0(row, qx[t], xd, t)
            elif qt == Q4_K:
                out[t, n] = _row_k45(row, r16, qx[t], xd, qs, t, f16, False, w, pf)
            elif qt == Q5_K:
                out[t, n] = _row_k45(row, r16, qx[t], xd, qs, t, f16, True, w, pf)
            else:
                out[t, n] = _row_q6(row, r16, qx[t], xd, bs, t, f16, w, pf)


@njit(parallel=True, cache=True, nogil=True)
def matvec_q8(qt, w, w16, qx, xd, qs, bs, out, f16, parts):
    """out[T, N] = x[T, K] @ W.T for Q8_0, Q4_K, Q5_K or Q6_K (qt; Q8_0 with K a multiple of
    256), x from quantize_x8 as bytes (qx
    int8 [T, K], xd, qs, bs), `parts` ranges of rows in parallel."""
    N = w.shape[0]
    parts = max(1, min(N, parts))
    per = (N + parts - 1) // parts
    for p in prange(parts):
        _rows(qt, w, w16, qx, xd, qs, bs, out, f16, p * per, min(N, p * per + per))
