"""The memory plan of a checkpoint, from its file headers alone (no weight is read).

    plan = memory_plan(Checkpoint(path), context=8192, expert_cache_gb="auto", unembed="f32")
    plan = memory_plan(GGUFCheckpoint(path), ram=256 * 10**9)    # as if on a 256 GB machine

A GGUFCheckpoint works too: its sizes are its tensors' bytes in their ggml types.

Every total is the sum of parts listed beside it, so `info` can print figures that add up:
  payload            = dense + experts
  read per token     = layer dense + final norm + embedding row + output table + k*L experts
  auto expert budget = available RAM - resident non-expert bytes - KV cache - safety margin
                       (clamped to [k experts, every expert]; expert_cache.auto_budget's rule)
  RAM needed         = resident non-expert bytes + KV cache + expert budget + safety margin
                       ("fits" when it is within the available RAM)
`read_per_token` is the one bytes-per-token formula: `info` and `bench` both use it.
"""

from __future__ import annotations

import math


def _ref_bytes(ref) -> int:
    if hasattr(ref, "weight"):
        return ref.weight.nbytes + ref.scales.nbytes
    return ref.nbytes


def expert_bytes(ckpt) -> int:
    """Bytes of one expert: its slices of moe/linear, linear_v, linear_1, int8 + scales."""
    from .checkpoint import file_index
    L = ckpt.config.num_layers
    total = 0
    for off in (0, 1, 2):
        q = ckpt.refs[file_index(0, off, L)]
        E = q.weight.shape[0]
        total += (q.weight.nbytes + q.scales.nbytes) // E
    return total


SCALE_BYTES = 4     # the engine holds the bf16 scales of the files as float32


def _held_bytes(ref) -> int:
    """Bytes of a tensor as the engine reads it in a decode step (scales widened to float32)."""
    if hasattr(ref, "weight"):
        return ref.weight.nbytes + math.prod(ref.scales.shape) * SCALE_BYTES
    return ref.nbytes


def read_per_token(ckpt, unembed: str = "f32") -> dict:
    """Weight bytes one decode step streams, by part; "total" is their sum.

    Every layer's attention, norms and router; the final norm; one embedding row in; the
    output table (float32 [V, D], or with unembed="int8" its int8 copy and a float32 scale per
    row); and k experts in each layer (int8 weights + scales, float32 as the engine holds them).
    """
    if getattr(ckpt, "format", "ckpt-0") == "gguf":
        return ckpt.read_per_token()
    from .checkpoint import file_index
    c = ckpt.config
    refs = ckpt.refs
    L = c.num_layers
    one = sum(_held_bytes(refs[file_index(0, off, L)]) // c.num_experts for off in (0, 1, 2))
    payload = sum(_held_bytes(r) for r in refs)
    experts_all = one * c.num_layers * c.num_experts
    embedding, final_norm = _ref_bytes(refs[0]), _ref_bytes(refs[1])
    V, D = c.vocab_size, c.emb_size
    parts = {
        "layers_dense": payload - experts_all - embedding - final_norm,
        "final_norm": final_norm,
        "embedding_row": D * 4,
        "output_table": V * D + V * 4 if unembed == "int8" else embedding,
        "experts": c.num_layers * c.num_selected_experts * one,
    }
    parts["total"] = sum(parts.values())
    return parts


def _payload(ckpt) -> tuple[int, int, int]:
    """Bytes of the tensors (headers aside), of the embedding table and of every expert, in
    the files (ckpt-0's experts with their scales)."""
    c = ckpt.config
    if getattr(ckpt, "format", "ckpt-0") == "gguf":
        tensors = ckpt.gguf.tensors
        return sum(t.nbytes for t in tensors.values()), tensors["token_embd.weight"].nbytes, ckpt.all_expert_bytes
    return (sum(_ref_bytes(r) for r in ckpt.refs), _ref_bytes(ckpt.refs[0]),
            expert_bytes(ckpt) * c.num_layers * c.num_experts)


def memory_plan(ckpt, context: int | None = None, expert_cache_gb=None, unembed: str = "f32",
                ram: int | None = None) -> dict:
    """What a run of this checkpoint holds and reads, in bytes (no weights are touched).

    RAM is this machine's (psutil), or with `ram` an assumed machine of that many bytes, all of
    them available ("ram_assumed"). "fits": the non-expert weights, KV cache, expert budget and
    safety margin are within the available RAM."""
    from .expert_cache import budget_bytes, ram_terms
    from .options import expert_cache_gb as check_gb

    c = ckpt.config
    context = c.sequence_len if context is None else int(context)
    payload, embedding, experts = _payload(ckpt)
    one_expert = experts // (c.num_layers * c.num_experts)
    dense = payload - experts
    terms = ram_terms(ckpt, context, None if ram is None else (ram, ram))    # one reading of psutil
    gb = check_gb(expert_cache_gb)
    auto = gb == "auto"
    budget = budget_bytes("auto" if gb == "off" else gb, ckpt, context, terms)
    slot = ckpt.expert_bytes                     # what a cache slot holds (ckpt-0: the int8 weights)
    held = min(budget // slot, c.num_layers * c.num_experts)
    kv = terms["kv_cache"]
    per_token = read_per_token(ckpt, unembed)
    needed = terms["resident_non_expert"] + kv + budget + terms["margin"]
    plan = {
        "context": context,
        "file_bytes": ckpt.nbytes,
        "payload_bytes": payload,
        "dense_bytes": dense,
        "embedding_bytes": embedding,
        "expert_bytes": experts,
        "one_expert_bytes": one_expert,
        "kv_cache_bytes": kv,
        "ram_total_bytes": terms["total"],
        "ram_available_bytes": terms["available"],
        "ram_assumed": ram is not None,
        "expert_budget_bytes": budget,
        "expert_budget_auto": auto,
        "experts_held": int(held),
        "experts_total": c.num_layers * c.num_experts,
        "ram_needed_bytes": needed,
        "fits": needed <= terms["available"],
        "read_per_token_bytes": per_token["total"],
        "read_per_token_parts": {k: v for k, v in per_token.items() if k != "total"},
        "kv_read_per_token_bytes_at_full_context": kv,
    }
    if auto:
        # auto_budget's own terms: it keeps everything but the experts resident
        raw = terms["available"] - terms["resident_non_expert"] - kv - terms["margin"]
        plan["auto_budget_parts"] = {"available": terms["available"],
                                     "resident_non_expert": terms["resident_non_expert"], "kv_cache": kv,
                                     "margin": terms["margin"], "unclamped": raw, "clamped": budget != raw}
    return plan
