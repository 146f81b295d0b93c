"""grok-cli warmup: compile every kernel now (numba keeps them), so later runs start at once."""

from __future__ import annotations

import time

from .. import engine
from .app import Run, command, demo_path, err, out


@command()
def warmup(run: Run):
    """Compile the kernels ahead of use: the demo model (and --model, if given) through prefill,
    decode and batched decode, with and without the expert cache, f32 and int8 output layer (a
    GGUF model also with 8-bit activations).

    numba compiles them once per machine (40-120 s) and keeps them in its cache; a later run
    then starts at once. Prints each step and the time it took."""
    import grokcpu
    from . import firstuse
    t0 = time.perf_counter()
    firstuse.compiling = True
    paths = [("demo", demo_path())]
    if run.model is not None:
        paths.append((str(run.model), run.model))
    base = run.options
    variants = [("expert cache", dict(expert_cache_gb=base.expert_cache_gb if base.expert_cache_gb != "off" else "auto")),
                ("no expert cache", dict(expert_cache_gb="off"))]
    from ..formats.gguf import detect_format
    for name, path in paths:
        # the last variant by format: ckpt-0's int8 output layer, a GGUF model's 8-bit activations
        last = (("8-bit activations", dict(activations="q8")) if detect_format(path) == "gguf"
                else ("int8 output layer", dict(unembed="int8")))
        for label, change in variants + [last]:
            opts = grokcpu.Options.make(**{**_fields(base), "routing_trace": None, **change})
            t = time.perf_counter()
            err(f"warmup: {name}, {label}: ", end="")
            model = grokcpu.load(path, options=opts)
            try:
                engine.warm_up(model, batch=True)
            finally:
                close = getattr(model, "close", None)
                if close is not None:
                    close()
            err(f"{time.perf_counter() - t:.1f} s")
    total = time.perf_counter() - t0
    firstuse.mark(total)
    firstuse.compiling = False
    out(f"warmup: kernels compiled and cached in {total:.1f} s; later runs start at once\n")


def _fields(opts) -> dict:
    from dataclasses import fields
    return {f.name: getattr(opts, f.name) for f in fields(opts)}
