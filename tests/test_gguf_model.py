"""GGUF models end to end: ckpt-0 fixtures converted by `grok-cli convert`, run by the engine.

F32 files against the reference's logits; Q8_0 files against a float64 forward (refmodel) over
gguf-py's own dequantization of the same file; the demo model's greedy tokens; convert's
atomicity and shards; the CLI on a GGUF model; the expert cache over GGUF files (the logits of
the memory map, bit for bit; byte accounting and the auto budget in the file's own types); files
whose experts are grid i-quants (random blocks) against a float64 forward and through the cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from typer.testing import CliRunner

import grokcpu
import refmodel
from conftest import ROOT, greedy_direct
from grokcpu.cli import app
from grokcpu.formats.convert import TYPES, convert
from grokcpu.formats.gguf import open_gguf
from grokcpu.formats.quantize import ENCODERS

TOL = 2e-3


def converted(fixture, tmp_path, qtype: str, **kw):
    out = tmp_path / f"{fixture.name}-{qtype}.gguf"
    convert(fixture.path, out, qtype, **kw)
    return out


def run(path, prompt, decode_tokens):
    model = grokcpu.load(path, threads=1)
    s = model.new_session()
    pre = s.prefill(prompt)
    dec = np.stack([s.decode(t) for t in decode_tokens])
    return pre, dec


def test_f32_gguf_gives_the_reference_logits(fixture, tmp_path):
    pre, dec = run(converted(fixture, tmp_path, "f32"), fixture.prompt, fixture.decode_tokens)
    ref_pre, ref_dec = fixture.load("prefill_logits_f32act.npy"), fixture.load("decode_logits_f32act.npy")
    assert np.abs(pre - ref_pre).max() <= TOL and np.abs(dec - ref_dec).max() <= TOL
    assert (pre.argmax(-1) == ref_pre.argmax(-1)).all() and (dec.argmax(-1) == ref_dec.argmax(-1)).all()


def dequantized(m, name) -> np.ndarray:
    """A tensor's values, float64, decoded by gguf-py from the file's bytes."""
    t = m.tensors[name]
    raw = m.data(name).reshape(*t.shape[:-1], -1)
    if t.type == QT.F32:
        return raw.view(np.float32).astype(np.float64)
    if t.type == QT.F16:
        return raw.view(np.float16).astype(np.float64)
    return gguf.quants.dequantize(raw, t.type).astype(np.float64)


def float64_checkpoint(path):
    """The file's weights as refmodel reads a checkpoint: float64, input-major."""
    from grokcpu.formats.gguf import grok_config
    m = open_gguf(path)
    cfg = grok_config(m)
    T = lambda a: np.swapaxes(a, -1, -2)          # noqa: E731  GGUF [out, in] -> ours [in, out]
    layers = []
    for n in range(cfg.num_layers):
        g = lambda k: dequantized(m, f"blk.{n}.{k}.weight")   # noqa: E731
        layers.append(SimpleNamespace(
            attn_norm=g("attn_norm"), attn_post_norm=g("attn_output_norm"), moe_norm=g("ffn_norm"),
            moe_post_norm=g("layer_output_norm"), wq=T(g("attn_q")), wk=T(g("attn_k")), wv=T(g("attn_v")),
            wo=T(g("attn_output")), router=T(g("ffn_gate_inp")), w_gate=T(g("ffn_gate_exps")),
            w_up=T(g("ffn_up_exps")), w_down=T(g("ffn_down_exps"))))
    return m, SimpleNamespace(config=cfg, embeddings=dequantized(m, "token_embd.weight"),
                              final_norm=dequantized(m, "output_norm.weight"), layers=layers)


def test_q8_0_gguf_matches_a_float64_forward_over_its_own_bytes(fixture, tmp_path):
    path = converted(fixture, tmp_path, "q8_0")
    m, ck = float64_checkpoint(path)
    with m:
        for name, t in m.tensors.items():       # matrices Q8_0 (F16 where rows are not 32s); the rest F32
            if len(t.shape) == 1 or "gate_inp" in name:
                assert t.type == QT.F32, name
            else:
                assert t.type == (QT.Q8_0 if t.shape[-1] % 32 == 0 else QT.F16), name
        assert sum(t.type == QT.Q8_0 for t in m.tensors.values()) >= 4 * ck.config.num_layers
        toks = fixture.prompt + fixture.decode_tokens
        want = refmodel.forward(ck, toks)
    pre, dec = run(path, fixture.prompt, fixture.decode_tokens)
    got = np.concatenate([pre, dec])
    assert np.abs(got - want).max() <= TOL
    assert (got.argmax(-1) == want.argmax(-1)).all()
    # and not the float32 model's logits: the quantization shows
    assert np.abs(pre - fixture.load("prefill_logits_f32act.npy")).max() > 10 * TOL


def test_gguf_to_gguf_requantizes_to_the_same_bytes(fixture, tmp_path):
    """f32 GGUF -> q8_0 equals ckpt-0 -> q8_0 tensor for tensor (the f32 file holds ckpt-0's exact values)."""
    f32 = converted(fixture, tmp_path, "f32")
    direct = converted(fixture, tmp_path, "q8_0")
    again = tmp_path / "again.gguf"
    convert(f32, again, "q8_0")
    with open_gguf(direct) as a, open_gguf(again) as b:
        assert list(a.tensors) == list(b.tensors)
        for name in a.tensors:
            assert a.tensors[name].type == b.tensors[name].type
            np.testing.assert_array_equal(a.data(name), b.data(name))


def test_demo_greedy_tokens_via_f32_gguf_equal_ckpt0(demo_path, model, tok, tmp_path):
    out = tmp_path / "demo.gguf"
    convert(demo_path, out, "f32")
    g = grokcpu.load(out, threads=1)
    ids = tok.encode("The answer to life the universe and everything is")
    want = greedy_direct(model, ids, 12)
    assert greedy_direct(g, ids, 12) == want
    # the GGUF carries the tokenizer: the CLI needs nothing beside the file
    r = CliRunner().invoke(app, ["generate", "--model", str(out), "--temperature", "0", "--ignore-eos", "-n", "12",
                                 "--threads", "1", "The answer to life the universe and everything is"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == tok.decode(want) + "\n"
    # llama.cpp is told to encode prompts as the reference does: no [BOS], no [EOS]
    m = open_gguf(out)
    assert m.metadata["tokenizer.ggml.add_bos_token"] is False and m.metadata["tokenizer.ggml.add_eos_token"] is False
    m.close()


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args] + ["--threads", "1"], catch_exceptions=False)


def test_gguf_through_the_cli(demo_path, tmp_path):
    out = tmp_path / "demo-q8.gguf"
    r = cli("convert", "--model", demo_path, "--out", out, "--type", "q8_0")
    assert r.exit_code == 0, r.stderr
    assert "convert: 100%" in r.stderr and f"wrote {out}" in r.stderr
    r = cli("info", "--model", out)
    assert r.exit_code == 0, r.stderr
    assert "ffn_gate_exps         Q8_0" in r.stdout and "output_norm           F32" in r.stdout
    assert "layers 4" in r.stdout and "memory plan" in r.stdout and "expert budget" in r.stdout
    r = cli("bench", "--model", out, "-p", "8", "-g", "4", "-r", "1", "--json")
    assert r.exit_code == 0, r.stderr
    # batch decodes sessions together (several rows per product): the same texts from the F32
    # GGUF as from ckpt-0
    f32 = tmp_path / "demo-f32.gguf"
    assert cli("convert", "--model", demo_path, "--out", f32, "--type", "f32").exit_code == 0
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "Once upon"}\n{"id": 2, "prompt": "The cat sat on the"}\n')
    texts = []
    for model in (demo_path, f32):
        o = tmp_path / f"out-{model.name}.jsonl"
        r = cli("batch", "--model", model, "-i", tmp_path / "in.jsonl", "-o", o, "--temperature", "0", "-n", "6",
                "--ignore-eos")
        assert r.exit_code == 0, r.stderr
        texts.append(sorted((d["id"], d["text"]) for d in map(json.loads, o.read_text().splitlines())))
    assert texts[0] == texts[1] and len(texts[0]) == 2 and all(t for _, t in texts[0])
    r = cli("generate", "--model", out, "--expert-cache-gb", "0.002", "--pin-experts", "0:1", "--stats", "-n", "4", "hi")
    assert r.exit_code == 0, r.stderr
    assert "expert cache lru 1.82 MB" in r.stderr, r.stderr      # 5 slots of 363 kB (Q8_0, down F16)
    for flag, value, match in (("--offload", "dense", "--offload dense runs ckpt-0 models only"),
                               ("--unembed", "int8", "--unembed int8 is for ckpt-0 models")):
        r = cli("generate", "--model", out, flag, value, "hi")
        assert r.exit_code == 1
        lines = [x for x in r.stderr.splitlines() if x and not x.startswith("note:")]
        assert len(lines) == 1 and match in lines[0] and "hint:" in lines[0], r.stderr


def test_convert_errors_are_one_line(demo_path, tmp_path):
    out = tmp_path / "x.gguf"
    missing = [k for k, (t, _) in TYPES.items() if t != QT.F32 and int(t) not in ENCODERS]
    for bad, match in [(["--type", "q3_k"], "--type 'q3_k' is not one of"),
                       (["--split-max-size", "lots"], "--split-max-size 'lots' is not a size")] + \
            [(["--type", k], f"--type {k} needs the") for k in missing[:1]]:
        r = cli("convert", "--model", demo_path, "--out", out, *bad)
        assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and match in r.stderr, r.stderr
    assert not out.exists() and os.listdir(tmp_path) == []
    r = cli("convert", "--model", tmp_path / "nothing", "--out", out)
    assert r.exit_code == 1 and "no such checkpoint folder" in r.stderr


def test_split_output_loads(fixture, tmp_path):
    whole = converted(fixture, tmp_path, "q8_0")
    size = whole.stat().st_size
    (tmp_path / "split").mkdir()
    parts = converted(fixture, tmp_path / "split", "q8_0", split_max_size=size // 3)
    shards = sorted(parts.parent.glob(f"{fixture.name}-q8_0-*-of-*.gguf"))
    assert len(shards) >= 3 and not parts.exists()
    assert shards[0].name == f"{fixture.name}-q8_0-00001-of-{len(shards):05d}.gguf"
    assert sorted(os.listdir(parts.parent)) == [s.name for s in shards]       # no temporary left
    with open_gguf(shards[-1]) as m:
        assert len(m.shards) == len(shards)
    a = run(whole, fixture.prompt, fixture.decode_tokens)
    b = run(shards[1], fixture.prompt, fixture.decode_tokens)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


KILL = """
import os, signal, sys
from grokcpu.cli.convert import _terminable
from grokcpu.formats.convert import convert
def progress(done, total, name):
    if done > total // 2:
        os.kill(os.getpid(), signal.SIG{sig})
_terminable(convert, sys.argv[1], sys.argv[2], "q8_0", 0, None, progress)   # as grok-cli convert runs it
"""


@pytest.mark.parametrize("sig", ["KILL", "INT", "TERM"])
def test_convert_killed_midway_leaves_no_output(demo_path, tmp_path, sig):
    out = tmp_path / "out.gguf"
    p = subprocess.run([sys.executable, "-c", KILL.format(sig=sig), str(demo_path), str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert not out.exists()
    left = os.listdir(tmp_path)
    if sig == "INT":                     # an exception unwinds: the temporary folder is removed too
        assert left == [] and "KeyboardInterrupt" in p.stderr
    elif sig == "TERM":                  # grok-cli turns SIGTERM into SystemExit: the same unwinding
        assert left == [] and p.returncode == 128 + 15
    else:                                # SIGKILL: only the hidden temporary folder can remain,
        assert left and all(n.startswith(".out.gguf.tmp-") for n in left)
        live = tmp_path / f".out.gguf.tmp-{os.getppid()}"  # (a live process's is kept)
        live.mkdir()
        convert(demo_path, out, "q8_0")  # until the next conversion to the same file sweeps it
        assert sorted(os.listdir(tmp_path)) == sorted(["out.gguf", live.name])


@pytest.mark.parametrize("qtype,layout", [(QT.Q4_0, "per-expert"), (QT.Q8_0, "merged")])
def test_gguf_written_by_gguf_py_matches_a_float64_forward(tmp_path, qtype, layout):
    """A file quantized by gguf-py itself (another type, the older one-tensor-per-expert layout
    too): prefill and decode against the float64 forward over the values gguf-py wrote."""
    from test_gguf import write_grok
    written = write_grok(tmp_path / "m.gguf", layout=layout, seed=11, qtype=qtype)
    got, want = logits_and_float64(tmp_path / "m.gguf", written, layout)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 2e-5 * scale
    assert (got.argmax(-1) == want.argmax(-1)).all()


def logits_and_float64(path, written, layout="merged"):
    """The model's logits (prefill of 16 rows: the BLAS path, then 2 decode steps: the products
    on the file's blocks) and refmodel's float64 forward over the values write_grok wrote."""
    T = lambda a: np.swapaxes(a, -1, -2).astype(np.float64)       # noqa: E731
    model = grokcpu.load(path, threads=1)
    c = model.config

    def experts(n, part):
        if layout == "merged":
            return T(written[f"blk.{n}.ffn_{part}_exps.weight"])
        return np.stack([T(written[f"blk.{n}.ffn_{part}.{e}.weight"]) for e in range(c.num_experts)])

    layers = [SimpleNamespace(
        attn_norm=written[f"blk.{n}.attn_norm.weight"], attn_post_norm=written[f"blk.{n}.attn_output_norm.weight"],
        moe_norm=written[f"blk.{n}.ffn_norm.weight"], moe_post_norm=written[f"blk.{n}.layer_output_norm.weight"],
        wq=T(written[f"blk.{n}.attn_q.weight"]), wk=T(written[f"blk.{n}.attn_k.weight"]),
        wv=T(written[f"blk.{n}.attn_v.weight"]), wo=T(written[f"blk.{n}.attn_output.weight"]),
        router=T(written[f"blk.{n}.ffn_gate_inp.weight"]), w_gate=experts(n, "gate"), w_up=experts(n, "up"),
        w_down=experts(n, "down")) for n in range(c.num_layers)]
    ck = SimpleNamespace(config=c, embeddings=written["token_embd.weight"].astype(np.float64),
                         final_norm=written["output_norm.weight"], layers=layers)
    toks = [5, 17, 200, 3, 99, 42, 7, 128, 250, 1, 64, 33, 90, 11, 180, 77, 240, 2]
    want = refmodel.forward(ck, toks)
    s = model.new_session()
    pre = s.prefill(toks[:-2])
    dec = np.stack([s.decode(t) for t in toks[-2:]])
    model.close()
    return np.concatenate([pre, dec]), want


# -- the expert cache over GGUF files ----------------------------------------------------------------

# rows of 256 values everywhere, so the K-quants need no fallback; 2 layers: q4_k_m keeps layer
# 1's down projections in Q6_K and layer 0's in Q4_K (llama.cpp's use_more_bits)
KQ = dict(vocab_size=256, sequence_len=64, emb_size=256, key_size=64, num_q_heads=4, num_kv_heads=2,
          num_layers=2, num_experts=4, num_selected_experts=2, ffn_size=512)
CACHE_TOKS = [5, 17, 200, 3, 99, 42, 7, 128, 250, 1, 64, 33, 90, 11, 180, 77, 240]   # 17 rows: the BLAS path
CACHE_DECODE = [2, 60, 131, 9, 255, 44]


@pytest.fixture(scope="module")
def kq_ckpt(tmp_path_factory):
    from grokcpu.synth import make_checkpoint
    out = tmp_path_factory.mktemp("kq")
    make_checkpoint(out, dict(KQ), seed=5)
    return out


def expert_sizes(path) -> list[int]:
    """Bytes of one expert of each layer, from the file's tensor table (gate + up + down)."""
    with open_gguf(path) as m:
        E = m.metadata["grok.expert_count"]
        n = m.metadata["grok.block_count"]
        return [sum(m.tensors[f"blk.{i}.ffn_{p}_exps.weight"].nbytes // E for p in ("gate", "up", "down"))
                if f"blk.{i}.ffn_gate_exps.weight" in m.tensors else
                sum(m.tensors[f"blk.{i}.ffn_{p}.0.weight"].nbytes for p in ("gate", "up", "down")) for i in range(n)]


def cached_run(path, **kw):
    """Logits of prefill + decode steps, and the cache's statistics once every read has landed."""
    model = grokcpu.load(path, threads=1, **kw)
    s = model.new_session()
    pre = s.prefill(CACHE_TOKS)
    dec = np.stack([s.decode(t) for t in CACHE_DECODE])
    st = None
    if model.experts is not None:
        for slot in model.experts.slots:          # a guess may still be in flight: let it land
            slot.ready.wait()
        st = model.stats()["expert_cache"]
        st["pinned_resident"] = all(k in model.experts.where for k in model.experts.pinned)
    model.close()
    return pre, dec, st


def check_cached_runs(path, sizes, slots_list, E):
    """Under budgets below the experts (evictions), with pins, prefetch and LFU: the logits of
    the cache off, bit for bit; every read counted at the expert's size in the file (sizes: per
    layer). Guesses take free slots in prefill, so the prefetch runs leave room for a few."""
    want = cached_run(path, expert_cache_gb="off")
    slot = max(sizes)
    L = len(sizes)
    for n, extra in zip(slots_list, (dict(), dict(prefetch=True, pin_experts=[(1, 2)]),
                                     dict(prefetch=True, expert_cache_policy="lfu"))):
        pre, dec, st = cached_run(path, expert_cache_gb=n * slot * 1.0001 / 1e9, **extra)
        assert np.array_equal(pre, want[0]) and np.array_equal(dec, want[1]), (n, extra)
        assert st["slots"] == n and st["expert_bytes"] == slot and st["budget_bytes"] == n * slot
        assert st["misses"] >= L * E // 2 and st["evictions"] > 0 and st["pinned_resident"]
        for i, d in enumerate(st["per_layer"]):
            assert d["bytes_read"] == (d["misses"] + d["prefetch_issued"]) * sizes[i], (i, d)
        if extra.get("prefetch"):
            assert st["prefetch_issued"] > 0
    assert st["hits"] + st["prefetch_hits"] > 0


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m"])
def test_gguf_expert_cache_gives_the_maps_logits_bit_for_bit(kq_ckpt, tmp_path, qtype):
    path = tmp_path / f"kq-{qtype}.gguf"
    convert(kq_ckpt, path, qtype)
    sizes = expert_sizes(path)
    with open_gguf(path) as m:
        downs = [m.tensors[f"blk.{i}.ffn_down_exps.weight"].type for i in range(2)]
        assert m.tensors["blk.0.ffn_gate_exps.weight"].type == (QT.Q8_0 if qtype == "q8_0" else QT.Q4_K)
    assert downs == ([QT.Q8_0] * 2 if qtype == "q8_0" else [QT.Q4_K, QT.Q6_K])
    # bytes per 256 values: Q8_0 272, Q4_K 144, Q6_K 210 (ckpt-0's int8: 256)
    DF = KQ["emb_size"] * KQ["ffn_size"] // 256
    assert sizes == ([3 * DF * 272] * 2 if qtype == "q8_0" else [3 * DF * 144, DF * (2 * 144 + 210)])
    from grokcpu.formats.gguf_checkpoint import GGUFCheckpoint
    ck = GGUFCheckpoint(path)
    assert ck.expert_bytes == max(sizes) and ck.all_expert_bytes == KQ["num_experts"] * sum(sizes)
    # a slot's matrices: the mapped ones' bytes, type, shape and name, viewing the pool
    from grokcpu.expert_cache import ExpertCache
    cache = ExpertCache(ck, 2 * ck.expert_bytes)
    for key in [(0, 3), (1, 2), (0, 1)]:
        lw = ck.layers[key[0]]
        for got, mapped in zip(cache.acquire(*key), (lw.w_gate[key[1]], lw.w_up[key[1]], lw.w_down[key[1]])):
            assert [got.qtype, got.K, got.name, got.data.shape] == \
                [mapped.qtype, mapped.K, mapped.name, mapped.data.shape]
            assert np.array_equal(got.data, mapped.data) and np.shares_memory(got.data, cache.pool)
        cache.release(*key)
    cache.close()
    ck.close()
    check_cached_runs(path, sizes, (3, 6, 7), KQ["num_experts"])


def test_gguf_expert_cache_per_expert_tensors_and_pieces_cut_inside_experts(tmp_path):
    """The older one-tensor-per-expert layout, and .partNofM pieces (page-aligned cuts, so the
    dense matrices map) whose cuts fall inside experts' ranges: the cache reads them segment by
    segment."""
    import mmap
    from test_gguf import TINY, cut, write_grok
    per = tmp_path / "per.gguf"
    write_grok(per, layout="per-expert", seed=4)
    whole = tmp_path / "whole.gguf"
    write_grok(whole, seed=4)
    piece = 2 * mmap.PAGESIZE
    pieces = cut(whole, -(-whole.stat().st_size // piece), piece)
    with open_gguf(pieces[0]) as m:
        cuts = [(i, e) for i in range(TINY.num_layers) for e in range(TINY.num_experts)
                if any(len(segs) > 1 for segs in m.expert_segments(i, e))]
    assert len(cuts) >= 2
    sizes = [3 * TINY.ffn_size * TINY.emb_size // 32 * 34] * TINY.num_layers         # Q8_0
    for path in (per, pieces[1]):
        assert expert_sizes(path) == sizes
        check_cached_runs(path, sizes, (2, 6, 7), TINY.num_experts)


def test_auto_budget_counts_the_gguf_bytes(kq_ckpt, tmp_path, monkeypatch):
    """auto_budget, the memory plan and a loaded model's cache size a GGUF's experts in the
    file's own types (Q4_K + Q6_K here, not ckpt-0's int8)."""
    import psutil

    from grokcpu.expert_cache import auto_budget
    from grokcpu.formats.gguf_checkpoint import GGUFCheckpoint
    from grokcpu.plan import memory_plan
    path = tmp_path / "kq.gguf"
    convert(kq_ckpt, path, "q4_k_m")
    sizes = expert_sizes(path)
    with open_gguf(path) as m:
        small = sum(t.nbytes for t in m.tensors.values() if len(t.shape) == 1 or "gate_inp" in t.name)
    ck = GGUFCheckpoint(path)
    c = ck.config
    assert ck.resident_bytes == small                       # norms and routers, read at load
    dense = ck.nbytes - c.num_experts * sum(sizes) - small  # mapped: to be held by the page cache
    slot, kv, margin = max(sizes), c.kv_cache_bytes(64), 1e9    # 3 % of 10 GB is under the 1 GB floor
    room = 5 * slot + 123
    monkeypatch.setattr(psutil, "virtual_memory",
                        lambda: SimpleNamespace(total=10e9, available=margin + dense + kv + room))
    assert auto_budget(ck, 64) == room
    assert auto_budget(ck, 64, share=1000) == c.num_selected_experts * slot     # the floor
    plan = memory_plan(ck, 64, "auto")
    assert plan["expert_budget_bytes"] == room and plan["experts_held"] == 5
    assert plan["expert_bytes"] == c.num_experts * sum(sizes)
    assert plan["dense_bytes"] + plan["expert_bytes"] == plan["payload_bytes"]
    assert plan["auto_budget_parts"]["resident_non_expert"] == dense
    ck.close()
    model = grokcpu.load(path, threads=1, context=64)
    assert model.experts.nslots == 5 and model.experts.budget_bytes == 5 * slot   # int8 sizes: 3 slots
    model.close()


# -- the grid i-quants -----------------------------------------------------------------------------

# the published Grok-1 IQ3_XS file's mix first (IQ3_XXS, IQ3_S), then every other grid i-quant
IQ_EXPERTS = [(QT.IQ3_XXS, QT.IQ3_XXS, QT.IQ3_S), (QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S), (QT.IQ1_S, QT.IQ1_M, QT.IQ3_S)]


@pytest.mark.parametrize("types", IQ_EXPERTS, ids=["-".join(t.name for t in ts) for ts in IQ_EXPERTS])
def test_iquant_experts_match_a_float64_forward_and_cache(tmp_path, types):
    """Experts in the grid i-quants (gate, up, down: `types`; dense matrices Q8_0): `info` names
    the types; the logits of a float64 forward over gguf-py's values; with the expert cache
    (slots of the file's bytes) under evictions, the map's logits bit for bit."""
    from dataclasses import replace

    from test_gguf import TINY, write_grok
    cfg = replace(TINY, emb_size=256, key_size=128, ffn_size=512)     # expert rows: whole 256-value blocks
    path = tmp_path / "iq.gguf"
    written = write_grok(path, cfg, seed=13, experts=dict(zip(("gate", "up", "down"), types)))
    with open_gguf(path) as m:
        assert [m.tensors[f"blk.1.ffn_{p}_exps.weight"].type for p in ("gate", "up", "down")] == list(types)
    r = cli("info", "--model", path)
    assert r.exit_code == 0 and f"{'ffn_down_exps':<22}{types[2].name} " in r.stdout, r.stdout
    got, want = logits_and_float64(path, written)
    assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()
    sizes = expert_sizes(path)
    assert sizes == [cfg.emb_size * cfg.ffn_size // 256 * sum(gguf.GGML_QUANT_SIZES[t][1] for t in types)] * 2
    check_cached_runs(path, sizes, (3, 6, 7), cfg.num_experts)


# -- a GGUF decode step through the fused one-row kernels ------------------------------------------

ONE_ROW_TOKS = [5, 17, 200, 3, 99]
ONE_ROW_DECODE = [2, 60, 131, 9, 255, 44, 7]


def one_row_file(kq_ckpt, tmp_path, kind: str):
    """kq-*: the KQ checkpoint converted (q4_k_m: Q4_K, Q5_K, Q6_K and Q8_0 matrices in one
    file); tiny-*: TINY written by gguf-py (rows of 64 and 96 values: Q8_0 rows end in blocks
    past the last group of eight; per-expert tensors), Q4_0 a type with no decode product."""
    path = tmp_path / f"{kind}.gguf"
    if kind.startswith("kq-"):
        convert(kq_ckpt, path, kind[3:])
    else:
        from test_gguf import write_grok
        write_grok(path, layout="per-expert", seed=9, qtype=QT.Q8_0 if kind == "tiny-q8_0" else QT.Q4_0)
    return path


def decode_logits(path, one_row: bool, threads: int = 2, **kw) -> tuple[np.ndarray, bool]:
    """Decode logits after a short prefill, with the fused one-row kernels or (one_row False)
    the many-row blocks, as every GGUF decode step ran before them; and whether the step made
    the fused kernels' workspace."""
    model = grokcpu.load(path, threads=threads, **kw)
    model.backend.one_row = model.backend.one_row and one_row
    s = model.new_session()
    s.prefill(ONE_ROW_TOKS)
    got = np.stack([s.decode(t) for t in ONE_ROW_DECODE])
    fused = s.ws._decode is not None
    model.close()
    return got, fused


@pytest.mark.parametrize("kind,activations,cache,threads", [
    ("kq-q8_0", "f32", "auto", 2), ("kq-q8_0", "f32", "off", 2), ("kq-q4_k", "f32", "auto", 2),
    ("kq-q4_k", "q8", "off", 2), ("kq-q4_k", "q8", "auto", 3), ("kq-q4_k_m", "f32", "off", 2),
    ("kq-q4_k_m", "q8", "auto", 2), ("kq-q4_k_m", "f32", "auto", 3), ("tiny-q8_0", "f32", "auto", 2),
    ("tiny-q8_0", "q8", "off", 2), ("tiny-q4_0", "f32", "auto", 2)])
def test_gguf_one_row_kernels_give_the_many_row_blocks_logits_bit_for_bit(kq_ckpt, tmp_path, kind, activations,
                                                                          cache, threads):
    """A decode step of a file whose matrices all have a decode product (Q8_0 and the
    K-quants) runs the fused kernels (kernels/decode.py) with the products of the many-row path
    (kernels/ggml.py): the same logits bit for bit, under both activations, with experts from
    the expert cache's slots or the map. A file of another type (Q4_0) keeps the many-row
    blocks. With 2 threads each of the two routed experts runs on a thread of its own
    (ggml_experts_whole), with 3 one after another, their rows split."""
    path = one_row_file(kq_ckpt, tmp_path, kind)
    opts = dict(activations=activations, expert_cache_gb=cache, threads=threads)
    fused, ran = decode_logits(path, True, **opts)
    rows, ran_rows = decode_logits(path, False, **opts)
    assert ran == (kind != "tiny-q4_0") and not ran_rows
    np.testing.assert_array_equal(fused, rows)
    assert np.isfinite(fused).all() and fused.std() > 0
