"""Numba kernels: pure functions of numpy arrays that write into `out` arguments.

Shapes: T tokens, D emb, H q-heads, G kv-heads, d key size, E experts, F expert ffn,
V vocab, S cache rows. Weights are input-major: y = x @ W, W [R in, C out], int8 with float32
scales s [nb, C] over nb contiguous row blocks.
"""

import hashlib as _hashlib
from pathlib import Path as _Path


def _drop_stale_compiled(here: _Path | None = None) -> None:
    """Numba's on-disk cache (cache=True) checks only the defining file's timestamp, so a
    kernel that calls one in another file (decode.py calls matvec.py) would keep running the
    callee's old code after that file changes. Drop every cached kernel of this package when
    any of its sources differs from the set the cache was built from."""
    here = here or _Path(__file__).resolve().parent
    digest = _hashlib.sha256(b"".join(p.read_bytes() for p in sorted(here.glob("*.py")))).hexdigest()
    cache = here / "__pycache__"
    stamp = cache / "grokcpu-kernels.sources"
    try:
        if stamp.is_file() and stamp.read_text() == digest:
            return
        for f in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            f.unlink(missing_ok=True)
        cache.mkdir(exist_ok=True)
        stamp.write_text(digest)
    except OSError:      # a read-only install: numba then caches elsewhere, or not at all
        pass


_drop_stale_compiled()
