"""tools/make_gguf_skeleton.py and `info --ram`: a full-geometry Grok-1 GGUF whose headers are
real and whose data is a hole (a sparse file), and the memory plan of a 256 GB machine from it.

The expected sizes are worked out here from ggml's block sizes, not from grokcpu's tables."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import ROOT, TOKENIZER
from grokcpu.cli import app
from grokcpu.formats.convert import convert, skeleton, sparse_ok
from grokcpu.formats.gguf import open_gguf

# Grok-1: vocab, emb, q width (48 x 128), kv width (8 x 128), expert ffn, experts, layers
V, D, Q, KV, F, E, L = 131072, 6144, 48 * 128, 8 * 128, 32768, 8, 64
G = 10**9


def q4_k(n: int) -> int:          # bytes of n values in Q4_K: 144 per block of 256
    return n // 256 * 144


def read_bytes() -> int | None:
    """Bytes this process has read with read/pread so far (Linux's /proc/self/io rchar)."""
    try:
        with open("/proc/self/io") as f:
            return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])
    except OSError:
        return None


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def q4k_skeleton(tmp_path_factory):
    """grok-1 at Q4_K, written by the tool: ~178 GB apparent, a few MB of disk."""
    d = tmp_path_factory.mktemp("skeleton")
    if not sparse_ok(d):
        pytest.skip(f"the filesystem of {d} does not keep sparse files (the skeleton would fill ~178 GB)")
    out = d / "grok-1-Q4_K.gguf"
    tok = ["--tokenizer", str(TOKENIZER)] if TOKENIZER.is_file() else []
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "make_gguf_skeleton.py"), "--preset", "grok-1",
                        "--type", "q4_k", "--out", str(out), *tok], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"wrote {out}: 177.59 GB of zeros" in p.stderr
    return out


def test_skeleton_is_full_size_and_sparse(q4k_skeleton):
    st = os.stat(q4k_skeleton)
    assert st.st_size > 170 * G and st.st_blocks * 512 < 64 << 20
    with open_gguf(q4k_skeleton) as m:        # the loader checks every tensor lies inside the file
        assert m.metadata["general.file_type"] == 14                         # MOSTLY_Q4_K_S
        t = m.tensors["blk.63.ffn_down_exps.weight"]
        assert t.offset + t.nbytes == st.st_size                            # the last tensor ends the file


def test_plan_of_grok1_q4_k_on_256_and_128_gb(q4k_skeleton):
    from grokcpu.formats.gguf_checkpoint import GGUFCheckpoint
    from grokcpu.plan import memory_plan
    size = os.path.getsize(q4k_skeleton)
    r0 = read_bytes()
    ck = GGUFCheckpoint(q4k_skeleton)
    try:
        p = memory_plan(ck, ram=256 * G)
        p128 = memory_plan(ck, ram=128 * G)
    finally:
        ck.close()
    if r0 is not None:                        # headers, norms and routers: no weights read
        assert read_bytes() - r0 < 64 << 20
    assert os.stat(q4k_skeleton).st_blocks * 512 < 64 << 20     # nor written

    one_expert = 3 * q4_k(F * D)                                       # gate, up, down
    norms, router = 4 * D * 4, E * D * 4                               # F32
    attention = q4_k(Q * D) + 2 * q4_k(KV * D) + q4_k(D * Q)           # q, k, v, output
    embedding = q4_k(V * D)                                            # tied: also the output table
    dense = embedding + D * 4 + L * (attention + norms + router)
    kv = 2 * L * 8192 * KV * 4                                         # K and V, float32, at sequence_len
    assert p["expert_bytes"] == L * E * one_expert == 173_946_175_488
    assert p["dense_bytes"] == dense == 3_642_777_600
    assert p["one_expert_bytes"] == one_expert and p["kv_cache_bytes"] == kv
    assert p["file_bytes"] == size and 0 < size - dense - L * E * one_expert < 8 << 20    # + the header
    per_token = L * (attention + norms + router) + D * 4 + embedding // V + embedding + L * 2 * one_expert
    assert p["read_per_token_bytes"] == per_token == 47_129_324_928

    # 256 GB, all available: room for every expert beside the rest and a 3 % margin
    resident = size - L * E * one_expert
    assert p["ram_assumed"] and p["ram_total_bytes"] == p["ram_available_bytes"] == 256 * G
    assert p["auto_budget_parts"]["resident_non_expert"] == resident
    margin = 3 * 256 * G // 100
    assert p["auto_budget_parts"]["margin"] == margin
    assert 256 * G - resident - kv - margin > L * E * one_expert
    assert p["expert_budget_bytes"] == L * E * one_expert
    assert p["experts_held"] == p["experts_total"] == 512
    assert p["fits"] and p["ram_needed_bytes"] == resident + kv + L * E * one_expert + margin
    # 128 GB: the auto budget is what is left, and holds only part of the experts
    room = 128 * G - resident - kv - 3 * 128 * G // 100
    assert p128["expert_budget_bytes"] == room and p128["experts_held"] == room // one_expert == 342
    assert p128["experts_held"] < p128["experts_total"]


def test_info_ram_256g_on_the_skeleton(q4k_skeleton):
    r = cli("info", "--model", q4k_skeleton, "--ram", "256G")
    assert r.exit_code == 0, r.stderr
    out = r.stdout
    assert "memory plan  (ASSUMED --ram: 256.00 GB RAM, all of it available; not this machine's)" in out
    assert "format       GGUF (llama.cpp), 1 file(s), 177.59 GB" in out
    assert "ffn_down_exps         Q4_K 57.98 GB" in out and "layer_output_norm     F32 1.57 MB" in out
    assert "experts            173.95 GB   512 experts of 339.74 MB" in out
    assert "dense weights        3.64 GB" in out and "KV cache             4.29 GB   at context 8192" in out
    assert "expert budget      173.95 GB   (auto): holds 512 of 512 experts (100%)" in out
    assert "fits in 256.00 GB available, every expert resident" in out
    assert "read per token      47.13 GB" in out
    # a plain number is GB; --json says the RAM is assumed
    d = json.loads(cli("info", "--model", q4k_skeleton, "--ram", "128", "--json").stdout)["memory_plan"]
    assert d["ram_assumed"] and d["ram_total_bytes"] == 128 * G and d["experts_held"] == 342
    # this machine's RAM when --ram is left out
    assert "memory plan  (this machine: " in cli("info", "--model", q4k_skeleton).stdout


@pytest.mark.parametrize("value, message", [
    ("lots", "error: --ram 'lots' is not a size (hint: give the RAM in GB, e.g. 256G or 256)"),
    ("-5", "error: --ram '-5' is not a size"),
    ("0", "error: --ram '0' is out of range"),
    ("64k", "error: --ram '64k' is out of range"),
])
def test_info_ram_errors_are_one_line(demo_path, value, message):
    r = cli("info", "--model", demo_path, "--ram", value)
    assert r.exit_code == 1 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith(message), r.stderr


def test_skeleton_header_is_converts(tmp_path):
    """A skeleton's header is byte for byte what convert writes for the same geometry and type
    (q4_k_m: per-layer rules, fallbacks for rows that are not whole blocks), and as long."""
    from grokcpu.checkpoint import Checkpoint
    from grokcpu.synth import make_checkpoint
    if not sparse_ok(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} does not keep sparse files")
    # attn_output's rows of 4 x 48 values are not whole Q5_K blocks: written as Q8_0
    geometry = dict(vocab_size=256, sequence_len=64, emb_size=256, key_size=48, num_q_heads=4, num_kv_heads=2,
                    num_layers=8, num_experts=4, num_selected_experts=2, ffn_size=512)
    make_checkpoint(tmp_path / "ck", dict(geometry), seed=3)
    real, hole = tmp_path / "real.gguf", tmp_path / "hole.gguf"
    convert(tmp_path / "ck", real, "q4_k_m")
    with open_gguf(real) as m:
        start = m.shards[0].data_start
        assert {t.type.name for t in m.tensors.values()} == {"F32", "Q4_K", "Q6_K", "Q8_0"}
    ck = Checkpoint(tmp_path / "ck", weights=False)
    notes = []
    skeleton(hole, ck.config, "q4_k_m", note=notes.append)    # the config convert read from the checkpoint
    ck.close()
    assert any("rows of 192 values (not whole Q5_K blocks) written as Q8_0" in n for n in notes), notes
    assert os.path.getsize(hole) == os.path.getsize(real)
    assert hole.read_bytes()[:start] == real.read_bytes()[:start]
