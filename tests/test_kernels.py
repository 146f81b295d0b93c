"""Kernels against float64 numpy on random shapes, including sizes that are not multiples of
the kernels' blocks (1/4/8-row steps, the 2048-column narrow limit, 32768-column chunks split
evenly, 256-row vocab blocks)."""

import numpy as np
import pytest

from grokcpu.backends import cpu
from grokcpu.kernels import layers as K

RNG = np.random.default_rng(1234)


def qweight(R, C, nb):
    w = RNG.integers(-128, 128, (R, C), dtype=np.int8)
    s = (RNG.random((nb, C), dtype=np.float32) + 0.5) / 64
    return w, s


def dequant64(w, s):
    return w.astype(np.float64) * np.repeat(s.astype(np.float64), w.shape[0] // s.shape[0], axis=0)


# float32 accumulation over R terms of size ~1: relative error ~ sqrt(R) * 6e-8 of the row norm
@pytest.mark.parametrize("R,C,nb", [(8, 8, 1), (37, 5, 1), (64, 2049, 8), (203, 300, 7), (1, 3, 1), (4104, 33, 8),
                                    (48, 8200, 8), (29, 65600, 1), (16, 2048, 2)])
def test_matvec_and_matmul_against_float64(R, C, nb):
    if R % nb:
        R = R // nb * nb
    w, s = qweight(R, C, nb)
    ref_w = dequant64(w, s)
    for T in (1, 2, 3, 4, 9, 15, 16, 17):
        x = RNG.standard_normal((T, R)).astype(np.float32)
        ref = x.astype(np.float64) @ ref_w
        scale = np.sqrt((x.astype(np.float64) ** 2) @ (ref_w ** 2)) + 1e-30
        # input-major (as in the file) and output-major (the expert cache's down projections)
        for got in (cpu.matmul(x, w, s, 2), cpu.matmul(x, np.ascontiguousarray(w.T), s, 2, out_major=True)):
            assert got.dtype == np.float32 and got.shape == (T, C)
            assert (np.abs(got - ref) / scale).max() < 1e-5


@pytest.mark.parametrize("R,C,nb", [(64, 8200, 8), (40, 300, 1), (29, 65600, 1), (203, 2049, 7)])
@pytest.mark.parametrize("Q", [1, 2, 3])
def test_matvec_multi_against_float64(R, C, nb, Q):
    """Several matrices sharing x in one pass (an expert's gate and up, or two experts'),
    each matrix's rows in Q ranges; a matrix's result does not depend on its company."""
    from grokcpu.kernels import matvec as M

    R = R // nb * nb
    mats = [qweight(R, C, nb) for _ in range(4)]
    x = RNG.standard_normal(R).astype(np.float32)
    outs = np.empty((4, C), np.float32)
    M.qmatvec_multi(x, tuple(w for w, _ in mats), tuple(s for _, s in mats), outs, np.empty((4, Q, C), np.float32))
    for got, (w, s) in zip(outs, mats):
        ref_w = dequant64(w, s)
        ref = x.astype(np.float64) @ ref_w
        scale = np.sqrt((x.astype(np.float64) ** 2) @ (ref_w ** 2)) + 1e-30
        assert (np.abs(got - ref) / scale).max() < 1e-5
    two = np.empty((2, C), np.float32)
    M.qmatvec_multi(x, (mats[2][0], mats[3][0]), (mats[2][1], mats[3][1]), two, np.empty((2, Q, C), np.float32))
    np.testing.assert_array_equal(two, outs[2:])


@pytest.mark.parametrize("D,F,nb", [(44, 300, 4), (64, 2056, 8), (40, 4104, 1)])
def test_experts_whole_is_bitwise_the_per_expert_kernels(D, F, nb):
    """experts_whole (each routed expert in one work item, from the expert cache's pool) gives
    the per-expert kernel's result bit for bit, with a down projection whose output count is
    not a multiple of 8, and matches float64."""
    from grokcpu.kernels import decode as KD
    from grokcpu.kernels.layers import gelu_mul

    E, k = 3, 2
    pool = RNG.integers(-128, 128, (4, 3 * D * F), dtype=np.int8)
    pool.setflags(write=False)
    sg, su = (((RNG.random((E, 1, F), dtype=np.float32) + 0.5) / 64) for _ in range(2))
    sd = (RNG.random((E, nb, D), dtype=np.float32) + 0.5) / 64
    x = RNG.standard_normal(D).astype(np.float32)
    slots, es = np.array([3, 1]), np.array([0, 2])
    ys = np.empty((k, D), np.float32)
    KD.experts_whole(x, pool, slots, es, sg, su, sd, np.empty((k, 2, F), np.float32), ys)
    for j in range(k):
        w = pool[slots[j]].reshape(3, D, F)
        e = es[j]
        y = np.empty(D, np.float32)
        # DecodeWorkspace.scratch of a ckpt-0 model, one row range per gate/up matrix
        scratch = (np.empty((2, 1), np.float32), np.empty((2, 2, 1), np.float32), np.empty((2, 1), np.float32),
                   np.empty((2, 1, F), np.float32), np.empty((2, D), np.float32))
        KD.expert(x, (w[0], sg[e]), (w[1], su[e]), (w[2], sd[e]), True, np.empty((2, F), np.float32), y, scratch)
        np.testing.assert_array_equal(ys[j], y)
        g = x.astype(np.float64) @ dequant64(w[0], sg[e])
        u = x.astype(np.float64) @ dequant64(w[1], su[e])
        hh = np.empty((2, F), np.float32)
        hh[0], hh[1] = g, u
        gelu_mul(hh[0], hh[1])
        ref = hh[0].astype(np.float64) @ dequant64(np.ascontiguousarray(w[2].T), sd[e])   # down: [D, F] stored
        assert np.abs(ys[j] - ref).max() < 1e-4 * np.abs(ref).max()


def test_matvec_on_read_only_strided_expert_slice():
    w3 = RNG.integers(-128, 128, (3, 40, 70), dtype=np.int8)
    w3.setflags(write=False)
    s3 = RNG.random((3, 8, 70), dtype=np.float32)
    x = RNG.standard_normal(40).astype(np.float32)
    got = cpu.matmul(x[None], w3[2], s3[2], 2)[0]
    np.testing.assert_allclose(got, x.astype(np.float64) @ dequant64(w3[2], s3[2]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("V,D,T", [(1000, 33, 1), (257, 64, 1), (257, 64, 2), (300, 16, 6)])
def test_unembed(V, D, T):
    emb = RNG.standard_normal((V, D)).astype(np.float32)
    h = RNG.standard_normal((T, D)).astype(np.float32)
    got = cpu.unembed(h, emb, 0.5773502691896257, 2)
    ref = (h.astype(np.float64) @ emb.T.astype(np.float64)) * 0.5773502691896257
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_rmsnorm_and_residual():
    x = RNG.standard_normal((5, 77)).astype(np.float32) * 3
    sc = RNG.random(77, dtype=np.float32)
    out = np.empty_like(x)
    K.rmsnorm(x, sc, 1e-5, out)
    ref = sc * x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-6)
    h = np.ones_like(x)
    K.add_rmsnorm(h, x, sc, 1e-5)
    np.testing.assert_allclose(h, 1 + ref, rtol=2e-6, atol=2e-6)


def test_rope_half_split():
    d, T, nh, p0 = 16, 3, 2, 5000
    inv = (1.0 / (np.float32(10000) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))).astype(np.float32)
    cos = np.empty((T, d // 2), np.float32)
    sin = np.empty((T, d // 2), np.float32)
    K.rope_tables(inv, np.arange(p0, p0 + T), cos, sin)
    x = RNG.standard_normal((T, nh, d)).astype(np.float32)
    ref = x.astype(np.float64).copy()
    ph = (np.arange(p0, p0 + T, dtype=np.float32)[:, None] * inv[None]).astype(np.float64)
    c, s = np.cos(ph)[:, None], np.sin(ph)[:, None]
    x1, x2 = ref[..., : d // 2].copy(), ref[..., d // 2:].copy()
    ref = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    K.rope(x, cos, sin)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 4, 7])
def test_attention_with_softcap_mask_and_uniform_rows(threads):
    """threads 4 and 7: fewer KV groups than threads, so each group's 3 heads are split across
    threads (2 + 1, then 1 + 1 + 1) instead of one thread reading the group for all three."""
    H, G, d, S, p0, T = 6, 2, 8, 16, 3, 4
    q = RNG.standard_normal((T, H, d)).astype(np.float32) * 20       # big: into the soft cap
    kc = np.zeros((G, S, d), np.float32)
    vc = np.zeros((G, S, d), np.float32)
    kc[:, : p0 + T] = RNG.standard_normal((G, p0 + T, d))
    vc[:, : p0 + T] = RNG.standard_normal((G, p0 + T, d))
    key_ok = np.ones(S, np.uint8)
    key_ok[1] = 0
    out = np.empty((T, H, d), np.float32)
    K.attention(q, kc, vc, p0, key_ok, np.float32(0.35), np.float32(30.0), np.float32(S), out,
                np.empty((H, S), np.float32), threads)
    for t in range(T):
        for h in range(H):
            g = h // (H // G)
            n = p0 + t + 1
            a = (kc[g, :n].astype(np.float64) @ q[t, h].astype(np.float64)) * 0.35
            a = 30 * np.tanh(a / 30)
            a = np.where(key_ok[:n] > 0, a, -1e30)
            p = np.exp(a - a.max())
            p /= p.sum()
            np.testing.assert_allclose(out[t, h], p @ vc[g, :n], rtol=1e-4, atol=1e-5)
    one = np.empty_like(out)                  # a head's result does not depend on the split
    K.attention(q, kc, vc, p0, key_ok, np.float32(0.35), np.float32(30.0), np.float32(S), one,
                np.empty((H, S), np.float32), 1)
    assert np.array_equal(out, one)
    # no visible key: uniform over all S rows (zeros past the filled ones), as the reference
    K.attention(q[:1], kc, vc, 0, np.zeros(S, np.uint8), np.float32(0.35), np.float32(30.0),
                np.float32(S), out[:1], np.empty((H, S), np.float32), threads)
    for h in range(H):
        np.testing.assert_allclose(out[0, h], vc[h // (H // G), :1].sum(0) / S, rtol=1e-6)


@pytest.mark.parametrize("scale", [0.05, 1.0, 6.0])
def test_attention_long_context_against_float64(scale):
    """Hundreds of keys whose logits span the whole soft-capped range (softmax exponents from
    0 down past -60), a third of them masked: the vectorized tanh and exp against float64."""
    H, G, d, S = 8, 2, 64, 700
    q = RNG.standard_normal((1, H, d)).astype(np.float32) * scale
    kc = RNG.standard_normal((G, S, d)).astype(np.float32)
    vc = RNG.standard_normal((G, S, d)).astype(np.float32)
    key_ok = (RNG.random(S) > 0.33).astype(np.uint8)
    out = np.empty((1, H, d), np.float32)
    K.attention(q, kc, vc, S - 1, key_ok, np.float32(0.5), np.float32(30.0), np.float32(S), out,
                np.empty((H, S), np.float32), 2)
    for h in range(H):
        g = h // (H // G)
        a = 30 * np.tanh((kc[g].astype(np.float64) @ q[0, h].astype(np.float64)) * 0.5 / 30)
        a = np.where(key_ok > 0, a, -1e30)
        p = np.exp(a - a.max())
        p /= p.sum()
        np.testing.assert_allclose(out[0, h], p @ vc[g], rtol=1e-4, atol=2e-6)


def test_route_top2_unnormalised_ties_to_lower_index():
    D, E = 4, 8
    x = np.zeros((2, D), np.float32)
    x[0, 0] = 1
    x[1, 1] = 1
    router = np.zeros((D, E), np.float32)
    router[0] = [0, 1, 2, 3, 3, 1, 0, 0]     # token 0: tie between experts 3 and 4
    router[1] = [5, 0, 0, 0, 0, 0, 0, 4]
    idx = np.empty((2, 2), np.int64)
    gate = np.empty((2, 2), np.float32)
    probs = np.empty((2, E), np.float32)
    K.route(x, router, 2, idx, gate, probs)
    assert idx.tolist() == [[3, 4], [0, 7]]
    p0 = np.exp(router[0].astype(np.float64))
    p0 /= p0.sum()
    np.testing.assert_allclose(gate[0], p0[[3, 4]], rtol=1e-6)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-6)


def test_gelu_tanh():
    g = np.linspace(-6, 6, 101).astype(np.float32)
    u = RNG.standard_normal(101).astype(np.float32)
    ref = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g.astype(np.float64) ** 3))) * u
    z = g.astype(np.float64) * u
    K.gelu_mul(g, u)
    # tanh is within 8 ulp of 1.0 (5e-7), and 1 + tanh cancels for negative inputs
    assert (np.abs(g - ref) <= 1e-5 * np.abs(ref) + 3e-7 * np.abs(z) + 1e-12).all()


def test_tanh_f32_within_a_few_ulp():
    from numba import njit

    @njit
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = K.tanh_f32(x[i])

    x = np.concatenate([np.linspace(-12, 12, 200_001), np.geomspace(1e-9, 12, 20_001),
                        -np.geomspace(1e-9, 12, 20_001), [0.0]]).astype(np.float32)
    got = np.empty_like(x)
    apply(x, got)
    ref = np.tanh(x.astype(np.float64))
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    assert (np.abs(got - ref) <= 8 * ulp).all()          # measured: at most 5.5 ulp
    assert (np.sign(got) == np.sign(x)).all() and np.abs(got).max() <= 1.0


def test_int8_unembedding_error_is_bounded():
    emb = RNG.standard_normal((700, 96)).astype(np.float32) / np.sqrt(96)
    h = RNG.standard_normal((3, 96)).astype(np.float32)
    qt, rs = cpu.quantize_embedding(emb)
    assert qt.shape == (96, 700)                            # stored transposed
    q = qt.T
    np.testing.assert_allclose(cpu.unembed_q8(h[:1], qt, rs, 0.5, 2)[0], cpu.unembed_q8(h, qt, rs, 0.5, 2)[0], rtol=1e-5, atol=1e-5)
    step = np.abs(emb).max(1, keepdims=True) / 127          # one quantization step per row
    assert (np.abs(q.astype(np.float64) * rs[:, None] - emb) <= 0.5001 * step).all()
    got = cpu.unembed_q8(h, qt, rs, 0.5773502691896257, 2)
    ref = (h.astype(np.float64) @ emb.T.astype(np.float64)) * 0.5773502691896257
    # each weight is off by at most half a quantization step: |err| <= 0.5 * rs * sum|h| * scale
    bound = 0.5 * rs[None, :] * np.abs(h).sum(1, keepdims=True) * 0.5773502691896257
    assert (np.abs(got - ref) <= bound * 1.001 + 1e-6).all()


@pytest.mark.parametrize("n,D,F,c0", [(16, 24, 40, 8), (13, 24, 40, 8), (5, 7, 9, 2), (1024, 64, 2048, 512),
                                      (130, 40, 256, 64), (200, 48, 512, 128), (64, 16, 128, 3), (300, 72, 704, 320)])
@pytest.mark.parametrize("shift", [0, 5])
def test_transpose_into_whole_blocks_and_remainders(n, D, F, c0, shift):
    """Whole 64x16 blocks (streamed where the destination's lines are 64-byte aligned: shift 0
    with c0 a multiple of 64; plain stores elsewhere), remainder rows and columns bytewise."""
    from grokcpu.kernels.stream import transpose_into
    src = RNG.integers(-128, 128, (n, D), dtype=np.int8)
    raw = np.zeros(D * F + 128, np.int8)
    skip = -raw.ctypes.data % 64 + shift
    dst = raw[skip:skip + D * F].reshape(D, F)
    transpose_into(src, dst, c0)
    assert np.array_equal(dst[:, c0:c0 + n], src.T)
    assert not dst[:, :c0].any() and not dst[:, c0 + n:].any()


@pytest.mark.parametrize("n", [0, 1, 63, 64, 255, 256, 257, 1000, 5000])
@pytest.mark.parametrize("shift", [0, 1, 17, 63])
def test_copy_into_streams_whole_lines_and_copies_the_edges(n, shift):
    """An unaligned head up to the first 64-byte boundary, whole 256-byte runs streamed, a tail."""
    from grokcpu.kernels.stream import copy_into
    src = RNG.integers(0, 256, n, dtype=np.uint8)
    raw = np.zeros(n + 256, np.uint8)
    skip = -raw.ctypes.data % 64 + shift
    copy_into(src, raw[skip:skip + n])
    assert np.array_equal(raw[skip:skip + n], src)
    assert not raw[:skip].any() and not raw[skip + n:].any()


def test_stream_kernels_refuse_shapes_their_unchecked_stores_would_overrun():
    from grokcpu.kernels.stream import copy_into, transpose_into
    dst = np.zeros((16, 128), np.int8)
    with pytest.raises(ValueError):
        transpose_into(np.zeros((64, 16), np.int8), dst, 65)        # c0 + n past the row
    with pytest.raises(ValueError):
        transpose_into(np.zeros((64, 32), np.int8), dst, 0)         # 32 columns into 16 rows
    with pytest.raises(ValueError):
        copy_into(np.zeros(300, np.uint8), np.zeros(256, np.uint8))
    assert not dst.any()


def test_compiled_kernels_are_dropped_when_any_kernel_source_changes(tmp_path):
    """numba's cache checks only a kernel's own file: a change to matvec.py must also drop
    decode.py's compiled kernels, which embed matvec's code."""
    import shutil
    from pathlib import Path

    from grokcpu import kernels

    src = Path(kernels.__file__).parent
    for f in src.glob("*.py"):
        shutil.copy(f, tmp_path / f.name)
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    kernels._drop_stale_compiled(tmp_path)                    # first run: records the sources
    stale = cache / "decode.attn_router-17.py311.1.nbc"
    stale.write_bytes(b"x")
    kernels._drop_stale_compiled(tmp_path)                    # unchanged sources: cache kept
    assert stale.exists()
    with open(tmp_path / "matvec.py", "a") as f:
        f.write("\n# changed\n")
    kernels._drop_stale_compiled(tmp_path)
    assert not stale.exists()
    assert (cache / "grokcpu-kernels.sources").is_file()
