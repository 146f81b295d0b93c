"""Open a released `ckpt-0/` folder: find its files, check every shape, map every array.

Layout (spec §4.2): file 0 is the embedding table, file 1 the final norm, then 12 files per
decoder layer with the layers in *lexicographic* order of their names (0, 1, 10, 11, ..., 2, ...).
All matrices are input-major, `y = x @ W`. The int8 expert weights (nearly all the bytes) stay
in the page cache, mapped read-only; everything a forward reads at every token (embedding, norms,
attention weights and scales, routers, expert scales) is read into private memory at load with a
guarded pread, so a file truncated later cannot SIGBUS the process through them. `check_intact()`
tells whether a mapped expert file has shrunk since.
"""

from __future__ import annotations

import math
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import GrokConfig
from .errors import CheckpointError, ConfigError
from .formats.grok1_pickle import ArrayRef, QuantizedRef, open_regular, parse_fd

_READ_CHUNK = 1 << 28          # pread at most this many bytes per call (Linux caps one read at ~2 GiB)

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

    w: [..., R, C] int8 (experts: memory-mapped; attention: in RAM).  s: [..., nb, C] float32 in RAM.
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

    def __init__(self, path: str | os.PathLike, config: GrokConfig | None = None, weights: bool = True):
        """weights=False: headers and config only (a converter reads each tensor when it needs it)."""
        self.root, self.ckpt_dir = _find_ckpt_dir(Path(path))
        self._maps: dict[str, mmap.mmap] = {}
        self._mapped: list[tuple[str, mmap.mmap, int]] = []   # (path, map, size at load)
        files = _list_tensor_files(self.ckpt_dir)
        cfg_path = self.root / "config.json"
        if config is None and _lexists(cfg_path):
            config = GrokConfig.from_json(cfg_path)
        if config is not None and len(files) != 2 + 12 * config.num_layers:
            raise CheckpointError(
                f"{self.ckpt_dir}: has {len(files)} tensor files, but the config's {config.num_layers} "
                f"layers need {2 + 12 * config.num_layers}",
                hint="a download is incomplete, or config.json belongs to another checkpoint")
        self.files = files
        self._sizes: dict[str, int] = {}
        self.refs = [self._parse(p) for p in files]
        self.config = config if config is not None else self._infer_config()
        self._check_shapes()
        self.resident_bytes = 0             # bytes of this checkpoint read into RAM (not mapped)
        if not weights:
            return
        L = self.config.num_layers
        # the int8 expert weights are mapped; every other array is read into RAM
        for layer in range(L):
            for off in (0, 1, 2):
                self._map(self.refs[file_index(layer, off, L)].weight.path)
        self.embeddings = self.array(self.refs[0])            # [V, D] float32, in RAM
        self.final_norm = np.array(self.array(self.refs[1]))  # [D]
        self.layers = [self._layer(file_index(i, 0, L)) for i in range(L)]
        self.resident_bytes = self.nbytes - self.all_expert_bytes

    # -- files ------------------------------------------------------------------------------
    def _map(self, path: str) -> mmap.mmap:
        mm = self._maps.get(path)
        if mm is None:
            fd, size = open_regular(path)
            try:
                if size < self._sizes.get(path, 0):
                    raise _shrank(path, self._sizes[path], size)
                if size == 0:
                    raise CheckpointError(f"{path}: empty file", hint="re-download this file")
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot map tensor file: {e.strerror or e}",
                                      hint="check the file and the disk") from None
            finally:
                os.close(fd)
            self._maps[path] = mm
            self._mapped.append((path, mm, size))
        return mm

    def _parse(self, path: Path):
        path = str(path)
        fd, size = open_regular(path)
        try:
            self._sizes[path] = size
            return parse_fd(path, fd, size)
        finally:
            os.close(fd)

    def _read(self, ref: ArrayRef) -> np.ndarray:
        """The array's bytes read into private memory (read-only), with the file's page-cache
        copy dropped afterwards; a short read is an error naming the file, never a SIGBUS."""
        dt = {"f4": "<f4", "i1": "i1", "bf16": "<u2", "u2": "<u2", "f2": "<f2", "u1": "u1"}[ref.dtype]
        n = ref.nbytes
        try:
            out = np.empty(n, dtype=np.uint8)
        except MemoryError:
            raise CheckpointError(f"{ref.path}: not enough memory to read its {n / 2**30:.1f} GiB array",
                                  hint="free memory, or check that the file belongs to this checkpoint") from None
        fd, size = open_regular(ref.path)
        try:
            if size < ref.offset + n:
                raise _shrank(ref.path, self._sizes.get(ref.path, ref.offset + n), size)
            view, done = memoryview(out), 0
            while done < n:
                k = os.preadv(fd, [view[done:done + _READ_CHUNK]], ref.offset + done)
                if k <= 0:
                    raise CheckpointError(
                        f"{ref.path}: short read at byte {ref.offset + done} ({n - done} bytes missing)",
                        hint="the file shrank or the disk failed; re-download it")
                done += k
            if n and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, ref.offset, n, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            raise CheckpointError(f"{ref.path}: cannot read tensor file: {e.strerror or e}",
                                  hint="check the file and the disk") from None
        finally:
            os.close(fd)
        a = out.view(dt).reshape(ref.shape)
        a.flags.writeable = False
        return a

    def array(self, ref: ArrayRef) -> np.ndarray:
        """The array, read-only (bf16 as uint16): a view of the memory map for the mapped expert
        files, a private copy read with pread for every other file."""
        mm = self._maps.get(ref.path)
        if mm is None:
            return self._read(ref)
        dt = {"f4": "<f4", "i1": "i1", "bf16": "<u2", "u2": "<u2", "f2": "<f2", "u1": "u1"}[ref.dtype]
        return np.frombuffer(mm, dtype=dt, count=math.prod(ref.shape), offset=ref.offset).reshape(ref.shape)

    def float_array(self, ref: ArrayRef) -> np.ndarray:
        """A float32 copy in RAM (for the small tensors: norms, router, scales), read with pread."""
        a = self._read(ref)
        if ref.dtype == "bf16":
            return bf16_to_f32(a)
        return np.array(a, dtype=np.float32)

    def qweight(self, ref: QuantizedRef) -> QWeight:
        return QWeight(self.array(ref.weight), np.ascontiguousarray(self.float_array(ref.scales)), ref)

    def embedding_rows(self, toks: np.ndarray) -> np.ndarray:
        """Emb[toks] float32 [T, D]."""
        return np.asarray(self.embeddings[toks], dtype=np.float32)

    def check_intact(self) -> None:
        """Raise CheckpointError naming the first mapped (expert) file that is shorter than it
        was at load: touching its pages would kill the process with SIGBUS. One fstat per file."""
        for path, mm, size in self._mapped:
            try:
                now = mm.size()
            except (ValueError, OSError):      # closed: nothing of it is mapped any more
                continue
            if now < size:
                raise _shrank(path, size, now)

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

    def expert_segments(self, layer: int, expert: int) -> list[list[tuple[str, int, int]]]:
        """expert_ranges as GGUFModel.expert_segments gives them: one segment per part."""
        return [[r] for r in self.expert_ranges(layer, expert)]

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert in the expert cache (its int8 weights; the scales stay in RAM)."""
        return self.config.expert_bytes

    @property
    def all_expert_bytes(self) -> int:
        """Bytes of every expert's int8 weights: the part of the files that stays mapped."""
        return self.config.all_expert_bytes

    @property
    def nbytes(self) -> int:
        """Total size of the tensor files, as they were at load."""
        return sum(self._sizes[str(p)] for p in self.files)

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:   # a numpy view still holds it; the OS unmaps at exit
                pass
        self._maps.clear()
        self._mapped.clear()

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
        try:
            return GrokConfig(vocab_size=V, emb_size=D, num_layers=L, num_experts=E, ffn_size=F,
                              num_q_heads=qs // d, num_kv_heads=ks // d, key_size=d,
                              embedding_multiplier_scale=math.sqrt(max(D, 1)), attn_output_multiplier=d ** -0.5,
                              num_selected_experts=max(1, min(2, E)))
        except ConfigError as e:       # the shapes imply sizes no supported model has
            raise CheckpointError(f"{self.ckpt_dir}: the tensor shapes imply {e.message}",
                                  hint="add the config.json that describes this checkpoint") from None

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


def _shrank(path: str, was: int, now: int) -> CheckpointError:
    return CheckpointError(f"{path}: the file shrank from {was} to {now} bytes after the checkpoint was opened",
                           hint="another program changed the checkpoint; restore the file and load it again")


def _lexists(p: Path) -> bool:
    try:
        os.lstat(p)
        return True
    except OSError:
        return False


def _find_ckpt_dir(path: Path) -> tuple[Path, Path]:
    hint = "pass the folder that contains ckpt-0/ (or ckpt-0/ itself)"
    try:
        if not path.exists():
            raise CheckpointError(f"no such checkpoint folder: {str(path)!r}", hint=hint)
        if (path / "ckpt-0").is_dir():
            return path, path / "ckpt-0"
        if path.is_dir():
            with os.scandir(path) as it:
                if any(e.name.startswith("tensor") and e.name.endswith("_000") for e in it):
                    return path.parent, path
    except (OSError, ValueError) as e:       # ValueError: a NUL in the path
        e = getattr(e, "strerror", None) or e
        raise CheckpointError(f"cannot open checkpoint folder {str(path)!r}: {e}", hint=hint) from None
    raise CheckpointError(f"no ckpt-0/ folder in {str(path)!r}", hint=hint)


_TENSOR = re.compile(r"tensor([0-9]{1,12})_000", re.ASCII)   # fullmatch; ASCII digits only
_MAX_FILES = 2 + 12 * 1024                                    # the config allows up to 1024 layers


def _list_tensor_files(ckpt_dir: Path) -> list[Path]:
    """tensor{i}_000 for i = 0..N-1, each index exactly once; anything else named tensor*_000
    is an error (a stray huge index, a non-ASCII digit, a duplicate), found without building
    a list as long as the largest index."""
    found: dict[int, Path] = {}
    try:
        with os.scandir(ckpt_dir) as it:
            names = [e.name for e in it]
    except OSError as e:
        raise CheckpointError(f"{ckpt_dir}: cannot list the folder: {e.strerror or e}",
                              hint="check that the checkpoint folder is readable") from None
    for name in names:
        if not (name.startswith("tensor") and name.endswith("_000")):
            continue
        m = _TENSOR.fullmatch(name)
        if m is None:
            raise CheckpointError(f"{ckpt_dir}: {name!r} is not a tensor file name (tensor<digits>_000)",
                                  hint="remove or rename the stray file")
        i = int(m.group(1))
        if i in found:
            a, b = sorted((found[i].name, name))
            raise CheckpointError(f"{ckpt_dir}: two files claim tensor index {i}: {a} and {b}",
                                  hint="remove the one that does not belong")
        found[i] = ckpt_dir / name
    if not found:
        raise CheckpointError(f"{ckpt_dir}: no tensorNNNNN_000 files", hint="the download is incomplete")
    n = len(found)
    if max(found) != n - 1:                      # not dense 0..n-1: name the first gap
        keys = sorted(found)
        gap = next(i for i, k in enumerate(keys) if k != i)
        beyond = n - gap
        top = found[keys[-1]].name
        more = (f"{beyond} file has a higher index: {top}" if beyond == 1
                else f"{beyond} files have higher indices, up to {top}")
        raise CheckpointError(f"{ckpt_dir}: tensor{gap:05d}_000 is missing ({more})",
                              hint="the download is incomplete (fetch the missing files), or remove a stray file")
    if n > _MAX_FILES:
        raise CheckpointError(f"{ckpt_dir}: {n} tensor files is more than any supported model has ({_MAX_FILES})",
                              hint="point at a single Grok-1 checkpoint folder")
    return [found[i] for i in range(n)]
