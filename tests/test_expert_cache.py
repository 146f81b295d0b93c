"""The expert cache: exact results under any budget, LRU order, byte accounting, memory bound."""

import ctypes
import errno
import mmap
import os

import numpy as np
import pytest

import grokcpu
from grokcpu.errors import GrokError
from grokcpu.expert_cache import ExpertCache, auto_budget, budget_bytes
from grokcpu.checkpoint import Checkpoint


def run(model, fx):
    s = model.new_session()
    pre = s.prefill(fx.prompt)
    dec = np.stack([s.decode(t) for t in fx.decode_tokens])
    return pre, dec


def expert_gb(cfg):
    return 3 * cfg.emb_size * cfg.ffn_size / 1e9


@pytest.mark.parametrize("prefetch,reads", [(True, "auto"), (False, "auto"), (False, "buffered"), (False, "direct")])
def test_logits_identical_whatever_the_budget(fixture, prefetch, reads):
    full = grokcpu.load(fixture.path)
    ref_pre, ref_dec = run(full, fixture)
    c = full.config
    one = expert_gb(c)
    for n in (c.num_selected_experts, c.num_selected_experts + 1, c.num_layers * c.num_experts // 2):
        m = grokcpu.load(fixture.path, expert_cache_gb=n * one * 1.0001, prefetch=prefetch, expert_reads=reads)
        assert m.experts.direct == (reads != "buffered" and hasattr(os, "O_DIRECT"))
        pre, dec = run(m, fixture)
        assert np.array_equal(pre, ref_pre) and np.array_equal(dec, ref_dec)
        st = m.stats()["expert_cache"]
        assert st["slots"] == n and st["resident"] <= n
        # every read is a demand miss or a guess (a guess evicted unused is read and lost)
        assert st["bytes_read"] == (st["misses"] + st["prefetch_issued"]) * st["expert_bytes"]


def test_budget_too_small_is_a_clear_error(fixture):
    c = Checkpoint(fixture.path).config
    with pytest.raises(GrokError, match="cannot hold the 2 experts"):
        grokcpu.load(fixture.path, expert_cache_gb=1.9 * expert_gb(c))
    for bad in ("lots", "-1", "nan", "0"):
        with pytest.raises(GrokError, match="expert_cache_gb"):
            grokcpu.load(fixture.path, expert_cache_gb=bad)
    with pytest.raises(GrokError, match="expert_cache_policy .fifo. is not known"):
        grokcpu.load(fixture.path, expert_cache_policy="fifo")
    with pytest.raises(GrokError, match="expert_reads .mmap. is not known"):
        grokcpu.load(fixture.path, expert_reads="mmap")


@pytest.mark.parametrize("reads", ["direct", "buffered", "direct refused"])
def test_experts_land_whole_across_concurrent_read_pieces(medium_ckpt, monkeypatch, reads):
    """Gate and up read in pieces (a short last one), down's pieces transposed by whichever
    reader thread read them: every byte lands where it belongs, with direct reads (blocks
    around unaligned ranges), buffered ones, and where the file system refuses direct reads."""
    ck = Checkpoint(medium_ckpt)
    D = ck.config.emb_size
    monkeypatch.setattr(ExpertCache, "READ_CHUNK", 192 * D + 2 * ExpertCache.ALIGN + 100)   # 192 rows a read
    if reads == "direct refused":
        real_open = os.open

        def refuse(path, flags, *a):
            if flags & getattr(os, "O_DIRECT", 0):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *a)
        monkeypatch.setattr(os, "open", refuse)
    cache = ExpertCache(ck, 2 * 3 * D * ck.config.ffn_size, prefetch=False, drop_page_cache=reads != "buffered")
    assert cache.down_rows == 192 and ck.config.ffn_size % 192
    assert cache.direct == (reads != "buffered" and hasattr(os, "O_DIRECT"))
    offsets = [off % cache.ALIGN for layer in range(2) for _, off, _ in ck.expert_ranges(layer, 1)]
    assert any(offsets)                     # ranges that do not start on a block: read around
    for key in [(2, 7), (0, 1), (3, 0)]:
        wg, wu, wd = cache.acquire(*key)
        lw = ck.layers[key[0]]
        assert np.array_equal(wd, lw.w_down.w[key[1]].T) and np.array_equal(wu, lw.w_up.w[key[1]])
        assert np.array_equal(wg, lw.w_gate.w[key[1]])
        cache.release(*key)
    assert bool(cache._buffered) == (reads == "direct refused" and cache.direct)
    cache.close()


def test_lru_eviction_order_and_exact_counters(medium_ckpt):
    ck = Checkpoint(medium_ckpt)
    cache = ExpertCache(ck, 3 * 3 * 512 * 2048, policy="lru", prefetch=False)
    eb = cache.expert_bytes

    def use(layer, e):
        w = cache.acquire(layer, e)
        cache.release(layer, e)
        return w

    for key in [(0, 1), (0, 2), (0, 3)]:        # fill: 3 misses
        use(*key)
    use(0, 1)                                  # hit; LRU order now 2, 3, 1
    use(1, 5)                                  # miss: evicts (0, 2)
    assert set(cache.where) == {(0, 1), (0, 3), (1, 5)}
    use(0, 2)                                  # miss: evicts (0, 3)
    assert set(cache.where) == {(0, 1), (1, 5), (0, 2)}
    st = cache.stats.as_dict(cache)
    assert (st["hits"], st["misses"], st["evictions"]) == (1, 5, 2)
    assert st["bytes_read"] == 5 * eb and st["per_layer"][1]["misses"] == 1
    # the bytes in the slot are the expert's bytes in the files
    wg, wu, wd = use(1, 5)
    lw = ck.layers[1]
    assert np.array_equal(wg, lw.w_gate.w[5]) and np.array_equal(wu, lw.w_up.w[5])
    assert np.array_equal(wd, lw.w_down.w[5].T)          # the down projection is kept transposed
    cache.close()


def test_pinned_slot_is_never_evicted_and_in_use_slots_survive(medium_ckpt):
    ck = Checkpoint(medium_ckpt)
    cache = ExpertCache(ck, 3 * 3 * 512 * 2048, policy="lru", prefetch=True)
    cache.pin([(2, 7)])
    held = cache.acquire(0, 0)                 # in use: must survive the traffic below
    for e in range(8):
        cache.acquire(3, e)
        cache.release(3, e)
    assert (2, 7) in cache.where and (0, 0) in cache.where
    assert np.array_equal(held[0], ck.layers[0].w_gate.w[0])
    cache.release(0, 0)
    cache.close()


def test_lfu_keeps_the_frequent_expert(medium_ckpt):
    ck = Checkpoint(medium_ckpt)
    cache = ExpertCache(ck, 2 * 3 * 512 * 2048, policy="lfu", prefetch=False)
    for key in [(0, 1), (0, 1), (0, 1), (0, 2), (0, 3)]:   # (0,2) used once -> evicted, not (0,1)
        cache.acquire(*key)
        cache.release(*key)
    assert set(cache.where) == {(0, 1), (0, 3)}
    cache.close()


def test_prefetch_is_counted_and_changes_nothing(medium_ckpt):
    toks = list(range(3, 40))
    a = grokcpu.load(medium_ckpt, expert_cache_gb=0.04, prefetch=False)
    b = grokcpu.load(medium_ckpt, expert_cache_gb=0.04, prefetch=True)
    sa, sb = a.new_session(), b.new_session()
    sa.prefill(toks[:5])
    sb.prefill(toks[:5])
    prefill_guesses = a.stats()["expert_cache"]["prefetch_issued"]
    assert prefill_guesses > 0                    # prefill always guesses the next layer's experts
    for t in toks[5:]:
        assert np.array_equal(sa.decode(t), sb.decode(t))
    st = b.stats()["expert_cache"]
    assert st["prefetch_issued"] >= prefill_guesses and st["prefetch_hits"] > 0
    assert a.stats()["expert_cache"]["prefetch_issued"] == prefill_guesses   # decode: off means off


def test_close_gives_the_pool_back_at_once(medium_ckpt):
    """close() frees the slots' RAM itself: the model's reference cycles (backend <-> model)
    would otherwise hold it until a garbage collection, and a second model loaded meanwhile
    (a benchmark's next mode, a reload) would need twice the budget."""
    import gc
    import weakref
    gc.disable()
    try:
        m = grokcpu.load(medium_ckpt, expert_cache_gb=0.04)
        s = m.new_session()
        s.prefill(list(range(3, 12)))
        s.decode(5)
        pool = weakref.ref(m.experts.pool)
        m.close()
        assert pool() is None
    finally:
        gc.enable()


def _resident_bytes(path: str) -> int:
    """Bytes of `path` in the page cache (mincore)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        page = mmap.PAGESIZE
        n = (size + page - 1) // page
        vec = (ctypes.c_ubyte * n)()
        addr = np.frombuffer(mm, np.uint8).ctypes.data
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0
        return sum(v & 1 for v in vec) * page
    finally:
        del addr
        try:
            mm.close()
        except BufferError:
            pass


def test_expert_memory_stays_within_budget(medium_ckpt):
    """Experts ~100 MB, budget 12.6 MB: pool + page cache of the expert files stay near the budget."""
    ck = Checkpoint(medium_ckpt)
    expert_files = sorted({r[0] for key in [(l, 0) for l in range(4)] for r in ck.expert_ranges(*key)})
    for p in expert_files:              # start cold (written moments ago: flush, then drop)
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    budget = 4 * 3 * 512 * 2048
    m = grokcpu.load(medium_ckpt, expert_cache_gb=budget / 1e9)
    s = m.new_session()
    s.prefill(list(range(3, 60)), logits="last")
    for t in range(60, 80):
        s.decode(t)
    st = m.stats()["expert_cache"]
    assert st["bytes_read"] > 3 * budget             # it really paged experts in and out
    # what load itself reads of these files: pickle headers and the scales (copied to RAM)
    weights = {r.weight.path: r.weight.nbytes for r in ck.refs if hasattr(r, "weight")}
    not_weights = sum(os.path.getsize(p) - weights[p] for p in expert_files)
    # the latest read's pages are dropped one read later (read-ahead may still be landing)
    latest = m.experts.expert_bytes + 3 * m.experts.READ_AHEAD_SLACK
    cached = sum(_resident_bytes(p) for p in expert_files)
    assert cached < latest + not_weights
    assert m.experts.pool.nbytes <= budget
    m.close()


def test_auto_budget_and_parse(medium_ckpt):
    ck = Checkpoint(medium_ckpt)
    a = auto_budget(ck, 512)
    one = 3 * 512 * 2048
    assert 2 * one <= a <= 32 * one
    assert budget_bytes("auto", ck, 512) == a
    assert budget_bytes(0.5, ck, 512) == 500_000_000


def test_auto_budget_shared_by_workers(demo_path, monkeypatch):
    """With `share` models on one machine (Ray workers), each gets 1/share of the RAM above the
    margin, less its own dense weights and KV cache; clamped as before."""
    import psutil
    from types import SimpleNamespace
    ck = Checkpoint(demo_path, weights=False)                      # headers only, as a Ray driver
    c = ck.config
    dense, kv, every = ck.nbytes - c.all_expert_bytes, c.kv_cache_bytes(64), c.all_expert_bytes
    margin = 1e9                                                   # 3 % of 10 GB is under the 1 GB floor
    avail = margin + 2 * (dense + kv) + every                      # two workers: half the experts each
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=10e9, available=avail))
    assert auto_budget(ck, 64) == every                            # alone: all experts (clamped)
    assert abs(auto_budget(ck, 64, share=2) - every / 2) <= 1
    assert auto_budget(ck, 64, share=1000) == c.num_selected_experts * c.expert_bytes   # the floor
    ck.close()
    loaded = Checkpoint(demo_path)          # its dense weights are in RAM, out of `available` already
    assert loaded.resident_bytes == dense
    assert abs(auto_budget(loaded, 64, share=2) - (every / 2 + dense)) <= 1
    loaded.close()


def test_routing_trace_file(medium_ckpt, tmp_path):
    import json
    path = tmp_path / "trace.jsonl"
    m = grokcpu.load(medium_ckpt, routing_trace=str(path))
    s = m.new_session()
    s.trace = []
    s.prefill([5, 6, 7], logits="last")
    s.decode(8)
    m.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 4 * 4                        # 4 tokens x 4 layers
    assert {r["pos"] for r in rows} == {0, 1, 2, 3}
    mine = {(layer, t): list(idx[t]) for layer, idx, _ in s.trace[:4] for t in range(3)}
    for r in rows:
        if r["pos"] < 3:
            assert r["experts"] == mine[(r["layer"], r["pos"])]


def test_cache_off_reads_the_map_with_the_same_results(fixture):
    on = grokcpu.load(fixture.path)
    off = grokcpu.load(fixture.path, expert_cache_gb="off")
    a, b = run(on, fixture), run(off, fixture)
    # the same products, summed in another order (the cache keeps the down projection
    # transposed): float32 rounding apart, the same logits
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-4)     # as other summation-order checks
        assert (x.argmax(-1) == y.argmax(-1)).all()
    assert "expert_cache" not in off.stats()


def test_parse_pins(tmp_path):
    from grokcpu.options import resolve_pins

    def parse_pins(v, L, E):
        return resolve_pins((v,), L, E)
    assert parse_pins("0:3, 2:5", 4, 8) == [(0, 3), (2, 5)]
    with pytest.raises(GrokError, match="outside"):
        parse_pins("9:0", 4, 8)
    with pytest.raises(GrokError, match="LAYER:EXPERT"):
        parse_pins("x", 4, 8)
    t = tmp_path / "t.jsonl"
    t.write_text('{"pos": 0, "layer": 1, "experts": [2, 3]}\n{"pos": 1, "layer": 1, "experts": [3, 4]}\n')
    assert parse_pins(f"{t}:1", 4, 8) == [(1, 3)]


def test_a_file_cut_short_after_loading_is_a_clear_error_and_the_cache_goes_on(medium_ckpt, tmp_path):
    import shutil
    copy = tmp_path / "ck"
    shutil.copytree(medium_ckpt, copy)
    ck = Checkpoint(copy)
    cache = ExpertCache(ck, 2 * 3 * 512 * 2048)
    path, off, n = ck.expert_ranges(0, 7)[2]              # the down projection of expert (0, 7)
    os.truncate(path, off + n // 2)
    with pytest.raises(GrokError, match=r"unexpected end of file reading expert \(0, 7\)"):
        cache.acquire(0, 7)
    assert (0, 7) not in cache.where
    wg, wu, wd = cache.acquire(0, 1)                       # other experts still load
    assert np.array_equal(wd, ck.layers[0].w_down.w[1].T)
    cache.release(0, 1)
    cache.close()


