"""grok-cli batch: complete many prompts from JSON lines; resumable; one bad line never stops it."""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .. import engine
from ..errors import GrokError
from ..sampling import settings as check_settings
from ..server.protocol import ApiError
from .app import Loaded, Run, command, err, interrupted, print_stats, sampler

REQUEST_FIELDS = {"temperature": (int, float), "top_k": (int,), "top_p": (int, float), "min_p": (int, float),
                  "repeat_penalty": (int, float), "repeat_last_n": (int,), "seed": (int,), "max_tokens": (int,),
                  "stop": (str, list), "ignore_eos": (bool,)}
FIELDS = ("id", "prompt", *REQUEST_FIELDS)


@command(sampling=True)
def batch(
    run: Run,
    input: Annotated[Path, typer.Option("--input", "-i", help="prompts, one JSON object per line: {\"id\":..., \"prompt\":...} or OpenAI's batch lines ('-' = stdin)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="results, one JSON object per line (appended; rerun to resume; '-' = stdout)")],
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="sequences decoded together")] = 8,
    ray: Annotated[Optional[str], typer.Option("--ray", metavar="[ADDRESS]", show_default=False,
                   help="run on a Ray cluster (ray start ... on each node; the model at the same path on every "
                        "node); no ADDRESS: the cluster on this machine, else a local Ray instance")] = None,
    ray_actors: Annotated[Optional[int], typer.Option("--ray-actors", show_default=False,
                          help="Ray workers, each with its own copy of the model (default: one per node)")] = None,
):
    """Complete many prompts; resumable.

    Input lines: OpenAI's batch format ({"custom_id", "method": "POST", "url": "/v1/completions" or
    "/v1/chat/completions", "body"}: output lines as OpenAI's, bodies as `grok-cli serve` answers)
    or {"id": ..., "prompt": ..., optional "temperature", "top_k", "top_p", "min_p",
    "repeat_penalty", "repeat_last_n", "seed", "max_tokens", "stop", "ignore_eos"}; an id is a
    string or an integer. Output lines: {"id", "text", "finish_reason", token counts, timings,
    "line"} or, for a line that cannot run, {"id", "error", "line"}: a bad line never stops the
    batch. Each result is appended as one complete line and synced to disk; rerunning with the
    same --output skips what is already there (with -o -, results go to stdout and nothing is
    resumed). With --seed, each prompt's seed is derived from it and the prompt's id, so results
    do not depend on batching, resuming or the Ray worker that ran them.
    """
    engine.check_batch_size(batch_size)
    if ray is None and ray_actors is not None:
        raise GrokError("--ray-actors needs --ray", hint="add --ray [ADDRESS], or leave --ray-actors out")
    if ray is not None:
        from .ray_batch import check_ray
        check_ray(run, ray_actors)
    lines = read_input(input)
    to_stdout = str(output) == "-"
    if not to_stdout and str(input) != "-" and output.exists() and output.resolve() == input.resolve():
        raise GrokError("--output is the same file as --input", hint="write the results to another file")
    fmt = detect_format(lines, run)
    done_ids, done_lines = (set(), set()) if to_stdout else resume_state(output, fmt)
    args = (run, fmt, lines, None if to_stdout else output, done_ids, done_lines, batch_size)
    if ray is not None:
        from .ray_batch import RayBatchRun
        RayBatchRun(*args, address=ray or None, actors=ray_actors).run()
    else:
        LocalBatchRun(Loaded(run), *args).run()


def read_input(path: Path) -> list[bytes]:
    """The input's lines as bytes (each decoded on its own, so one bad line stays one error)."""
    try:
        data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as e:
        raise GrokError(f"cannot read --input {str(path)!r}: {e.strerror or e}") from None
    return [line.rstrip(b"\r") for line in data.split(b"\n")] if data else []


def detect_format(lines: list[bytes], run: Run):
    """The file's format, from its first non-blank line: OpenAI's batch lines or ours."""
    from .batch_openai import OpenAIFormat, is_openai
    for raw in lines:
        if raw.strip():
            try:
                first = json.loads(raw)
            except (ValueError, RecursionError):
                break
            if is_openai(first):
                return OpenAIFormat(run)
            break
    return GrokFormat()


def resume_state(path: Path, fmt) -> tuple[set, set]:
    """Keys (ids) already answered and line marks already reported as errors; drops a torn last line."""
    if not path.exists():
        return set(), set()
    try:
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
            err(f"note: dropped a partial last line of {path} (an interrupted run)")
            data = data[:keep]
    except OSError as e:
        raise GrokError(f"cannot read --output {str(path)!r}: {e.strerror or e}") from None
    done_ids, done_lines = set(), set()
    for raw in data.splitlines():
        try:
            rec = json.loads(raw)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict):
            fmt.resume(rec, done_ids, done_lines)
    return done_ids, done_lines


def valid_id(id_) -> bool:
    if isinstance(id_, bool):
        return False
    if isinstance(id_, int):
        return True
    if isinstance(id_, str):
        try:
            id_.encode("utf-8")
            return True
        except UnicodeEncodeError:
            return False
    return False


def key(id_) -> str:
    return json.dumps(id_, sort_keys=True)


def line_seed(seed: int, id_) -> int:
    """A line's seed from --seed and its id: results do not depend on order, batching or resuming."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key(id_)}".encode()).digest()[:8], "little")


def encode_record(rec: dict) -> bytes:
    """One output line: valid JSON (never NaN/Infinity), UTF-8; text that is not valid Unicode
    is written with \\u escapes."""
    try:
        return (json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(rec, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")


def check_record(rec) -> str | None:
    """What is wrong with one parsed input line, or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    for k in rec:
        if k not in FIELDS:
            near = difflib.get_close_matches(k, FIELDS, n=1)
            hint = f" (hint: did you mean \"{near[0]}\"?)" if near else f" (hint: fields are {', '.join(FIELDS)})"
            return f"unknown field {json.dumps(k)}{hint}"
    if "id" not in rec:
        return "no \"id\""
    id_ = rec["id"]
    if not valid_id(id_):
        if isinstance(id_, float) and not math.isfinite(id_):
            return "\"id\" is not a finite number; use a string or an integer"
        if isinstance(id_, str):
            return "\"id\" is not valid Unicode (a lone surrogate)"
        return "\"id\" must be a string or an integer"
    if not isinstance(rec.get("prompt"), str):
        return "no \"prompt\" string"
    for k, types in REQUEST_FIELDS.items():
        if k in rec:
            v = rec[k]
            if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
                return f"\"{k}\" has a bad value {json.dumps(v, ensure_ascii=True)[:60]}"
            if k == "stop" and isinstance(v, list) and not all(isinstance(x, str) for x in v):
                return "\"stop\" must be a string or a list of strings"
    return None


def parse_json(raw: bytes, n: int):
    """(value, problem): one line's JSON, or what stops it from being read."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"line {n} is not UTF-8 text"
    try:
        rec = json.loads(text)
    except RecursionError:
        return None, f"line {n} is nested too deeply"
    except ValueError as e:
        return None, f"line {n} is not valid JSON: {e}"
    return rec, None


LINE_ERRORS = (GrokError, ApiError, ArithmeticError, ValueError, TypeError, RecursionError, UnicodeError)


def line_problem(e: Exception, line: int) -> str:
    """The error record's message for a line whose request cannot be built (one of LINE_ERRORS)."""
    return str(e) if isinstance(e, (GrokError, ApiError)) else f"line {line} cannot run: {type(e).__name__}: {e}"


def error_record(id_, message: str, line: int) -> dict:
    return {"id": id_ if valid_id(id_) else None, "error": message, "line": line}


class GrokFormat:
    """Our own lines: {"id", "prompt", ...} in, {"id", "text", ...} or {"id", "error", "line"} out."""
    name = "grok-cli"

    def parse(self, raw: bytes, n: int):
        """(entry, key, problem): the line for `job`, its id's key, what is wrong (None: nothing)."""
        rec, problem = parse_json(raw, n)
        if problem is None:
            from .batch_openai import is_openai
            problem = (f"line {n} is an OpenAI batch line but this file's first line is grok-cli's format: "
                       "use one format per file") if is_openai(rec) else check_record(rec)
        id_ = rec.get("id") if isinstance(rec, dict) else None
        return rec, key(id_), problem

    def duplicate(self, rec, n: int) -> str:
        return f"duplicate id {rec['id']!r} (line {n})"

    def mark(self, n: int, raw: bytes):
        return n

    def error(self, rec, problem, n: int, raw: bytes) -> dict:
        id_ = rec.get("id") if isinstance(rec, dict) else None
        return error_record(id_, problem if isinstance(problem, str) else line_problem(problem, n), n)

    def job(self, rec: dict, n: int, raw: bytes, run: Run) -> "Job":
        return Job.make(rec, n, run)

    def resume(self, rec: dict, done_ids: set, done_lines: set) -> None:
        if "error" in rec:
            if isinstance(rec.get("line"), int):
                done_lines.add(rec["line"])
        elif valid_id(rec.get("id")):
            done_ids.add(key(rec["id"]))

    def tally(self, rec: dict) -> tuple[bool, int, bool]:
        """(an error?, tokens generated, stopped by a full context?) of one output record."""
        if "error" in rec:
            return True, 0, False
        return False, rec["generated_tokens"], rec.get("context_full", False)


@dataclass(frozen=True)
class Job:
    """One input line, checked, with the command's options applied: plain data that a worker in
    another process turns into an engine.Request with its own tokenizer."""
    id: Any
    line: int
    prompt: str
    settings: dict        # sampling.settings(...), with max_tokens and the per-prompt seed
    stop: tuple
    stop_on_eos: bool

    @classmethod
    def make(cls, rec: dict, line: int, run: Run) -> "Job":
        s = dict(run.settings)
        for k in REQUEST_FIELDS:
            if k in rec and k not in ("stop", "ignore_eos"):
                s[k] = rec[k]
        if "seed" not in rec and s["seed"] is not None:     # one stream per id, independent of order
            s["seed"] = line_seed(s["seed"], rec["id"])
        s = check_settings(**s)
        stop = rec.get("stop", run.stop)
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        return cls(rec["id"], line, rec["prompt"], s, stop, not rec.get("ignore_eos", not run.stop_on_eos))

    def requests(self, tok, model) -> list[engine.Request]:
        return [engine.Request(self.id, tok.encode(self.prompt), sampler(self.settings), self.settings["max_tokens"],
                               list(self.stop), self.stop_on_eos, tag=(self.line, 0))]

    def record(self, outcomes: list) -> dict:
        """The output record from generate_batch's outcome (Result or GrokError)."""
        (outcome,) = outcomes
        if isinstance(outcome, GrokError):
            return error_record(self.id, str(outcome), self.line)
        return {"id": self.id, "text": outcome.text, **outcome.summary(), "line": self.line}

    def error_record(self, e: Exception) -> dict:
        return error_record(self.id, line_problem(e, self.line), self.line)


def run_jobs(model, tok, jobs, batch_size: int, emit) -> None:
    """Run the jobs (an iterable that may yield None, as generate_batch's feed) with generate_batch;
    emit(job, record) once each job's requests are all done, or at once if they cannot be built."""
    pending: dict = {}                        # line -> [job, outcomes, still running]

    def feed():
        for job in jobs:
            if job is None:
                yield None
                continue
            try:
                reqs = job.requests(tok, model)
            except LINE_ERRORS as e:
                emit(job, job.error_record(e))
                continue
            pending[job.line] = [job, [None] * len(reqs), len(reqs)]
            yield from reqs

    for req, outcome in engine.generate_batch(model, tok, feed(), batch_size):
        line, i = req.tag
        p = pending[line]
        p[1][i] = outcome
        p[2] -= 1
        if not p[2]:
            del pending[line]
            emit(p[0], p[0].record(p[1]))


class BatchRun:
    """One batch command's output: plan the input lines (error records at once), run the rest
    (`execute`: LocalBatchRun here, RayBatchRun in ray_batch.py), progress bar and summary."""

    def __init__(self, run: Run, fmt, lines: list[bytes], output: Path | None, done_ids, done_lines,
                 batch_size: int):
        self.run_opts, self.fmt, self.lines, self.output = run, fmt, lines, output
        self.done_ids, self.done_lines = done_ids, done_lines
        self.batch_size = batch_size
        self.written = self.errors = self.tokens = self.full = 0
        self.t0 = time.perf_counter()
        self.last_bar = 0.0
        self.tty = sys.stderr.isatty()
        self.total = 0
        self.where = "stdout" if output is None else str(output)
        self.context: int | None = None          # the model's, once known (for the context-full note)
        self.how = f"up to {batch_size} at once"

    def run(self) -> None:
        self.fd = None
        if self.output is not None:
            try:
                self.fd = os.open(self.output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as e:
                raise GrokError(f"cannot write --output {str(self.output)!r}: {e.strerror or e}") from None
        try:
            todo, skipped = self.plan()
            self.total = len(todo) + self.written
            err(f"batch: {len(self.lines)} input lines ({self.fmt.name} format), {skipped} already done, "
                f"{len(todo)} to run ({self.how})")
            if todo:
                self.ready()
            self.t0 = time.perf_counter()
            self.bar()
            if todo:
                self.execute(todo)
            self.bar(final=True)
        except KeyboardInterrupt:
            resume = "" if self.output is None else "; rerun the same command to resume"
            interrupted(f"interrupted: {self.written} records are safely in {self.where}{resume}")
        except OSError as e:
            raise GrokError(f"cannot write --output {self.where!r}: {e.strerror or e}") from None
        finally:
            if self.fd is not None:
                os.close(self.fd)
        if self.full:
            err(f"note: {self.full} prompt(s) stopped early because the context ({self.context} tokens) "
                "was full (\"context_full\": true; pass a larger --context)")
        err(f"batch: wrote {self.written} records to {self.where} ({self.errors} errors); "
            f"{self.tokens} tokens in {time.perf_counter() - self.t0:.1f} s")
        if self.run_opts.stats:
            self.print_stats()

    def ready(self) -> None:
        """Before the clock starts: the model loaded and its kernels warm."""
        raise NotImplementedError

    def execute(self, todo: list) -> None:
        raise NotImplementedError

    def print_stats(self) -> None:
        raise NotImplementedError

    def plan(self):
        """Input lines -> the jobs still to run; error records for bad lines are written now."""
        todo, seen, skipped, fmt = [], set(), 0, self.fmt
        for n, raw in enumerate(self.lines, 1):
            if not raw.strip():
                continue
            mark, entry = fmt.mark(n, raw), None
            try:
                entry, k, problem = fmt.parse(raw, n)
                if problem is None and k in seen:
                    problem = fmt.duplicate(entry, n)
                if problem is not None:
                    if mark in self.done_lines:
                        skipped += 1
                    else:
                        self.record(fmt.error(entry, problem, n, raw))
                    continue
                seen.add(k)
                if k in self.done_ids or mark in self.done_lines:
                    skipped += 1
                    continue
                todo.append(fmt.job(entry, n, raw, self.run_opts))
            except LINE_ERRORS as e:
                if self.run_opts.debug and not isinstance(e, (GrokError, ApiError)):   # a line no check foresaw
                    traceback.print_exc()
                self.record(fmt.error(entry, e, n, raw))
        return todo, skipped

    def record(self, rec: dict) -> None:
        """Write one output record and count it."""
        self.write(rec)
        error, tokens, full = self.fmt.tally(rec)
        self.errors += error
        self.tokens += tokens
        self.full += full

    def write(self, rec: dict) -> None:
        data = encode_record(rec)
        if self.fd is None:
            sys.stdout.write(data.decode("utf-8"))
            sys.stdout.flush()
        else:
            view = memoryview(data)
            while view:                    # one write for a regular file; loop only if the OS splits it
                n = os.write(self.fd, view)
                view = view[n:]
            os.fsync(self.fd)
        self.written += 1

    def bar_extra(self, dt: float) -> str:
        return ""

    def bar(self, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.total:
            return
        if not final and (now - self.last_bar < (0.2 if self.tty else 5.0) or self.written >= self.total):
            return
        self.last_bar = now
        done, total = self.written, max(self.total, 1)
        width = 24
        fill = int(width * done / total)
        dt = max(now - self.t0, 1e-9)
        line = (f"[{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} records, {self.errors} errors, "
                f"{self.tokens} tokens, {self.tokens / dt:.1f} tok/s{self.bar_extra(dt)}")
        if self.tty:
            err("\r" + line + "\x1b[K", end="\n" if final else "")
        elif final or done:
            err(line)


class LocalBatchRun(BatchRun):
    """The batch on this machine: one model, generate_batch over every prompt."""

    def __init__(self, L: Loaded, *args):
        super().__init__(*args)
        self.L = L
        self.context = L.model.context

    def ready(self) -> None:
        self.L.warm(batch=True)

    def execute(self, todo: list) -> None:
        def emit(job, rec):
            self.record(rec)
            self.bar()
        run_jobs(self.L.model, self.L.tok, todo, self.batch_size, emit)

    def print_stats(self) -> None:
        print_stats(None, self.L.model)
