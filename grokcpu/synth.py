#!/usr/bin/env python3
"""Write a random-weight Grok-1 checkpoint in the released `ckpt-0/` format, streaming.

    python tools/make_checkpoint.py --preset scaled-16 --out /tmp/scaled16
    python tools/make_checkpoint.py --preset grok-1 --layers 6 --out /data/grok6   # ~32 GB
    python tools/make_checkpoint.py --config cfg.json --emb 256 --layers 4 --out DIR

Writes `OUT/ckpt-0/tensor{i:05d}_000` (one pickle per parameter, byte-compatible with what the
release's `pickle.dump` wrote: see grokcpu/formats/pickle_writer.py and spec GROK1.md §4) and
then, last, `OUT/config.json` (upstream `language_model` / `transformer` sections plus a
`checkpoint` manifest with per-file shapes, dtypes and sha256, like the shared fixtures). A folder
without config.json is an incomplete run.

Each tensor is generated and written in fixed blocks of at most 32 MiB, so memory stays small
(~100-200 MB) whatever the checkpoint size. Block `b` of the tensor at parameter path `p` is drawn
from its own generator seeded with (seed, hash(p), b): the bytes depend only on the seed, the
geometry and the parameter path -- not on the file order, the number of layers or how the
writer chunks its I/O.

Weights (numerically sane: activations and logits stay O(1)):
* quantized matrices: int8 uniform on [-127, 127] (0 twice as likely, so the mean is exactly 0;
  std ~73.5), with bf16 scales per output column (and per input block for the row-parallel
  ones) of  (1/sqrt(fan_in)) / 73.5 * exp(0.1 * N(0,1)), so dequantized weights have
  std ~ 1/sqrt(fan_in);
* embeddings: float32 N(0, 1/D) (the model multiplies them by sqrt(D) on the way in);
* RMSNorm scales: float32 1 + 0.05 * N(0,1);  router: float32 N(0, 1/D).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from .config import ffn_size
from .errors import CheckpointError, ConfigError, GrokError
from .formats import pickle_writer as pw

TOOL = "tools/make_checkpoint.py"
BLOCK_BYTES = 32 << 20              # generation/write block; part of the determinism contract
INT8_STD = math.sqrt(2 * (127 * 128 * 255 // 6) / 256)   # std of the int8 weight distribution
SCALE_NOISE, NORM_NOISE = 0.1, 0.05
OUTPUT_MULTIPLIER = 0.5773502691896257
CKPT = "ckpt-0"

PRESETS: dict[str, dict] = {
    # quick: the geometry of fixture p1 (V=512 D=128 H=16 G=8 d=8 L=2 E=8 k=2 F=176)
    "tiny": dict(vocab_size=512, sequence_len=256, emb_size=128, key_size=8, num_q_heads=16,
                 num_kv_heads=8, num_layers=2, num_experts=8, num_selected_experts=2,
                 widening_factor=2.0, ffn_size=176),
    # ~5.7 GB: Grok-1 structure at 1/4 width, 16 layers
    "scaled-16": dict(vocab_size=131072, sequence_len=8192, emb_size=1536, key_size=128,
                      num_q_heads=12, num_kv_heads=2, num_layers=16, num_experts=8,
                      num_selected_experts=2, widening_factor=8.0, ffn_size=8192),
    # the released geometry (64 layers = ~318 GB; use --layers N: ~4.9 GB per layer + 3.2 GB)
    "grok-1": dict(vocab_size=131072, sequence_len=8192, emb_size=6144, key_size=128,
                   num_q_heads=48, num_kv_heads=8, num_layers=64, num_experts=8,
                   num_selected_experts=2, widening_factor=8.0, ffn_size=32768),
}

LM_KEYS = ("vocab_size", "pad_token", "eos_token", "sequence_len", "embedding_init_scale",
           "embedding_multiplier_scale", "output_multiplier_scale", "fprop_dtype")
TR_KEYS = ("emb_size", "widening_factor", "ffn_size", "key_size", "num_q_heads", "num_kv_heads",
           "num_layers", "attn_output_multiplier", "num_experts", "num_selected_experts",
           "rope_base", "rms_norm_eps", "attn_logit_cap", "model_parallel_scale_blocks")
_INT_KEYS = ("vocab_size", "pad_token", "eos_token", "sequence_len", "emb_size", "ffn_size",
             "key_size", "num_q_heads", "num_kv_heads", "num_layers", "num_experts",
             "num_selected_experts", "model_parallel_scale_blocks")


def resolve_config(cfg: dict) -> dict:
    """Full config.json-style sections from a sectioned or flat dict; fills derived fields."""
    flat: dict = {}
    for section in ("language_model", "transformer"):
        if isinstance(cfg.get(section), dict):
            flat.update(cfg[section])
    if not flat:
        flat = dict(cfg)
    missing = [k for k in ("vocab_size", "emb_size", "key_size", "num_q_heads", "num_kv_heads",
                           "num_layers", "num_experts", "num_selected_experts") if k not in flat]
    if missing:
        raise ConfigError(f"config lacks {', '.join(missing)}")
    if "ffn_size" not in flat and "widening_factor" not in flat:
        raise ConfigError("config needs ffn_size or widening_factor")
    for k in _INT_KEYS:
        if k in flat:
            v = flat[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
                raise ConfigError(f"config field {k!r} must be an integer, got {v!r}")
            flat[k] = int(v)
    D, d = flat["emb_size"], flat["key_size"]
    if "ffn_size" not in flat:
        flat["ffn_size"] = ffn_size(D, float(flat["widening_factor"]))
    if "widening_factor" not in flat:
        flat["widening_factor"] = round(1.5 * flat["ffn_size"] / D, 6)
    defaults = dict(pad_token=0, eos_token=2, sequence_len=8192, embedding_init_scale=1.0,
                    embedding_multiplier_scale=math.sqrt(D), output_multiplier_scale=OUTPUT_MULTIPLIER,
                    fprop_dtype="bfloat16", attn_output_multiplier=d ** -0.5, rope_base=10000,
                    rms_norm_eps=1e-5, attn_logit_cap=30.0, model_parallel_scale_blocks=8)
    for k, v in defaults.items():
        flat.setdefault(k, v)
    flat["widening_factor"] = float(flat["widening_factor"])
    problems = [f"{k}={flat[k]}" for k in ("vocab_size", "sequence_len", "emb_size", "key_size",
                                           "num_q_heads", "num_kv_heads", "num_layers", "num_experts",
                                           "num_selected_experts", "ffn_size",
                                           "model_parallel_scale_blocks") if flat[k] <= 0]
    if problems:
        raise ConfigError(f"sizes must be positive: {', '.join(problems)}")
    if flat["num_q_heads"] % flat["num_kv_heads"]:
        raise ConfigError(f"num_q_heads={flat['num_q_heads']} is not a multiple of num_kv_heads={flat['num_kv_heads']}")
    if d % 2:
        raise ConfigError(f"key_size={d} must be even (rotary embeddings)")
    if flat["num_selected_experts"] > flat["num_experts"]:
        raise ConfigError("num_selected_experts > num_experts")
    nb = flat["model_parallel_scale_blocks"]
    for what, rows in (("num_q_heads*key_size", flat["num_q_heads"] * d), ("ffn_size", flat["ffn_size"])):
        if rows % nb:
            raise ConfigError(f"{what}={rows} must be a multiple of model_parallel_scale_blocks={nb} "
                              "(row-parallel weights have one scale row per input block)")
    return {"language_model": {k: flat[k] for k in LM_KEYS},
            "transformer": {k: flat[k] for k in TR_KEYS}}


class TensorSpec(NamedTuple):
    index: int
    path: str             # parameter path, e.g. transformer/decoder_layer_3/moe/linear/w
    kind: str             # 'ndarray' or 'QuantizedWeight8bit'
    shape: tuple          # ndarray shape or quantized weight shape
    scales_shape: tuple   # () for ndarrays
    init: str             # 'embedding' | 'norm' | 'router' | 'quantized'
    fan_in: int

    @property
    def file(self) -> str:
        return f"tensor{self.index:05d}_000"

    @property
    def payload_bytes(self) -> int:
        n = int(np.prod(self.shape, dtype=np.int64))
        if self.kind == "ndarray":
            return 4 * n
        return n + 2 * int(np.prod(self.scales_shape, dtype=np.int64))


def tensor_specs(config: dict) -> list[TensorSpec]:
    """All parameters in file order (spec §4.2): embeddings, final norm, then 12 per layer with
    the layers in lexicographic order of their names."""
    lm, tr = config["language_model"], config["transformer"]
    V, D, F = lm["vocab_size"], tr["emb_size"], tr["ffn_size"]
    E, L, nb = tr["num_experts"], tr["num_layers"], tr["model_parallel_scale_blocks"]
    Q, KV = tr["num_q_heads"] * tr["key_size"], tr["num_kv_heads"] * tr["key_size"]
    specs = [("language_model/in_out_embed/embeddings", "ndarray", (V, D), (), "embedding", D),
             ("language_model/rms_norm/scale", "ndarray", (D,), (), "norm", D)]
    for name in sorted(f"decoder_layer_{i}" for i in range(L)):
        p = f"transformer/{name}/"
        specs += [
            (p + "moe/linear/w", "QuantizedWeight8bit", (E, D, F), (E, 1, F), "quantized", D),
            (p + "moe/linear_1/w", "QuantizedWeight8bit", (E, F, D), (E, nb, D), "quantized", F),
            (p + "moe/linear_v/w", "QuantizedWeight8bit", (E, D, F), (E, 1, F), "quantized", D),
            (p + "multi_head_attention/key/w", "QuantizedWeight8bit", (D, KV), (1, KV), "quantized", D),
            (p + "multi_head_attention/linear/w", "QuantizedWeight8bit", (Q, D), (nb, D), "quantized", Q),
            (p + "multi_head_attention/query/w", "QuantizedWeight8bit", (D, Q), (1, Q), "quantized", D),
            (p + "multi_head_attention/value/w", "QuantizedWeight8bit", (D, KV), (1, KV), "quantized", D),
            (p + "rms_norm/scale", "ndarray", (D,), (), "norm", D),
            (p + "rms_norm_1/scale", "ndarray", (D,), (), "norm", D),
            (p + "rms_norm_2/scale", "ndarray", (D,), (), "norm", D),
            (p + "rms_norm_3/scale", "ndarray", (D,), (), "norm", D),
            (p + "router/w", "ndarray", (D, E), (), "router", D),
        ]
    return [TensorSpec(i, *s) for i, s in enumerate(specs)]


# ---- deterministic generation --------------------------------------------------------------------

def _path_key(path: str) -> int:
    return int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "little")


def _rng(seed: int, path: str, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence(seed, spawn_key=(_path_key(path), *key))))


def _int8_blocks(seed: int, spec: TensorSpec):
    """The int8 weight payload, in BLOCK_BYTES blocks: uniform on [-127, 127] with -128 -> 0."""
    total = int(np.prod(spec.shape, dtype=np.int64))
    for b, start in enumerate(range(0, total, BLOCK_BYTES)):
        n = min(BLOCK_BYTES, total - start)
        raw = _rng(seed, spec.path, 0, b).bit_generator.random_raw((n + 7) // 8)
        x = raw.view(np.int8)[:n]
        np.copyto(x, 0, where=(x == -128))
        yield x


def _float_blocks(seed: int, spec: TensorSpec, std: float):
    total = int(np.prod(spec.shape, dtype=np.int64))
    per = BLOCK_BYTES // 4
    for b, start in enumerate(range(0, total, per)):
        x = _rng(seed, spec.path, 0, b).standard_normal(min(per, total - start), dtype=np.float32)
        x *= np.float32(std)
        yield x


def _norm_values(seed: int, spec: TensorSpec) -> np.ndarray:
    x = _rng(seed, spec.path, 0, 0).standard_normal(spec.shape, dtype=np.float32)
    x *= np.float32(NORM_NOISE)
    x += np.float32(1.0)
    return x


def _scales_u16(seed: int, spec: TensorSpec) -> np.ndarray:
    g = _rng(seed, spec.path, 1)
    base = (1.0 / math.sqrt(spec.fan_in)) / INT8_STD
    s = base * np.exp(SCALE_NOISE * g.standard_normal(spec.scales_shape))
    return pw.float32_to_bf16_bits(s.astype(np.float32))


def _write_tensor(path: Path, spec: TensorSpec, seed: int, count: Callable[[int], None]) -> pw.WriteResult:
    def counted(blocks):
        for blk in blocks:
            yield blk
            count(blk.nbytes)

    if spec.kind == "QuantizedWeight8bit":
        scales = _scales_u16(seed, spec)
        res = pw.write_quantized(path, spec.shape, counted(_int8_blocks(seed, spec)), scales)
        count(scales.nbytes)
        return res
    if spec.init == "embedding":
        blocks = _float_blocks(seed, spec, 1.0 / math.sqrt(spec.fan_in))
    elif spec.init == "router":
        blocks = _float_blocks(seed, spec, 1.0 / math.sqrt(spec.fan_in))
    else:
        blocks = [_norm_values(seed, spec)]
    return pw.write_ndarray(path, spec.shape, "<f4", counted(blocks))


def _manifest_entry(spec: TensorSpec, sha: str) -> dict:
    e = {"file": spec.file, "path": spec.path, "kind": spec.kind}
    if spec.kind == "ndarray":
        e.update(shape=list(spec.shape), dtype="float32")
    else:
        e.update(weight_shape=list(spec.shape), weight_dtype="int8",
                 scales_shape=list(spec.scales_shape), scales_dtype="bfloat16")
    e["sha256"] = sha
    return e


def checkpoint_bytes(config: dict) -> int:
    """Approximate size on disk (payloads + ~0.5 KB of pickle framing per file)."""
    return sum(s.payload_bytes + 512 for s in tensor_specs(config))


def _existing_ancestor(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


def preflight(out_dir, config: dict, force: bool = False) -> list[Path]:
    """Checks before writing anything: refuse a non-empty ckpt-0 unless `force`; enough free
    disk space (counting the tensor files that would be replaced). Returns the existing entries
    of ckpt-0."""
    out = Path(out_dir)
    ckpt = out / CKPT
    if ckpt.exists() and not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} exists and is not a directory")
    old = sorted(ckpt.iterdir()) if ckpt.is_dir() else []
    if old and not force:
        raise CheckpointError(f"{ckpt} exists and is not empty", hint="pass --force to overwrite it")
    need = checkpoint_bytes(config)
    reclaim = sum(p.stat().st_size for p in old if p.is_file() and p.name.startswith("tensor"))
    where = _existing_ancestor(out)
    free = shutil.disk_usage(where).free
    if free + reclaim < need + (64 << 20):
        raise CheckpointError(f"not enough disk space in {where}: need {need / 1e9:.2f} GB, "
                              f"{(free + reclaim) / 1e9:.2f} GB free")
    return old


def make_checkpoint(out_dir, cfg: dict, seed: int = 0, progress: Callable | None = None, *,
                    force: bool = False, name: str | None = None, fsync: bool = False) -> dict:
    """Write a random-weight checkpoint to `out_dir/ckpt-0/` and `out_dir/config.json`.

    `cfg`: sections `language_model` / `transformer` (as in config.json) or a flat dict of the
    same fields; missing derived fields (multipliers, ffn_size, ...) are filled in.
    `progress(done_bytes, total_bytes, file_name)` is called after every block.
    Refuses a non-empty existing ckpt-0 unless `force` (then its tensor files are replaced and
    any extra ones removed). Returns the config dict written to config.json.
    """
    out = Path(out_dir)
    config = resolve_config(cfg)
    specs = tensor_specs(config)
    ckpt = out / CKPT
    total = sum(s.payload_bytes for s in specs)
    old = preflight(out, config, force)

    ckpt.mkdir(parents=True, exist_ok=True)
    try:
        (out / "config.json").unlink()            # the folder is incomplete until we finish
    except FileNotFoundError:
        pass
    keep = {s.file for s in specs}
    for p in old:                                  # stale files of a previous (larger) run
        if p.is_file() and p.name.startswith("tensor") and (p.name not in keep or p.name.endswith(".tmp")):
            p.unlink()

    done = 0
    current = [""]

    def count(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total, current[0])

    files = []
    for spec in specs:
        current[0] = spec.file
        res = _write_tensor(ckpt / spec.file, spec, seed, count)
        files.append(_manifest_entry(spec, res.sha256))
    if fsync:
        os.sync()

    doc = {"name": name or out.absolute().name, "seed": seed, **config,
           "checkpoint": {"dir": CKPT, "num_files": len(specs), "files": files},
           "generator": {
               "script": TOOL,
               "description": "random weights in the released Grok-1 ckpt-0 format "
                              "(pickle protocol 4, numpy 1.x module paths, __main__.QuantizedWeight8bit)",
               "weights": f"int8 uniform on [-127,127] (mean 0, std {INT8_STD:.2f}) x bf16 scales "
                          f"(1/sqrt(fan_in))/{INT8_STD:.2f}*exp({SCALE_NOISE}*N(0,1)) per output column "
                          "and input block; embeddings and router N(0,1/D) float32; norm scales "
                          f"1+{NORM_NOISE}*N(0,1)",
               "block_bytes": BLOCK_BYTES,
               "numpy": np.__version__,
               "python": platform.python_version(),
           }}
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / "config.json")
    return doc


# ---- command line --------------------------------------------------------------------------------

class ProgressLine:
    """`done/total GB, GB/s, ETA` on stderr; in place on a terminal, every ~10 s otherwise."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.t0, self.last = stream, time.monotonic(), 0.0
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.open = False          # a line is being updated in place

    def __call__(self, done: int, total: int, file: str) -> None:
        now = time.monotonic()
        if now - self.last < (0.25 if self.tty else 10.0) and done < total:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        rate = done / dt
        eta = (total - done) / rate if rate > 0 else float("inf")
        line = (f"{file}  {done / 1e9:7.2f} / {total / 1e9:.2f} GB  {100 * done / max(total, 1):5.1f}%  "
                f"{rate / 1e9:5.2f} GB/s  ETA {eta:5.0f} s")
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()
        self.open = self.tty

    def close(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


_OVERRIDES = (("vocab", "vocab_size"), ("emb", "emb_size"), ("layers", "num_layers"),
              ("q_heads", "num_q_heads"), ("kv_heads", "num_kv_heads"), ("key_size", "key_size"),
              ("ffn", "ffn_size"), ("experts", "num_experts"), ("top_k", "num_selected_experts"),
              ("seq_len", "sequence_len"))
# derived fields to recompute when the fields they derive from are overridden
_DERIVED = {"emb_size": ("embedding_multiplier_scale", "ffn_size"), "key_size": ("attn_output_multiplier",)}


def _flatten(cfg: dict) -> dict:
    flat = {}
    for section in ("language_model", "transformer"):
        if isinstance(cfg.get(section), dict):
            flat.update(cfg[section])
    return flat or dict(cfg)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Write a random-weight Grok-1 checkpoint (released ckpt-0 format) + config.json.")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="model geometry (default: tiny unless --config)")
    ap.add_argument("--config", help="JSON file with language_model/transformer sections (e.g. a config.json)")
    ap.add_argument("--out", required=True, help="output folder (gets ckpt-0/ and config.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite an existing non-empty ckpt-0")
    ap.add_argument("--fsync", action="store_true", help="sync the files to disk before writing config.json")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    for flag, field in _OVERRIDES:
        ap.add_argument("--" + flag.replace("_", "-"), dest=flag, type=int, help=f"override {field}")
    args = ap.parse_args(argv)

    bar = None
    try:
        if args.config:
            try:
                cfg = _flatten(json.loads(Path(args.config).read_text(encoding="utf-8")))
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read {args.config}: {e}") from None
            if args.preset:
                cfg = {**PRESETS[args.preset], **cfg}
        else:
            cfg = dict(PRESETS[args.preset or "tiny"])
        for flag, field in _OVERRIDES:
            v = getattr(args, flag)
            if v is not None and v != cfg.get(field):
                cfg[field] = v
                for dep in _DERIVED.get(field, ()):
                    if not (dep == "ffn_size" and args.ffn is not None):
                        cfg.pop(dep, None)
        if args.ffn is not None and ffn_size(cfg["emb_size"], float(cfg.get("widening_factor", 0))) != args.ffn:
            cfg.pop("widening_factor", None)      # re-derived from ffn_size
        config = resolve_config(cfg)
        lm, tr = config["language_model"], config["transformer"]
        size = checkpoint_bytes(config)
        preflight(args.out, config, args.force)
        print(f"writing {2 + 12 * tr['num_layers']} files, {size / 1e9:.2f} GB to {args.out}/{CKPT}: "
              f"V={lm['vocab_size']} D={tr['emb_size']} H={tr['num_q_heads']} G={tr['num_kv_heads']} "
              f"d={tr['key_size']} F={tr['ffn_size']} E={tr['num_experts']} k={tr['num_selected_experts']} "
              f"L={tr['num_layers']} seed={args.seed}", file=sys.stderr)
        bar = None if args.quiet else ProgressLine()
        t0 = time.monotonic()
        doc = make_checkpoint(args.out, config, seed=args.seed, progress=bar, force=args.force,
                              name=args.preset if not args.config else None, fsync=args.fsync)
        dt = time.monotonic() - t0
        if bar:
            bar.close()
        nbytes = sum((Path(args.out) / CKPT / f["file"]).stat().st_size for f in doc["checkpoint"]["files"])
        print(f"done: {doc['checkpoint']['num_files']} files, {nbytes / 1e9:.2f} GB in {dt:.1f} s "
              f"({nbytes / 1e9 / max(dt, 1e-9):.2f} GB/s) -> {Path(args.out) / 'config.json'}", file=sys.stderr)
        return 0
    except GrokError as e:
        if bar:
            bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if bar:
            bar.close()
        print(f"error: {e.strerror or e} ({e.filename})" if e.filename else f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if bar:
            bar.close()
        print("interrupted: the checkpoint is incomplete (no config.json)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
