"""grok-cli batch on OpenAI's batch format (as `vllm run-batch` reads it).

Input lines: {"custom_id": str, "method": "POST", "url": "/v1/completions" | "/v1/chat/completions",
"body": {...}}; the body is checked and answered by grokcpu.server.protocol, as `grok-cli serve`
would answer it (not streamed). Output lines: {"id": "batch_req_...", "custom_id", "response":
{"status_code": 200, "request_id", "body"}, "error": null}; a line that cannot run gets "error":
{"code", "message"} and "response": null (the line itself is wrong) or {"status_code": 400,
"request_id", "body": the server's error body}. A record's "id" is derived from the line's number
and bytes, so a rerun recognizes the error records it already wrote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from dataclasses import dataclass

from .. import engine
from ..errors import ContextFullError, GrokError
from ..server import protocol as P
from ..server.scheduler import choice_sampler
from .app import Run
from .batch import key, line_seed, parse_json

URLS = {"/v1/completions": False, "/v1/chat/completions": True}        # url -> chat?
LINE_FIELDS = ("custom_id", "method", "url", "body")
ANY_VOCAB = 2 ** 62           # token ids are checked against the model's vocabulary where it runs


def is_openai(rec) -> bool:
    return isinstance(rec, dict) and "custom_id" in rec and "body" in rec


def record_id(n: int, raw: bytes) -> str:
    return "batch_req_" + hashlib.sha256(b"%d:" % n + raw).hexdigest()[:32]


def output(rid: str, custom_id, *, body=None, status: int = 200, code=None, message=None) -> dict:
    """One output line; `code`/`message`: the error (with a response only when `status` is given)."""
    response = None
    if body is not None:
        response = {"status_code": status, "request_id": "req_" + uuid.uuid4().hex[:24], "body": body}
    error = None if code is None else {"code": code, "message": message}
    return {"id": rid, "custom_id": custom_id, "response": response, "error": error}


def api_error_output(rid: str, custom_id, e: P.ApiError) -> dict:
    return output(rid, custom_id, body=e.body(), status=e.status, code=e.code or e.type, message=e.message)


def exception_output(rid: str, custom_id, e: Exception) -> dict:
    """The record of a line whose request could not be built (one of batch.LINE_ERRORS)."""
    if isinstance(e, P.ApiError):
        return api_error_output(rid, custom_id, e)
    return output(rid, custom_id, code="invalid_request",
                  message=str(e) if isinstance(e, GrokError) else f"{type(e).__name__}: {e}")


@dataclass(frozen=True)
class Entry:
    """A parsed line: its custom_id and (when the body is good) the checked request."""
    custom_id: str | None
    req: P.Parsed | None = None


@dataclass(frozen=True)
class OpenAIJob:
    """One line's request: plain data, turned into engine.Requests where the model is (one per
    prompt and choice)."""
    id: str
    line: int
    rid: str
    req: P.Parsed

    def requests(self, tok, model) -> list[engine.Request]:
        req, ctx = self.req, model.context
        if not req.chat:
            for p in req.prompts:
                if isinstance(p, list):
                    P.token_ids(p, "prompt", model.config.vocab_size)
        prompts, stops = P.prompt_ids(tok, req, engine.DEFAULT_SYSTEM, engine.DEFAULT_TEMPLATE)
        for i, ids in enumerate(prompts):
            P.check_prompt(ids, ctx, i, len(prompts) > 1)
        gp, out = req.gp, []
        for ids in prompts:
            for j in range(gp.n):
                out.append(engine.Request(self.id, ids, choice_sampler(gp, j, len(ids)), gp.limit(ctx, len(ids)),
                                          stops + gp.stop, gp.stop_on_eos, tag=(self.line, len(out))))
        return out

    def record(self, outcomes: list) -> dict:
        """The server's response body for the finished sequences (generate_batch's Results)."""
        failed = [o for o in outcomes if isinstance(o, GrokError)]
        if failed:
            e = failed[0]
            status = 400 if isinstance(e, ContextFullError) else 500
            return api_error_output(self.rid, self.id, P.ApiError(status, str(e), None, None,
                                                                  "invalid_request_error" if status < 500 else "server_error"))
        chat, n = self.req.chat, self.req.gp.n
        choices = [P.choice(k, chat, r.text, r.finish_reason) for k, r in enumerate(outcomes)]
        prompt = sum(r.prompt_tokens for r in outcomes[::n])              # a prompt counts once
        r = outcomes[0]
        body = dict(P.head(chat, self.req.name), choices=choices,
                    usage=P.usage(prompt, sum(o.generated_tokens for o in outcomes)),
                    timings=P.timings(r.prompt_tokens, r.prefill_s, r.generated_tokens, r.decode_s, r.ttft_s))
        return output(self.rid, self.id, body=body)

    def error_record(self, e: Exception) -> dict:
        return exception_output(self.rid, self.id, e)


class OpenAIFormat:
    """The batch command's side of OpenAI's format (the interface of batch.GrokFormat)."""
    name = "OpenAI batch"

    def __init__(self, run: Run):
        from .. import demo
        self.served = P.served_name(demo.demo_dir() if run.model is None else run.model)

    def parse(self, raw: bytes, n: int):
        """(Entry, key, problem): problem is a (code, message) for a line that is not a request,
        an ApiError for a body the server would refuse, None for a good line."""
        rec, problem = parse_json(raw, n)
        if problem is not None:
            return Entry(None), None, ("invalid_json", problem)
        if not isinstance(rec, dict):
            return Entry(None), None, ("invalid_request", f"line {n} is not a JSON object")
        cid = rec.get("custom_id")
        try:
            cid = P.text(cid, "custom_id", allow_empty=False)
        except P.ApiError as e:
            if "prompt" in rec:
                return Entry(None), None, ("invalid_request", f"line {n} is in grok-cli's batch format but this "
                                           "file's first line is OpenAI's: use one format per file")
            return Entry(None), None, ("invalid_request", f"line {n}: {e.message}")
        entry = Entry(cid)
        for k in rec:
            if k not in LINE_FIELDS:
                return entry, key(cid), ("invalid_request", f"line {n}: unknown field {k!r} "
                                         f"(a line holds {', '.join(LINE_FIELDS)})")
        if rec.get("method") != "POST":
            return entry, key(cid), ("invalid_method", f"line {n}: \"method\" must be \"POST\"")
        url = rec.get("url")
        if url not in URLS:
            return entry, key(cid), ("invalid_url", f"line {n}: \"url\" must be one of {', '.join(URLS)}")
        body, chat = rec.get("body"), URLS[url]
        try:
            if not isinstance(body, dict):
                raise P.bad("'body' must be a JSON object with the request's fields", "body")
            P.refuse_unknown(body, chat)
            if body.get("stream") not in (None, False):
                raise P.bad("'stream' is not supported in a batch: each answer is written whole", "stream")
            lp = body.get("logprobs")
            if (lp not in (None, False)) if chat else lp is not None:
                raise P.bad("'logprobs' is not supported in a batch: use `grok-cli serve`", "logprobs",
                            "unsupported_parameter")
            req = P.parse_request(body, chat, self.served, ANY_VOCAB)
        except P.ApiError as e:
            return entry, key(cid), e
        return Entry(cid, req), key(cid), None

    def duplicate(self, entry: Entry, n: int):
        return "duplicate_custom_id", f"line {n}: duplicate custom_id {entry.custom_id!r}"

    def mark(self, n: int, raw: bytes) -> str:
        return record_id(n, raw)

    def error(self, entry: Entry | None, problem, n: int, raw: bytes) -> dict:
        rid, cid = record_id(n, raw), entry.custom_id if entry is not None else None
        if isinstance(problem, tuple):
            return output(rid, cid, code=problem[0], message=problem[1])
        return exception_output(rid, cid, problem)

    def job(self, entry: Entry, n: int, raw: bytes, run: Run) -> OpenAIJob:
        req = entry.req
        seed = run.settings.get("seed")
        if req.gp.seed is None and seed is not None:         # --seed: one stream per custom_id, as our lines
            req = dataclasses.replace(req, gp=dataclasses.replace(req.gp, seed=line_seed(seed, entry.custom_id)))
        return OpenAIJob(entry.custom_id, n, record_id(n, raw), req)

    def resume(self, rec: dict, done_ids: set, done_lines: set) -> None:
        resp = rec.get("response")
        if rec.get("error") is None and isinstance(resp, dict) and resp.get("status_code") == 200:
            if isinstance(rec.get("custom_id"), str):
                done_ids.add(key(rec["custom_id"]))
        elif isinstance(rec.get("id"), str):
            done_lines.add(rec["id"])

    def tally(self, rec: dict) -> tuple[bool, int, bool]:
        if rec["error"] is not None:
            return True, 0, False
        return False, rec["response"]["body"]["usage"]["completion_tokens"], False
