"""Row dot products of Q8_0/Q4_K/Q5_K/Q6_K with 8-bit x, as AVX2 vector code (numba intrinsics).

LLVM's loop vectorizer widens a byte product to int16 lanes (pmaddwd: 16 products per
256-bit instruction). AVX2's pmaddubsw multiplies 32 unsigned bytes by 32 signed bytes into
16 int16 pair sums in one instruction, and pmaddwd by a vector of scales then sums those pairs
into int32: the sequence llama.cpp's kernels are built on, written here as LLVM IR, whole rows
at a time (scales unpacked in vector registers, one horizontal sum per row). Within a block
the sums are integers (exact: bounds at each type); per block they are scaled by the block's d
(and x's step) into eight float32 lanes. Compiled only where `AVX2` is true (the intrinsics do
not exist elsewhere): kernels/quants.py keeps portable int16 kernels for other CPUs.

x is int8 [T, K] in natural order with its step per 256 values and its sums per 16
(quantize_x8 given int8 qx and bs).
"""

import llvmlite.binding as llvm
import numba
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .prefetch import prefetch_bytes
from .quants import Q4_K, Q5_K, Q8_0


def compiles_for(*features: str) -> bool:
    """Whether numba compiles for a CPU with these LLVM features (the host's, unless
    NUMBA_CPU_NAME/FEATURES say otherwise)."""
    feats = numba.config.CPU_FEATURES
    if feats:
        return {"+" + f for f in features} <= set(feats.split(","))
    if numba.config.CPU_NAME not in (None, "host"):
        return False
    f = llvm.get_host_cpu_features()
    return all(f.get(k) for k in features)


AVX2 = compiles_for("avx2", "f16c")       # F16C: a half's conversion in one instruction
AHEAD = 3072            # bytes ahead of the block being read that each block asks for (quants.AHEAD)

_I1, _I8, _I16, _I32 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32)
_F32 = ir.FloatType()
_V32B, _V16B, _V16W, _V8D = (ir.VectorType(_I8, 32), ir.VectorType(_I8, 16), ir.VectorType(_I16, 16),
                             ir.VectorType(_I32, 8))
_V8F, _V4D = ir.VectorType(_F32, 8), ir.VectorType(_I32, 4)


def _fn(builder, name, ret, *args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, list(args)), name)


def _elem(context, b, sig, args, k):
    """i8* to element args[k + 1] of the array args[k] (an intrinsic's array and offset pair)."""
    ary = context.make_array(sig.args[k])(context, b, args[k])
    idx = context.cast(b, args[k + 1], sig.args[k + 1], types.intp)
    return b.bitcast(b.gep(ary.data, [idx]), _I8.as_pointer())


class _Ops:
    """IR helpers over one builder: loads at byte offsets, splats, shuffles, the multiply-adds."""

    def __init__(self, builder):
        self.b = builder

    def at(self, p, off):
        """i8* p + off (an int or an IR integer)."""
        return self.b.gep(p, [off if isinstance(off, ir.Value) else ir.Constant(_I32, off)])

    def load(self, p, off, ty):
        return self.b.load(self.b.bitcast(self.at(p, off), ty.as_pointer()), align=1)

    def half(self, p, off):
        return self.b.fpext(self.load(p, off, ir.HalfType()), _F32)

    def splat(self, vt, v):
        if not isinstance(v, ir.Value):
            return ir.Constant(vt, [v] * vt.count)
        undef = ir.Constant(vt, ir.Undefined)
        one = self.b.insert_element(undef, v, ir.Constant(_I32, 0))
        return self.b.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_I32, vt.count), [0] * vt.count))

    def lanes(self, v, idx):
        """v's lanes idx, as a vector."""
        return self.b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(ir.VectorType(_I32, len(idx)), idx))

    def maddubs(self, u, s):
        """16 int16: u[2i]*s[2i] + u[2i+1]*s[2i+1], u unsigned and s signed bytes."""
        return self.b.call(_fn(self.b, "llvm.x86.avx2.pmadd.ub.sw", _V16W, _V32B, _V32B), [u, s])

    def maddwd(self, a, c):
        """8 int32: a[2i]*c[2i] + a[2i+1]*c[2i+1]."""
        return self.b.call(_fn(self.b, "llvm.x86.avx2.pmadd.wd", _V8D, _V16W, _V16W), [a, c])

    def scaled(self, ints, f):
        """The int32 lanes as float32 times the float f."""
        return self.b.fmul(self.b.sitofp(ints, _V8F), self.splat(_V8F, f))

    def prefetch(self, p, off, n):
        """Hints for the n bytes at p + off (a prefetch never faults, past the row's end too)."""
        fn = _fn(self.b, "llvm.prefetch.p0", ir.VoidType(), _I8.as_pointer(), _I32, _I32, _I32)
        for c in range(0, n, 64):
            self.b.call(fn, [self.at(self.at(p, off), c), _I32(0), _I32(3), _I32(1)])


def _k45(op, w, x, bs, sx, five):
    """A Q4_K (Q5_K) block at w (half d, half dmin, 12 bytes of 6-bit scales and mins, Q5_K's
    32 bytes of fifth bits, 128 of nibbles) times x: d*sx * sum sc*q*x - dmin*sx * sum m*(x's
    sums per 32). Scales and mins unpacked as ggml's get_scale_min_k4, four words at a time (as
    llama.cpp does). Pair sums at most 2*31*127 (int16), times a scale at most 63: the block's
    sum stays below 2**31."""
    b = op.b
    u0, u1, u2 = (op.load(w, 4 + 4 * i, _I32) for i in range(3))
    k1, k2, k3 = _I32(0x3F3F3F3F), _I32(0x0F0F0F0F), _I32(0x03030303)
    sm = [b.and_(u0, k1),                                                     # scales 0-3
          b.or_(b.and_(u2, k2), b.shl(b.and_(b.lshr(u0, _I32(6)), k3), _I32(4))),   # scales 4-7
          b.and_(u1, k1),                                                     # mins 0-3
          b.or_(b.and_(b.lshr(u2, _I32(4)), k2), b.shl(b.and_(b.lshr(u1, _I32(6)), k3), _I32(4)))]
    v = ir.Constant(_V4D, ir.Undefined)
    for i, word in enumerate(sm):
        v = b.insert_element(v, word, _I32(i))
    s16 = b.zext(b.bitcast(v, _V16B), _V16W)          # lanes 0-7 the scales, 8-15 the mins
    m15, m1, s4 = op.splat(_V32B, 15), op.splat(_V32B, 1), op.splat(_V32B, 4)
    qs = 48 if five else 16
    h = op.load(w, 16, _V32B) if five else None
    acc = ir.Constant(_V8D, None)
    for j in range(4):
        q = op.load(w, qs + 32 * j, _V32B)
        lo, hi = b.and_(q, m15), b.lshr(q, s4)
        if five:        # fifth bits: bit 2j of byte i for value i, bit 2j+1 for i + 32
            lo = b.or_(lo, b.shl(b.and_(b.lshr(h, op.splat(_V32B, 2 * j)), m1), s4))
            hi = b.or_(hi, b.shl(b.and_(b.lshr(h, op.splat(_V32B, 2 * j + 1)), m1), s4))
        pl = op.maddwd(op.maddubs(lo, op.load(x, 64 * j, _V32B)), op.lanes(s16, [2 * j] * 16))
        ph = op.maddwd(op.maddubs(hi, op.load(x, 64 * j + 32, _V32B)), op.lanes(s16, [2 * j + 1] * 16))
        acc = b.add(acc, b.add(pl, ph))
    mins = op.maddwd(op.load(bs, 0, _V16W), op.lanes(s16, [8 + i // 2 for i in range(16)]))
    d, dmin = b.fmul(op.half(w, 0), sx), b.fmul(op.half(w, 2), sx)
    return b.fsub(op.scaled(acc, d), op.scaled(mins, dmin))


def _q6(op, w, x, bs, sx):
    """A Q6_K block at w (128 bytes of low nibbles, 64 of bit pairs, 16 int8 scales, half d)
    times x: d*sx * sum sc*(q - 32)*x, the minus 32 through x's sums per 16. Pair sums at most
    2*63*127, times |sc| <= 128: within int32."""
    b = op.b
    sc = b.sext(op.load(w, 192, _V16B), _V16W)
    m15, m3, s4 = op.splat(_V32B, 15), op.splat(_V32B, 3), op.splat(_V32B, 4)
    acc = ir.Constant(_V8D, None)
    for n in range(2):
        A, B = op.load(w, 64 * n, _V32B), op.load(w, 64 * n + 32, _V32B)
        H = op.load(w, 128 + 32 * n, _V32B)
        top = [b.shl(b.and_(b.lshr(H, op.splat(_V32B, 2 * t)), m3), s4) for t in range(4)]
        vals = (b.or_(b.and_(A, m15), top[0]), b.or_(b.and_(B, m15), top[1]),
                b.or_(b.lshr(A, s4), top[2]), b.or_(b.lshr(B, s4), top[3]))
        for g, v in enumerate(vals):             # 32 values: scale 8n+2g (first 16), 8n+2g+1
            s = 8 * n + 2 * g
            p = op.maddubs(v, op.load(x, 128 * n + 32 * g, _V32B))
            acc = b.add(acc, op.maddwd(p, op.lanes(sc, [s] * 8 + [s + 1] * 8)))
    corr = op.maddwd(op.load(bs, 0, _V16W), sc)
    acc = b.sub(acc, b.shl(corr, op.splat(_V8D, 5)))
    return op.scaled(acc, b.fmul(op.half(w, 208), sx))


def _q8_0(op, w, x, bs, sx):
    """Eight Q8_0 blocks at w (34 bytes each: half d, 32 int8) times x: per block d*sx * its
    integer sum of q*x, |q| <= 128 as an unsigned byte times x given q's sign (pair sums at
    most 2*128*127, within int16)."""
    b = op.b
    absf = _fn(b, "llvm.abs.v32i8", _V32B, _V32B, _I1)
    sign = _fn(b, "llvm.x86.avx2.psign.b", _V32B, _V32B, _V32B)
    ones = op.splat(_V16W, 1)
    out = ir.Constant(_V8F, None)
    for k in range(8):
        q = op.load(w, 34 * k + 2, _V32B)
        p = op.maddubs(b.call(absf, [q, _I1(0)]), b.call(sign, [op.load(x, 32 * k, _V32B), q]))
        out = b.fadd(out, op.scaled(op.maddwd(p, ones), b.fmul(op.half(w, 34 * k), sx)))
    return out


def _row(block, nbytes, hints):
    """An intrinsic f(w, wo, x, xo, xd, xdo, bs, bso, nb) -> float32: the dot product of the nb
    units of 256 values at w[wo:] (nbytes each) with x[xo:] (flat element offsets; xd[xdo + u]
    x's step for unit u, bs[bso + 16u:] its sums per 16), `block` giving each unit's eight
    float32 lanes, summed once at the end. hints: prefetch AHEAD bytes on, per unit."""
    @intrinsic
    def row(typingctx, w, wo, x, xo, xd, xdo, bs, bso, nb):
        sig = types.float32(w, wo, x, xo, xd, xdo, bs, bso, nb)

        def codegen(context, builder, sig, args):
            b = builder
            op = _Ops(b)

            wp, xp, bp = (_elem(context, b, sig, args, k) for k in (0, 2, 6))
            xda = context.make_array(sig.args[4])(context, b, args[4])
            xdp = b.gep(xda.data, [context.cast(b, args[5], sig.args[5], types.intp)])
            n = context.cast(b, args[8], sig.args[8], types.intp)
            acc = cgutils.alloca_once_value(b, ir.Constant(_V8F, None))
            with cgutils.for_range(b, n) as loop:
                u = loop.index
                wu = op.at(wp, b.mul(u, u.type(nbytes)))
                if hints:
                    op.prefetch(wu, AHEAD, nbytes)
                lanes = block(op, wu, op.at(xp, b.mul(u, u.type(256))), op.at(bp, b.mul(u, u.type(32))),
                              b.load(b.gep(xdp, [u])))
                b.store(b.fadd(b.load(acc), lanes), acc)
            red = _fn(b, "llvm.vector.reduce.fadd.v8f32", _F32, _F32, _V8F)
            return b.call(red, [ir.Constant(_F32, 0.0), b.load(acc)], fastmath=("reassoc",))
        return sig, codegen
    return row


row_q4_K = _row(lambda op, w, x, bs, sx: _k45(op, w, x, bs, sx, False), 144, True)
row_q5_K = _row(lambda op, w, x, bs, sx: _k45(op, w, x, bs, sx, True), 176, True)
row_q6_K = _row(_q6, 210, True)
row_q8_0 = _row(_q8_0, 272, False)


@njit(cache=True, nogil=True)
def rows(qt, w, qx, xd, bs, out, n0, n1):
    """Rows n0..n1-1 against each row of x; Q8_0 asks for the next row's bytes as a row starts
    (the K-quants per unit, inside their rows)."""
    rb = w.shape[1]
    T, K = qx.shape
    nb = K // 256
    for n in range(n0, n1):
        if qt == Q8_0:
            prefetch_bytes(w, (n + 1) * rb, rb)
        for t in range(T):
            if qt == Q8_0:
                out[t, n] = row_q8_0(w, n * rb, qx, t * K, xd, t * nb, bs, t * 16 * nb, nb)
            elif qt == Q4_K:
                out[t, n] = row_q4_K(w, n * rb, qx, t * K, xd, t * nb, bs, t * 16 * nb, nb)
            elif qt == Q5_K:
                out[t, n] = row_q5_K(w, n * rb, qx, t * K, xd, t * nb, bs, t * 16 * nb, nb)
            else:
                out[t, n] = row_q6_K(w, n * rb, qx, t * K, xd, t * nb, bs, t * 16 * nb, nb)
