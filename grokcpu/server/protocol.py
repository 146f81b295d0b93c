"""The OpenAI wire format: request validation and response bodies. No I/O, no model.

Every problem with a request raises ApiError, which the app turns into a 4xx with the body
OpenAI clients expect: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field

MAX_DEPTH = 32            # JSON nesting a request may use (chat content parts are 4 deep)
MAX_STOP = 16             # stop strings per request (OpenAI allows 4)
MAX_STOP_CHARS = 256
MAX_N = 16                # choices per prompt
MAX_PROMPTS = 64          # prompts per completion request
MAX_TOP_LOGPROBS = 20
SEED_MAX = 2 ** 64 - 1


class ApiError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


# -- JSON ----------------------------------------------------------------------------------------

def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def _depth_ok(body: str) -> bool:
    """Nesting depth of brackets outside strings <= MAX_DEPTH (checked before json.loads, so a
    deeply nested body never reaches the recursive parser)."""
    if body.count("[") + body.count("{") <= MAX_DEPTH:
        return True
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub("", body)):
        depth += 1 if m.group() in "[{" else -1
        if depth > MAX_DEPTH:
            return False
    return True


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object; NaN/Infinity, bad UTF-8, deep nesting refused."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("the request body is not UTF-8 text") from None
    if not text.strip():
        raise bad("the request body is empty: send a JSON object")
    if not _depth_ok(text):
        raise bad(f"the request body nests JSON deeper than {MAX_DEPTH} levels")
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise bad(f"the request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise bad(f"the request body must be a JSON object, not {_kind(data)}")
    return data


def _kind(v) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(v), type(v).__name__)


# -- fields --------------------------------------------------------------------------------------

def text(v, param: str, *, allow_empty: bool = True) -> str:
    """A string that is valid Unicode (no lone surrogates from \\ud800 escapes)."""
    if not isinstance(v, str):
        raise bad(f"'{param}' must be a string, not {_kind(v)}", param)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"'{param}' holds an unpaired surrogate (\\ud800-\\udfff): not valid Unicode text", param) from None
    if not allow_empty and not v:
        raise bad(f"'{param}' must not be empty", param)
    return v


def integer(d: dict, param: str, default, lo: int, hi: int):
    v = d.get(param)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer() and lo <= v <= hi:
            return int(v)           # 16.0 is 16 (some clients send floats)
        raise bad(f"'{param}' must be an integer, not {_kind(v)}", param)
    if not lo <= v <= hi:
        raise bad(f"'{param}' is {v if abs(v) < 10 ** 30 else 'a huge integer'}: use an integer from {lo} to {hi}",
                  param)
    return v


def number(d: dict, param: str, default, lo: float, hi: float, lo_open: bool = False):
    v = d.get(param)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(f"'{param}' must be a number, not {_kind(v)}", param)
    try:
        x = float(v)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x) or x > hi or x < lo or (lo_open and x == lo):
        lo_s = f"({lo}" if lo_open else f"[{lo}"
        raise bad(f"'{param}' is {v if abs(x) < 1e30 else 'huge'}: use a number in {lo_s}, {hi}]", param)
    return x


def boolean(d: dict, param: str, default: bool) -> bool:
    v = d.get(param)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{param}' must be true or false, not {_kind(v)}", param)
    return v


def stops(d: dict) -> list[str]:
    v = d.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) > MAX_STOP:
        raise bad(f"'stop' must be a string or an array of at most {MAX_STOP} strings", "stop")
    out = [text(s, "stop") for s in v]
    if any(len(s) > MAX_STOP_CHARS for s in out):
        raise bad(f"a stop string is longer than {MAX_STOP_CHARS} characters", "stop")
    return [s for s in out if s]


# -- requests ------------------------------------------------------------------------------------

@dataclass
class GenParams:
    """What every generation request shares (sampling, limits, output options)."""
    max_tokens: int | None
    n: int
    stream: bool
    include_usage: bool
    stop: list[str]
    sampling: dict                 # make_sampler keywords (seed excluded)
    seed: int | None
    presence_penalty: float
    frequency_penalty: float
    logprobs: int | None           # top alternatives per token (0: just the chosen one); None: off
    stop_on_eos: bool
    extra: dict = field(default_factory=dict)

    def choice_seed(self, j: int) -> int | None:
        """Choice j's seed: seed + j (so choice 0 is what `grok-cli generate --seed` gives)."""
        return None if self.seed is None else (self.seed + j) % (2 ** 64)

    def limit(self, context: int, n_prompt: int) -> int:
        """max_tokens, or without it the room the context leaves after the prompt."""
        return self.max_tokens if self.max_tokens is not None else context - n_prompt + 1


# llama-server's defaults, which are also grok-cli's (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05)
DEFAULTS = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, repeat_last_n=64)


def gen_params(d: dict, chat: bool) -> GenParams:
    mt = integer(d, "max_completion_tokens", None, 1, 2 ** 62) if chat else None
    if mt is None:
        mt = integer(d, "max_tokens", None, 1, 2 ** 62)
    if mt is None:
        mt = integer(d, "n_predict", None, 1, 2 ** 62)      # llama-server's name
    if mt is None and not chat:
        mt = 16                                             # OpenAI's default for completions
    n = integer(d, "n", 1, 1, MAX_N)
    stream = boolean(d, "stream", False)
    so = d.get("stream_options")
    include_usage = False
    if so is not None:
        if not isinstance(so, dict):
            raise bad(f"'stream_options' must be an object, not {_kind(so)}", "stream_options")
        include_usage = boolean(so, "include_usage", False)
    sampling = dict(
        temperature=number(d, "temperature", DEFAULTS["temperature"], 0.0, 100.0),
        top_k=integer(d, "top_k", DEFAULTS["top_k"], 0, 2 ** 31),
        top_p=number(d, "top_p", DEFAULTS["top_p"], 0.0, 1.0, lo_open=True),
        min_p=number(d, "min_p", DEFAULTS["min_p"], 0.0, 1.0),
        repeat_penalty=number(d, "repeat_penalty", DEFAULTS["repeat_penalty"], 0.0, 100.0, lo_open=True),
        repeat_last_n=integer(d, "repeat_last_n", DEFAULTS["repeat_last_n"], -1, 2 ** 31),
    )
    seed = integer(d, "seed", None, -(2 ** 63), SEED_MAX)
    if seed is not None and seed < 0:
        seed = None                                         # -1 = random, as grok-cli and llama-server
    pp = number(d, "presence_penalty", 0.0, -2.0, 2.0)
    fp = number(d, "frequency_penalty", 0.0, -2.0, 2.0)
    if chat:
        lp = None
        if boolean(d, "logprobs", False):
            lp = integer(d, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        elif d.get("top_logprobs") is not None:
            integer(d, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        lp = integer(d, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    return GenParams(mt, n, stream, include_usage, stops(d), sampling, seed, pp, fp, lp,
                     not boolean(d, "ignore_eos", False))


def refuse_unsupported(d: dict) -> None:
    """Fields that would change the answer and that this server does not implement: a 400, not
    a silent difference."""
    checks = [("echo", lambda v: v not in (None, False)), ("suffix", lambda v: v not in (None, "")),
              ("best_of", lambda v: v not in (None, 1) or isinstance(v, bool)),
              ("logit_bias", lambda v: v not in (None, {})), ("tools", lambda v: v not in (None, [])),
              ("functions", lambda v: v not in (None, [])),
              ("response_format", lambda v: v is not None and v != {"type": "text"})]
    for name, unsupported in checks:
        if unsupported(d.get(name)):
            raise bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")


# the fields a body may hold (read above, or refused by refuse_unsupported, or OpenAI's that change nothing)
COMMON_FIELDS = {"model", "max_tokens", "n_predict", "n", "stream", "stream_options", "temperature", "top_k",
                 "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed", "presence_penalty",
                 "frequency_penalty", "stop", "ignore_eos", "logprobs", "logit_bias", "user", "metadata", "store"}
FIELDS = {False: COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"},
          True: COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "functions",
                                 "response_format", "tool_choice", "parallel_tool_calls"}}


def refuse_unknown(d: dict, chat: bool) -> None:
    """A field this server does not know (a typo changes nothing silently in an unattended batch)."""
    for k in d:
        if k not in FIELDS[chat]:
            near = difflib.get_close_matches(k, FIELDS[chat], n=1)
            tip = f" (did you mean '{near[0]}'?)" if near else ""
            raise bad(f"unknown field {json.dumps(k, ensure_ascii=True)[:60]}{tip}", k, "unknown_parameter")


@dataclass
class Parsed:
    """A checked completion or chat request: what generation needs, before tokenizing."""
    chat: bool
    name: str
    gp: GenParams
    prompts: list                  # completions: strings or token id lists
    system: str | None = None      # chat: chat_messages()'s parts
    turns: list = field(default_factory=list)
    message: str = ""


def parse_request(d: dict, chat: bool, served: str, vocab: int) -> Parsed:
    """The one validation of a /v1/completions or /v1/chat/completions body."""
    name = model_name(d, served)
    refuse_unsupported(d)
    gp = gen_params(d, chat=chat)
    if chat:
        system, turns, message = chat_messages(d)
        return Parsed(True, name, gp, [], system, turns, message)
    return Parsed(False, name, gp, completion_prompts(d, vocab))


def prompt_ids(tok, req: Parsed, system: str | None, template: str) -> tuple[list[list[int]], list[str]]:
    """The request's prompts as token ids, and the stop strings its chat template adds. A chat is
    rendered as `grok-cli chat` renders it; its system message replaces `system`."""
    if not req.chat:
        return [p if isinstance(p, list) else tok.encode(p) for p in req.prompts], []
    from ..engine import Transcript
    conv = Transcript(tok, system if req.system is None else req.system, template)
    return [conv.prompt_ids(req.turns, req.message)], conv.stop_strings


def model_name(d: dict, served: str) -> str:
    """Any model name is accepted (one model is served); responses name the served one."""
    v = d.get("model")
    if v is not None:
        text(v, "model")
    return served


def completion_prompts(d: dict, vocab: int) -> list[str | list[int]]:
    """`prompt`: a string, an array of strings, an array of token ids, or an array of arrays of ids."""
    p = d.get("prompt")
    if p is None:
        raise bad("'prompt' is required", "prompt")
    if isinstance(p, str):
        return [text(p, "prompt")]
    if not isinstance(p, list) or not p:
        raise bad(f"'prompt' must be a string or a non-empty array, not {_kind(p) if p != [] else 'an empty array'}",
                  "prompt")
    if all(isinstance(x, str) for x in p):
        out = [text(x, "prompt") for x in p]
    elif all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        out = [token_ids(p, "prompt", vocab)]
    elif all(isinstance(x, list) for x in p):
        out = [token_ids(x, "prompt", vocab) for x in p]
    else:
        raise bad("'prompt' must be a string, an array of strings, an array of token ids or an array of "
                  "arrays of token ids (one kind, not a mixture)", "prompt")
    if len(out) > MAX_PROMPTS:
        raise bad(f"'prompt' holds {len(out)} prompts; at most {MAX_PROMPTS} per request", "prompt")
    return out


def token_ids(v, param: str, vocab: int) -> list[int]:
    if not isinstance(v, list):
        raise bad(f"'{param}' must be an array of token ids, not {_kind(v)}", param)
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int):
            raise bad(f"'{param}' must hold integer token ids, not {_kind(x)}", param)
        if not 0 <= x < vocab:
            raise bad(f"token id {x if abs(x) < 10 ** 30 else 'a huge integer'} in '{param}' is outside the "
                      f"vocabulary 0..{vocab - 1}", param)
    return list(v)


def chat_messages(d: dict) -> tuple[str | None, list[tuple[str, str]], str]:
    """`messages` -> (system text or None for the default, [(user, assistant)] turns, last user message).

    Roles system/developer (their texts joined: they replace the default system text), user and
    assistant. Consecutive messages of one role are joined with a newline; the last must be the user's.
    """
    msgs = d.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty array of {role, content} objects", "messages")
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    user: list[str] | None = None
    answer: list[str] | None = None
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object with 'role' and 'content'", "messages")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"'{where}.role' must be one of system, developer, user, assistant, not "
                      f"{json.dumps(role)[:40] if isinstance(role, str) else _kind(role)}", "messages")
        content = _content(m.get("content"), f"{where}.content", allow_null=role == "assistant")
        if role in ("system", "developer"):
            system.append(content)
        elif role == "user":
            if answer is not None:
                turns.append(("\n".join(user or []), "\n".join(answer)))
                user, answer = None, None
            user = (user or []) + [content]
        else:
            answer = (answer or []) + [content]
    if user is None or answer is not None:
        raise bad("the last message must be the user's (role 'user')", "messages")
    return ("\n".join(system) if system else None), turns, "\n".join(user)


def _content(v, param: str, allow_null: bool) -> str:
    """A message's content: a string, or an array of {type: "text", text} parts (joined)."""
    if v is None and allow_null:
        return ""
    if isinstance(v, str):
        return text(v, param)
    if isinstance(v, list):
        parts = []
        for j, p in enumerate(v):
            if not isinstance(p, dict) or p.get("type") != "text":
                raise bad(f"'{param}[{j}]' must be a {{\"type\": \"text\", \"text\": ...}} part (only text is "
                          f"supported)", "messages")
            parts.append(text(p.get("text"), f"{param}[{j}].text"))
        return "".join(parts)
    raise bad(f"'{param}' must be a string or an array of text parts, not {_kind(v)}", "messages")


# -- responses -----------------------------------------------------------------------------------

def served_name(path) -> str:
    """The model's name in responses: its folder's (the parent of a ckpt-0 folder)."""
    p = path.parent if path.name == "ckpt-0" else path
    return p.name or "grok-1"


def check_prompt(ids: list[int], ctx: int, i: int, many: bool) -> None:
    which = f"prompt {i}" if many else "the prompt"
    if not ids:
        raise bad(f"{which} is empty: give at least one token of text", "prompt")
    if len(ids) > ctx:
        raise bad(f"{which} has {len(ids)} tokens but the context holds {ctx}: shorten it (max_tokens "
                  f"beyond the room left is clipped; the prompt alone must fit)", "prompt",
                  "context_length_exceeded")


def head(chat: bool, name: str) -> dict:
    """A response's first fields (a new id)."""
    return {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()), "model": name}


def finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def choice(index: int, chat: bool, text_: str, reason: str, logprobs=None) -> dict:
    c = {"index": index}
    if chat:
        c["message"] = {"role": "assistant", "content": text_}
    else:
        c["text"] = text_
    c["logprobs"] = logprobs
    c["finish_reason"] = finish(reason)
    return c


def timings(prompt_n: int, prefill_s: float, predicted_n: int, decode_s: float, ttft_s: float) -> dict:
    """llama-server's per-request timings (of the first choice)."""
    pred = max(predicted_n - 1, 0)
    return {"prompt_n": prompt_n, "prompt_ms": round(prefill_s * 1e3, 3),
            "predicted_n": predicted_n, "predicted_ms": round(decode_s * 1e3, 3),
            "predicted_per_second": round(pred / decode_s, 3) if decode_s > 0 else None,
            "ttft_ms": round(ttft_s * 1e3, 3)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
