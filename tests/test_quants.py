"""ggml block-format kernels and encoders against the gguf package's own (de)quantization."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

from grokcpu import quant  # noqa: E402
from grokcpu.errors import CheckpointError  # noqa: E402
from grokcpu.formats.quantize import quantize  # noqa: E402
from grokcpu.kernels import quants as kq  # noqa: E402

# byte offsets of each block's float16 scale fields: their high byte is masked so that random
# blocks have finite scales (every other random byte pattern is a valid block)
HALF_HIGH_BYTES = {kq.Q8_0: (1,), kq.Q4_0: (1,), kq.IQ4_NL: (1,), kq.IQ4_XS: (1,),
                   kq.Q4_K: (1, 3), kq.Q5_K: (1, 3), kq.Q6_K: (209,), kq.Q2_K: (81, 83),
                   kq.Q3_K: (109,)}
TYPES = list(kq.LAYOUT)


def random_matrix(qtype, N, K, rng):
    """uint8 [N, row_bytes]: N rows of K values of type qtype, every block valid and finite."""
    if qtype in (kq.F32, kq.F16, kq.BF16):
        a = rng.standard_normal((N, K)).astype(np.float32)
        if qtype == kq.F16:
            return a.astype(np.float16).view(np.uint8)
        if qtype == kq.BF16:
            return (a.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return a.view(np.uint8)
    qk, bb, _ = kq.LAYOUT[qtype]
    w = rng.integers(0, 256, (N, K // qk, bb), dtype=np.uint8)
    for o in HALF_HIGH_BYTES[qtype]:
        w[:, :, o] &= 0x3B                # exponent <= 14: |scale| < 1, never inf or NaN
    return w.reshape(N, K // qk * bb)


def shapes(qtype):
    qk = kq.LAYOUT[qtype][0]
    # one block; several blocks with an output count that splits unevenly over threads
    return [(5, qk), (7, 3 * 256)]


@pytest.mark.parametrize("qtype", TYPES, ids=[kq.TYPE_NAMES[t] for t in TYPES])
def test_dequant_rows_equals_gguf(qtype):
    rng = np.random.default_rng(qtype)
    for N, K in shapes(qtype):
        w = random_matrix(qtype, N, K, rng)
        ref = gguf_dequantize(w, qtype).reshape(N, K)
        np.testing.assert_array_equal(quant.dequant_rows(qtype, w, 0, N), ref)
        # a tile in the middle: rows 1..N-2
        np.testing.assert_array_equal(quant.dequant_rows(qtype, w, 1, N - 1), ref[1:N - 1])


@pytest.mark.parametrize("qtype", TYPES, ids=[kq.TYPE_NAMES[t] for t in TYPES])
def test_matvec_equals_float64_product(qtype):
    rng = np.random.default_rng(100 + qtype)
    for N, K in shapes(qtype):
        w = random_matrix(qtype, N, K, rng)
        W = gguf_dequantize(w, qtype).reshape(N, K).astype(np.float64)
        for T in (1, 2, 8):
            x = rng.standard_normal((T, K)).astype(np.float32)
            out = quant.matvec(qtype, w, x)
            ref = x.astype(np.float64) @ W.T
            # float32 products and sums: error bounded by a few ulps of the sum of |terms|
            bound = 1e-6 * K ** 0.5 * (np.abs(x.astype(np.float64)) @ np.abs(W).T) + 1e-30
            assert np.all(np.abs(out - ref) <= bound), (qtype, N, K, T, np.abs(out - ref).max())


def test_unsupported_type_names_type_and_tensor():
    w = np.zeros((2, 66), np.uint8)
    with pytest.raises(CheckpointError, match=r"'blk\.0\.ffn_up\.weight' has ggml type IQ2_XXS"):
        quant.matvec(16, w, np.zeros((1, 256), np.float32), name="blk.0.ffn_up.weight")
    with pytest.raises(CheckpointError, match="unknown type 99"):
        quant.dequant_rows(99, w, 0, 1, name="t")


def test_damaged_row_length_is_an_error():
    w = np.zeros((2, 145), np.uint8)        # not a whole number of 144-byte Q4_K blocks
    with pytest.raises(CheckpointError, match="not a whole number of Q4_K blocks"):
        quant.matvec(kq.Q4_K, w, np.zeros((1, 256), np.float32), name="t")


@pytest.mark.parametrize("qtype", [kq.Q8_0, kq.BF16, kq.F16], ids=["Q8_0", "BF16", "F16"])
def test_encoder_is_bit_equal_to_gguf(qtype):
    rng = np.random.default_rng(7)
    a = (rng.standard_normal((6, 96)) * rng.uniform(0.01, 3, (6, 1))).astype(np.float32)
    a[0, :32] = 0.0                          # an all-zero block (scale 0)
    a[1, :32] = np.r_[127.0, np.arange(-15, 16) + 0.5]    # scale 1: halves round away from zero
    ours = quantize(a, qtype, name="t")
    np.testing.assert_array_equal(ours, gguf_quantize(a, qtype).view(np.uint8).reshape(ours.shape))
    back = quant.dequant_rows(qtype, ours, 0, a.shape[0])
    np.testing.assert_array_equal(back, gguf_dequantize(ours, qtype).reshape(a.shape))


def test_encoder_rejects_bad_input():
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        quantize(np.array([[np.nan] * 32], np.float32), kq.Q8_0, name="t")
    with pytest.raises(CheckpointError, match="cannot write tensor 't' as ggml type Q4_K"):
        quantize(np.zeros((1, 256), np.float32), kq.Q4_K, name="t")
    with pytest.raises(CheckpointError, match="not a multiple of Q8_0"):
        quantize(np.zeros((1, 40), np.float32), kq.Q8_0, name="t")
