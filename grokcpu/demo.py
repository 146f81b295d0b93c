"""The built-in demo model: Grok-1's architecture, tiny, with random weights.

It lets every command run in seconds without the 300 GB checkpoint. It prints gibberish: the
weights are random numbers (a fixed seed, so the same gibberish everywhere). Built once, at
first use, into the user's cache folder:

    $GROKCPU_CACHE/demo-v1/                 (default $XDG_CACHE_HOME/grokcpu, ~/.cache/grokcpu)
        ckpt-0/tensor00000_000 ...          released-format checkpoint (grokcpu.synth)
        config.json
        tokenizer.model                     SentencePiece BPE, byte fallback, 1024 pieces,
                                            trained on grokcpu/data/demo_corpus.txt

Both are deterministic (fixed seed; single-threaded tokenizer training from an in-memory
corpus). The build happens in a temporary folder beside the target and is moved into place
with one os.replace, so an interrupted build never leaves a half-written demo behind.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

from .errors import GrokError

DEMO_NAME = "demo-v1"
DEMO_SEED = 20240317
DEMO_VOCAB = 1024
DEMO_CONFIG = dict(
    vocab_size=DEMO_VOCAB, sequence_len=2048, pad_token=0, eos_token=2,
    emb_size=256, key_size=32, num_q_heads=8, num_kv_heads=4, num_layers=4,
    num_experts=8, num_selected_experts=2, widening_factor=2.0,
)
REAL_MODEL_HINT = "--model /path/to/grok-1 --tokenizer /path/to/tokenizer.model"
BANNER = (f"note: no --model given, using the built-in demo model ({DEMO_NAME}): Grok-1's architecture, "
          f"tiny, with RANDOM weights, so it prints gibberish. For the real model pass {REAL_MODEL_HINT}")


def cache_root() -> Path:
    """$GROKCPU_CACHE, else $XDG_CACHE_HOME/grokcpu, else ~/.cache/grokcpu."""
    env = os.environ.get("GROKCPU_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "grokcpu"


def demo_dir() -> Path:
    return cache_root() / DEMO_NAME


def is_built(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "tokenizer.model").is_file() and (path / "ckpt-0").is_dir()


def corpus_text() -> str:
    """grokcpu/data/demo_corpus.txt: the demo tokenizer's training text, perplexity's default text."""
    from importlib import resources
    return resources.files("grokcpu").joinpath("data/demo_corpus.txt").read_text(encoding="utf-8")


def corpus_lines() -> list[str]:
    return [line for line in corpus_text().splitlines() if line.strip()]


def train_tokenizer(vocab_size: int = DEMO_VOCAB) -> bytes:
    """A SentencePiece BPE model (bytes) shaped like Grok-1's: byte fallback, split digits,
    identity normalizer, [PAD]=0 [BOS]=1 [EOS]=2 [UNK]=3. Deterministic."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_writer=out, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        pad_piece="[PAD]", bos_piece="[BOS]", eos_piece="[EOS]", unk_piece="[UNK]",
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, num_threads=1, input_sentence_size=0,
        shuffle_input_sentence=False, max_sentence_length=1 << 16, minloglevel=2)
    return out.getvalue()


def _make_checkpoint(out_dir: Path, cfg: dict, seed: int) -> None:
    from .synth import make_checkpoint
    make_checkpoint(out_dir, cfg, seed=seed)


def ensure_demo() -> tuple[Path, bool]:
    """The demo folder, building it if needed. Returns (path, built_now)."""
    target = demo_dir()
    if is_built(target):
        return target, False
    root = target.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=root))
    except OSError as e:
        raise GrokError(f"cannot create the demo model in {str(root)!r}: {e.strerror or e}",
                        hint="set GROKCPU_CACHE to a writable folder, or pass --model") from None
    try:
        (tmp / "tokenizer.model").write_bytes(train_tokenizer())
        _make_checkpoint(tmp, dict(DEMO_CONFIG), DEMO_SEED)
        os.chmod(tmp, 0o755)                             # mkdtemp makes it private
        if target.exists() and not is_built(target):     # a broken leftover (not ours to trust)
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_built(target):                     # someone else finished first: fine
                raise
    except OSError as e:
        raise GrokError(f"cannot build the demo model in {str(root)!r}: {e.strerror or e}",
                        hint="set GROKCPU_CACHE to a writable folder, or pass --model") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target, True
