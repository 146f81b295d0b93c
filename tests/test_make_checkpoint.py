"""tools/make_checkpoint.py: random-weight checkpoints in the released ckpt-0 format."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared"
import grokcpu.synth as mc


# ---- restricted reader (independent of the writer) ----------------------------------------------

class _Arr:
    def __setstate__(self, state):
        self.state = state


class _Dt:
    def __init__(self, arg, align, copy):
        self.arg = arg

    def __setstate__(self, state):
        self.state = state


class _BF16:
    pass


class _QW:
    pass


_ND = object()


def _reconstruct(cls, shape, code):
    assert cls is _ND and shape == (0,) and code == b"b"
    return _Arr()


class _Unpickler(pickle.Unpickler):
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct, ("numpy", "ndarray"): _ND,
               ("numpy", "dtype"): _Dt, ("ml_dtypes", "bfloat16"): _BF16,
               ("__main__", "QuantizedWeight8bit"): _QW}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} not allowed")
        return self.ALLOWED[(module, name)]


def _array(a: _Arr):
    version, shape, dt, fortran, raw = a.state
    assert version == 1 and fortran is False
    if dt.arg is _BF16:
        assert dt.state == (3, "<", None, None, None, 2, 2, 64)
        u = np.frombuffer(raw, "<u2").reshape(shape)
        return "bfloat16", (u.astype(np.uint32) << 16).view(np.float32)
    npdt = {"f4": np.dtype("<f4"), "i1": np.dtype("i1")}[dt.arg]
    return npdt.name, np.frombuffer(raw, npdt).reshape(shape)


def read(path):
    with open(path, "rb") as f:
        obj = _Unpickler(f).load()
    if isinstance(obj, _Arr):
        return "ndarray", _array(obj)
    assert isinstance(obj, _QW) and list(vars(obj)) == ["weight", "scales"]
    return "QuantizedWeight8bit", (_array(obj.weight), _array(obj.scales))


def dequantize(w, s):
    nb, rows = s.shape[-2], w.shape[-2]
    return w.astype(np.float32) * np.repeat(s, rows // nb, axis=-2)


# ---- helpers -------------------------------------------------------------------------------------

def _make(tmp_path, name, seed=0, **over):
    cfg = dict(mc.PRESETS["tiny"], **over)
    out = tmp_path / name
    doc = mc.make_checkpoint(out, cfg, seed=seed)
    return out, doc


def _check_manifest(out: Path, doc: dict):
    disk = json.loads((out / "config.json").read_text())
    assert disk == doc
    files = doc["checkpoint"]["files"]
    assert doc["checkpoint"]["dir"] == "ckpt-0" and doc["checkpoint"]["num_files"] == len(files)
    assert sorted(p.name for p in (out / "ckpt-0").iterdir()) == [f"tensor{i:05d}_000" for i in range(len(files))]
    arrays = {}
    for i, e in enumerate(files):
        path = out / "ckpt-0" / e["file"]
        assert e["file"] == f"tensor{i:05d}_000"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == e["sha256"]
        kind, content = read(path)
        assert kind == e["kind"]
        if kind == "ndarray":
            dtype, a = content
            assert dtype == e["dtype"] == "float32" and list(a.shape) == e["shape"]
            assert np.isfinite(a).all()
        else:
            (wd, w), (sd, s) = content
            assert (wd, list(w.shape)) == (e["weight_dtype"], e["weight_shape"]) == ("int8", e["weight_shape"])
            assert (sd, list(s.shape)) == (e["scales_dtype"], e["scales_shape"]) == ("bfloat16", e["scales_shape"])
            assert w.min() >= -127 and (s > 0).all()
        arrays[e["path"]] = content
    return arrays


# ---- tests ---------------------------------------------------------------------------------------

def test_tiny_layout_config_and_manifest(tmp_path):
    out, doc = _make(tmp_path, "tiny")
    tr, lm = doc["transformer"], doc["language_model"]
    D, F, E = tr["emb_size"], tr["ffn_size"], tr["num_experts"]
    assert doc["checkpoint"]["num_files"] == 2 + 12 * tr["num_layers"] == 26
    assert doc["generator"]["script"] == "tools/make_checkpoint.py"
    assert lm["embedding_multiplier_scale"] == math.sqrt(D)
    assert lm["output_multiplier_scale"] == 0.5773502691896257
    assert tr["attn_output_multiplier"] == tr["key_size"] ** -0.5
    assert (lm["pad_token"], lm["eos_token"], tr["rope_base"], tr["rms_norm_eps"], tr["attn_logit_cap"],
            tr["model_parallel_scale_blocks"]) == (0, 2, 10000, 1e-5, 30.0, 8)
    arrays = _check_manifest(out, doc)
    files = doc["checkpoint"]["files"]
    assert [f["path"] for f in files[:2]] == ["language_model/in_out_embed/embeddings", "language_model/rms_norm/scale"]
    suffixes = ["moe/linear/w", "moe/linear_1/w", "moe/linear_v/w", "multi_head_attention/key/w",
                "multi_head_attention/linear/w", "multi_head_attention/query/w",
                "multi_head_attention/value/w", "rms_norm/scale", "rms_norm_1/scale",
                "rms_norm_2/scale", "rms_norm_3/scale", "router/w"]
    assert [f["path"] for f in files[2:14]] == [f"transformer/decoder_layer_0/{s}" for s in suffixes]
    p = "transformer/decoder_layer_1/"
    Q, KV = tr["num_q_heads"] * tr["key_size"], tr["num_kv_heads"] * tr["key_size"]
    shapes = {e["path"]: (e.get("weight_shape") or e["shape"], e.get("scales_shape")) for e in files}
    assert shapes[p + "moe/linear/w"] == ([E, D, F], [E, 1, F])
    assert shapes[p + "moe/linear_1/w"] == ([E, F, D], [E, 8, D])
    assert shapes[p + "multi_head_attention/linear/w"] == ([Q, D], [8, D])
    assert shapes[p + "multi_head_attention/key/w"] == ([D, KV], [1, KV])
    assert shapes[p + "multi_head_attention/query/w"] == ([D, Q], [1, Q])
    assert shapes[p + "router/w"] == ([D, E], None)
    assert shapes["language_model/in_out_embed/embeddings"] == ([lm["vocab_size"], D], None)

    # numerically sane weights: dequantized std ~ 1/sqrt(fan_in), mean ~ 0
    for e in files:
        content = arrays[e["path"]]
        if e["kind"] == "QuantizedWeight8bit":
            (_, w), (_, s) = content
            deq = dequantize(w, s)
            target = 1 / math.sqrt(w.shape[-2])              # input-major: fan_in = rows
            assert abs(deq.std() / target - 1) < 0.1, e["path"]
            assert abs(deq.mean()) < 0.05 * target, e["path"]
        else:
            a = content[1]
            if e["path"].endswith("/scale"):
                assert abs(a.mean() - 1) < 0.02 and 0.01 < a.std() < 0.1
            else:                                             # embeddings / router
                assert abs(a.std() * math.sqrt(D) - 1) < 0.1 and abs(a.mean()) < 0.1 / math.sqrt(D)


def test_same_structure_as_fixture_config():
    cfg_path = SHARED / "fixtures" / "p1_e8_l2_basic" / "config.json"
    if not cfg_path.is_file():
        pytest.skip(f"shared fixtures not found at {cfg_path.parent.resolve()}")
    fx = json.loads(cfg_path.read_text())
    ours = mc.resolve_config(mc.PRESETS["tiny"])         # tiny = the geometry of p1
    for section in ("language_model", "transformer"):
        assert list(ours[section]) == list(fx[section])
        diff = {k for k in fx[section] if ours[section][k] != fx[section][k]}
        assert diff <= {"sequence_len"}, (section, diff)
    e_fx, e_ours = fx["checkpoint"]["files"], mc.tensor_specs(ours)
    assert [e["path"] for e in e_fx] == [s.path for s in e_ours]
    for fixture in sorted((SHARED / "fixtures").glob("*/config.json")):   # a fixture config round-trips
        fx = json.loads(fixture.read_text())
        ours = mc.resolve_config(fx)
        assert ours == {k: fx[k] for k in ("language_model", "transformer")}
        specs = mc.tensor_specs(ours)
        for s, e in zip(specs, fx["checkpoint"]["files"], strict=True):
            assert (s.file, s.path, s.kind) == (e["file"], e["path"], e["kind"])
            assert list(s.shape) == e.get("shape", e.get("weight_shape"))
            assert list(s.scales_shape) == e.get("scales_shape", [])


def test_twelve_layers_lexicographic_order(tmp_path):
    out, doc = _make(tmp_path, "l12", num_layers=12)
    files = doc["checkpoint"]["files"]
    assert doc["checkpoint"]["num_files"] == len(files) == 2 + 12 * 12
    order = [files[2 + 12 * r]["path"].split("/")[1] for r in range(12)]
    assert order == ["decoder_layer_0", "decoder_layer_1", "decoder_layer_10", "decoder_layer_11"] + \
        [f"decoder_layer_{i}" for i in range(2, 10)]
    assert files[26]["path"] == "transformer/decoder_layer_10/moe/linear/w"   # right after layer 1's block
    assert files[25]["path"] == "transformer/decoder_layer_1/router/w"
    for r, name in enumerate(order):
        assert all(f["path"].split("/")[1] == name for f in files[2 + 12 * r: 14 + 12 * r])
    _check_manifest(out, doc)
    # each tensor's bytes depend on its parameter path, not on its file index or the layer count
    out2, doc2 = _make(tmp_path, "l2", num_layers=2)
    by_path = {e["path"]: e["sha256"] for e in files}
    for e in doc2["checkpoint"]["files"]:
        assert by_path[e["path"]] == e["sha256"]


def test_deterministic(tmp_path):
    a, doc_a = _make(tmp_path, "a", seed=7)
    b, doc_b = _make(tmp_path, "b", seed=7)
    c, doc_c = _make(tmp_path, "c", seed=8)
    for i in range(doc_a["checkpoint"]["num_files"]):
        f = f"ckpt-0/tensor{i:05d}_000"
        assert (a / f).read_bytes() == (b / f).read_bytes()
        assert (a / f).read_bytes() != (c / f).read_bytes()
    assert doc_a["checkpoint"] == doc_b["checkpoint"]


def test_multi_block_tensors(tmp_path, monkeypatch):
    # tiny tensors fit one generation block; force many blocks to exercise the streaming path
    monkeypatch.setattr(mc, "BLOCK_BYTES", 4096)
    seen = []
    out = tmp_path / "blocks"
    doc = mc.make_checkpoint(out, mc.PRESETS["tiny"], seed=3, progress=lambda d, t, f: seen.append((d, t)))
    _check_manifest(out, doc)
    total = seen[-1][1]
    assert seen[-1][0] == total and len(seen) > 100
    assert all(x[0] <= y[0] for x, y in zip(seen, seen[1:]))
    assert total == sum(s.payload_bytes for s in mc.tensor_specs(mc.resolve_config(mc.PRESETS["tiny"])))


def test_refuses_overwrite_and_low_disk(tmp_path, monkeypatch, capsys):
    out = tmp_path / "x"
    assert mc.main(["--preset", "tiny", "--layers", "1", "--out", str(out), "--quiet"]) == 0
    assert (out / "config.json").is_file() and len(list((out / "ckpt-0").iterdir())) == 14
    before = (out / "config.json").read_bytes()
    assert mc.main(["--preset", "tiny", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "--force" in err[-1]
    assert (out / "config.json").read_bytes() == before
    with pytest.raises(mc.CheckpointError):
        mc.make_checkpoint(out, mc.PRESETS["tiny"])
    # --force replaces it, removing the files of the old (larger) layout too
    assert mc.main(["--preset", "tiny", "--layers", "3", "--out", str(out), "--quiet", "--force"]) == 0
    assert mc.main(["--preset", "tiny", "--layers", "2", "--out", str(out), "--quiet", "--force",
                    "--seed", "5", "--emb", "64", "--ffn", "96"]) == 0
    doc = json.loads((out / "config.json").read_text())
    assert doc["transformer"]["emb_size"] == 64 and doc["transformer"]["ffn_size"] == 96
    assert doc["language_model"]["embedding_multiplier_scale"] == 8.0
    assert len(list((out / "ckpt-0").iterdir())) == 26
    _check_manifest(out, doc)

    class Usage:
        free = 1000
    monkeypatch.setattr(mc.shutil, "disk_usage", lambda p: Usage)
    assert mc.main(["--preset", "tiny", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "not enough disk space" in err[-1]
    assert not (tmp_path / "y" / "ckpt-0").exists()


def test_bad_config_rejected():
    with pytest.raises(mc.ConfigError):
        mc.resolve_config(dict(mc.PRESETS["tiny"], num_q_heads=12))      # not a multiple of 8 KV heads
    with pytest.raises(mc.ConfigError):
        mc.resolve_config(dict(mc.PRESETS["tiny"], ffn_size=180))        # 8 row blocks need F % 8 == 0
    with pytest.raises(mc.ConfigError):
        mc.resolve_config({"emb_size": 64})
    full = mc.resolve_config({"transformer": {k: v for k, v in mc.PRESETS["tiny"].items()
                                              if k not in ("vocab_size", "sequence_len")},
                              "language_model": {"vocab_size": 512}})
    assert full["transformer"]["ffn_size"] == 176 and full["language_model"]["sequence_len"] == 8192
    big = mc.resolve_config(mc.PRESETS["grok-1"])
    assert len(mc.tensor_specs(big)) == 770
    assert 315e9 < mc.checkpoint_bytes(big) < 320e9
