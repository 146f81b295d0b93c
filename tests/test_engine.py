"""The generation loop on the demo model: exact greedy tokens, stop rules, the context window,
chat history, and batches."""

import numpy as np
import pytest

import grokcpu
from conftest import greedy_direct
from grokcpu import demo
from grokcpu.engine import (Conversation, Notice, Request, Result, Step, StopFilter, generate,
                            generate_batch)
from grokcpu.errors import ContextFullError, GrokError
from grokcpu.sampling import make_sampler
from grokcpu.tokenizer import Tokenizer


class Script:
    """A 'sampler' that returns prescribed ids (to drive the engine's rules exactly)."""

    def __init__(self, ids, then=None):
        self.ids, self.then, self.calls = list(ids), then, 0

    def __call__(self, logits, history):
        self.calls += 1
        if self.calls <= len(self.ids):
            return self.ids[self.calls - 1]
        return self.then if self.then is not None else int(np.argmax(logits))


def run(gen):
    steps, res, notices = [], None, []
    for ev in gen:
        if isinstance(ev, Result):
            res = ev
        elif isinstance(ev, Notice):
            notices.append(ev)
        else:
            steps.append(ev)
    return steps, res, notices


def test_demo_is_built_once_and_complete(demo_path):
    assert demo.is_built(demo_path)
    assert demo.ensure_demo() == (demo_path, False)
    assert not [p for p in demo_path.parent.iterdir() if p.name.startswith(".demo")]   # no temp leftovers
    m = grokcpu.load(demo_path, threads=1)
    assert m.config.vocab_size == Tokenizer(demo_path / "tokenizer.model").vocab_size == demo.DEMO_VOCAB
    assert (m.config.emb_size, m.config.num_layers, m.config.num_q_heads, m.config.num_kv_heads) == (256, 4, 8, 4)


def test_greedy_generation_matches_session(model, tok):
    ids = tok.encode("The answer to life the universe and everything is")
    want = greedy_direct(model, ids, 12)
    steps, res, _ = run(generate(model, tok, ids, make_sampler(temperature=0), 12, stop_on_eos=False))
    assert res.tokens == want
    assert [s.token for s in steps if s.token is not None] == want
    assert [s.index for s in steps if s.token is not None] == list(range(12))
    assert "".join(s.text for s in steps) == res.text == tok.decode(want)
    assert res.finish_reason == "length" and res.kept_tokens == 12
    assert res.prompt_tokens == len(ids) and res.generated_tokens == 12 and res.decode_steps == 11
    assert res.prefill_s > 0 and res.decode_s > 0 and res.ttft_s >= res.prefill_s
    assert res.prefill_tps > 0 and res.decode_tps > 0


def test_stop_filter_holds_only_possible_stop_prefixes():
    f = StopFilter(["\nUser:", "###"])
    assert f.push("Hello\nU") == ("Hello", False)
    assert f.push("s") == ("", False)
    assert f.push("x #") == ("\nUsx ", False)       # not a stop after all: released
    assert f.push("#") == ("", False)
    assert f.push("!") == ("##!", False)
    assert f.push("ok##") == ("ok", False)
    assert f.push("#tail") == ("", True)             # "###" completed across pushes
    g = StopFilter(["bc", "abcd"])
    assert g.push("xabcd") == ("x", True)            # the earliest occurrence wins


def test_stop_string_never_leaks(model, tok):
    script = tok.encode("Hi there.") + tok.encode_continuation("\nUser: more text")
    steps, res, _ = run(generate(model, tok, tok.encode("Hello"), Script(script), 50, stop=["\nUser:"]))
    assert res.finish_reason == "stop"
    assert res.text == "Hi there." == "".join(s.text for s in steps)
    assert not any("\n" in s.text or "User" in s.text for s in steps)
    assert res.tokens == script[:len(res.tokens)]                      # it stopped as soon as ':' arrived
    assert tok.decode(res.tokens) == "Hi there.\nUser:"
    assert tok.decode(res.tokens[:res.kept_tokens]) == "Hi there."


def test_eos_stops_by_default_and_not_with_ignore_eos(model, tok):
    a, b = tok.encode(" one two")[:2]
    steps, res, _ = run(generate(model, tok, tok.encode("x"), Script([a, b, 2, a]), 10))
    assert (res.finish_reason, res.tokens, res.kept_tokens) == ("eos", [a, b, 2], 2)
    assert res.text == tok.decode([a, b])
    steps, res, _ = run(generate(model, tok, tok.encode("x"), Script([a, b, 2, a]), 4, stop_on_eos=False))
    assert (res.finish_reason, res.tokens) == ("length", [a, b, 2, a])


def test_generation_stops_when_the_context_is_full(demo_path, tok):
    m16 = grokcpu.load(demo_path, context=16, threads=1)
    ids = tok.encode("one two three four five six seven")[:10]
    assert len(ids) == 10
    s = m16.new_session()
    _, res, _ = run(generate(m16, tok, ids, make_sampler(temperature=0), 100, session=s, stop_on_eos=False))
    assert res.finish_reason == "length" and res.generated_tokens == 7 and s.pos == 16
    assert res.context_full and res.summary()["context_full"] is True
    assert res.tokens == greedy_direct(m16, ids, 7)
    _, res, _ = run(generate(m16, tok, ids, make_sampler(temperature=0), 3, stop_on_eos=False))
    assert not res.context_full and "context_full" not in res.summary()       # max_tokens, not the context
    with pytest.raises(ContextFullError, match="the prompt has 17 tokens but the context holds 16"):
        run(generate(m16, tok, list(range(5, 22)), make_sampler(temperature=0), 5))
    with pytest.raises(GrokError, match="the prompt is empty"):
        run(generate(m16, tok, [], make_sampler(temperature=0), 5))


# -- chat ---------------------------------------------------------------------------------------

def check_cache(conv):
    """The session's KV cache holds a prefix of the conversation's tokens."""
    h = conv.history_ids()
    n = min(len(h), conv.session.pos)
    assert conv.session.tokens[:n] == h[:n]
    assert conv.session.pos >= len(h) - 1


def test_conversation_format_and_cache(model, tok):
    conv = Conversation(model, tok, system="A chat.")
    ans1 = tok.encode_continuation(" Hello.") + tok.encode_continuation("\nUser: ignored")
    steps, res, _ = run(conv.reply("first", Script(ans1), 40))
    assert res.finish_reason == "stop" and res.text == "Hello."
    assert tok.decode(conv.history_ids()) == "A chat.\n\nUser: first\nAssistant: Hello."
    check_cache(conv)
    ans2 = tok.encode_continuation(" Bye")
    steps, res, _ = run(conv.reply("second", Script(ans2, then=2), 40))
    assert res.finish_reason == "eos" and res.text == "Bye"
    assert tok.decode(conv.history_ids()) == "A chat.\n\nUser: first\nAssistant: Hello.\nUser: second\nAssistant: Bye"
    check_cache(conv)
    assert [t.answer for t in conv.turns] == ["Hello.", "Bye"]
    conv.reset()
    assert conv.turns == [] and conv.session.pos == 0


def test_conversation_greedy_answer_is_the_session_continuation(model, tok):
    conv = Conversation(model, tok)
    _, res, _ = run(conv.reply("Hi", make_sampler(temperature=0), 6, stop_on_eos=False))
    ids = tok.encode(conv.system + "\n") + tok.encode_continuation("\nUser: Hi\nAssistant:")
    want = greedy_direct(model, ids, 6)
    assert res.tokens[:len(res.tokens)] == want[:len(res.tokens)]
    if res.finish_reason == "length":
        assert res.tokens == want


def test_conversation_drops_oldest_turns(demo_path, tok):
    m = grokcpu.load(demo_path, context=48, threads=1)
    conv = Conversation(m, tok, system="Chat.")
    notices, asked = [], []
    for i in range(6):
        msg = f"message {i}"
        asked.append(msg)
        _, res, ns = run(conv.reply(msg, make_sampler(temperature=0), 6, stop_on_eos=False))
        notices += ns
        check_cache(conv)
        assert len(conv.history_ids()) <= 48
    assert notices and "dropped the oldest" in notices[0].message
    assert conv.turns[-1].user == asked[-1]
    assert conv.turns[0].user != asked[0] and len(conv.turns) < 6
    assert [t.user for t in conv.turns] == asked[-len(conv.turns):]
    with pytest.raises(ContextFullError, match="does not fit the context of 48"):
        run(conv.reply("word " * 60, make_sampler(temperature=0), 8))


def test_interrupted_turn_is_kept(model, tok):
    conv = Conversation(model, tok)

    class Boom:
        calls = 0

        def __call__(self, logits, history):
            self.calls += 1
            if self.calls == 4:
                raise KeyboardInterrupt
            return int(np.argmax(logits))

    seen = []
    with pytest.raises(KeyboardInterrupt):
        for ev in conv.reply("Hello", Boom(), 50, stop_on_eos=False):
            if isinstance(ev, Step) and ev.token is not None:
                seen.append(ev.token)
    assert len(conv.turns) == 1 and conv.turns[0].answer_ids == seen and len(seen) == 3
    _, res, _ = run(conv.reply("Again", make_sampler(temperature=0), 4, stop_on_eos=False))
    assert len(conv.turns) == 2 and res.generated_tokens == 4
    check_cache(conv)


def test_save_and_load(model, tok, tmp_path):
    conv = Conversation(model, tok, system="S.", template="Q: {user}\nA:")
    run(conv.reply("one", Script(tok.encode_continuation(" yes"), then=2), 10))
    p = tmp_path / "c.json"
    conv.save(p)
    other = Conversation(model, tok)
    other.load(p)
    assert (other.system, other.template, [(t.user, t.answer) for t in other.turns]) == ("S.", "Q: {user}\nA:", [("one", "yes")])
    assert tok.decode(other.history_ids()) == "S.\n\nQ: one\nA: yes"
    assert other.stop_strings == ["\nQ:"]
    _, res, _ = run(other.reply("two", make_sampler(temperature=0), 3, stop_on_eos=False))
    check_cache(other)
    (tmp_path / "bad.json").write_text('{"turns": 3}')
    with pytest.raises(GrokError, match="not a saved conversation"):
        other.load(tmp_path / "bad.json")
    with pytest.raises(GrokError, match="must contain"):
        Conversation(model, tok, template="no placeholder")


# -- batch --------------------------------------------------------------------------------------

def test_batch_equals_one_by_one(model, tok):
    prompts = {"a": "The model reads", "b": "Tokens are", "c": "A mixture of experts", "d": "Hello"}
    lengths = {"a": 5, "b": 9, "c": 3, "d": 7}
    reqs = [Request(k, tok.encode(v), make_sampler(temperature=0), lengths[k], stop_on_eos=False) for k, v in prompts.items()]
    reqs.append(Request("long", list(range(5, 5 + model.context + 1)), make_sampler(temperature=0), 4))
    got = {}
    for req, outcome in generate_batch(model, tok, reqs, batch_size=2):
        got[req.id] = outcome
    assert set(got) == set(prompts) | {"long"}
    assert isinstance(got["long"], ContextFullError)
    for k, v in prompts.items():
        res = got[k]
        assert res.tokens == greedy_direct(model, tok.encode(v), lengths[k]), k
        assert res.text == tok.decode(res.tokens) and res.finish_reason == "length"
        assert res.prompt_tokens == len(tok.encode(v)) and res.decode_steps == lengths[k] - 1


def test_batch_feed_that_is_not_ready_yet(model, tok):
    """A feed may yield None ("none ready yet"): the running sequences go on without waiting, a
    request given later joins them, and the results equal one-by-one greedy decoding."""
    prompts = {"a": "The model reads", "b": "Tokens are", "c": "Hello"}
    req = {k: Request(k, tok.encode(v), make_sampler(temperature=0), 6, stop_on_eos=False) for k, v in prompts.items()}
    finished, asked = [], []

    def feed():
        yield req["a"]
        while not finished:                   # "b" arrives only after "a" is done
            asked.append(len(finished))
            yield None
        yield req["b"]
        yield None
        yield req["c"]

    got = {}
    for r, outcome in generate_batch(model, tok, feed(), batch_size=2):
        finished.append(r.id)
        got[r.id] = outcome
    assert finished[0] == "a" and set(finished) == set(prompts)
    assert len(asked) >= 5                    # asked at every step of "a", which never waited
    for k, v in prompts.items():
        assert got[k].tokens == greedy_direct(model, tok.encode(v), 6), k


def test_batch_stops_per_request(model, tok):
    a = tok.encode("stop here")
    reqs = [Request(1, tok.encode("x"), Script(a + tok.encode_continuation("###")), 20, stop=["###"]),
            Request(2, tok.encode("y"), Script([7, 2, 7]), 20),
            Request(3, tok.encode("z"), Script([7, 2, 7]), 3, stop_on_eos=False)]
    got = {r.id: o for r, o in generate_batch(model, tok, reqs, batch_size=3)}
    assert (got[1].finish_reason, got[1].text) == ("stop", "stop here")
    assert (got[2].finish_reason, got[2].tokens) == ("eos", [7, 2])
    assert (got[3].finish_reason, got[3].tokens) == ("length", [7, 2, 7])


@pytest.mark.parametrize("preset", [None, "10"])
def test_openblas_threads_sleep_after_a_call_unless_the_user_says(preset):
    """Imported before numpy, grokcpu tells OpenBLAS to park its threads right after a call
    (their 0.1 s spin slowed the first decode step after a prefill); a value already set wins."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if preset:
        env["OPENBLAS_THREAD_TIMEOUT"] = preset
    code = ("import grokcpu, os, numpy as np; np.ones((64, 64)) @ np.ones((64, 64)); "
            "print(os.environ['OPENBLAS_THREAD_TIMEOUT'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (preset or "4")


def test_warm_up_leaves_no_trace(demo_path, tok):
    from grokcpu.engine import warm_up
    m = grokcpu.load(demo_path, context=16, threads=1)
    assert warm_up(m, batch=True) > 0
    ids = tok.encode("one two three")
    _, res, _ = run(generate(m, tok, ids, make_sampler(temperature=0), 4, stop_on_eos=False))
    assert res.tokens == greedy_direct(m, ids, 4)


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "2"])
def test_batch_size_is_checked_in_one_place(model, tok, n):
    from grokcpu.engine import check_batch_size, generate_batch
    with pytest.raises(GrokError, match="--batch-size"):
        check_batch_size(n)
    with pytest.raises(GrokError, match="--batch-size"):
        list(generate_batch(model, tok, [], batch_size=n))


def test_load_refuses_hostile_files(model, tok, tmp_path):
    conv = Conversation(model, tok)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000)
    with pytest.raises(GrokError, match="nested too deeply"):
        conv.load(deep)
    (tmp_path / "bytes.json").write_bytes(b"\xff\xfe")
    with pytest.raises(GrokError, match="is not a saved conversation"):
        conv.load(tmp_path / "bytes.json")
