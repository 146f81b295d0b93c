"""The released Grok-1 checkpoint: `ckpt-0/tensorNNNNN_000`, one pickle per parameter.

We never call `pickle.load`. A small stack machine walks each file's opcodes, accepts only the
globals on ALLOW below, and records where each array's raw bytes lie in the file instead of
reading them; the header is read with pread through a small window, never through a memory map,
so a file that shrinks while it is parsed is an error, not a SIGBUS. Opening the 300 GB release
takes as long as reading 770 short pickle headers.

Every quantity a hostile file controls is bounded: header bytes, opcodes, array rank and size
(against the payload that holds them), and names are only ever compared as strings.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError, UnsafePickleError

# The only globals a released tensor file may name, and what each stands for here.
_RECONSTRUCT, _NDARRAY, _DTYPE, _QW, _BF16, _FROMBUFFER = (
    "reconstruct", "ndarray", "dtype", "QuantizedWeight8bit", "bfloat16", "frombuffer")
ALLOW = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("__main__", "QuantizedWeight8bit"): _QW,
    ("model", "QuantizedWeight8bit"): _QW,
    **{(m, "bfloat16"): _BF16 for m in (
        "ml_dtypes", "ml_dtypes._ml_dtypes_ext", "jax.numpy", "jax._src.dtypes",
        "tensorflow.python.framework.dtypes", "bfloat16")},
}

# A released tensor file's pickle opcodes take ~200 bytes around its payloads; these caps are
# thousands of times that and still reject an opcode flood in milliseconds.
MAX_HEADER_BYTES = 1 << 20      # non-payload bytes of one file
MAX_OPS = 10_000                # opcodes of one file
MAX_NDIM = 8
_WINDOW = 1 << 14               # bytes fetched per pread while walking the header

_DTYPES = {"f4": np.dtype("<f4"), "i1": np.dtype("i1"), "u1": np.dtype("u1"),
           "f2": np.dtype("<f2"), "u2": np.dtype("<u2"), "bf16": np.dtype("<u2")}


@dataclass(frozen=True)
class ArrayRef:
    """Where one array's bytes lie: file, byte offset, shape, and dtype name ('f4', 'i1', 'bf16')."""
    path: str
    offset: int
    shape: tuple
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class QuantizedRef:
    """A `QuantizedWeight8bit`: int8 weight and bf16 scales."""
    weight: ArrayRef
    scales: ArrayRef


class _Payload:
    __slots__ = ("offset", "length")

    def __init__(self, offset: int, length: int):
        self.offset, self.length = offset, length


class _Global:
    __slots__ = ("kind",)

    def __init__(self, kind: str):
        self.kind = kind


class _DtypeStub:
    __slots__ = ("name", "order")

    def __init__(self, name: str):
        self.name, self.order = name, None


class _ArrayStub:
    __slots__ = ("ref",)

    def __init__(self):
        self.ref = None


class _QWStub:
    __slots__ = ("state",)

    def __init__(self):
        self.state = None


_MARK = object()


def open_regular(path: str, what: str = "tensor file") -> tuple[int, int]:
    """Open `path` read-only as a regular file: (fd, size). FIFOs, sockets, devices, folders,
    dangling links and link loops are refused before (or without) blocking on them."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: is {_kind(st.st_mode)}, not a regular {what}",
                                  hint=f"replace it with the real {what}")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open {what}: {e.strerror or e}",
                              hint=f"check that the {what} exists and is readable") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):      # swapped between stat and open
            raise CheckpointError(f"{path}: is {_kind(st.st_mode)}, not a regular {what}",
                                  hint=f"replace it with the real {what}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def parse_tensor_file(path: str | os.PathLike, buf=None) -> ArrayRef | QuantizedRef:
    """Walk one released tensor pickle without executing it; return where its arrays lie.

    `buf`: the file's bytes (bytes, mmap, memoryview) if already at hand; otherwise the file is
    opened (regular files only) and its header read with pread. Raises UnsafePickleError for any
    global outside ALLOW and CheckpointError for anything malformed or truncated, always naming
    the file.
    """
    path = str(path)
    if buf is not None:
        return _parse(path, _Source(path, None, len(buf), buf))
    fd, size = open_regular(path)
    try:
        return _parse(path, _Source(path, fd, size))
    finally:
        os.close(fd)


def parse_fd(path: str, fd: int, size: int) -> ArrayRef | QuantizedRef:
    """parse_tensor_file on a descriptor the caller opened (with open_regular) and keeps."""
    return _parse(path, _Source(path, fd, size))


def _parse(path: str, src: "_Source"):
    if src.size == 0:
        raise CheckpointError(f"{path}: empty file", hint="re-download this file")
    try:
        return _Machine(path, src).run()
    except (CheckpointError, UnsafePickleError):
        raise
    except (IndexError, struct.error, ValueError, TypeError, KeyError, AttributeError,
            OverflowError, RecursionError, MemoryError) as e:
        raise CheckpointError(f"{path}: not a valid Grok-1 tensor file ({type(e).__name__}: {e})",
                              hint="re-download this file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read tensor file: {e.strerror or e}",
                              hint="check the file and the disk") from None


class _Source:
    """Random access to a file's bytes: pread through one cached window (or a buffer in memory)."""

    __slots__ = ("path", "fd", "size", "win", "ws")

    def __init__(self, path: str, fd: int | None, size: int, buf=None):
        self.path, self.fd, self.size = path, fd, size
        self.win, self.ws = (buf, 0) if buf is not None else (b"", 0)

    def get(self, pos: int, n: int) -> bytes:
        """n bytes at pos; the caller has checked pos + n <= size."""
        i = pos - self.ws
        if not (0 <= i and i + n <= len(self.win)):
            self.fill(pos, n)
            i = 0
        return bytes(self.win[i:i + n])

    def byte(self, pos: int) -> int:
        i = pos - self.ws
        if not (0 <= i < len(self.win)):
            self.fill(pos, 1)
            i = 0
        return self.win[i]

    def fill(self, pos: int, n: int) -> None:
        if self.fd is None:
            raise CheckpointError(f"{self.path}: truncated at byte {pos}", hint="re-download this file")
        data = os.pread(self.fd, max(n, _WINDOW), pos)
        if len(data) < n:
            raise CheckpointError(f"{self.path}: the file shrank while it was read (byte {pos})",
                                  hint="another program is changing the checkpoint; wait for it, then retry")
        self.win, self.ws = data, pos


class _Machine:
    """Just enough of the pickle virtual machine for numpy arrays and QuantizedWeight8bit."""

    def __init__(self, path: str, src: _Source):
        self.path, self.src, self.pos, self.size = path, src, 0, src.size
        self.stack: list = []
        self.marks: list = []
        self.memo: dict = {}
        self.header = 0           # non-payload bytes read
        self.payloads = 0

    def fail(self, what: str):
        raise CheckpointError(f"{self.path}: {what}", hint="this is not an intact Grok-1 tensor file; re-download it")

    def take(self, n: int) -> bytes:
        self.header += n
        if self.header > MAX_HEADER_BYTES:
            self.fail(f"pickle header exceeds {MAX_HEADER_BYTES} bytes at byte {self.pos}")
        if n < 0 or self.pos + n > self.size:
            self.fail(f"truncated at byte {self.pos} (needs {n} more bytes, file has {self.size})")
        b = self.src.get(self.pos, n)
        self.pos += n
        return b

    def skip_payload(self, n: int) -> _Payload:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"truncated: a {n}-byte array payload at byte {self.pos} runs past the end "
                      f"of the {self.size}-byte file")
        self.payloads += 1
        if self.payloads > 16:
            self.fail("too many byte strings for a tensor file")
        p = _Payload(self.pos, n)
        self.pos += n
        return p

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def pop_mark(self) -> list:
        if not self.marks:
            self.fail("malformed pickle (no MARK)")
        k = self.marks.pop()
        items = self.stack[k:]
        del self.stack[k:]
        return items

    def run(self):
        st = self.stack
        ops = 0
        while True:
            if self.pos >= self.size:
                self.fail("truncated (no STOP opcode)")
            ops += 1
            self.header += 1
            if ops > MAX_OPS or self.header > MAX_HEADER_BYTES:
                self.fail(f"pickle header exceeds {MAX_OPS} opcodes or {MAX_HEADER_BYTES} bytes "
                          f"(at byte {self.pos})")
            op = self.src.byte(self.pos)
            self.pos += 1
            if op == 0x80:            # PROTO
                proto = self.uint(1)
                if proto > 5:
                    self.fail(f"pickle protocol {proto} is not supported")
            elif op == 0x95:          # FRAME (a size hint only)
                self.take(8)
            elif op == 0x2E:          # STOP
                if len(st) != 1:
                    self.fail("malformed pickle (stack at STOP)")
                return self.finish(st.pop())
            elif op == 0x8C:          # SHORT_BINUNICODE
                st.append(self.take(self.uint(1)).decode("utf-8"))
            elif op == 0x58:          # BINUNICODE
                st.append(self.take(self.uint(4)).decode("utf-8"))
            elif op == 0x8D:          # BINUNICODE8
                st.append(self.take(self.uint(8)).decode("utf-8"))
            elif op == 0x94:          # MEMOIZE
                self.memo[len(self.memo)] = st[-1]
            elif op == 0x71:          # BINPUT
                self.memo[self.uint(1)] = st[-1]
            elif op == 0x72:          # LONG_BINPUT
                self.memo[self.uint(4)] = st[-1]
            elif op == 0x68:          # BINGET
                st.append(self.memo_get(self.uint(1)))
            elif op == 0x6A:          # LONG_BINGET
                st.append(self.memo_get(self.uint(4)))
            elif op == 0x93:          # STACK_GLOBAL
                name = st.pop()
                module = st.pop()
                st.append(self.find_class(module, name))
            elif op == 0x63:          # GLOBAL "module\nname\n"
                module = self.readline()
                name = self.readline()
                st.append(self.find_class(module, name))
            elif op == 0x28:          # MARK
                self.marks.append(len(st))
            elif op == 0x74:          # TUPLE
                st.append(tuple(self.pop_mark()))
            elif op == 0x29:          # EMPTY_TUPLE
                st.append(())
            elif op in (0x85, 0x86, 0x87):  # TUPLE1..3
                n = op - 0x84
                if len(st) < n:
                    self.fail("malformed pickle (stack underflow)")
                items = tuple(st[-n:])
                del st[-n:]
                st.append(items)
            elif op == 0x4A:          # BININT
                st.append(struct.unpack("<i", self.take(4))[0])
            elif op == 0x4B:          # BININT1
                st.append(self.uint(1))
            elif op == 0x4D:          # BININT2
                st.append(self.uint(2))
            elif op == 0x8A:          # LONG1
                st.append(int.from_bytes(self.take(self.uint(1)), "little", signed=True))
            elif op == 0x47:          # BINFLOAT
                st.append(struct.unpack(">d", self.take(8))[0])
            elif op == 0x4E:          # NONE
                st.append(None)
            elif op == 0x88:          # NEWTRUE
                st.append(True)
            elif op == 0x89:          # NEWFALSE
                st.append(False)
            elif op == 0x43:          # SHORT_BINBYTES
                st.append(self.skip_payload(self.uint(1)))
            elif op == 0x42:          # BINBYTES
                st.append(self.skip_payload(self.uint(4)))
            elif op in (0x8E, 0x96):  # BINBYTES8, BYTEARRAY8
                st.append(self.skip_payload(self.uint(8)))
            elif op == 0x7D:          # EMPTY_DICT
                st.append({})
            elif op == 0x5D:          # EMPTY_LIST
                st.append([])
            elif op == 0x73:          # SETITEM
                v = st.pop()
                k = st.pop()
                self.setitems(st[-1], [k, v])
            elif op == 0x75:          # SETITEMS
                items = self.pop_mark()
                self.setitems(st[-1], items)
            elif op == 0x61:          # APPEND
                v = st.pop()
                self.expect(st[-1], list).append(v)
            elif op == 0x65:          # APPENDS
                items = self.pop_mark()
                self.expect(st[-1], list).extend(items)
            elif op == 0x52:          # REDUCE
                args = st.pop()
                func = st.pop()
                st.append(self.reduce(func, args))
            elif op == 0x81:          # NEWOBJ
                args = st.pop()
                cls = st.pop()
                if not (isinstance(cls, _Global) and cls.kind == _QW and args == ()):
                    self.fail("unexpected object construction")
                st.append(_QWStub())
            elif op == 0x62:          # BUILD
                state = st.pop()
                self.build(st[-1], state)
            else:
                self.fail(f"unsupported pickle opcode 0x{op:02x} at byte {self.pos - 1}")

    def memo_get(self, key: int):
        if key not in self.memo:
            self.fail(f"malformed pickle (memo entry {key} was never stored)")
        return self.memo[key]

    def readline(self) -> str:
        n = min(self.size - self.pos, 256)
        chunk = self.src.get(self.pos, n)
        end = chunk.find(b"\n")
        if end < 0:
            self.fail("malformed GLOBAL opcode")
        self.take(end + 1)
        return chunk[:end].decode("utf-8")

    def find_class(self, module, name) -> _Global:
        # Only strings are names: anything else (a tuple nested a million deep) is never hashed,
        # compared or printed.
        if not (isinstance(module, str) and isinstance(name, str)):
            self.fail(f"malformed pickle (a global named by {_brief(module)} and {_brief(name)})")
        kind = ALLOW.get((module, name))
        if kind is None:
            raise UnsafePickleError(
                f"{self.path}: refused to load the Python global {module[:100]}.{name[:100]}, which "
                "is not on the allow-list of a Grok-1 tensor file; nothing was executed",
                hint="this file is not part of the released checkpoint, and may be hostile; delete it "
                     "and re-download")
        return _Global(kind)

    def expect(self, obj, typ):
        if not isinstance(obj, typ):
            self.fail(f"malformed pickle (expected {typ.__name__})")
        return obj

    def setitems(self, d, items):
        self.expect(d, dict)
        for k, v in zip(items[::2], items[1::2]):
            if not isinstance(k, str):
                self.fail("malformed pickle (non-string dict key)")
            d[k] = v

    def dtype_of(self, spec) -> _DtypeStub:
        if isinstance(spec, _Global) and spec.kind == _BF16:
            return _DtypeStub("bf16")
        if isinstance(spec, str) and spec.lstrip("<|=") in _DTYPES:
            return _DtypeStub(spec.lstrip("<|="))
        self.fail(f"unsupported array dtype {_brief(spec)} (expected float32, int8 or bfloat16)")

    def reduce(self, func, args):
        if not isinstance(func, _Global) or not isinstance(args, tuple):
            self.fail("unexpected call in pickle")
        if func.kind == _RECONSTRUCT:
            if not (len(args) == 3 and isinstance(args[0], _Global) and args[0].kind == _NDARRAY):
                self.fail("unexpected array reconstruction")
            return _ArrayStub()
        if func.kind == _DTYPE:
            if not args:
                self.fail("unexpected dtype construction")
            return self.dtype_of(args[0])
        if func.kind == _FROMBUFFER:   # protocol 5: _frombuffer(buffer, dtype, shape, order)
            if len(args) != 4 or not isinstance(args[0], _Payload) or args[3] != "C":
                self.fail("unexpected array buffer")
            dt = args[1] if isinstance(args[1], _DtypeStub) else self.fail("bad dtype")
            return self.array_ref(args[2], dt, args[0])
        self.fail(f"unexpected call of {func.kind}")

    def array_ref(self, shape, dt: _DtypeStub, payload) -> ArrayRef:
        if not (isinstance(shape, tuple) and len(shape) <= MAX_NDIM
                and all(type(n) is int and 0 <= n <= self.size for n in shape)):
            self.fail(f"bad array shape ({_brief(shape)})")
        if dt.order == ">":
            self.fail("big-endian arrays are not supported")
        if not isinstance(payload, _Payload):
            self.fail("array data is not raw bytes")
        ref = ArrayRef(self.path, payload.offset, tuple(shape), dt.name)
        need = ref.nbytes             # exact Python int: no overflow however large the dims
        if need != payload.length:
            self.fail(f"array of shape {list(shape)} {dt.name} needs {need} bytes, file holds {payload.length}")
        return ref

    def build(self, obj, state):
        if isinstance(obj, _DtypeStub):
            if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", "|", "=", ">")):
                self.fail("bad dtype state")
            obj.order = state[1]
        elif isinstance(obj, _ArrayStub):
            if obj.ref is not None or not (isinstance(state, tuple) and len(state) == 5):
                self.fail("bad array state")
            _, shape, dt, fortran, payload = state
            if not isinstance(dt, _DtypeStub):
                self.fail("bad array dtype")
            if not isinstance(shape, tuple):
                self.fail(f"bad array shape ({_brief(shape)})")
            if fortran and len(shape) > 1:
                self.fail("Fortran-ordered arrays are not supported")
            obj.ref = self.array_ref(shape, dt, payload)
        elif isinstance(obj, _QWStub):
            if obj.state is not None or not isinstance(state, dict):
                self.fail("bad QuantizedWeight8bit state")
            obj.state = state
        else:
            self.fail("unexpected BUILD")

    def finish(self, obj):
        if isinstance(obj, _ArrayStub) and obj.ref is not None:
            return obj.ref
        if isinstance(obj, ArrayRef):
            return obj
        if isinstance(obj, _QWStub) and obj.state is not None:
            w, s = obj.state.get("weight"), obj.state.get("scales")
            w = w.ref if isinstance(w, _ArrayStub) else w
            s = s.ref if isinstance(s, _ArrayStub) else s
            if not (isinstance(w, ArrayRef) and isinstance(s, ArrayRef)):
                self.fail("QuantizedWeight8bit without weight and scales arrays")
            return QuantizedRef(w, s)
        self.fail("the pickle holds neither an array nor a QuantizedWeight8bit")


def _brief(obj) -> str:
    """A short, safe description of a value from a hostile file (never its full repr)."""
    if isinstance(obj, str):
        return repr(obj[:40]) + ("..." if len(obj) > 40 else "")
    if isinstance(obj, (int, float, bool)) or obj is None:
        return repr(obj) if not isinstance(obj, int) or abs(obj) < 10 ** 30 else "a huge int"
    if isinstance(obj, tuple):
        return f"a {len(obj)}-tuple"
    return f"a {type(obj).__name__.lstrip('_')}"
