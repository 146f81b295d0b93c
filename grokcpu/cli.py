"""grok-cli: chat, generate, batch, info and bench. The only module that prints or exits.

Generated text goes to stdout and nothing else does; notes, progress, timings (--stats) and
errors go to stderr. A mistake the user can fix prints one line, `error: ... (hint: ...)`, and
exits with status 1 (--debug adds the traceback). Ctrl-C exits with 130, except in chat, where
it stops the current answer and keeps the conversation.

Without --model every command runs the built-in demo model (random weights; see demo.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
import hashlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import engine
from .errors import GrokError
from .sampling import check_settings, make_sampler

app = typer.Typer(name="grok-cli", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run xAI's Grok-1 on the CPU. Without --model, a tiny random-weight demo model is used.")

# -- options shared by the commands ---------------------------------------------------------------
ModelOpt = Annotated[Optional[Path], typer.Option(
    "--model", "-m", help="checkpoint folder (holding ckpt-0/) or ckpt-0/ itself (default: the built-in demo)",
    show_default=False)]
TokenizerOpt = Annotated[Optional[Path], typer.Option(
    "--tokenizer", help="tokenizer.model (default: the one beside the checkpoint)", show_default=False)]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", "-t", help="compute threads (default: physical cores)",
                                                   show_default=False)]
ContextOpt = Annotated[Optional[int], typer.Option("--context", "-c", help="KV cache length in tokens (default: the model's sequence_len)",
                                                   show_default=False)]
CacheGbOpt = Annotated[str, typer.Option("--expert-cache-gb", help="RAM for cached experts, in GB, or 'auto'")]
PolicyOpt = Annotated[str, typer.Option("--expert-cache-policy", help="expert eviction policy (lru, lfu)")]
PrefetchOpt = Annotated[bool, typer.Option("--prefetch/--no-prefetch", help="read the next layer's likely experts ahead (off by default: it lost on the models measured)")]
StatsOpt = Annotated[bool, typer.Option("--stats", help="timings and model statistics on stderr")]
PinOpt = Annotated[Optional[str], typer.Option("--pin-experts", help="keep experts resident: LAYER:EXPERT,... or TRACE.jsonl:N (the N most used)")]
TraceOpt = Annotated[Optional[str], typer.Option("--routing-trace", help="append the routing (pos, layer, experts) to this JSONL file; replay it with tools/cache_replay.py")]
UnembedOpt = Annotated[str, typer.Option("--unembed", help="output layer precision: f32 (exact) or int8 (per-row scales, 4x fewer bytes per token)")]
OffloadOpt = Annotated[str, typer.Option("--offload", help="none, or dense: attention/norms/router/embeddings on a CUDA GPU, experts on the CPU")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show the full traceback of errors")]

# sampling: llama.cpp's names and defaults
TempOpt = Annotated[float, typer.Option("--temperature", "--temp", help="0 = greedy")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="keep the k most likely tokens (0 = off)")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="nucleus: the reference's rule (1 = off)")]
MinPOpt = Annotated[float, typer.Option("--min-p", help="keep p >= min_p * p_max (0 = off)")]
RepeatOpt = Annotated[float, typer.Option("--repeat-penalty", help="penalty for recent tokens (1 = off)")]
RepeatNOpt = Annotated[int, typer.Option("--repeat-last-n", help="tokens the repeat penalty looks back (-1 = all)")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", "-s", help="random seed (default: a random one)", show_default=False)]
MaxTokOpt = Annotated[int, typer.Option("--max-tokens", "-n", help="most tokens to generate")]
StopOpt = Annotated[Optional[list[str]], typer.Option("--stop", help="stop when this text appears (repeatable)",
                                                      show_default=False)]
IgnoreEosOpt = Annotated[bool, typer.Option("--ignore-eos", help="do not stop at EOS (the reference runner's behaviour)")]

SAMPLING_DEFAULTS = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0,
                         repeat_last_n=64, max_tokens=256)


# -- output helpers -------------------------------------------------------------------------------
def out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def err(text: str, end: str = "\n") -> None:
    sys.stderr.write(text + end)
    sys.stderr.flush()


def gb(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    return f"{n / 1e3:.1f} kB"


@contextlib.contextmanager
def guard(debug: bool):
    """User mistakes -> one line on stderr and exit 1; Ctrl-C -> exit 130."""
    try:
        yield
    except GrokError as e:
        if debug:
            traceback.print_exc()
        err(f"error: {e}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        err("\ninterrupted")
        raise typer.Exit(130)


class Loaded:
    """A model and its tokenizer, opened from the command's options."""

    def __init__(self, model_path, tokenizer_path, threads, context, cache_gb, policy, prefetch,
                 extra: dict | None = None, need_tokenizer: bool = True):
        import grokcpu
        from .tokenizer import Tokenizer, find_tokenizer

        if threads is not None and threads < 1:
            raise GrokError(f"--threads {threads} is out of range", hint="use an integer >= 1")
        if context is not None and context < 1:
            raise GrokError(f"--context {context} is out of range", hint="use an integer >= 1")
        _check_policy(policy)
        self.demo = model_path is None
        self.path = _demo_path() if self.demo else Path(model_path)
        tok_file = None
        if need_tokenizer:
            try:
                tok_file = find_tokenizer(self.path, tokenizer_path)
            except GrokError:
                from .checkpoint import Checkpoint
                Checkpoint(self.path).close()     # a missing/broken checkpoint is the error to report
                raise
        self.tok = Tokenizer(tok_file) if tok_file is not None else None    # cheap: before the model
        extra = dict(extra or {})
        if extra.get("unembed", "f32") not in ("f32", "int8"):
            raise GrokError(f"--unembed {extra['unembed']!r} is not known", hint="use f32 or int8")
        if extra.get("offload", "none") not in ("none", "dense"):
            raise GrokError(f"--offload {extra['offload']!r} is not known", hint="use none or dense")
        if extra.get("pin_experts"):
            from .options import pin_list
            extra["pin_experts"] = pin_list(extra["pin_experts"])
        else:
            extra.pop("pin_experts", None)
        self.model = grokcpu.load(self.path, threads=threads, context=context,
                                  expert_cache_gb=_cache_gb(cache_gb), expert_cache_policy=policy,
                                  prefetch=prefetch, **extra)
        if self.tok is not None:
            self.tok.check_fits(self.model.config.vocab_size)


def _demo_path() -> Path:
    from . import demo
    err(demo.BANNER)
    path, built = demo.ensure_demo()
    if built:
        err(f"note: built the demo model (checkpoint + tokenizer) in {path}")
    return path


def _cache_gb(value: str):
    v = value.strip().lower()
    if v in ("auto", "off"):
        return v
    try:
        x = float(v)
    except ValueError:
        raise GrokError(f"--expert-cache-gb {value!r} is not a number", hint="give a size in GB, e.g. 64, 'auto', or 'off' (read experts from the memory map)") from None
    if not (x > 0 and x < float("inf")):
        raise GrokError(f"--expert-cache-gb {value!r} is out of range", hint="give a positive size in GB, or 'auto'")
    return x


def _check_policy(policy: str) -> None:
    try:
        from .expert_cache import POLICIES
    except ImportError:
        return
    if policy not in POLICIES:
        raise GrokError(f"--expert-cache-policy {policy!r} is not known", hint=f"use one of: {', '.join(POLICIES)}")


def _sampling(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, max_tokens) -> dict:
    s = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
             repeat_last_n=repeat_last_n, seed=None if seed is None or seed < 0 else seed, max_tokens=max_tokens)
    check_settings(**s)
    if max_tokens < 1:
        raise GrokError(f"--max-tokens {max_tokens} is out of range", hint="use an integer >= 1")
    return s


def _sampler(s: dict):
    return make_sampler(**{k: v for k, v in s.items() if k != "max_tokens"})


def _print_stats(res: engine.Result | None, model, extra: str = "") -> None:
    if res is not None:
        err(f"stats: prompt {res.prompt_tokens} tokens in {res.prefill_s:.3f} s ({res.prefill_tps:.1f} tok/s), "
            f"generated {res.generated_tokens} tokens in {res.decode_s:.3f} s ({res.decode_tps:.1f} tok/s), "
            f"first token after {res.ttft_s:.3f} s, finish: {res.finish_reason}{extra}")
    st = model.stats()
    ec = st.get("expert_cache")
    line = f"stats: threads {st.get('threads')}, checkpoint {gb(st.get('checkpoint_bytes', 0))}"
    if isinstance(ec, dict) and ec:
        line += (f", expert cache {ec.get('policy')} {gb(ec.get('budget_bytes', 0))}: hit rate "
                 f"{ec.get('hit_rate', 0):.1%} ({ec.get('lookups', 0)} lookups), read {gb(ec.get('bytes_read', 0))}, "
                 f"{ec.get('evictions', 0)} evictions")
    err(line)


# -- chat -----------------------------------------------------------------------------------------
CHAT_HELP = """commands:
  /help              this list
  /reset             forget the conversation
  /stats             context use, last answer's speed, expert cache
  /save FILE         write the conversation to FILE (JSON)
  /load FILE         continue a conversation saved with /save
  /set KEY VALUE     change a setting: temperature, top_k, top_p, min_p, repeat_penalty,
                     repeat_last_n, seed, max_tokens
  /exit              leave (or Ctrl-D)
Ctrl-C stops an answer; the conversation is kept."""

SET_KEYS = {"temperature": float, "temp": float, "top_k": int, "top_p": float, "min_p": float,
            "repeat_penalty": float, "repeat_last_n": int, "seed": int, "max_tokens": int, "n": int}


@app.command()
def chat(
    system: Annotated[str, typer.Option("--system", help="text above the conversation ('' = none)")] = engine.DEFAULT_SYSTEM,
    template: Annotated[str, typer.Option("--template", help="one turn; {user} is replaced by your message")] = engine.DEFAULT_TEMPLATE,
    temperature: TempOpt = 0.8, top_k: TopKOpt = 40, top_p: TopPOpt = 0.95, min_p: MinPOpt = 0.05,
    repeat_penalty: RepeatOpt = 1.0, repeat_last_n: RepeatNOpt = 64, seed: SeedOpt = None,
    max_tokens: MaxTokOpt = 256, stop: StopOpt = None, ignore_eos: IgnoreEosOpt = False,
    model: ModelOpt = None, tokenizer: TokenizerOpt = None, threads: ThreadsOpt = None, context: ContextOpt = None,
    expert_cache_gb: CacheGbOpt = "auto", expert_cache_policy: PolicyOpt = "lru", prefetch: PrefetchOpt = False,
    pin_experts: PinOpt = None, routing_trace: TraceOpt = None, unembed: UnembedOpt = "f32",
    offload: OffloadOpt = "none", stats: StatsOpt = False, debug: DebugOpt = False,
):
    """Talk with the model. One line per message; /help lists the commands.

    Grok-1 is a base model without a chat template; the conversation is written as a document:
    the --system text, then turns in --template form ("User: {user}\\nAssistant:"). An answer ends
    at EOS or when the model begins the next "User:" line. When the conversation outgrows the
    context, the oldest turns are dropped (a note on stderr says so).
    """
    with guard(debug):
        s = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, max_tokens)
        L = Loaded(model, tokenizer, threads, context, expert_cache_gb, expert_cache_policy, prefetch,
                   dict(pin_experts=pin_experts, routing_trace=routing_trace, unembed=unembed, offload=offload))
        conv = engine.Conversation(L.model, L.tok, system, template)
        _ChatLoop(L, conv, s, list(stop or ()), not ignore_eos, stats, debug).run()


class _ChatLoop:
    def __init__(self, L: Loaded, conv: engine.Conversation, settings: dict, stop: list[str],
                 stop_on_eos: bool, stats: bool, debug: bool):
        self.L, self.conv, self.settings = L, conv, settings
        self.sampler = _sampler(settings)
        self.stop, self.stop_on_eos, self.stats, self.debug = stop, stop_on_eos, stats, debug
        self.tty = sys.stdin.isatty()

    def run(self) -> None:
        reader = _TtyLines() if self.tty else None
        if self.tty:
            err(f"chat: context {self.L.model.context} tokens. /help lists commands, Ctrl-C stops an answer, "
                "Ctrl-D exits.")
        try:
            while True:
                try:
                    line = reader.readline("> ") if reader else sys.stdin.readline()
                except KeyboardInterrupt:          # at the prompt: drop the line, ask again
                    err("")
                    continue
                if not line:                       # EOF (Ctrl-D)
                    break
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                if line.startswith("/"):
                    if self.command(line) == "exit":
                        break
                    continue
                self.answer(line)
        finally:
            if reader:
                reader.close()
                err("")

    def answer(self, message: str) -> None:
        started = False
        res = None
        try:
            for ev in self.conv.reply(message, self.sampler, self.settings["max_tokens"], self.stop, self.stop_on_eos):
                if isinstance(ev, engine.Notice):
                    err(f"note: {ev.message}")
                elif isinstance(ev, engine.Result):
                    res = ev
                else:
                    text = ev.text
                    if not started:
                        text = text.lstrip()
                        started = bool(text)
                    out(text)
            out("\n")
        except KeyboardInterrupt:
            out("\n")
            err("[answer stopped; the conversation is kept]")
        except GrokError as e:
            if self.debug:
                traceback.print_exc()
            err(f"error: {e}")
        if self.stats and res is not None:
            _print_stats(res, self.L.model, f", context {self.conv.session.pos}/{self.L.model.context}")

    def command(self, line: str) -> str | None:
        parts = line.split(maxsplit=2)
        cmd, args = parts[0].lower(), parts[1:]
        try:
            if cmd in ("/exit", "/quit"):
                return "exit"
            if cmd == "/help":
                err(CHAT_HELP)
            elif cmd == "/reset":
                self.conv.reset()
                err("conversation cleared")
            elif cmd == "/stats":
                self.show_stats()
            elif cmd in ("/save", "/load"):
                rest = line.split(maxsplit=1)
                if len(rest) < 2:
                    raise GrokError(f"{cmd} needs a file name", hint=f"{cmd} FILE")
                path = rest[1].strip()
                if cmd == "/save":
                    self.conv.save(path)
                    err(f"saved {len(self.conv.turns)} turns to {path}")
                else:
                    self.conv.load(path)
                    err(f"loaded {len(self.conv.turns)} turns from {path}")
            elif cmd == "/set":
                self.set(args)
            else:
                raise GrokError(f"unknown command {cmd}", hint="/help lists the commands")
        except GrokError as e:
            err(f"error: {e}")
        return None

    def set(self, args: list[str]) -> None:
        if len(args) != 2:
            raise GrokError("/set needs a key and a value", hint="for example /set temperature 0.2")
        key, raw = args[0].lower().replace("-", "_"), args[1].strip()
        if key not in SET_KEYS:
            raise GrokError(f"/set: unknown key {args[0]!r}", hint=f"keys: {', '.join(k for k in SET_KEYS if k not in ('temp', 'n'))}")
        key = {"temp": "temperature", "n": "max_tokens"}.get(key, key)
        try:
            value = SET_KEYS[key](raw)
        except ValueError:
            raise GrokError(f"/set {key}: {raw!r} is not a valid {SET_KEYS[key].__name__}") from None
        new = dict(self.settings, **{key: value})
        new = _sampling(**new)
        self.settings = new
        self.sampler = _sampler(new)
        err(f"{key} = {value}")

    def show_stats(self) -> None:
        c = self.conv
        err(f"conversation: {len(c.turns)} turns, {c.session.pos} of {self.L.model.context} context tokens in the cache")
        err("settings: " + ", ".join(f"{k} {v}" for k, v in self.settings.items()))
        _print_stats(c.last, self.L.model)


# -- generate -------------------------------------------------------------------------------------
@app.command()
def generate(
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="the text to continue", show_default=False)] = None,
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", "-f", help="read the prompt from a file ('-' = stdin)",
                                                        show_default=False)] = None,
    temperature: TempOpt = 0.8, top_k: TopKOpt = 40, top_p: TopPOpt = 0.95, min_p: MinPOpt = 0.05,
    repeat_penalty: RepeatOpt = 1.0, repeat_last_n: RepeatNOpt = 64, seed: SeedOpt = None,
    max_tokens: MaxTokOpt = 256, stop: StopOpt = None, ignore_eos: IgnoreEosOpt = False,
    model: ModelOpt = None, tokenizer: TokenizerOpt = None, threads: ThreadsOpt = None, context: ContextOpt = None,
    expert_cache_gb: CacheGbOpt = "auto", expert_cache_policy: PolicyOpt = "lru", prefetch: PrefetchOpt = False,
    pin_experts: PinOpt = None, routing_trace: TraceOpt = None, unembed: UnembedOpt = "f32",
    offload: OffloadOpt = "none", stats: StatsOpt = False, debug: DebugOpt = False,
):
    """Continue a prompt; the completion streams to stdout (followed by one newline)."""
    with guard(debug):
        text = _read_prompt(prompt, prompt_file)
        s = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, max_tokens)
        L = Loaded(model, tokenizer, threads, context, expert_cache_gb, expert_cache_policy, prefetch,
                   dict(pin_experts=pin_experts, routing_trace=routing_trace, unembed=unembed, offload=offload))
        ids = L.tok.encode(text)
        res, started = None, False
        try:
            for ev in engine.generate(L.model, L.tok, ids, _sampler(s), s["max_tokens"], stop or (),
                                      stop_on_eos=not ignore_eos):
                started = True
                if isinstance(ev, engine.Result):
                    res = ev
                else:
                    out(ev.text)
        finally:
            if started:
                out("\n")
        if stats:
            _print_stats(res, L.model)


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise GrokError("give exactly one of --prompt TEXT and --prompt-file FILE")
    if prompt is not None:
        return prompt
    if str(prompt_file) == "-":
        return sys.stdin.read()
    try:
        return prompt_file.read_text(encoding="utf-8")
    except OSError as e:
        raise GrokError(f"cannot read --prompt-file {str(prompt_file)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise GrokError(f"--prompt-file {str(prompt_file)!r} is not UTF-8 text") from None


class _TtyLines:
    """Lines from a terminal, in its cooked mode, that Ctrl-C always interrupts.

    input()/readline block in select() on stdin and only notice SIGINT when the kernel delivers
    it to the main thread; the engine's worker threads (numba, BLAS, expert I/O) can receive it
    instead, and the prompt would then hang. Here select() also watches the signal wakeup fd,
    which Python's C-level handler writes in whatever thread the signal lands, so the main
    thread always wakes and raises KeyboardInterrupt. Line editing is the terminal's own
    (backspace, Ctrl-U, Ctrl-W); there is no history.
    """

    def __init__(self):
        import signal
        self.signal = signal
        self.fd = sys.stdin.fileno()
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)
        self.old = signal.set_wakeup_fd(self.w, warn_on_full_buffer=False)
        self.pending = b""

    def readline(self, prompt: str) -> str:
        """One line with its newline; "" at end of input (Ctrl-D on an empty line)."""
        import select
        err(prompt, end="")                       # stderr: stdout carries only the answers
        self.pending = b""
        try:
            while b"\n" not in self.pending:
                ready, _, _ = select.select([self.fd, self.r], [], [])
                if self.r in ready:                # a signal arrived (its handler runs next)
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.r, 4096)
                    continue
                data = os.read(self.fd, 4096)
                if not data:
                    return self.pending.decode("utf-8", "replace")
                self.pending += data
        except KeyboardInterrupt:
            self.pending = b""
            raise
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode("utf-8", "replace") + "\n"

    def close(self) -> None:
        self.signal.set_wakeup_fd(self.old)
        os.close(self.r)
        os.close(self.w)


# -- batch ----------------------------------------------------------------------------------------
REQUEST_FIELDS = {"temperature": (int, float), "top_k": (int,), "top_p": (int, float), "min_p": (int, float),
                  "repeat_penalty": (int, float), "repeat_last_n": (int,), "seed": (int,), "max_tokens": (int,),
                  "stop": (str, list), "ignore_eos": (bool,)}


@app.command()
def batch(
    input: Annotated[Path, typer.Option("--input", "-i", help="prompts, one JSON object per line: {\"id\":..., \"prompt\":...}")],
    output: Annotated[Path, typer.Option("--output", "-o", help="results, one JSON object per line (appended; rerun to resume)")],
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="sequences decoded together")] = 8,
    temperature: TempOpt = 0.8, top_k: TopKOpt = 40, top_p: TopPOpt = 0.95, min_p: MinPOpt = 0.05,
    repeat_penalty: RepeatOpt = 1.0, repeat_last_n: RepeatNOpt = 64, seed: SeedOpt = None,
    max_tokens: MaxTokOpt = 256, stop: StopOpt = None, ignore_eos: IgnoreEosOpt = False,
    model: ModelOpt = None, tokenizer: TokenizerOpt = None, threads: ThreadsOpt = None, context: ContextOpt = None,
    expert_cache_gb: CacheGbOpt = "auto", expert_cache_policy: PolicyOpt = "lru", prefetch: PrefetchOpt = False,
    pin_experts: PinOpt = None, routing_trace: TraceOpt = None, unembed: UnembedOpt = "f32",
    offload: OffloadOpt = "none", stats: StatsOpt = False, debug: DebugOpt = False,
):
    """Complete many prompts; resumable.

    Input lines: {"id": ..., "prompt": ..., optional "temperature", "top_k", "top_p", "min_p",
    "repeat_penalty", "repeat_last_n", "seed", "max_tokens", "stop", "ignore_eos"}. Output lines:
    {"id", "text", "finish_reason", token counts, timings, "line"} or {"id", "error", "line"}.
    Each result is appended as one complete line and synced to disk; rerunning with the same
    --output skips what is already there. With --seed, each prompt's seed is derived from it and
    the prompt's id, so results do not depend on batching or resuming.
    """
    with guard(debug):
        s = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, max_tokens)
        if batch_size < 1:
            raise GrokError(f"--batch-size {batch_size} is out of range", hint="use an integer >= 1")
        try:
            lines = input.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise GrokError(f"cannot read --input {str(input)!r}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise GrokError(f"--input {str(input)!r} is not UTF-8 text") from None
        if output.exists() and output.resolve() == input.resolve():
            raise GrokError("--output is the same file as --input", hint="write the results to another file")
        done_ids, done_lines = _resume_state(output)
        L = Loaded(model, tokenizer, threads, context, expert_cache_gb, expert_cache_policy, prefetch,
                   dict(pin_experts=pin_experts, routing_trace=routing_trace, unembed=unembed, offload=offload))
        _BatchRun(L, lines, output, done_ids, done_lines, s, list(stop or ()), not ignore_eos, batch_size,
                  stats).run()


def _resume_state(path: Path) -> tuple[set, set]:
    """Ids already answered and input lines already reported as errors; drops a torn last line."""
    if not path.exists():
        return set(), set()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GrokError(f"cannot read --output {str(path)!r}: {e.strerror or e}") from None
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        err(f"note: dropped a partial last line of {path} (an interrupted run)")
        data = data[:keep]
    done_ids, done_lines = set(), set()
    for raw in data.splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        if "error" in rec:
            if isinstance(rec.get("line"), int):
                done_lines.add(rec["line"])
        elif "id" in rec:
            done_ids.add(_key(rec["id"]))
    return done_ids, done_lines


def _key(id_) -> str:
    return json.dumps(id_, sort_keys=True)


class _BatchRun:
    def __init__(self, L: Loaded, lines, output: Path, done_ids, done_lines, settings, stop, stop_on_eos,
                 batch_size, stats):
        self.L, self.lines, self.output = L, lines, output
        self.done_ids, self.done_lines = done_ids, done_lines
        self.settings, self.stop, self.stop_on_eos = settings, stop, stop_on_eos
        self.batch_size, self.stats = batch_size, stats
        self.written = self.errors = self.tokens = 0
        self.t0 = time.perf_counter()
        self.last_bar = 0.0
        self.tty = sys.stderr.isatty()

    def run(self) -> None:
        try:
            self.fd = os.open(self.output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise GrokError(f"cannot write --output {str(self.output)!r}: {e.strerror or e}") from None
        try:
            requests, skipped = self.plan()
            self.total = len(requests) + self.written
            err(f"batch: {len(self.lines)} input lines, {skipped} already done, {len(requests)} to run "
                f"(up to {self.batch_size} at once)")
            self.bar()
            totals = [0.0, 0]
            for req, outcome in engine.generate_batch(self.L.model, self.L.tok, requests, self.batch_size):
                if isinstance(outcome, GrokError):
                    self.write({"id": req.id, "error": str(outcome), "line": req.tag})
                    self.errors += 1
                else:
                    rec = {"id": req.id, "text": outcome.text, **outcome.summary(), "line": req.tag}
                    self.write(rec)
                    self.tokens += outcome.generated_tokens
                    totals[0] += outcome.decode_s
                    totals[1] += outcome.decode_steps
                self.bar()
            self.bar(final=True)
        except KeyboardInterrupt:
            err(f"\ninterrupted: {self.written} records are safely in {self.output}; "
                "rerun the same command to resume")
            raise typer.Exit(130)
        finally:
            os.close(self.fd)
        err(f"batch: wrote {self.written} records to {self.output} ({self.errors} errors); "
            f"{self.tokens} tokens in {time.perf_counter() - self.t0:.1f} s")
        if self.stats:
            _print_stats(None, self.L.model)

    def plan(self):
        """Input lines -> requests still to run; error records for bad lines are written now."""
        requests, seen, skipped = [], set(), 0
        for n, raw in enumerate(self.lines, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError as e:
                rec, problem = None, f"line {n} is not valid JSON: {e}"
            else:
                problem = _check_record(rec)
            id_ = rec.get("id") if isinstance(rec, dict) else None
            if problem is None and _key(id_) in seen:
                problem = f"duplicate id {id_!r} (line {n})"
            if problem is not None:
                if n in self.done_lines:
                    skipped += 1
                else:
                    self.write({"id": id_, "error": problem, "line": n})
                    self.errors += 1
                continue
            seen.add(_key(id_))
            if _key(id_) in self.done_ids or n in self.done_lines:
                skipped += 1
                continue
            try:
                req = self.request(rec, n)
            except GrokError as e:
                self.write({"id": id_, "error": str(e), "line": n})
                self.errors += 1
                continue
            requests.append(req)
        return requests, skipped

    def request(self, rec: dict, line: int) -> engine.Request:
        s = dict(self.settings)
        for k in REQUEST_FIELDS:
            if k in rec and k not in ("stop", "ignore_eos"):
                s[k] = rec[k]
        if "seed" not in rec and s["seed"] is not None:     # one stream per id, independent of order
            digest = hashlib.sha256(f"{s['seed']}:{_key(rec['id'])}".encode()).digest()
            s["seed"] = int.from_bytes(digest[:8], "little")
        s = _sampling(**s)
        stop = rec.get("stop", self.stop)
        stop = [stop] if isinstance(stop, str) else list(stop)
        ids = self.L.tok.encode(rec["prompt"])
        return engine.Request(rec["id"], ids, _sampler(s), s["max_tokens"], stop,
                              not rec.get("ignore_eos", not self.stop_on_eos), tag=line)

    def write(self, rec: dict) -> None:
        data = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:                        # one write for a regular file; loop only if the OS splits it
            n = os.write(self.fd, view)
            view = view[n:]
        os.fsync(self.fd)
        self.written += 1

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
                f"{self.tokens} tokens, {self.tokens / dt:.1f} tok/s")
        if self.tty:
            err("\r" + line + "\x1b[K", end="\n" if final else "")
        elif final or done:
            err(line)


def _check_record(rec) -> str | None:
    if not isinstance(rec, dict):
        return "not a JSON object"
    if "id" not in rec:
        return "no \"id\""
    if isinstance(rec["id"], (dict, list)) or rec["id"] is None:
        return "\"id\" must be a string or a number"
    if not isinstance(rec.get("prompt"), str):
        return "no \"prompt\" string"
    for k, types in REQUEST_FIELDS.items():
        if k in rec:
            v = rec[k]
            if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
                return f"\"{k}\" has a bad value {v!r}"
            if k == "stop" and isinstance(v, list) and not all(isinstance(x, str) for x in v):
                return "\"stop\" must be a string or a list of strings"
    return None


# -- info -----------------------------------------------------------------------------------------
@app.command()
def info(
    verify: Annotated[bool, typer.Option("--verify", help="hash every file and compare with config.json's sha256")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of text")] = False,
    model: ModelOpt = None, tokenizer: TokenizerOpt = None, threads: ThreadsOpt = None, context: ContextOpt = None,
    expert_cache_gb: CacheGbOpt = "auto", expert_cache_policy: PolicyOpt = "lru", prefetch: PrefetchOpt = False,
    pin_experts: PinOpt = None, routing_trace: TraceOpt = None, unembed: UnembedOpt = "f32",
    offload: OffloadOpt = "none", stats: StatsOpt = False, debug: DebugOpt = False,
):
    """Describe a checkpoint without loading it: config, sizes, checksums, memory plan.

    Everything comes from the file headers (no weights are read, except with --verify, which
    hashes every file and compares with the sha256 listed in config.json).
    """
    with guard(debug):
        from .checkpoint import Checkpoint
        from .tokenizer import Tokenizer, find_tokenizer
        from . import bench

        _check_policy(expert_cache_policy)
        if model is None:
            model = _demo_path()
        t0 = time.perf_counter()
        ck = Checkpoint(model)
        c = ck.config
        ctx = c.sequence_len if context is None else context
        if not 1 <= ctx <= c.sequence_len:
            raise GrokError(f"--context {ctx} is outside 1..{c.sequence_len}",
                            hint=f"pass a context length up to the model's sequence_len {c.sequence_len}")
        plan = bench.memory_plan(ck, ctx, _cache_gb(expert_cache_gb))
        try:
            tk = Tokenizer(find_tokenizer(ck.root, tokenizer))
            tok_info = {"path": str(tk.path), "vocab_size": tk.vocab_size,
                        "fits": tk.vocab_size <= c.vocab_size}
        except GrokError as e:
            tok_info = {"error": str(e)}
        manifest = _manifest(ck)
        checks = _verify(ck, manifest) if verify else None
        params = sum(_numel(r) for r in ck.refs)
        doc = {"model": str(ck.root), "format": "xai ckpt-0 (released Grok-1 layout: one pickle per tensor)",
               "files": len(ck.files), "config": c.to_dict(), "parameters": params,
               "quantization": "int8 weights with bf16 scales per output column (attention output and expert "
                               f"down projections: {c.model_parallel_scale_blocks} row blocks); embeddings, "
                               "router and norms float32",
               "tokenizer": tok_info, "memory_plan": plan,
               "checksums": checks if checks is not None else
               ("not verified (pass --verify)" if manifest else "config.json lists no sha256")}
        if as_json:
            out(json.dumps(doc, indent=1) + "\n")
        else:
            _print_info(doc, c, plan, tok_info, checks, manifest)
        if stats:
            err(f"stats: info took {time.perf_counter() - t0:.2f} s")
        if checks is not None and checks["mismatched"]:
            bad = checks["mismatched"]
            raise GrokError(f"{len(bad)} file(s) do not match their sha256: {', '.join(bad[:5])}"
                            + (" ..." if len(bad) > 5 else ""), hint="download these files again")


def _numel(ref) -> int:
    import numpy as np
    shape = ref.weight.shape if hasattr(ref, "weight") else ref.shape
    return int(np.prod(shape, dtype=np.int64))


def _manifest(ck) -> dict:
    p = ck.root / "config.json"
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        files = d["checkpoint"]["files"]
        return {f["file"]: f["sha256"] for f in files if isinstance(f, dict) and "sha256" in f}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _verify(ck, manifest: dict) -> dict:
    total = sum(os.path.getsize(f) for f in ck.files)
    done = 0
    t0 = last = time.perf_counter()
    ok, mismatched, unlisted = 0, [], []
    tty = sys.stderr.isatty()
    for f in ck.files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(8 << 20):
                h.update(chunk)
                done += len(chunk)
                now = time.perf_counter()
                if now - last > (0.2 if tty else 10.0):
                    last = now
                    rate = done / max(now - t0, 1e-9)
                    msg = f"verify: {done / 1e9:.2f}/{total / 1e9:.2f} GB, {rate / 1e9:.2f} GB/s, {f.name}"
                    err("\r" + msg + "\x1b[K" if tty else msg, end="" if tty else "\n")
        want = manifest.get(f.name)
        if want is None:
            unlisted.append(f.name)
        elif h.hexdigest() == want:
            ok += 1
        else:
            mismatched.append(f.name)
    if tty and last > t0:
        err("")
    return {"ok": ok, "mismatched": mismatched, "unlisted": unlisted, "bytes": total,
            "seconds": round(time.perf_counter() - t0, 3)}


def _print_info(doc, c, plan, tok_info, checks, manifest) -> None:
    rows = [
        ("model", doc["model"]),
        ("format", f"{doc['format']}, {doc['files']} files, {gb(plan['file_bytes'])}"),
        ("config", f"vocab {c.vocab_size}, context {c.sequence_len}, emb {c.emb_size}, layers {c.num_layers}, "
                   f"q-heads {c.num_q_heads}, kv-heads {c.num_kv_heads}, head size {c.key_size}, experts "
                   f"{c.num_experts} ({c.num_selected_experts} per token), expert ffn {c.ffn_size}"),
        ("parameters", f"{doc['parameters'] / 1e9:.3f} B" if doc["parameters"] >= 1e8 else f"{doc['parameters'] / 1e6:.2f} M"),
        ("quantization", doc["quantization"]),
    ]
    if "error" in tok_info:
        rows.append(("tokenizer", tok_info["error"]))
    else:
        fit = "" if tok_info["fits"] else f"  -- does NOT fit the model's {c.vocab_size}"
        rows.append(("tokenizer", f"{tok_info['path']} ({tok_info['vocab_size']} pieces){fit}"))
    if checks is None:
        rows.append(("checksums", doc["checksums"]))
    elif not checks["mismatched"]:
        extra = f", {len(checks['unlisted'])} not listed" if checks["unlisted"] else ""
        rows.append(("checksums", f"ok: {checks['ok']} files match config.json{extra} "
                                  f"({gb(checks['bytes'])} in {checks['seconds']:.1f} s)"))
    else:
        rows.append(("checksums", f"MISMATCH in {len(checks['mismatched'])} files: {', '.join(checks['mismatched'][:5])}"))
    for k, v in rows:
        out(f"{k:<13}{v}\n")
    p = plan
    budget_how = ("auto: available RAM - dense - KV cache - safety margin" if p["expert_budget_auto"]
                  else "--expert-cache-gb")
    out(f"memory plan  (this machine: {gb(p['ram_total_bytes'])} RAM, {gb(p['ram_available_bytes'])} available)\n")
    out(f"  dense weights     {gb(p['dense_bytes']):>10}   used by every token (embedding table {gb(p['embedding_bytes'])})\n")
    out(f"  experts           {gb(p['expert_bytes']):>10}   {p['experts_total']} experts of {gb(p['one_expert_bytes'])}\n")
    out(f"  KV cache          {gb(p['kv_cache_bytes']):>10}   at context {p['context']} (float32)\n")
    out(f"  expert budget     {gb(p['expert_budget_bytes']):>10}   ({budget_how}): holds {p['experts_held']} of "
        f"{p['experts_total']} experts ({p['experts_held'] / max(p['experts_total'], 1):.0%})\n")
    out(f"  read per token    {gb(p['read_per_token_bytes']):>10}   attention + embedding table + "
        f"{c.num_selected_experts} experts x {c.num_layers} layers (+ up to {gb(p['kv_read_per_token_bytes_at_full_context'])} "
        "of KV cache at a full context)\n")


# -- bench ----------------------------------------------------------------------------------------
@app.command()
def bench(
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", "-p", help="prompt length for pp")] = 128,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", "-g", help="tokens generated for tg")] = 32,
    reps: Annotated[int, typer.Option("--reps", "-r", help="repetitions (after one warm-up)")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of a table")] = False,
    model: ModelOpt = None, tokenizer: TokenizerOpt = None, threads: ThreadsOpt = None, context: ContextOpt = None,
    expert_cache_gb: CacheGbOpt = "auto", expert_cache_policy: PolicyOpt = "lru", prefetch: PrefetchOpt = False,
    pin_experts: PinOpt = None, routing_trace: TraceOpt = None, unembed: UnembedOpt = "f32",
    offload: OffloadOpt = "none", stats: StatsOpt = False, debug: DebugOpt = False,
):
    """Measure prompt processing (pp) and token generation (tg) speed, llama-bench style."""
    with guard(debug):
        from .bench import run_bench
        L = Loaded(model, tokenizer, threads, context, expert_cache_gb, expert_cache_policy, prefetch,
                   dict(pin_experts=pin_experts, routing_trace=routing_trace, unembed=unembed, offload=offload),
                   need_tokenizer=False)
        r = run_bench(L.path, prompt_tokens, gen_tokens, threads, reps, model=L.model)
        if as_json:
            out(json.dumps(r, indent=1) + "\n")
        else:
            name = "demo" if L.demo else L.path.name
            out("| model | threads | test | t/s |\n|---|---:|---|---:|\n")
            for test, key, n in (("pp", "pp_tps", prompt_tokens), ("tg", "tg_tps", gen_tokens)):
                x = r[key]
                out(f"| {name} | {r['threads']} | {test}{n} | {x['median']:.2f} ± {x['std']:.2f} |\n")
            out(f"\ntg reads {gb(r['read_per_token_bytes'])} of weights per token: {r['tg_gb_s']:.2f} GB/s effective; "
                f"peak RSS {gb(r['peak_rss_bytes'])}; median of {reps} after a {r['warmup_s']:.2f} s warm-up\n")
        if stats:
            _print_stats(None, L.model)


def main() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError):
            pass
    try:
        app()
    except BrokenPipeError:          # e.g. `grok-cli generate ... | head -1`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        sys.exit(1)


if __name__ == "__main__":
    main()
