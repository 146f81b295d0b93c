"""Loading the released format: layout, zero copy, and refusal of damaged or hostile files."""

import os
import pickle
import pickletools
import shutil

import numpy as np
import pytest

import grokcpu
from grokcpu.checkpoint import Checkpoint, file_index, layer_file_order, param_path
from grokcpu.errors import CheckpointError, GrokError, UnsafePickleError
from grokcpu.formats.grok1_pickle import ArrayRef, parse_tensor_file

from conftest import FIXTURES, need_shared


@pytest.fixture
def p1(tmp_path):
    """A writable copy of the smallest fixture."""
    need_shared()
    dst = tmp_path / "p1"
    shutil.copytree(FIXTURES / "p1_e8_l2_basic", dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def test_layer_order_is_lexicographic():
    assert layer_file_order(12) == [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    assert file_index(10, 0, 12) == 2 + 12 * 2
    assert param_path(2 + 12 * 2 + 5, 12) == "transformer/decoder_layer_10/multi_head_attention/query/w"
    assert param_path(0, 64) == "language_model/in_out_embed/embeddings"
    assert param_path(769, 64) == "transformer/decoder_layer_9/router/w"


def test_every_file_maps_to_the_manifest_path_shape_and_payload(fixture):
    """Our file -> parameter mapping and payload offsets against config.json and pickletools."""
    ck = Checkpoint(fixture.path)
    files = fixture.cfg["checkpoint"]["files"]
    assert len(files) == len(ck.refs)
    for i, (entry, ref) in enumerate(zip(files, ck.refs)):
        assert param_path(i, ck.config.num_layers) == entry["path"]
        lenfield = {"SHORT_BINBYTES": 1, "BINBYTES": 4, "BINBYTES8": 8}
        payloads = [pos + 1 + lenfield[op.name] for op, arg, pos in pickletools.genops(open(ck.files[i], "rb").read())
                    if op.name in lenfield and len(arg) > 1]
        if isinstance(ref, ArrayRef):
            assert list(ref.shape) == entry["shape"] and ref.dtype == "f4"
            arrays = [ref]
        else:
            assert list(ref.weight.shape) == entry["weight_shape"]
            assert list(ref.scales.shape) == entry["scales_shape"] and ref.scales.dtype == "bf16"
            arrays = [ref.weight, ref.scales]
        # each payload starts right after its opcode and length field
        assert [a.offset for a in arrays] == payloads


def test_arrays_are_read_only_and_expert_weights_are_views_of_the_files(fixture):
    ck = Checkpoint(fixture.path)
    lw = ck.layers[0]
    for a in (ck.embeddings, lw.wq.w, lw.w_gate.w, lw.w_down.w):
        assert not a.flags.writeable
    for a in (lw.w_gate.w, lw.w_up.w, lw.w_down.w):      # mapped, zero copy
        assert not a.flags.owndata and _backed_by_mmap(a)
    assert not _backed_by_mmap(ck.embeddings) and not _backed_by_mmap(lw.wq.w)
    ref = ck.refs[0]
    with open(ck.files[0], "rb") as f:                   # the dense copy holds the file's bytes
        f.seek(ref.offset)
        assert f.read(ref.nbytes) == ck.embeddings.tobytes()
    # scales: bf16 widened exactly
    raw = ck.array(ck.refs[file_index(0, 1, ck.config.num_layers)].scales)
    np.testing.assert_array_equal(lw.w_down.s.view(np.uint32), raw.astype(np.uint32) << 16)


def _backed_by_mmap(a) -> bool:
    import mmap
    while a is not None and not isinstance(a, mmap.mmap):
        a = a.obj if isinstance(a, memoryview) else getattr(a, "base", None)
    return a is not None


def test_expert_byte_ranges_are_the_expert_slices(fixture):
    ck = Checkpoint(fixture.path)
    lw = ck.layers[-1]
    e = ck.config.num_experts - 1
    for (path, off, n), w in zip(ck.expert_ranges(ck.config.num_layers - 1, e), (lw.w_gate, lw.w_up, lw.w_down)):
        with open(path, "rb") as f:
            f.seek(off)
            assert f.read(n) == w.w[e].tobytes()


def test_ckpt0_folder_itself_finds_the_config_beside_it(fixture):
    ck = Checkpoint(fixture.path / "ckpt-0")
    assert ck.config.num_layers == fixture.cfg["transformer"]["num_layers"]
    assert ck.config.key_size == fixture.cfg["transformer"]["key_size"]


def test_bare_ckpt0_with_unguessable_heads_asks_for_config(p1, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(p1 / "ckpt-0", bare / "ckpt-0")
    with pytest.raises(CheckpointError, match="key_size"):      # head size 8, not Grok-1's 128
        grokcpu.load(bare)


def test_hostile_global_is_refused_without_side_effects(p1, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    target = p1 / "ckpt-0" / "tensor00007_000"
    target.write_bytes(pickle.dumps(Evil(), protocol=4))
    with pytest.raises(UnsafePickleError) as e:
        grokcpu.load(p1)
    msg = str(e.value)
    assert "tensor00007_000" in msg and ("posix.system" in msg or "os.system" in msg)
    assert "\n" not in msg
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps({"a": 1}, protocol=4),                     # a dict, not an array
    b"cbuiltins\neval\n(S'1+1'\ntR.",                       # protocol-0 GLOBAL to eval
    pickle.dumps(b"x" * 10, protocol=2),
])
def test_other_foreign_pickles_are_refused(p1, payload):
    (p1 / "ckpt-0" / "tensor00001_000").write_bytes(payload)
    with pytest.raises(CheckpointError) as e:
        grokcpu.load(p1)
    assert "tensor00001_000" in str(e.value)


@pytest.mark.parametrize("keep", [0, 10, 150, 1000, -3])
def test_truncated_file_is_refused_naming_it(p1, keep):
    f = p1 / "ckpt-0" / "tensor00002_000"
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(CheckpointError) as e:
        grokcpu.load(p1)
    assert "tensor00002_000" in str(e.value)


def test_wrong_shape_is_refused_naming_the_file(p1):
    ck = p1 / "ckpt-0"
    shutil.copy(ck / "tensor00007_000", ck / "tensor00005_000")   # query [D, H*d] where key belongs
    with pytest.raises(CheckpointError) as e:
        grokcpu.load(p1)
    assert "tensor00005_000" in str(e.value) and "multi_head_attention/key" in str(e.value)


def test_missing_file_and_missing_folder(p1, tmp_path):
    (p1 / "ckpt-0" / "tensor00013_000").unlink()
    with pytest.raises(CheckpointError, match="tensor00013_000 is missing"):
        grokcpu.load(p1)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        grokcpu.load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no ckpt-0"):
        grokcpu.load(tmp_path)


def test_config_that_disagrees_with_the_files(p1):
    import json
    cfg = json.loads((p1 / "config.json").read_text())
    cfg["transformer"]["emb_size"] = 96
    (p1 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="should be"):
        grokcpu.load(p1)
    (p1 / "config.json").write_text("{not json")
    with pytest.raises(GrokError, match="cannot read config"):
        grokcpu.load(p1)


def test_parse_never_reads_payloads(p1):
    """A payload longer than the file is reported as truncation, before any array exists."""
    f = p1 / "ckpt-0" / "tensor00000_000"
    data = bytearray(f.read_bytes())
    i = data.index(b"B\x00\x00\x04\x00")      # BINBYTES of the 512x128 float32 embedding
    data[i + 1:i + 5] = (10 ** 9).to_bytes(4, "little")
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="runs past the end"):
        parse_tensor_file(f)


def test_bare_ckpt0_infers_grok_geometry(medium_ckpt, tmp_path):
    bare = tmp_path / "bare"
    (bare / "ckpt-0").mkdir(parents=True)
    for p in (medium_ckpt / "ckpt-0").iterdir():
        (bare / "ckpt-0" / p.name).symlink_to(p)
    inferred = Checkpoint(bare).config
    given = Checkpoint(medium_ckpt).config
    for f in ("vocab_size", "emb_size", "num_layers", "num_experts", "ffn_size", "num_q_heads",
              "num_kv_heads", "key_size", "embedding_multiplier_scale", "attn_output_multiplier"):
        assert getattr(inferred, f) == pytest.approx(getattr(given, f)), f


def test_load_is_fast_and_maps_instead_of_reading(medium_ckpt):
    """Load in a fresh process: little Python time, and RSS grows by far less than the files."""
    import subprocess
    import sys
    code = (
        "import time, psutil, grokcpu, grokcpu.model, numba, numpy;"
        "p = psutil.Process(); r0 = p.memory_info().rss; t = time.perf_counter();"
        f"m = grokcpu.load({str(medium_ckpt)!r});"
        "print(time.perf_counter() - t, p.memory_info().rss - r0, m.ckpt.nbytes)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    seconds, grown, size = (float(v) for v in out.split())
    assert size > 100e6
    assert seconds < 1.0
    assert grown < 0.1 * size
