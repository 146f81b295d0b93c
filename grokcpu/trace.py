"""The routing trace: one JSONL line per token and layer, {"pos": p, "layer": l, "experts": [..]},
written by `routing_trace=` (CLI: `--routing-trace`) in the order the engine used the experts,
and read back for replay (`replay.py`) and pinning (`--pin-experts TRACE:N`)."""

from __future__ import annotations

import json
import threading
from collections import Counter

from .errors import GrokError


class TraceWriter:
    """Appends routing lines to a file; one lock, so sessions in several threads never tear a line."""

    def __init__(self, path: str):
        try:
            self._f = open(path, "a", encoding="utf-8")
        except OSError as e:
            from .options import OptionError, quote
            raise OptionError("routing_trace", f"{{name}} {quote(path)}: cannot write: {e.strerror}",
                              hint="give a writable file path, or leave {name} out") from None
        self._lock = threading.Lock()

    def write(self, positions, layer: int, idx) -> None:
        """Layer `layer`'s routing for the tokens at `positions` (idx [T, k] expert ids)."""
        lines = "".join(f'{{"pos": {int(p)}, "layer": {layer}, "experts": {row}}}\n'
                        for p, row in zip(positions, idx.tolist()))
        with self._lock:
            self._f.write(lines)

    def flush(self) -> None:
        with self._lock:
            self._f.flush()

    def close(self) -> None:
        with self._lock:
            self._f.close()


def read_trace(path) -> list[tuple[int, int]]:
    """(layer, expert) accesses in order."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    out.extend((int(r["layer"]), int(e)) for e in r["experts"])
                except (ValueError, KeyError, TypeError, RecursionError, OverflowError):
                    raise GrokError(f"{path}:{n}: not a routing trace line",
                                    hint="pass a file written with --routing-trace") from None
    except OSError as e:
        raise GrokError(f"cannot read trace {str(path)!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise GrokError(f"{path}: not a routing trace (not UTF-8 text)",
                        hint="pass a file written with --routing-trace") from None
    return out


def most_used(accesses: list, n: int) -> list[tuple[int, int]]:
    """The n most used experts: candidates for --pin-experts."""
    return [k for k, _ in Counter(accesses).most_common(n)]
