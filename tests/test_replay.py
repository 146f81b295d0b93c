"""Offline replay of routing traces: exact counts on hand-made traces, and agreement with the
live cache on a recorded one."""

import json
import subprocess
import sys

import grokcpu
from grokcpu.replay import replay
from grokcpu.trace import most_used, read_trace

A, B, C, D = (0, 0), (0, 1), (0, 2), (0, 3)


def test_lru_lfu_and_belady_on_a_classic_sequence():
    seq = [A, B, C, A, D, A, B, C, D, A]
    # 3 slots. LRU: A B C miss, A hit, D miss (evict B), A hit, B miss (evict C), C miss (evict D),
    # D miss (evict A), A miss (evict B)
    assert replay(seq, 3, "lru")["misses"] == 8
    # Belady: A B C miss, A hit, D miss (evict C: next use furthest), A hit, B hit, C miss
    # (evict B or A? next uses: A@9, B none, D@8 -> evict B), D hit, A hit
    assert replay(seq, 3, "belady")["misses"] == 5
    # LFU: A B C miss; A hit (A:2); D miss evicts B (count 1, least recent); A hit (A:3);
    # B miss evicts C (1, older than D); C miss evicts D; D miss evicts B; A hit
    assert replay(seq, 3, "lfu")["misses"] == 7
    assert most_used(seq, 1) == [A]


def test_belady_never_worse_than_lru_or_lfu():
    import random
    rnd = random.Random(3)
    seq = [(rnd.randrange(4), rnd.choice([0, 0, 1, 2, 3, 4, 5, 6, 7])) for _ in range(400)]
    for slots in (2, 5, 9, 20):
        best = replay(seq, slots, "belady")["misses"]
        assert best <= replay(seq, slots, "lru")["misses"]
        assert best <= replay(seq, slots, "lfu")["misses"]


def test_replay_matches_the_live_cache(medium_ckpt, tmp_path):
    """The same trace, replayed with the live cache's slots and LRU, gives its miss count."""
    path = tmp_path / "t.jsonl"
    slots = 5
    m = grokcpu.load(medium_ckpt, expert_cache_gb=slots * 3 * 512 * 2048 / 1e9, prefetch=False,
                     routing_trace=str(path))
    s = m.new_session()
    s.prefill([7], logits="last")
    for t in range(8, 30):
        s.decode(t)
    live = m.stats()["expert_cache"]
    m.close()
    acc = read_trace(path)
    # the engine acquires each layer's distinct experts once per step
    steps = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        steps.extend((r["layer"], e) for e in sorted(set(r["experts"])))
    assert len(acc) >= len(steps)
    assert replay(steps, slots, "lru")["misses"] == live["misses"]
    out = subprocess.run([sys.executable, "tools/cache_replay.py", "--trace", str(path), "--slots", "4,8",
                          "--model", str(medium_ckpt), "--json"], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout)
    assert {(r["slots"], r["policy"]) for r in res["results"]} == {(n, p) for n in (4, 8) for p in ("lru", "lfu", "belady")}
