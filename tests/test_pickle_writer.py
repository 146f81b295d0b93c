"""grokcpu.formats.pickle_writer: byte-identical to what pickle.dump wrote for the released files."""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from grokcpu.formats import pickle_writer as pw

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
FIXTURES = SHARED / "fixtures"


def _fixture_files():
    if not FIXTURES.is_dir():
        return []
    return sorted(FIXTURES.glob("*/ckpt-0/tensor*_000"))


# ---- an independent, restricted reader ---------------------------------------------------------

class _ArrayStub:
    """Stands in for numpy.ndarray: records the BUILD state (1, shape, dtype, fortran, raw)."""

    def __setstate__(self, state):
        self.state = state


class _DtypeStub:
    def __init__(self, arg, align, copy):
        self.arg = arg

    def __setstate__(self, state):
        self.state = state


class _BF16Stub:
    """Stands in for ml_dtypes.bfloat16."""


class _QuantizedStub:
    """Stands in for __main__.QuantizedWeight8bit (NEWOBJ + BUILD with the dict state)."""


def _reconstruct(cls, shape, typecode):
    assert cls is _NDARRAY and shape == (0,) and typecode == b"b"
    return _ArrayStub()


_NDARRAY = object()
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeStub,
    ("ml_dtypes", "bfloat16"): _BF16Stub,
    ("__main__", "QuantizedWeight8bit"): _QuantizedStub,
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} not allowed") from None


def _to_array(stub: _ArrayStub):
    version, shape, dt, fortran, raw = stub.state
    assert version == 1 and fortran is False and isinstance(raw, bytes)
    if dt.arg is _BF16Stub:
        assert dt.state == (3, "<", None, None, None, 2, 2, 64)
        return "bfloat16", tuple(shape), np.frombuffer(raw, "<u2").reshape(shape)
    np_dt = {"f4": np.dtype("<f4"), "i1": np.dtype("i1")}[dt.arg]
    assert dt.state[:5] == (3, "<" if dt.arg == "f4" else "|", None, None, None)
    return np_dt.name, tuple(shape), np.frombuffer(raw, np_dt).reshape(shape)


def read_tensor_file(path):
    """('ndarray', (dtype, shape, array)) or ('QuantizedWeight8bit', {'weight': ..., 'scales': ...})."""
    with open(path, "rb") as f:
        obj = RestrictedUnpickler(f).load()
    if isinstance(obj, _ArrayStub):
        return "ndarray", _to_array(obj)
    assert isinstance(obj, _QuantizedStub) and list(vars(obj)) == ["weight", "scales"]
    return "QuantizedWeight8bit", {k: _to_array(v) for k, v in vars(obj).items()}


# ---- fixtures: every file rewritten byte for byte ------------------------------------------------

def test_fixtures_present():
    if not FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES.resolve()} (expected /work/shared next to the repo)")
    assert len(_fixture_files()) >= 26


@pytest.mark.parametrize("fixture_dir", sorted(p.name for p in FIXTURES.glob("*") if (p / "ckpt-0").is_dir())
                         if FIXTURES.is_dir() else ["<missing>"])
def test_rewrite_fixture_identical(fixture_dir, tmp_path):
    if not FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES.resolve()}")
    files = sorted((FIXTURES / fixture_dir / "ckpt-0").glob("tensor*_000"))
    manifest = json.loads((FIXTURES / fixture_dir / "config.json").read_text())["checkpoint"]["files"]
    assert len(files) == len(manifest)
    for src, entry in zip(files, manifest):
        kind, content = read_tensor_file(src)
        assert kind == entry["kind"]
        dst = tmp_path / src.name
        if kind == "ndarray":
            dtype, shape, arr = content
            assert (dtype, list(shape)) == (entry["dtype"], entry["shape"])
            # stream in uneven chunks to exercise the chunk handling
            raw = arr.tobytes()
            chunks = [raw[i:i + 777] for i in range(0, len(raw), 777)]
            res = pw.write_ndarray(dst, shape, "<f4", iter(chunks))
        else:
            wdt, wshape, w = content["weight"]
            sdt, sshape, s = content["scales"]
            assert (wdt, list(wshape), sdt, list(sshape)) == (
                entry["weight_dtype"], entry["weight_shape"], entry["scales_dtype"], entry["scales_shape"])
            res = pw.write_quantized(dst, wshape, (w[i:i + 3] for i in range(0, len(w), 3)), s)
        got, want = dst.read_bytes(), src.read_bytes()
        assert got == want, f"{fixture_dir}/{src.name} differs"
        assert res.size == len(want) and res.sha256 == entry["sha256"]
        assert not (tmp_path / (src.name + ".tmp")).exists()


# ---- cross-check with CPython's own pickler on shapes the fixtures do not cover ------------------

# Runs in a child process: fake `numpy`, `numpy.core.multiarray`, `ml_dtypes` modules and a
# `__main__.QuantizedWeight8bit` class whose objects reduce exactly like numpy 1.x arrays, numpy
# dtypes and the upstream dataclass, then pickle.dump(protocol=4) them with the C pickler.
_CHILD = textwrap.dedent(r"""
    import json, pickle, sys, types
    np_mod = types.ModuleType("numpy"); core = types.ModuleType("numpy.core")
    ma = types.ModuleType("numpy.core.multiarray"); mld = types.ModuleType("ml_dtypes")
    class ndarray: pass
    class dtype: pass
    class bfloat16: pass
    def _reconstruct(*a): pass
    ndarray.__module__ = dtype.__module__ = "numpy"
    bfloat16.__module__ = "ml_dtypes"
    _reconstruct.__module__ = "numpy.core.multiarray"
    np_mod.ndarray, np_mod.dtype, np_mod.core = ndarray, dtype, core
    core.multiarray, ma._reconstruct, mld.bfloat16 = ma, _reconstruct, bfloat16
    sys.modules.update({"numpy": np_mod, "numpy.core": core, "numpy.core.multiarray": ma, "ml_dtypes": mld})
    DT = {"f4": ("<", -1, -1, 0), "i1": ("|", -1, -1, 0)}
    class FakeDtype:
        def __init__(self, name): self.name = name
        def __reduce__(self):
            if self.name == "bf16":
                return (dtype, (bfloat16, False, True), (3, "<", None, None, None, 2, 2, 64))
            o, e, a, f = DT[self.name]
            return (dtype, ("".join(self.name), False, True), (3, o, None, None, None, e, a, f))
    DTYPE_OBJ = {k: FakeDtype(k) for k in ("f4", "i1", "bf16")}     # descriptors are singletons
    ITEM = {"f4": 4, "i1": 1, "bf16": 2}
    def payload(n, seed):
        return bytes((i * 7 + seed) & 255 for i in range(n))
    class FakeArray:
        def __init__(self, shape, dt, seed):
            n = ITEM[dt]
            for s in shape: n *= s
            self.shape, self.dt, self.raw = tuple(shape), dt, payload(n, seed)
        def __reduce__(self):
            return (_reconstruct, (ndarray, tuple([0]), b"b"),
                    (1, tuple(list(self.shape)), DTYPE_OBJ[self.dt], False, self.raw))
    class QuantizedWeight8bit:
        pass
    QuantizedWeight8bit.__module__ = "__main__"
    cases = json.loads(sys.argv[2])
    for i, c in enumerate(cases):
        if c[0] == "nd":
            obj = FakeArray(c[1], "f4", i)
        else:
            obj = QuantizedWeight8bit()
            obj.weight = FakeArray(c[1], "i1", i)
            obj.scales = FakeArray(c[2], "bf16", i + 100)
        with open(f"{sys.argv[1]}/case{i}", "wb") as f:
            pickle.dump(obj, f, protocol=4)
""")

_CASES = [
    ("nd", [1]), ("nd", []), ("nd", [63]), ("nd", [64]), ("nd", [16383]), ("nd", [16384]),
    ("nd", [16385]), ("nd", [300, 700]), ("nd", [2, 3, 4, 5]), ("nd", [70000]), ("nd", [0]),
    ("q", [3, 5], [1, 5]), ("q", [8, 8190], [8, 8190]), ("q", [65400], [1, 65400]),
    ("q", [65535], [1, 1]), ("q", [65536], [1, 1]), ("q", [4, 40000], [8, 40000]),
    ("q", [8, 16, 4096], [8, 1, 4096]), ("q", [8, 64, 48], [8, 8, 48]), ("q", [2, 2, 2, 2], [1, 2]),
    ("q", [64, 300], [8, 300]), ("q", [1, 65000], [1, 65000]),
]


def _payload(n, seed):
    return bytes((i * 7 + seed) & 255 for i in range(n))


def test_matches_cpython_pickler_edge_cases(tmp_path):
    ref, mine = tmp_path / "ref", tmp_path / "mine"
    ref.mkdir()
    mine.mkdir()
    subprocess.run([sys.executable, "-c", _CHILD, str(ref), json.dumps(_CASES)], check=True)
    for i, c in enumerate(_CASES):
        if c[0] == "nd":
            n = int(np.prod(c[1], dtype=np.int64)) * 4
            raw = _payload(n, i)
            pw.write_ndarray(mine / f"case{i}", c[1], "<f4", [raw[:n // 3], raw[n // 3:]])
        else:
            nw = int(np.prod(c[1], dtype=np.int64))
            ns = int(np.prod(c[2], dtype=np.int64))
            scales = np.frombuffer(_payload(2 * ns, i + 100), "<u2").reshape(c[2])
            pw.write_quantized(mine / f"case{i}", c[1], [_payload(nw, i)], scales)
        want = (ref / f"case{i}").read_bytes()
        got = (mine / f"case{i}").read_bytes()
        assert got == want, f"case {c}: differs from CPython's pickle.dump"


def test_binbytes8_over_threshold(tmp_path, monkeypatch):
    # 4 GiB payloads use BINBYTES8; exercise the branch with a lowered threshold.
    monkeypatch.setattr(pw, "_BINBYTES8_MIN", 100_000)
    arr = np.arange(30_000, dtype=np.float32)
    pw.write_ndarray(tmp_path / "a", arr.shape, "<f4", [arr])
    data = (tmp_path / "a").read_bytes()
    ops = [op.name for op, _, _ in pickletools.genops(data)]
    assert "BINBYTES8" in ops
    _, (dtype, shape, back) = read_tensor_file(tmp_path / "a")
    assert dtype == "float32" and shape == (30_000,) and np.array_equal(back, arr)


def test_roundtrip_and_opcodes(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(8, 64, 48), dtype=np.int8)
    s = pw.float32_to_bf16_bits(rng.random((8, 8, 48), dtype=np.float32))
    res = pw.write_quantized(tmp_path / "q", w.shape, [w[:3], w[3:]], s)
    kind, content = read_tensor_file(tmp_path / "q")
    assert kind == "QuantizedWeight8bit"
    assert content["weight"][0] == "int8" and np.array_equal(content["weight"][2], w)
    assert content["scales"][0] == "bfloat16" and np.array_equal(content["scales"][2], s)
    assert res.size == os.path.getsize(tmp_path / "q")
    # the payload of a >= 64 KiB tensor sits outside frames, directly after its BINBYTES header
    big = np.arange(40_000, dtype=np.float32)
    pw.write_ndarray(tmp_path / "big", big.shape, "<f4", [big.tobytes()])
    data = (tmp_path / "big").read_bytes()
    for op, arg, pos in pickletools.genops(io.BytesIO(data)):
        if op.name == "BINBYTES":
            assert data[pos + 5:pos + 5 + big.nbytes] == big.tobytes()


def test_wrong_payload_length_leaves_nothing(tmp_path):
    for n in (10, 100_000):           # in-frame and streamed paths
        with pytest.raises(ValueError):
            pw.write_ndarray(tmp_path / "x", [n], "<f4", [b"\0" * (4 * n - 1)])
        with pytest.raises(ValueError):
            pw.write_ndarray(tmp_path / "x", [n], "<f4", [b"\0" * (4 * n), b"\0"])
        with pytest.raises(ValueError):
            pw.write_quantized(tmp_path / "x", [n], [b"\0" * (n + 1)], np.zeros((1, 1), np.uint16))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        pw.write_quantized(tmp_path / "x", [4], [b"\0" * 4], np.zeros((1, 1), np.float32))


def test_float32_to_bf16_bits():
    x = np.array([1.0, -2.5, 0.0, -0.0, np.inf, -np.inf, 3.0e38, 1e-40,
                  1.00390625,      # exactly halfway between 1.0 and 1.0078125 -> even (1.0)
                  1.01171875,      # halfway between 1.0078125 and 1.015625 -> even (1.015625)
                  1.0000001], dtype=np.float32)
    bits = pw.float32_to_bf16_bits(x)
    assert bits.dtype == np.uint16 and bits.shape == x.shape
    back = (bits.astype(np.uint32) << 16).view(np.float32)
    assert back[0] == 1.0 and back[1] == -2.5 and bits[2] == 0 and bits[3] == 0x8000
    assert np.isinf(back[4]) and np.isinf(back[5]) and back[5] < 0
    assert back[8] == 1.0 and back[9] == 1.015625 and back[10] == 1.0
    assert abs(back[6] - 3.0e38) / 3.0e38 < 2 ** -8
    nan = pw.float32_to_bf16_bits(np.array([np.nan, -np.nan], np.float32))
    assert np.isnan((nan.astype(np.uint32) << 16).view(np.float32)).all()
    r = np.random.default_rng(1).standard_normal(10_000).astype(np.float32)
    rb = (pw.float32_to_bf16_bits(r).astype(np.uint32) << 16).view(np.float32)
    assert np.max(np.abs(rb - r) / np.abs(r)) <= 2 ** -8


def test_written_files_parse_with_the_loader(tmp_path):
    """What the writer emits, the loader's safe parser reads: same shapes, dtypes and payloads."""
    from grokcpu.formats.grok1_pickle import ArrayRef, QuantizedRef, parse_tensor_file
    rng = np.random.default_rng(1)
    w = rng.integers(-127, 128, size=(4, 32, 16), dtype=np.int8)
    s = pw.float32_to_bf16_bits(rng.random((4, 8, 16), dtype=np.float32))
    pw.write_quantized(tmp_path / "q", w.shape, [w], s)
    big = np.arange(40_000, dtype=np.float32)          # payload outside a frame
    pw.write_ndarray(tmp_path / "a", big.shape, "<f4", [big.tobytes()])
    q = parse_tensor_file(tmp_path / "q")
    a = parse_tensor_file(tmp_path / "a")
    assert isinstance(q, QuantizedRef) and isinstance(a, ArrayRef)
    assert (q.weight.shape, q.weight.dtype, q.scales.shape, q.scales.dtype) == (w.shape, "i1", s.shape, "bf16")
    assert (a.shape, a.dtype) == (big.shape, "f4")
    data = (tmp_path / "q").read_bytes()
    assert data[q.weight.offset:q.weight.offset + w.nbytes] == w.tobytes()
    assert data[q.scales.offset:q.scales.offset + s.nbytes] == s.tobytes()
    data = (tmp_path / "a").read_bytes()
    assert data[a.offset:a.offset + big.nbytes] == big.tobytes()
