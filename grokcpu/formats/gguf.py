"""GGUF model files (llama.cpp's format), read in place: metadata, tensors, Grok-1's config.

    m = open_gguf("grok-1-Q8_0-00001-of-00009.gguf")   # any shard, any .partNofM piece, one file
    m.metadata["grok.block_count"]                      # key -> value
    t = m.tensors["blk.0.attn_q.weight"]                # type, numpy shape, offset, nbytes
    raw = m.data(t.name)                                # uint8 view into the map, zero copy
    m.expert_ranges(layer, expert)                      # [(file, offset, length)] x3: gate, up, down
    cfg = grok_config(m); check_grok_tensors(m, cfg)

Layouts: one file; llama.cpp's native shards `NAME-0000k-of-0000n.gguf` (each a complete GGUF
with `split.no/count/tensors.count`); and `NAME.gguf.partKofN` pieces cut by `split -b`, read as
one logical file: mapped at adjacent addresses when every cut falls on a page boundary, else one
map per piece, where a tensor that straddles a cut has byte segments but no single view.

We parse GGUF ourselves: gguf-py's GGUFReader maps one path with np.memmap (no .partNofM) and
trusts counts and lengths as it walks them. Here the header is read with pread (a file that
shrinks is an error, never a SIGBUS), every count is bounded by the bytes that could hold it
before anything is allocated, and every tensor is checked to lie inside the file, aligned, and
apart from the others. gguf-py serves for its constants (value and quant types, block sizes).

Tensor names (llama.cpp's grok) -> grokcpu (checkpoint.LayerWeights). GGUF shapes are numpy
order, [out, in]; ours are input-major [in, out], so matrices are transposed versions of ours.

| GGUF tensor                          | numpy shape  | grokcpu                  | ckpt-0 parameter      |
|--------------------------------------|--------------|--------------------------|-----------------------|
| token_embd.weight                    | [V, D]       | Checkpoint.embeddings    | in_out_embed (tied)   |
| output_norm.weight                   | [D]          | Checkpoint.final_norm    | language_model/rms_norm |
| output.weight (absent in Grok-1)     | [V, D]       | none: Grok-1 ties it     |                       |
| blk.N.attn_norm.weight               | [D]          | attn_norm                | rms_norm              |
| blk.N.attn_q.weight                  | [H*d, D]     | wq   (ours [D, H*d])     | query                 |
| blk.N.attn_k.weight                  | [G*d, D]     | wk   (ours [D, G*d])     | key                   |
| blk.N.attn_v.weight                  | [G*d, D]     | wv   (ours [D, G*d])     | value                 |
| blk.N.attn_output.weight             | [D, H*d]     | wo   (ours [H*d, D])     | linear                |
| blk.N.attn_output_norm.weight        | [D]          | attn_post_norm           | rms_norm_1            |
| blk.N.ffn_norm.weight                | [D]          | moe_norm                 | rms_norm_2            |
| blk.N.ffn_gate_inp.weight            | [E, D]       | router (ours [D, E])     | router                |
| blk.N.ffn_gate_exps.weight           | [E, F, D]    | w_gate (ours [E, D, F])  | moe/linear (GELU)     |
| blk.N.ffn_up_exps.weight             | [E, F, D]    | w_up   (ours [E, D, F])  | moe/linear_v          |
| blk.N.ffn_down_exps.weight           | [E, D, F]    | w_down (ours [E, F, D])  | moe/linear_1          |
| blk.N.ffn_{gate,up,down}.X.weight    | [F,D]/[D,F]  | expert X of the above    | (older files)         |
| blk.N.layer_output_norm.weight       | [D]          | moe_post_norm            | rms_norm_3            |

Metadata (`grok.` prefix) -> GrokConfig: context_length -> sequence_len, embedding_length ->
emb_size, block_count -> num_layers, expert_feed_forward_length (else feed_forward_length) ->
ffn_size, attention.head_count / head_count_kv -> num_q_heads / num_kv_heads, embedding_length /
head_count -> key_size, expert_count / expert_used_count -> num_experts / num_selected_experts,
rope.freq_base -> rope_base, attention.layer_norm_rms_epsilon -> rms_norm_eps; the scales
(spec GROK1.md §1, defaults when absent): embedding_scale 78.38.. -> embedding_multiplier_scale,
logit_scale 0.577.. -> output_multiplier_scale, attention.output_scale 0.0884.. ->
attn_output_multiplier, attn_logit_softcapping 30 -> attn_logit_cap. router_logit_softcapping is
read and ignored: neither the reference (§2.5) nor llama.cpp's Grok graph caps router logits.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import re
import struct
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys

from ..config import GrokConfig
from ..errors import CheckpointError, ConfigError
from .grok1_pickle import open_regular

MAGIC = b"GGUF"
MAX_HEADER_BYTES = 64 << 20     # metadata + tensor infos; Grok-1's (131072-token vocab) is ~4 MB
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 16
MAX_NAME = 63                   # ggml's GGML_MAX_NAME (64) less the NUL
MAX_DIMS = 4
MAX_PIECES = 1000
_INT64_MAX = (1 << 63) - 1

_SCALAR = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
           GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
           GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<B", GGUFValueType.UINT64: "<Q",
           GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}
_INTS = frozenset(t for t, f in _SCALAR.items() if f[1] in "BbHhIiQq" and t != GGUFValueType.BOOL)
_FLOATS = frozenset({GGUFValueType.FLOAT32, GGUFValueType.FLOAT64})

_SHARD = re.compile(r"(.+)-([0-9]{5})-of-([0-9]{5})\.gguf", re.ASCII)
_PIECE = re.compile(r"(.+)\.part([0-9]{1,4})of([0-9]{1,4})", re.ASCII)

_REDOWNLOAD = "the file is damaged or not a GGUF model; re-download it"


def _fail(label: str, what: str, hint: str = _REDOWNLOAD) -> CheckpointError:
    return CheckpointError(f"{label}: {what}", hint=hint)


# -- the bytes of one logical file ----------------------------------------------------------------

class _Space:
    """One logical file made of 1+ pieces laid end to end: pread across pieces, byte segments,
    and zero-copy read-only views (mapped on first use)."""

    def __init__(self, paths: list[str]):
        self.label = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more pieces)"
        self.paths, self.fds, self.sizes, self.starts = [], [], [], []
        self._flat = None          # np.uint8 over the whole logical file (adjacent maps)
        self._maps = None          # one mmap per piece
        total = 0
        try:
            for p in paths:
                fd, size = open_regular(p, "GGUF file")
                self.fds.append(fd)
                if size == 0:
                    raise _fail(p, "empty file")
                self.paths.append(p)
                self.sizes.append(size)
                self.starts.append(total)
                total += size
        except BaseException:
            self.close()
            raise
        self.size = total

    def _piece(self, off: int) -> int:
        i = len(self.starts) - 1
        while self.starts[i] > off:
            i -= 1
        return i

    def _segments(self, off: int, n: int) -> list[tuple[int, int, int]]:
        """(piece, offset in that piece, length) covering logical bytes [off, off + n)."""
        out = []
        while n > 0:
            i = self._piece(off)
            k = min(n, self.starts[i] + self.sizes[i] - off)
            out.append((i, off - self.starts[i], k))
            off, n = off + k, n - k
        return out

    def segments(self, off: int, n: int) -> list[tuple[str, int, int]]:
        """(file, offset in that file, length) covering logical bytes [off, off + n)."""
        return [(self.paths[i], foff, k) for i, foff, k in self._segments(off, n)]

    def pread(self, off: int, n: int) -> bytes:
        parts = []
        for i, foff, k in self._segments(off, n):
            try:
                b = os.pread(self.fds[i], k, foff)
            except OSError as e:
                raise _fail(self.paths[i], f"cannot read: {e.strerror or e}", "check the file and the disk") from None
            if len(b) < k:
                raise _fail(self.paths[i], f"the file shrank while it was read (byte {foff + len(b)})",
                            "another program is changing the file; wait for it, then retry")
            parts.append(b)
        return b"".join(parts)

    def view(self, off: int, n: int, what: str) -> np.ndarray:
        if self._flat is None and self._maps is None:
            self._map()
        if self._flat is not None:
            return self._flat[off:off + n]
        i = self._piece(off)
        if off + n > self.starts[i] + self.sizes[i]:
            raise _fail(self.label, f"{what} straddles the cut between {Path(self.paths[i]).name} and "
                        f"{Path(self.paths[i + 1]).name}, which is not on a page boundary",
                        "read it by segments, or join the pieces (cat) into one .gguf")
        a = np.frombuffer(self._maps[i], dtype=np.uint8, count=n, offset=off - self.starts[i])
        return a

    def _map(self) -> None:
        if len(self.paths) > 1 and sys.platform.startswith("linux") and \
                all(s % mmap.PAGESIZE == 0 for s in self.starts):
            self._flat = _adjacent_map(self)
            if self._flat is not None:
                return
        maps = []
        try:
            for p, fd in zip(self.paths, self.fds):
                maps.append(mmap.mmap(fd, 0, access=mmap.ACCESS_READ))
        except OSError as e:
            for m in maps:
                m.close()
            raise _fail(p, f"cannot map: {e.strerror or e}", "check the file and the disk") from None
        self._maps = maps

    def check_intact(self) -> None:
        for p, fd, size in zip(self.paths, self.fds, self.sizes):
            try:
                now = os.fstat(fd).st_size
            except (OSError, ValueError):
                continue
            if now < size:
                raise _fail(p, f"the file shrank from {size} to {now} bytes after it was opened",
                            "another program changed the model; restore the file and load it again")

    def close(self) -> None:
        for m in self._maps or ():
            try:
                m.close()
            except BufferError:        # a numpy view still holds it; the OS unmaps at exit
                pass
        self._maps = None
        self._flat = None              # the region unmaps itself when its last view is gone
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


class _Region:
    """An address range holding the pieces' maps side by side; unmapped when garbage."""

    def __init__(self, libc, base: int, length: int):
        self.libc, self.base, self.length = libc, base, length

    def __del__(self):
        self.libc.munmap(ctypes.c_void_p(self.base), ctypes.c_size_t(self.length))


def _adjacent_map(space: _Space) -> np.ndarray | None:
    """Map every piece at base + its logical start (MAP_FIXED inside one reserved range), so a
    tensor across a cut is one contiguous view. None if the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    length = -(-space.size // mmap.PAGESIZE) * mmap.PAGESIZE
    map_fixed, map_noreserve = 0x10, 0x4000          # Linux values on x86-64 and arm64; 0: PROT_NONE
    base = libc.mmap(None, length, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | map_noreserve, -1, 0)
    if base in (None, ctypes.c_void_p(-1).value):
        return None
    region = _Region(libc, base, length)
    for fd, start, size in zip(space.fds, space.starts, space.sizes):
        got = libc.mmap(base + start, size, mmap.PROT_READ, mmap.MAP_SHARED | map_fixed, fd, 0)
        if got != base + start:
            return None                                   # region's __del__ unmaps what was mapped
    buf = (ctypes.c_ubyte * space.size).from_address(base)
    buf._region = region                                  # views keep buf, buf keeps the maps
    flat = np.frombuffer(buf, dtype=np.uint8)
    flat.flags.writeable = False
    return flat


# -- the header ----------------------------------------------------------------------------------

class _Cursor:
    """Sequential reads of the header through pread, never past the file or MAX_HEADER_BYTES."""

    def __init__(self, space: _Space):
        self.space, self.label = space, space.label
        self.limit = min(space.size, MAX_HEADER_BYTES)
        self.buf = bytearray()
        self.pos = 0

    def left(self) -> int:
        return self.limit - self.pos

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > self.limit:
            if end > self.space.size:
                raise _fail(self.label, f"truncated: {what} at byte {self.pos} needs {n} bytes, "
                            f"the file has {self.space.size}")
            raise _fail(self.label, f"{what} at byte {self.pos} lies beyond {MAX_HEADER_BYTES} bytes of header")
        if end > len(self.buf):
            want = min(self.limit, max(end, 2 * len(self.buf), 1 << 16))
            self.buf += self.space.pread(len(self.buf), want - len(self.buf))
        out = bytes(self.buf[self.pos:end])
        self.pos = end
        return out

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, strict: bool) -> str:
        n = self.uint("<Q", f"length of {what}")
        if n > self.left():
            raise _fail(self.label, f"{what} at byte {self.pos} claims {n} bytes, more than the "
                        f"{self.left()} bytes of header left")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8", "strict" if strict else "surrogateescape")
        except UnicodeDecodeError:
            raise _fail(self.label, f"{what} at byte {self.pos - n} is not UTF-8") from None

    def value(self, vtype: int, what: str, nested: bool = False):
        if vtype in _SCALAR:
            v = self.uint(_SCALAR[vtype], what)
            if vtype == GGUFValueType.BOOL:
                if v > 1:
                    raise _fail(self.label, f"{what}: boolean byte {v} is neither 0 nor 1")
                return bool(v)
            return v
        if vtype == GGUFValueType.STRING:
            return self.string(what, strict=False)
        if vtype == GGUFValueType.ARRAY:
            if nested:
                raise _fail(self.label, f"{what}: arrays of arrays are not supported")
            sub = self.uint("<I", f"element type of {what}")
            n = self.uint("<Q", f"length of {what}")
            if sub in _SCALAR:
                size = struct.calcsize(_SCALAR[sub])
            elif sub in (GGUFValueType.STRING, GGUFValueType.ARRAY):
                size = 8 if sub == GGUFValueType.STRING else 12
            else:
                raise _fail(self.label, f"{what}: unknown element type {sub}")
            if n * size > self.left():
                raise _fail(self.label, f"{what}: an array of {n} elements needs at least {n * size} "
                            f"bytes, more than the {self.left()} bytes of header left")
            if sub in _SCALAR:
                a = np.frombuffer(self.take(n * size, what), dtype=np.dtype(_SCALAR[sub]))
                if sub == GGUFValueType.BOOL:
                    if n and a.max() > 1:
                        raise _fail(self.label, f"{what}: a boolean element is neither 0 nor 1")
                    a = a.astype(bool)
                return a
            return [self.value(sub, f"{what}[{i}]", nested=True) for i in range(n)]
        raise _fail(self.label, f"{what}: unknown value type {vtype}")


@dataclass(frozen=True)
class Tensor:
    """Where one tensor lies: `offset` is absolute in its (logical) file; shape in numpy order."""
    name: str
    type: GGMLQuantizationType
    shape: tuple
    offset: int
    nbytes: int
    shard: int


@dataclass
class _Shard:
    space: _Space
    version: int
    metadata: dict
    types: dict                    # key -> GGUFValueType of its value
    tensors: list                 # Tensor, with .shard = this shard's number
    alignment: int
    data_start: int


def _parse(space: _Space, shard: int) -> _Shard:
    c, label = _Cursor(space), space.label
    magic = c.take(4, "magic")
    if magic != MAGIC:
        raise _fail(label, f"not a GGUF file (starts with {magic!r}, not b'GGUF')",
                    "pass a .gguf model file, or a ckpt-0 checkpoint folder")
    version = c.uint("<I", "version")
    if version not in (2, 3):
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        why = ("a big-endian GGUF, which is not supported" if swapped in (1, 2, 3) else
               "GGUF version 1, from before August 2023" if version == 1 else f"unknown GGUF version {version}")
        raise _fail(label, why, "convert the model again with a current llama.cpp")
    n_tensors = c.uint("<Q", "tensor count")
    n_kv = c.uint("<Q", "metadata count")
    # smallest possible entries: key (8+1) + type (4) + a u8 value; name (8+1) + 1 dim + type + offset
    if n_kv > MAX_KV or n_tensors > MAX_TENSORS or 14 * n_kv + 33 * n_tensors > c.left():
        raise _fail(label, f"claims {n_kv} metadata entries and {n_tensors} tensors, more than "
                    f"its {c.left()} bytes of header can hold")
    meta, types = {}, {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}", strict=True)
        if key in meta:
            raise _fail(label, f"metadata key {key!r} appears twice")
        vtype = c.uint("<I", f"type of {key!r}")
        meta[key] = c.value(vtype, f"metadata {key!r}")
        types[key] = vtype
    align = meta.get(Keys.General.ALIGNMENT, 32)
    if types.get(Keys.General.ALIGNMENT, GGUFValueType.UINT32) not in _INTS or not (
            1 <= align <= 1 << 30 and align & (align - 1) == 0):
        raise _fail(label, f"general.alignment = {align!r} is not a power of two")
    tensors, seen = [], set()
    for i in range(n_tensors):
        name = c.string(f"tensor name #{i}", strict=True)
        if not 1 <= len(name) <= MAX_NAME:
            raise _fail(label, f"tensor name #{i} has {len(name)} characters (1..{MAX_NAME} allowed)")
        if name in seen:
            raise _fail(label, f"tensor {name!r} appears twice")
        seen.add(name)
        nd = c.uint("<I", f"rank of {name!r}")
        if not 1 <= nd <= MAX_DIMS:
            raise _fail(label, f"tensor {name!r} has {nd} dimensions (1..{MAX_DIMS} allowed)")
        ne = [c.uint("<Q", f"dimension of {name!r}") for _ in range(nd)]
        if min(ne) < 1 or math.prod(ne) > _INT64_MAX:
            raise _fail(label, f"tensor {name!r} has impossible dimensions {ne}")
        t = c.uint("<I", f"type of {name!r}")
        try:
            qt = GGMLQuantizationType(t)
            block, tsize = GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise _fail(label, f"tensor {name!r} has unknown ggml type {t}",
                        "the file needs a newer reader, or it is damaged") from None
        if ne[0] % block:
            raise _fail(label, f"tensor {name!r}: rows of {ne[0]} are not whole {qt.name} blocks of {block}")
        nbytes = math.prod(ne[1:]) * (ne[0] // block) * tsize
        off = c.uint("<Q", f"offset of {name!r}")
        if off % align:
            raise _fail(label, f"tensor {name!r}: data offset {off} is not a multiple of the alignment {align}")
        tensors.append((name, qt, tuple(reversed(ne)), off, nbytes))
    data_start = -(-c.pos // align) * align
    out = []
    for name, qt, shape, off, nbytes in tensors:
        if data_start + off + nbytes > space.size:
            raise _fail(label, f"tensor {name!r}: its {nbytes} bytes at data offset {off} run past the end "
                        f"of the {space.size}-byte file", "the download is incomplete or damaged; re-download it")
        out.append(Tensor(name, qt, shape, data_start + off, nbytes, shard))
    ordered = sorted(out, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if b.offset < a.offset + a.nbytes:
            raise _fail(label, f"tensors {a.name!r} and {b.name!r} overlap")
    return _Shard(space, version, meta, types, out, align, data_start)


def _parse_space(paths: list[str], shard: int) -> _Shard:
    space = _Space(paths)
    try:
        try:
            return _parse(space, shard)
        except (struct.error, ValueError, OverflowError, MemoryError) as e:   # a check we missed
            raise _fail(space.label, f"malformed GGUF header ({type(e).__name__}: {e})") from None
    except BaseException:
        space.close()
        raise


# -- layouts -------------------------------------------------------------------------------------

def _pieces(path: Path) -> list[str]:
    """The pieces of `NAME.partKofN` (any K given), in order; any other path alone."""
    m = _PIECE.fullmatch(path.name)
    if not m:
        return [str(path)]
    base, n = m.group(1), int(m.group(3))
    if not 1 <= n <= MAX_PIECES or not 1 <= int(m.group(2)) <= n:
        raise _fail(str(path), f"piece {m.group(2)} of {m.group(3)} is not a valid piece number",
                    "pass the first piece, NAME.part1ofN")
    found: dict[int, str] = {}
    try:
        names = os.listdir(path.parent)
    except OSError as e:
        raise _fail(str(path.parent), f"cannot list the folder: {e.strerror or e}", "check the folder") from None
    for name in names:
        q = _PIECE.fullmatch(name)
        if q and q.group(1) == base and int(q.group(3)) == n:
            k = int(q.group(2))
            if k in found:
                raise _fail(str(path.parent / name), f"two files claim piece {k} of {n}: "
                            f"{Path(found[k]).name} and {name}", "remove the one that does not belong")
            found[k] = str(path.parent / name)
    missing = [k for k in range(1, n + 1) if k not in found]
    if missing:
        raise _fail(str(path.parent / f"{base}.part{missing[0]}of{n}"),
                    f"missing piece {missing[0]} of {n}" + (f" ({len(missing)} missing)" if len(missing) > 1 else ""),
                    "download every piece into the same folder")
    return [found[k] for k in range(1, n + 1)]


def _split_info(sh: _Shard) -> tuple[int, int, int] | None:
    """(split.no, split.count, split.tensors.count), or None for an unsplit file."""
    keys = (Keys.Split.LLM_KV_SPLIT_NO, Keys.Split.LLM_KV_SPLIT_COUNT, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
    if keys[1] not in sh.metadata:
        return None
    vals = []
    for k in keys:
        if sh.types.get(k) not in _INTS:
            raise _fail(sh.space.label, f"split metadata {k!r} is missing or not an integer")
        vals.append(sh.metadata[k])
    return tuple(vals)


class GGUFModel:
    """A GGUF model opened: merged metadata and tensor table over all its shards."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.shards: list[_Shard] = []
        try:
            first = _parse_space(_pieces(path), 0)
            self.shards.append(first)
            info = _split_info(first)
            if info is not None and info[1] > 1:
                self._open_shards(path, first, info)
        except BaseException:
            self.close()
            raise
        self.metadata: dict = self.shards[0].metadata
        self.types: dict = self.shards[0].types
        self.tensors: dict[str, Tensor] = {}
        for sh in self.shards:
            for t in sh.tensors:
                if t.name in self.tensors:
                    self.close()
                    raise _fail(sh.space.label, f"tensor {t.name!r} is also in shard {self.tensors[t.name].shard + 1}",
                                "the shards come from different conversions; download one set")
                self.tensors[t.name] = t
        info = _split_info(self.shards[0])
        if info is not None and info[2] != len(self.tensors):
            self.close()
            raise _fail(self.label, f"the shards hold {len(self.tensors)} tensors, split.tensors.count says {info[2]}",
                        "a shard is damaged or from another conversion; re-download them")

    def _open_shards(self, path: Path, first: _Shard, info) -> None:
        """Open the other shards of `first` (self.shards holds each as soon as it is open)."""
        no, count, _ = info
        m = _SHARD.fullmatch(path.name)
        if not m or int(m.group(3)) != count or int(m.group(2)) != no + 1:
            raise _fail(str(path), f"is shard {no + 1} of {count}, but its name is not "
                        f"NAME-{no + 1:05d}-of-{count:05d}.gguf", "keep the shards' original names, all in one folder")
        names = [path.parent / f"{m.group(1)}-{k:05d}-of-{count:05d}.gguf" for k in range(1, count + 1)]
        for k, p in enumerate(names):
            if k != no and not os.path.lexists(p):
                raise _fail(str(p), f"missing shard {k + 1} of {count}", "download every shard into the same folder")
        shards = []
        for k, p in enumerate(names):
            if k == no:
                sh = first
                sh.tensors = [replace(t, shard=k) for t in sh.tensors]
            else:
                sh = _parse_space([str(p)], k)
                self.shards.append(sh)
            got = _split_info(sh)
            if got is None or got[0] != k or got[1:] != info[1:]:
                raise _fail(sh.space.label, f"its split metadata (no, count, tensors) = {got} does not make it "
                            f"shard {k + 1} of {count} with {info[2]} tensors",
                            "the shards come from different conversions; download one set")
            shards.append(sh)
        self.shards = shards

    # -- tensors -----------------------------------------------------------------------------
    def tensor(self, name: str) -> Tensor:
        t = self.tensors.get(name)
        if t is None:
            raise _fail(self.label, f"has no tensor {name!r}", "this file is not a complete Grok-1 GGUF")
        return t

    def data(self, name: str) -> np.ndarray:
        """The tensor's raw (quantized) bytes: a read-only uint8 view of the map, zero copy."""
        t = self.tensor(name)
        return self.shards[t.shard].space.view(t.offset, t.nbytes, f"tensor {name!r}")

    def read(self, name: str) -> np.ndarray:
        """The tensor's raw bytes read with pread into private memory (for the small tensors:
        a file truncated later cannot SIGBUS the process through them)."""
        t = self.tensor(name)
        return np.frombuffer(self.shards[t.shard].space.pread(t.offset, t.nbytes), dtype=np.uint8)

    def ranges(self, name: str, index: int | None = None) -> list[tuple[str, int, int]]:
        """(file, offset, length) segments of a tensor, or of its `index`-th outermost slice."""
        t = self.tensor(name)
        off, n = t.offset, t.nbytes
        if index is not None:
            if not 0 <= index < t.shape[0]:
                raise _fail(self.label, f"tensor {name!r} has {t.shape[0]} slices, not {index + 1}")
            n //= t.shape[0]
            off += index * n
        return self.shards[t.shard].space.segments(off, n)

    def expert_segments(self, layer: int, expert: int) -> list[list[tuple[str, int, int]]]:
        """Byte segments of expert `expert` of layer `layer`: [gate, up, down], merged
        (`ffn_*_exps`, experts outermost) or one tensor per expert (`ffn_*.E`)."""
        out = []
        for part in ("gate", "up", "down"):
            merged = f"blk.{layer}.ffn_{part}_exps.weight"
            if merged in self.tensors:
                out.append(self.ranges(merged, expert))
            else:
                out.append(self.ranges(f"blk.{layer}.ffn_{part}.{expert}.weight"))
        return out

    def expert_ranges(self, layer: int, expert: int) -> list[tuple[str, int, int]]:
        """(file, offset, length) of the expert's gate, up and down bytes, as
        Checkpoint.expert_ranges; an error if a range straddles a .partNofM cut."""
        out = []
        for part, segs in zip(("gate", "up", "down"), self.expert_segments(layer, expert)):
            if len(segs) != 1:
                raise _fail(self.label, f"expert {expert} of layer {layer} ({part}) straddles a piece boundary",
                            "use expert_segments, or join the pieces (cat) into one .gguf")
            out.append(segs[0])
        return out

    @property
    def expert_layout(self) -> str:
        return "merged" if any(n.endswith("_exps.weight") for n in self.tensors) else "per-expert"

    # -- files -------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return self.shards[0].space.label if self.shards else "GGUF"

    @property
    def files(self) -> list[str]:
        return [p for sh in self.shards for p in sh.space.paths]

    @property
    def nbytes(self) -> int:
        return sum(sh.space.size for sh in self.shards)

    def check_intact(self) -> None:
        for sh in self.shards:
            sh.space.check_intact()

    def close(self) -> None:
        for sh in self.shards:
            sh.space.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_gguf(path: str | os.PathLike) -> GGUFModel:
    return GGUFModel(path)


def detect_format(path: str | os.PathLike) -> str:
    """"gguf" (a GGUF file, shard or .partNofM piece, by its magic) or "ckpt-0" (a folder)."""
    p = Path(path)
    try:
        if p.is_dir():
            return "ckpt-0"
        first = _pieces(p)[0]
        fd, _ = open_regular(first, "model file")
        try:
            magic = os.pread(fd, 4, 0)
        finally:
            os.close(fd)
    except OSError as e:
        raise CheckpointError(f"cannot open model {str(p)!r}: {e.strerror or e}",
                              hint="pass a .gguf file or a folder holding ckpt-0/") from None
    if magic == MAGIC:
        return "gguf"
    raise CheckpointError(f"{p}: neither a GGUF file nor a checkpoint folder (starts with {magic!r})",
                          hint="pass a .gguf file or a folder holding ckpt-0/")


# -- Grok-1 --------------------------------------------------------------------------------------

ARCH = "grok"
# (GrokConfig field, key without the "grok." prefix) for the sizes, all required
_SIZES = (("sequence_len", "context_length"), ("emb_size", "embedding_length"),
          ("num_layers", "block_count"), ("num_q_heads", "attention.head_count"),
          ("num_kv_heads", "attention.head_count_kv"), ("num_experts", "expert_count"),
          ("num_selected_experts", "expert_used_count"))
# (GrokConfig field, key, default: Grok-1's value, spec GROK1.md §1)
_FLOATS_KEYS = (("embedding_multiplier_scale", "embedding_scale", 78.38367176906169),
                ("output_multiplier_scale", "logit_scale", 0.5773502691896257),
                ("attn_output_multiplier", "attention.output_scale", 0.08838834764831845),
                ("attn_logit_cap", "attn_logit_softcapping", 30.0),
                ("rope_base", "rope.freq_base", 10000.0),
                ("rms_norm_eps", "attention.layer_norm_rms_epsilon", 1e-5))


def _meta(m: GGUFModel, key: str, kinds, default=None, required: bool = False):
    if key not in m.metadata:
        if required:
            raise _fail(m.label, f"metadata {key!r} is missing", "this file is not a complete Grok-1 GGUF")
        return default
    if m.types[key] not in kinds:
        raise _fail(m.label, f"metadata {key!r} has type {GGUFValueType(m.types[key]).name}, not a number")
    return m.metadata[key]


def grok_config(m: GGUFModel) -> GrokConfig:
    """GrokConfig from `grok.*` metadata, each value checked as for ckpt-0 (GrokConfig's bounds).
    A float key that equals Grok-1's constant in float32 (what GGUF stores) gives the exact
    constant; a key for something the reference does not do (final logit cap, shared experts,
    partial or scaled RoPE) is an error, not ignored."""
    arch = m.metadata.get(Keys.General.ARCHITECTURE)
    if arch != ARCH:
        raise _fail(m.label, f"general.architecture is {arch!r}, not 'grok'", "pass a Grok-1 GGUF model")
    kw = {f: _meta(m, f"{ARCH}.{k}", _INTS, required=True) for f, k in _SIZES}
    ffn = _meta(m, f"{ARCH}.expert_feed_forward_length", _INTS)
    kw["ffn_size"] = ffn if ffn is not None else _meta(m, f"{ARCH}.feed_forward_length", _INTS, required=True)
    for f, k, default in _FLOATS_KEYS:
        v = float(_meta(m, f"{ARCH}.{k}", _FLOATS | _INTS, default))
        kw[f] = default if np.float32(v) == np.float32(default) else v
    if kw["num_q_heads"] < 1 or kw["emb_size"] % kw["num_q_heads"]:
        raise _fail(m.label, f"embedding_length {kw['emb_size']} is not a multiple of head_count {kw['num_q_heads']}")
    d = kw["key_size"] = kw["emb_size"] // kw["num_q_heads"]
    # (key, Grok-1's value, values that mean the same: llama.cpp reads 0 as "no scaling")
    fixed = ((f"{ARCH}.rope.dimension_count", d, ()), (f"{ARCH}.attention.key_length", d, ()),
             (f"{ARCH}.attention.value_length", d, ()), (f"{ARCH}.final_logit_softcapping", 0.0, ()),
             (f"{ARCH}.expert_shared_count", 0, ()), (f"{ARCH}.rope.scaling.factor", 1.0, (0.0,)))
    for key, want, same in fixed:
        got = m.metadata.get(key, want)
        if isinstance(got, (str, list, np.ndarray)) or (got != want and got not in same):
            raise _fail(m.label, f"metadata {key} = {got!r}, but Grok-1 (spec GROK1.md §2) has {want!r}",
                        "this model is not Grok-1; grokcpu runs Grok-1's architecture only")
    if m.metadata.get(f"{ARCH}.rope.scaling.type", "none") != "none":
        raise _fail(m.label, f"metadata {ARCH}.rope.scaling.type = {m.metadata[f'{ARCH}.rope.scaling.type']!r}; "
                    "Grok-1 has no RoPE scaling", "this model is not Grok-1")
    vocab = m.metadata.get("tokenizer.ggml.tokens")
    emb = m.tensors.get("token_embd.weight")
    kw["vocab_size"] = len(vocab) if isinstance(vocab, list) else (emb.shape[0] if emb else 131072)
    kw["pad_token"] = _meta(m, "tokenizer.ggml.padding_token_id", _INTS, 0)
    kw["eos_token"] = _meta(m, "tokenizer.ggml.eos_token_id", _INTS, 2)
    try:
        return GrokConfig(**kw)
    except ConfigError as e:
        raise _fail(m.label, f"metadata: {e.message}", "this file is not a valid Grok-1 GGUF") from None


def grok_tensor_shapes(cfg: GrokConfig, layout: str = "merged") -> dict[str, tuple]:
    """Every tensor a Grok-1 GGUF must hold, with its numpy shape (the table above)."""
    V, D, E, F = cfg.vocab_size, cfg.emb_size, cfg.num_experts, cfg.ffn_size
    out = {"token_embd.weight": (V, D), "output_norm.weight": (D,)}
    for n in range(cfg.num_layers):
        b = f"blk.{n}."
        out.update({b + "attn_norm.weight": (D,), b + "attn_q.weight": (cfg.q_size, D),
                    b + "attn_k.weight": (cfg.kv_size, D), b + "attn_v.weight": (cfg.kv_size, D),
                    b + "attn_output.weight": (D, cfg.q_size), b + "attn_output_norm.weight": (D,),
                    b + "ffn_norm.weight": (D,), b + "ffn_gate_inp.weight": (E, D),
                    b + "layer_output_norm.weight": (D,)})
        for part, shape in (("gate", (F, D)), ("up", (F, D)), ("down", (D, F))):
            if layout == "merged":
                out[f"{b}ffn_{part}_exps.weight"] = (E, *shape)
            else:
                out.update({f"{b}ffn_{part}.{e}.weight": shape for e in range(E)})
    return out


def check_grok_tensors(m: GGUFModel, cfg: GrokConfig) -> None:
    """Raise CheckpointError naming the first missing or misshaped tensor (as llama.cpp's
    loader does before any compute); an optional untied `output.weight` must be [V, D]."""
    want = grok_tensor_shapes(cfg, m.expert_layout)
    if "output.weight" in m.tensors:
        want["output.weight"] = (cfg.vocab_size, cfg.emb_size)
    for name, shape in want.items():
        t = m.tensor(name)
        if t.shape != shape:
            raise _fail(m.label, f"tensor {name!r} has shape {list(t.shape)}, the config needs {list(shape)}",
                        "the file does not match its own metadata; re-download or re-convert it")


def tokenizer_proto(m: GGUFModel) -> bytes:
    """A SentencePiece ModelProto rebuilt from `tokenizer.ggml.*` (model "llama")."""
    from ..tokenizer import sentencepiece_proto
    md = m.metadata
    if md.get("tokenizer.ggml.model") != "llama":
        raise _fail(m.label, f"tokenizer.ggml.model is {md.get('tokenizer.ggml.model')!r}, not 'llama' (SentencePiece)",
                    "pass --tokenizer PATH to Grok-1's tokenizer.model")
    tokens, scores, ttypes = (md.get(f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    if not (isinstance(tokens, list) and isinstance(scores, np.ndarray) and isinstance(ttypes, np.ndarray)
            and scores.dtype.kind == "f" and ttypes.dtype.kind in "iu" and len(tokens) == len(scores) == len(ttypes)
            and all(isinstance(t, str) for t in tokens)):
        raise _fail(m.label, "tokenizer.ggml.tokens/scores/token_type are missing or do not match",
                    "pass --tokenizer PATH to Grok-1's tokenizer.model")
    ids = {k: _meta(m, f"tokenizer.ggml.{k}_token_id", _INTS, -1)
           for k in ("unknown", "bos", "eos", "padding")}
    for k, v in ids.items():
        if v >= len(tokens):
            raise _fail(m.label, f"tokenizer.ggml.{k}_token_id = {v} is not below the {len(tokens)} tokens")
    if ids["unknown"] < 0 and (ttypes == 2).any():
        ids["unknown"] = int(np.flatnonzero(ttypes == 2)[0])
    ttypes = ttypes.astype(np.int64)
    byte = np.flatnonzero(ttypes == 6)
    if byte.size:
        # SentencePiece puts its meta pieces (control, user-defined) before the byte pieces, and
        # llama.cpp's converter writes user-defined ones as normal: restore them (Grok-1: ids 4..68)
        head = ttypes[:byte[0]]
        head[head == 1] = 4
    space_prefix = md.get("tokenizer.ggml.add_space_prefix", True)
    return sentencepiece_proto(
        [t.encode("utf-8", "surrogateescape") for t in tokens], scores.astype(np.float32), ttypes,
        unk=ids["unknown"], bos=ids["bos"], eos=ids["eos"], pad=ids["padding"],
        add_dummy_prefix=bool(space_prefix))
