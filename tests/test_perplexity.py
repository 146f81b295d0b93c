"""grok-cli perplexity: a model against itself (KL exactly 0), a Q4_K conversion against its
ckpt-0 model (every figure equal to a float64 numpy computation from the two models' logits),
and bad inputs as one-line errors that leave no temporary file behind."""

import json
import os
import shutil
import tempfile

import numpy as np
import pytest
from typer.testing import CliRunner

import grokcpu
from conftest import FIXTURES, TOKENIZER, need_shared
from grokcpu.cli import app
from grokcpu.demo import corpus_text
from grokcpu.formats.convert import convert

CTX, CHUNKS = 64, 3


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args] + ["--threads", "1"], catch_exceptions=False)


@pytest.fixture
def tmpdir_empty(tmp_path, monkeypatch):
    """A private temporary folder for the reference's logits; the test checks it is left empty."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    yield d
    assert os.listdir(d) == []


def measure(model, reference, *extra):
    r = cli("perplexity", "--model", model, "--reference", reference, "--ctx", CTX, "--chunks", CHUNKS, *extra)
    assert r.exit_code == 0, r.stderr
    return r


def test_a_model_against_itself_is_exact(demo_path, tmpdir_empty):
    r = measure(demo_path, demo_path, "--json")
    d = json.loads(r.stdout)
    assert d["kl_mean"] == d["kl_max"] == d["kl_p99"] == d["max_logit_diff"] == d["rms_dp"] == 0.0
    assert d["top1"] == 1.0 and d["ppl"] == d["ppl_reference"] > 1
    assert d["chunks"] == CHUNKS and d["scored_tokens"] == CHUNKS * CTX // 2 and d["ctx"] == CTX
    for label in ("reference", "model"):             # progress per chunk on stderr
        assert all(f"perplexity: {label} chunk {i}/{CHUNKS}: ppl" in r.stderr for i in range(1, CHUNKS + 1))
    assert "tok/s), model" in r.stderr
    text = measure(demo_path, demo_path).stdout       # the same figures as text
    assert "KL           mean 0.000000" in text and "top-1        100.00% of positions agree" in text
    assert f"PPL          model {d['ppl']:.4f}, reference {d['ppl']:.4f}" in text


def test_accuracy_options_apply_to_the_model_only(demo_path, tmpdir_empty):
    """--unembed int8 changes --model's logits; the reference keeps the exact float32 output layer."""
    exact = json.loads(measure(demo_path, demo_path, "--json").stdout)
    d = json.loads(measure(demo_path, demo_path, "--json", "--unembed", "int8").stdout)
    assert d["ppl_reference"] == exact["ppl"] and d["ppl"] != exact["ppl"]
    assert 0 < d["kl_mean"] < 1e-3 and 0 < d["max_logit_diff"] < 0.1


def log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def scored_logits(path, chunks):
    """The logits that predict the second half of every chunk: each chunk one fresh session's
    prefill, float64 [N * CTX/2, V]."""
    m = grokcpu.load(path, threads=1, context=CTX)
    rows = np.concatenate([m.new_session().prefill(c)[CTX // 2 - 1:-1] for c in chunks])
    m.close()
    return rows.astype(np.float64)


def test_q4_k_against_ckpt0_equals_a_float64_computation(demo_path, tok, tmp_path, tmpdir_empty):
    q4 = tmp_path / "demo-q4_k.gguf"
    convert(demo_path, q4, "q4_k")
    d = json.loads(measure(q4, demo_path, "--json").stdout)
    chunks = np.array(tok.encode(corpus_text())[:CHUNKS * CTX]).reshape(CHUNKS, CTX)
    ref, got = scored_logits(demo_path, chunks), scored_logits(q4, chunks)
    nxt = chunks[:, CTX // 2:].ravel()
    k = np.arange(nxt.size)
    lr, lm = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lr) * (lr - lm)).sum(axis=1)
    diff = np.abs(got - ref).max()
    want = dict(ppl=np.exp(-lm[k, nxt].mean()), ppl_reference=np.exp(-lr[k, nxt].mean()),
                kl_mean=kl.mean(), kl_stderr=kl.std(ddof=1) / np.sqrt(kl.size), kl_median=np.median(kl),
                kl_p99=np.percentile(kl, 99), kl_max=kl.max(), top1=np.mean(got.argmax(1) == ref.argmax(1)),
                max_logit_diff=diff, max_logit_diff_rel=diff / np.abs(ref).max(),
                rms_dp=np.sqrt(np.mean((np.exp(lm[k, nxt]) - np.exp(lr[k, nxt])) ** 2)))
    for key, value in want.items():
        assert d[key] == pytest.approx(value, rel=1e-9), key      # the same float64 sums, another order
    assert d["kl_mean"] > 1e-3 and d["max_logit_diff"] > 0.1    # Q4_K is measurably not the exact model
    q8 = json.loads(measure(q4, demo_path, "--json", "--activations", "q8").stdout)   # a ckpt-0 model refuses q8
    assert q8["ppl_reference"] == d["ppl_reference"] and q8["kl_mean"] != d["kl_mean"]


def one_line_error(r, match):
    lines = [x for x in r.stderr.splitlines() if x and not x.startswith("note:")]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr


def test_bad_inputs_are_one_line_errors(demo_path, tmp_path, tmpdir_empty):
    short = tmp_path / "short.txt"
    short.write_text("Far too short for a chunk.")
    both = ["--model", demo_path, "--reference", demo_path]
    for args, match in [
        (["--model", demo_path], "perplexity needs --model (the model to measure) and --reference"),
        (["--model", tmp_path / "nothing", "--reference", demo_path], "no such checkpoint folder"),
        ([*both, "--text", tmp_path / "missing.txt"], "cannot read --text"),
        ([*both, "--text", short], "fewer than one chunk of --ctx 512"),
        ([*both, "--ctx", 4096], "--ctx 4096 is out of range: the models' sequence_len is 2048"),
        ([*both, "--ctx", 1], "--ctx 1 is out of range"),
        ([*both, "--chunks", 0], "--chunks 0 is out of range"),
        ([*both, "--ctx", 64, "--context", 32], "--ctx 64 is longer than --context 32"),
    ]:
        one_line_error(cli("perplexity", *args), match)


def test_models_of_another_vocabulary_are_refused(demo_path, tmp_path, tmpdir_empty):
    need_shared()
    one_line_error(cli("perplexity", "--model", demo_path, "--reference", FIXTURES / "p1_e8_l2_basic"),
                   "the models do not share a vocabulary: --model has 1024 tokens, --reference 512")
    other = tmp_path / "other"                      # the demo's weights beside Grok-1's tokenizer
    shutil.copytree(demo_path, other)
    shutil.copy(TOKENIZER, other / "tokenizer.model")
    one_line_error(cli("perplexity", "--model", demo_path, "--reference", other), "the models' tokenizers differ")
