"""One forward pass for every caller, through the public API only.

decode, decode_batch and chunked prefill must give the same logits bit for bit, and the same
routing-trace lines, under every engine option (trace, prefetch, int8 unembedding, an expert
budget far below the experts); the options that do not change the arithmetic must leave the
logits untouched. Sessions decoding in parallel threads, and two models in one process, give
the same bits as alone.
"""

import threading

import numpy as np
import pytest

import grokcpu
from grokcpu.model import decode_batch

SEQ = [5, 17, 300, 9, 1023, 44, 7, 2000, 13, 64, 65, 66, 3, 999]
ONE = 3 * 512 * 2048 / 1e9        # one expert of the medium checkpoint, in GB

FEATURES = {
    "base": {},
    "trace": {"routing_trace": True},
    "prefetch": {"prefetch": True},
    "int8": {"unembed": "int8"},
    "tight": {"expert_cache_gb": 12 * ONE * 1.0001},     # 12 of 32 experts: hits, misses, evictions
    "mmap": {"expert_cache_gb": "off"},
}


def _run(path, tmp_path, feature, mode):
    opts = dict(FEATURES[feature])
    trace = tmp_path / f"{feature}-{mode}.jsonl"
    if opts.pop("routing_trace", False):
        opts["routing_trace"] = str(trace)
    m = grokcpu.load(path, threads=2, **opts)
    s = m.new_session()
    s.trace = []
    if mode == "decode":
        logits = np.stack([s.decode(t) for t in SEQ])
    elif mode == "batch":
        logits = np.stack([decode_batch([s], [t])[0] for t in SEQ])
    elif mode == "chunked":
        logits = s.prefill(SEQ, chunk=1)
    else:
        raise AssertionError(mode)
    st = m.stats().get("expert_cache", {})
    m.close()
    routing = [(layer, idx.tolist(), probs.tobytes()) for layer, idx, probs in s.trace]
    return logits, routing, trace.read_text() if trace.exists() else None, st


@pytest.mark.parametrize("feature", list(FEATURES))
def test_every_caller_gives_the_same_bits(medium_ckpt, tmp_path, feature):
    runs = {mode: _run(medium_ckpt, tmp_path, feature, mode) for mode in ("decode", "batch", "chunked")}
    ref = runs["decode"]
    for mode, got in runs.items():
        np.testing.assert_array_equal(got[0], ref[0], err_msg=mode)
        assert got[1] == ref[1], mode
        assert got[2] == ref[2], mode
    if feature == "trace":
        lines = ref[2].splitlines()
        assert len(lines) == len(SEQ) * 4 and lines[0].startswith('{"pos": 0, "layer": 0, "experts": [')
    if feature == "tight":
        assert ref[3]["evictions"] > 0 and ref[3]["hits"] > 0
    base = _run(medium_ckpt, tmp_path, "base", "decode")[0]
    if feature == "int8":
        assert 0 < np.abs(ref[0] - base).max() < 0.05
        assert (ref[0].argmax(-1) == base.argmax(-1)).mean() >= 0.9
    elif feature == "mmap":          # down projections as in the file: another summation order
        np.testing.assert_allclose(ref[0], base, rtol=0, atol=1e-4)
    else:                            # the other options do not change the arithmetic
        np.testing.assert_array_equal(ref[0], base)


def test_whole_prefill_and_wide_batches_agree_with_decode(medium_ckpt):
    """Many rows go through other kernels (BLAS tiles, the small-batch product): the same
    logits up to float32 summation order."""
    m = grokcpu.load(medium_ckpt, threads=2)
    one = m.new_session()
    want = np.stack([one.decode(t) for t in SEQ])
    got = m.new_session().prefill(SEQ)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
    group = [m.new_session() for _ in range(3)]
    rows = np.stack([decode_batch(group, [t, t, t]) for t in SEQ])
    for b in range(3):
        np.testing.assert_allclose(rows[:, b], want, rtol=0, atol=2e-4)


def test_sessions_in_parallel_threads_give_the_bits_of_one_after_the_other(medium_ckpt):
    m = grokcpu.load(medium_ckpt, threads=2)
    seqs = [SEQ, SEQ[::-1]]
    alone = []
    for seq in seqs:
        s = m.new_session()
        alone.append(np.stack([s.decode(t) for t in seq]))
    got = [None, None]
    errors = []

    def work(i):
        try:
            s = m.new_session()
            out = [s.prefill(seqs[i][:3], chunk=1)]
            out += [s.decode(t)[None] for t in seqs[i][3:]]
            got[i] = np.concatenate(out)
        except BaseException as e:      # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and all(not t.is_alive() for t in threads)
    for a, b in zip(got, alone):
        np.testing.assert_array_equal(a, b)


def test_two_models_keep_their_own_threads_and_results(medium_ckpt):
    a = grokcpu.load(medium_ckpt, threads=1)
    want = np.stack([a.new_session().decode(t) for t in SEQ[:4]])
    b = grokcpu.load(medium_ckpt, threads=2)
    b.new_session().prefill(SEQ[:4])
    assert a.stats()["threads"] == 1 and b.stats()["threads"] == 2
    got = np.stack([a.new_session().decode(t) for t in SEQ[:4]])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bad", [[5, 6], 5.0, True, "5", None, float("nan"), 2 ** 70, -1, np.float32(3)])
def test_decode_takes_one_integer(medium_ckpt, bad):
    m = grokcpu.load(medium_ckpt)
    s = m.new_session()
    with pytest.raises(grokcpu.GrokError):
        s.decode(bad)
    assert s.pos == 0
    assert s.decode(np.int32(5)).shape == (m.config.vocab_size,)


@pytest.mark.parametrize("bad", [[], [5.0], [True], ["5"], [None], 5, "abc", [[1, 2]], np.zeros((2, 2), np.int64),
                                 np.array([1.5]), [2 ** 64], {1: 2}])
def test_prefill_takes_a_sequence_of_integers(medium_ckpt, bad):
    m = grokcpu.load(medium_ckpt)
    s = m.new_session()
    with pytest.raises(grokcpu.GrokError):
        s.prefill(bad)
    assert s.pos == 0
    assert s.prefill(np.array([3, 4], np.uint16)).shape == (2, m.config.vocab_size)
    assert s.prefill((np.int64(7),), logits="last").shape == (m.config.vocab_size,)


def test_use_after_close_and_batch_misuse(medium_ckpt):
    m = grokcpu.load(medium_ckpt)
    s = m.new_session()
    with pytest.raises(grokcpu.GrokError, match="one token id per session"):
        decode_batch([s], [1, 2])
    with pytest.raises(grokcpu.GrokError, match="distinct sessions"):
        decode_batch([s, s], [1, 2])
    m.close()
    m.close()
    with pytest.raises(grokcpu.GrokError, match="closed"):
        s.decode(3)
    with pytest.raises(grokcpu.GrokError, match="closed"):
        m.new_session()


def test_bad_options_name_the_parameter(medium_ckpt, tmp_path):
    for kw, msg in ((dict(pin_experts=[(99, 0)]), "pin_experts: 99:0 is outside"),
                    (dict(pin_experts=[(0, 1)], expert_cache_gb="off"), "pin_experts needs the expert cache"),
                    (dict(routing_trace=str(tmp_path / "no" / "t.jsonl")), "routing_trace: folder"),
                    (dict(threads=0), "threads 0 is out of range"), (dict(threads=2.5), "threads must be"),
                    (dict(context=10 ** 9), "context"), (dict(unembed="f16"), "unembed 'f16' is not known"),
                    (dict(offload="gpu"), "offload 'gpu' is not known"), (dict(bogus=1), "unknown option bogus")):
        with pytest.raises(grokcpu.OptionError, match=msg):
            grokcpu.load(medium_ckpt, **kw)


def test_nan_weights_are_named(medium_ckpt, tmp_path):
    """A NaN in a weight is reported as a damaged checkpoint naming the tensor, not a crash or
    a router that picks expert -1; the session is left as it was."""
    import shutil

    from grokcpu.checkpoint import Checkpoint

    bad = tmp_path / "bad"
    shutil.copytree(medium_ckpt, bad)
    ck = Checkpoint(bad)
    ref = ck.layers[2].wo.ref.scales
    ck.close()
    with open(ref.path, "r+b") as f:            # one bf16 scale -> NaN
        f.seek(ref.offset + 2 * 5)
        f.write(np.array([0x7FC0], np.uint16).tobytes())
    for budget in ("auto", "off"):
        m = grokcpu.load(bad, expert_cache_gb=budget)
        s = m.new_session()
        with pytest.raises(grokcpu.GrokError, match="layer 2's wo scales holds NaN"):
            s.prefill([5, 6, 7])
        assert s.pos == 0
        with pytest.raises(grokcpu.GrokError, match="layer 2's wo scales holds NaN"):
            s.decode(5)
        assert s.pos == 0
        m.close()


def test_expert_file_truncated_while_mapped_is_an_error(medium_ckpt, tmp_path):
    """With the experts read from the memory map, a file cut short after load is a one-line
    error at the next step, not a SIGBUS (run in a child: a crash must not take pytest down)."""
    import shutil
    import subprocess
    import sys

    path = tmp_path / "m"
    shutil.copytree(medium_ckpt, path)
    code = f"""
import os, grokcpu
from grokcpu.checkpoint import Checkpoint
m = grokcpu.load({str(path)!r}, expert_cache_gb="off")
s = m.new_session()
s.prefill([5, 6])
w = m.layers[1].w_down.ref.weight
os.truncate(w.path, w.offset + 10)
try:
    s.decode(7)
except grokcpu.GrokError as e:
    print("ERROR", e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ERROR" in r.stdout and "tensor" in r.stdout
