"""The HTTP side: a Starlette app with OpenAI's routes (and llama-server's /health, /metrics,
/tokenize, /detokenize). It never runs the model: requests become scheduler Jobs and their
events come back through an asyncio queue.

    app = create_app(Settings(model_path="/data/grok-1"))     # loads the model in a thread
    uvicorn.run(app, host="127.0.0.1", port=8080)
"""

from __future__ import annotations

import asyncio
import hmac
import sys
import threading
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import engine
from ..errors import GrokError
from . import protocol as P
from .scheduler import Done, Failed, Job, QueueFull, Scheduler, Token, choice_sampler


@dataclass
class Settings:
    model_path: str | None = None            # None: the built-in demo model
    tokenizer_path: str | None = None
    options: object = None                   # grokcpu.Options (None: defaults)
    parallel: int = 4
    queue: int = 64
    api_key: str | None = None
    max_body_bytes: int = 2 * 1024 * 1024
    cors_origins: list[str] = field(default_factory=list)
    model_name: str | None = None            # reported by /v1/models (default: the folder's name)
    system: str | None = engine.DEFAULT_SYSTEM
    template: str = engine.DEFAULT_TEMPLATE
    retry_after_s: int = 1


class Metrics:
    """Counters for /metrics (event-loop side; the scheduler keeps its own)."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.lock = threading.Lock()

    def count(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1


class State:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.model = self.tok = self.sched = None
        self.name = settings.model_name or "grok-1"
        self.error: str | None = None
        self.ready = threading.Event()
        self.metrics = Metrics()
        self.pieces: dict[int, tuple[str, list[int]]] = {}
        self.on_load_error = None             # callback(message) (the CLI stops the server)

    def load(self, model=None, tok=None) -> None:
        """Open the model and tokenizer (or take given ones) and start the scheduler."""
        s = self.settings
        try:
            if model is None:
                import grokcpu
                from ..tokenizer import model_tokenizer
                path = Path(s.model_path) if s.model_path else _demo_path()
                tok = model_tokenizer(path, s.tokenizer_path)
                model = grokcpu.load(path, options=s.options)
                try:
                    tok.check_fits(model.config.vocab_size)
                except GrokError:
                    model.close()
                    raise
                if not s.model_name:
                    self.name = P.served_name(path)
            self.model, self.tok = model, tok
            self.sched = Scheduler(model, tok, s.parallel, s.queue)
            self.ready.set()
        except GrokError as e:
            self._fail(str(e))
        except Exception as e:                 # noqa: BLE001 - reported as one line, then the server stops
            self._fail(f"cannot load the model: {type(e).__name__}: {e}")

    def _fail(self, message: str) -> None:
        self.error = message
        if self.on_load_error is not None:
            self.on_load_error(message)

    def require_ready(self) -> None:
        if not self.ready.is_set():
            raise P.ApiError(503, self.error or "the model is still loading; retry shortly", None,
                             "model_load_failed" if self.error else "loading", "server_error",
                             {"Retry-After": "5"})

    def piece(self, i: int) -> tuple[str, list[int]]:
        """A token's text and UTF-8 bytes, as OpenAI's logprobs report them."""
        if i not in self.pieces:
            p = self.tok.id_to_piece(i)
            if len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
                b = [int(p[3:5], 16)]
                self.pieces[i] = (bytes(b).decode("utf-8", "replace"), b)
            else:
                t = p.replace("\u2581", " ")
                self.pieces[i] = (t, list(t.encode("utf-8")))
        return self.pieces[i]


def _demo_path() -> Path:
    from .. import demo
    print(demo.BANNER, file=sys.stderr)
    path, _ = demo.ensure_demo()
    return path


# -- request plumbing ----------------------------------------------------------------------------

def _error_response(e: P.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _route(state: State, path: str, methods: list[str], fn, auth: bool = True) -> Route:
    """Wrap a handler: API key check, ApiError -> OpenAI error body, any other exception -> 500
    with the same shape (logged), and the request counted for /metrics."""
    key = state.settings.api_key

    async def handler(request: Request) -> Response:
        try:
            if auth and key is not None:
                got = request.headers.get("authorization", "")
                scheme, _, token = got.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                    raise P.ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                     None, "invalid_api_key", "authentication_error",
                                     {"WWW-Authenticate": "Bearer"})
            resp = await fn(state, request)
        except P.ApiError as e:
            resp = _error_response(e)
        except Exception as e:                 # noqa: BLE001 - a bug: one 500, the server stays up
            traceback.print_exc()
            resp = JSONResponse(P.error_body(f"internal error: {type(e).__name__}", "server_error"), 500)
        state.metrics.count(path, resp.status_code)
        return resp

    return Route(path, handler, methods=methods)


async def _read_json(state: State, request: Request) -> dict:
    limit = state.settings.max_body_bytes
    too_big = P.ApiError(413, f"the request body is larger than {limit} bytes", None, "request_too_large")
    cl = request.headers.get("content-length", "")
    if cl.isdigit() and int(cl) > limit:
        raise too_big
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise too_big
    return P.parse_body(bytes(buf))


# -- routes -------------------------------------------------------------------------------------

async def health(state: State, request: Request) -> Response:
    if state.error:
        return JSONResponse({"status": "error", "error": state.error}, 503)
    if not state.ready.is_set():
        return JSONResponse({"status": "loading"}, 503)
    return JSONResponse({"status": "ok"})


async def models(state: State, request: Request) -> Response:
    state.require_ready()
    m = {"id": state.name, "object": "model", "created": 0, "owned_by": "grokcpu",
         "meta": {"vocab_size": state.model.config.vocab_size, "context": state.model.context}}
    return JSONResponse({"object": "list", "data": [m]})


async def tokenize(state: State, request: Request) -> Response:
    state.require_ready()
    d = await _read_json(state, request)
    content = P.text(d.get("content"), "content")
    return JSONResponse({"tokens": await asyncio.to_thread(state.tok.encode, content)})


async def detokenize(state: State, request: Request) -> Response:
    state.require_ready()
    d = await _read_json(state, request)
    ids = P.token_ids(d.get("tokens"), "tokens", state.tok.vocab_size)
    return JSONResponse({"content": state.tok.decode(ids)})


async def metrics(state: State, request: Request) -> Response:
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP grokcpu_{name} {help_}")
        lines.append(f"# TYPE grokcpu_{name} {kind}")
        for labels, v in samples:
            lab = "{" + ",".join(f'{k}="{v2}"' for k, v2 in labels.items()) + "}" if labels else ""
            lines.append(f"grokcpu_{name}{lab} {v}")

    with state.metrics.lock:
        reqs = sorted(state.metrics.requests.items())
    metric("requests_total", "counter", "HTTP requests by endpoint and status",
           [({"endpoint": e, "status": str(s)}, n) for (e, s), n in reqs])
    metric("ready", "gauge", "1 once the model is loaded", [({}, int(state.ready.is_set()))])
    sc = state.sched
    if sc is not None:
        metric("prompt_tokens_total", "counter", "prompt tokens prefilled", [({}, sc.prompt_tokens_total)])
        metric("generated_tokens_total", "counter", "tokens generated", [({}, sc.generated_tokens_total)])
        metric("decode_steps_total", "counter", "batched decode steps", [({}, sc.decode_steps_total)])
        metric("batched_steps_total", "counter", "decode steps run as one decode_batch call",
               [({}, sc.batched_steps_total)])
        metric("decode_seconds_total", "counter", "time in decode steps", [({}, round(sc.decode_seconds_total, 6))])
        metric("prefill_seconds_total", "counter", "time in prefills", [({}, round(sc.prefill_seconds_total, 6))])
        metric("tokens_per_second", "gauge", "generated tokens per second over the last 10 s",
               [({}, round(sc.tokens_per_second(), 3))])
        metric("requests_running", "gauge", "sequences in the batch", [({}, sc.n_running)])
        metric("requests_waiting", "gauge", "sequences in the queue", [({}, len(sc.waiting))])
        metric("parallel_slots", "gauge", "most sequences run at once", [({}, sc.parallel)])
        ec = state.model.stats().get("expert_cache") or {}
        if ec:
            metric("expert_cache_hit_rate", "gauge", "expert cache hit rate since start",
                   [({}, round(float(ec.get("hit_rate", 0.0)), 6))])
            metric("expert_cache_lookups_total", "counter", "expert cache lookups", [({}, ec.get("lookups", 0))])
            metric("expert_cache_bytes_read_total", "counter", "expert bytes read from the checkpoint",
                   [({}, ec.get("bytes_read", 0))])
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


async def completions(state: State, request: Request) -> Response:
    return await _complete(state, request, chat=False)


async def chat_completions(state: State, request: Request) -> Response:
    return await _complete(state, request, chat=True)


async def _complete(state: State, request: Request, chat: bool) -> Response:
    d = await _read_json(state, request)
    state.require_ready()
    req = P.parse_request(d, chat, state.name, state.model.config.vocab_size)
    s = state.settings
    prompts, stops = await asyncio.to_thread(P.prompt_ids, state.tok, req, s.system, s.template)
    return await _generate(state, request, req.name, req.gp, prompts, stops, chat)


# -- generation ----------------------------------------------------------------------------------

async def _generate(state: State, request: Request, name: str, gp: P.GenParams, prompts: list[list[int]],
                    extra_stop: list[str], chat: bool) -> Response:
    ctx = state.model.context
    for i, ids in enumerate(prompts):
        P.check_prompt(ids, ctx, i, len(prompts) > 1)
    total = len(prompts) * gp.n
    cap = state.settings.parallel + state.settings.queue
    if total > cap:
        raise P.bad(f"the request asks for {total} sequences; this server holds at most {cap} "
                    f"(--parallel + --queue)", "n")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    jobs: list[Job] = []
    for ids in prompts:
        for j in range(gp.n):
            sampler = choice_sampler(gp, j, len(ids))
            k = len(jobs)

            def deliver(ev, k=k):
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (k, ev))
                except RuntimeError:         # the event loop is gone (shutdown)
                    pass

            jobs.append(Job(ids, sampler, gp.limit(ctx, len(ids)), extra_stop + gp.stop, gp.stop_on_eos, deliver, gp.logprobs))
    try:
        state.sched.submit(jobs)
    except QueueFull as e:
        raise P.ApiError(503, f"the server is busy ({e}); retry later", None, "queue_full", "server_error",
                         {"Retry-After": str(state.settings.retry_after_s)}) from None
    head = P.head(chat, name)
    if gp.stream:
        return StreamingResponse(_stream(state, jobs, events, head, gp, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(state, request, jobs, events, head, gp, chat)


async def _collect(state, request, jobs, events, head, gp, chat) -> Response:
    """Wait for every job; a client that goes away cancels them (checked once a second)."""
    texts = [""] * len(jobs)
    lps: list[list] = [[] for _ in jobs]
    done: dict[int, Done] = {}
    try:
        while len(done) < len(jobs):
            try:
                k, ev = await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    state.sched.cancel(jobs)
                    return Response(status_code=499)
                continue
            if isinstance(ev, Token):
                texts[k] += ev.text
                if ev.logprob is not None:
                    lps[k].append(ev.logprob)
            elif isinstance(ev, Done):
                done[k] = ev
            elif isinstance(ev, Failed):
                state.sched.cancel(jobs)
                raise P.ApiError(ev.status, ev.message, None, None,
                                 "invalid_request_error" if ev.status < 500 else "server_error")
    except asyncio.CancelledError:
        state.sched.cancel(jobs)
        raise
    choices = []
    for k, job in enumerate(jobs):
        r = done[k]
        lp = None
        if gp.logprobs is not None:
            lp = (_chat_logprobs if chat else _completion_logprobs)(state, lps[k][:r.kept_tokens])
        choices.append(P.choice(k, chat, r.text, r.finish_reason, lp))
    r = done[0]
    timings = P.timings(r.prompt_tokens, r.prefill_s, r.completion_tokens, r.decode_s, r.ttft_s)
    return JSONResponse(dict(head, choices=choices, usage=_usage(jobs, done), timings=timings))


def _usage(jobs, done) -> dict:
    seen, prompt = set(), 0
    for k, job in enumerate(jobs):                 # a prompt counts once, however many choices
        if id(job.prompt_ids) not in seen:
            seen.add(id(job.prompt_ids))
            prompt += len(job.prompt_ids)
    return P.usage(prompt, sum(r.completion_tokens for r in done.values()))


def _completion_logprobs(state, entries) -> dict:
    toks, lps, tops, offs, pos = [], [], [], [], 0
    for tid, lp, alts in entries:
        t = state.piece(tid)[0]
        toks.append(t)
        lps.append(lp)
        tops.append({state.piece(a)[0]: alp for a, alp in alts})
        offs.append(pos)
        pos += len(t)
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


def _chat_logprobs(state, entries) -> dict:
    def one(tid, lp):
        t, b = state.piece(tid)
        return {"token": t, "logprob": lp, "bytes": b}
    return {"content": [dict(one(tid, lp), top_logprobs=[one(a, alp) for a, alp in alts])
                        for tid, lp, alts in entries]}


async def _stream(state, jobs, events, head, gp, chat):
    """Server-sent events: one chunk per piece of text, a last chunk per choice with its
    finish_reason, the usage chunk if asked, then [DONE]. Leaving early cancels the jobs."""
    head = dict(head, object="chat.completion.chunk" if chat else "text_completion")
    done: dict[int, Done] = {}
    finished = False
    try:
        if chat:
            for k in range(len(jobs)):
                yield P.sse(dict(head, choices=[{"index": k, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]))
        while len(done) < len(jobs):
            k, ev = await events.get()
            if isinstance(ev, Token):
                if not ev.text and ev.logprob is None:
                    continue
                lp = None
                if gp.logprobs is not None and ev.logprob is not None:
                    lp = (_chat_logprobs if chat else _completion_logprobs)(state, [ev.logprob])
                elif gp.logprobs is not None and chat:
                    lp = {"content": []}
                c = {"index": k, "delta": {"content": ev.text}} if chat else {"index": k, "text": ev.text}
                yield P.sse(dict(head, choices=[dict(c, logprobs=lp, finish_reason=None)]))
            elif isinstance(ev, Done):
                done[k] = ev
                c = {"index": k, "delta": {}} if chat else {"index": k, "text": ""}
                yield P.sse(dict(head, choices=[dict(c, logprobs=None, finish_reason=P.finish(ev.finish_reason))]))
            elif isinstance(ev, Failed):
                state.sched.cancel(jobs)
                finished = True
                yield P.sse(P.error_body(ev.message, "invalid_request_error" if ev.status < 500 else "server_error"))
                yield P.SSE_DONE
                return
        finished = True
        if gp.include_usage:
            yield P.sse(dict(head, choices=[], usage=_usage(jobs, done)))
        yield P.SSE_DONE
    finally:
        if not finished:
            state.sched.cancel(jobs)


# -- the app -------------------------------------------------------------------------------------

def create_app(settings: Settings, model=None, tokenizer=None) -> Starlette:
    """The ASGI app. The model loads in a thread when the app starts (or `model` and
    `tokenizer` are used as given); /health answers 503 until then."""
    state = State(settings)

    @asynccontextmanager
    async def lifespan(app):
        t = threading.Thread(target=state.load, args=(model, tokenizer), name="grokcpu-load", daemon=True)
        t.start()
        try:
            yield
        finally:
            if state.sched is not None:
                await asyncio.to_thread(state.sched.stop)
            if state.model is not None and model is None:
                state.model.close()

    routes = [
        _route(state, "/health", ["GET"], health, auth=False),
        _route(state, "/metrics", ["GET"], metrics),
        _route(state, "/v1/models", ["GET"], models),
        _route(state, "/v1/completions", ["POST"], completions),
        _route(state, "/v1/chat/completions", ["POST"], chat_completions),
        _route(state, "/tokenize", ["POST"], tokenize),
        _route(state, "/detokenize", ["POST"], detokenize),
    ]

    async def http_error(request: Request, exc: HTTPException) -> Response:
        msg = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return JSONResponse(P.error_body(msg.get(exc.status_code, str(exc.detail)), "invalid_request_error",
                                         None, "not_found" if exc.status_code == 404 else None),
                            exc.status_code, headers=getattr(exc, "headers", None))

    middleware = []
    if settings.cors_origins:
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware
        middleware.append(Middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware,
                    exception_handlers={HTTPException: http_error})
    app.state.grok = state
    return app
