"""grok-cli info: describe a checkpoint from its headers: config, sizes, checksums, memory plan
(a GGUF model: config, sizes, the ggml type of each tensor group and the memory plan)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Annotated, Optional

import numpy as np
import typer

from ..errors import GrokError
from .app import Run, command, demo_path, err, gb, out
from .convert import parse_size


@command()
def info(
    run: Run,
    verify: Annotated[bool, typer.Option("--verify", help="hash every file and compare with config.json's sha256")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of text")] = False,
    ram: Annotated[Optional[str], typer.Option(
        "--ram", show_default=False,
        help="plan for a machine with this much RAM, all of it available (256G, 512G, or GB: 256)")] = None,
):
    """Describe a checkpoint without loading it: config, sizes, checksums, memory plan.

    Everything comes from the file headers (no weights are read, except with --verify, which
    hashes every file and compares with the sha256 listed in config.json). The memory plan uses
    this machine's RAM, or with --ram an assumed machine's (G = 10^9 bytes).
    """
    from ..checkpoint import Checkpoint
    from ..plan import memory_plan
    from ..tokenizer import Tokenizer, find_tokenizer

    model = demo_path() if run.model is None else run.model
    ram_bytes = None if ram is None else parse_size(ram, "--ram", bare=10**9, least=10**6,
                                                     example="give the RAM in GB, e.g. 256G or 256")
    t0 = time.perf_counter()
    if os.path.isfile(model):
        gguf_info(run, model, as_json, verify, ram_bytes)
        if run.stats:
            err(f"stats: info took {time.perf_counter() - t0:.2f} s")
        return
    ck = Checkpoint(model, weights=False)        # headers only
    c = ck.config
    plan = memory_plan(ck, _context(run, c), run.options.expert_cache_gb, run.options.unembed, ram_bytes)
    try:
        tk = Tokenizer(find_tokenizer(ck.root, run.tokenizer))
        tok_info = {"path": str(tk.path), "vocab_size": tk.vocab_size,
                    "fits": tk.vocab_size <= c.vocab_size}
    except GrokError as e:
        tok_info = {"error": str(e)}
    sums = manifest(ck)
    checks = verify_files(ck, sums) if verify else None
    params = sum(numel(r) for r in ck.refs)
    doc = {"model": str(ck.root), "format": "xai ckpt-0 (released Grok-1 layout: one pickle per tensor)",
           "files": len(ck.files), "config": c.to_dict(), "parameters": params,
           "quantization": "int8 weights with bf16 scales per output column (attention output and expert "
                           f"down projections: {c.model_parallel_scale_blocks} row blocks); embeddings, "
                           "router and norms float32",
           "tokenizer": tok_info, "memory_plan": plan,
           "checksums": checks if checks is not None else
           ("not verified (pass --verify)" if sums else "config.json lists no sha256")}
    if as_json:
        out(json.dumps(doc, indent=1) + "\n")
    else:
        print_info(doc, c, plan, tok_info, checks, sums)
    if run.stats:
        err(f"stats: info took {time.perf_counter() - t0:.2f} s")
    if checks is not None and checks["mismatched"]:
        bad = checks["mismatched"]
        raise GrokError(f"{len(bad)} file(s) do not match their sha256: {', '.join(bad[:5])}"
                        + (" ..." if len(bad) > 5 else ""), hint="download these files again")


def gguf_info(run: Run, path, as_json: bool, verify: bool, ram: int | None = None) -> None:
    """A GGUF model: config, files, the ggml type of each tensor group and the memory plan."""
    from ..formats.gguf_checkpoint import GGUFCheckpoint
    from ..plan import memory_plan
    from ..tokenizer import model_tokenizer
    if verify:
        raise GrokError("--verify checks a ckpt-0 checkpoint against its config.json; a GGUF lists no sha256",
                        hint="leave --verify out for a GGUF model")
    ck = GGUFCheckpoint(path)
    try:
        c = ck.config
        try:
            tk = model_tokenizer(path, run.tokenizer)
            tok_info = {"path": str(tk.path), "vocab_size": tk.vocab_size, "fits": tk.vocab_size <= c.vocab_size}
        except GrokError as e:
            tok_info = {"error": str(e)}
        groups = ck.groups()
        params = sum(int(np.prod(t.shape, dtype=np.int64)) for t in ck.gguf.tensors.values())
        plan = memory_plan(ck, _context(run, c), run.options.expert_cache_gb, ram=ram)
        doc = {"model": str(path), "format": f"GGUF (llama.cpp), {len(ck.files)} file(s)", "files": ck.files,
               "bytes": ck.nbytes, "config": c.to_dict(), "parameters": params,
               "tensor_types": {g: {t: n for t, n in d.items()} for g, d in groups.items()},
               "read_per_token_bytes": plan["read_per_token_bytes"], "tokenizer": tok_info, "memory_plan": plan}
    finally:
        ck.close()
    if as_json:
        out(json.dumps(doc, indent=1) + "\n")
        return
    rows = [("model", doc["model"]), ("format", f"{doc['format']}, {gb(doc['bytes'])}"),
            ("config", _config_line(c)), ("parameters", _params(params)),
            ("tokenizer", tok_info.get("error") or f"{tok_info['path']} ({tok_info['vocab_size']} pieces)")]
    for k, v in rows:
        out(f"{k:<13}{v}\n")
    out("tensor types\n")
    for g, d in groups.items():
        out(f"  {g:<22}" + ", ".join(f"{t} {gb(n)}" for t, n in d.items()) + "\n")
    print_plan(plan, c)


def _context(run: Run, c) -> int:
    ctx = c.sequence_len if run.options.context is None else run.options.context
    if not 1 <= ctx <= c.sequence_len:
        raise GrokError(f"--context {ctx} is outside 1..{c.sequence_len}",
                        hint=f"pass a context length up to the model's sequence_len {c.sequence_len}")
    return ctx


def _config_line(c) -> str:
    return (f"vocab {c.vocab_size}, context {c.sequence_len}, emb {c.emb_size}, layers {c.num_layers}, "
            f"q-heads {c.num_q_heads}, kv-heads {c.num_kv_heads}, head size {c.key_size}, experts "
            f"{c.num_experts} ({c.num_selected_experts} per token), expert ffn {c.ffn_size}")


def _params(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def numel(ref) -> int:
    import numpy as np
    shape = ref.weight.shape if hasattr(ref, "weight") else ref.shape
    return int(np.prod(shape, dtype=np.int64))


def manifest(ck) -> dict:
    p = ck.root / "config.json"
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        files = d["checkpoint"]["files"]
        return {f["file"]: f["sha256"] for f in files if isinstance(f, dict) and "sha256" in f}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def verify_files(ck, manifest: dict) -> dict:
    total = sum(os.path.getsize(f) for f in ck.files)
    done = 0
    t0 = last = time.perf_counter()
    ok, mismatched, unlisted = 0, [], []
    tty = sys.stderr.isatty()
    for f in ck.files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(8 << 20):
                h.update(chunk)
                done += len(chunk)
                now = time.perf_counter()
                if now - last > (0.2 if tty else 10.0):
                    last = now
                    rate = done / max(now - t0, 1e-9)
                    msg = f"verify: {done / 1e9:.2f}/{total / 1e9:.2f} GB, {rate / 1e9:.2f} GB/s, {f.name}"
                    err("\r" + msg + "\x1b[K" if tty else msg, end="" if tty else "\n")
        want = manifest.get(f.name)
        if want is None:
            unlisted.append(f.name)
        elif h.hexdigest() == want:
            ok += 1
        else:
            mismatched.append(f.name)
    if tty and last > t0:
        err("")
    return {"ok": ok, "mismatched": mismatched, "unlisted": unlisted, "bytes": total,
            "seconds": round(time.perf_counter() - t0, 3)}


def print_info(doc, c, plan, tok_info, checks, manifest) -> None:
    rows = [
        ("model", doc["model"]),
        ("format", f"{doc['format']}, {doc['files']} files, {gb(plan['file_bytes'])}"),
        ("config", _config_line(c)),
        ("parameters", _params(doc["parameters"])),
        ("quantization", doc["quantization"]),
    ]
    if "error" in tok_info:
        rows.append(("tokenizer", tok_info["error"]))
    else:
        fit = "" if tok_info["fits"] else f"  -- does NOT fit the model's {c.vocab_size}"
        rows.append(("tokenizer", f"{tok_info['path']} ({tok_info['vocab_size']} pieces){fit}"))
    if checks is None:
        rows.append(("checksums", doc["checksums"]))
    elif not checks["mismatched"]:
        extra = f", {len(checks['unlisted'])} not listed" if checks["unlisted"] else ""
        rows.append(("checksums", f"ok: {checks['ok']} files match config.json{extra} "
                                  f"({gb(checks['bytes'])} in {checks['seconds']:.1f} s)"))
    else:
        rows.append(("checksums", f"MISMATCH in {len(checks['mismatched'])} files: {', '.join(checks['mismatched'][:5])}"))
    for k, v in rows:
        out(f"{k:<13}{v}\n")
    print_plan(plan, c)


def print_plan(p: dict, c) -> None:
    budget_how = "auto" if p["expert_budget_auto"] else "--expert-cache-gb"
    if p["ram_assumed"]:
        out(f"memory plan  (ASSUMED --ram: {gb(p['ram_total_bytes'])} RAM, all of it available; "
            "not this machine's)\n")
    else:
        out(f"memory plan  (this machine: {gb(p['ram_total_bytes'])} RAM, {gb(p['ram_available_bytes'])} available)\n")
    out(f"  weights           {gb(p['payload_bytes']):>10}   = dense {gb(p['dense_bytes'])} + experts "
        f"{gb(p['expert_bytes'])} (files: {gb(p['file_bytes'])} with their headers)\n")
    out(f"  dense weights     {gb(p['dense_bytes']):>10}   used by every token (embedding table {gb(p['embedding_bytes'])})\n")
    out(f"  experts           {gb(p['expert_bytes']):>10}   {p['experts_total']} experts of {gb(p['one_expert_bytes'])}\n")
    out(f"  KV cache          {gb(p['kv_cache_bytes']):>10}   at context {p['context']} (float32)\n")
    out(f"  expert budget     {gb(p['expert_budget_bytes']):>10}   ({budget_how}): holds {p['experts_held']} of "
        f"{p['experts_total']} experts ({p['experts_held'] / max(p['experts_total'], 1):.0%})\n")
    a = p.get("auto_budget_parts")
    if a:
        how = ("clamped to [k experts, every expert]" if a["clamped"] else "")
        out(f"                                 = available {gb(a['available'])} - resident non-expert bytes "
            f"{gb(a['resident_non_expert'])} - KV cache {gb(a['kv_cache'])} - safety margin {gb(a['margin'])}"
            f"{' = ' + gb(a['unclamped']) + ', ' + how if how else ''}\n")
    out(f"  RAM needed        {gb(p['ram_needed_bytes']):>10}   = resident non-expert bytes + KV cache + expert "
        f"budget + safety margin: {'fits' if p['fits'] else 'does NOT fit'} in {gb(p['ram_available_bytes'])} "
        f"available{', every expert resident' if p['experts_held'] == p['experts_total'] else ''}\n")
    r = p["read_per_token_parts"]
    out(f"  read per token    {gb(p['read_per_token_bytes']):>10}   = attention/norms/routers {gb(r['layers_dense'])} "
        f"+ final norm {gb(r['final_norm'])} + embedding row {gb(r['embedding_row'])} + output table "
        f"{gb(r['output_table'])} + {c.num_selected_experts} experts x {c.num_layers} layers {gb(r['experts'])}\n")
    out(f"                                 (+ up to {gb(p['kv_read_per_token_bytes_at_full_context'])} of KV cache "
        "at a full context)\n")
