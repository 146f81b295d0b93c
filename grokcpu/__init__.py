"""grokcpu: run xAI's Grok-1 from its released checkpoint on a CPU workstation.

    model = grokcpu.load("path/to/checkpoint")      # folder holding ckpt-0/ (or ckpt-0/ itself)
    s = model.new_session()
    logits = s.prefill(token_ids)                    # [T, vocab] float32
    next_logits = s.decode(token_id)                 # [vocab] float32
"""

from __future__ import annotations

import os

# OpenBLAS (numpy's BLAS, which runs prefill's big products) keeps its threads spinning for
# 2^28 cycles, about 0.1 s, after each call, taking a core from the decode step that follows a
# prefill; at 2^4 they sleep at once. OpenBLAS reads this when it starts, so it applies when
# grokcpu is imported before numpy (the CLI and tools do); a value already set wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
# numba's OpenMP workers spin GOMP_SPINCOUNT times after a parallel region, then sleep: a short
# spin spares a token's many regions a wake-up each without taking cores from other work
# (docs/PERFORMANCE.md, "Workers that spin"). A value the user set for either wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "1000"

from .errors import GrokError  # noqa: E402

__version__ = "0.1.0"


def open_checkpoint(path: str | os.PathLike, config=None, weights: bool = True):
    """The weights of a model, opened: a Checkpoint (ckpt-0 folder) or a GGUFCheckpoint (a file).

    weights=False opens a ckpt-0 checkpoint's headers and config only; a GGUF reads just its
    metadata, norms and routers either way."""
    from .checkpoint import Checkpoint
    if os.path.isfile(path):          # a folder is a ckpt-0 checkpoint; a file may be a GGUF
        from .formats.gguf import detect_format
        if detect_format(path) == "gguf":
            from .formats.gguf_checkpoint import GGUFCheckpoint
            return GGUFCheckpoint(path, config=config)
    return Checkpoint(path, config=config, weights=weights)


def load(path: str | os.PathLike, *, config=None, options=None, **kwargs) -> "Model":
    """Open a Grok-1 checkpoint (memory-mapped, zero copy) and return a Model.

    path: a folder holding ckpt-0/ (and optionally config.json), or ckpt-0/ itself; or a
    Grok-1 GGUF file (one file, any shard NAME-0000k-of-0000n.gguf, or NAME.gguf.partKofN).
    Options, by keyword (or an `Options` as options=): threads (default: physical cores),
    context (KV-cache length; default: the model's sequence_len), expert_cache_gb ("auto",
    "off", or GB), expert_cache_policy ("lru", "lfu"), prefetch, expert_reads ("auto",
    "direct", "buffered": how misses are read), pin_experts ((layer, expert)
    pairs), routing_trace (a JSONL path), unembed ("f32" exact, or "int8": 4x fewer bytes per
    token), activations ("f32" exact, or "q8": a GGUF model's Q4_K/Q5_K/Q6_K decode products with
    x rounded to 8 bits), offload ("none", or "dense": attention, norms, router and embeddings on
    a CUDA GPU).
    """
    from .model import Model
    from .options import Options
    if options is None:
        options = Options.make(**kwargs)
    elif kwargs:
        raise TypeError("load() takes options= or option keywords, not both")
    ckpt = open_checkpoint(path, config=config)
    try:
        return Model(ckpt, options)
    except BaseException:
        ckpt.close()
        raise


from .options import OptionError, Options  # noqa: E402

__all__ = ["load", "GrokError", "OptionError", "Options", "__version__"]
