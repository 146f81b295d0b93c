"""Continuous batching: one thread owns the model and runs every sequence of every request.

Each turn of the loop (1) drops sequences whose client went away, (2) prefills waiting jobs
into free slots (each gets its first token from the prefill logits, as engine.generate does),
(3) decodes all running sequences together with one model.decode_batch call (each weight read
once per step) and (4) retires the finished ones, whose sessions go back to the pool (reset,
reused: at most `parallel` KV caches ever exist). Jobs beyond `parallel` wait in a queue of
`queue` places; a submit beyond that raises QueueFull (the app answers 503).

Sampling, detokenizing and stop strings are engine._Stream's, so a request gives the same
text as `grok-cli generate` with the same settings and seed.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from time import monotonic, perf_counter
from typing import Any, Callable

import numpy as np

from .. import engine
from ..errors import GrokError
from ..model import decode_batch
from ..sampling import make_sampler


class QueueFull(Exception):
    """No room for the job: `parallel` sequences run and `queue` wait."""


# -- what the scheduler tells a request --------------------------------------------------------

@dataclass(frozen=True)
class Token:
    """Text made final by one step (may be ""); logprob: (id, logprob, [(id, logprob)...]) for a
    kept sampled token when the job asked for logprobs."""
    text: str
    token: int | None
    logprob: tuple | None = None


@dataclass(frozen=True)
class Done:
    finish_reason: str                 # "length" | "stop" | "eos" (the app reports eos as "stop")
    text: str
    prompt_tokens: int
    completion_tokens: int
    kept_tokens: int
    prefill_s: float
    decode_s: float
    ttft_s: float


@dataclass(frozen=True)
class Failed:
    status: int
    message: str


@dataclass
class Job:
    """One sequence to generate. `deliver(event)` is called from the scheduler thread."""
    prompt_ids: list[int]
    sampler: Callable
    max_tokens: int
    stop: list[str]
    stop_on_eos: bool
    deliver: Callable[[Any], None]
    logprobs: int | None = None
    cancelled: bool = False            # set by the request's side when its client goes away
    submitted: float = field(default_factory=perf_counter)


class Penalized:
    """OpenAI's presence and frequency penalties in front of a sampler:
    logit[j] -= frequency * count[j] + presence * (count[j] > 0), counting the ids generated
    so far (not the prompt's)."""

    def __init__(self, sampler, presence: float, frequency: float, n_prompt: int):
        self.sampler, self.presence, self.frequency, self.n_prompt = sampler, presence, frequency, n_prompt

    def __call__(self, logits, history=()):
        gen = history[self.n_prompt:]
        if gen:
            counts = np.bincount(np.asarray(gen, np.int64), minlength=logits.shape[0])[:logits.shape[0]]
            logits = (np.asarray(logits, np.float32) - np.float32(self.frequency) * counts.astype(np.float32)
                      - np.float32(self.presence) * (counts > 0).astype(np.float32))
        return self.sampler(logits, history)


def choice_sampler(gp, j: int, n_prompt: int):
    """Choice j's sampler for a request's GenParams (seed + j; the penalties if asked)."""
    sampler = make_sampler(**gp.sampling, seed=gp.choice_seed(j))
    if gp.presence_penalty or gp.frequency_penalty:
        sampler = Penalized(sampler, gp.presence_penalty, gp.frequency_penalty, n_prompt)
    return sampler


def logprob_entry(logits: np.ndarray, token: int, top: int) -> tuple:
    """log-softmax (float64) of the logits the token was sampled from: the chosen id's value
    and the `top` most likely ids (lower id first on ties)."""
    x = np.asarray(logits, np.float64)
    m = x.max()
    lp = x - (m + np.log(np.exp(x - m).sum()))
    alts = []
    if top > 0:
        k = min(top, lp.size)
        idx = np.argpartition(-lp, k - 1)[:k]
        idx = sorted(idx.tolist(), key=lambda i: (-lp[i], i))
        alts = [(int(i), float(lp[i])) for i in idx]
    return int(token), float(lp[token]), alts


class _Seq:
    """A running job: its session, stream and timings."""

    def __init__(self, job: Job, session, stream: engine._Stream, eos: int | None):
        self.job, self.session, self.stream, self.eos = job, session, stream, eos
        self.t0 = perf_counter()
        self.prefill_s = self.decode_s = self.ttft_s = 0.0


class Scheduler:
    def __init__(self, model, tokenizer, parallel: int = 4, queue: int = 64):
        self.model, self.tok = model, tokenizer
        self.parallel, self.queue_depth = parallel, queue
        self.cv = threading.Condition()
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[_Seq] = []
        self.n_running = 0
        self.pool: list = []                  # idle sessions, reset before reuse
        self.stopping = False
        # counters for /metrics (written by the scheduler thread only)
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self.decode_steps_total = 0
        self.decode_seconds_total = 0.0
        self.prefill_seconds_total = 0.0
        self.recent: collections.deque = collections.deque()     # (monotonic time, tokens) of the last 10 s
        self.t_row: float | None = None       # seconds per row of one-row decodes (moving average)
        self.t_batch: dict = {}               # batch size -> (seconds per decode_batch step, _)
        self.batched_steps_total = 0
        self.thread = threading.Thread(target=self._run, name="grokcpu-scheduler", daemon=True)
        self.thread.start()

    # -- the request side (event-loop thread) ---------------------------------------------------
    def submit(self, jobs: list[Job]) -> None:
        """Queue the jobs (all or none); QueueFull when there is no room for them."""
        with self.cv:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            room = self.queue_depth + max(0, self.parallel - self.n_running) - len(self.waiting)
            if len(jobs) > room:
                raise QueueFull(f"{self.n_running} sequences run and {len(self.waiting)} wait; no room for "
                                f"{len(jobs)} more")
            self.waiting.extend(jobs)
            self.cv.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """The client went away: the jobs leave the batch at the next step (or never start)."""
        with self.cv:
            for j in jobs:
                j.cancelled = True
            self.cv.notify()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last 10 s."""
        now = monotonic()
        recent = list(self.recent)
        n = sum(k for t, k in recent if now - t <= 10.0)
        return n / 10.0

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(timeout=30)

    # -- the scheduler thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.stopping and not self.waiting and not self.running:
                    self.cv.wait()
                if self.stopping:
                    for j in list(self.waiting) + [s.job for s in self.running]:
                        j.deliver(Failed(503, "the server is shutting down"))
                    self.waiting.clear()
                    return
                admit = []
                while self.waiting and len(self.running) + len(admit) < self.parallel:
                    admit.append(self.waiting.popleft())
                self.n_running = len(self.running) + len(admit)
            try:
                for job in admit:
                    if not job.cancelled:
                        self._start(job)
                self.running = [s for s in self.running if not self._drop_if_cancelled(s)]
                if self.running:
                    self._step()
            except Exception as e:      # noqa: BLE001 - a bug (in sampling, ...): fail the batch, keep serving
                for s in self.running:
                    s.session.reset()
                    self._release(s)
                    s.job.deliver(Failed(500, f"internal error: {type(e).__name__}: {e}"))
                self.running = []
            with self.cv:
                self.n_running = len(self.running)

    def _session(self):
        if self.pool:
            s = self.pool.pop()
            s.reset()
            return s
        return self.model.new_session()

    def _release(self, seq: _Seq) -> None:
        self.pool.append(seq.session)

    def _drop_if_cancelled(self, seq: _Seq) -> bool:
        if seq.job.cancelled:
            self._release(seq)
            return True
        return False

    def _start(self, job: Job) -> None:
        try:
            session = self._session()
        except Exception as e:          # noqa: BLE001 - out of memory for a KV cache, ...
            job.deliver(Failed(503, f"cannot start a sequence: {e}"))
            return
        eos = int(self.model.config.eos_token) if job.stop_on_eos else None
        try:
            st = engine._Stream(self.tok, job.sampler, job.max_tokens, job.stop, eos, list(job.prompt_ids))
            seq = _Seq(job, session, st, eos)
            logits = session.prefill(job.prompt_ids, logits="last")
        except GrokError as e:
            self.pool.append(session)
            job.deliver(Failed(400, str(e)))
            return
        except Exception as e:          # noqa: BLE001 - a bug: this request fails, the server stays up
            session.reset()
            self.pool.append(session)
            job.deliver(Failed(500, f"internal error during prefill: {type(e).__name__}: {e}"))
            return
        seq.prefill_s = perf_counter() - seq.t0
        self.prefill_seconds_total += seq.prefill_s
        self.prompt_tokens_total += len(job.prompt_ids)
        try:
            self._accept(seq, logits)
        except Exception as e:          # noqa: BLE001 - as above
            session.reset()
            self.pool.append(session)
            job.deliver(Failed(500, f"internal error while sampling: {type(e).__name__}: {e}"))
            return
        if seq.stream.finish is None:
            self.running.append(seq)

    def _step(self) -> None:
        seqs = self.running
        toks = [s.stream.tokens[-1] for s in seqs]
        t = perf_counter()
        B = len(seqs)
        batched = B > 1 and self._batch_pays(B)
        try:
            if batched:
                rows = decode_batch([s.session for s in seqs], toks)
            else:
                rows = [s.session.decode(k) for s, k in zip(seqs, toks)]
        except Exception as e:          # noqa: BLE001 - fail this step's requests, keep serving
            for s in seqs:
                s.session.reset()
                self._release(s)
                s.job.deliver(Failed(500, f"internal error during decode: {type(e).__name__}: {e}"))
            self.running = []
            return
        dt = perf_counter() - t
        self._note_step_time(B, batched, dt)
        self.decode_steps_total += 1
        self.batched_steps_total += batched
        self.decode_seconds_total += dt
        for s, logits in zip(seqs, rows):
            s.decode_s += dt
            self._accept(s, logits)
        self.running = [s for s in seqs if s.stream.finish is None]

    # decode_batch reads each weight once for all rows, but its many-row kernels cost more per
    # row than a one-row decode; which wins depends on the model and the machine. So the
    # scheduler times both (moving averages: per row for one-row decodes, per step for each
    # batch size) and batches only where it was faster, retrying it every 64 steps.
    def _batch_pays(self, B: int) -> bool:
        tb = self.t_batch.get(B)
        if tb is None or self.t_row is None or self.decode_steps_total % 64 == 0:
            return True
        return tb[0] <= B * self.t_row

    def _note_step_time(self, B: int, batched: bool, dt: float) -> None:
        if batched:
            old = self.t_batch.get(B)
            self.t_batch[B] = (dt if old is None else 0.8 * old[0] + 0.2 * dt, 0)
        else:
            per_row = dt / B
            self.t_row = per_row if self.t_row is None else 0.8 * self.t_row + 0.2 * per_row

    def _accept(self, seq: _Seq, logits: np.ndarray) -> None:
        """Sample one token for seq, deliver its text; on finish deliver Done and free the slot."""
        st, job = seq.stream, seq.job
        steps = st.accept(logits)
        tok = st.tokens[-1]
        if len(st.tokens) == 1:
            seq.ttft_s = perf_counter() - job.submitted
        if st.finish is None and seq.session.pos >= self.model.context:
            steps += st.end("length")
        self.generated_tokens_total += 1
        now = monotonic()
        self.recent.append((now, 1))
        while self.recent and now - self.recent[0][0] > 10.0:
            self.recent.popleft()
        lp = None
        if job.logprobs is not None and not (tok == seq.eos):
            lp = logprob_entry(logits, tok, job.logprobs)
        for step in steps:
            job.deliver(Token(step.text, step.token, lp if step.token is not None else None))
        if st.finish is not None:
            self._release(seq)
            job.deliver(Done(st.finish, st.text, len(job.prompt_ids), len(st.tokens), st.kept,
                             seq.prefill_s, seq.decode_s, seq.ttft_s))
