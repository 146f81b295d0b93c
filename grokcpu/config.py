"""Model configuration: the Grok-1 constants, and the upstream config.json sections.

Field names follow the reference (`run.py`'s LanguageModelConfig / TransformerConfig), so a
config.json written next to a checkpoint reads name for name.
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import os
import stat
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import ConfigError

# Inclusive bounds of every size: generous around Grok-1 (emb 6144, 48/8 heads of 128, 64 layers,
# 8 experts, ffn 32768, vocab 131072, sequence_len 8192), small enough that no product of them
# overflows or allocates absurdly before the checkpoint's own shapes are checked.
INT_BOUNDS = {
    "vocab_size": (1, 1 << 22), "pad_token": (0, (1 << 22) - 1), "eos_token": (0, (1 << 22) - 1),
    "sequence_len": (1, 1 << 20), "emb_size": (1, 1 << 16), "key_size": (2, 1024),
    "num_q_heads": (1, 1024), "num_kv_heads": (1, 1024), "num_layers": (1, 1024),
    "num_experts": (1, 1024), "num_selected_experts": (1, 1024), "ffn_size": (1, 1 << 20),
    "model_parallel_scale_blocks": (1, 1024),
}
# (low, high, low inclusive?) of the float fields
FLOAT_BOUNDS = {
    "embedding_multiplier_scale": (-1e6, 1e6, True), "output_multiplier_scale": (-1e6, 1e6, True),
    "widening_factor": (0.0, 1024.0, False), "attn_output_multiplier": (-1e6, 1e6, True),
    "attn_logit_cap": (0.0, 1e6, False), "rope_base": (0.0, 1e12, False),
    "rms_norm_eps": (0.0, 1.0, False),
}
# Upstream config fields (run.py's LanguageModelConfig / TransformerConfig) that this engine
# does not need: accepted in config.json and ignored.
UPSTREAM_IGNORED = frozenset({
    "model_size", "embedding_init_scale", "name", "fprop_dtype", "model_type", "init_scale_override",
    "shard_embeddings", "capacity_factor", "init_scale", "shard_activations", "data_axis",
    "model_axis", "model",
})
SECTIONS = ("language_model", "transformer")
MAX_CONFIG_BYTES = 16 << 20
MAX_INT_DIGITS = 100          # longer integers in config.json are refused before int() sees them


def ffn_size(emb_size: int, widening_factor: float) -> int:
    """Expert hidden size as the reference derives it: 2/3 of the widened size, up to a multiple of 8."""
    size = int(widening_factor * emb_size) * 2 // 3
    return size + (8 - size) % 8


@dataclass(frozen=True)
class GrokConfig:
    # language_model section
    vocab_size: int = 131072
    pad_token: int = 0
    eos_token: int = 2
    sequence_len: int = 8192
    embedding_multiplier_scale: float = 78.38367176906169
    output_multiplier_scale: float = 0.5773502691896257
    # transformer section
    emb_size: int = 6144
    key_size: int = 128
    num_q_heads: int = 48
    num_kv_heads: int = 8
    num_layers: int = 64
    num_experts: int = 8
    num_selected_experts: int = 2
    widening_factor: float = 8.0
    ffn_size: int = 32768
    attn_output_multiplier: float = 0.08838834764831845
    attn_logit_cap: float = 30.0
    rope_base: float = 10000.0
    rms_norm_eps: float = 1e-5
    model_parallel_scale_blocks: int = 8

    def __post_init__(self) -> None:
        for name, (lo, hi) in INT_BOUNDS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ConfigError(f"config field {name!r} must be an integer, got {_brief(v)}",
                                  hint=f"set {name} to an integer in {lo}..{hi}")
            if not lo <= v <= hi:
                raise ConfigError(f"config field {name!r} = {_brief(v)} is outside {lo}..{hi}",
                                  hint=f"set {name} to an integer in {lo}..{hi}")
            object.__setattr__(self, name, int(v))
        for name, (lo, hi, closed) in FLOAT_BOUNDS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise ConfigError(f"config field {name!r} must be a number, got {_brief(v)}")
            v = float(v)
            if not (math.isfinite(v) and (lo <= v if closed else lo < v) and v <= hi):
                raise ConfigError(f"config field {name!r} = {_brief(v)} is outside "
                                  f"{'[' if closed else '('}{lo:g}, {hi:g}]",
                                  hint=f"set {name} to a finite number in that range")
            object.__setattr__(self, name, v)
        for tok in ("pad_token", "eos_token"):
            if getattr(self, tok) >= self.vocab_size:
                raise ConfigError(f"config field {tok!r} = {getattr(self, tok)} is not below vocab_size={self.vocab_size}")
        if self.num_q_heads % self.num_kv_heads:
            raise ConfigError(f"num_q_heads={self.num_q_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.key_size % 2:
            raise ConfigError(f"key_size={self.key_size} must be even for rotary embeddings")
        if self.num_selected_experts > self.num_experts:
            raise ConfigError(f"num_selected_experts={self.num_selected_experts} > num_experts={self.num_experts}")

    # derived sizes
    @property
    def q_size(self) -> int:          # H*d, query projection width
        return self.num_q_heads * self.key_size

    @property
    def kv_size(self) -> int:         # G*d, key/value projection width
        return self.num_kv_heads * self.key_size

    @property
    def group_size(self) -> int:      # query heads per KV head
        return self.num_q_heads // self.num_kv_heads

    @property
    def expert_bytes(self) -> int:    # one expert's int8 weights (gate, up, down: 3 x D x F)
        return 3 * self.emb_size * self.ffn_size

    @property
    def all_expert_bytes(self) -> int:
        return self.num_layers * self.num_experts * self.expert_bytes

    def kv_cache_bytes(self, context: int | None = None, itemsize: int = 4) -> int:
        n = self.sequence_len if context is None else context
        return 2 * self.num_layers * n * self.kv_size * itemsize

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "GrokConfig":
        """From a config.json dict with `language_model` / `transformer` sections (or flat).

        Every key in a section (or in a flat dict) must be a field of this class or an upstream
        field listed in UPSTREAM_IGNORED: a misspelled key is an error naming the closest known
        one, never a silent fall-back to the Grok-1 default. Beside the sections, other top-level
        keys (a manifest, inputs, metadata) are ignored, unless they look like a misspelled
        section or a field that belongs inside one.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: not a JSON object", hint="config.json must hold {...}")
        known = {f.name: f for f in fields(cls)}
        names = sorted(set(known) | UPSTREAM_IGNORED)
        flat: dict = {}
        sectioned = any(k in d for k in SECTIONS)
        if sectioned:
            for k in d:
                if k in SECTIONS:
                    continue
                if k in known:
                    raise ConfigError(f"{source}: key {_brief(k)} belongs inside the "
                                      f"'language_model' or 'transformer' section",
                                      hint="move it into its section")
                close = difflib.get_close_matches(k, SECTIONS, n=1, cutoff=0.75)
                if close:
                    raise ConfigError(f"{source}: unknown key {_brief(k)} (did you mean {close[0]!r}?)",
                                      hint="fix the section name")
            sections = [(s, d[s]) for s in SECTIONS if s in d]
            lm = d.get("language_model")
            if isinstance(lm, dict) and isinstance(lm.get("model"), dict):   # upstream nesting
                sections.append(("language_model.model", lm["model"]))
        else:
            sections = [("", d)]
        for where, sub in sections:
            if not isinstance(sub, dict):
                raise ConfigError(f"{source}: section {where!r} must be a JSON object, got {_brief(sub)}")
            for k, v in sub.items():
                key = f"{where}.{k}" if where else k
                if k in known:
                    flat[k] = v
                elif k not in UPSTREAM_IGNORED:
                    close = difflib.get_close_matches(k, names, n=1, cutoff=0.6)
                    guess = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ConfigError(f"{source}: unknown key {_brief(key)}{guess}",
                                      hint="fix or remove the key; known keys are GrokConfig's fields")
        kw = {}
        for k, v in flat.items():
            default = known[k].default
            if isinstance(v, _LongInt) or (isinstance(v, bool) or not isinstance(v, (int, float))):
                want = "an integer" if isinstance(default, int) else "a number"
                raise ConfigError(f"{source}: {k!r} must be {want}, got {_brief(v)}",
                                  hint=f"set {k} to {want}")
            if isinstance(default, int):
                if isinstance(v, float):
                    if not (math.isfinite(v) and v.is_integer()):
                        raise ConfigError(f"{source}: {k!r} must be an integer, got {_brief(v)}",
                                          hint=f"set {k} to an integer")
                    v = int(v)
            else:
                v = float(v)
            kw[k] = v
        if "ffn_size" not in kw and "emb_size" in kw:
            wf = kw.get("widening_factor", cls.widening_factor)
            E = kw["emb_size"]
            if 0 < wf <= FLOAT_BOUNDS["widening_factor"][1] and 0 < E <= INT_BOUNDS["emb_size"][1]:
                kw["ffn_size"] = ffn_size(E, wf)
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e.message}", hint=e.hint) from None

    @classmethod
    def from_json(cls, path: str | Path) -> "GrokConfig":
        hint = "fix or remove the file; a bare ckpt-0/ works without it"
        src = str(path)
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"config {src!r} is not a regular file", hint=hint)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise ConfigError(f"config {src!r} is not a regular file", hint=hint)
                raw = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as e:
            raise ConfigError(f"cannot read config {src!r}: {e.strerror or e}", hint=hint) from None
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"cannot read config {src!r}: larger than {MAX_CONFIG_BYTES} bytes", hint=hint)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"cannot read config {src!r}: not UTF-8 (byte {e.start})", hint=hint) from None
        try:
            d = json.loads(text, parse_int=_parse_int, parse_constant=_parse_constant)
        except json.JSONDecodeError as e:
            raise ConfigError(f"cannot read config {src!r}: {e}", hint=hint) from None
        except RecursionError:
            raise ConfigError(f"cannot read config {src!r}: nested too deeply", hint=hint) from None
        except ValueError as e:
            raise ConfigError(f"cannot read config {src!r}: {e}", hint=hint) from None
        return cls.from_dict(d, source=src)

    def to_dict(self) -> dict:
        """Upstream-shaped sections, as in the fixtures' config.json."""
        d = asdict(self)
        lm_keys = ("vocab_size", "pad_token", "eos_token", "sequence_len",
                   "embedding_multiplier_scale", "output_multiplier_scale")
        return {"language_model": {k: d[k] for k in lm_keys},
                "transformer": {k: v for k, v in d.items() if k not in lm_keys}}


GROK1 = GrokConfig()


class _LongInt:
    """An integer literal too long to convert (Python refuses >4300 digits; no size needs >100)."""

    def __init__(self, digits: int):
        self.digits = digits


def _parse_int(s: str):
    return int(s) if len(s) <= MAX_INT_DIGITS else _LongInt(len(s))


def _parse_constant(s: str):
    raise ValueError(f"{s} is not a valid JSON number")


def _brief(v) -> str:
    """A short description of a config value (never a 5000-digit or deeply nested repr)."""
    if isinstance(v, _LongInt):
        return f"a {v.digits}-digit integer"
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, int):
        return str(v) if abs(v) < 10 ** 30 else f"a {len(str(abs(v)))}-digit integer"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return repr(v[:60]) + ("..." if len(v) > 60 else "")
    return {dict: "an object", list: "a list"}.get(type(v), f"a {type(v).__name__}")
