"""Hostile and damaged checkpoints: each finding reproduced, then a seeded mutation fuzz.

Every case must end in a one-line GrokError (naming the file or config key) or a clean load:
never another exception, a hang, a huge allocation or a crash. Tests damage private copies.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from grokcpu.checkpoint import Checkpoint, file_index
from grokcpu.config import GrokConfig
from grokcpu.errors import CheckpointError, ConfigError, GrokError, UnsafePickleError
from grokcpu.formats.grok1_pickle import parse_tensor_file

from conftest import FIXTURES, need_shared

ROOT = Path(__file__).resolve().parents[1]


class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail instead of hanging: SIGALRM raises Hang in the main thread after `seconds`."""
    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def copy_fixture(tmp_path, name="p1_e8_l2_basic") -> Path:
    need_shared()
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


@pytest.fixture
def p1(tmp_path):
    return copy_fixture(tmp_path)


def refused(path, exc=GrokError, seconds=5.0, **kw) -> str:
    """Load `path`; it must raise `exc` within `seconds`. Returns the message, checked to be one
    bounded, printable line."""
    with deadline(seconds), pytest.raises(exc) as e:
        Checkpoint(path, **kw)
    msg = str(e.value)
    assert_clean(msg)
    return msg


def assert_clean(msg: str):
    assert len(msg) <= 520, len(msg)
    assert all(c.isprintable() for c in msg), repr(msg)


# ---- 1. names that are not strings ---------------------------------------------------------------

def _stack_global(module_ops: bytes, name: bytes = b"\x8c\x01x") -> bytes:
    return b"\x80\x04" + module_ops + name + b"\x93."


def test_deeply_nested_tuple_as_global_name(tmp_path):
    f = tmp_path / "tensor00000_000"
    # a million-deep tuple: stopped by the opcode cap long before anything could hash it
    f.write_bytes(_stack_global(b")" + b"\x85" * 1_000_000))
    with deadline(5), pytest.raises(CheckpointError, match="opcodes"):
        parse_tensor_file(f)
    # within the cap: refused by type, never hashed, compared or printed
    f.write_bytes(_stack_global(b")" + b"\x85" * 9000))
    with deadline(5), pytest.raises(CheckpointError, match="global named by a 1-tuple") as e:
        parse_tensor_file(f)
    assert_clean(str(e.value))
    f.write_bytes(_stack_global(b"\x8c\x05numpy", name=b")" + b"\x85" * 9000))
    with pytest.raises(CheckpointError, match="global named by"):
        parse_tensor_file(f)


def test_hostile_global_names_are_printed_safely(tmp_path):
    f = tmp_path / "tensor00000_000"
    name = ("os\n\x1b[2Jrm -rf ~\r" + "A" * 100_000).encode()
    f.write_bytes(b"\x80\x04X" + len(name).to_bytes(4, "little") + name + b"\x8c\x06system\x93.")
    with pytest.raises(UnsafePickleError) as e:
        parse_tensor_file(f)
    assert_clean(str(e.value))
    assert "\\n\\x1b[2J" in str(e.value) and "tensor00000_000" in str(e.value)


# ---- 2. bounded header ---------------------------------------------------------------------------

@pytest.mark.parametrize("flood", [
    b"N" * 40_000_000,                           # 40 MB of NONE opcodes
    b"(" * 40_000_000,                           # MARK flood
    b"N" + b"\x94" * 5_000_000,                  # memo flood
    b"X" + (2_000_000).to_bytes(4, "little") + b"a" * 2_000_000,     # a 2 MB string
    b"\x8d" + (1 << 62).to_bytes(8, "little"),   # a string longer than any file
])
def test_header_floods_are_rejected_quickly(tmp_path, flood):
    f = tmp_path / "tensor00000_000"
    f.write_bytes(b"\x80\x04" + flood + b".")
    t = time.perf_counter()
    with deadline(5), pytest.raises(CheckpointError, match="tensor00000_000"):
        parse_tensor_file(f)
    assert time.perf_counter() - t < 0.5


# ---- 3. the tensor file list ---------------------------------------------------------------------

def test_stray_huge_index_is_named_without_building_a_list(p1):
    (p1 / "ckpt-0" / "tensor99999999999_000").write_bytes(b"x")
    msg = refused(p1, CheckpointError, seconds=2)
    assert "tensor00026_000 is missing" in msg and "tensor99999999999_000" in msg


@pytest.mark.parametrize("name", ["tensor²_000", "tensor٣_000", "tensor1 _000", "tensor" + "9" * 240 + "_000",
                                  "tensor\n\x1b[31m_000"])
def test_odd_tensor_names_are_refused(p1, name):
    (p1 / "ckpt-0" / name).write_bytes(b"x")
    msg = refused(p1, CheckpointError, seconds=2)
    assert "is not a tensor file name" in msg


def test_undecodable_tensor_name_is_refused_printably(p1):
    os.close(os.open(os.fsencode(p1 / "ckpt-0") + b"/tensor\xff\x1b_000", os.O_CREAT | os.O_WRONLY))
    msg = refused(p1, CheckpointError, seconds=2)
    assert "is not a tensor file name" in msg


def test_nbytes_and_close_survive_files_removed_after_load(p1):
    ck = Checkpoint(p1)
    n = ck.nbytes
    for f in ck.files:
        f.unlink()
    assert ck.nbytes == n
    ck.check_intact()                  # unlinked, not shrunk: the maps still hold the data
    ck.close()


def test_duplicate_index_is_refused(p1):
    shutil.copy(p1 / "ckpt-0" / "tensor00000_000", p1 / "ckpt-0" / "tensor0_000")
    msg = refused(p1, CheckpointError)
    assert "two files claim tensor index 0: tensor00000_000 and tensor0_000" in msg


def test_a_missing_file_is_named(p1):
    (p1 / "ckpt-0" / "tensor00013_000").unlink()
    assert "tensor00013_000 is missing (12 files have higher indices, up to tensor00025_000)" in refused(p1)


# ---- 4. files that are not regular files ---------------------------------------------------------

def _fifo(p):
    os.mkfifo(p)


def _folder(p):
    p.mkdir()


def _socket(p):
    s = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(p.parent)                 # a relative name: AF_UNIX paths are limited to 108 bytes
    try:
        s.bind(p.name)
    finally:
        os.chdir(cwd)
    return s


def _dangling(p):
    p.symlink_to(p.parent / "nowhere")


def _loop(p):
    p.symlink_to(p)


@pytest.mark.parametrize("make", [_fifo, _folder, _socket, _dangling, _loop])
@pytest.mark.parametrize("index", [3, 7, 0])
def test_non_regular_tensor_files(p1, make, index):
    target = p1 / "ckpt-0" / f"tensor{index:05d}_000"
    target.unlink()
    keep = make(target)
    msg = refused(p1, CheckpointError, seconds=3)
    assert f"tensor{index:05d}_000" in msg
    if keep is not None:
        keep.close()


@pytest.mark.parametrize("make", [_fifo, _folder, _dangling, _loop])
def test_non_regular_config(p1, make):
    (p1 / "config.json").unlink()
    make(p1 / "config.json")
    msg = refused(p1, ConfigError, seconds=3)
    assert "config.json" in msg


# ---- 5. shapes -----------------------------------------------------------------------------------

def _long1(n: int) -> bytes:
    b = n.to_bytes((n.bit_length() + 8) // 8 or 1, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


@pytest.mark.parametrize("dims", [(2 ** 63,), (2 ** 64 + 5,), (2 ** 40, 2 ** 40), (2 ** 62, 0),
                                  (2 ** 31, 2 ** 31, 2 ** 31), (-1,), (1,) * 9, (2 ** 2000,)])
def test_huge_or_negative_dims(p1, dims):
    f = p1 / "ckpt-0" / "tensor00001_000"           # the final norm, shape (128,)
    data = f.read_bytes()
    i = data.index(b"K\x80\x85")                     # BININT1 128, TUPLE1
    shape = b"(" + b"".join(_long1(n) for n in dims) + b"t"
    f.write_bytes(data[:i] + shape + data[i + 3:])
    with deadline(2), pytest.raises(CheckpointError, match="tensor00001_000") as e:
        parse_tensor_file(f)
    assert_clean(str(e.value))
    refused(p1, CheckpointError)


# ---- 6. config.json ------------------------------------------------------------------------------

def _set(p1, section, key, raw: str):
    """Set config[section][key] to the raw JSON text `raw` (None: delete the key)."""
    d = json.loads((p1 / "config.json").read_text())
    if raw is None:
        del d[section][key]
        (p1 / "config.json").write_text(json.dumps(d))
    else:
        d[section][key] = "__RAW__"
        (p1 / "config.json").write_text(json.dumps(d).replace('"__RAW__"', raw))


@pytest.mark.parametrize("section,key,raw,expect", [
    ("language_model", "sequence_len", "1" + "0" * 400, "sequence_len"),
    ("language_model", "sequence_len", "1e400", "sequence_len"),
    ("transformer", "rope_base", "1e400", "rope_base"),
    ("transformer", "emb_size", "1" + "0" * 5000, "emb_size.*5001-digit"),
    ("language_model", "sequence_len", "100000000", r"sequence_len.*outside 1\.\.1048576"),
    ("transformer", "num_layers", '"2"', "num_layers.*must be an integer"),
    ("transformer", "num_experts", "true", "num_experts.*must be an integer, got true"),
    ("transformer", "num_experts", "null", "num_experts"),
    ("transformer", "num_experts", "[8]", "num_experts"),
    ("transformer", "num_experts", "8.5", "num_experts"),
    ("transformer", "num_experts", "0", "num_experts"),
    ("transformer", "num_kv_heads", "-8", "num_kv_heads"),
    ("transformer", "rms_norm_eps", "0", "rms_norm_eps"),
    ("transformer", "attn_logit_cap", "NaN", "NaN"),
    ("transformer", "num_layer", "2", "unknown key 'transformer.num_layer' .did you mean 'num_layers'"),
    ("language_model", "sequence_lenght", "64", "did you mean 'sequence_len'"),
    ("language_model", "pad_token", "512", "pad_token"),
])
def test_bad_config_values(p1, section, key, raw, expect):
    _set(p1, section, key, raw)
    msg = refused(p1, ConfigError, seconds=2)
    assert "config.json" in msg
    import re
    assert re.search(expect, msg), msg


@pytest.mark.parametrize("text,expect", [
    ("[" * 1_000_000 + "]" * 1_000_000, "nested too deeply"),
    ('{"language_model":' * 200_000 + "1" + "}" * 200_000, "nested too deeply"),
    (b'{"language_model": {"vocab_size": 512\xff}}', "not UTF-8"),
    ("[1, 2]", "not a JSON object"),
    ('"grok"', "not a JSON object"),
    ('{"transfomer": {}, "language_model": {}}', "did you mean 'transformer'"),
    ('{"language_model": 3}', "section 'language_model' must be a JSON object"),
    ('{"language_model": {}, "num_layers": 2}', "belongs inside"),
    ("", "cannot read config"),
])
def test_bad_config_files(p1, text, expect):
    (p1 / "config.json").write_bytes(text.encode() if isinstance(text, str) else text)
    msg = refused(p1, ConfigError, seconds=3)
    assert expect in msg and "config.json" in msg


def test_grok1_sizes_are_admitted():
    c = GrokConfig.from_dict({"language_model": {"vocab_size": 131072, "sequence_len": 8192},
                              "transformer": {"emb_size": 6144, "key_size": 128, "num_q_heads": 48,
                                              "num_kv_heads": 8, "num_layers": 64, "num_experts": 8,
                                              "widening_factor": 8, "capacity_factor": 1.0,
                                              "shard_activations": True, "data_axis": "data"}})
    assert (c.ffn_size, c.sequence_len, c.vocab_size) == (32768, 8192, 131072)


# ---- 7. SIGBUS: files truncated after load -------------------------------------------------------

def test_check_intact_names_a_shrunken_expert_file(p1):
    ck = Checkpoint(p1)
    ck.check_intact()
    L = ck.config.num_layers
    victim = ck.files[file_index(1, 1, L)]           # layer 1's moe/linear_1 (down) weights
    os.truncate(victim, 1000)
    with pytest.raises(CheckpointError) as e:
        ck.check_intact()
    assert victim.name in str(e.value) and "shrank" in str(e.value)
    assert_clean(str(e.value))
    ck.close()
    ck.check_intact()                                # nothing mapped: nothing to fault on


def test_check_intact_is_cheap(tmp_path):
    ck = Checkpoint(copy_fixture(tmp_path, "p3_e8_l12_order"))    # 36 mapped expert files
    ck.check_intact()
    t = time.perf_counter()
    for _ in range(100):
        ck.check_intact()
    per_file = (time.perf_counter() - t) / 100 / len(ck._mapped)
    assert per_file < 1e-6 * 20       # Grok-1's 192 expert files well under 1 ms (usually ~1 us each)


def test_dense_arrays_are_private_and_expert_weights_mapped(p1):
    import mmap
    ck = Checkpoint(p1)

    def mapped(a):
        while a is not None and not isinstance(a, mmap.mmap):
            a = a.obj if isinstance(a, memoryview) else a.base
        return a is not None

    lw = ck.layers[0]
    for a in (ck.embeddings, lw.wq.w, lw.wk.w, lw.wv.w, lw.wo.w):
        assert not mapped(a) and not a.flags.writeable
    for a in (ck.final_norm, lw.attn_norm, lw.router, lw.wq.s, lw.w_gate.s, lw.w_down.s):
        assert not mapped(a)            # float32 copies
    for a in (lw.w_gate.w, lw.w_up.w, lw.w_down.w):
        assert mapped(a) and not a.flags.writeable


def test_dense_files_truncated_after_load_cannot_crash_a_forward(p1):
    """The embedding, final norm and every attention/norm/router file of layer 0 are cut to
    100 bytes after load; a prefill then runs (the data is private) or raises a GrokError."""
    code = f"""
import os, sys, grokcpu
from grokcpu.checkpoint import file_index
from grokcpu.errors import GrokError
m = grokcpu.load({str(p1)!r}, threads=1)
files, L = m.ckpt.files, m.config.num_layers
for i in [0, 1] + [file_index(l, off, L) for l in range(L) for off in range(3, 12)]:
    os.truncate(files[i], 100)
try:
    m.new_session().prefill([1, 2, 3])
except GrokError as e:
    print("GrokError", e)
    sys.exit(1)
print("ran")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert r.returncode in (0, 1), (r.returncode, r.stderr[-2000:])
    assert r.returncode == 0 and "ran" in r.stdout, r.stdout + r.stderr[-2000:]


def test_file_shrunk_between_parse_and_read_is_named(p1, monkeypatch):
    """A dense file that shrinks after its header was parsed is refused by the guarded read."""
    from grokcpu import checkpoint as ckmod
    real = ckmod.Checkpoint._check_shapes

    def shrink_then_check(self):
        real(self)
        os.truncate(self.files[0], 200)
    monkeypatch.setattr(ckmod.Checkpoint, "_check_shapes", shrink_then_check)
    msg = refused(p1, CheckpointError)
    assert "tensor00000_000" in msg and "shrank" in msg


# ---- 8. messages ---------------------------------------------------------------------------------

def test_grok_error_is_one_bounded_printable_line():
    e = GrokError("bad\nline\r\x1b[31mred\x07\u202eevil\udcff" + "x" * 10_000 + "END",
                  hint="do\nthis" + "y" * 1000)
    s = str(e)
    assert_clean(s)
    assert len(s) <= 500
    assert s.startswith("bad\\nline\\r\\x1b[31mred\\x07\\u202eevil\\udcff") and "END" in s
    assert "…" in e.message and "…" in e.hint
    assert str(CheckpointError("short", hint="h")) == "short (hint: h)"


# ---- no code runs from a checkpoint --------------------------------------------------------------

@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_os_system_is_refused_and_never_called(p1, tmp_path, protocol):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (p1 / "ckpt-0" / "tensor00009_000").write_bytes(pickle.dumps(Evil(), protocol=protocol))
    msg = refused(p1, UnsafePickleError)
    assert "tensor00009_000" in msg and "system" in msg
    assert not marker.exists()


# ---- seeded mutation fuzz over the loader and config.json ----------------------------------------

FUZZ_SEED, FUZZ_CASES, CASE_SECONDS = 20240317, 300, 5.0

_OPS = [b"(", b"N", b"t", b")", b"\x85", b"\x86", b"\x87", b"\x93", b"R", b"b", b"\x81", b".", b"\x94",
        b"h\x00", b"h\xff", b"j\xff\xff\xff\xff", b"q\x07", b"}", b"]", b"s", b"u", b"a", b"e",
        b"\x8c\x05numpy", b"\x8c\x07ndarray", b"\x8c\x02os", b"\x8c\x06system", b"\x8c\x08bfloat16",
        b"J\xff\xff\xff\xff", b"K\x80", b"M\xff\xff", b"\x8a\x09" + b"\xff" * 9, b"\x8a\x00",
        b"B\xff\xff\xff\x7f", b"C\x05", b"\x8e" + b"\xff" * 8, b"X\xff\xff\xff\x00", b"\x95" + b"\xff" * 8,
        b"\x80\x09", b"G" + b"\x7f\xf0" + b"\x00" * 6, b"cos\nsystem\n", b"\x88", b"\x89", b"\xff", b"\x00"]
_NAMES = ["tensor0_000", "tensor00000_000", "tensor00026_000", "tensor00099_000", "tensor99999999999_000",
          "tensor²_000", "tensor_000", "tensor-1_000", "tensor00003_001", ".tensor00003_000",
          "tensor00003_000.part", "tensor\n_000", "tensor0000000000000000001_000"]
_VALUES = ["0", "-1", "1", "2", "3", "7", "8", "64", "512", "65536", "1048577", "9223372036854775808",
           "1" + "0" * 5000, "1e400", "-1e400", "NaN", "Infinity", "0.5", "2.0", "1e-30", '"8"', '""',
           "true", "false", "null", "[]", "[8]", "{}", '{"a": 1}', "[" * 3000 + "]" * 3000]


def _own(p: Path) -> bytes:
    """Replace the link `p` by a private copy and return its bytes."""
    data = p.read_bytes()
    p.unlink()
    p.write_bytes(data)
    return data


def _mutate_tensor(rng: random.Random, d: Path, log: list, touched: set) -> None:
    ck = d / "ckpt-0"
    files = sorted(ck.iterdir())
    if not files:
        return
    f = rng.choice(files)
    kind = rng.choice(["flip", "flip", "truncate", "insert", "insert", "delete", "splice",
                       "rename", "remove", "duplicate", "special"])
    log.append(f"{kind} {f.name}")
    touched.add(f)
    if kind in ("rename", "remove", "duplicate", "special"):
        if kind in ("rename", "duplicate"):
            new = ck / rng.choice(_NAMES)
            touched.add(new)
            if new == f or (new.is_dir() and not new.is_symlink()) or (kind == "duplicate" and not f.is_file()):
                return
            if os.path.lexists(new):
                new.unlink()           # never write through a link made by an earlier mutation
            f.rename(new) if kind == "rename" else shutil.copyfile(f, new)
        elif kind == "remove":
            f.unlink()
        else:
            f.unlink()
            rng.choice([_fifo, _folder, _dangling, _loop])(f)
        return
    if f.is_symlink() and not f.exists():
        return
    try:
        data = bytearray(_own(f))
    except OSError:                    # a folder or FIFO made by an earlier mutation
        return
    near = lambda: rng.choice([rng.randrange(0, min(len(data), 300) or 1),       # noqa: E731
                               max(0, len(data) - rng.randrange(1, 80)),
                               rng.randrange(0, len(data) or 1)])
    if kind == "flip" and data:
        for _ in range(rng.randint(1, 4)):
            i = min(near(), len(data) - 1)
            data[i] ^= rng.choice([1, 0x80, 0xFF, rng.randrange(256)])
    elif kind == "truncate":
        del data[rng.randrange(0, len(data) + 1):]
    elif kind == "insert":
        i = near()
        data[i:i] = b"".join(rng.choice(_OPS) for _ in range(rng.randint(1, 6)))
    elif kind == "delete":
        i = near()
        del data[i:i + rng.randint(1, 16)]
    elif kind == "splice":
        other = rng.choice(files)
        data = bytearray(other.read_bytes()) if other.is_file() else data
    f.write_bytes(bytes(data))


def _mutate_config(rng: random.Random, d: Path, log: list, touched: set) -> None:
    p = d / "config.json"
    touched.add(p)
    try:
        text = _own(p).decode("utf-8")
        cfg = json.loads(text)
    except (OSError, ValueError, RecursionError):
        return
    kind = rng.choice(["value", "value", "value", "rename", "delete", "add", "section", "bytes", "cut"])
    log.append(f"config {kind}")
    if kind == "bytes":
        p.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))))
        return
    if kind == "cut":
        p.write_text(text[:rng.randrange(len(text))])
        return
    sec = rng.choice(["language_model", "transformer"])
    if not isinstance(cfg.get(sec), dict) or not cfg[sec]:
        return
    key = rng.choice(sorted(cfg[sec]))
    raw = None
    if kind == "value":
        cfg[sec][key] = "__RAW__"
        raw = rng.choice(_VALUES)
        log[-1] += f" {sec}.{key}={raw[:20]}"
    elif kind == "rename":
        i = rng.randrange(len(key))
        new = key[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz_²\n") + key[i + 1:]
        cfg[sec][new] = cfg[sec].pop(key)
        log[-1] += f" {key!r}->{new!r}"
    elif kind == "delete":
        del cfg[sec][key]
        log[-1] += f" {sec}.{key}"
    elif kind == "add":
        cfg[sec][rng.choice(["extra", key.upper(), key + "s", "model"])] = rng.choice([1, "x", None, [1]])
    elif kind == "section":
        cfg[sec] = rng.choice([None, [], 3, "x", {}])
        log[-1] += f" {sec}"
    text = json.dumps(cfg)
    p.write_text(text.replace('"__RAW__"', raw) if raw is not None else text)


def _links(src: Path, dst: Path) -> Path:
    """dst mirrors src through symlinks (cheap); mutations replace links with private files."""
    (dst / "ckpt-0").mkdir(parents=True)
    for p in (src / "ckpt-0").iterdir():
        (dst / "ckpt-0" / p.name).symlink_to(p)
    (dst / "config.json").symlink_to(src / "config.json")
    return dst


def _restore(src: Path, dst: Path, touched: set) -> None:
    """Undo a case's mutations: every touched name back to a link into src (or gone)."""
    for p in touched:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif os.path.lexists(p):
            p.unlink()
        orig = src / p.relative_to(dst)
        if orig.exists():
            p.symlink_to(orig)


def test_mutation_fuzz(tmp_path):
    """A few hundred seeded cases: 1-3 random mutations of a fixture copy, then Checkpoint()
    must load or raise a clean GrokError within CASE_SECONDS, with bounded memory."""
    import resource
    pristine = {n: copy_fixture(tmp_path / "pristine", n) for n in ("p1_e8_l2_basic", "p3_e8_l12_order")}
    rng = random.Random(FUZZ_SEED)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    failures, outcomes = [], {"loaded": 0, "refused": 0}
    t0 = time.perf_counter()
    work = {n: _links(src, tmp_path / f"work-{n}") for n, src in pristine.items()}
    for case in range(FUZZ_CASES):
        name = "p3_e8_l12_order" if case % 5 == 4 else "p1_e8_l2_basic"
        d, log, touched = work[name], [], set()
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            (_mutate_config if rng.random() < 0.3 else _mutate_tensor)(rng, d, log, touched)
        try:
            with deadline(CASE_SECONDS):
                try:
                    ck = Checkpoint(d if rng.random() < 0.8 else d / "ckpt-0")
                    ck.check_intact()
                    ck.close()
                    outcomes["loaded"] += 1
                except GrokError as e:
                    outcomes["refused"] += 1
                    msg = str(e)
                    if len(msg) > 520 or not all(c.isprintable() for c in msg):
                        failures.append((case, log, f"unclean message {msg!r}"))
        except Exception as e:                           # noqa: BLE001 - any other outcome is the bug
            failures.append((case, log, f"{type(e).__name__}: {str(e)[:300]}"))
        _restore(pristine[name], d, touched)
    elapsed = time.perf_counter() - t0
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024   # MiB (Linux: KiB)
    assert not failures, "\n".join(f"case {c}: {' / '.join(l)}: {w}" for c, l, w in failures[:10])
    assert outcomes["refused"] > FUZZ_CASES // 3 and outcomes["loaded"] > 0, outcomes
    assert elapsed < 25, elapsed
    assert grown < 256, grown


def test_bare_folder_with_absurd_shapes_names_the_folder(tmp_path):
    """Without config.json the sizes come from the shapes; out-of-bounds ones are refused."""
    import grokcpu.formats.pickle_writer as pw
    from grokcpu.synth import make_checkpoint
    make_checkpoint(tmp_path / "m", dict(vocab_size=16, sequence_len=16, emb_size=128, key_size=128,
                                         num_q_heads=1, num_kv_heads=1, num_layers=1, num_experts=2,
                                         num_selected_experts=1, ffn_size=64), seed=1)
    bare = tmp_path / "bare"
    shutil.copytree(tmp_path / "m" / "ckpt-0", bare / "ckpt-0")
    Checkpoint(bare)                                        # the shapes imply a valid config
    big = np.zeros((1, 70_000), np.float32)                 # emb_size 70000 > 65536
    pw.write_ndarray(bare / "ckpt-0" / "tensor00000_000", big.shape, "<f4", [big.tobytes()])
    msg = refused(bare, CheckpointError)
    assert "ckpt-0: the tensor shapes imply" in msg and "emb_size" in msg
