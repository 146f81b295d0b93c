"""Open a released `ckpt-0/` folder: find its files, check every shape, map every array.

Layout (spec §4.2): file 0 is the embedding table, file 1 the final norm, then 12 files per
decoder layer with the layers in *lexicographic* order of their names (0, 1, 10, 11, ..., 2, ...).
All matrices are input-major, `y = x @ W`. Weights stay in the page cache, mapped read-only;
only scales (1/D of the weight bytes), norms and the router are copied into RAM.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import GrokConfig
from .errors import CheckpointError
from .formats.grok1_pickle import ArrayRef, QuantizedRef, parse_tensor_file

# Offsets of a layer's 12 files, in the order the reference flattens its parameters.
LAYER_PARAMS = (
    "moe/linear/w", "moe/linear_1/w", "moe/linear_v/w",
    "multi_head_attention/key/w", "multi_head_attention/linear/w",
    "multi_head_attention/query/w", "multi_head_attention/value/w",
    "rms_norm/scale", "rms_norm_1/scale", "rms_norm_2/scale", "rms_norm_3/scale",
    "router/w",
)
GLOBAL_PARAMS = ("language_model/in_out_embed/embeddings", "language_model/rms_norm/scale")


def layer_file_order(num_layers: int) -> list[int]:
    """Layer numbers in the order their files appear: sorted by name, so 0, 1, 10, 11, ..., 2."""
    return sorted(range(num_layers), key=str)


def file_index(layer: int, offset: int, num_layers: int) -> int:
    return 2 + 12 * layer_file_order(num_layers).index(layer) + offset


def param_path(index: int, num_layers: int) -> str:
    if index < 2:
        return GLOBAL_PARAMS[index]
    rank, offset = divmod(index - 2, 12)
    return f"transformer/decoder_layer_{layer_file_order(num_layers)[rank]}/{LAYER_PARAMS[offset]}"


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32 (exact: bf16 is the top half of a float32)."""
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


@dataclass
class QWeight:
    """An int8 matrix (or stack of them) with per-column scales in `nb` contiguous row blocks.

    w: [..., R, C] int8, memory-mapped.  s: [..., nb, C] float32 in RAM.
    Dequantized: W[..., r, c] = w[..., r, c] * s[..., r // (R // nb), c].
    """
    w: np.ndarray
    s: np.ndarray
    ref: QuantizedRef

    @property
    def blocks(self) -> int:
        return self.s.shape[-2]


@dataclass
class LayerWeights:
    attn_norm: np.ndarray       # [D]   rms_norm   (pre-attention)
    attn_post_norm: np.ndarray  # [D]   rms_norm_1 (on the attention output)
    moe_norm: np.ndarray        # [D]   rms_norm_2 (pre-MoE, router input)
    moe_post_norm: np.ndarray   # [D]   rms_norm_3 (on the MoE output)
    wq: QWeight                 # [D, H*d]
    wk: QWeight                 # [D, G*d]
    wv: QWeight                 # [D, G*d]
    wo: QWeight                 # [H*d, D], 8 row blocks
    router: np.ndarray          # [D, E] float32
    w_gate: QWeight             # moe/linear   [E, D, F] (GELU branch)
    w_up: QWeight               # moe/linear_v [E, D, F]
    w_down: QWeight             # moe/linear_1 [E, F, D], 8 row blocks


class Checkpoint:
    """A released checkpoint, opened: config, per-file references, mapped arrays."""

    def __init__(self, path: str | os.PathLike, config: GrokConfig | None = None):
        self.root, self.ckpt_dir = _find_ckpt_dir(Path(path))
        self._maps: dict[str, mmap.mmap] = {}
        files = _list_tensor_files(self.ckpt_dir)
        cfg_path = self.root / "config.json"
        if config is None and cfg_path.is_file():
            config = GrokConfig.from_json(cfg_path)
        if config is not None and len(files) != 2 + 12 * config.num_layers:
            raise CheckpointError(
                f"{self.ckpt_dir}: has {len(files)} tensor files, but the config's {config.num_layers} "
                f"layers need {2 + 12 * config.num_layers}",
                hint="a download is incomplete, or config.json belongs to another checkpoint")
        self.files = files
        self.refs = [self._parse(p) for p in files]
        self.config = config if config is not None else self._infer_config()
        self._check_shapes()
        self.embeddings = self.array(self.refs[0])            # [V, D] float32, mapped
        self.final_norm = np.array(self.array(self.refs[1]))  # [D]
        L = self.config.num_layers
        self.layers = [self._layer(file_index(i, 0, L)) for i in range(L)]

    # -- files ------------------------------------------------------------------------------
    def _map(self, path: str):
        mm = self._maps.get(path)
        if mm is None:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    raise CheckpointError(f"{path}: empty file", hint="re-download this file")
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[path] = mm
        return mm

    def _parse(self, path: Path):
        return parse_tensor_file(path, self._map(str(path)))

    def array(self, ref: ArrayRef) -> np.ndarray:
        """A read-only view of the array's bytes in the memory map (bf16 as uint16)."""
        dt = {"f4": "<f4", "i1": "i1", "bf16": "<u2", "u2": "<u2", "f2": "<f2", "u1": "u1"}[ref.dtype]
        count = int(np.prod(ref.shape, dtype=np.int64))
        return np.frombuffer(self._map(ref.path), dtype=dt, count=count, offset=ref.offset).reshape(ref.shape)

    def float_array(self, ref: ArrayRef) -> np.ndarray:
        """A float32 copy in RAM (for the small tensors: norms, router, scales)."""
        a = self.array(ref)
        if ref.dtype == "bf16":
            return bf16_to_f32(a)
        return np.array(a, dtype=np.float32)

    def qweight(self, ref: QuantizedRef) -> QWeight:
        return QWeight(self.array(ref.weight), np.ascontiguousarray(self.float_array(ref.scales)), ref)

    def _layer(self, base: int) -> LayerWeights:
        r = self.refs
        return LayerWeights(
            attn_norm=self.float_array(r[base + 7]), attn_post_norm=self.float_array(r[base + 8]),
            moe_norm=self.float_array(r[base + 9]), moe_post_norm=self.float_array(r[base + 10]),
            wq=self.qweight(r[base + 5]), wk=self.qweight(r[base + 3]), wv=self.qweight(r[base + 6]),
            wo=self.qweight(r[base + 4]), router=self.float_array(r[base + 11]),
            w_gate=self.qweight(r[base + 0]), w_up=self.qweight(r[base + 2]),
            w_down=self.qweight(r[base + 1]))

    def expert_ranges(self, layer: int, expert: int) -> list[tuple[str, int, int]]:
        """(file, byte offset, byte length) of one expert's int8 weights: gate, up, down.

        Each is one contiguous range, since the expert index is the leading axis.
        """
        L = self.config.num_layers
        out = []
        for off in (0, 2, 1):
            w = self.refs[file_index(layer, off, L)].weight
            n = w.nbytes // w.shape[0]
            out.append((w.path, w.offset + expert * n, n))
        return out

    @property
    def nbytes(self) -> int:
        return sum(os.path.getsize(p) for p in self.files)

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:   # a numpy view still holds it; the OS unmaps at exit
                pass
        self._maps.clear()

    # -- config and shapes ------------------------------------------------------------------
    def _infer_config(self) -> GrokConfig:
        """A bare ckpt-0/: sizes from the shapes, the rest from the Grok-1 constants."""
        n = len(self.files)
        if n < 14 or (n - 2) % 12:
            raise CheckpointError(f"{self.ckpt_dir}: {n} tensor files is not 2 + 12 x layers",
                                  hint="the download is incomplete, or add the config.json that came with it")
        L = (n - 2) // 12
        emb, q, k, gate = self.refs[0], self.refs[2 + 5], self.refs[2 + 3], self.refs[2 + 0]
        try:
            V, D = emb.shape
            E, _, F = gate.weight.shape
            qs, ks = q.weight.shape[1], k.weight.shape[1]
        except (AttributeError, ValueError):
            raise CheckpointError(f"{self.ckpt_dir}: tensor files do not have Grok-1's layout",
                                  hint="add the config.json that describes this checkpoint") from None
        d = 128
        if qs % d or ks % d:
            raise CheckpointError(f"{self.ckpt_dir}: cannot infer the head size from the shapes",
                                  hint="add a config.json with transformer.key_size")
        return GrokConfig(vocab_size=V, emb_size=D, num_layers=L, num_experts=E, ffn_size=F,
                          num_q_heads=qs // d, num_kv_heads=ks // d, key_size=d,
                          embedding_multiplier_scale=math.sqrt(D), attn_output_multiplier=d ** -0.5,
                          num_selected_experts=min(2, E))

    def _check_shapes(self) -> None:
        c = self.config
        D, V, E, F, Q, K = c.emb_size, c.vocab_size, c.num_experts, c.ffn_size, c.q_size, c.kv_size
        for i, ref in enumerate(self.refs):
            name = param_path(i, c.num_layers)
            quantized, expect, rows = _expected(name, D, V, E, F, Q, K)
            path = self.files[i]
            if not quantized:                   # plain float32 array
                if not isinstance(ref, ArrayRef) or ref.dtype != "f4" or ref.shape != expect:
                    raise CheckpointError(
                        f"{path}: {name} should be float32 {list(expect)}, found {_describe(ref)}",
                        hint="this file does not belong to this checkpoint/config")
                continue
            wshape = expect
            ok = (isinstance(ref, QuantizedRef) and ref.weight.dtype == "i1" and ref.weight.shape == wshape
                  and ref.scales.dtype in ("bf16", "f4") and len(ref.scales.shape) == len(wshape)
                  and ref.scales.shape[:-2] == wshape[:-2] and ref.scales.shape[-1] == wshape[-1]
                  and ref.scales.shape[-2] >= 1 and rows % ref.scales.shape[-2] == 0)
            if not ok:
                raise CheckpointError(
                    f"{path}: {name} should be int8 {list(wshape)} with bf16 scales, found {_describe(ref)}",
                    hint="this file does not belong to this checkpoint/config")


def _expected(name: str, D, V, E, F, Q, K):
    """(quantized?, shape, input rows) that the parameter `name` must have."""
    if name.endswith("in_out_embed/embeddings"):
        return False, (V, D), 0
    if name.endswith("router/w"):
        return False, (D, E), 0
    if name.endswith("/scale"):
        return False, (D,), 0
    table = {"moe/linear/w": ((E, D, F), D), "moe/linear_v/w": ((E, D, F), D),
             "moe/linear_1/w": ((E, F, D), F), "multi_head_attention/key/w": ((D, K), D),
             "multi_head_attention/value/w": ((D, K), D), "multi_head_attention/query/w": ((D, Q), D),
             "multi_head_attention/linear/w": ((Q, D), Q)}
    return (True, *table[name.split("/", 2)[2]])


def _describe(ref) -> str:
    if isinstance(ref, QuantizedRef):
        return f"{ref.weight.dtype} {list(ref.weight.shape)} with scales {ref.scales.dtype} {list(ref.scales.shape)}"
    return f"{ref.dtype} {list(ref.shape)}"


def _find_ckpt_dir(path: Path) -> tuple[Path, Path]:
    if not path.exists():
        raise CheckpointError(f"no such checkpoint folder: {str(path)!r}",
                              hint="pass the folder that contains ckpt-0/ (or ckpt-0/ itself)")
    if (path / "ckpt-0").is_dir():
        return path, path / "ckpt-0"
    if path.is_dir() and any(path.glob("tensor*_000")):
        return path.parent, path
    raise CheckpointError(f"no ckpt-0/ folder in {str(path)!r}",
                          hint="pass the folder that contains ckpt-0/ (or ckpt-0/ itself)")


def _list_tensor_files(ckpt_dir: Path) -> list[Path]:
    found = {}
    for p in ckpt_dir.iterdir():
        n = p.name
        if n.startswith("tensor") and n.endswith("_000") and n[6:-4].isdigit():
            found[int(n[6:-4])] = p
    if not found:
        raise CheckpointError(f"{ckpt_dir}: no tensorNNNNN_000 files", hint="the download is incomplete")
    n = max(found) + 1
    missing = [i for i in range(n) if i not in found]
    if missing:
        raise CheckpointError(f"{ckpt_dir}: tensor{missing[0]:05d}_000 is missing ({len(missing)} files missing)",
                              hint="the download is incomplete; fetch the missing files")
    return [found[i] for i in range(n)]
