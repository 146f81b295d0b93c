"""GPU offload of the dense layers (numba.cuda); the routed experts stay on the CPU.

Import this module only when offload is asked for: it is the one place that imports
numba.cuda, and it does so lazily (`cuda_status()`, `CudaBackend(...)`), so that
`import grokcpu` never touches the CUDA driver.

What runs where, per decoder layer (spec/GROK1.md §2.3):

    GPU  x = RMSNorm_0(h)  ->  qkv = x @ [Wq|Wk|Wv]  ->  RoPE, K/V into the device cache
         ->  attention  ->  a = o @ Wo  ->  h += RMSNorm_1(a); x = RMSNorm_2(h)  ->  router top-k
    bus  x [T, D], idx, gate  ->  host
    CPU  m = MoE(x) through the expert cache               (the experts: 95 % of the weights)
    bus  m [T, D]  ->  device
    GPU  h += RMSNorm_3(m); x = RMSNorm_0 of the next layer (or the final norm) of h

Shapes: T tokens, D emb, H q-heads, G kv-heads, d key size, S context, E experts, k top-k,
V vocab, nb row blocks of a quantized weight. The KV cache lives on the device as
the session's KV storage (`CudaKV`: k, v [L, G, S, d] float32 + key_ok [S] uint8). Rows at or
past the session's position are never read, so a reset needs nothing on the device.

Every kernel computes what its CPU twin in grokcpu/kernels computes, in float32 (sums of
squares in float64 as kernels/layers.rmsnorm); only the summation order differs.
Block sizes are parameters (`Blocks`): the simulator (NUMBA_ENABLE_CUDASIM=1) gets tiny
blocks, since it runs every GPU thread as a Python thread.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
import threading
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from ..errors import GrokError

# The numba.cuda module, set by _import_cuda(). Kernels must reach it as a *module global*:
# the simulator swaps the globals that are numba.cuda for a per-launch fake module.
cuda = None

MAX_EXPERTS = 64           # router partial sums live in shared arrays of parts x this size
NEG = np.float32(-1e30)    # "no score": below any soft-capped logit (|s| <= cap)

HINT = ("install an NVIDIA driver and a CUDA toolkit numba can use (libNVVM: e.g. "
        "`pip install nvidia-cuda-nvcc-cu12`, or set CUDA_HOME), or run without --offload")


# -- finding a GPU ------------------------------------------------------------------------
def simulating() -> bool:
    """True when numba runs CUDA kernels in its Python simulator (NUMBA_ENABLE_CUDASIM=1)."""
    from numba.core import config
    return bool(config.ENABLE_CUDASIM)


def _find_pip_nvvm() -> None:
    """numba's built-in CUDA target finds libNVVM in conda, CUDA_HOME or /usr/local/cuda only;
    point CUDA_HOME at the pip wheel `nvidia-cuda-nvcc-cu12` when that is all there is."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or os.path.exists("/usr/local/cuda"):
        return
    try:
        spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    except (ImportError, ValueError):
        return
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isdir(os.path.join(loc, "nvvm", "libdevice")):
            os.environ["CUDA_HOME"] = loc
            return


def _import_cuda():
    global cuda
    if cuda is None:
        if not simulating():
            _find_pip_nvvm()
        from numba import cuda as _cuda
        if simulating():
            _serialise_sim_shared_arrays()
        cuda = _cuda
    return cuda


_SIM_SHARED_LOCK = threading.Lock()


def _serialise_sim_shared_arrays() -> None:
    """Make the simulator's `cuda.shared.array` hand every thread of a block the same array.

    numba's simulator (numba/cuda/simulator/kernelapi.py, FakeCUDAShared.array) runs each GPU
    thread as a Python thread and finds a block's shared array by the calling (file, line) in
    a dict: `res = allocs.get(key); if res is None: res = np.empty(...); allocs[key] = res`,
    with no lock. When the GIL passes to another thread of the block between that `get` and
    the store, both threads see no array and each makes its own: from then on they write to
    and read from different (uninitialised, np.empty) buffers, whatever barriers the kernel
    has. A block reduction (RMSNorm's sum of squares, attention's max / sum, the router's
    logits) then adds a garbage slot: a wrong norm, or `math domain error` when the "sum of
    squares" comes out negative. It strikes the first block of a launch, roughly once in a few
    thousand launches of the SIM_BLOCKS kernels (more often with more threads per block), which
    made the simulated offloaded forward (~400 launches on p3) fail about one run in four. The
    kernels themselves are race-free; a real GPU never had the problem. Here the lookup-or-create
    runs under a lock, keyed exactly as numba keys it (the caller's file and line); dynamic
    shared memory (shape 0) and anything unexpected go to numba's own method.
    """
    try:
        from numba.core import types
        from numba.cuda.simulator import kernelapi
        from numba.np import numpy_support
    except ImportError:
        return
    cls = getattr(kernelapi, "FakeCUDAShared", None)
    original = getattr(cls, "array", None)
    if original is None or getattr(original, "_grokcpu_locked", False):
        return

    def array(self, shape, dtype):
        allocs = getattr(self, "_allocations", None)
        if allocs is None or shape == 0:     # (dynamic shared memory)
            return original(self, shape, dtype)
        frame = sys._getframe(1)               # the kernel line asking, as numba keys it
        key = (frame.f_code.co_filename, frame.f_lineno)
        del frame
        with _SIM_SHARED_LOCK:
            res = allocs.get(key)
            if res is None:
                dt = numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype
                res = allocs[key] = np.empty(shape, dt)
        return res

    array._grokcpu_locked = True
    array.__doc__ = original.__doc__
    cls.array = array


def _probe(out):
    out[0] = 42.0


@functools.lru_cache(maxsize=None)
def cuda_status() -> tuple[bool, str]:
    """(usable, what): whether a CUDA GPU, its driver and numba's compiler all work.

    `what` names the device ("NVIDIA H100 ... (cc 9.0)", or "simulator") or says why not.
    The check launches one tiny kernel, so a missing libNVVM shows up here, not mid-run.
    """
    try:
        c = _import_cuda()
    except Exception as e:   # numba without its CUDA target, broken install
        return False, f"numba.cuda cannot be imported ({type(e).__name__}: {e})"
    if simulating():
        return True, "simulator (NUMBA_ENABLE_CUDASIM=1: kernels run on the CPU in Python)"
    try:
        if not c.is_available():
            try:
                n = len(c.gpus)   # raises with the driver's reason
                why = "no CUDA GPU found" if n == 0 else "the CUDA driver reports no usable GPU"
            except Exception as e:
                why = " ".join(str(e).split()).rstrip(" :") or "no CUDA GPU found"
            return False, why
        dev = c.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        out = c.device_array(1, np.float32)
        c.jit(_probe)[1, 1](out)
        if out.copy_to_host()[0] != 42.0:
            return False, f"{name}: a test kernel computed a wrong result"
        return True, f"{name} (compute capability {dev.compute_capability[0]}.{dev.compute_capability[1]})"
    except Exception as e:   # driver, NVVM or launch failure: all end here with their text
        return False, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def require_cuda() -> str:
    ok, what = cuda_status()
    if not ok:
        raise GrokError(f"--offload dense needs a CUDA GPU: {what}", hint=HINT)
    return what


# -- kernels ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Blocks:
    """Threads per block of each kernel (powers of two where a tree reduction needs it)."""
    norm: int = 256     # RMSNorm: threads per token row (power of 2)
    mm_tx: int = 16     # matmul: threads along the output columns ...
    mm_cpt: int = 4     # ... each owning this many consecutive columns (tile = tx * cpt)
    mm_ty: int = 16     # ... threads striding over the input rows (partial sums, then summed)
    mm_tt: int = 8      # ... tokens per block for T > 1 (each weight byte serves tt tokens)
    rope: int = 128     # RoPE + cache store: threads per token
    attn: int = 256     # attention: threads per (query, head) (power of 2)
    attn_chunk: int = 1024  # ... keys scored per step (shared memory: 4 bytes each)
    route: int = 32     # router: threads per expert and token (each sums D / route rows)
    un_lanes: int = 32  # unembedding: lanes over D per vocab row (power of 2) ...
    un_rows: int = 8    # ... vocab rows per block
    un_tt: int = 8      # ... tokens per block for T > 1


GPU_BLOCKS = Blocks()
# The simulator runs each GPU thread as a Python thread, and a block's cost grows with its
# threads times its barriers: few threads, wide tiles (the kernel tests also run bigger ones).
SIM_BLOCKS = Blocks(norm=2, mm_tx=4, mm_cpt=4, mm_ty=1, mm_tt=8, rope=8, attn=2, attn_chunk=64,
                    route=1, un_lanes=1, un_rows=8, un_tt=8)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _reductions(nt: int):
    """Block-wide sum / max over sh[0..nt) (nt a power of 2); every thread gets the result."""
    c = _import_cuda()

    @c.jit(device=True)
    def block_sum(sh, tid):
        cuda.syncthreads()
        step = nt // 2
        while step > 0:
            if tid < step:
                sh[tid] += sh[tid + step]
            cuda.syncthreads()
            step //= 2
        v = sh[0]
        cuda.syncthreads()   # sh may be reused at once
        return v

    @c.jit(device=True)
    def block_max(sh, tid):
        cuda.syncthreads()
        step = nt // 2
        while step > 0:
            if tid < step:
                if sh[tid + step] > sh[tid]:
                    sh[tid] = sh[tid + step]
            cuda.syncthreads()
            step //= 2
        v = sh[0]
        cuda.syncthreads()
        return v

    return block_sum, block_max


@functools.lru_cache(maxsize=None)
def _norm_kernels(nt: int):
    c = _import_cuda()
    block_sum, _ = _reductions(nt)

    @c.jit(device=True)
    def inv_rms(ss, sh, tid, D, eps):
        """1 / sqrt(mean of squares + eps) of a row, from this thread's share ss of its squares."""
        sh[tid] = ss
        return np.float32(1.0 / math.sqrt(block_sum(sh, tid) / D + eps))

    @c.jit(device=True)
    def row_inv_rms(x, t, tid, sh, eps):
        """inv_rms of row t of x, squares summed in float64 (each thread a stride of nt)."""
        D = x.shape[1]
        ss = 0.0
        for i in range(tid, D, nt):
            v = np.float64(x[t, i])
            ss += v * v
        return inv_rms(ss, sh, tid, D, eps)

    @c.jit
    def rmsnorm(x, scale, eps, out):
        """out[T, D] = scale * x / sqrt(mean(x^2) + eps); one block per row (out may be x)."""
        t = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        D = x.shape[1]
        sh = cuda.shared.array(nt, np.float64)
        inv = row_inv_rms(x, t, tid, sh, eps)
        for i in range(tid, D, nt):
            out[t, i] = scale[i] * (x[t, i] * inv)

    @c.jit
    def add_norm(h, br, post, nxt, eps, x):
        """h[T, D] += rmsnorm(br, post); then x = rmsnorm(h, nxt): a branch's post-norm and
        residual, fused with the norm that opens the next block."""
        t = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        D = h.shape[1]
        sh = cuda.shared.array(nt, np.float64)
        inv = row_inv_rms(br, t, tid, sh, eps)
        ss = 0.0
        for i in range(tid, D, nt):
            hv = h[t, i] + post[i] * (br[t, i] * inv)
            h[t, i] = hv
            v = np.float64(hv)
            ss += v * v
        inv2 = inv_rms(ss, sh, tid, D, eps)
        for i in range(tid, D, nt):
            x[t, i] = nxt[i] * (h[t, i] * inv2)

    @c.jit
    def embed_norm(tok, emb, mult, scale, eps, h, x):
        """h[t] = emb[tok[t]] * mult; x = rmsnorm(h, scale) (the first layer's pre-norm)."""
        t = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        D = h.shape[1]
        row = tok[t]
        sh = cuda.shared.array(nt, np.float64)
        ss = 0.0
        for i in range(tid, D, nt):
            hv = emb[row, i] * mult
            h[t, i] = hv
            v = np.float64(hv)
            ss += v * v
        inv = inv_rms(ss, sh, tid, D, eps)
        for i in range(tid, D, nt):
            x[t, i] = scale[i] * (h[t, i] * inv)

    return SimpleNamespace(rmsnorm=rmsnorm, add_norm=add_norm, embed_norm=embed_norm)


@functools.lru_cache(maxsize=None)
def _matmul_kernel(tx: int, cpt: int, ty: int, tt: int):
    """out[T, C] = x[T, R] @ (w[R, C] * s[r // (R/nb), C]).

    Block (tx, ty), grid (ceil(C / (tx*cpt)), ceil(T / tt)). Thread (i, j) owns columns
    c0 .. c0+cpt-1 (a warp reads tx*cpt consecutive bytes of a weight row) for tt tokens and
    sums rows j, j+ty, ... of each row block, scaling each block's partial sum once; the ty
    partial sums meet in shared memory.
    """
    c = _import_cuda()
    tw = tx * cpt            # columns per block
    nacc = tt * cpt          # accumulators per thread
    outn = tt * tw           # outputs per block
    nth = tx * ty
    shn = ty * outn          # (array sizes must be plain constants, not expressions)

    @c.jit
    def matmul(x, w, s, out):
        T = x.shape[0]
        R = w.shape[0]
        C = w.shape[1]
        nb = s.shape[0]
        rb = R // nb
        i = cuda.threadIdx.x
        j = cuda.threadIdx.y
        cb = cuda.blockIdx.x * tw
        c0 = cb + i * cpt
        t0 = cuda.blockIdx.y * tt
        acc = cuda.local.array(nacc, np.float32)
        part = cuda.local.array(nacc, np.float32)
        wv = cuda.local.array(cpt, np.float32)
        for a in range(nacc):
            acc[a] = 0.0
        for b in range(nb):
            for a in range(nacc):
                part[a] = 0.0
            for r in range(b * rb + j, (b + 1) * rb, ty):
                for jc in range(cpt):
                    col = c0 + jc
                    wv[jc] = np.float32(w[r, col]) if col < C else np.float32(0.0)
                for jt in range(tt):
                    if t0 + jt < T:
                        xv = x[t0 + jt, r]
                        for jc in range(cpt):
                            part[jt * cpt + jc] += xv * wv[jc]
            for jc in range(cpt):
                col = c0 + jc
                if col < C:
                    sc = s[b, col]
                    for jt in range(tt):
                        acc[jt * cpt + jc] += part[jt * cpt + jc] * sc
        sh = cuda.shared.array(shn, np.float32)
        for jt in range(tt):
            for jc in range(cpt):
                sh[j * outn + jt * tw + i * cpt + jc] = acc[jt * cpt + jc]
        cuda.syncthreads()
        for e in range(j * tx + i, outn, nth):
            v = sh[e]
            for y in range(1, ty):
                v += sh[y * outn + e]
            t = t0 + e // tw
            col = cb + e % tw
            if t < T and col < C:
                out[t, col] = v

    return matmul


@functools.lru_cache(maxsize=None)
def _rope_kernel(nt: int):
    c = _import_cuda()

    @c.jit
    def rope_store(qkv, inv_freq, p0, H, q, kc, vc):
        """Split qkv[T, (H+2G)*d] = [q | k | v]; rotate q and k (half-split RoPE, phase =
        float32(pos) * inv_freq, cos/sin as kernels/layers.rope_tables) at pos = p0 + t;
        q -> q[T, H*d]; k, v -> rows pos of the cache kc, vc [G, S, d]. One block per token."""
        t = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        G = kc.shape[0]
        d = kc.shape[2]
        half = d // 2
        nq = H * half
        nr = (H + G) * half
        pos = p0 + t
        pf = np.float32(pos)
        for jj in range(tid, nr + G * d, nt):
            if jj < nr:
                hh = jj // half
                i = jj % half
                ph = pf * inv_freq[i]
                cs = np.float32(math.cos(np.float64(ph)))
                sn = np.float32(math.sin(np.float64(ph)))
                a = qkv[t, hh * d + i]
                b = qkv[t, hh * d + i + half]
                ra = a * cs - b * sn
                rb = b * cs + a * sn
                if jj < nq:
                    q[t, hh * d + i] = ra
                    q[t, hh * d + i + half] = rb
                else:
                    kc[hh - H, pos, i] = ra
                    kc[hh - H, pos, i + half] = rb
            else:
                e = jj - nr
                vc[e // d, pos, e % d] = qkv[t, (H + G) * d + e]

    return rope_store


@functools.lru_cache(maxsize=None)
def _attention_kernel(nt: int, d: int, kchunk: int):
    """Grid (T, H), nt threads, head size d, keys in chunks of kchunk with an online softmax
    (running max m, sum l, output acc rescaled by exp(m_old - m_new) per chunk).

    A chunk: each thread scores keys tid, tid+nt, ... into shared sc; block max; p = exp(s-m)
    into sc; block sum; then p @ V by nparts = max(1, nt // d) key groups x d dims, coalesced
    along d (a thread takes dpt of these nparts*d slots when nt < d).
    """
    c = _import_cuda()
    block_sum, block_max = _reductions(nt)
    nparts = max(1, nt // d)
    nv = nparts * d
    dpt = (nv + nt - 1) // nt
    nred = max(nt, nv)

    @c.jit
    def attention(q, kc, vc, p0, key_ok, mult, cap, n_uniform, out):
        """out[t, h*d:(h+1)*d] = softmax_s(mask(cap*tanh((q.k_s)*mult/cap))) @ v, s < p0+t+1.

        q, out [T, H*d]; kc, vc [G, S, d]; key_ok [S] uint8 (keys a query may see). A query
        that sees no key gets sum of v rows 0..p0+t / n_uniform (kernels/layers.attention)."""
        t = cuda.blockIdx.x
        h = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        H = cuda.gridDim.y
        G = kc.shape[0]
        g = h // (H // G)
        n = p0 + t + 1
        qs = cuda.shared.array(d, np.float32)
        sc = cuda.shared.array(kchunk, np.float32)
        red = cuda.shared.array(nred, np.float32)
        acc = cuda.local.array(dpt, np.float32)
        for i in range(tid, d, nt):
            qs[i] = q[t, h * d + i]
        for k in range(dpt):
            acc[k] = 0.0
        cuda.syncthreads()
        m = NEG
        l = np.float32(0.0)
        seen = False
        for base in range(0, n, kchunk):
            cn = n - base if n - base < kchunk else kchunk
            lmax = NEG
            for j in range(tid, cn, nt):
                a = NEG
                if key_ok[base + j] != 0:
                    dot = np.float32(0.0)
                    for i in range(d):
                        dot += qs[i] * kc[g, base + j, i]
                    a = np.float32(cap * math.tanh(dot * mult / cap))
                    if a > lmax:
                        lmax = a
                sc[j] = a
            red[tid] = lmax
            cmax = block_max(red, tid)             # the same on every thread; publishes sc
            if cmax > NEG:
                mn = cmax if cmax > m else m
                alpha = np.float32(math.exp(m - mn)) if seen else np.float32(0.0)
                lsum = np.float32(0.0)
                for j in range(tid, cn, nt):
                    a = sc[j]
                    p = np.float32(math.exp(a - mn)) if a > NEG else np.float32(0.0)
                    sc[j] = p
                    lsum += p
                red[tid] = lsum
                l = l * alpha + block_sum(red, tid)   # publishes the p in sc
                for k in range(dpt):
                    vt = tid + k * nt
                    if vt < nv:
                        i = vt % d
                        pa = np.float32(0.0)
                        for j in range(vt // d, cn, nparts):
                            pa += sc[j] * vc[g, base + j, i]
                        acc[k] = acc[k] * alpha + pa
                m = mn
                seen = True
                cuda.syncthreads()                  # sc is rewritten by the next chunk
        if not seen:                                # uniform over the reference's n_uniform rows
            for k in range(dpt):
                vt = tid + k * nt
                if vt < nv:
                    i = vt % d
                    for s in range(vt // d, n, nparts):
                        acc[k] += vc[g, s, i]
            l = n_uniform
        for k in range(dpt):
            vt = tid + k * nt
            if vt < nv:
                red[vt] = acc[k]
        cuda.syncthreads()
        for i in range(tid, d, nt):
            o = red[i]
            for pp in range(1, nparts):
                o += red[pp * d + i]
            out[t, h * d + i] = o / l

    return attention


@functools.lru_cache(maxsize=None)
def _route_kernel(parts: int):
    """Block (E, parts): thread (e, p) sums x[t, i] * router[i, e] over i = p, p+parts, ...
    (a warp reads consecutive experts of a router row); thread (0, 0) then does the softmax
    and the top-k. One block per token."""
    c = _import_cuda()
    shn = parts * MAX_EXPERTS

    @c.jit
    def route(x, router, k, idx, gate, probs):
        """probs[t] = softmax(x[t] @ router[D, E]); idx, gate [T, k] = top-k (descending, ties
        to the lower index; gates are the raw probabilities, not renormalised)."""
        t = cuda.blockIdx.x
        e = cuda.threadIdx.x
        p = cuda.threadIdx.y
        D = x.shape[1]
        E = router.shape[1]
        sh = cuda.shared.array(shn, np.float32)
        lg = cuda.shared.array(MAX_EXPERTS, np.float64)
        a = np.float32(0.0)
        for i in range(p, D, parts):
            a += x[t, i] * router[i, e]
        sh[p * E + e] = a
        cuda.syncthreads()
        if p == 0:
            for pp in range(1, parts):
                a += sh[pp * E + e]
            lg[e] = a
        cuda.syncthreads()
        if p == 0 and e == 0:
            mx = lg[0]
            for j in range(1, E):
                if lg[j] > mx:
                    mx = lg[j]
            tot = 0.0
            for j in range(E):
                v = np.float64(math.exp(np.float32(lg[j] - mx)))
                lg[j] = v
                tot += v
            for j in range(E):
                pj = np.float32(lg[j] / tot)
                lg[j] = pj
                probs[t, j] = pj
            for jk in range(k):
                best = -1
                for j in range(E):
                    if lg[j] >= 0 and (best < 0 or lg[j] > lg[best]):
                        best = j
                idx[t, jk] = best
                gate[t, jk] = lg[best]
                lg[best] = -1.0

    return route
@functools.lru_cache(maxsize=None)
def _unembed_kernel(lanes: int, rows: int, tt: int):
    """Block (lanes, rows), grid (ceil(V / rows), ceil(T / tt)): each row of threads takes one
    vocabulary row (read coalesced along D) against tt tokens, then a tree sum over lanes."""
    c = _import_cuda()
    tile = rows * lanes
    shn = tt * tile

    @c.jit
    def unembed(h, emb, scale, out):
        """out[T, V] = (h[T, D] @ emb[V, D].T) * scale: the tied output layer."""
        T = h.shape[0]
        V = emb.shape[0]
        D = emb.shape[1]
        lx = cuda.threadIdx.x
        ly = cuda.threadIdx.y
        v = cuda.blockIdx.x * rows + ly
        t0 = cuda.blockIdx.y * tt
        part = cuda.local.array(tt, np.float32)
        for jt in range(tt):
            part[jt] = 0.0
        if v < V:
            for i in range(lx, D, lanes):
                e = emb[v, i]
                for jt in range(tt):
                    if t0 + jt < T:
                        part[jt] += h[t0 + jt, i] * e
        sh = cuda.shared.array(shn, np.float32)
        for jt in range(tt):
            sh[jt * tile + ly * lanes + lx] = part[jt]
        cuda.syncthreads()
        step = lanes // 2
        while step > 0:
            if lx < step:
                for jt in range(tt):
                    sh[jt * tile + ly * lanes + lx] += sh[jt * tile + ly * lanes + lx + step]
            cuda.syncthreads()
            step //= 2
        for jt in range(lx, tt, lanes):
            if v < V and t0 + jt < T:
                out[t0 + jt, v] = sh[jt * tile + ly * lanes] * scale

    return unembed


class Kernels:
    """Launchers over device arrays (numba device arrays, or host arrays in tests).

    Each writes into its `out` argument and returns it. `blocks` picks the block sizes.
    """

    def __init__(self, blocks: Blocks | None = None):
        _import_cuda()
        self.b = b = blocks or (SIM_BLOCKS if simulating() else GPU_BLOCKS)
        for name in ("norm", "attn", "un_lanes"):
            if getattr(b, name) != _pow2(getattr(b, name)):
                raise ValueError(f"Blocks.{name}={getattr(b, name)} must be a power of two")
        self._norms = _norm_kernels(b.norm)

    def rmsnorm(self, x, scale, eps, out):
        self._norms.rmsnorm[x.shape[0], self.b.norm](x, scale, np.float64(eps), out)
        return out

    def add_norm(self, h, br, post, nxt, eps, x):
        self._norms.add_norm[h.shape[0], self.b.norm](h, br, post, nxt, np.float64(eps), x)
        return x

    def embed_norm(self, tok, emb, mult, scale, eps, h, x):
        self._norms.embed_norm[h.shape[0], self.b.norm](tok, emb, np.float32(mult), scale,
                                                        np.float64(eps), h, x)
        return x

    def matmul(self, x, w, s, out):
        b = self.b
        T, C = out.shape
        tt = 1 if T == 1 else b.mm_tt
        grid = ((C + b.mm_tx * b.mm_cpt - 1) // (b.mm_tx * b.mm_cpt), (T + tt - 1) // tt)
        _matmul_kernel(b.mm_tx, b.mm_cpt, b.mm_ty, tt)[grid, (b.mm_tx, b.mm_ty)](x, w, s, out)
        return out

    def rope_store(self, qkv, inv_freq, p0, H, q, kc, vc):
        kern = _rope_kernel(self.b.rope)
        kern[qkv.shape[0], self.b.rope](qkv, inv_freq, np.int64(p0), np.int64(H), q, kc, vc)
        return q

    def attention(self, q, kc, vc, p0, key_ok, mult, cap, n_uniform, H, out):
        nt = self.b.attn
        kern = _attention_kernel(nt, kc.shape[2], self.b.attn_chunk)
        kern[(q.shape[0], H), nt](q, kc, vc, np.int64(p0), key_ok, np.float32(mult), np.float32(cap),
                                  np.float32(n_uniform), out)
        return out

    def route(self, x, router, k, idx, gate, probs):
        if router.shape[1] > MAX_EXPERTS:
            raise GrokError(f"{router.shape[1]} experts: the GPU router handles at most {MAX_EXPERTS}")
        E = router.shape[1]
        parts = max(1, min(self.b.route, 1024 // E))
        _route_kernel(parts)[x.shape[0], (E, parts)](x, router, np.int64(k), idx, gate, probs)
        return idx, gate

    def unembed(self, h, emb, scale, out):
        b = self.b
        T, V = out.shape
        tt = 1 if T == 1 else b.un_tt
        grid = ((V + b.un_rows - 1) // b.un_rows, (T + tt - 1) // tt)
        kern = _unembed_kernel(b.un_lanes, b.un_rows, tt)
        kern[grid, (b.un_lanes, b.un_rows)](h, emb, np.float32(scale), out)
        return out


# -- the offloaded model ------------------------------------------------------------------
def _merge_scales(scales: list[np.ndarray]) -> np.ndarray:
    """Scales [nb_i, C_i] of weights joined along C, re-expressed over lcm(nb_i) row blocks
    (R is a multiple of every nb_i, hence of their lcm)."""
    nb = 1
    for s in scales:
        nb = nb * s.shape[0] // math.gcd(nb, s.shape[0])
    return np.ascontiguousarray(np.concatenate(
        [np.repeat(s.astype(np.float32), nb // s.shape[0], axis=0) for s in scales], axis=1))


@dataclass
class DeviceLayer:
    w_qkv: object         # [D, (H+2G)*d] int8: Wq | Wk | Wv
    s_qkv: object         # [nb, (H+2G)*d] float32
    wo: object            # [H*d, D] int8
    so: object            # [nb_o, D] float32
    attn_norm: object     # [D] rms_norm
    attn_post_norm: object
    moe_norm: object
    moe_post_norm: object
    router: object        # [D, E] float32


class CudaKV:
    """A session's K/V on the device: k, v [L, G, S, d] float32, and the key mask of the step.
    Not zeroed: attention reads rows < pos + T only, all written by then."""

    def __init__(self, c, context: int):
        shape = (c.num_layers, c.num_kv_heads, context, c.key_size)
        self.k = cuda.device_array(shape, np.float32)
        self.v = cuda.device_array(shape, np.float32)
        self.key_ok = cuda.device_array(context, np.uint8)


class CudaWorkspace:
    """A session's device buffers by row count (few sizes: a prefill chunk, its tail, decode)
    and its host workspace for the experts."""

    def __init__(self, backend: "CudaBackend", kv):
        self.backend = backend
        self.host = backend.cpu.workspace(kv)
        self._bufs: dict[int, SimpleNamespace] = {}

    def buffers(self, T: int) -> SimpleNamespace:
        b = self._bufs.get(T)
        if b is None:
            c = self.backend.config
            H, G, d, D, E, k = c.num_q_heads, c.num_kv_heads, c.key_size, c.emb_size, c.num_experts, \
                c.num_selected_experts
            da = cuda.device_array
            b = SimpleNamespace(
                tok=da(T, np.int64), h=da((T, D), np.float32), x=da((T, D), np.float32),
                qkv=da((T, (H + 2 * G) * d), np.float32), q=da((T, H * d), np.float32),
                o=da((T, H * d), np.float32), br=da((T, D), np.float32),
                idx=da((T, k), np.int64), gate=da((T, k), np.float32), probs=da((T, E), np.float32),
                xg=da((T, D), np.float32), idx_g=da((T, k), np.int64), gate_g=da((T, k), np.float32),
                probs_g=da((T, E), np.float32))
            if len(self._bufs) >= 4:
                self._bufs.pop(next(iter(self._bufs)))
            self._bufs[T] = b
        return b


class CudaBackend:
    """The dense part of every layer on the GPU; the experts on the CPU (backends/cpu.py's
    many-row MoE, through the expert cache). The block interface of backends/cpu.py.

    On the device: per layer Wq|Wk|Wv and Wo (int8) with their scales, the four norm scales
    and the router; the embedding table (float32 [V, D], also the tied output layer, or its
    int8 copy with per-row scales under unembed="int8"), the final norm, RoPE's frequencies.
    Between blocks the device buffer x holds the next block's normed input: RMSNorm_0 of the
    layer after embed and after each MoE block, RMSNorm_2 after attention, the final norm
    after the last layer (the add and the next norm are one kernel).
    """

    def __init__(self, model, blocks: Blocks | None = None):
        from .cpu import CpuBackend
        self.device_name = require_cuda()
        self.model = model
        self.config = c = model.config
        if c.num_experts > MAX_EXPERTS:
            raise GrokError(f"{c.num_experts} experts: --offload dense handles at most {MAX_EXPERTS}")
        self.cpu = CpuBackend(model, unembed=False)        # the experts, on the host
        self.K = Kernels(blocks)
        up = cuda.to_device
        self.layers: list[DeviceLayer] = []
        nbytes = 0
        for lw in model.layers:
            dl = DeviceLayer(
                w_qkv=up(np.ascontiguousarray(np.concatenate([lw.wq.w, lw.wk.w, lw.wv.w], axis=1))),
                s_qkv=up(_merge_scales([lw.wq.s, lw.wk.s, lw.wv.s])),
                wo=up(np.ascontiguousarray(lw.wo.w)), so=up(np.ascontiguousarray(lw.wo.s, np.float32)),
                attn_norm=up(_f32(lw.attn_norm)), attn_post_norm=up(_f32(lw.attn_post_norm)),
                moe_norm=up(_f32(lw.moe_norm)), moe_post_norm=up(_f32(lw.moe_post_norm)),
                router=up(_f32(lw.router)))
            nbytes += sum(a.nbytes for a in vars(dl).values())
            self.layers.append(dl)
        self.emb = up(_f32(model.ckpt.embeddings))
        self.unembed_q = None
        if model.options.unembed == "int8":
            from .cpu import quantize_embedding
            qt, rs = quantize_embedding(model.ckpt.embeddings)
            self.unembed_q = (up(qt), up(rs.reshape(1, -1)))
            nbytes += qt.nbytes + rs.nbytes
        self.final_norm = up(_f32(model.ckpt.final_norm))
        self.inv_freq = up(_f32(self.cpu.inv_freq))
        self.nbytes = nbytes + self.emb.nbytes

    def close(self) -> None:
        """Drop the device arrays (numba frees GPU memory once nothing refers to them)."""
        self.layers = []
        self.emb = self.final_norm = self.inv_freq = self.unembed_q = None

    # -- storage -------------------------------------------------------------------------------
    def new_kv(self, context: int) -> CudaKV:
        return CudaKV(self.config, context)

    def clear_kv(self, storage, a: int, b: int) -> None:
        """Nothing to clear: rows at or past a session's position are never read."""


    def workspace(self, kv) -> CudaWorkspace:
        return CudaWorkspace(self, kv)

    def running(self, step):
        return self.cpu.running(step)

    @property
    def unembed_bytes(self) -> int:
        return self.cpu.unembed_bytes if self.unembed_q is None else \
            self.unembed_q[0].nbytes + self.unembed_q[1].nbytes

    # -- blocks (h: the step's device buffers) ---------------------------------------------------
    def embed(self, step) -> SimpleNamespace:
        c = self.config
        b = step.ws.buffers(step.T)
        b.tok.copy_to_device(step.toks)
        self.K.embed_norm(b.tok, self.emb, c.embedding_multiplier_scale, self.layers[0].attn_norm,
                          c.rms_norm_eps, b.h, b.x)
        return b

    def attention(self, li: int, b: SimpleNamespace, step) -> None:
        c, dl, K, T = self.config, self.layers[li], self.K, step.T
        K.matmul(b.x, dl.w_qkv, dl.s_qkv, b.qkv)
        for kv, r0, n, key_ok in step.segments:
            kc, vc = kv.storage.k[li], kv.storage.v[li]
            q, o, qkv = (b.q, b.o, b.qkv) if n == T else (b.q[r0:r0 + n], b.o[r0:r0 + n], b.qkv[r0:r0 + n])
            if li == 0:
                kv.storage.key_ok.copy_to_device(np.ascontiguousarray(key_ok, dtype=np.uint8))
            K.rope_store(qkv, self.inv_freq, kv.pos, c.num_q_heads, q, kc, vc)
            K.attention(q, kc, vc, kv.pos, kv.storage.key_ok, c.attn_output_multiplier, c.attn_logit_cap,
                        c.sequence_len, c.num_q_heads, o)
        K.matmul(b.o, dl.wo, dl.so, b.br)
        K.add_norm(b.h, b.br, dl.attn_post_norm, dl.moe_norm, c.rms_norm_eps, b.x)

    def route(self, li: int, b: SimpleNamespace, step):
        self.K.route(b.x, self.layers[li].router, self.config.num_selected_experts, b.idx, b.gate, b.probs)
        return b.x.copy_to_host(), b.idx.copy_to_host(), b.gate.copy_to_host(), b.probs.copy_to_host()

    def guess(self, li: int, b: SimpleNamespace, step) -> np.ndarray:
        dl, c = self.layers[li], self.config
        self.K.rmsnorm(b.h, dl.moe_norm, c.rms_norm_eps, b.xg)
        self.K.route(b.xg, dl.router, c.num_selected_experts, b.idx_g, b.gate_g, b.probs_g)
        return b.idx_g.copy_to_host()

    def moe(self, li: int, b: SimpleNamespace, x, idx, gate, step) -> None:
        c = self.config
        m = self.cpu.moe_rows(li, x, idx, gate, step.ws.host.scratch)
        b.br.copy_to_device(m)
        nxt = self.layers[li + 1].attn_norm if li + 1 < len(self.layers) else self.final_norm
        self.K.add_norm(b.h, b.br, self.layers[li].moe_post_norm, nxt, c.rms_norm_eps, b.x)

    def final(self, b: SimpleNamespace, step) -> np.ndarray:
        return b.x.copy_to_host()

    def logits(self, hf: np.ndarray, ws) -> np.ndarray:
        """hf [T, D] (host, final-normed) -> logits [T, V] float32 on the host."""
        c = self.config
        hd = cuda.to_device(np.ascontiguousarray(hf, dtype=np.float32))
        out = cuda.device_array((hd.shape[0], c.vocab_size), np.float32)
        if self.unembed_q is None:
            return self.K.unembed(hd, self.emb, c.output_multiplier_scale, out).copy_to_host()
        logits = self.K.matmul(hd, *self.unembed_q, out).copy_to_host()
        logits *= np.float32(c.output_multiplier_scale)
        return logits


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)
