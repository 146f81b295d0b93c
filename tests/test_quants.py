"""ggml block-format kernels and encoders against the gguf package's own (de)quantization and
ggml's reference quantizers (tools/ggml_reference.py)."""

import ctypes
import hashlib
import importlib.util
from pathlib import Path

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
                   kq.Q3_K: (109,), kq.IQ3_XXS: (1,), kq.IQ3_S: (1,), kq.IQ2_XXS: (1,), kq.IQ2_XS: (1,),
                   kq.IQ2_S: (1,), kq.IQ1_S: (1,)}
# IQ1_M keeps its half d in the top nibbles of four uint16 fields (bytes 48..55): byte 55's top
# bits are d's sign and highest exponent bits
IQ1_M_D_BYTES = (49, 51, 53, 55)
TYPES = list(kq.LAYOUT)
GRID_TYPES = [kq.IQ3_XXS, kq.IQ3_S, kq.IQ2_XXS, kq.IQ2_XS, kq.IQ2_S, kq.IQ1_S, kq.IQ1_M]


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
    if qtype == kq.IQ1_M:
        w[:, :, 55] &= 0xBF               # exponent <= 15: |d| < 2
    for o in HALF_HIGH_BYTES.get(qtype, ()):
        w[:, :, o] &= 0x3B                # exponent <= 14: |scale| < 1, never inf or NaN
    return w.reshape(N, K // qk * bb)


def with_d(qtype, w, d, every=1):
    """w (uint8 [N, row_bytes] of a grid i-quant) with the half scale d of every `every`-th block
    set to d (float16, broadcast over [N, blocks])."""
    b = w.reshape(w.shape[0], -1, kq.LAYOUT[qtype][1]).copy()
    pick = (np.arange(b.shape[0] * b.shape[1]) % every == every - 1).reshape(b.shape[:2])
    h = np.broadcast_to(np.asarray(d, np.float16), b.shape[:2]).view(np.uint16)
    if qtype == kq.IQ1_M:                 # d's four nibbles: the top nibbles of IQ1_M_D_BYTES
        for k, o in enumerate(IQ1_M_D_BYTES):
            b[..., o] = np.where(pick, (b[..., o] & 0x0F) | (((h >> 4 * k) & 15) << 4), b[..., o])
    else:                                 # d: bytes 0 and 1
        b[..., 0] = np.where(pick, h & 255, b[..., 0])
        b[..., 1] = np.where(pick, h >> 8, b[..., 1])
    return b.reshape(w.shape)


def zero_scales(qtype, w, rng):
    """w with d of every third block +0 or -0 (its values +-0)."""
    return with_d(qtype, w, np.where(rng.random((w.shape[0], 1)) < 0.5, -0.0, 0.0), every=3)


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


@pytest.mark.parametrize("qtype", GRID_TYPES, ids=[kq.TYPE_NAMES[t] for t in GRID_TYPES])
def test_grid_iquants_decode_to_gguf_bits(qtype):
    """The grid i-quants bit for bit (signed zeros too: blocks with d = +-0), rows of up to
    Grok-1's 6144 values, a tile of the last row alone."""
    rng = np.random.default_rng(200 + qtype)
    for N, K in [(2, 512), (3, 1280), (5, 6144)]:
        w = zero_scales(qtype, random_matrix(qtype, N, K, rng), rng)
        ref = gguf_dequantize(w, qtype).reshape(N, K)
        assert np.isfinite(ref).all() and (ref == 0).any()
        got = quant.dequant_rows(qtype, w, 0, N)
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
        assert np.array_equal(quant.dequant_rows(qtype, w, N - 1, N).view(np.uint32), ref[N - 1:].view(np.uint32))


@pytest.mark.parametrize("qtype", GRID_TYPES, ids=[kq.TYPE_NAMES[t] for t in GRID_TYPES])
def test_grid_iquants_matvec_equals_float64_product(qtype):
    """quant.matvec on the grid i-quants against float64 dequantize(W) @ x: odd row counts, one
    and several rows of x, a matrix over several float32 tiles (768 values: 341 rows a tile)."""
    rng = np.random.default_rng(300 + qtype)
    for N, K, Ts in [(1, 256, (1,)), (37, 1024, (1, 3)), (700, 768, (1, 4))]:
        w = random_matrix(qtype, N, K, rng)
        W = gguf_dequantize(w, qtype).reshape(N, K).astype(np.float64)
        for T in Ts:
            x = rng.standard_normal((T, K)).astype(np.float32)
            out = quant.matvec(qtype, w, x)
            # float32 products and sums: error bounded by a few ulps of the sum of |terms|
            bound = 1e-6 * K ** 0.5 * (np.abs(x.astype(np.float64)) @ np.abs(W).T) + 1e-30
            assert np.all(np.abs(out - x.astype(np.float64) @ W.T) <= bound), (N, K, T)


def test_sums32_are_numpys_sums_bit_for_bit():
    """The Q4_K/Q5_K products' per-32 sums of x (kernels/ggml.py, compiled) are what
    quant.matvec took from numpy before: x.reshape(T, -1, 32).sum(axis=2), bit for bit, over
    magnitudes far apart, zeros and negative zeros."""
    from grokcpu.kernels.ggml import sums32
    rng = np.random.default_rng(7)
    for T, K in [(1, 32), (1, 1536), (3, 8192), (2, 256)]:
        for trial in range(20):
            x = (rng.standard_normal((T, K)) * 10.0 ** rng.uniform(-6, 6, (T, K))).astype(np.float32)
            x[rng.random((T, K)) < 0.1 * (trial % 3)] = 0.0
            x[rng.random((T, K)) < 0.02] = -0.0
            got = np.empty((T, K // 32), np.float32)
            sums32(x, got)
            want = x.reshape(T, -1, 32).sum(axis=2, dtype=np.float32)
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (T, K, trial)


def test_unsupported_type_names_type_and_tensor():
    w = np.zeros((2, 54), np.uint8)
    with pytest.raises(CheckpointError, match=r"'blk\.0\.ffn_up\.weight' has ggml type TQ1_0 \(id 34\)"):
        quant.matvec(34, w, np.zeros((1, 256), np.float32), name="blk.0.ffn_up.weight")
    with pytest.raises(CheckpointError, match="unknown type 99"):
        quant.dequant_rows(99, w, 0, 1, name="t")


def test_damaged_row_length_is_an_error():
    w = np.zeros((2, 145), np.uint8)        # not a whole number of 144-byte Q4_K blocks
    with pytest.raises(CheckpointError, match="not a whole number of Q4_K blocks"):
        quant.matvec(kq.Q4_K, w, np.zeros((1, 256), np.float32), name="t")


@pytest.mark.parametrize("qtype", [kq.Q8_0, kq.Q4_0, kq.BF16, kq.F16], ids=["Q8_0", "Q4_0", "BF16", "F16"])
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
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        quantize(np.array([[np.inf] * 256], np.float32), kq.Q6_K, name="t")
    with pytest.raises(CheckpointError, match="cannot write tensor 't' as ggml type Q2_K"):
        quantize(np.zeros((1, 256), np.float32), kq.Q2_K, name="t")
    with pytest.raises(CheckpointError, match="not a multiple of Q8_0's 32"):
        quantize(np.zeros((1, 40), np.float32), kq.Q8_0, name="t")
    with pytest.raises(CheckpointError, match="not a multiple of Q4_K's 256"):
        quantize(np.zeros((1, 288), np.float32), kq.Q4_K, name="t")


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "ggml_reference", Path(__file__).resolve().parents[1] / "tools" / "ggml_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ggml_reference = _load_tool()
K_ENCODERS = {name: qt for name, (qt, _, _) in ggml_reference.TYPES.items()}
# sha256 of ggml's quantize_row_<type>_ref output (llama-cpp-python 0.3.36's ggml-quants.c,
# gcc -O2 -ffp-contract=off) on ggml_reference.cases(); regenerate with
# `python tools/ggml_reference.py`
GGML_DIGESTS = {
    "Q4_0": "f662f328ca647c64532af85f9beeeb48b269c2c2f499119f703a6b10a82dd4dc",
    "Q4_K": "8f67f6454fb8dd367843ed067879d96145598c6d8dac8351e77770bee0617d59",
    "Q5_K": "4b23407d1a995e5a78770ae4741cac6d6f6c58acaa749dc27da64c62533a5c0c",
    "Q6_K": "71b31f8924f4d26fb4a8750ce6f6396ac732e939e2a09ba502cd607bcef11940",
}
# decoded error, as a fraction of the block's largest |value|: Q4_0's one step of amax/8;
# the K-quants' measured worst (0.073, 0.042, 0.016 on Gaussian rows) with a margin
MAX_BLOCK_ERROR = {"Q4_0": 0.126, "Q4_K": 0.11, "Q5_K": 0.06, "Q6_K": 0.025}


@pytest.fixture(scope="module")
def ggml_lib():
    """ggml's reference quantizers, built once into the cache folder (skip where no gcc, or
    no sdist in pip's cache and no network)."""
    path = ggml_reference.build()
    if path is None:
        pytest.skip("ggml's reference could not be built (needs gcc and the llama-cpp-python sdist)")
    return ctypes.CDLL(str(path))


@pytest.mark.parametrize("name", list(K_ENCODERS))
def test_encoder_matches_recorded_ggml_digest(name):
    ours = quantize(ggml_reference.cases(), K_ENCODERS[name], name="t")
    assert hashlib.sha256(ours.tobytes()).hexdigest() == GGML_DIGESTS[name]


@pytest.mark.parametrize("name", list(K_ENCODERS))
def test_encoder_is_bit_equal_to_ggml_reference(name, ggml_lib):
    rng = np.random.default_rng(len(name) + ord(name[1]))
    a = rng.standard_normal((48, 512)) * 10.0 ** rng.uniform(-6, 4, (48, 1))
    a[::4] = rng.standard_cauchy((12, 512))
    a[1::6] = np.round(a[1::6] * 4) / 4                  # ties
    a[2::6] = np.abs(a[2::6])
    a[3::6, 17:300] = 0.0
    a[5, :256] = 7.0                                     # constant, then all-zero, blocks
    a[5, 256:] = 0.0
    a = a.astype(np.float32)
    np.testing.assert_array_equal(quantize(a, K_ENCODERS[name], name="t"),
                                  ggml_reference.quantize(ggml_lib, a, name))


@pytest.mark.parametrize("name", list(K_ENCODERS))
def test_encoded_blocks_decode_within_the_formats_error(name):
    qt = K_ENCODERS[name]
    qk = kq.LAYOUT[qt][0]
    rng = np.random.default_rng(5)
    a = (rng.standard_normal((16, 1024)) * 10.0 ** rng.uniform(-3, 3, (16, 1))).astype(np.float32)
    b = quantize(a, qt, name="t")
    back = gguf_dequantize(b, qt).reshape(a.shape)
    np.testing.assert_array_equal(quant.dequant_rows(qt, b, 0, a.shape[0]), back)
    amax = np.abs(a.reshape(16, -1, qk)).max(axis=2, keepdims=True)
    err = np.abs(back - a).reshape(16, -1, qk) / amax
    assert err.max() <= MAX_BLOCK_ERROR[name], err.max()
