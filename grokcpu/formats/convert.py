"""ckpt-0 (or GGUF) -> a standard llama.cpp Grok GGUF, tensor by tensor.

    convert(src, "grok-1-Q8_0.gguf", "q8_0", split_max_size=0, tokenizer=None, progress=None)

Names and metadata as llama.cpp writes a Grok model (formats/gguf.py has the table): `grok.*`
sizes and scales, `tokenizer.ggml.*` from SentencePiece's pieces (or copied from a GGUF source),
general.file_type. The embedding is tied (no output.weight), as in Grok-1. Norms and routers
are F32 (llama.cpp never quantizes them); matrices take --type, or, when their rows are not whole
blocks of it, the nearest type that fits (K-quants -> Q8_0 -> F16), said on stderr.

q4_k_m follows llama.cpp's Q4_K_M rules for an 8-expert model: experts' gate and up Q4_K;
their down Q6_K in the first and last eighth of the layers and every third layer between
(llama.cpp's use_more_bits), else Q4_K; attn_k and attn_v Q8_0; attn_output Q5_K; attn_q Q4_K;
the tied embedding (the output layer) Q6_K.

Memory stays bounded: one dense tensor, or one expert's slice of an *_exps tensor, is decoded
at a time. Output goes to a temporary folder beside OUT, every file is fsynced, then renamed
into place (shards NAME-0000k-of-0000n.gguf with --split-max-size); an interrupted conversion
leaves no OUT.

skeleton(out, cfg, type_name) writes the same header with no source: the tensor data is a hole
(zeros, a sparse file), for memory plans of models too big to hold (tools/make_gguf_skeleton.py).
"""

from __future__ import annotations

import glob
import math
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, LlamaFileType

from ..config import GrokConfig
from ..errors import CheckpointError, GrokError
from .gguf import grok_tensor_shapes
from .quantize import ENCODERS, quantize

# --type -> (ggml type of the matrices, general.file_type)
TYPES = {"f32": (QT.F32, LlamaFileType.ALL_F32), "f16": (QT.F16, LlamaFileType.MOSTLY_F16),
         "bf16": (QT.BF16, LlamaFileType.MOSTLY_BF16), "q8_0": (QT.Q8_0, LlamaFileType.MOSTLY_Q8_0),
         "q4_k": (QT.Q4_K, LlamaFileType.MOSTLY_Q4_K_S), "q5_k": (QT.Q5_K, LlamaFileType.MOSTLY_Q5_K_S),
         "q6_k": (QT.Q6_K, LlamaFileType.MOSTLY_Q6_K), "q4_k_m": (QT.Q4_K, LlamaFileType.MOSTLY_Q4_K_M)}
CHUNK_ELEMS = 4 << 20          # float32 values decoded at a time within a 2-D tensor


def grok_writer(path, cfg: GrokConfig, scales: bool = True, **kw) -> gguf.GGUFWriter:
    """A GGUFWriter with Grok-1's `grok.*` metadata (llama.cpp's keys), scales included."""
    w = gguf.GGUFWriter(str(path), "grok", **kw)
    w.add_context_length(cfg.sequence_len)
    w.add_embedding_length(cfg.emb_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.ffn_size)
    w.add_head_count(cfg.num_q_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_selected_experts)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.key_size)
    if scales:
        w.add_float32("grok.embedding_scale", cfg.embedding_multiplier_scale)
        w.add_float32("grok.logit_scale", cfg.output_multiplier_scale)
        w.add_float32("grok.attention.output_scale", cfg.attn_output_multiplier)
        w.add_float32("grok.attn_logit_softcapping", cfg.attn_logit_cap)
        w.add_float32("grok.router_logit_softcapping", 30.0)
    return w


def sentencepiece_vocab(path) -> dict:
    """tokenizer.ggml.* of a SentencePiece model, as llama.cpp's converter writes them
    (user-defined pieces as normal): {tokens, scores, types, bos, eos, unk, pad}."""
    import sentencepiece as spm

    from ..tokenizer import Tokenizer
    Tokenizer(path)                                     # its checks and one-line errors
    sp = spm.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8", "surrogateescape"))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i)
                     else 6 if sp.is_byte(i) else 1)
    return {"tokens": tokens, "scores": scores, "types": types, "bos": sp.bos_id(), "eos": sp.eos_id(),
            "unk": sp.unk_id(), "pad": sp.pad_id(), "model": "llama"}


def gguf_vocab(md: dict) -> dict | None:
    """The tokenizer.ggml.* of a GGUF source (None if it has none), in sentencepiece_vocab's form."""
    if "tokenizer.ggml.tokens" not in md:
        return None
    g = lambda k, d=-1: md.get(f"tokenizer.ggml.{k}", d)   # noqa: E731
    return {"tokens": [t.encode("utf-8", "surrogateescape") for t in md["tokenizer.ggml.tokens"]],
            "scores": list(g("scores", [0.0] * len(md["tokenizer.ggml.tokens"]))),
            "types": list(g("token_type", [1] * len(md["tokenizer.ggml.tokens"]))),
            "bos": g("bos_token_id"), "eos": g("eos_token_id"), "unk": g("unknown_token_id"),
            "pad": g("padding_token_id"), "model": g("model", "llama"),
            "space_prefix": md.get("tokenizer.ggml.add_space_prefix")}


def add_vocab(w: gguf.GGUFWriter, vocab: dict, vocab_size: int) -> None:
    """Write tokenizer.ggml.*; a vocabulary shorter than the model's is padded with unused
    [PAD{i}] pieces (llama.cpp's converter does the same)."""
    n = len(vocab["tokens"])
    if n > vocab_size:
        raise GrokError(f"the tokenizer has {n} pieces, more than the model's vocab_size {vocab_size}",
                        hint="pass --tokenizer PATH to this model's tokenizer.model")
    pad = vocab_size - n
    w.add_tokenizer_model(vocab["model"])
    w.add_token_list(list(vocab["tokens"]) + [f"[PAD{i}]".encode() for i in range(n, vocab_size)])
    w.add_token_scores([float(s) for s in vocab["scores"]] + [0.0] * pad)
    w.add_token_types([int(t) for t in vocab["types"]] + [5] * pad)
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        if vocab[key] is not None and vocab[key] >= 0:
            add(int(vocab[key]))
    if vocab.get("space_prefix") is not None:
        w.add_add_space_prefix(bool(vocab["space_prefix"]))
    # the reference feeds prompts without [BOS]: tell llama.cpp not to add one either
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def tensor_types(cfg: GrokConfig, type_name: str, layout_shapes: dict) -> dict:
    """GGUF tensor name -> the ggml type it is written in (before the fit-the-rows fallback)."""
    base, _ = TYPES[type_name]
    L = cfg.num_layers
    out = {}
    for name, shape in layout_shapes.items():
        if len(shape) == 1 or "ffn_gate_inp" in name:
            out[name] = QT.F32
            continue
        t = base
        if type_name == "q4_k_m":
            layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
            more_bits = layer < L // 8 or layer >= 7 * L // 8 or (layer - L // 8) % 3 == 2
            if name == "token_embd.weight" or name == "output.weight":
                t = QT.Q6_K
            elif ".attn_k." in name or ".attn_v." in name:
                t = QT.Q8_0
            elif ".attn_output." in name:
                t = QT.Q5_K
            elif ".ffn_down" in name and more_bits:
                t = QT.Q6_K
        out[name] = t
    return out


def check_type(type_name: str) -> None:
    if type_name not in TYPES:
        raise GrokError(f"--type {type_name!r} is not one of {', '.join(TYPES)}", hint="pick one of those")


def fit_type(qtype: QT, K: int) -> QT:
    """qtype, or the nearest type whose blocks divide a row of K values (F16's block is one value)."""
    for t in (qtype, QT.Q8_0, QT.F16):
        if K % GGML_QUANT_SIZES[t][0] == 0:
            return t
    return QT.F16


def encode(a: np.ndarray, qtype: QT, name: str) -> np.ndarray:
    """float32 rows [n, K] as ggml type qtype: uint8 [n, row_bytes]."""
    if qtype == QT.F32:
        if not np.isfinite(a).all():
            raise CheckpointError(f"tensor '{name}' holds NaN or infinite values", hint="the source checkpoint is damaged")
        return np.ascontiguousarray(a, dtype=np.float32).view(np.uint8)
    return quantize(a, int(qtype), name)


# -- sources: float32 rows of each GGUF tensor, a bounded chunk at a time -------------------------

class CkptSource:
    """A ckpt-0 checkpoint, read tensor by tensor (headers only at open)."""

    def __init__(self, path):
        from ..checkpoint import Checkpoint, file_index
        self.ck = Checkpoint(path, weights=False)
        self.config = self.ck.config
        self.root = self.ck.root
        self._index = file_index
        self.vocab = None
        self.names = list(grok_tensor_shapes(self.config))

    def _ref(self, layer: int, offset: int):
        return self.ck.refs[self._index(layer, offset, self.config.num_layers)]

    def chunks(self, name: str):
        """Float32 [n, K] pieces of the tensor in numpy (GGUF) order, outermost first."""
        ck = self.ck
        if name == "token_embd.weight":
            yield from _row_chunks(ck.float_array(ck.refs[0]))
            return
        if name == "output_norm.weight":
            yield ck.float_array(ck.refs[1])[None]
            return
        _, n, part, _ = name.split(".")
        n = int(n)
        offsets = {"attn_norm": 7, "attn_output_norm": 8, "ffn_norm": 9, "layer_output_norm": 10, "ffn_gate_inp": 11,
                   "attn_q": 5, "attn_k": 3, "attn_v": 6, "attn_output": 4,
                   "ffn_gate_exps": 0, "ffn_down_exps": 1, "ffn_up_exps": 2}
        ref = self._ref(n, offsets[part])
        if offsets[part] >= 7:
            a = ck.float_array(ref)
            yield a[None] if a.ndim == 1 else np.ascontiguousarray(a.T)       # router [D, E] -> [E, D]
            return
        w = ck.array(ref.weight)                      # int8: experts mapped, attention read
        s = ck.float_array(ref.scales)
        if w.ndim == 2:
            yield from _row_chunks(_dequant_t(w, s))
            return
        for e in range(w.shape[0]):                   # one expert at a time
            yield _dequant_t(w[e], s[e])

    def close(self):
        self.ck.close()


def _dequant_t(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """int8 [R, C] with scales [nb, C] (input-major) -> float32 [C, R] (GGUF's [out, in])."""
    R = w.shape[0]
    a = w.astype(np.float32).reshape(s.shape[0], R // s.shape[0], -1) * s[:, None, :]
    return np.ascontiguousarray(a.reshape(R, -1).T)


def _row_chunks(a: np.ndarray):
    step = max(1, CHUNK_ELEMS // max(1, a.shape[-1]))
    for r in range(0, a.shape[0], step):
        yield a[r:r + step]


class GGUFSource:
    """A GGUF model, re-encoded: each tensor's rows dequantized a chunk at a time."""

    def __init__(self, path):
        from .gguf_checkpoint import GGUFCheckpoint
        self.gc = GGUFCheckpoint(path)
        self.config = self.gc.config
        self.root = self.gc.root
        self.vocab = gguf_vocab(self.gc.gguf.metadata)
        self.names = list(grok_tensor_shapes(self.config))    # merged *_exps, whatever the source layout
        if "output.weight" in self.gc.gguf.tensors:
            self.names.insert(1, "output.weight")

    def chunks(self, name: str):
        from .gguf_checkpoint import GMatrix
        m = self.gc.gguf
        if name.endswith("_exps.weight") and name not in m.tensors:       # one tensor per expert
            stem = name.replace("_exps.weight", "")
            mats = [self.gc.matrix(f"{stem}.{e}.weight") for e in range(self.config.num_experts)]
        else:
            t = m.tensor(name)
            flat = (int(math.prod(t.shape[:-1])), t.shape[-1])
            g = GMatrix.of(t.type, m.data(name), t.shape if len(t.shape) == 3 else flat, name)
            mats = [g[e] for e in range(t.shape[0])] if len(t.shape) == 3 else [g]
        for g in mats:
            step = max(1, CHUNK_ELEMS // g.K)
            for r in range(0, g.N, step):
                yield g.rows(r, min(g.N, r + step))

    def close(self):
        self.gc.close()


class HoleSource:
    """No source weights: every tensor of cfg is left a hole (reads as zeros) in the written
    file, which is extended to its full size without writing data (a sparse file)."""

    holes = True

    def __init__(self, cfg: GrokConfig, vocab: dict | None):
        self.config, self.vocab, self.root = cfg, vocab, None
        self.names = list(grok_tensor_shapes(cfg))

    def close(self):
        pass


def sparse_ok(folder) -> bool:
    """Whether files in `folder` keep holes: a 64 MB file made by truncate uses under 1 MB."""
    import tempfile
    with tempfile.TemporaryFile(dir=folder) as f:
        f.truncate(64 << 20)
        blocks = getattr(os.fstat(f.fileno()), "st_blocks", None)
    return blocks is not None and blocks * 512 < 1 << 20


def open_source(path, tokenizer=None):
    from ..tokenizer import find_tokenizer
    src = GGUFSource(path) if os.path.isfile(path) else CkptSource(path)
    try:
        if tokenizer is not None or src.vocab is None:
            try:
                tok = find_tokenizer(src.root if tokenizer is None else None, tokenizer)
            except GrokError:
                if tokenizer is not None:
                    raise
                tok = None                               # written without a tokenizer: said by the CLI
            if tok is not None:
                src.vocab = sentencepiece_vocab(tok)
    except BaseException:
        src.close()
        raise
    return src


# -- the writer -----------------------------------------------------------------------------------

def convert(src_path, out, type_name: str, split_max_size: int = 0, tokenizer=None, progress=None,
            note=None) -> list[Path]:
    """Write src_path (ckpt-0 folder or GGUF) as a Grok GGUF at `out`; returns the files written.

    progress(done_bytes, total_bytes, tensor_name) is called after each piece; note(text) for
    remarks (type fallbacks, a missing tokenizer)."""
    check_type(type_name)
    out = Path(out)
    src = open_source(src_path, tokenizer)
    try:
        return _convert(src, out, type_name, split_max_size, progress or (lambda *a: None), note or (lambda s: None))
    finally:
        src.close()


def skeleton(out, cfg: GrokConfig, type_name: str, tokenizer=None, note=None) -> list[Path]:
    """Write a Grok GGUF of cfg's geometry whose header is what convert(..., type_name) writes
    and whose tensor data is a hole (zeros, no disk used): a file for memory plans, not runs."""
    check_type(type_name)
    src = HoleSource(cfg, None if tokenizer is None else sentencepiece_vocab(tokenizer))
    return _convert(src, Path(out), type_name, 0, lambda *a: None, note or (lambda s: None))


def _convert(src, out: Path, type_name: str, split_max_size: int, progress, note) -> list[Path]:
    cfg = src.config
    shapes = grok_tensor_shapes(cfg)
    if "output.weight" in src.names:
        shapes = {"token_embd.weight": shapes.pop("token_embd.weight"),
                  "output.weight": (cfg.vocab_size, cfg.emb_size), **shapes}
    types = tensor_types(cfg, type_name, shapes)
    fallback: dict = {}
    for name, shape in shapes.items():
        t = fit_type(types[name], shape[-1])
        if t != types[name]:
            fallback.setdefault((types[name].name, t.name, shape[-1]), []).append(name)
        types[name] = t
    holes = getattr(src, "holes", False)
    missing = sorted({t.name for t in types.values() if t != QT.F32 and int(t) not in ENCODERS and not holes})
    if missing:
        have = ", ".join(k for k, (t, _) in TYPES.items() if int(t) in ENCODERS or t == QT.F32)
        raise GrokError(f"--type {type_name} needs the {'/'.join(missing)} encoder, which grokcpu does not have yet",
                        hint=f"choose one of {have}")
    for (a, b, K), names in fallback.items():
        note(f"note: {len(names)} tensor(s) with rows of {K} values (not whole {a} blocks) written as {b}")
    if src.vocab is None:
        note("note: no tokenizer found beside the model: the GGUF has none (pass --tokenizer PATH to add it)")
    if out.is_dir():
        raise GrokError(f"--out {str(out)!r} is a folder", hint="give the path of the .gguf file to write")
    _sweep_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise GrokError(f"cannot write beside --out {str(out)!r}: {e.strerror or e}",
                        hint="give a path in a writable folder") from None
    try:
        written = _write(src, cfg, shapes, types, TYPES[type_name][1], tmp / out.name, split_max_size, progress)
        final = [out.parent / p.name for p in written]
        for p, q in zip(written, final):
            os.replace(p, q)
        _fsync_dir(out.parent)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sweep_stale(out: Path) -> None:
    """Remove the temporary folders of earlier conversions to `out` whose process is gone (a
    SIGKILL or a power cut skips their cleanup); a live process's folder stays."""
    for d in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        pid = d.name.rsplit("-", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except OSError:                   # alive, another user's
            pass


def _write(src, cfg, shapes, types, ftype, path: Path, split_max_size: int, progress) -> list[Path]:
    w = grok_writer(path, cfg, split_max_size=split_max_size)
    w.add_expert_feed_forward_length(cfg.ffn_size)
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if src.vocab is not None:
        add_vocab(w, src.vocab, cfg.vocab_size)
    sizes = {}
    for name, shape in shapes.items():
        qk, tsize = GGML_QUANT_SIZES[types[name]]
        row = shape[-1] // qk * tsize
        sizes[name] = math.prod(shape[:-1]) * row
        w.add_tensor_info(name, (*shape[:-1], row), np.dtype(np.uint8), sizes[name], raw_dtype=types[name])
    shard_of = {name: i for i, part in enumerate(w.tensors) for name in part}
    holes = getattr(src, "holes", False)
    if holes and not sparse_ok(path.parent):
        w.close()
        raise GrokError(f"the filesystem of {str(path.parent.parent)!r} does not keep sparse files: the skeleton "
                        f"would fill {sum(sizes.values()) / 1e9:.1f} GB of disk",
                        hint="write it on ext4, xfs, btrfs or tmpfs")
    paths = w.format_shard_names(path)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        total, done = sum(sizes.values()), 0
        for name in shapes:
            f = w.fout[shard_of[name]]
            w.write_padding(f, f.tell())
            n = 0
            if holes:                                # no bytes written: a hole, the file's size set below
                f.seek(sizes[name], os.SEEK_CUR)
                n = sizes[name]
                done += n
                progress(done, total, name)
            else:
                for rows in src.chunks(name):
                    b = encode(rows, types[name], name)
                    f.write(b)
                    n += b.nbytes
                    done += b.nbytes
                    progress(done, total, name)
            if n != sizes[name]:
                raise CheckpointError(f"tensor '{name}': wrote {n} bytes, its header says {sizes[name]}")
            w.write_padding(f, n)
        for f in w.fout:
            if holes:
                f.truncate(f.tell())                 # a file that ends in a hole: its full size
            f.flush()
            os.fsync(f.fileno())
    finally:
        w.close()
    return paths


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

