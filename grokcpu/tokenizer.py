"""The SentencePiece tokenizer, as the reference runner uses it (spec GROK1.md §5).

    tok = Tokenizer("tokenizer.model")
    ids = tok.encode("The answer is")        # no BOS, no EOS: what run.py feeds the model
    text = tok.decode(ids)
    detok = tok.detokenizer()                # streaming: feed ids one by one, get text pieces
    piece = detok.add(token_id)              # "" while a multi-byte character is incomplete

`encode_continuation(text)` tokenizes text that *continues* earlier text (a later chat turn):
the same model without SentencePiece's dummy-prefix space, so encoding segments one by one
and concatenating the ids does not insert a space at each boundary.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

from .errors import TokenizerError

REPLACEMENT = "\ufffd"   # what SentencePiece's decode writes for incomplete/invalid UTF-8


class Tokenizer:
    """A SentencePiece model: encode/decode with the reference's defaults."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            proto = self.path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"cannot read tokenizer {str(path)!r}: {e.strerror or e}",
                                 hint="pass --tokenizer PATH to a SentencePiece tokenizer.model") from None
        self._load(proto)

    @classmethod
    def from_proto(cls, proto: bytes, name: str) -> "Tokenizer":
        """From a serialized SentencePiece ModelProto (e.g. rebuilt from a GGUF); `name` labels it."""
        tok = cls.__new__(cls)
        tok.path = Path(name)
        tok._load(proto)
        return tok

    def _load(self, proto: bytes) -> None:
        import sentencepiece as spm

        path = str(self.path)
        if not proto.strip():
            raise TokenizerError(f"tokenizer {path!r} is empty",
                                 hint="pass --tokenizer PATH to a SentencePiece tokenizer.model") from None
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
            self._sp_cont = spm.SentencePieceProcessor(model_proto=_without_dummy_prefix(proto))
        except (RuntimeError, ValueError, IndexError, OSError):
            raise TokenizerError(f"{path!r} is not a SentencePiece model",
                                 hint="pass --tokenizer PATH to a SentencePiece tokenizer.model") from None
        self.vocab_size: int = self.sp.vocab_size()
        if self.vocab_size < 1:            # SentencePiece loads some junk as an empty model
            raise TokenizerError(f"{path!r} is not a SentencePiece model (no pieces)",
                                 hint="pass --tokenizer PATH to a SentencePiece tokenizer.model")
        self.eos_id: int = self.sp.eos_id()
        self.bos_id: int = self.sp.bos_id()
        self.pad_id: int = self.sp.pad_id()

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of `text`, SentencePiece defaults (dummy prefix, no BOS/EOS), as run.py.
        bos=True puts [BOS] first (the reference runner does not)."""
        return list(self.sp.encode(check_text(text), add_bos=bos))

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of `text` that follows earlier text: no dummy-prefix space is added."""
        return list(self._sp_cont.encode(check_text(text)))

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def same_pieces(self, other: "Tokenizer") -> bool:
        """Whether both tokenizers give every id the same piece (e.g. a tokenizer.model and the
        one a GGUF file carries), so the same ids mean the same text to both models."""
        ids = list(range(self.vocab_size))
        return self.vocab_size == other.vocab_size and self.sp.id_to_piece(ids) == other.sp.id_to_piece(ids)

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)

    def check_fits(self, vocab_size: int) -> None:
        """Raise TokenizerError if this tokenizer can produce ids the model has no row for."""
        if self.vocab_size > vocab_size:
            raise TokenizerError(
                f"tokenizer does not fit the model: {self.path.name} has {self.vocab_size} tokens, "
                f"the model's vocabulary has {vocab_size}",
                hint="pass --tokenizer with the tokenizer.model that belongs to this checkpoint")


class StreamingDetokenizer:
    """Turns ids into text pieces as they arrive; the pieces concatenate to `decode(all ids)`.

    Text is emitted only once it is final: a trailing U+FFFD (an incomplete byte-fallback
    character) is held back until the character completes, and `flush()` returns whatever is
    held at the end (so a truly invalid byte still comes out exactly as decode() writes it).
    SentencePiece's "drop the space of the first piece" rule is handled by always decoding the
    real sequence: the tail since the last commit point is decoded behind an anchor token (a
    plain text piece), so each step costs O(tail), not O(sequence).
    """

    COMMIT_EVERY = 16

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        sp = tok.sp
        self._plain = lambda i: not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))
        self._anchor: int | None = None     # plain piece just before the tail (None: tail is everything)
        self._anchor_len = 0                # len(decode([anchor]))
        self._tail: list[int] = []
        self._tail_sent = 0                 # characters of the tail's text already emitted
        self.text = ""                      # everything emitted so far

    def _tail_text(self) -> str:
        if self._anchor is None:
            return self.tok.sp.decode(self._tail)
        return self.tok.sp.decode([self._anchor] + self._tail)[self._anchor_len:]

    def add(self, token_id: int) -> str:
        """Feed one id; return the newly final text (possibly "")."""
        tid = int(token_id)
        self._tail.append(tid)
        full = self._tail_text()
        stable = full.rstrip(REPLACEMENT)
        new = stable[self._tail_sent:] if len(stable) > self._tail_sent else ""
        self._tail_sent += len(new)
        self.text += new
        if (len(self._tail) >= self.COMMIT_EVERY and stable == full and self._tail_sent == len(full)
                and self._plain(tid)):
            self._anchor = tid
            self._anchor_len = len(self.tok.sp.decode([tid]))
            self._tail = []
            self._tail_sent = 0
        return new

    def flush(self) -> str:
        """The text still held back (an unfinished byte sequence), as decode() would write it."""
        full = self._tail_text()
        new = full[self._tail_sent:]
        self._tail_sent = len(full)
        self.text += new
        return new


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str) -> str:
    """`text` if it is valid Unicode; a lone surrogate (which SentencePiece cannot take) is a
    TokenizerError naming where it is."""
    if not isinstance(text, str):
        raise TokenizerError(f"expected text, not {type(text).__name__}")
    m = _SURROGATE.search(text)
    if m:
        raise TokenizerError(f"the text is not valid Unicode: a lone surrogate U+{ord(m.group()):04X} at "
                             f"character {m.start()}", hint="send UTF-8 text")
    return text


def replace_invalid(text: str) -> str:
    """`text` with undecodable bytes (surrogate escapes, as in argv) and lone surrogates as U+FFFD."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        pass
    return _SURROGATE.sub(REPLACEMENT, text)


def find_tokenizer(model_dir: str | os.PathLike | None, explicit: str | os.PathLike | None = None) -> Path:
    """Which tokenizer.model to use: --tokenizer wins, else one beside the checkpoint.

    Looks in the checkpoint folder and its parent (so both `grok-1/` and `grok-1/ckpt-0/`
    work). Raises TokenizerError if none is found.
    """
    if explicit is not None:
        p = Path(explicit)
        if not p.is_file():
            raise TokenizerError(f"no tokenizer file at {str(p)!r}",
                                 hint="pass --tokenizer PATH to the tokenizer.model of this checkpoint")
        return p
    if model_dir is not None:
        d = Path(model_dir)
        for cand in (d / "tokenizer.model", d.parent / "tokenizer.model"):
            if cand.is_file():
                return cand
    raise TokenizerError(f"no tokenizer.model beside the checkpoint {str(model_dir)!r}",
                         hint="pass --tokenizer PATH (Grok-1's is tokenizer.model in the xai-org/grok-1 repository)")


def model_tokenizer(model_path, explicit=None) -> Tokenizer:
    """A model's tokenizer: --tokenizer wins; else a GGUF model's own (tokenizer.ggml.*); else
    tokenizer.model beside the checkpoint (find_tokenizer)."""
    if explicit is None and model_path is not None and os.path.isfile(model_path):
        from .formats.gguf import detect_format, open_gguf, tokenizer_proto
        if detect_format(model_path) == "gguf":
            with open_gguf(model_path) as m:
                if "tokenizer.ggml.tokens" in m.metadata:
                    return Tokenizer.from_proto(tokenizer_proto(m), str(model_path))
    return Tokenizer(find_tokenizer(model_path, explicit))


def load_tokenizer(model_dir, explicit=None, vocab_size: int | None = None) -> Tokenizer:
    """find_tokenizer + Tokenizer + (if vocab_size is given) the fits-the-model check."""
    tok = Tokenizer(find_tokenizer(model_dir, explicit))
    if vocab_size is not None:
        tok.check_fits(vocab_size)
    return tok


# -- the model file without the dummy prefix ---------------------------------------------------
# A SentencePiece model is a protobuf ModelProto; field 3 is its NormalizerSpec, whose field 3 is
# `add_dummy_prefix` (bool, default true). We rewrite just that field at the wire level, so no
# protobuf package is needed.

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _fields(buf: bytes):
    """(field number, wire type, raw bytes including the key) for each field of a message."""
    i = 0
    while i < len(buf):
        start = i
        key, i = _varint(buf, i)
        wt = key & 7
        if wt == 0:
            _, i = _varint(buf, i)
        elif wt == 1:
            i += 8
        elif wt == 5:
            i += 4
        elif wt == 2:
            n, i = _varint(buf, i)
            i += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        if i > len(buf):
            raise ValueError("truncated protobuf message")
        yield key >> 3, wt, buf[start:i]


def _without_dummy_prefix(proto: bytes) -> bytes:
    out = bytearray()
    for num, wt, raw in _fields(proto):
        if num == 3 and wt == 2:                      # normalizer_spec
            _, j = _varint(raw, 0)
            n, j = _varint(raw, j)
            spec = b"".join(r for f, _, r in _fields(raw[j:j + n]) if f != 3) + b"\x18\x00"
            out += b"\x1a" + _enc_varint(len(spec)) + spec
        else:
            out += raw
    return bytes(out)


def _len_field(num: int, payload: bytes) -> bytes:
    return _enc_varint(num << 3 | 2) + _enc_varint(len(payload)) + payload


def _int_field(num: int, value: int) -> bytes:
    return _enc_varint(num << 3) + _enc_varint(value & ((1 << 64) - 1))   # negative: 10-byte two's complement


def sentencepiece_proto(pieces: list[bytes], scores, types, *, unk: int, bos: int, eos: int, pad: int,
                        add_dummy_prefix: bool = True) -> bytes:
    """A serialized BPE ModelProto from its pieces, scores and types (SentencePiece's numbers:
    1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), special ids (-1: none).

    Normalizer: identity, whitespace escaped to U+2581, runs of spaces kept; whitespace-only
    pieces allowed; byte fallback when there are byte pieces; an unknown token decodes to its
    own piece.
    """
    out = bytearray()
    for p, s, t in zip(pieces, scores, types):                     # b"\x15": field 2 (score), fixed32
        out += _len_field(1, _len_field(1, p) + b"\x15" + struct.pack("<f", float(s)) + _int_field(3, int(t)))
    trainer = (_int_field(3, 2) + _int_field(26, 1) + _int_field(35, int(any(int(t) == 6 for t in types)))
               + _int_field(40, unk) + _int_field(41, bos) + _int_field(42, eos) + _int_field(43, pad))
    for num, i in ((45, unk), (46, bos), (47, eos), (48, pad)):    # unk/bos/eos/pad piece names
        if i >= 0:
            trainer += _len_field(num, pieces[i])
    if unk >= 0:
        trainer += _len_field(44, pieces[unk])                      # unk_surface
    out += _len_field(2, trainer)
    out += _len_field(3, _len_field(1, b"identity") + _int_field(3, int(add_dummy_prefix)) + _int_field(4, 0))
    return bytes(out)
