"""Model configuration: the Grok-1 constants, and the upstream config.json sections.

Field names follow the reference (`run.py`'s LanguageModelConfig / TransformerConfig), so a
config.json written next to a checkpoint reads name for name.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import ConfigError


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
        problems = []
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
                problems.append(f"{f.name}={v}")
        positive = ("vocab_size", "sequence_len", "emb_size", "key_size", "num_q_heads",
                    "num_kv_heads", "num_layers", "num_experts", "num_selected_experts", "ffn_size")
        problems += [f"{n}={getattr(self, n)}" for n in positive if getattr(self, n) <= 0]
        if problems:
            raise ConfigError(f"invalid config values: {', '.join(problems)}",
                              hint="sizes must be positive integers")
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
    def from_dict(cls, d: dict) -> "GrokConfig":
        """From a config.json dict with `language_model` / `transformer` sections (or flat)."""
        flat: dict = {}
        for section in ("language_model", "transformer"):
            sub = d.get(section)
            if isinstance(sub, dict):
                flat.update(sub)
        if not flat:
            flat = dict(d)
        known = {f.name: f for f in fields(cls)}
        kw = {}
        for k, v in flat.items():
            if k not in known or v is None:
                continue
            default = known[k].default
            try:
                kw[k] = type(default)(v) if not isinstance(default, bool) else bool(v)
            except (TypeError, ValueError):
                raise ConfigError(f"config field {k!r} has a bad value {v!r}") from None
            if isinstance(default, int) and float(v) != kw[k]:
                raise ConfigError(f"config field {k!r} must be an integer, got {v!r}")
        if "ffn_size" not in kw and "emb_size" in kw:
            kw["ffn_size"] = ffn_size(kw["emb_size"], kw.get("widening_factor", cls.widening_factor))
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | Path) -> "GrokConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read config {str(path)!r}: {e}",
                              hint="fix or remove the file; a bare ckpt-0/ works without it") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config {str(path)!r} is not a JSON object")
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        """Upstream-shaped sections, as in the fixtures' config.json."""
        d = asdict(self)
        lm_keys = ("vocab_size", "pad_token", "eos_token", "sequence_len",
                   "embedding_multiplier_scale", "output_multiplier_scale")
        return {"language_model": {k: d[k] for k in lm_keys},
                "transformer": {k: v for k, v in d.items() if k not in lm_keys}}


GROK1 = GrokConfig()
