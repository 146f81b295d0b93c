"""The CPU backend: picks a kernel per call shape and owns the thread count."""

from __future__ import annotations

import numba
import numpy as np

from ..checkpoint import QWeight
from ..kernels import layers as K
from ..kernels import matvec as M

# Rows from which a product goes through dequantized tiles and BLAS; below, one pass over the
# int8 weights serves all rows (qmatmul_small), and a single row is a plain matvec.
GEMM_MIN_ROWS = 16
# Elements per dequantized float32 tile (16 MB): big enough for BLAS, small enough for L3/RAM.
TILE_ELEMS = 4 << 20


def physical_cores() -> int:
    try:
        import psutil
        n = psutil.cpu_count(logical=False)
    except Exception:  # psutil cannot tell on some systems
        n = None
    return max(1, n or numba.config.NUMBA_NUM_THREADS)


class blas_phase:
    """Around a forward pass whose products go through BLAS (T >= GEMM_MIN_ROWS rows): numba's
    kernels run on one thread, so its idle OpenMP workers, which spin-wait between parallel
    regions, do not fight OpenBLAS's threads for the cores (2x faster prefill measured here)."""

    def __init__(self, rows: int):
        self.active = rows >= GEMM_MIN_ROWS
        self.saved = None

    def __enter__(self):
        if self.active:
            self.saved = numba.get_num_threads()
            numba.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            numba.set_num_threads(self.saved)


def _set_blas_threads(n: int) -> bool:
    """Cap OpenBLAS (numpy's BLAS) at n threads, if numpy uses an OpenBLAS we can find."""
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return False
    for path in sorted(libs):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                return True
    return False


def set_threads(n: int | None) -> int:
    """Compute threads for numba's kernels and numpy's BLAS (default: physical cores)."""
    global _threads
    n = physical_cores() if n is None else int(n)
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    _set_blas_threads(n)
    _threads = n
    return n


_parts: dict = {}
_scratches: dict = {}


def _scratch(name: str, *shape: int) -> np.ndarray:
    """A reusable float32 buffer of this shape, kept under `name` (fresh pages cost a fault
    each); the next call with the same name may return the same memory."""
    n = int(np.prod(shape))
    buf = _scratches.get(name)
    if buf is None or buf.size < n:
        buf = _scratches[name] = np.empty(n, np.float32)
    return buf[:n].reshape(shape)


_threads = 0     # set_threads' count: how many row ranges a matvec splits into (any count is correct)


def _nparts() -> int:
    """Row ranges a matvec splits into: set_threads' count (numba.get_num_threads costs 4 us)."""
    return _threads or numba.get_num_threads()


def _part(C: int) -> np.ndarray:
    P = _nparts()
    buf = _parts.get((P, C))
    if buf is None:
        buf = _parts[(P, C)] = np.empty((P, C), np.float32)
    return buf


def matvec(x: np.ndarray, w: np.ndarray, s: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x[R] @ dequant(w[R, C], s[nb, C]) -> [C] float32."""
    C = w.shape[1]
    if out is None:
        out = np.empty(C, np.float32)
    M.qmatvec(x, w, s, out, _part(C))
    return out


def matmul(x: np.ndarray, w: np.ndarray, s: np.ndarray, out_major: bool = False,
           out: np.ndarray | None = None) -> np.ndarray:
    """x[T, R] @ dequant(w[R, C], s[nb, C]) -> [T, C] float32, into `out` if given.

    out_major: w is stored output-major, [C, R] (the expert cache's down projections).
    One row is a matvec; a few rows go through a kernel that reads the weights once for all
    of them; from GEMM_MIN_ROWS rows on, dequantized tiles go through numpy's BLAS.
    """
    T = x.shape[0]
    C, R = w.shape if out_major else w.shape[::-1]
    if out is None:
        out = np.empty((T, C), np.float32)
    if T == 1:
        if out_major:
            M.qmatvec_t(np.ascontiguousarray(x[0]), w, s, out[0])
        else:
            matvec(np.ascontiguousarray(x[0]), w, s, out[0])
        return out
    if T < GEMM_MIN_ROWS:
        if out_major:
            M.qmatmul_small_t(np.ascontiguousarray(x), w, s, out)
        else:
            P = _nparts()
            part = _scratch("part", P, T, C)
            M.qmatmul_small(np.ascontiguousarray(x), w, s, out, part)
        return out
    width = max(64, min(C, TILE_ELEMS // R // 64 * 64))
    tile = _scratch("tile", R * width)
    for c0 in range(0, C, width):
        n = min(width, C - c0)
        if out_major:
            t = tile[: n * R].reshape(n, R)
            M.dequant_rows_t(w, s, c0, t)
            t = t.T
        else:
            t = tile[: R * n].reshape(R, n)
            M.dequant_cols(w, s, c0, t)
        np.matmul(x, t, out=out[:, c0:c0 + n])
    return out


def pair_parts() -> int:
    """Row ranges per matrix of qmatvec_multi: one matrix per thread when there are two."""
    return max(1, _nparts() // 2)


def gate_up(x: np.ndarray, wg: np.ndarray, sg: np.ndarray, wu: np.ndarray, su: np.ndarray):
    """(x @ gate, x @ up) for an expert's rows x [T, D]; one token through qmatvec_multi."""
    C = wg.shape[1]
    if x.shape[0] != 1:
        T = x.shape[0]
        return (matmul(x, wg, sg, out=_scratch("gate", T, C)),
                matmul(x, wu, su, out=_scratch("up", T, C)))
    gu = np.empty((2, C), np.float32)
    Q = pair_parts()
    M.qmatvec_multi(np.ascontiguousarray(x[0]), (wg, wu), (sg, su), gu,
                    _scratch("pair", 2, Q, C))
    return gu[:1], gu[1:]


def qmatmul(x: np.ndarray, qw: QWeight, scratch: str | None = None) -> np.ndarray:
    """matmul for a QWeight; into the reusable buffer `scratch` if named (see _scratch)."""
    out = None if scratch is None else _scratch(scratch, x.shape[0], qw.w.shape[1])
    return matmul(x, qw.w, qw.s, out=out)


def moe(x: np.ndarray, lw, idx: np.ndarray, gate: np.ndarray, cache=None, layer: int = 0) -> np.ndarray:
    """sum_j gate[t, j] * expert_{idx[t, j]}(x[t]); each expert runs once over its tokens.

    Expert weights come from `cache` (an ExpertCache: acquired, used, released in file order;
    it holds the down projection transposed) or, without one, straight from the memory-mapped
    checkpoint.
    """
    T, D = x.shape
    out = np.zeros((T, D), np.float32)
    experts = [int(e) for e in np.unique(idx)]
    order = experts if cache is None else cache.ready_first(layer, experts)
    done = {}
    # Prefill's products (here and the attention's in model._forward_rows) write into buffers
    # reused from layer to layer and chunk to chunk. Fresh ones were mapped and zeroed by the
    # kernel every time: 51,000-55,000 page faults and 0.4 s of system time per 512-token
    # scaled-16 prefill. Reused: none, and prefill 1.05-1.18x as fast.
    ys = _scratch("expert_out", idx.size * D)
    xs = _scratch("expert_in", T * D)
    used = 0
    for e in order:
        if cache is not None:
            wg, wu, wd = cache.acquire(layer, e)
        else:
            wg, wu, wd = lw.w_gate.w[e], lw.w_up.w[e], lw.w_down.w[e]
        try:
            rows, slot = np.nonzero(idx == e)
            n = rows.size
            xe = np.take(x, rows, axis=0, out=xs[:n * D].reshape(n, D))
            g, u = gate_up(xe, wg, lw.w_gate.s[e], wu, lw.w_up.s[e])
            for t in range(g.shape[0]):
                K.gelu_mul(g[t], u[t])
            y = ys[used * D:(used + n) * D].reshape(n, D)
            used += n
            done[e] = rows, slot, matmul(g, wd, lw.w_down.s[e], out_major=cache is not None, out=y)
        finally:
            if cache is not None:
                cache.release(layer, e)
    for e in experts:           # summed in expert order, whichever ran first
        rows, slot, y = done[e]
        out[rows] += gate[rows, slot][:, None] * y
    return out


def unembed(h: np.ndarray, emb: np.ndarray, scale: float) -> np.ndarray:
    """h[T, D] @ emb[V, D].T * scale -> [T, V] float32 (the exact, float32 tied output layer)."""
    T = h.shape[0]
    V = emb.shape[0]
    out = np.empty((T, V), np.float32)
    if T == 1:
        M.dot_rows(np.ascontiguousarray(h[0]), emb, np.float32(scale), out[0], _nparts())
        return out
    rows = max(256, TILE_ELEMS // emb.shape[1])
    for v0 in range(0, V, rows):
        np.matmul(h, emb[v0:v0 + rows].T, out=out[:, v0:v0 + rows])
    out *= np.float32(scale)
    return out


def quantize_embedding(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The int8 unembedding table: per-row absmax int8 of emb [V, D], stored transposed as
    qt [D, V], with the row scales rs [V] float32 (absmax / 127)."""
    V, D = emb.shape
    qt = np.empty((D, V), np.int8)
    rs = np.empty(V, np.float32)
    M.quantize_rows_t(emb, qt, rs)
    return qt, rs


def unembed_q8(h: np.ndarray, qt: np.ndarray, rs: np.ndarray, scale: float) -> np.ndarray:
    """h[T, D] @ dequant(qt)[D, V] * scale -> [T, V] float32."""
    out = matmul(h, qt, rs.reshape(1, -1))
    out *= np.float32(scale)
    return out
