"""How the expert cache moves a read's bytes into a slot: a copy, and the int8 transpose that
stores ckpt-0's down projections output-major, both with non-temporal stores.

A slot's lines are written whole and streamed to RAM: no read of the destination first, and
the slot's rows, 32 KiB apart and so in the same cache sets, do not evict each other. A copy
runs at 12 GB/s a core here against numpy's 8.

The transpose's block is 64 source rows x 16 columns. Each of 16 vectors of 64 bytes gathers
four rows' 16 bytes (rows r, r+16, r+32, r+48 in its four 128-bit lanes); four rounds of
interleaves (bytes, pairs, quads, halves; vector i with vector i + 8, within each lane:
punpck*) then leave in vector j column j's 64 rows in order, as rows are taken in bit-reversed
order: one whole destination line. 6.9 GB/s a core from RAM here, against 1 GB/s for a
transpose of 8x8 blocks in words and 1.9 GB/s for these blocks with plain stores.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .simd import _elem, _Ops

_ROWS = [int(f"{i:04b}"[::-1], 2) for i in range(16)]       # bit-reversed: columns come out in order
_I8, _I32 = ir.IntType(8), ir.IntType(32)
_V16, _V64 = ir.VectorType(_I8, 16), ir.VectorType(_I8, 64)


def _interleave(b, x, y, e, hi):
    """punpck{l,h}: per 16-byte lane, the low (high) halves of x's and y's e-byte elements, alternated."""
    n, mask = 16 // e, []
    for lane in range(4):
        for k in range(n // 2):
            el = lane * 16 + (k + (n // 2 if hi else 0)) * e
            mask += [el + i for i in range(e)] + [64 + el + i for i in range(e)]
    return b.shuffle_vector(x, y, ir.Constant(ir.VectorType(_I32, 64), mask))


def _store(b, v, p, streaming):
    st = b.store(v, b.bitcast(p, _V64.as_pointer()), align=64 if streaming else 1)
    if streaming:
        st.set_metadata("nontemporal", b.module.add_metadata([_I32(1)]))


@intrinsic
def _lines(typingctx, src, so, dst, do):
    """dst[do:do+256] = src[so:so+256], dst's four lines 64-byte aligned and streamed."""
    sig = types.void(src, so, dst, do)

    def codegen(context, builder, sig, args):
        op, sp, dp = _Ops(builder), _elem(context, builder, sig, args, 0), _elem(context, builder, sig, args, 2)
        for k in range(0, 256, 64):
            _store(builder, op.load(sp, k, _V64), op.at(dp, k), True)
        return context.get_dummy_value()
    return sig, codegen


def _block(streaming: bool):
    """An intrinsic f(src, so, ss, dst, do, ds): dst[do + c*ds + r] = src[so + r*ss + c] for
    r < 64, c < 16 (flat int8 arrays; offsets and strides in bytes). streaming: the 16
    destination lines are 64-byte aligned and written non-temporally."""
    @intrinsic
    def block(typingctx, src, so, ss, dst, do, ds):
        sig = types.void(src, so, ss, dst, do, ds)

        def codegen(context, builder, sig, args):
            b, op = builder, _Ops(builder)

            sp, dp = _elem(context, b, sig, args, 0), _elem(context, b, sig, args, 3)
            ss_, ds_ = (context.cast(b, args[k], sig.args[k], types.intp) for k in (2, 5))

            def cat(x, y):
                n = x.type.count
                return b.shuffle_vector(x, y, ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n))))
            v = []
            for r in _ROWS:
                q = [op.load(sp, b.mul(ss_, ss_.type(r + 16 * lane)), _V16) for lane in range(4)]
                v.append(cat(cat(q[0], q[1]), cat(q[2], q[3])))
            for e in (1, 2, 4, 8):
                v = [_interleave(b, v[i], v[i + 8], e, hi) for i in range(8) for hi in (False, True)]
            for j in range(16):
                _store(b, v[j], op.at(dp, b.mul(ds_, ds_.type(j))), streaming)
            return context.get_dummy_value()
        return sig, codegen
    return block


_block_nt, _block_any = _block(True), _block(False)


@intrinsic
def _fence(typingctx):
    """Order the non-temporal stores before whatever the thread does next (mfence on x86)."""
    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


@njit(cache=True, nogil=True)
def transpose_into(src, dst, c0):
    """dst[:, c0:c0+n] = src[n, D].T (int8, both C-contiguous): how the expert cache stores the
    down projection output-major as its rows arrive from the file. Runs on an I/O thread (no
    prange). Whole 64 x 16 blocks, then the rest byte by byte."""
    n, D = src.shape
    F = dst.shape[1]
    if dst.shape[0] != D or c0 < 0 or c0 + n > F:      # the blocks' stores are unchecked
        raise ValueError("transpose_into: src[n, D] does not fit dst[D, c0:c0+n]")
    n64, D16 = n // 64 * 64, D // 16 * 16
    s, d = src.reshape(n * D), dst.reshape(D * F)
    streaming = (np.int64(dst.ctypes.data) + c0) % 64 == 0 and F % 64 == 0     # (ctypes.data: uint64)
    for i in range(0, n64, 64):
        for c in range(0, D16, 16):
            if streaming:
                _block_nt(s, i * D + c, D, d, c * F + c0 + i, F)
            else:
                _block_any(s, i * D + c, D, d, c * F + c0 + i, F)
    if streaming:
        _fence()
    for i in range(n64):
        for c in range(D16, D):
            dst[c, c0 + i] = src[i, c]
    for i in range(n64, n):
        for c in range(D):
            dst[c, c0 + i] = src[i, c]


@njit(cache=True, nogil=True)
def copy_into(src, dst):
    """dst[:] = src (1-D int8 or uint8 arrays of one length): whole lines streamed where dst's
    are 64-byte aligned."""
    n = src.size
    if dst.size != n:                                   # the lines' stores are unchecked
        raise ValueError("copy_into: src and dst differ in size")
    head = min(n, -np.int64(dst.ctypes.data) % 64)
    dst[:head] = src[:head]
    body = head + (n - head) // 256 * 256
    for i in range(head, body, 256):
        _lines(src, i, dst, i)
    _fence()
    dst[body:] = src[body:]
