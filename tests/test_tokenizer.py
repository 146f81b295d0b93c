"""The tokenizer wrapper against the reference's test vectors, and the streaming detokenizer."""

import json
import random

import pytest

from conftest import FIXTURES, SHARED, TOKENIZER, need_shared
from grokcpu import demo
from grokcpu.errors import TokenizerError
from grokcpu.tokenizer import Tokenizer, find_tokenizer, load_tokenizer

CASES = SHARED / "data" / "tokenizer_cases.jsonl"


@pytest.fixture(scope="module")
def grok_tok():
    need_shared()
    return Tokenizer(TOKENIZER)


def cases():
    if not CASES.is_file():
        return []
    return [json.loads(line) for line in CASES.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_there_are_cases():
    need_shared()
    assert len(cases()) == 41


@pytest.mark.parametrize("case", cases(), ids=lambda c: c["name"])
def test_reference_case(grok_tok, case):
    tok = grok_tok
    ids = tok.encode(case["text"])
    assert ids == case["ids"]
    assert [tok.id_to_piece(i) for i in ids] == case["pieces"]
    assert tok.decode(ids) == case["decoded"]
    assert tok.encode(case["text"], bos=True) == case["ids_with_bos"]
    # streaming: the pieces concatenate to decode(all), and no piece carries a broken character
    d = tok.detokenizer()
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == case["decoded"]
    if "\ufffd" not in case["decoded"]:
        assert not any("\ufffd" in p for p in pieces)


def test_grok_tokenizer_specials(grok_tok):
    assert (grok_tok.vocab_size, grok_tok.pad_id, grok_tok.bos_id, grok_tok.eos_id) == (131072, 0, 1, 2)


def test_stream_holds_incomplete_utf8(grok_tok):
    tok = grok_tok
    ids = tok.encode("a😀b")
    assert [tok.id_to_piece(i) for i in ids] == ["▁a", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "b"]
    d = tok.detokenizer()
    assert [d.add(i) for i in ids] == ["a", "", "", "", "😀", "b"]   # nothing until the character is whole
    assert d.flush() == ""


def test_stream_flushes_a_lone_byte_like_decode(grok_tok):
    tok = grok_tok
    ids = tok.encode("x") + [69 + 0xE4]          # an unfinished 3-byte character at the end
    d = tok.detokenizer()
    text = "".join(d.add(i) for i in ids)
    assert text == "x"
    assert text + d.flush() == tok.decode(ids) == "x\ufffd"


def test_stream_equals_decode_on_random_ids(grok_tok):
    """Property: for any id sequence (bytes, controls, whitespace pieces, plain pieces) and any
    commit interval, the streamed pieces concatenate to decode(ids)."""
    tok = grok_tok
    sp = tok.sp
    ws = [i for i in range(4, 400) if set(sp.id_to_piece(i)) <= set("▁\n\t ")]
    special = [0, 1, 2, 3] + list(range(69, 325)) + ws + tok.encode(" hi 你好")
    rng = random.Random(1234)
    for _ in range(400):
        ids = [rng.choice(special) if rng.random() < 0.6 else rng.randrange(4, 131072)
               for _ in range(rng.randrange(1, 50))]
        d = tok.detokenizer()
        d.COMMIT_EVERY = rng.choice([1, 2, 5, 16])
        assert "".join(d.add(i) for i in ids) + d.flush() == tok.decode(ids), ids


def test_encode_continuation_has_no_dummy_prefix(grok_tok):
    tok = grok_tok
    assert tok.encode("hello") == tok.encode_continuation(" hello")
    assert tok.id_to_piece(tok.encode_continuation("hello")[0]) == "hello"
    # a conversation encoded segment by segment = encoded whole (here: no merge crosses the cut)
    whole = tok.encode("Hi.\nUser: q2\nAssistant:")
    assert tok.encode("Hi.") + tok.encode_continuation("\nUser: q2\nAssistant:") == whole
    assert tok.encode_continuation("\nUser:") != tok.encode("\nUser:")     # encode() adds "▁" first


# -- finding the tokenizer --------------------------------------------------------------------------

def test_find_tokenizer_order(tmp_path):
    ck = tmp_path / "grok-1"
    (ck / "ckpt-0").mkdir(parents=True)
    with pytest.raises(TokenizerError) as e:
        find_tokenizer(ck)
    assert "--tokenizer" in str(e.value)
    (tmp_path / "tokenizer.model").write_bytes(b"parent")
    assert find_tokenizer(ck) == tmp_path / "tokenizer.model"                  # the folder's parent
    (ck / "tokenizer.model").write_bytes(b"beside")
    assert find_tokenizer(ck) == ck / "tokenizer.model"                        # in the folder wins
    assert find_tokenizer(ck / "ckpt-0") == ck / "tokenizer.model"             # given ckpt-0/ itself
    explicit = tmp_path / "other.model"
    explicit.write_bytes(b"x")
    assert find_tokenizer(ck, explicit) == explicit                            # --tokenizer wins
    with pytest.raises(TokenizerError, match="no tokenizer file"):
        find_tokenizer(ck, tmp_path / "missing.model")


def test_not_a_sentencepiece_file(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer(bad)


def test_tokenizer_must_fit_the_model():
    need_shared()
    with pytest.raises(TokenizerError, match="tokenizer does not fit the model") as e:
        load_tokenizer(FIXTURES / "p1_e8_l2_basic", TOKENIZER, vocab_size=512)
    assert "131072" in str(e.value) and "512" in str(e.value)
    assert load_tokenizer(None, TOKENIZER, vocab_size=131072).vocab_size == 131072


# -- the demo tokenizer -----------------------------------------------------------------------------

def test_demo_tokenizer_is_deterministic_and_grok_shaped(tmp_path):
    a = demo.train_tokenizer()
    assert a == demo.train_tokenizer()
    p = tmp_path / "t.model"
    p.write_bytes(a)
    tok = Tokenizer(p)
    assert tok.vocab_size == demo.DEMO_VOCAB
    assert [tok.id_to_piece(i) for i in range(4)] == ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    assert tok.decode(tok.encode("Grok runs on 2 cores 😀")) == "Grok runs on 2 cores 😀"   # byte fallback
    assert [tok.id_to_piece(i) for i in tok.encode("2024")] == ["▁", "2", "0", "2", "4"]     # split digits


def test_empty_or_junk_tokenizer_file_is_a_tokenizer_error(tmp_path):
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(TokenizerError, match="is empty"):
        Tokenizer(empty)
    blank = tmp_path / "blank.model"
    blank.write_bytes(b"\n\n")
    with pytest.raises(TokenizerError):
        Tokenizer(blank)


def test_lone_surrogates_are_refused_and_replaceable(demo_path):
    from grokcpu.tokenizer import replace_invalid
    tok = Tokenizer(demo_path / "tokenizer.model")
    for bad in ("x\ud800y", "\udcff"):
        with pytest.raises(TokenizerError, match="lone surrogate"):
            tok.encode(bad)
        with pytest.raises(TokenizerError, match="lone surrogate"):
            tok.encode_continuation(bad)
    assert replace_invalid("caf\udce9") == "caf\ufffd"           # argv's surrogate escape of byte 0xe9
    assert replace_invalid("a\ud800b") == "a\ufffdb"
    assert tok.encode(replace_invalid("a\ud800b"))
