"""Replay a routing trace against cache policies and budgets, offline.

A trace is the JSONL that `routing_trace=` (CLI: `--routing-trace`) writes: one line per token
and layer, {"pos": p, "layer": l, "experts": [e1, e2]}, in the order the engine used them.
`replay(accesses, slots, policy)` counts hits and misses of a cache of `slots` experts under
that policy; "belady" evicts the expert whose next use is furthest away, the optimum no online
policy can beat, so it says how much better a policy could still get.
"""

from __future__ import annotations

from .errors import GrokError
from .expert_cache import POLICIES


def replay(accesses: list, slots: int, policy: str) -> dict:
    """Simulate a cache of `slots` experts; returns hits, misses, evictions."""
    if slots < 1:
        raise GrokError("a cache needs at least one slot")
    if policy == "belady":
        return _belady(accesses, slots)
    pol = POLICIES[policy]()
    resident: set = set()
    hits = misses = evictions = 0
    for key in accesses:
        if key in resident:
            hits += 1
        else:
            misses += 1
            if len(resident) >= slots:
                v = pol.victim(resident)
                resident.discard(v)
                pol.remove(v)
                evictions += 1
            resident.add(key)
        pol.touch(key)
    return {"policy": policy, "slots": slots, "hits": hits, "misses": misses, "evictions": evictions,
            "hit_rate": hits / len(accesses) if accesses else 0.0}


def _belady(accesses: list, slots: int) -> dict:
    INF = len(accesses) + 1
    nxt = [INF] * len(accesses)
    last: dict = {}
    for i in range(len(accesses) - 1, -1, -1):
        nxt[i] = last.get(accesses[i], INF)
        last[accesses[i]] = i
    resident: dict = {}              # key -> index of its next use
    hits = misses = evictions = 0
    for i, key in enumerate(accesses):
        if key in resident:
            hits += 1
        else:
            misses += 1
            if len(resident) >= slots:
                victim = max(resident, key=resident.get)
                del resident[victim]
                evictions += 1
        resident[key] = nxt[i]
    return {"policy": "belady", "slots": slots, "hits": hits, "misses": misses, "evictions": evictions,
            "hit_rate": hits / len(accesses) if accesses else 0.0}
