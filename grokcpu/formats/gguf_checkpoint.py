"""A Grok-1 GGUF model opened for the engine: the same fields as checkpoint.Checkpoint, with
every matrix a `GMatrix` (ggml type + the file's bytes, mapped, zero copy) instead of int8.

Norms and routers are decoded to float32 in RAM at load (read with pread); every matrix stays
in the map. A decode step's products read it in the fused one-row kernels (`GMatrix.prepared`,
for the types with a decode product); the others go through `GMatrix.product`: quant.matvec
for a few rows, dequantized tiles and BLAS for many. With the expert cache on, experts are read
into its slots instead (`expert_segments`, `expert_matrices`: GMatrix views of a slot;
`expert_bytes` its size in the file's types). The output layer is `output.weight` when the file
has one, else the tied `token_embd.weight` (llama.cpp's Grok graph does the same). Layer names:
see formats/gguf.py.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .. import quant
from ..backends.cpu import GEMM_MIN_ROWS, TILE_ELEMS
from ..checkpoint import LayerWeights
from ..errors import CheckpointError
from ..kernels import vnni
from ..kernels.quants import BF16, F16, F32, Q4_K
from .gguf import check_grok_tensors, grok_config, open_gguf

_FLOAT = {F32: np.float32, F16: np.float16}


@dataclass(frozen=True)
class GMatrix:
    """A ggml matrix W [N, K] (numpy order: N outputs, rows of K inputs) read in place.

    data: uint8 [N, row_bytes] (a view of the map). `product(x)` = x [T, K] @ W.T -> [T, N]."""
    qtype: int
    data: np.ndarray
    K: int
    name: str

    @classmethod
    def of(cls, qtype: int, raw: np.ndarray, shape: tuple, name: str) -> "GMatrix":
        """The matrix (shape [N, K]) or stack of matrices ([E, N, K]) over the bytes raw."""
        *lead, K = shape
        qtype = int(qtype)        # a plain int: numba types an IntEnum argument slowly on every call
        data = raw.reshape(*lead, raw.size // int(np.prod(lead)))
        if qtype not in _FLOAT and qtype != BF16:
            qk, _ = quant.layout(qtype, name)
            if K % qk:
                raise CheckpointError(f"tensor '{name}': rows of {K} values are not whole {quant.type_name(qtype)} "
                                      f"blocks of {qk}", hint="the file is damaged or from an unsupported converter")
        return cls(qtype, data, K, name)

    @property
    def N(self) -> int:
        return self.data.shape[-2]

    def __getitem__(self, e: int) -> "GMatrix":
        """Matrix e of a stack (an expert of a merged *_exps tensor): a slice, zero copy."""
        return GMatrix(self.qtype, self.data[e], self.K, f"{self.name}[{e}]")

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def has_rows_product(self) -> bool:
        """Whether its type has a decode product the fused decode kernels call (quant.ROWS)."""
        return self.qtype in quant.ROWS

    @functools.cached_property
    def prepared(self) -> tuple:
        """The matrix as the fused decode kernels take it, (qtype, bytes, words), checked and made
        once (quant.prepared)."""
        return quant.prepared(self.qtype, self.data, self.name)

    def _kernels(self) -> bool:
        """Whether grokcpu's block kernels read this matrix (float rows not in 32s: numpy does)."""
        return self.K % quant.layout(self.qtype, self.name)[0] == 0

    def rows(self, r0: int, r1: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows r0..r1-1 as float32 [r1-r0, K]."""
        if out is None:
            out = np.empty((r1 - r0, self.K), np.float32)
        if self.qtype in _FLOAT:
            out[...] = self.data[r0:r1].view(_FLOAT[self.qtype])
        elif self.qtype == BF16 and not self._kernels():
            out[...] = (self.data[r0:r1].view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            quant.dequant_rows(self.qtype, self.data, r0, r1, out, self.name)
        return out

    def product(self, x: np.ndarray, out: np.ndarray | None = None, scratch=None,
                activations: str = "f32", threads: int = 1) -> np.ndarray:
        """x [T, K] @ W.T -> float32 [T, N] (into out): F32 with BLAS on the map itself; other
        types with quant.matvec for a few rows (x rounded to 8 bits for the K-quants under
        activations="q8"), from GEMM_MIN_ROWS rows dequantized tiles and BLAS (the tile from
        `scratch`, a cpu.Scratch, when given), or for Q4_K under activations="q8" on a CPU with
        AVX-512 VNNI, integer products on `threads` threads (kernels/vnni.py)."""
        T, N = x.shape[0], self.N
        if out is None:
            out = np.empty((T, N), np.float32)
        if self.qtype == F32:
            np.matmul(x, self.data.view(np.float32).T, out=out)
            return out
        if T < GEMM_MIN_ROWS and self._kernels():
            return quant.matvec(self.qtype, self.data, x, out, self.name, activations)
        if activations == "q8" and self.qtype == Q4_K and vnni.VNNI and N >= vnni.ROWS:
            return vnni.q4k_product(self.data, x, out, quant.F16_TABLE, threads)
        step = max(1, min(N, TILE_ELEMS // self.K))
        tile = scratch("tile", step * self.K) if scratch is not None else np.empty(step * self.K, np.float32)
        for r0 in range(0, N, step):
            r1 = min(N, r0 + step)
            t = self.rows(r0, r1, tile[:(r1 - r0) * self.K].reshape(r1 - r0, self.K))
            np.matmul(x, t.T, out=out[:, r0:r1])
        return out


class GGUFCheckpoint:
    """A Grok-1 GGUF (one file, native shards or .partNofM pieces), opened for the engine."""

    format = "gguf"

    def __init__(self, path, config=None):
        self.path = Path(path)
        self.root = self.path.parent
        self.gguf = m = open_gguf(path)
        self.resident_bytes = 0             # bytes of the file read into RAM (norms, routers)
        try:
            self.config = grok_config(m) if config is None else config
            check_grok_tensors(m, self.config)
            c = self.config
            self.embedding = self.matrix("token_embd.weight")
            self.output = self.matrix("output.weight") if "output.weight" in m.tensors else self.embedding
            self.final_norm = self.vector("output_norm.weight")
            self.layers = [self._layer(n) for n in range(c.num_layers)]
            sizes = [sum(w[e].nbytes for w in (lw.w_gate, lw.w_up, lw.w_down))
                     for lw in self.layers for e in range(c.num_experts)]
        except BaseException:
            m.close()
            raise
        self.files = m.files
        # an expert cache slot holds the largest expert (Q4_K_M-style files keep some layers'
        # down projections in a wider type)
        self.expert_bytes = max(sizes)
        self.all_expert_bytes = sum(sizes)

    # -- tensors -----------------------------------------------------------------------------
    def matrix(self, name: str) -> GMatrix:
        t = self.gguf.tensor(name)
        return GMatrix.of(t.type, self.gguf.data(name), t.shape, name)

    def vector(self, name: str) -> np.ndarray:
        """A small tensor (norm, router) as float32 in RAM, read with pread."""
        t = self.gguf.tensor(name)
        flat = (int(np.prod(t.shape[:-1])), t.shape[-1])
        a = GMatrix.of(t.type, self.gguf.read(name), flat, name).rows(0, flat[0])
        self.resident_bytes += t.nbytes
        return a.reshape(t.shape)

    def _experts(self, layer: int, part: str) -> GMatrix | list:
        merged = f"blk.{layer}.ffn_{part}_exps.weight"
        if merged in self.gguf.tensors:
            return self.matrix(merged)
        return [self.matrix(f"blk.{layer}.ffn_{part}.{e}.weight") for e in range(self.config.num_experts)]

    def _layer(self, n: int) -> LayerWeights:
        b = f"blk.{n}."
        return LayerWeights(
            attn_norm=self.vector(b + "attn_norm.weight"), attn_post_norm=self.vector(b + "attn_output_norm.weight"),
            moe_norm=self.vector(b + "ffn_norm.weight"), moe_post_norm=self.vector(b + "layer_output_norm.weight"),
            wq=self.matrix(b + "attn_q.weight"), wk=self.matrix(b + "attn_k.weight"),
            wv=self.matrix(b + "attn_v.weight"), wo=self.matrix(b + "attn_output.weight"),
            router=np.ascontiguousarray(self.vector(b + "ffn_gate_inp.weight").T),
            w_gate=self._experts(n, "gate"), w_up=self._experts(n, "up"), w_down=self._experts(n, "down"))

    def expert_segments(self, layer: int, expert: int) -> list[list[tuple[str, int, int]]]:
        """(file, offset, length) segments of the expert's gate, up and down bytes (a part has
        several where a .partNofM cut falls inside it)."""
        return self.gguf.expert_segments(layer, expert)

    def expert_matrices(self, layer: int, expert: int, buf: np.ndarray) -> list[GMatrix]:
        """The expert's gate, up and down over buf, their bytes end to end as expert_segments
        lists them (an expert cache slot): the mapped matrices' types, shapes and names."""
        lw, out, off = self.layers[layer], [], 0
        for w in (lw.w_gate, lw.w_up, lw.w_down):
            m = w[expert]
            out.append(replace(m, data=buf[off:off + m.nbytes].reshape(m.data.shape)))
            off += m.nbytes
        return out

    def embedding_rows(self, toks: np.ndarray) -> np.ndarray:
        """Emb[toks] float32 [T, D], each row dequantized on lookup."""
        out = np.empty((len(toks), self.config.emb_size), np.float32)
        for i, t in enumerate(np.asarray(toks).tolist()):
            self.embedding.rows(t, t + 1, out[i:i + 1])
        return out

    # -- sizes -------------------------------------------------------------------------------
    def groups(self) -> dict:
        """Tensor group -> {ggml type name: bytes}, for `info`."""
        out: dict = {}
        for t in self.gguf.tensors.values():
            g = re.sub(r"^blk\.[0-9]+\.|\.weight$", "", t.name)
            g = re.sub(r"\.[0-9]+$", "_exps", g)         # one tensor per expert: their group
            d = out.setdefault(g, {})
            name = quant.type_name(int(t.type))
            d[name] = d.get(name, 0) + t.nbytes
        return out

    def read_per_token(self) -> dict:
        """Bytes one decode step reads, by part (plan.read_per_token's parts)."""
        c = self.config
        sizes = {t.name: t.nbytes for t in self.gguf.tensors.values()}
        experts = sum(n for k, n in sizes.items() if "_exps." in k or ".ffn_gate." in k or ".ffn_up." in k
                      or ".ffn_down." in k)
        emb = sizes["token_embd.weight"]
        out_bytes = sizes.get("output.weight", emb)
        parts = {"layers_dense": sum(sizes.values()) - experts - emb - sizes.get("output.weight", 0)
                 - sizes["output_norm.weight"],
                 "final_norm": sizes["output_norm.weight"], "embedding_row": emb // c.vocab_size,
                 "output_table": out_bytes,
                 "experts": experts // c.num_experts * c.num_selected_experts}
        parts["total"] = sum(parts.values())
        return parts

    @property
    def nbytes(self) -> int:
        return self.gguf.nbytes

    def check_intact(self) -> None:
        self.gguf.check_intact()

    def close(self) -> None:
        self.gguf.close()
