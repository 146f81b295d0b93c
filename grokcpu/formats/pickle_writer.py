"""Write one file of the released Grok-1 `ckpt-0/` format, streaming, without `pickle.dump`.

Every released tensor file is what CPython's `pickle.dump(obj, f, protocol=4)` wrote for either a
float32 `numpy.ndarray` (numpy 1.x) or a `__main__.QuantizedWeight8bit` holding
`{"weight": int8 ndarray, "scales": ml_dtypes.bfloat16 ndarray}`. This module emits that exact
opcode stream itself -- byte for byte what the pickler would have written, including protocol-4
FRAMEs, MEMOIZE / BINGET reuse and the choice of SHORT_BINBYTES / BINBYTES / BINBYTES8 -- but
takes the array payloads as an iterable of chunks, so a multi-GB tensor never sits in memory.
Neither numpy arrays of the payload nor `ml_dtypes` are needed.

How the pickler lays the bytes out (CPython 3.8+, C and pure-Python picklers alike):
* `PROTO 4` is written before framing starts; everything else goes into frames.
* At the start of every `save(obj)` call the current frame is committed (flushed with a
  `FRAME <u64 length>` header) if it holds >= 64 KiB.
* A bytes payload of >= 64 KiB is written outside any frame: the current frame is committed,
  then the opcode + length header and the payload go straight to the file; a new frame starts
  after it.
* A frame shorter than 4 bytes is written without a FRAME header; the last frame (which ends
  with STOP) is committed when the dump ends.
* Objects are memoized (MEMOIZE) in the order the pickler finishes them; a second reference to
  the same object is a BINGET. Within these files that happens for the globals, the interned
  module-name strings, the cached one-byte `b'b'` and one-character byte-order strings.

The functions write to `path + '.tmp'` and `os.replace` it onto `path` only when complete, and
return the size and sha256 of the file, computed while it was written.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Iterable, NamedTuple

import numpy as np

__all__ = ["WriteResult", "write_ndarray", "write_quantized", "float32_to_bf16_bits",
           "ndarray_payload_nbytes", "DTYPES"]

# pickle opcodes used here
_PROTO, _FRAME, _STOP = b"\x80", b"\x95", b"."
_MEMOIZE, _BINGET, _LONG_BINGET = b"\x94", b"h", b"j"
_SHORT_BINUNICODE, _BINUNICODE = b"\x8c", b"X"
_SHORT_BINBYTES, _BINBYTES, _BINBYTES8 = b"C", b"B", b"\x8e"
_BININT1, _BININT2, _BININT, _LONG1 = b"K", b"M", b"J", b"\x8a"
_NONE, _NEWTRUE, _NEWFALSE = b"N", b"\x88", b"\x89"
_MARK, _TUPLE, _EMPTY_TUPLE = b"(", b"t", b")"
_TUPLE1, _TUPLE2, _TUPLE3 = b"\x85", b"\x86", b"\x87"
_EMPTY_DICT, _SETITEM, _SETITEMS = b"}", b"s", b"u"
_STACK_GLOBAL, _REDUCE, _BUILD, _NEWOBJ = b"\x93", b"R", b"b", b"\x81"

_FRAME_SIZE_TARGET = 64 * 1024      # pickle._Framer._FRAME_SIZE_TARGET / FRAME_SIZE_TARGET in C
_FRAME_SIZE_MIN = 4                 # shorter frames get no FRAME header
_BINBYTES8_MIN = 1 << 32            # payloads of this size or more use BINBYTES8

# The dtypes this format uses: numpy's dtype.__reduce__ is (numpy.dtype, (arg, False, True), state)
# with state (3, byteorder, None, None, None, elsize, alignment, flags); for builtin types
# elsize/alignment are -1, for the user-defined ml_dtypes.bfloat16 they are 2 / 2 and flags 64.
DTYPES = {
    # name: (reduce arg: str for builtin types, (module, name) for a global type,
    #        byteorder char, elsize, alignment, flags, itemsize)
    "<f4": ("f4", "<", -1, -1, 0, 4),
    "|i1": ("i1", "|", -1, -1, 0, 1),
    "bfloat16": (("ml_dtypes", "bfloat16"), "<", 2, 2, 64, 2),
}
_DTYPE_ALIASES = {"f4": "<f4", "float32": "<f4", "i1": "|i1", "<i1": "|i1", "int8": "|i1",
                  "bf16": "bfloat16", "<bf16": "bfloat16"}

_RECONSTRUCT = ("numpy.core.multiarray", "_reconstruct")   # numpy 1.x module path, as released
_NDARRAY = ("numpy", "ndarray")
_DTYPE = ("numpy", "dtype")
_QUANTIZED = ("__main__", "QuantizedWeight8bit")


class WriteResult(NamedTuple):
    path: str
    size: int        # bytes in the file
    sha256: str      # hex digest of the whole file


def _dtype_name(dtype_str: str) -> str:
    name = _DTYPE_ALIASES.get(dtype_str, dtype_str)
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype_str!r}; expected one of {sorted(DTYPES)}")
    return name


def _check_shape(shape) -> tuple:
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    return shape


def ndarray_payload_nbytes(shape, dtype_str: str) -> int:
    """Payload bytes of a C-order array of this shape and dtype."""
    n = DTYPES[_dtype_name(dtype_str)][5]
    for s in _check_shape(shape):
        n *= s
    return n


def float32_to_bf16_bits(a) -> np.ndarray:
    """bfloat16 bit patterns (uint16, same shape) of float32 values, rounded to nearest even.

    NaNs stay NaNs (quiet, sign kept); values beyond the bf16 range round to +-inf.
    """
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        rounded = np.where(nan, (u >> np.uint32(16)) | np.uint32(0x0040), rounded)
    return rounded.astype(np.uint16)


def _as_bytes_view(chunk) -> memoryview:
    mv = memoryview(chunk)
    if not mv.c_contiguous:
        raise ValueError("payload chunks must be C-contiguous")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def _iter_chunks(chunks):
    if isinstance(chunks, (bytes, bytearray, memoryview, np.ndarray)):
        yield _as_bytes_view(np.ascontiguousarray(chunks) if isinstance(chunks, np.ndarray) else chunks)
        return
    for c in chunks:
        mv = _as_bytes_view(c)
        if mv.nbytes:
            yield mv


class _HashingFile:
    """The raw output file; counts and hashes every byte written."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> None:
        self.f.write(b)
        self.h.update(b)
        self.n += len(b) if isinstance(b, (bytes, bytearray)) else memoryview(b).nbytes


class _Emitter:
    """Mirrors the protocol-4 pickler: frames, the memo, and one method per `save` that occurs."""

    def __init__(self, out: _HashingFile):
        self.out = out
        self.frame = bytearray()
        self.memo: dict = {}
        self.memo_len = 0
        self.out.write(_PROTO + b"\x04")

    # -- framing ---------------------------------------------------------------------------
    def _commit(self, force: bool) -> None:
        n = len(self.frame)
        if n and (force or n >= _FRAME_SIZE_TARGET):
            if n >= _FRAME_SIZE_MIN:
                self.out.write(_FRAME + struct.pack("<Q", n))
            self.out.write(bytes(self.frame))
            self.frame.clear()

    def _save(self) -> None:
        """What the pickler does at the start of every save(obj): maybe end the frame."""
        self._commit(force=False)

    def w(self, b: bytes) -> None:
        self.frame += b

    # -- memo ------------------------------------------------------------------------------
    def memoize(self, key=None) -> None:
        self.w(_MEMOIZE)
        if key is not None:
            self.memo[key] = self.memo_len
        self.memo_len += 1

    def _get(self, key) -> bool:
        idx = self.memo.get(key) if key is not None else None
        if idx is None:
            return False
        self.w(_BINGET + struct.pack("<B", idx) if idx < 256 else _LONG_BINGET + struct.pack("<I", idx))
        return True

    # -- atoms -----------------------------------------------------------------------------
    def save_str(self, s: str, key=None) -> None:
        self._save()
        if self._get(key):
            return
        b = s.encode("utf-8", "surrogatepass")
        if len(b) < 256:
            self.w(_SHORT_BINUNICODE + struct.pack("<B", len(b)) + b)
        else:
            self.w(_BINUNICODE + struct.pack("<I", len(b)) + b)
        self.memoize(key)

    def save_small_bytes(self, b: bytes, key=None) -> None:
        """A bytes object that is in memory (used for b'b' and payloads < 64 KiB)."""
        self._save()
        if self._get(key):
            return
        n = len(b)
        if n < 256:
            self.w(_SHORT_BINBYTES + struct.pack("<B", n) + b)
        else:
            self.w(_BINBYTES + struct.pack("<I", n) + b)
        self.memoize(key)

    def save_payload(self, nbytes: int, chunks) -> None:
        """A never-shared bytes object of `nbytes` bytes, supplied as chunks."""
        self._save()
        if nbytes < _FRAME_SIZE_TARGET:
            buf = bytearray()
            for mv in _iter_chunks(chunks):
                buf += mv
                if len(buf) > nbytes:
                    break
            if len(buf) != nbytes:
                raise ValueError(f"payload chunks hold {len(buf)}{'+' if len(buf) > nbytes else ''} bytes, expected {nbytes}")
            n = nbytes
            if n < 256:
                self.w(_SHORT_BINBYTES + struct.pack("<B", n) + bytes(buf))
            else:
                self.w(_BINBYTES + struct.pack("<I", n) + bytes(buf))
        else:
            header = (_BINBYTES8 + struct.pack("<Q", nbytes) if nbytes >= _BINBYTES8_MIN
                      else _BINBYTES + struct.pack("<I", nbytes))
            self._commit(force=True)          # large payloads bypass framing
            self.out.write(header)
            done = 0
            for mv in _iter_chunks(chunks):
                done += mv.nbytes
                if done > nbytes:
                    raise ValueError(f"payload chunks hold more than the expected {nbytes} bytes")
                self.out.write(mv)
            if done != nbytes:
                raise ValueError(f"payload chunks hold {done} bytes, expected {nbytes}")
        self.memoize(None)

    def save_int(self, v: int) -> None:
        self._save()
        if 0 <= v <= 0xFF:
            self.w(_BININT1 + struct.pack("<B", v))
        elif 0 <= v <= 0xFFFF:
            self.w(_BININT2 + struct.pack("<H", v))
        elif -0x80000000 <= v <= 0x7FFFFFFF:
            self.w(_BININT + struct.pack("<i", v))
        else:
            enc = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)  # pickle.encode_long
            if len(enc) > 255:
                raise ValueError("integer too large")
            self.w(_LONG1 + struct.pack("<B", len(enc)) + enc)

    def save_const(self, op: bytes) -> None:     # None / True / False
        self._save()
        self.w(op)

    def save_global(self, module: str, name: str) -> None:
        self._save()
        key = ("global", module, name)
        if self._get(key):
            return
        self.save_str(module, ("str", module))     # module names are interned strings
        self.save_str(name, ("str", module + "." + name))
        self.w(_STACK_GLOBAL)
        self.memoize(key)

    def save_shape(self, shape: tuple) -> None:  # a fresh tuple of ints
        self._save()
        n = len(shape)
        if n == 0:
            self.w(_EMPTY_TUPLE)
            return
        if n <= 3:
            for s in shape:
                self.save_int(s)
            self.w((_TUPLE1, _TUPLE2, _TUPLE3)[n - 1])
        else:
            self.w(_MARK)
            for s in shape:
                self.save_int(s)
            self.w(_TUPLE)
        self.memoize(None)

    # -- numpy objects ---------------------------------------------------------------------
    def save_dtype(self, name: str) -> None:
        """numpy.dtype: REDUCE (numpy.dtype, (arg, False, True)) + BUILD state."""
        self._save()
        key = ("dtype", name)
        if self._get(key):                      # builtin descriptors are singletons
            return
        arg, order, elsize, align, flags, _ = DTYPES[name]
        self.save_global(*_DTYPE)
        self._save()                            # args tuple (arg, False, True)
        if isinstance(arg, tuple):
            self.save_global(*arg)
        else:
            self.save_str(arg, None)            # a fresh string each time ("%c%d")
        self.save_const(_NEWFALSE)
        self.save_const(_NEWTRUE)
        self.w(_TUPLE3)
        self.memoize(None)
        self.w(_REDUCE)
        self.memoize(key)
        self._save()                            # state (3, order, None, None, None, elsize, align, flags)
        self.w(_MARK)
        self.save_int(3)
        self.save_str(order, ("str", order))    # one-character strings are cached singletons
        self.save_const(_NONE)
        self.save_const(_NONE)
        self.save_const(_NONE)
        self.save_int(elsize)
        self.save_int(align)
        self.save_int(flags)
        self.w(_TUPLE)
        self.memoize(None)
        self.w(_BUILD)

    def save_ndarray(self, shape: tuple, name: str, chunks) -> None:
        """numpy.ndarray (numpy 1.x, protocol < 5): REDUCE (_reconstruct, (ndarray, (0,), b'b'))
        + BUILD (1, shape, dtype, False, raw_bytes)."""
        nbytes = ndarray_payload_nbytes(shape, name)
        self._save()
        self.save_global(*_RECONSTRUCT)
        self._save()                            # args (ndarray, (0,), b'b')
        self.save_global(*_NDARRAY)
        self.save_shape((0,))                   # a fresh (0,) tuple each time
        self.save_small_bytes(b"b", ("bytes", b"b"))   # one-byte bytes objects are cached
        self.w(_TUPLE3)
        self.memoize(None)
        self.w(_REDUCE)
        self.memoize(None)
        self._save()                            # state (1, shape, dtype, False, raw)
        self.w(_MARK)
        self.save_int(1)
        self.save_shape(shape)
        self.save_dtype(name)
        self.save_const(_NEWFALSE)
        self.save_payload(nbytes, chunks)
        self.w(_TUPLE)
        self.memoize(None)
        self.w(_BUILD)

    def finish(self) -> None:
        self.w(_STOP)
        self._commit(force=True)


def _write_atomic(path, emit, fsync: bool) -> WriteResult:
    path = os.fspath(path)
    tmp = path + ".tmp"
    f = open(tmp, "wb")
    out = _HashingFile(f)
    try:
        em = _Emitter(out)
        emit(em)
        em.finish()
        f.flush()
        if fsync:
            os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return WriteResult(path, out.n, out.h.hexdigest())


def write_ndarray(path, shape, dtype_str: str, chunks: Iterable, *, fsync: bool = False) -> WriteResult:
    """Write `path` as the pickle of a C-order numpy array (the released float32 tensors).

    `dtype_str` is '<f4' (also accepted: '|i1', 'bfloat16' whose payload is the bf16 bit
    patterns). `chunks` is an iterable of bytes-like objects (or one bytes-like object / ndarray)
    whose concatenation is the array's C-order payload; its total length must equal
    prod(shape) * itemsize, else ValueError and no file is left behind.
    """
    shape = _check_shape(shape)
    name = _dtype_name(dtype_str)
    return _write_atomic(path, lambda em: em.save_ndarray(shape, name, chunks), fsync)


def write_quantized(path, weight_shape, weight_chunks: Iterable, scales_u16, *,
                    fsync: bool = False) -> WriteResult:
    """Write `path` as the pickle of a `__main__.QuantizedWeight8bit` object.

    `weight_chunks`: the int8 weight payload (C order, prod(weight_shape) bytes) as an iterable
    of bytes-like chunks (or one bytes-like object / int8 ndarray). `scales_u16`: numpy uint16
    array with the bfloat16 bit patterns of the scales, in its own shape (e.g. [8,1,F], [8,8,D],
    [1,C], [8,C]).
    """
    weight_shape = _check_shape(weight_shape)
    scales = np.asarray(scales_u16)
    if scales.dtype != np.uint16:
        raise ValueError(f"scales_u16 must be a uint16 array of bf16 bit patterns, got {scales.dtype}")
    scales = np.ascontiguousarray(scales, dtype="<u2")
    scales_shape = tuple(int(s) for s in scales.shape)

    def emit(em: _Emitter) -> None:
        em._save()                              # the QuantizedWeight8bit object
        em.save_global(*_QUANTIZED)             # __reduce_ex__(4): copyreg.__newobj__(cls) + state
        em._save()
        em.w(_EMPTY_TUPLE)
        em.w(_NEWOBJ)
        em.memoize(None)
        em._save()                              # state: {"weight": ..., "scales": ...}
        em.w(_EMPTY_DICT)
        em.memoize(None)
        em.w(_MARK)
        em.save_str("weight", None)
        em.save_ndarray(weight_shape, "|i1", weight_chunks)
        em.save_str("scales", None)
        em.save_ndarray(scales_shape, "bfloat16", memoryview(scales).cast("B"))
        em.w(_SETITEMS)
        em.w(_BUILD)

    return _write_atomic(path, emit, fsync)
