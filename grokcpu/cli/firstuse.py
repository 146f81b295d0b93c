"""First use: numba compiles the kernels once per machine (cache=True keeps them); say so.

A marker file under the cache folder ($GROKCPU_CACHE or ~/.cache/grokcpu) records that the
kernels were compiled. Its name is keyed by grokcpu's and numba's versions, the CPU, and the
kernel sources' modification times (numba recompiles when those change), so an upgrade or
another CPU brings the note back. It is written after a successful warm-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .app import err

COMPILE_SECONDS = "60-150"      # `grok-cli warmup` on a fresh install: 148 s on a busy 2-core box (80 s CPU)
compiling = False                # True from the note until the kernels are ready (see app.interrupted)


def _cpu_name() -> str:
    try:
        import llvmlite.binding as ll
        return ll.get_host_cpu_name()
    except Exception:            # llvmlite missing or odd: the machine name is good enough
        import platform
        return platform.machine()


def _source_stamp() -> str:
    import grokcpu
    root = Path(grokcpu.__file__).parent
    stamps = []
    for sub in ("kernels", "backends"):
        for p in sorted((root / sub).glob("*.py")):
            try:
                stamps.append(f"{p.name}:{p.stat().st_mtime_ns}")
            except OSError:
                pass
    return ",".join(stamps)


def marker() -> Path:
    import numba

    import grokcpu
    from ..demo import cache_root
    key = f"{grokcpu.__version__}|{numba.__version__}|{_cpu_name()}|{_source_stamp()}"
    return cache_root() / f"kernels-compiled-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def is_compiled() -> bool:
    try:
        return marker().is_file()
    except OSError:
        return False


def note() -> None:
    err(f"note: compiling kernels for this CPU, once (about {COMPILE_SECONDS} s); later runs start at once "
        "(`grok-cli warmup` does it ahead)")


def mark(seconds: float) -> None:
    """Record that the kernels are compiled (best effort: an unwritable cache only repeats the note)."""
    try:
        p = marker()
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"seconds": round(seconds, 1), "at": time.time()}) + "\n")
        os.replace(tmp, p)
    except OSError:
        pass
