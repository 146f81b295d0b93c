"""grok-cli convert: a ckpt-0 checkpoint (or a GGUF) to a llama.cpp Grok GGUF file."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import GrokError
from .app import Run, command, err, gb


def parse_size(text: str, flag: str = "--split-max-size", bare: int = 1, least: int = 1,
               example: str = "e.g. 500M, 2G or a number of bytes") -> int:
    """'500M', '2G', '1.5G', '123456' -> bytes (decimal units, as llama-gguf-split's
    --split-max-size); a number without a unit counts `bare` bytes each (1: bytes)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(([kKmMgGtT]?)[bB]?)\s*", text or "")
    if not m:
        raise GrokError(f"{flag} {text!r} is not a size", hint=example)
    n = float(m.group(1)) * (1000 ** " kmgt".index(m.group(3).lower() or " ") if m.group(2) else bare)
    if n < least or n > 1 << 60:
        raise GrokError(f"{flag} {text!r} is out of range", hint=example)
    return int(n)


@command()
def convert(
    run: Run,
    out_path: Annotated[Path, typer.Option("--out", "-o", show_default=False, help="the .gguf file to write")],
    qtype: Annotated[str, typer.Option("--type", help="f32, f16, bf16, q8_0, q4_k, q5_k, q6_k or q4_k_m")] = "q8_0",
    split_max_size: Annotated[Optional[str], typer.Option(
        "--split-max-size", show_default=False,
        help="write llama.cpp shards NAME-0000k-of-0000n.gguf of at most this size (500M, 2G)")] = None,
):
    """Write a model as a llama.cpp Grok GGUF, tensor by tensor (bounded memory).

    --model is a ckpt-0 checkpoint folder or a GGUF file; the tokenizer is the one beside it
    (or --tokenizer). The output appears only when complete (written to a temporary name,
    fsynced, renamed)."""
    from ..formats.convert import convert as run_convert
    if run.model is None:
        raise GrokError("convert needs --model", hint="grok-cli convert --model PATH --out OUT.gguf --type q8_0")
    size = parse_size(split_max_size) if split_max_size is not None else 0
    t0 = last = time.perf_counter()
    tty = sys.stderr.isatty()

    def progress(done: int, total: int, name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last > (0.2 if tty else 5.0) or done == total:
            last = now
            msg = f"convert: {done / max(total, 1):.0%} {gb(done)}/{gb(total)} {name}"
            err("\r" + msg + "\x1b[K" if tty else msg, end="" if tty and done < total else "\n")

    files = _terminable(run_convert, run.model, out_path, qtype.lower(), size, run.tokenizer, progress, err)
    err(f"wrote {', '.join(str(f) for f in files)} ({gb(sum(f.stat().st_size for f in files))}) "
        f"in {time.perf_counter() - t0:.1f} s")


def _terminable(fn, *args):
    """fn(*args) with SIGTERM raised as SystemExit, so that its cleanup (the temporary folder)
    runs when the process is asked to stop, as for Ctrl-C."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)
    old = signal.signal(signal.SIGTERM, stop)
    try:
        return fn(*args)
    finally:
        signal.signal(signal.SIGTERM, old)
