"""Encoders to ggml's block formats, rounding as ggml's reference quantizers do, so files we
write decode the same everywhere. A matrix a [N, K] float32 becomes uint8 [N, row_bytes]."""

from __future__ import annotations

import numpy as np

from ..errors import CheckpointError
from ..kernels.quants import BF16, F16, Q8_0, TYPE_NAMES

ENCODERS = (F16, BF16, Q8_0)


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
    if K % 32:
        raise CheckpointError(f"tensor '{name}' has rows of {K} values, not a multiple of Q8_0's "
                              f"32", hint="keep this tensor in F16 or F32")
    blocks = a.reshape(N, K // 32, 32)
    d = np.abs(blocks).max(axis=2, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    qs = _round_away(blocks * inv).astype(np.int8).view(np.uint8)
    out = np.empty((N, K // 32, 34), np.uint8)
    out[:, :, :2] = d.astype(np.float16).view(np.uint8)
    out[:, :, 2:] = qs
    return out.reshape(N, K // 32 * 34)
