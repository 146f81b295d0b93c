"""Encoders to ggml's block formats, rounding as ggml's reference quantizers do, so files we
write decode the same everywhere. A matrix a [N, K] float32 becomes uint8 [N, row_bytes]."""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from ..errors import CheckpointError
from ..kernels.quants import BF16, F16, LAYOUT, Q4_0, Q4_K, Q5_K, Q6_K, Q8_0, TYPE_NAMES

ENCODERS = (F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K)


def _round_away(v: np.ndarray) -> np.ndarray:
    """C's roundf (halves away from zero), exact for float32 v: float64 holds |v| + 0.5 exactly."""
    return np.copysign(np.floor(np.abs(v.astype(np.float64)) + 0.5), v)


def quantize(a: np.ndarray, qtype: int, name: str = "") -> np.ndarray:
    """a [N, K] (float32) encoded as ggml type qtype: uint8 [N, row_bytes]."""
    if qtype not in ENCODERS:
        raise CheckpointError(f"cannot write tensor '{name}' as ggml type "
                              f"{TYPE_NAMES.get(qtype, qtype)}",
                              hint="choose one of " + ", ".join(TYPE_NAMES[t] for t in ENCODERS))
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise CheckpointError(f"tensor '{name}' holds NaN or infinite values",
                              hint="the source checkpoint is damaged")
    N, K = a.shape
    if qtype == F16:
        return a.astype(np.float16).view(np.uint8)
    if qtype == BF16:
        # round to nearest even on the upper 16 bits (ggml_compute_fp32_to_bf16)
        n = a.view(np.uint32).astype(np.uint64)
        return ((n + 0x7FFF + ((n >> 16) & 1)) >> 16).astype(np.uint16).view(np.uint8).reshape(N, 2 * K)
    qk, bb, _ = LAYOUT[qtype]
    if K % qk:
        raise CheckpointError(f"tensor '{name}' has rows of {K} values, not a multiple of "
                              f"{TYPE_NAMES[qtype]}'s {qk}", hint="keep this tensor in F16 or F32")
    if qtype != Q8_0:
        out = np.empty((N, K // qk * bb), np.uint8)
        _encode_blocks(a, qtype, out, max(1, min(N, 4 * numba.get_num_threads())))
        return out
    blocks = a.reshape(N, K // 32, 32)
    d = np.abs(blocks).max(axis=2, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    qs = _round_away(blocks * inv).astype(np.int8).view(np.uint8)
    out = np.empty((N, K // 32, 34), np.uint8)
    out[:, :, :2] = d.astype(np.float16).view(np.uint8)
    out[:, :, 2:] = qs
    return out.reshape(N, K // 32 * 34)


# ---- K-quant and Q4_0 encoders: ggml-quants.c's reference quantizers (quantize_row_*_ref)
# step for step in float32, no fused multiply-adds, so the bytes equal ggml's built with
# -ffp-contract=off. Numba turns int*float32 into float64: every int is cast first.
F0 = np.float32(0.0)
GROUP_MAX_EPS = np.float32(1e-15)


@njit(cache=True, nogil=True)
def _nearest_int(f):
    """ggml's nearest_int: the float32 sum f + 1.5 * 2**23 rounds half to even (|f| < 2**22;
    ggml asserts that, a NaN gives 0)."""
    if f != f:
        return 0
    f = min(max(f, np.float32(-4194303.0)), np.float32(4194303.0))
    return np.int32(f + np.float32(12582912.0)) - 12582912


@njit(cache=True, nogil=True)
def _half(f):
    """f rounded to IEEE half as GGML_FP32_TO_FP16 does (nearest even, inf past 65504):
    (its value as float32, its 16 bits)."""
    sign = 0x8000 if math.copysign(1.0, f) < 0 else 0
    a = abs(np.float64(f))
    if a == 0:
        return np.float32(f), sign
    if a >= 65520.0:
        return np.float32(math.copysign(np.inf, f)), sign | 0x7C00
    e = max(math.frexp(a)[1] - 1, -14)        # a = m * 2**e, 1 <= m < 2 (or subnormal)
    r = np.rint(a / math.ldexp(1.0, e - 10))  # a in units of the half's last place
    v = np.float32(r * math.ldexp(1.0, e - 10))
    return (-v if sign else v), sign | (((e + 14) << 10) + np.int64(r))


@njit(cache=True, nogil=True)
def _put_half(r, o, bits):
    r[o] = bits & 255
    r[o + 1] = bits >> 8


@njit(cache=True, nogil=True)
def _qkx2(x, o, nmax, w, L, lo, Laux, rmin, nstep):
    """make_qkx2_quants on the 32 values x[o:o+32] with weights w (use_mad false, rdelta 0.1):
    levels into L[lo:lo+32], returns (scale, -min)."""
    n = 32
    mn = x[o]
    mx = x[o]
    sum_w = w[0]
    sum_x = sum_w * x[o]
    for i in range(1, n):
        v = x[o + i]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
        sum_w += w[i]
        sum_x += w[i] * v
    if mn > 0:
        mn = F0
    if mx == mn:
        for i in range(n):
            L[lo + i] = 0
        return F0, -mn
    fmax = np.float32(nmax)
    iscale = fmax / (mx - mn)
    scale = np.float32(1.0) / iscale
    best = F0
    for i in range(n):
        li = max(0, min(nmax, _nearest_int(iscale * (x[o + i] - mn))))
        L[lo + i] = li
        diff = scale * np.float32(li) + mn - x[o + i]
        best += w[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (rmin + np.float32(0.1) * np.float32(step) + fmax) / (mx - mn)
        sum_l = F0
        sum_l2 = F0
        sum_xl = F0
        for i in range(n):
            li = max(0, min(nmax, _nearest_int(iscale * (x[o + i] - mn))))
            Laux[i] = li
            fl = np.float32(li)
            sum_l += w[i] * fl
            sum_l2 += w[i] * fl * fl
            sum_xl += w[i] * fl * x[o + i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F0
                this_scale = sum_xl / sum_l2
            cur = F0
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[o + i]
                cur += w[i] * (diff * diff)
            if cur < best:
                for i in range(n):
                    L[lo + i] = Laux[i]
                best = cur
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(cache=True, nogil=True)
def _q45_K_block(x, o, r, ro, q5, L, Laux, w, scales, mins):
    """quantize_row_q4_K_ref (q5 false) or quantize_row_q5_K_ref (q5 true) on the 256 values
    x[o:], into the block at r[ro:] (d, dmin, 12 bytes of scales, [qh 32 bytes,] qs 128)."""
    nmax = 31 if q5 else 15
    max_scale = F0
    max_min = F0
    for j in range(8):
        s2 = F0
        for i in range(32):
            s2 += x[o + 32 * j + i] * x[o + 32 * j + i]
        av = np.float32(np.sqrt(s2 / np.float32(32.0)))
        for i in range(32):
            w[i] = av + abs(x[o + 32 * j + i])
        if q5:
            sc, mn = _qkx2(x, o + 32 * j, nmax, w, L, 32 * j, Laux, np.float32(-0.5), 15)
        else:
            sc, mn = _qkx2(x, o + 32 * j, nmax, w, L, 32 * j, Laux, np.float32(-1.0), 20)
        scales[j] = sc
        mins[j] = mn
        if sc > max_scale:
            max_scale = sc
        if mn > max_min:
            max_min = mn
    inv_scale = np.float32(63.0) / max_scale if max_scale > 0 else F0
    inv_min = np.float32(63.0) / max_min if max_min > 0 else F0
    for j in range(8):
        ls = min(63, _nearest_int(inv_scale * scales[j]) & 255)     # C stores them as uint8
        lm = min(63, _nearest_int(inv_min * mins[j]) & 255)
        if j < 4:
            r[ro + 4 + j] = ls
            r[ro + 8 + j] = lm
        else:
            r[ro + 8 + j] = (ls & 15) | ((lm & 15) << 4)
            r[ro + j] |= (ls >> 4) << 6
            r[ro + 4 + j] |= (lm >> 4) << 6
        scales[j] = np.float32(ls)            # now the 6-bit scale and min
        mins[j] = np.float32(lm)
    d, bits = _half(max_scale / np.float32(63.0))
    _put_half(r, ro, bits)
    dmin, bits = _half(max_min / np.float32(63.0))
    _put_half(r, ro + 2, bits)
    for j in range(8):
        dj = d * scales[j]
        if dj == 0:
            continue
        dm = dmin * mins[j]
        for i in range(32):
            L[32 * j + i] = max(0, min(nmax, _nearest_int((x[o + 32 * j + i] + dm) / dj)))
    qs = ro + (48 if q5 else 16)
    if q5:
        for i in range(32):
            r[ro + 16 + i] = 0
    for j in range(4):
        for i in range(32):
            l1 = L[64 * j + i]
            l2 = L[64 * j + 32 + i]
            if q5:
                r[ro + 16 + i] |= ((l1 >> 4) << (2 * j)) | ((l2 >> 4) << (2 * j + 1))
            r[qs + 32 * j + i] = (l1 & 15) | ((l2 & 15) << 4)


@njit(cache=True, nogil=True)
def _qx(x, o, L, lo):
    """make_qx_quants(16, 32, x + o, L + lo, rmse_type 1, no weights): levels + 32 into L,
    returns the scale."""
    n = 16
    mx = F0
    amax = F0
    for i in range(n):
        ax = abs(x[o + i])
        if ax > amax:
            amax = ax
            mx = x[o + i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[lo + i] = 0
        return F0
    iscale = np.float32(-32.0) / mx
    sumlx = F0
    suml2 = F0
    for i in range(n):
        li = max(-32, min(31, _nearest_int(iscale * x[o + i])))
        L[lo + i] = li + 32
        v = x[o + i]
        fl = np.float32(li)
        sumlx += v * v * v * fl
        suml2 += v * v * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else F0
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(np.float32(32.0) + np.float32(0.1) * np.float32(step)) / mx
        sumlx = F0
        suml2 = F0
        for i in range(n):
            fl = np.float32(max(-32, min(31, _nearest_int(iscale * x[o + i]))))
            v = x[o + i]
            sumlx += v * v * v * fl
            suml2 += v * v * fl * fl
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[lo + i] = max(-32, min(31, _nearest_int(iscale * x[o + i]))) + 32
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True, nogil=True)
def _q6_K_block(x, o, r, ro, L, scales):
    """quantize_row_q6_K_ref on the 256 values x[o:], into the block at r[ro:] (ql 128 bytes,
    qh 64, 16 int8 scales, d)."""
    max_scale = F0
    max_abs = F0
    for j in range(16):
        sc = _qx(x, o + 16 * j, L, 16 * j)
        scales[j] = sc
        if abs(sc) > max_abs:
            max_abs = abs(sc)
            max_scale = sc
    if max_abs < GROUP_MAX_EPS:
        for i in range(210):
            r[ro + i] = 0
        return
    iscale = np.float32(-128.0) / max_scale
    d, bits = _half(np.float32(1.0) / iscale)
    _put_half(r, ro + 208, bits)
    for j in range(16):
        s = ((min(127, _nearest_int(iscale * scales[j])) + 128) & 255) - 128     # an int8
        r[ro + 192 + j] = s & 255
        dj = d * np.float32(s)
        if dj == 0:
            continue
        for i in range(16):
            L[16 * j + i] = max(-32, min(31, _nearest_int(x[o + 16 * j + i] / dj))) + 32
    for h in range(2):
        for i in range(32):
            a = L[128 * h + i]
            b = L[128 * h + 32 + i]
            c = L[128 * h + 64 + i]
            e = L[128 * h + 96 + i]
            r[ro + 64 * h + i] = (a & 15) | ((c & 15) << 4)
            r[ro + 64 * h + 32 + i] = (b & 15) | ((e & 15) << 4)
            r[ro + 128 + 32 * h + i] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)


@njit(cache=True, nogil=True)
def _q4_0_block(x, o, r, ro):
    """quantize_row_q4_0_ref on the 32 values x[o:], into the block at r[ro:] (d, 16 bytes)."""
    amax = F0
    mx = F0
    for i in range(32):
        if amax < abs(x[o + i]):
            amax = abs(x[o + i])
            mx = x[o + i]
    d, bits = _half(mx / np.float32(-8.0))
    _put_half(r, ro, bits)
    dd = mx / np.float32(-8.0)
    inv = np.float32(1.0) / dd if dd != 0 else F0
    for i in range(16):
        lo = min(15, np.int32(x[o + i] * inv + np.float32(8.5)))
        hi = min(15, np.int32(x[o + 16 + i] * inv + np.float32(8.5)))
        r[ro + 2 + i] = lo | (hi << 4)


@njit(cache=True, nogil=True)
def _encode_rows(a, qt, out, n0, n1):
    """out[n] = row n of a [N, K] float32 as blocks of qt (Q4_0 Q4_K Q5_K Q6_K), n0 <= n < n1."""
    K = a.shape[1]
    qk, bb = (32, 18) if qt == Q4_0 else ((256, 210) if qt == Q6_K else ((256, 176) if qt == Q5_K else (256, 144)))
    L = np.empty(256, np.int32)
    Laux = np.empty(32, np.int32)
    w = np.empty(32, np.float32)
    scales = np.empty(16, np.float32)
    mins = np.empty(8, np.float32)
    for n in range(n0, n1):
        x = a[n]
        r = out[n]
        for b in range(K // qk):
            if qt == Q6_K:
                _q6_K_block(x, b * qk, r, b * bb, L, scales)
            elif qt == Q4_0:
                _q4_0_block(x, b * qk, r, b * bb)
            else:
                _q45_K_block(x, b * qk, r, b * bb, qt == Q5_K, L, Laux, w, scales, mins)


@njit(parallel=True, cache=True, nogil=True)
def _encode_blocks(a, qt, out, parts):
    """_encode_rows over `parts` contiguous ranges of rows in parallel."""
    N = a.shape[0]
    per = (N + parts - 1) // parts
    for p in prange(parts):
        _encode_rows(a, qt, out, p * per, min(N, (p + 1) * per))
