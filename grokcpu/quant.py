"""ggml's block formats: which types grokcpu reads, their layout, and the checked entry points
of the products on them (the numba kernels are in kernels/quants.py, the decode products'
compiled entry in kernels/ggml.py)."""

from __future__ import annotations

import numba
import numpy as np
from gguf import quants as gq

from .errors import CheckpointError
from .kernels import ggml as kg
from .kernels import quants as kq

TYPE_NAMES = kq.TYPE_NAMES
LAYOUT = kq.LAYOUT
SUPPORTED = ", ".join(TYPE_NAMES[t] for t in LAYOUT)
F16_TABLE = kg.F16_TABLE


def _tables() -> kq.Tables:
    """The non-linear types' value tables, read-only, from gguf-py's classes (one source of
    truth: its grids are ggml's, decoded from hex by its own init_grid)."""
    def grid(cls):
        cls.init_grid()
        return cls.grid.reshape(cls.grid_shape)
    def packed(g):                        # a grid's rows of four integers < 256: value j in bits 8j..
        return (g.astype(np.uint32) << (8 * np.arange(4, dtype=np.uint32))).sum(axis=1, dtype=np.uint32)
    iq3xxs, iq3s = grid(gq.IQ3_XXS), grid(gq.IQ3_S)
    t = kq.Tables(np.array(gq.IQ4_NL.kvalues, np.float32), np.frombuffer(gq.IQ2_XXS.ksigns, np.uint8),
                  grid(gq.IQ2_XXS), grid(gq.IQ2_XS), grid(gq.IQ2_S), iq3xxs, iq3s, grid(gq.IQ1_S),
                  packed(iq3xxs), packed(iq3s))
    t = kq.Tables(*(np.array(a) for a in t))
    for a in t:
        a.flags.writeable = False
    return t


TABLES = _tables()
ROWS = kg.ROWS                  # the types with a decode product in kernels/ggml.py (fused decode too)
FAST = ROWS + (kq.IQ3_XXS, kq.IQ3_S)   # the types with a dedicated decode product
Q8_ACT = kg.Q8_ACT              # those of them that can take x rounded to 8 bits (activations="q8")
# the other types multiply by float32 tiles of about this many bytes (dequant_rows, then BLAS)
TILE_BYTES = 1 << 20


def type_name(qtype: int) -> str:
    return TYPE_NAMES.get(qtype, f"unknown type {qtype}")


def layout(qtype: int, name: str = "") -> tuple[int, int]:
    """(values per block, bytes per block) of a type grokcpu can read, or a CheckpointError
    naming the tensor and the type."""
    if qtype not in LAYOUT:
        what = f"tensor '{name}'" if name else "a tensor"
        raise CheckpointError(f"{what} has ggml type {type_name(qtype)} (id {qtype}), which grokcpu "
                              f"cannot read", hint=f"use a file quantized to one of {SUPPORTED}")
    qk, bb, _ = LAYOUT[qtype]
    return qk, bb


def row_values(qtype: int, row_bytes: int, name: str = "") -> int:
    """K, the values in a row of row_bytes bytes of type qtype."""
    qk, bb = layout(qtype, name)
    if row_bytes % bb:
        raise CheckpointError(f"tensor '{name}': a row of {row_bytes} bytes is not a whole number of "
                              f"{type_name(qtype)} blocks ({bb} bytes)", hint="the file is damaged")
    return row_bytes // bb * qk


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view: memory-mapped weights are read-only, and one array type means one
    compiled specialization."""
    v = a.view()
    v.flags.writeable = False
    return v


def _matrix(qtype: int, w: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    if w.dtype != np.uint8 or w.ndim != 2 or not w.flags.c_contiguous:
        raise ValueError(f"{name or 'matrix'}: expected C-contiguous uint8 [N, row_bytes], "
                         f"got {w.dtype} {w.shape}")
    return _readonly(w), row_values(qtype, w.shape[1], name)


def prepared(qtype: int, w: np.ndarray, name: str = "") -> tuple:
    """The matrix w (uint8 [N, row_bytes] of a type in ROWS) as kernels/ggml.py and the fused
    decode kernels take it, checked once: (qtype, w, w16), read-only, w16 its uint16 view."""
    if qtype not in ROWS:
        raise ValueError(f"{name or 'matrix'}: {type_name(qtype)} has no rows_product")
    w, _ = _matrix(qtype, w, name)
    return int(qtype), w, w.view(np.uint16)


# stand-ins for rows_product's buffers that a call does not use (one type each: one specialization)
_NO_F32 = np.zeros((1, 1), np.float32)
_NO_I16 = np.zeros((1, 1), np.int16)
_NO_I8 = np.zeros((1, 1), np.int8)
_NO_I32 = np.zeros((1, 1), np.int32)


def matvec(qtype: int, w: np.ndarray, x: np.ndarray, out: np.ndarray | None = None,
           name: str = "", activations: str = "f32") -> np.ndarray:
    """out[T, N] = x[T, K] @ W.T (float32) for the ggml matrix w, uint8 [N, row_bytes] of type
    qtype, read in place: for one to a few rows of x (decode). activations="q8": for the types in
    Q8_ACT, x is first rounded to 8 bits per 256 values (faster integer products, not exact)."""
    w, K = _matrix(qtype, w, name)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != K:
        raise ValueError(f"{name or 'matrix'}: x has shape {x.shape}, expected [T, {K}]")
    if out is None:
        out = np.empty((x.shape[0], w.shape[0]), np.float32)
    elif out.shape != (x.shape[0], w.shape[0]) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"{name or 'matrix'}: out must be float32 {(x.shape[0], w.shape[0])}")
    x = _readonly(x)
    if qtype in (kq.IQ3_XXS, kq.IQ3_S):
        xp = _readonly(kq.x_order_iq3(x))
        kq.matvec_iq3(qtype, w, w.view(np.uint16), xp, out, F16_TABLE, TABLES, numba.get_num_threads(), 64)
        return out
    if qtype in ROWS:
        T = x.shape[0]
        q8 = activations == "q8" and kg.takes_q8(qtype, K)
        xs = np.empty((T, K // 32), np.float32) if qtype in (kq.Q4_K, kq.Q5_K) and not q8 else _NO_F32
        xd, qs = (np.empty((T, K // 256), np.float32), np.empty((T, K // 32), np.int32)) if q8 else (_NO_F32, _NO_I32)
        bytes8 = q8 and kg.AVX2                  # x in the byte layout of kernels/simd.py
        qx = np.empty((T, K), np.int16) if q8 and not bytes8 else _NO_I16
        qb, bs = (np.empty((T, K), np.int8), np.empty((T, K // 16), np.int16)) if bytes8 else (_NO_I8, _NO_I16)
        kg.rows_product(qtype, w, w.view(np.uint16), x, out, xs, qx, xd, qs, qb, bs, F16_TABLE, q8,
                        numba.get_num_threads(), 16)
        return out
    rows = max(1, TILE_BYTES // (4 * K))
    tile = np.empty((min(rows, w.shape[0]), K), np.float32)
    for r0 in range(0, w.shape[0], rows):
        r1 = min(w.shape[0], r0 + rows)
        kq.dequant_rows(qtype, w, r0, r1, tile[:r1 - r0], TABLES, 32)
        out[:, r0:r1] = x @ tile[:r1 - r0].T
    return out


def dequant_rows(qtype: int, w: np.ndarray, r0: int, r1: int, out: np.ndarray | None = None,
                 name: str = "") -> np.ndarray:
    """Rows r0..r1-1 of the ggml matrix w (uint8 [N, row_bytes] of type qtype) as float32
    [r1-r0, K]: a tile for a BLAS product (prefill)."""
    w, K = _matrix(qtype, w, name)
    if not 0 <= r0 <= r1 <= w.shape[0]:
        raise ValueError(f"{name or 'matrix'}: rows {r0}..{r1} out of 0..{w.shape[0]}")
    if out is None:
        out = np.empty((r1 - r0, K), np.float32)
    elif out.shape != (r1 - r0, K) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"{name or 'matrix'}: out must be float32 {(r1 - r0, K)}")
    kq.dequant_rows(qtype, w, r0, r1, out, TABLES, 32)
    return out
