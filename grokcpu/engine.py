"""Generation: prefill, then sample and decode one token at a time. Never prints.

    for ev in generate(model, tok, tok.encode("The answer is"), make_sampler(temperature=0), 32):
        if isinstance(ev, Step):
            print(ev.text, end="")          # streamed text, stop strings never leak
        else:                               # the final Result: finish_reason, counts, timings
            print(ev.finish_reason, ev.decode_tps)

Three layers, as in mlx-lm: `generate` (one sequence; yields Step records, then one Result),
`Conversation` (multi-turn chat on one session, within the context window) and
`generate_batch` (many requests, one decode_batch call per step across them).

Stopping. A sequence ends at `max_tokens` or a full context ("length"), when a stop string
appears in the text ("stop"; the text is cut before it), or at the EOS token ("eos"). The
reference runner never stops on EOS (spec GROK1.md §6, §8); we stop on it by default because a
base model otherwise rambles on past the end of a document. `stop_on_eos=False` (the CLI's
--ignore-eos) follows the reference exactly: EOS is then an ordinary token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import ContextFullError, GrokError
from .sampling import Sampler, check_settings
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Step:
    """One generated token and the text it made final (may be "": bytes of an unfinished
    character, or text held back because it could be the start of a stop string).
    token is None for the last flush of held-back text at the end of a sequence."""
    token: int | None
    text: str
    index: int


@dataclass(frozen=True)
class Notice:
    """Something the user should know that is not generated text (the CLI prints it on stderr)."""
    message: str


@dataclass(frozen=True)
class Result:
    """The end of one sequence: what was generated and how fast."""
    text: str                 # all generated text, cut before a stop string
    tokens: list[int]         # every sampled id (including an EOS / the ids that completed a stop)
    kept_tokens: int          # leading ids of `tokens` whose text is inside `text`
    finish_reason: str        # "length" | "stop" | "eos"
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    ttft_s: float             # from the call to the first token (prefill + first sample)
    context_full: bool = False  # stopped because the KV cache was full (before max_tokens)

    @property
    def generated_tokens(self) -> int:
        return len(self.tokens)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def summary(self) -> dict:
        """Counts and timings, JSON-ready (the batch output record, the --stats line)."""
        return {"finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens, "ttft_s": round(self.ttft_s, 4),
                "prefill_s": round(self.prefill_s, 4), "prefill_tps": round(self.prefill_tps, 2),
                "decode_s": round(self.decode_s, 4), "decode_tps": round(self.decode_tps, 2),
                **({"context_full": True} if self.context_full else {})}


# -- stop strings ---------------------------------------------------------------------------------

class StopFilter:
    """Holds back text that could be the start of a stop string; cuts at the first stop.

    push(text) -> (text safe to emit, stopped?). Any occurrence of a stop string starts inside
    the held text, because every suffix that is a prefix of a stop string is held.
    """

    def __init__(self, stops: Iterable[str] = ()):
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


# -- one sequence's sampling state ----------------------------------------------------------------

class _Stream:
    """Sampling, detokenizing and stop rules of one sequence (shared by generate and batch)."""

    def __init__(self, tokenizer: Tokenizer, sampler: Sampler, max_tokens: int, stop: Iterable[str],
                 eos_id: int | None, history: list[int]):
        check_settings(max_tokens=max_tokens)
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.eos_id = eos_id
        self.history = history
        self.detok = tokenizer.detokenizer()
        self.stop = StopFilter(stop)
        self.tokens: list[int] = []
        self.cum: list[int] = []          # len(detokenized text, before stop cuts) after each token
        self.text = ""
        self.finish: str | None = None

    def accept(self, logits: np.ndarray) -> list[Step]:
        """Sample the next id from `logits`; return the Steps to emit; may set self.finish."""
        tok = self.sampler(logits, self.history)
        self.tokens.append(tok)
        self.history.append(tok)
        i = len(self.tokens) - 1
        if tok == self.eos_id:
            self.cum.append(len(self.detok.text))
            return [Step(tok, "", i)] + self.end("eos")
        out, hit = self.stop.push(self.detok.add(tok))
        self.text += out
        self.cum.append(len(self.detok.text))
        steps = [Step(tok, out, i)]
        if hit:
            self.finish = "stop"
        elif len(self.tokens) >= self.max_tokens:
            steps += self.end("length")
        return steps

    def end(self, reason: str) -> list[Step]:
        """Finish now: flush held-back text (it may still complete a stop string)."""
        out, hit = self.stop.push(self.detok.flush())
        if not hit:
            out += self.stop.flush()
        self.text += out
        self.finish = "stop" if hit else reason
        return [Step(None, out, len(self.tokens))] if out else []

    @property
    def kept(self) -> int:
        if self.finish == "eos":
            return len(self.tokens) - 1
        if self.finish == "stop":
            return sum(1 for c in self.cum if c <= len(self.text))
        return len(self.tokens)


def _check_prompt(prompt_ids, free: int, context: int) -> list[int]:
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise GrokError("the prompt is empty", hint="give at least one token of text")
    if len(ids) > free:
        used = context - free
        where = f"the context holds {context}" if not used else f"{free} of the context's {context} are free"
        raise ContextFullError(f"the prompt has {len(ids)} tokens but {where}",
                               hint="shorten the prompt, or pass a larger --context (up to the model's sequence_len)")
    return ids


def _eos(model, tokenizer, stop_on_eos: bool) -> int | None:
    if not stop_on_eos:
        return None
    return int(model.config.eos_token)


# -- generate -------------------------------------------------------------------------------------

def generate(model, tokenizer: Tokenizer, prompt_ids, sampler: Sampler, max_tokens: int = 256,
             stop: Iterable[str] = (), session=None, stop_on_eos: bool = True) -> Iterator[Step | Result]:
    """Generate one continuation of `prompt_ids`; yields Step per token, then one Result.

    With `session`, the prompt is appended to what the session already holds (a chat);
    otherwise a fresh session is used. Prefill asks only for the last position's logits.
    The first token is sampled from the prefill logits, as in the reference runner.
    """
    t0 = perf_counter()
    session = model.new_session() if session is None else session
    ids = _check_prompt(prompt_ids, model.context - session.pos, model.context)
    st = _Stream(tokenizer, sampler, max_tokens, stop, _eos(model, tokenizer, stop_on_eos), list(session.tokens) + ids)
    logits = session.prefill(ids, logits="last")
    prefill_s = perf_counter() - t0
    decode_s, steps, ttft, full = 0.0, 0, None, False
    while True:
        out = st.accept(logits)
        if ttft is None:
            ttft = perf_counter() - t0
        if st.finish is None and session.pos >= model.context:
            out += st.end("length")
            full = True
        yield from out
        if st.finish is not None:
            break
        t = perf_counter()
        logits = session.decode(st.tokens[-1])
        decode_s += perf_counter() - t
        steps += 1
    yield Result(st.text, list(st.tokens), st.kept, st.finish, len(ids), prefill_s, decode_s, steps, ttft, full)


# -- batch ----------------------------------------------------------------------------------------

@dataclass
class Request:
    """One prompt of a batch, with its own sampling settings."""
    id: Any
    prompt_ids: list[int]
    sampler: Sampler
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_on_eos: bool = True
    tag: Any = None           # the caller's bookkeeping (e.g. the input line), passed through


def _decode_many(sessions, tokens) -> list[np.ndarray]:
    from . import model as model_mod
    batched = getattr(model_mod, "decode_batch", None)
    if batched is not None and len(sessions) > 1:
        return list(batched(sessions, tokens))
    return [s.decode(t) for s, t in zip(sessions, tokens)]


_END = object()      # generate_batch's "no more requests"


def check_batch_size(n) -> None:
    """The one check of a batch size (the CLI calls it before loading the model)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise GrokError(f"--batch-size {n} is out of range", hint="use an integer >= 1")


def generate_batch(model, tokenizer: Tokenizer, requests: Iterable[Request],
                   batch_size: int = 8) -> Iterator[tuple[Request, Result | GrokError]]:
    """Run many requests, up to `batch_size` at once; yields (request, Result) as each finishes.

    Each new request is prefilled on its own; then every step decodes the running sequences
    together (grokcpu.model.decode_batch). A request that cannot run (prompt too long, ...)
    yields (request, GrokError) and the others carry on. Sessions are reused (reset) across
    requests, so at most `batch_size` KV caches exist. `requests` may yield None for "none
    ready yet" (a feed that others fill): the running sequences take their step and it is
    asked again; with none running it is asked again at once, so such a feed blocks then.
    """
    check_batch_size(batch_size)
    pending = iter(requests)
    free_sessions: list = []
    n_sessions = 0
    running: list[dict] = []
    exhausted = False

    def finish(job) -> tuple[Request, Result]:
        st = job["stream"]
        res = Result(st.text, list(st.tokens), st.kept, st.finish, len(job["req"].prompt_ids),
                     job["prefill_s"], job["decode_s"], job["steps"], job["ttft"], job.get("full", False))
        return job["req"], res

    while True:
        # fill free slots
        while not exhausted and len(running) < batch_size:
            req = next(pending, _END)
            if req is _END:
                exhausted = True
                break
            if req is None:
                break
            if free_sessions:
                s = free_sessions.pop()
                s.reset()
            else:
                s = model.new_session()
                n_sessions += 1
            t0 = perf_counter()
            try:
                ids = _check_prompt(req.prompt_ids, model.context, model.context)
                st = _Stream(tokenizer, req.sampler, req.max_tokens, req.stop,
                             _eos(model, tokenizer, req.stop_on_eos), list(ids))
                logits = s.prefill(ids, logits="last")
            except GrokError as e:
                free_sessions.append(s)
                yield req, e
                continue
            job = {"req": req, "session": s, "stream": st, "prefill_s": perf_counter() - t0,
                   "decode_s": 0.0, "steps": 0}
            st.accept(logits)
            job["ttft"] = perf_counter() - t0
            if st.finish is None and s.pos >= model.context:
                st.end("length")
                job["full"] = True
            if st.finish is not None:
                free_sessions.append(s)
                yield finish(job)
                continue
            running.append(job)
        if not running:
            if exhausted:
                return
            continue
        t = perf_counter()
        all_logits = _decode_many([j["session"] for j in running], [j["stream"].tokens[-1] for j in running])
        dt = perf_counter() - t
        still = []
        for job, logits in zip(running, all_logits):
            job["decode_s"] += dt
            job["steps"] += 1
            st = job["stream"]
            st.accept(logits)
            if st.finish is None and job["session"].pos >= model.context:
                st.end("length")
                job["full"] = True
            if st.finish is None:
                still.append(job)
            else:
                free_sessions.append(job["session"])
                yield finish(job)
        running = still


# -- warm-up --------------------------------------------------------------------------------------

def warm_up(model, batch: bool = False) -> float:
    """Run every kernel the engine uses once (prefill, decode, and with `batch` decode_batch) on
    throwaway sessions, so numba compiles them (or loads them from its cache) now, not inside a
    timed step. Returns the seconds it took."""
    t0 = perf_counter()
    c = model.config
    tok = [min(4 + i, c.vocab_size - 1) for i in range(4)]
    n = max(1, min(len(tok), model.context - 2))
    sessions = [model.new_session() for _ in range(2 if batch else 1)]
    for s in sessions:
        s.prefill(tok[:n], logits="last")
    if model.context > n:
        sessions[0].decode(tok[0])
        if batch and model.context > n + 1:
            _decode_many(sessions, [tok[1]] * len(sessions))
    for s in sessions:
        s.reset()
    return perf_counter() - t0


# -- chat -----------------------------------------------------------------------------------------

DEFAULT_SYSTEM = "A conversation between a curious User and a helpful, knowledgeable Assistant."
DEFAULT_TEMPLATE = "User: {user}\nAssistant:"


@dataclass
class Turn:
    user: str
    answer: str
    answer_ids: list[int] | None = None   # what the model generated (None: re-encode `answer`)


class Conversation:
    """A multi-turn chat on one session. Grok-1 is a base model with no chat template, so the
    conversation is plain text:

        {system}\\n
        \\nUser: {message}\\nAssistant:{answer}
        \\nUser: {message}\\nAssistant:{answer} ...

    (`template` is the turn, with {user} where the message goes.) An answer ends at EOS or
    when the model starts the next turn itself: the stop string is the template's text before
    {user} on a new line ("\\nUser:"). The KV cache keeps the whole conversation, so a turn
    prefills only its new tokens.

    Context window: before a turn, if history + the new message + room for the answer
    (min(max_tokens, context/2)) would not fit, the oldest turns are dropped (the system text
    stays) and a Notice says so; the remaining conversation is then prefilled again. A message
    that does not fit even alone raises ContextFullError.
    """

    def __init__(self, model, tokenizer: Tokenizer, system: str | None = DEFAULT_SYSTEM,
                 template: str = DEFAULT_TEMPLATE):
        if template.count("{user}") != 1:
            raise GrokError(f"--template {template!r} must contain {{user}} exactly once",
                            hint="for example --template 'Q: {user}\\nA:'")
        self.model = model
        self.tok = tokenizer
        self.system = system or None
        self.template = template
        self.session = model.new_session()
        self.turns: list[Turn] = []
        self.last: Result | None = None

    # -- rendering ---------------------------------------------------------------------------
    @property
    def stop_strings(self) -> list[str]:
        head = self.template.split("{user}")[0].strip()
        return ["\n" + head] if head else []

    def _segment_ids(self, text: str, first: bool) -> list[int]:
        return self.tok.encode(text) if first else self.tok.encode_continuation(text)

    def _system_ids(self) -> list[int]:
        return self._segment_ids(self.system + "\n", True) if self.system else []

    def _user_ids(self, message: str, first: bool) -> list[int]:
        text = self.template.replace("{user}", message)
        return self._segment_ids(text if first else "\n" + text, first)

    def _answer_ids(self, turn: Turn) -> list[int]:
        if turn.answer_ids is None:      # a loaded turn: its text as the model would have written it
            text = turn.answer
            if text and not text[0].isspace() and not self.template[-1:].isspace():
                text = " " + text        # decode() drops the space the answer's first piece had
            turn.answer_ids = self.tok.encode_continuation(text)
        return turn.answer_ids

    def history_ids(self, turns: list[Turn] | None = None) -> list[int]:
        """The token ids of the system text and `turns` (default: all), as the KV cache holds them."""
        ids = self._system_ids()
        for t in self.turns if turns is None else turns:
            ids += self._user_ids(t.user, not ids) + self._answer_ids(t)
        return ids

    # -- a turn ------------------------------------------------------------------------------
    def reply(self, message: str, sampler: Sampler, max_tokens: int = 256, stop: Iterable[str] = (),
              stop_on_eos: bool = True) -> Iterator[Notice | Step | Result]:
        """Answer `message`: yields Notice (turns dropped), Steps, then the Result.

        The turn is recorded even if the consumer stops early or Ctrl-C interrupts it (the
        partial answer stays in the history).
        """
        ctx = self.model.context
        reserve = min(max_tokens, ctx // 2)
        dropped = 0
        while True:
            hist = self.history_ids()
            user = self._user_ids(message, not hist)
            if len(hist) + len(user) + reserve <= ctx or not self.turns:
                break
            self.turns.pop(0)
            dropped += 1
        if len(hist) + len(user) > ctx:
            raise ContextFullError(f"the message has {len(user)} tokens; with the system text "
                                   f"({len(hist)}) it does not fit the context of {ctx}",
                                   hint="send a shorter message, or pass a larger --context")
        if dropped:
            yield Notice(f"the conversation no longer fits the {ctx}-token context: dropped the oldest "
                         f"{dropped} turn(s); {len(self.turns)} remain")
        self._sync(hist)
        feed = hist[self.session.pos:] + user
        turn = Turn(message, "", [])
        self.turns.append(turn)
        seen: list[int] = []
        done = False
        try:
            for ev in generate(self.model, self.tok, feed, sampler, max_tokens,
                               list(self.stop_strings) + list(stop), self.session, stop_on_eos):
                if isinstance(ev, Result):
                    turn.answer = ev.text
                    turn.answer_ids = ev.tokens[:ev.kept_tokens]
                    self.last = ev
                    done = True
                elif ev.token is not None:
                    seen.append(ev.token)
                yield ev
        finally:
            if not done:                    # interrupted: keep what was generated
                turn.answer_ids = seen
                turn.answer = self.tok.decode(seen)

    def _sync(self, want: list[int]) -> None:
        """Make the session hold a prefix of `want` (rewinding past tokens that differ)."""
        have = self.session.tokens
        n = 0
        for a, b in zip(have, want):
            if a != b:
                break
            n += 1
        if n < self.session.pos:
            rewind(self.session, n)

    # -- commands ----------------------------------------------------------------------------
    def reset(self) -> None:
        self.turns = []
        self.session.reset()
        self.last = None

    def to_dict(self) -> dict:
        return {"format": "grokcpu-chat", "version": 1, "system": self.system, "template": self.template,
                "turns": [{"user": t.user, "assistant": t.answer} for t in self.turns]}

    def save(self, path: str | os.PathLike) -> None:
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, p)
        except OSError as e:
            raise GrokError(f"cannot save the conversation to {str(p)!r}: {e.strerror or e}") from None

    def load(self, path: str | os.PathLike) -> None:
        """Replace the conversation with a saved one (its system text and template too)."""
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise GrokError(f"cannot read {str(p)!r}: {e.strerror or e}") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise GrokError(f"{str(p)!r} is not a saved conversation: {why}", hint="use a file written by /save") from None
        ok = (isinstance(d, dict) and d.get("format") == "grokcpu-chat" and isinstance(d.get("turns"), list)
              and all(isinstance(t, dict) and isinstance(t.get("user"), str) and isinstance(t.get("assistant"), str)
                      for t in d["turns"]))
        if not ok:
            raise GrokError(f"{str(p)!r} is not a saved conversation", hint="use a file written by /save")
        template = d.get("template") or DEFAULT_TEMPLATE
        if not isinstance(template, str) or template.count("{user}") != 1:
            raise GrokError(f"{str(p)!r} has a bad template", hint="use a file written by /save")
        self.system = d.get("system") or None
        self.template = template
        self.turns = [Turn(t["user"], t["assistant"]) for t in d["turns"]]
        self.session.reset()
        self.last = None


class Transcript(Conversation):
    """A chat's token ids exactly as Conversation writes them, without a model or session (the
    server's and the batch's chat requests)."""

    def __init__(self, tok, system: str | None, template: str):
        self.tok, self.system, self.template = tok, system or None, template
        self.turns = []

    def prompt_ids(self, turns: list[tuple[str, str]], message: str) -> list[int]:
        self.turns = [Turn(u, a) for u, a in turns]
        hist = self.history_ids()
        return hist + self._user_ids(message, not hist)


def rewind(session, n: int) -> None:
    """Keep the first n tokens of a session's KV cache, forget the rest.

    Uses Session.truncate when the model provides it; otherwise replays the kept tokens into a
    reset session (the same result, at the cost of a prefill).
    """
    trunc = getattr(session, "truncate", None)
    if trunc is not None:
        trunc(n)
        return
    keep = list(session.tokens[:n])
    session.reset()
    if keep:
        session.prefill(keep, logits="last")
