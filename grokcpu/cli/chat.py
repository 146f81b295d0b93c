"""grok-cli chat: a conversation on one session, with line editing and history on a terminal."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Annotated

import typer

from .. import engine
from ..errors import GrokError
from ..sampling import settings as check_settings
from .app import Loaded, Run, command, context_note, err, out, print_stats, sampler

CHAT_HELP = """commands:
  /help              this list
  /reset             forget the conversation
  /stats             context use, last answer's speed, expert cache
  /save FILE         write the conversation to FILE (JSON)
  /load FILE         continue a conversation saved with /save
  /set KEY VALUE     change a setting: temperature, top_k, top_p, min_p, repeat_penalty,
                     repeat_last_n, seed, max_tokens
  /exit              leave (or Ctrl-D)
multi-line messages: end a line with \\ to continue on the next, or put the message
  between two lines of \"\"\" (as llama.cpp and ollama do)
line editing: arrow keys, Ctrl-R searches the history (kept in the cache folder)
Ctrl-C stops an answer (the conversation is kept); at the prompt it clears the line."""

SET_KEYS = {"temperature": float, "temp": float, "top_k": int, "top_p": float, "min_p": float,
            "repeat_penalty": float, "repeat_last_n": int, "seed": int, "max_tokens": int, "n": int}
BLOCK = '"""'


@command(sampling=True)
def chat(
    run: Run,
    system: Annotated[str, typer.Option("--system", help="text above the conversation ('' = none)")] = engine.DEFAULT_SYSTEM,
    template: Annotated[str, typer.Option("--template", help="one turn; {user} is replaced by your message")] = engine.DEFAULT_TEMPLATE,
):
    """Talk with the model. One message per line (\\ or \"\"\" for more); /help lists the commands.

    Grok-1 is a base model without a chat template; the conversation is written as a document:
    the --system text, then turns in --template form ("User: {user}\\nAssistant:"). An answer ends
    at EOS or when the model begins the next "User:" line. When the conversation outgrows the
    context, the oldest turns are dropped (a note on stderr says so).
    """
    L = Loaded(run)
    conv = engine.Conversation(L.model, L.tok, system, template)
    L.warm()
    ChatLoop(L, conv, run).run()


class ChatLoop:
    def __init__(self, L: Loaded, conv: engine.Conversation, run: Run):
        self.L, self.conv, self.run_opts = L, conv, run
        self.settings = dict(run.settings)
        self.sampler = sampler(self.settings)
        self.tty = sys.stdin.isatty()

    def run(self) -> None:
        reader = open_reader()
        if self.tty:
            err(f"chat: context {self.L.model.context} tokens. /help lists commands, Ctrl-C stops an answer, "
                "Ctrl-D exits.")
        try:
            while True:
                try:
                    line = read_message(reader)
                except KeyboardInterrupt:          # at the prompt: drop the line, ask again
                    err("")
                    continue
                if line is None:                   # EOF (Ctrl-D)
                    break
                if not line.strip():
                    continue
                if line.startswith("/"):
                    if self.command(line) == "exit":
                        break
                    continue
                self.answer(line)
        finally:
            reader.close()

    def answer(self, message: str) -> None:
        started = False
        res = None
        try:
            for ev in self.conv.reply(message, self.sampler, self.settings["max_tokens"], self.run_opts.stop,
                                      self.run_opts.stop_on_eos):
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
            if self.run_opts.debug:
                traceback.print_exc()
            err(f"error: {e}")
        context_note(res, self.L.model)
        if self.run_opts.stats and res is not None:
            print_stats(res, self.L.model, f", context {self.conv.session.pos}/{self.L.model.context}")

    def command(self, line: str) -> str | None:
        parts = line.split(maxsplit=2)
        cmd, args = parts[0].lower(), parts[1:]
        try:
            if cmd in ("/exit", "/quit", "/bye"):
                return "exit"
            if cmd in ("/help", "/?"):
                err(CHAT_HELP)
            elif cmd in ("/reset", "/clear"):
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
        new = check_settings(**dict(self.settings, **{key: value}))
        self.settings = new
        self.sampler = sampler(new)
        err(f"{key} = {value}")

    def show_stats(self) -> None:
        c = self.conv
        err(f"conversation: {len(c.turns)} turns, {c.session.pos} of {self.L.model.context} context tokens in the cache")
        err("settings: " + ", ".join(f"{k} {v}" for k, v in self.settings.items()))
        print_stats(c.last, self.L.model)


# -- reading messages -----------------------------------------------------------------------------
def read_message(reader) -> str | None:
    """One message: a line; lines ending in \\ continue; a line starting with \"\"\" opens a block
    that a line ending with \"\"\" closes. None at end of input."""
    line = reader.readline("> ")
    if line is None:
        return None
    if line.lstrip().startswith(BLOCK):
        body = line.lstrip()[len(BLOCK):]
        parts = []
        while True:
            if body.rstrip().endswith(BLOCK):
                parts.append(body.rstrip()[:-len(BLOCK)])
                break
            parts.append(body)
            body = reader.readline("... ")
            if body is None:                       # EOF inside a block: send what there is
                break
        return "\n".join(parts).strip("\n")
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        line = reader.readline("... ")
        if line is None:
            line = ""
            break
    parts.append(line)
    return "\n".join(parts)


def open_reader():
    if sys.stdin.isatty() and sys.stdout.isatty():
        try:
            return ReadlineLines()
        except ImportError:                         # no readline module on this platform
            pass
    if sys.stdin.isatty():
        return TtyLines()
    return PipeLines()


class PipeLines:
    def readline(self, prompt: str) -> str | None:
        line = sys.stdin.readline()
        return line.rstrip("\r\n") if line else None

    def close(self) -> None:
        pass


class ReadlineLines:
    """input() with the readline module: arrow keys, Ctrl-R, and a history file that persists.
    Ctrl-C raises KeyboardInterrupt out of input() and readline drops the line."""

    def __init__(self):
        import readline
        from ..demo import cache_root
        self.rl = readline
        self.history = cache_root() / "chat_history"
        readline.set_history_length(1000)
        with contextlib.suppress(OSError):
            readline.read_history_file(self.history)

    def readline(self, prompt: str) -> str | None:
        try:
            return input(prompt)
        except EOFError:
            return None

    def close(self) -> None:
        err("")
        with contextlib.suppress(OSError):
            self.history.parent.mkdir(parents=True, exist_ok=True)
            self.rl.write_history_file(self.history)


class TtyLines:
    """Lines from a terminal whose stdout is not one (no readline then), in its cooked mode,
    that Ctrl-C always interrupts: select() also watches the signal wakeup fd, which Python's
    C-level handler writes in whatever thread the signal lands, so the main thread wakes."""

    def __init__(self):
        import signal
        self.signal = signal
        self.fd = sys.stdin.fileno()
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)
        self.old = signal.set_wakeup_fd(self.w, warn_on_full_buffer=False)
        self.pending = b""

    def readline(self, prompt: str) -> str | None:
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
                    return self.pending.decode("utf-8", "replace") or None
                self.pending += data
        except KeyboardInterrupt:
            self.pending = b""
            raise
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode("utf-8", "replace").rstrip("\r")

    def close(self) -> None:
        err("")
        self.signal.set_wakeup_fd(self.old)
        os.close(self.r)
        os.close(self.w)
