"""The GGUF reader: layouts (one file, shards, .partNofM pieces), merged and per-expert experts,
Grok-1 metadata -> GrokConfig, the tokenizer rebuilt from tokenizer.ggml.*, and hostile files.

Files are tiny Grok-architecture models written to tmp_path with gguf-py's GGUFWriter; the bytes
we read back are checked against what was written, through gguf-py's own dequantization.
"""

from __future__ import annotations

import json
import mmap
import random
import struct
from dataclasses import replace

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from conftest import SHARED, TOKENIZER, need_shared
from grokcpu.config import GrokConfig
from grokcpu.errors import CheckpointError
from grokcpu.formats.convert import add_vocab, grok_writer, sentencepiece_vocab
from grokcpu.formats.quantize import quantize
from grokcpu.formats.gguf import (
    GGUFModel, check_grok_tensors, detect_format, grok_config, grok_tensor_shapes, open_gguf, tokenizer_proto)
from grokcpu.tokenizer import Tokenizer

TINY = GrokConfig(vocab_size=256, sequence_len=128, emb_size=64, key_size=32, num_q_heads=2, num_kv_heads=1,
                  num_layers=2, num_experts=4, num_selected_experts=2, ffn_size=96,
                  embedding_multiplier_scale=8.0, attn_output_multiplier=32 ** -0.5)


def write_grok(path, cfg: GrokConfig = TINY, layout: str = "merged", seed: int = 0, qtype=QT.Q8_0,
               experts: dict | None = None, **kw):
    """A tiny Grok GGUF: matrices qtype (quantized by gguf-py), norms and router F32; experts
    {"gate"|"up"|"down": grid i-quant type}: those expert tensors random blocks of that type.
    Returns {name: float32 values as written (dequantized)}."""
    rng = np.random.default_rng(seed)
    w = grok_writer(path, cfg, **kw)
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    written = {}
    for name, shape in grok_tensor_shapes(cfg, layout).items():
        x = rng.standard_normal(shape).astype(np.float32)
        part = name.split(".")[2].removeprefix("ffn_").removesuffix("_exps") if name.startswith("blk.") else ""
        if len(shape) == 1 or "gate_inp" in name:
            w.add_tensor(name, x)
            written[name] = x
        else:
            t = (experts or {}).get(part, qtype)
            q = encode(x, t) if t == qtype else grid_blocks(t, shape, rng)
            w.add_tensor(name, q, raw_dtype=t)
            written[name] = gguf.quants.dequantize(q, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def encode(x: np.ndarray, qtype) -> np.ndarray:
    """x (float32 [..., K]) as ggml type qtype: by gguf-py, or by grokcpu for the K-quants, which
    gguf-py cannot quantize."""
    if qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
        return quantize(x.reshape(-1, x.shape[-1]), int(qtype)).reshape(*x.shape[:-1], -1)
    return gguf.quants.quantize(x, qtype)


def grid_blocks(qtype, shape, rng) -> np.ndarray:
    """Random blocks of a grid i-quant (gguf-py cannot quantize to one) for a matrix of `shape`,
    d scaled so that the values' RMS is about 1, as the other matrices'."""
    from test_quants import random_matrix, with_d
    *lead, K = shape
    q = with_d(qtype, random_matrix(qtype, int(np.prod(lead)), K, rng), 1.0)
    rms = np.sqrt(np.mean(np.square(gguf.quants.dequantize(q, qtype), dtype=np.float64)))
    return with_d(qtype, q, 1.0 / rms).reshape(*lead, -1)


def values(m: GGUFModel, name: str) -> np.ndarray:
    """A tensor's float values from our zero-copy bytes, dequantized by gguf-py."""
    t = m.tensors[name]
    raw = m.data(name)
    if t.type == QT.F32:
        return raw.view(np.float32).reshape(t.shape)
    rows = raw.reshape(*t.shape[:-1], -1)
    return gguf.quants.dequantize(rows, t.type)


def expert_values(m: GGUFModel, layer: int, expert: int) -> list[np.ndarray]:
    """gate, up, down of one expert dequantized from the bytes its ranges point at (pread)."""
    out = []
    for part, segs in zip(("gate", "up", "down"), m.expert_segments(layer, expert)):
        raw = b"".join(open(p, "rb").read()[o:o + n] for p, o, n in segs)
        cols = TINY.emb_size if part != "down" else TINY.ffn_size
        out.append(gguf.quants.dequantize(np.frombuffer(raw, np.uint8).reshape(-1, cols // 32 * 34), QT.Q8_0))
    return out


# -- layouts ---------------------------------------------------------------------------------------

def test_single_file_round_trip(tmp_path):
    written = write_grok(tmp_path / "m.gguf")
    with open_gguf(tmp_path / "m.gguf") as m:
        assert set(m.tensors) == set(written)
        assert m.expert_layout == "merged"
        t = m.tensors["blk.1.ffn_down_exps.weight"]
        assert (t.type, t.shape, t.nbytes) == (QT.Q8_0, (4, 64, 96), 4 * 64 * 96 // 32 * 34)
        for name, x in written.items():
            np.testing.assert_array_equal(values(m, name), x)
        assert not m.data("output_norm.weight").flags.writeable
        np.testing.assert_array_equal(m.read("blk.0.attn_q.weight"), m.data("blk.0.attn_q.weight"))
        assert m.metadata["grok.block_count"] == 2 and m.metadata["general.architecture"] == "grok"
        assert len(m.metadata["tokenizer.ggml.tokens"]) == 256


def test_merged_and_per_expert_give_the_same_expert_bytes(tmp_path):
    merged = write_grok(tmp_path / "merged.gguf", layout="merged", seed=3)
    per = {}
    for name, x in merged.items():      # the same values, split one tensor per expert
        if "_exps" in name:
            for e in range(TINY.num_experts):
                per[name.replace("_exps", f".{e}")] = x[e]
        else:
            per[name] = x
    w = grok_writer(tmp_path / "per.gguf", TINY)
    for name, x in per.items():
        if x.ndim == 1 or "gate_inp" in name:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, QT.Q8_0), raw_dtype=QT.Q8_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with open_gguf(tmp_path / "merged.gguf") as a, open_gguf(tmp_path / "per.gguf") as b:
        assert (a.expert_layout, b.expert_layout) == ("merged", "per-expert")
        for layer in range(TINY.num_layers):
            for e in range(TINY.num_experts):
                ra, rb = a.expert_ranges(layer, e), b.expert_ranges(layer, e)
                assert [n for _, _, n in ra] == [n for _, _, n in rb]
                bytes_a = [open(p, "rb").read()[o:o + n] for p, o, n in ra]
                bytes_b = [open(p, "rb").read()[o:o + n] for p, o, n in rb]
                assert bytes_a == bytes_b
                for got, part in zip(expert_values(a, layer, e), ("gate", "up", "down")):
                    np.testing.assert_array_equal(got, merged[f"blk.{layer}.ffn_{part}_exps.weight"][e])
        cfg = grok_config(b)
        check_grok_tensors(b, cfg)


def test_split_shards_open_from_any_shard(tmp_path):
    written = write_grok(tmp_path / "grok.gguf", split_max_tensors=7)
    shards = sorted(tmp_path.glob("grok-*-of-*.gguf"))
    assert len(shards) == 4 and shards[0].name == "grok-00001-of-00004.gguf"
    for s in (shards[0], shards[3], shards[-1]):
        with open_gguf(s) as m:
            assert set(m.tensors) == set(written)
            assert m.files == [str(p) for p in shards]
            assert m.metadata["grok.embedding_length"] == 64      # the first shard's metadata
            for name, x in written.items():
                np.testing.assert_array_equal(values(m, name), x)
            assert grok_config(m).emb_size == 64
    shards[2].unlink()
    with pytest.raises(CheckpointError, match="grok-00003-of-00004.gguf: missing shard 3 of 4"):
        open_gguf(shards[0])


def cut(src, n_pieces: int, piece_size: int) -> list:
    data = src.read_bytes()
    out = []
    for k in range(n_pieces):
        chunk = data[k * piece_size:(k + 1) * piece_size] if k < n_pieces - 1 else data[k * piece_size:]
        p = src.parent / f"{src.name}.part{k + 1}of{n_pieces}"
        p.write_bytes(chunk)
        out.append(p)
    src.unlink()
    return out


@pytest.mark.parametrize("aligned", [True, False])
def test_part_pieces_read_in_place(tmp_path, aligned):
    written = write_grok(tmp_path / "grok.gguf", seed=5)
    size = (tmp_path / "grok.gguf").stat().st_size
    piece = 2 * mmap.PAGESIZE if aligned else 5000
    pieces = cut(tmp_path / "grok.gguf", -(-size // piece), piece)
    assert len(pieces) >= 3
    with open_gguf(pieces[1]) as m:                      # any piece opens the whole
        assert m.files == [str(p) for p in pieces] and m.nbytes == size
        straddled = 0
        for name, x in written.items():
            t = m.tensors[name]
            segs = m.ranges(name)
            assert sum(n for _, _, n in segs) == t.nbytes
            straddled += len(segs) > 1
            if aligned or len(segs) == 1:
                np.testing.assert_array_equal(values(m, name), x)
            else:
                with pytest.raises(CheckpointError, match="straddles the cut"):
                    m.data(name)
        assert straddled >= 2
        for layer in range(TINY.num_layers):             # segments work across cuts either way
            for e in range(TINY.num_experts):
                for got, part in zip(expert_values(m, layer, e), ("gate", "up", "down")):
                    np.testing.assert_array_equal(got, written[f"blk.{layer}.ffn_{part}_exps.weight"][e])
    assert detect_format(pieces[2]) == "gguf"
    pieces[1].unlink()
    with pytest.raises(CheckpointError, match=r"grok.gguf.part2of\d+: missing piece 2 of"):
        open_gguf(pieces[0])


def test_detect_format(tmp_path):
    write_grok(tmp_path / "m.bin")                       # content decides, not the name
    assert detect_format(tmp_path / "m.bin") == "gguf"
    assert detect_format(tmp_path) == "ckpt-0"
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(CheckpointError, match="neither a GGUF file nor a checkpoint folder"):
        detect_format(tmp_path / "x.gguf")


def test_load_opens_gguf(tmp_path):
    """load() runs a GGUF file (tests/test_gguf_model.py checks its numbers); a damaged one is named."""
    import grokcpu
    write_grok(tmp_path / "m.gguf")
    model = grokcpu.load(tmp_path / "m.gguf", threads=1)
    assert model.config == replace(TINY, attn_output_multiplier=float(np.float32(TINY.attn_output_multiplier)))
    assert np.isfinite(model.new_session().prefill([1, 2, 3])).all()
    model.close()
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        grokcpu.load(tmp_path / "cut.gguf")


# -- Grok metadata -> GrokConfig -------------------------------------------------------------------

def test_config_from_metadata(tmp_path):
    write_grok(tmp_path / "m.gguf")
    with open_gguf(tmp_path / "m.gguf") as m:
        cfg = grok_config(m)
        check_grok_tensors(m, cfg)
    # values the file does not hold at Grok-1's constants come back as the float32 it stores
    assert cfg == replace(TINY, attn_output_multiplier=float(np.float32(TINY.attn_output_multiplier)))


def test_config_defaults_are_grok1_constants(tmp_path):
    """A file without the scale keys gets Grok-1's values; float32-stored ones give the exact constant."""
    g = GrokConfig(vocab_size=32, sequence_len=64, emb_size=256, key_size=128, num_q_heads=2, num_kv_heads=1,
                   num_layers=1, num_experts=2, num_selected_experts=1, ffn_size=32)
    for scales in (False, True):
        w = grok_writer(tmp_path / f"d{scales}.gguf", GrokConfig(**{**g.__dict__}), scales=scales)
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        with open_gguf(tmp_path / f"d{scales}.gguf") as m:
            cfg = grok_config(m)
        assert cfg.embedding_multiplier_scale == 78.38367176906169
        assert cfg.output_multiplier_scale == 0.5773502691896257
        assert cfg.attn_output_multiplier == 0.08838834764831845
        assert cfg.attn_logit_cap == 30.0
        assert (cfg.pad_token, cfg.eos_token, cfg.vocab_size) == (0, 2, 131072)


@pytest.mark.parametrize("key,value,match", [
    ("grok.final_logit_softcapping", 30.0, "final_logit_softcapping = 30.0, but Grok-1"),
    ("grok.rope.dimension_count", 16, "rope.dimension_count = 16, but Grok-1"),
    ("grok.expert_shared_count", 1, "expert_shared_count = 1"),
    ("grok.rope.scaling.type", "linear", "no RoPE scaling"),
    ("grok.attention.output_scale", float("nan"), "attn_output_multiplier"),
    ("grok.attention.layer_norm_rms_epsilon", 2.0, "rms_norm_eps"),
])
def test_config_contradictions_are_errors(tmp_path, key, value, match):
    w = grok_writer(tmp_path / "c.gguf", TINY, scales=False)
    if isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    else:
        w.add_uint32(key, value)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with open_gguf(tmp_path / "c.gguf") as m, pytest.raises(CheckpointError, match=match) as e:
        grok_config(m)
    assert str(tmp_path / "c.gguf") in str(e.value) and "\n" not in str(e.value)


def test_config_needs_the_sizes_and_grok(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "l.gguf"), "llama")
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with open_gguf(tmp_path / "l.gguf") as m, pytest.raises(CheckpointError, match="is 'llama', not 'grok'"):
        grok_config(m)
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "grok")
    w.add_block_count(2)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with open_gguf(tmp_path / "g.gguf") as m, pytest.raises(CheckpointError, match="'grok.context_length' is missing"):
        grok_config(m)


def test_misshaped_or_missing_tensor_is_named(tmp_path):
    written = write_grok(tmp_path / "m.gguf")
    big = TINY.__class__(**{**TINY.__dict__, "ffn_size": 128})
    with open_gguf(tmp_path / "m.gguf") as m:
        with pytest.raises(CheckpointError, match=r"'blk.0.ffn_gate_exps.weight' has shape \[4, 96, 64\], the config needs \[4, 128, 64\]"):
            check_grok_tensors(m, big)
    assert written


# -- tokenizer --------------------------------------------------------------------------------------

def test_tokenizer_round_trip_through_gguf(tmp_path):
    """The real Grok-1 tokenizer written as llama.cpp's converter writes it (user-defined pieces
    become normal), rebuilt from the GGUF: every reference case encodes and decodes the same."""
    need_shared()
    w = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "grok")
    w.add_tokenizer_pre("default")
    add_vocab(w, sentencepiece_vocab(TOKENIZER), 131072)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with open_gguf(tmp_path / "tok.gguf") as m:
        tok = Tokenizer.from_proto(tokenizer_proto(m), "tok.gguf")
    ref = Tokenizer(TOKENIZER)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (131072, 0, 1, 2)
    cases = [json.loads(line) for line in (SHARED / "data" / "tokenizer_cases.jsonl").read_text("utf-8").splitlines()
             if line.strip()]
    assert len(cases) == 41
    for c in cases:
        assert tok.encode(c["text"]) == c["ids"], c["name"]
        assert tok.encode(c["text"], bos=True) == c["ids_with_bos"]
        assert [tok.id_to_piece(i) for i in c["ids"]] == c["pieces"]
        assert tok.decode(c["ids"]) == c["decoded"]
        assert tok.encode_continuation(c["text"]) == ref.encode_continuation(c["text"])
    rng = random.Random(7)                 # beyond the cases: user-defined pieces, runs, bytes, specials
    alphabet = ["\n", "\t", " ", "  ", "a", "7", "é", "你", "😀", " the", "\n\n\n\n\n\n\n\n\n\n\n", "<|mask|>",
                "<|separator|>", "[UNK]", "[BOS]", "▁", "xyz"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 20)))
        assert tok.encode(text) == ref.encode(text), repr(text)
        ids = [rng.randrange(131072) for _ in range(12)]
        assert tok.decode(ids) == ref.decode(ids)


# -- hostile files ----------------------------------------------------------------------------------
# The Talos reports on llama.cpp's gguf.c (CVE-2024-21802, -21825, -21836, -23496, -23605, -25664,
# -25665, -25666) and the later GHSA fixes are all of these classes: a count (tensors, keys, array
# elements) or a length (string, dims product, nbytes) that overflows or exceeds the file, and
# tensor offsets out of bounds; each class has a case below, and the fuzz mixes them.

U8, U32, STR, ARR, U64, BOOL = 0, 4, 8, 9, 10, 7


def s(text) -> bytes:
    b = text if isinstance(text, bytes) else text.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def ti(name, dims, ttype: int = 0, offset: int = 0) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", ttype, offset)


def gguf_file(kvs=(), tensors=(), data=b"", n_kv=None, n_tensors=None, version=3, align=32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % align) + data


GOOD_KV = kv("general.architecture", STR, s("grok"))
F32_8 = ti("a", [8], 0, 0)          # 8 floats at data offset 0


def test_builder_makes_a_valid_file(tmp_path):
    p = tmp_path / "ok.gguf"
    p.write_bytes(gguf_file([GOOD_KV], [F32_8, ti("b", [8], 0, 32)], data=np.arange(16, dtype="<f4").tobytes()))
    with open_gguf(p) as m:
        np.testing.assert_array_equal(m.data("b").view("<f4"), np.arange(8, 16))


HOSTILE = {
    "bad magic": (b"GGML" + bytes(20), "not a GGUF file"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian GGUF"),
    "version 1": (gguf_file(version=1), "GGUF version 1"),
    "tensor count 2^64-1": (gguf_file(n_tensors=2**64 - 1), "claims 0 metadata entries and 18446744073709551615 tensors"),
    "key count 2^63": (gguf_file([GOOD_KV], n_kv=2**63), "claims 9223372036854775808 metadata"),
    "key length 2^64-1": (gguf_file([struct.pack("<Q", 2**64 - 1) + b"k"]), "metadata key #0 at byte 32 claims"),
    "string value length 2^63": (gguf_file([s("k") + struct.pack("<IQ", STR, 2**63)]), "'k' at byte .* claims 9223372036854775808 bytes"),
    "u32 array of 2^62 (n*4 wraps in 64 bits)": (gguf_file([s("k") + struct.pack("<IIQ", ARR, U32, 2**62)]), "array of 4611686018427387904 elements"),
    "string array of 2^60": (gguf_file([s("k") + struct.pack("<IIQ", ARR, STR, 2**60)]), "array of 1152921504606846976 elements"),
    "nested array": (gguf_file([s("k") + struct.pack("<IIQ", ARR, ARR, 1) + struct.pack("<IQ", U8, 1) + b"\0"]), "arrays of arrays"),
    "unknown value type": (gguf_file([kv("k", 99, b"\0" * 8)]), "unknown value type 99"),
    "unknown array element type": (gguf_file([s("k") + struct.pack("<IIQ", ARR, 77, 0)]), "unknown element type 77"),
    "bool byte 2": (gguf_file([kv("k", BOOL, b"\2")]), "neither 0 nor 1"),
    "key not UTF-8": (gguf_file([kv(b"\xff\xfe", U8, b"\0")]), "not UTF-8"),
    "duplicate key": (gguf_file([GOOD_KV, GOOD_KV]), "'general.architecture' appears twice"),
    "alignment 0": (gguf_file([kv("general.alignment", U32, struct.pack("<I", 0))]), "not a power of two"),
    "alignment 48": (gguf_file([kv("general.alignment", U32, struct.pack("<I", 48))]), "not a power of two"),
    "alignment as a string": (gguf_file([kv("general.alignment", STR, s("32"))]), "not a power of two"),
    "unknown ggml type": (gguf_file(tensors=[ti("a", [8], 999)]), "unknown ggml type 999"),
    "removed ggml type Q4_2": (gguf_file(tensors=[ti("a", [32], 4)]), "unknown ggml type 4"),
    "rank 5": (gguf_file(tensors=[ti("a", [1, 1, 1, 1, 1])]), "5 dimensions"),
    "rank 0": (gguf_file(tensors=[ti("a", [])]), "0 dimensions"),
    "zero dimension": (gguf_file(tensors=[ti("a", [8, 0])]), "impossible dimensions"),
    "dims product overflows int64": (gguf_file(tensors=[ti("a", [2**32, 2**32])]), "impossible dimensions"),
    "dims product = 2^62 (nbytes wraps)": (gguf_file(tensors=[ti("a", [2**31, 2**31])]), "run past the end"),
    "offset 2^63": (gguf_file(tensors=[ti("a", [8], 0, 2**63)]), "run past the end"),
    "offset + nbytes wraps": (gguf_file(tensors=[ti("a", [8], 0, 2**64 - 32)], data=bytes(32)), "run past the end"),
    "misaligned offset": (gguf_file(tensors=[ti("a", [8], 0, 4)], data=bytes(64)), "not a multiple of the alignment 32"),
    "overlapping tensors": (gguf_file(tensors=[ti("a", [16]), ti("b", [8], 0, 32)], data=bytes(64)), "'a' and 'b' overlap"),
    "duplicate tensor": (gguf_file(tensors=[F32_8, F32_8], data=bytes(64)), "tensor 'a' appears twice"),
    "tensor name of 64 characters": (gguf_file(tensors=[ti("x" * 64, [8])], data=bytes(32)), "64 characters"),
    "row not whole Q8_0 blocks": (gguf_file(tensors=[ti("a", [33], 8)], data=bytes(64)), "not whole Q8_0 blocks"),
    "data past the end": (gguf_file([GOOD_KV], [F32_8], data=bytes(16)), "run past the end"),
    "empty": (b"", "empty file"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_file(tmp_path, case):
    import tracemalloc
    data, match = HOSTILE[case]
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=match) as e:
            open_gguf(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert msg.startswith(str(p)) and "\n" not in msg
    assert peak < 4 << 20                  # nothing allocated in proportion to a lying count


def test_truncated_anywhere(tmp_path):
    """Every cut of a valid file (header, metadata, tensor infos, data) is a one-line error."""
    write_grok(tmp_path / "m.gguf", TINY)
    full = (tmp_path / "m.gguf").read_bytes()
    p = tmp_path / "cut.gguf"
    with open_gguf(tmp_path / "m.gguf") as m:
        data_start = m.shards[0].data_start
    cuts = sorted(set(range(0, data_start, 37)) | {data_start, data_start + 1, len(full) - 1})
    for n in cuts:
        p.write_bytes(full[:n])
        with pytest.raises(CheckpointError) as e:
            open_gguf(p)
        assert str(e.value).startswith(str(p)), n


def test_shard_name_and_metadata_must_agree(tmp_path):
    write_grok(tmp_path / "grok.gguf", split_max_tensors=7)
    a, b = tmp_path / "grok-00001-of-00004.gguf", tmp_path / "grok-00002-of-00004.gguf"
    tmp = tmp_path / "t"
    a.rename(tmp), b.rename(a), tmp.rename(b)            # shards 1 and 2 swapped by name
    with pytest.raises(CheckpointError, match="is shard 2 of 4, but its name is not NAME-00002-of-00004.gguf"):
        open_gguf(a)
    with pytest.raises(CheckpointError, match=r"grok-00001-of-00004.gguf: its split metadata .* shard 1 of 4"):
        open_gguf(tmp_path / "grok-00003-of-00004.gguf")


def test_not_a_regular_file(tmp_path):
    import os
    os.mkfifo(tmp_path / "pipe.gguf")
    with pytest.raises(CheckpointError, match="named pipe"):
        open_gguf(tmp_path / "pipe.gguf")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(CheckpointError, match="a folder"):
        open_gguf(tmp_path / "dir.gguf")


def test_mutation_fuzz(tmp_path):
    """Seeded mutations of a valid file (byte flips, lying u64s at field positions, cuts): each
    opens, or fails with a one-line CheckpointError naming the file; nothing else, quickly."""
    import signal
    w = grok_writer(tmp_path / "seed.gguf", TINY)
    w.add_token_list([f"t{i}" for i in range(16)])
    w.add_token_scores([float(-i) for i in range(16)])
    w.add_token_types([1] * 16)
    w.add_tensor("token_embd.weight", np.ones((16, 64), np.float32))
    w.add_tensor("blk.0.ffn_gate_exps.weight", gguf.quants.quantize(np.ones((4, 96, 64), np.float32), QT.Q8_0),
                 raw_dtype=QT.Q8_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    seed = (tmp_path / "seed.gguf").read_bytes()
    with open_gguf(tmp_path / "seed.gguf") as m:
        header = m.shards[0].data_start
    rng = random.Random(20261207)
    p = tmp_path / "mut.gguf"
    outcomes = {"ok": 0, "error": 0}

    def on_alarm(signum, frame):
        raise TimeoutError("a mutant took more than 5 s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        for i in range(400):
            b = bytearray(seed)
            for _ in range(rng.randrange(1, 4)):
                kind, at = rng.random(), rng.randrange(min(header, len(b)))
                if kind < 0.5:
                    b[at] = rng.randrange(256)
                elif kind < 0.85:
                    b[at:at + 8] = struct.pack("<Q", rng.choice([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1,
                                                                 rng.randrange(2**64)]))
                else:
                    del b[rng.randrange(len(b)):]
            p.write_bytes(bytes(b))
            signal.setitimer(signal.ITIMER_REAL, 5)
            try:
                with open_gguf(p) as m:
                    for name in m.tensors:
                        m.data(name).sum()
                    try:
                        grok_config(m)
                    except CheckpointError as e:
                        assert "\n" not in str(e)
                outcomes["ok"] += 1
            except CheckpointError as e:
                assert str(e).startswith(str(p)) and "\n" not in str(e), (i, str(e))
                outcomes["error"] += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, old)
    assert outcomes["error"] > 200 and outcomes["ok"] > 10, outcomes
