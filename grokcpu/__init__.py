"""grokcpu: run xAI's Grok-1 from its released checkpoint on a CPU workstation.

    model = grokcpu.load("path/to/checkpoint")      # folder holding ckpt-0/ (or ckpt-0/ itself)
    s = model.new_session()
    logits = s.prefill(token_ids)                    # [T, vocab] float32
    next_logits = s.decode(token_id)                 # [vocab] float32
"""

from __future__ import annotations

import os

from .errors import GrokError

__version__ = "0.1.0"


def load(path: str | os.PathLike, *, threads: int | None = None, context: int | None = None,
         config=None) -> "Model":
    """Open a released Grok-1 checkpoint (memory-mapped, zero copy) and return a Model."""
    from .checkpoint import Checkpoint
    from .model import Model
    return Model(Checkpoint(path, config=config), threads=threads, context=context)


__all__ = ["load", "GrokError", "__version__"]
