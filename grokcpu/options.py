"""The engine's options, validated once: `grokcpu.load` and every CLI command build them here.

    opts = Options.make(threads=2, expert_cache_gb="auto", unembed="int8")

Errors name the parameter (`OptionError.param`); the CLI renders them with its flag's name.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

from .errors import GrokError

POLICIES = ("lru", "lfu")
READS = ("auto", "direct", "buffered")
UNEMBEDS = ("f32", "int8")
ACTIVATIONS = ("f32", "q8")
OFFLOADS = ("none", "dense")
MAX_THREADS = 4096
MAX_CONTEXT = 1 << 24


class OptionError(GrokError):
    """A bad value for one option; `param` is its parameter name (the CLI maps it to a flag)."""

    def __init__(self, param: str, message: str, hint: str | None = None, name: str | None = None):
        self.param = param
        self.template, self.hint_template = message, hint
        name = param if name is None else name
        super().__init__(_named(message, name), hint and _named(hint, name))

    def render(self, name: str) -> "OptionError":
        """The same error, naming the option `name` (a CLI flag) instead of the parameter."""
        return OptionError(self.param, self.template, self.hint_template, name=name)


def _named(template: str, name: str) -> str:
    """The template with {name} filled in; {{ and }} (how `quote` escapes a value's braces)
    become single braces."""
    t = template.replace("{{", "\0l").replace("}}", "\0r").replace("{name}", name)
    return t.replace("\0l", "{").replace("\0r", "}")


def quote(value) -> str:
    """A value for an error message: repr, one line, at most 60 characters."""
    try:
        r = repr(value)
    except Exception:           # a hostile __repr__, or one too deep to print
        r = f"<{type(value).__name__}>"
    r = r.replace("\n", "\\n").replace("\r", "\\r")
    r = r if len(r) <= 60 else r[:57] + "..."
    return r.replace("{", "{{").replace("}", "}}")      # safe inside an OptionError template



def positive_int(param: str, value, upper: int, allow_none: bool = True) -> int | None:
    """An int in 1..upper (bools, floats and strings refused), or None where allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np
            if isinstance(value, np.integer):
                value = int(value)
            else:
                raise TypeError
        except TypeError:
            raise OptionError(param, f"{{name}} must be a whole number, not {quote(value)}",
                              hint=f"use an integer from 1 to {upper}") from None
    if not 1 <= value <= upper:
        raise OptionError(param, f"{{name}} {quote(value)} is out of range", hint=f"use an integer from 1 to {upper}")
    return value


def expert_cache_gb(value) -> str | float:
    """'auto', 'off', or a positive finite size in GB (a number or a numeric string)."""
    if value is None:
        return "auto"
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("auto", "off"):
            return v
        try:
            x = float(v)
        except ValueError:
            raise OptionError("expert_cache_gb", f"{{name}} {quote(value)} is not a size",
                              hint="give a size in GB (e.g. 64), 'auto', or 'off' (read experts from the "
                                   "memory map)") from None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError("expert_cache_gb", f"{{name}} must be a number of GB, 'auto' or 'off', not {quote(value)}")
    else:
        try:
            x = float(value)
        except OverflowError:
            x = math.inf
    if not (0 < x < 1e9):
        raise OptionError("expert_cache_gb", f"{{name}} {quote(value)} is out of range",
                          hint="give a positive size in GB, 'auto', or 'off'")
    return x


def _choice(param: str, value, choices: tuple) -> str:
    v = value.strip().lower() if isinstance(value, str) else value
    if v not in choices:
        raise OptionError(param, f"{{name}} {quote(value)} is not known", hint=f"use one of: {', '.join(choices)}")
    return v


def _bool(param: str, value) -> bool:
    if not isinstance(value, bool):
        raise OptionError(param, f"{{name}} must be True or False, not {quote(value)}")
    return value


def pin_list(value) -> tuple:
    """pin_experts as given to `load`: pairs (layer, expert), or the CLI's string form
    "LAYER:EXPERT,..." / "TRACE.jsonl:N", kept as a string and resolved against the model."""
    if value is None or value == () or value == [] or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], str):
        return value
    try:
        pairs = tuple(value)
    except TypeError:
        raise OptionError("pin_experts", f"{{name}} must be (layer, expert) pairs, not {quote(value)}") from None
    out = []
    for p in pairs:
        try:
            layer, e = p
            if any(isinstance(v, bool) for v in (layer, e)):
                raise TypeError
            layer, e = int(layer), int(e)
            if (layer, e) != tuple(p):
                raise TypeError
        except (TypeError, ValueError, OverflowError):
            raise OptionError("pin_experts", f"{{name}}: {quote(p)} is not a (layer, expert) pair of integers") from None
        out.append((layer, e))
    return tuple(out)


def resolve_pins(pins: tuple, num_layers: int, num_experts: int) -> list[tuple[int, int]]:
    """The pairs to pin: a string form is parsed (a trace file is read); every pair checked."""
    if len(pins) == 1 and isinstance(pins[0], str):
        pins = tuple(_parse_pin_string(pins[0]))
    for layer, e in pins:
        if not (0 <= layer < num_layers and 0 <= e < num_experts):
            raise OptionError("pin_experts", f"{{name}}: {layer}:{e} is outside {num_layers} layers x "
                                             f"{num_experts} experts", hint="layers and experts count from 0")
    return list(dict.fromkeys(pins))


def _parse_pin_string(value: str) -> list[tuple[int, int]]:
    head, _, tail = value.rpartition(":")
    if head and os.path.isfile(head):
        from .trace import most_used, read_trace
        try:
            n = int(tail)
        except ValueError:
            raise OptionError("pin_experts", f"{{name}} {quote(value)}: expected TRACE:N with N a number") from None
        return most_used(read_trace(head), n)
    pins = []
    for part in value.split(","):
        try:
            layer, e = (int(v) for v in part.strip().split(":"))
        except ValueError:
            raise OptionError("pin_experts", f"{{name}}: {quote(part)} is not LAYER:EXPERT",
                              hint="e.g. 0:3,0:5, or trace.jsonl:16 for the 16 most used in a routing trace") from None
        pins.append((layer, e))
    return pins


@dataclass(frozen=True)
class Options:
    """How a model runs. Build with `Options.make(...)`, which validates every field."""

    threads: int | None = None            # compute threads (None: physical cores)
    context: int | None = None            # KV-cache length (None: the model's sequence_len)
    expert_cache_gb: str | float = "auto"  # 'auto', 'off' (experts from the memory map), or GB
    expert_cache_policy: str = "lru"
    prefetch: bool = False                # read the next layer's likely experts ahead
    expert_reads: str = "auto"            # misses: direct (O_DIRECT), buffered, or auto (direct
                                          # below all experts where the file system allows it)
    pin_experts: tuple = ()               # (layer, expert) pairs kept resident, or ("SPEC",)
    routing_trace: str | None = None      # append the routing to this JSONL file
    unembed: str = "f32"                  # output layer: f32 (exact) or int8
    activations: str = "f32"              # GGUF K-quant decode products: f32 (exact) or q8 (8-bit x)
    offload: str = "none"                 # none, or dense (attention etc. on a CUDA GPU)

    @classmethod
    def make(cls, **kw) -> "Options":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise OptionError(unknown[0], "unknown option {name}", hint=f"options are: {', '.join(sorted(names))}")
        d = {k: v for k, v in kw.items()}
        trace = d.get("routing_trace")
        if trace is not None:
            if not isinstance(trace, (str, os.PathLike)):
                raise OptionError("routing_trace", f"{{name}} must be a file path, not {quote(trace)}")
            trace = os.fspath(trace)
            folder = os.path.dirname(os.path.abspath(trace))
            if not os.path.isdir(folder):
                raise OptionError("routing_trace", f"{{name}}: folder {quote(folder)} does not exist",
                                  hint="create it, or give another path")
            if os.path.isdir(trace):
                raise OptionError("routing_trace", f"{{name}}: {quote(trace)} is a folder", hint="give a file path")
        return cls(
            threads=positive_int("threads", d.get("threads"), MAX_THREADS),
            context=positive_int("context", d.get("context"), MAX_CONTEXT),
            expert_cache_gb=expert_cache_gb(d.get("expert_cache_gb", "auto")),
            expert_cache_policy=_choice("expert_cache_policy", d.get("expert_cache_policy", "lru"), POLICIES),
            prefetch=_bool("prefetch", d.get("prefetch", False)),
            expert_reads=_choice("expert_reads", d.get("expert_reads", "auto"), READS),
            pin_experts=pin_list(d.get("pin_experts", ())),
            routing_trace=trace,
            unembed=_choice("unembed", d.get("unembed", "f32"), UNEMBEDS),
            activations=_choice("activations", d.get("activations", "f32"), ACTIVATIONS),
            offload=_choice("offload", d.get("offload", "none"), OFFLOADS),
        )
