"""tools/bench.py: its figures on a fixture checkpoint, and its errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, fixture_dirs, need_shared


def _fixture():
    need_shared()
    return fixture_dirs()[0]


def test_bench_json_figures():
    path = _fixture()
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--model", str(path),
                          "--prompt-tokens", "5", "--gen-tokens", "3", "--reps", "2", "--threads", "1",
                          "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    for key in ("prefill_tok_s", "decode_tok_s", "decode_gb_s", "read_gb_s"):
        assert r[key] > 0
    # bytes one decode step streams, summed here from the checkpoint's arrays
    import grokcpu
    m = grokcpu.load(path, expert_cache_gb="off")
    c = m.config
    layers = 0
    for lw in m.layers:
        layers += sum(q.w.nbytes + q.s.nbytes for q in (lw.wq, lw.wk, lw.wv, lw.wo))
        layers += lw.router.nbytes + sum(n.nbytes for n in (lw.attn_norm, lw.attn_post_norm,
                                                               lw.moe_norm, lw.moe_post_norm))
        layers += c.num_selected_experts * sum(q.w[0].nbytes + q.s[0].nbytes
                                                  for q in (lw.w_gate, lw.w_up, lw.w_down))
    # + the final norm, one embedding row in, the output table (plan.read_per_token's parts)
    want = layers + m.ckpt.final_norm.nbytes + c.emb_size * 4 + m.ckpt.embeddings.nbytes
    assert r["decode_bytes_per_token"] == want
    from grokcpu.plan import read_per_token
    parts = read_per_token(m.ckpt)
    assert parts["total"] == want == sum(v for k, v in parts.items() if k != "total")
    q8 = read_per_token(m.ckpt, "int8")       # the int8 output table: V x D int8 + a float32 scale per row
    assert q8["total"] == want - m.ckpt.embeddings.nbytes + c.vocab_size * (c.emb_size + 4)
    assert r["decode_gb_s"] == pytest.approx(want * r["decode_tok_s"] / 1e9)
    # a ceiling before and after each of the 2 runs; each run's fraction against its neighbours
    assert len(r["read_gb_s_runs"]) == 3 and len(r["decode_fraction_runs"]) == 2
    runs = r["tg_tps"]["runs"]
    ceil = r["read_gb_s_runs"]
    fr = [want * runs[i] / 1e9 / ((ceil[i] + ceil[i + 1]) / 2) for i in range(2)]
    np.testing.assert_allclose(r["decode_fraction_runs"], fr, rtol=1e-9)
    assert r["decode_fraction_of_read"] == pytest.approx(float(np.median(fr)))


@pytest.mark.parametrize("args,needle", [(["--gen-tokens", "0"], "--gen-tokens"),
                                          (["--prompt-tokens", "100000"], "context"),
                                          (["--threads", "0"], "--threads 0 is out of range")])
def test_bench_bad_arguments_are_one_line_errors(args, needle):
    path = _fixture()
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--model", str(path), *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert needle in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
