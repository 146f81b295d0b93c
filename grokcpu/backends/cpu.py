"""The CPU backend: the blocks of `model.forward` as numba kernels, numpy's BLAS for many rows.

Block interface (the CUDA backend implements the same):
    new_kv(context) / clear_kv(storage, a, b)     a session's K/V storage
    workspace()                                    a session's buffers
    running(step)                                  context manager around one forward
    embed(step) -> h                               h [T, D] = Emb[toks] * embedding multiplier
    attention(li, h, step)                         h += RMSNorm_1(Attn(RMSNorm_0(h))), K/V stored
    route(li, h, step) -> x, idx, gate, probs      x = RMSNorm_2(h); top-k of softmax(x @ router)
    guess(li, h, step) -> idx                      layer li's router applied to h (prefetch guess)
    moe(li, h, x, idx, gate, step)                 h += RMSNorm_3(sum_j gate_j * expert_j(x))
    final(h, step) -> hf                           RMSNorm_final(h), on the host
    logits(hf) -> [T, V]                           the tied unembedding x output multiplier

One row (a decode step) runs fused kernels on the session's `DecodeWorkspace`
(`kernels.decode`); several rows go through `matmul`: a kernel that reads the int8 weights once
for all rows, or (from GEMM_MIN_ROWS) dequantized tiles and BLAS. Both give the reference's
arithmetic in float32; only the summation order differs between them.

A GGUF model's matrices are `GMatrix`es (formats/gguf_checkpoint.py: ggml type + mapped bytes).
Its rows take the same blocks: one row the fused kernels, whose products compile to the file's
types (kernels/decode.py), when every matrix has a decode product (Q8_0 and the K-quants);
several rows, or a file of other types, the many-row blocks, whose products (`product`)
dispatch on the kind of matrix.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

import numba
import numpy as np

from ..checkpoint import QWeight
from ..kernels import decode as KD
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


def usable_threads(asked: int | None) -> int:
    """The thread count a model runs with: asked (default: physical cores), at most numba's pool."""
    n = physical_cores() if asked is None else int(asked)
    return max(1, min(n, numba.config.NUMBA_NUM_THREADS))


@functools.cache
def _blas_set_threads():
    """OpenBLAS's set-threads function in this process (numpy's BLAS), or None."""
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                return fn
    return None


class Scratch:
    """Reusable float32 buffers by name: fresh pages cost a fault each (tens of thousands per
    prefill), so products write into buffers that live as long as their session."""

    def __init__(self):
        self._bufs: dict = {}

    def __call__(self, name: str, *shape: int) -> np.ndarray:
        n = int(np.prod(shape))
        buf = self._bufs.get(name)
        if buf is None or buf.size < n:
            buf = self._bufs[name] = np.empty(n, np.float32)
        return buf[:n].reshape(shape)


class Workspace:
    """A session's buffers: named scratch for many-row passes, the decode workspace for one row."""

    def __init__(self, backend: "CpuBackend", kv):
        self.backend = backend
        self.kv = kv
        self.scratch = Scratch()
        self._decode: KD.DecodeWorkspace | None = None
        self._routing: dict = {}
        self.attn_args: list | None = None      # attn_route's arguments by layer, around (pos, key mask)

    def routing(self, prefix: str, T: int):
        """x [T, D], idx [T, k], gate [T, k], probs [T, E] for a router's output."""
        bufs = self._routing.get((prefix, T))
        if bufs is None:
            c = self.backend.config
            k = c.num_selected_experts
            bufs = self._routing[(prefix, T)] = (
                np.empty((T, c.emb_size), np.float32), np.empty((T, k), np.int64),
                np.empty((T, k), np.float32), np.empty((T, c.num_experts), np.float32))
        return bufs

    def decode(self) -> KD.DecodeWorkspace:
        if self._decode is None:
            b = self.backend
            dw = self._decode = KD.DecodeWorkspace(b.config, b.context, b.threads, b.pair_parts,
                                                   (b.activations == "q8") if b.gguf else None)
            kc, vc = self.kv.storage
            routing = self.routing("", 1)
            self.attn_args = [((dw.h, dw.x, *b.attn_args[li], b.layers[li].router, dw.cos, dw.sin, kc[li], vc[li]),
                               (b.config.rms_norm_eps, b.consts, dw.q, dw.kv, dw.attn, dw.a, dw.scores, b.threads,
                                dw.scratch, *routing)) for li in range(b.config.num_layers)]
        return self._decode


class CpuBackend:
    def __init__(self, model, unembed: bool = True):
        self.model = model
        self.config = c = model.config
        self.context = model.context
        self.threads = model.threads
        self.pair_parts = max(1, self.threads // 2)     # row ranges per matrix of gate/up pairs
        self.layers = model.ckpt.layers
        self.gguf = getattr(model.ckpt, "format", "ckpt-0") == "gguf"
        self.output = None                                # a GGUF's output layer (resident_copies)
        if self.gguf:
            self.layers, self.output = _resident_dense(self.layers, model.ckpt.output)
        self.emb = None if self.gguf else model.ckpt.embeddings
        self.final_norm = model.ckpt.final_norm
        d = c.key_size
        self.inv_freq = (1.0 / (np.float32(c.rope_base) ** (np.arange(0, d, 2, dtype=np.float32)
                                                            / np.float32(d)))).astype(np.float32)
        self.consts = np.array([c.attn_output_multiplier, c.attn_logit_cap, c.sequence_len], np.float32)
        # a GGUF model's rows go one at a time through the fused kernels when they can read every
        # matrix (see kernels/decode.py); its experts from the map as those kernels take them
        self.one_row = not self.gguf or all(_has_rows_products(lw) for lw in self.layers)
        self.mapped_experts = [[tuple(w[e].prepared for w in (lw.w_gate, lw.w_up, lw.w_down))
                                for e in range(c.num_experts)] for lw in self.layers] \
            if self.gguf and self.one_row else None
        # how an expert cache slot holds a layer's experts (kernels.decode.resident_experts), or
        # None where the kernels cannot find them there themselves
        self.slot_layouts = [_slot_layout(lw) if self.gguf else (lw.w_gate.s, lw.w_up.s, lw.w_down.s)
                             for lw in self.layers] if self.one_row else []
        # decode's per-layer arguments: norms [3, D] (attn, attn_post, moe) and the attention weights
        self.attn_args = [(np.stack([lw.attn_norm, lw.attn_post_norm, lw.moe_norm]),
                           *(w.prepared if self.gguf else (w.w, w.s) for w in (lw.wq, lw.wk, lw.wv, lw.wo)))
                          for lw in self.layers] if self.one_row else []
        self.activations = model.options.activations
        if not self.gguf and self.activations == "q8":
            from ..options import OptionError
            raise OptionError("activations", "{name} q8 is for GGUF models: a ckpt-0 model's int8 weights are "
                              "multiplied with float32 activations", hint="leave it at f32 for a ckpt-0 model")
        # int8 copy of the tied embedding with per-row scales, for the output layer only (4x fewer
        # bytes per token); the input lookup stays exact
        if self.gguf and model.options.unembed == "int8":
            from ..options import OptionError
            raise OptionError("unembed", "{name} int8 is for ckpt-0 models: a GGUF model's output layer is read "
                              "in its file's own type", hint="leave it at f32, or convert the GGUF with a smaller --type")
        self.unembed_q = quantize_embedding(self.emb) if unembed and model.options.unembed == "int8" else None

    # -- storage -------------------------------------------------------------------------------
    def new_kv(self, context: int):
        c = self.config
        shape = (c.num_layers, c.num_kv_heads, context, c.key_size)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)   # pages mapped as used

    def clear_kv(self, storage, a: int, b: int) -> None:
        k, v = storage
        k[:, :, a:b] = 0.0          # rows past the fill must read as zeros (see K.attention)
        v[:, :, a:b] = 0.0


    def workspace(self, kv) -> Workspace:
        return Workspace(self, kv)

    @contextlib.contextmanager
    def running(self, step):
        """Around one forward: this thread's numba pool size, and with many rows BLAS's. Then
        numba's kernels run on one thread, since its idle OpenMP workers spin and would fight
        OpenBLAS's threads for the cores (2x slower prefill). A decode step leaves BLAS alone:
        setting its thread count wakes its pool, which then spins on a core decode needs."""
        many = step.T >= GEMM_MIN_ROWS
        if many:
            blas = _blas_set_threads()
            if blas is not None:
                blas(ctypes.c_int(self.threads))
        saved = numba.get_num_threads()
        numba.set_num_threads(1 if many else self.threads)
        try:
            yield
        finally:
            numba.set_num_threads(saved)

    # -- blocks --------------------------------------------------------------------------------
    def fused(self, step) -> bool:
        """Whether this step runs the fused one-row kernels (one row, of a model they can read)."""
        return step.T == 1 and self.one_row

    def embed(self, step) -> np.ndarray:
        c = self.config
        mult = np.float32(c.embedding_multiplier_scale)
        if self.fused(step):
            dw = step.ws.decode()
            dw.ahead = -1
            row = self.model.ckpt.embedding_rows(step.toks)[0] if self.gguf else self.emb[step.toks[0]]
            np.multiply(row, mult, out=dw.h[0])
            dw.pos[0] = step.pos[0]
            K.rope_tables(self.inv_freq, dw.pos, dw.cos, dw.sin)
            return dw.h
        step.cos = np.empty((step.T, c.key_size // 2), np.float32)
        step.sin = np.empty_like(step.cos)
        K.rope_tables(self.inv_freq, step.pos, step.cos, step.sin)
        return self.model.ckpt.embedding_rows(step.toks) * mult

    def attention(self, li: int, h: np.ndarray, step) -> None:
        if self.fused(step):         # one call: the block, then the router's input and top-k (see route)
            dw = step.ws.decode()
            if dw.ahead == li:  # already run by the previous layer's MoE call (_moe_one)
                dw.ahead = -1
                return
            kv, _, _, key_ok = step.segments[0]
            before, after = step.ws.attn_args[li]
            KD.attn_route(*before, kv.pos, key_ok, *after)
            return
        self._attention_rows(li, h, step)

    def _attention_rows(self, li: int, h: np.ndarray, step) -> None:
        c, lw, scratch = self.config, self.layers[li], step.ws.scratch
        T, H, G, d = step.T, c.num_q_heads, c.num_kv_heads, c.key_size
        x = scratch("x", T, c.emb_size)
        K.rmsnorm(h, lw.attn_norm, c.rms_norm_eps, x)
        q = self.product(x, lw.wq, scratch, out=scratch("q", T, H * d)).reshape(T, H, d)
        k = self.product(x, lw.wk, scratch, out=scratch("k", T, G * d)).reshape(T, G, d)
        v = self.product(x, lw.wv, scratch, out=scratch("v", T, G * d)).reshape(T, G, d)
        K.rope(q, step.cos, step.sin)
        K.rope(k, step.cos, step.sin)
        attn = scratch("attn", T, H, d)
        scores = scratch("scores", H, int(step.pos.max()) + 1)
        mult, cap, n_uniform = self.consts
        for kv, r0, n, key_ok in step.segments:
            kc, vc = kv.storage
            p0 = kv.pos
            kc[li, :, p0:p0 + n] = k[r0:r0 + n].transpose(1, 0, 2)
            vc[li, :, p0:p0 + n] = v[r0:r0 + n].transpose(1, 0, 2)
            K.attention(q[r0:r0 + n], kc[li], vc[li], p0, key_ok, mult, cap, n_uniform, attn[r0:r0 + n],
                        scores, self.threads)
        a = self.product(attn.reshape(T, H * d), lw.wo, scratch, out=scratch("o", T, c.emb_size))
        K.add_rmsnorm(h, a, lw.attn_post_norm, c.rms_norm_eps)

    def route(self, li: int, h: np.ndarray, step):
        if self.fused(step):         # computed by attention()'s fused call for this layer
            return step.ws.routing("", 1)
        return self._route(self.layers[li], h, step, "")

    def guess(self, li: int, h: np.ndarray, step) -> np.ndarray:
        return self._route(self.layers[li], h, step, "guess_")[1]

    def _route(self, lw, h, step, prefix: str):
        c = self.config
        x, idx, gate, probs = step.ws.routing(prefix, step.T)
        K.rmsnorm(h, lw.moe_norm, c.rms_norm_eps, x)
        K.route(x, lw.router, c.num_selected_experts, idx, gate, probs)
        return x, idx, gate, probs

    def moe(self, li: int, h: np.ndarray, x: np.ndarray, idx: np.ndarray, gate: np.ndarray, step) -> None:
        lw, cache, eps = self.layers[li], self.model.experts, self.config.rms_norm_eps
        if self.fused(step):
            self._moe_one(li, lw, h, x, idx, gate, cache, step)
            return
        K.add_rmsnorm(h, self.moe_rows(li, x, idx, gate, step.ws.scratch), lw.moe_post_norm, eps)

    def _moe_one(self, li, lw, h, x, idx, gate, cache, step) -> None:
        """One token's MoE block: all in one call when every expert is resident (ckpt-0: with 1 or
        2 threads; see DecodeWorkspace.whole), with the next layer's attention and routing
        (attention() then finds them done); else resident experts first (overlapping the others'
        reads), summed in expert order."""
        dw = step.ws.decode()
        eps = self.config.rms_norm_eps
        if cache is not None and dw.whole and self.slot_layouts[li] is not None:
            args = (x[0], idx[0], gate[0], cache.pool_view, cache.slot_of[li], self.slot_layouts[li],
                    dw.resident_work, dw.ys, dw.es, dw.gates, dw.slots, h, lw.moe_post_norm, eps, dw.moe)
            if li + 1 < len(self.layers):
                kv, _, _, key_ok = step.segments[0]
                before, after = step.ws.attn_args[li + 1]
                done = KD.moe_resident_attn(*args, *before, kv.pos, key_ok, *after)
                if done:
                    dw.ahead = li + 1
            else:
                done = KD.moe_resident(*args)
            if done:
                cache.note_used(li, dw.es.tolist())
                return
        chosen = sorted(zip(idx[0].tolist(), gate[0].tolist()))
        experts = [e for e, _ in chosen]
        dw.gates[:] = [g for _, g in chosen]
        if cache is None:
            for j, e in enumerate(experts):
                KD.expert(x[0], *self._expert(lw, li, e), False, dw.gu, dw.ys[j], dw.scratch)
        else:
            for e in cache.ready_first(li, experts):
                j = experts.index(e)
                slot = cache.acquire(li, e)
                try:
                    KD.expert(x[0], *self._expert(lw, li, e, slot), True, dw.gu, dw.ys[j], dw.scratch)
                finally:
                    cache.release(li, e)
        KD.moe_finish(h, dw.ys, dw.gates, lw.moe_post_norm, eps, dw.moe)

    def _expert(self, lw, li: int, e: int, slot=None) -> tuple:
        """Expert e's gate, up and down as the fused kernels take them, from its expert cache
        slot (what acquire returned) or the memory map."""
        if self.gguf:
            return tuple(m.prepared for m in slot) if slot is not None else self.mapped_experts[li][e]
        if slot is None:
            slot = lw.w_gate.w[e], lw.w_up.w[e], lw.w_down.w[e]
        return tuple(zip(slot, (lw.w_gate.s[e], lw.w_up.s[e], lw.w_down.s[e])))

    def moe_rows(self, li, x, idx, gate, scratch) -> np.ndarray:
        """sum_j gate[t, j] * expert_{idx[t, j]}(x[t]); each expert runs once over its tokens,
        its weights from the expert cache (ckpt-0's down output-major) or the memory map."""
        lw, cache = self.layers[li], self.model.experts
        T, D = x.shape
        out = np.zeros((T, D), np.float32)
        experts = np.unique(idx).tolist()
        order = experts if cache is None else cache.ready_first(li, experts)
        ys = scratch("expert_out", idx.size * D)
        xs = scratch("expert_in", T * D)
        done = {}
        used = 0
        for e in order:
            if cache is not None:
                wg, wu, wd = cache.acquire(li, e)
            elif self.gguf:             # GMatrix stacks (or per-expert lists): expert e's matrices
                wg, wu, wd = lw.w_gate[e], lw.w_up[e], lw.w_down[e]
            else:
                wg, wu, wd = lw.w_gate.w[e], lw.w_up.w[e], lw.w_down.w[e]
            if not self.gguf:           # int8 with the scales in RAM
                wg, wu, wd = (wg, lw.w_gate.s[e]), (wu, lw.w_up.s[e]), (wd, lw.w_down.s[e])
            try:
                rows, slot = np.nonzero(idx == e)
                n = rows.size
                xe = np.take(x, rows, axis=0, out=xs[:n * D].reshape(n, D))
                g, u = self._gate_up(xe, wg, wu, scratch)
                for t in range(n):
                    K.gelu_mul(g[t], u[t])
                y = ys[used * D:(used + n) * D].reshape(n, D)
                used += n
                done[e] = rows, slot, self.product(g, wd, scratch, out_major=cache is not None, out=y)
            finally:
                if cache is not None:
                    cache.release(li, e)
        for e in experts:           # summed in expert order, whichever ran first
            rows, slot, y = done[e]
            out[rows] += gate[rows, slot][:, None] * y
        return out

    def _gate_up(self, x, wg, wu, scratch):
        """(x @ gate, x @ up) for an expert's rows x [T, D] (wg, wu as `product` takes them)."""
        T = x.shape[0]
        if T != 1 or self.gguf:
            C = wg.N if self.gguf else wg[0].shape[1]
            return (self.product(x, wg, scratch, out=scratch("gate", T, C)),
                    self.product(x, wu, scratch, out=scratch("up", T, C)))
        (wg, sg), (wu, su) = wg, wu
        C = wg.shape[1]
        gu = scratch("gu", 2, C)
        M.qmatvec_multi(np.ascontiguousarray(x[0]), (wg, wu), (sg, su), gu, scratch("pair", 2, self.pair_parts, C))
        return gu[:1], gu[1:]

    def final(self, h: np.ndarray, step) -> np.ndarray:
        out = h.copy() if step.T == 1 else h        # one row: h is the session's workspace
        K.rmsnorm(out, self.final_norm, self.config.rms_norm_eps, out)
        return out

    def logits(self, hf: np.ndarray, ws: Workspace) -> np.ndarray:
        scale = self.config.output_multiplier_scale
        if self.gguf:
            out = self.product(hf, self.output, ws.scratch)
            out *= np.float32(scale)
            return out
        if self.unembed_q is not None:
            return unembed_q8(hf, *self.unembed_q, scale, self.threads, ws.scratch)
        return unembed(hf, self.emb, scale, self.threads)

    def matmul(self, x, w, s, scratch: Scratch, out_major: bool = False, out=None) -> np.ndarray:
        return matmul(x, w, s, self.threads, scratch, out_major, out)

    def product(self, x, w, scratch: Scratch, out_major: bool = False, out=None) -> np.ndarray:
        """x [T, R] @ the matrix w: a QWeight, an (int8 w, scales) pair, or a GGUF model's GMatrix."""
        if isinstance(w, QWeight):
            return matmul(x, w.w, w.s, self.threads, scratch, out_major, out)
        if isinstance(w, tuple):
            return matmul(x, *w, self.threads, scratch, out_major, out)
        return w.product(np.ascontiguousarray(x), out, scratch, self.activations, self.threads)

    @property
    def unembed_bytes(self) -> int:
        """Bytes the output layer reads per token."""
        if self.gguf:
            return self.output.nbytes
        if self.unembed_q is not None:
            return self.unembed_q[0].nbytes + self.unembed_q[1].nbytes
        return self.emb.nbytes


def resident_copies(arrays: list) -> list:
    """Copies of the arrays in one allocation of the process's own memory: numpy asks for huge
    pages there, where a stream reads 1.5x faster than through a file map's 4 KiB pages."""
    ends = np.cumsum([0] + [-(-a.nbytes // 64) * 64 for a in arrays])
    arena = np.empty(int(ends[-1]), np.uint8)
    out = []
    for a, o in zip(arrays, ends):
        v = arena[o:o + a.nbytes].view(a.dtype).reshape(a.shape)
        v[...] = a
        v.flags.writeable = False             # the kernels' types for the map's arrays
        out.append(v)
    return out


def _resident_dense(layers: list, output) -> tuple:
    """A GGUF model's attention matrices and output layer (read in full every token) as
    resident_copies; the experts stay in the map (the expert cache's to page)."""
    from dataclasses import replace
    names = ("wq", "wk", "wv", "wo")
    mats = [getattr(lw, n) for lw in layers for n in names] + [output]
    copies = iter(replace(m, data=c) for m, c in zip(mats, resident_copies([m.data for m in mats])))
    layers = [replace(lw, **{n: next(copies) for n in names}) for lw in layers]
    return layers, next(copies)


def _slot_layout(lw) -> tuple | None:
    """A GGUF layer's experts in an expert cache slot (gate, up, down end to end, as
    GGUFCheckpoint.expert_matrices lays them): (type, byte offset, rows, row bytes) of each, or
    None when its experts differ in type or shape (per-expert tensors)."""
    out, off = [], 0
    for w in (lw.w_gate, lw.w_up, lw.w_down):
        mats = w if isinstance(w, list) else [w[0]]
        if len({(m.qtype, m.data.shape) for m in mats}) > 1:
            return None
        N, rb = mats[0].data.shape
        out.append((mats[0].qtype, off, N, rb))
        off += N * rb
    return tuple(out)


def _has_rows_products(lw) -> bool:
    """Whether every matrix of a GGUF layer has a decode product (see GMatrix.prepared)."""
    experts = [m for w in (lw.w_gate, lw.w_up, lw.w_down) for m in (w if isinstance(w, list) else [w])]
    return all(m.has_rows_product for m in (lw.wq, lw.wk, lw.wv, lw.wo, *experts))


def matmul(x: np.ndarray, w: np.ndarray, s: np.ndarray, threads: int, scratch: Scratch | None = None,
           out_major: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """x[T, R] @ dequant(w[R, C], s[nb, C]) -> [T, C] float32, into `out` if given.

    out_major: w is stored output-major, [C, R] (the expert cache's down projections).
    One row is a matvec (its rows split in `threads` ranges); a few rows go through a kernel
    that reads the weights once for all of them; from GEMM_MIN_ROWS rows on, dequantized tiles
    go through numpy's BLAS. Buffers come from `scratch` (default: fresh).
    """
    scratch = scratch or Scratch()
    T = x.shape[0]
    C, R = w.shape if out_major else w.shape[::-1]
    if out is None:
        out = np.empty((T, C), np.float32)
    if T == 1:
        if out_major:
            M.qmatvec_t(np.ascontiguousarray(x[0]), w, s, out[0])
        else:
            M.qmatvec(np.ascontiguousarray(x[0]), w, s, out[0], scratch("part1", threads, C))
        return out
    if T < GEMM_MIN_ROWS:
        if out_major:
            M.qmatmul_small_t(np.ascontiguousarray(x), w, s, out)
        else:
            M.qmatmul_small(np.ascontiguousarray(x), w, s, out, scratch("part", threads, T, C))
        return out
    width = max(64, min(C, TILE_ELEMS // R // 64 * 64))
    tile = scratch("tile", R * width)
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


def unembed(h: np.ndarray, emb: np.ndarray, scale: float, threads: int) -> np.ndarray:
    """h[T, D] @ emb[V, D].T * scale -> [T, V] float32 (the exact, float32 tied output layer)."""
    T, V = h.shape[0], emb.shape[0]
    out = np.empty((T, V), np.float32)
    if T < GEMM_MIN_ROWS:           # a decode step or batch: the table read once for all rows
        M.dot_rows(np.ascontiguousarray(h), emb, np.float32(scale), out, threads)
        return out
    rows = max(256, TILE_ELEMS // emb.shape[1])
    for v0 in range(0, V, rows):
        out[:, v0:v0 + rows] = h @ emb[v0:v0 + rows].T
    out *= np.float32(scale)
    return out


def unembed_q8(h: np.ndarray, qt: np.ndarray, rs: np.ndarray, scale: float, threads: int,
               scratch: Scratch | None = None) -> np.ndarray:
    """h[T, D] @ dequant(qt)[D, V] * scale -> [T, V] float32 (the int8 table)."""
    out = matmul(h, qt, rs.reshape(1, -1), threads, scratch)
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
