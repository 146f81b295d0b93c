"""grok-cli generate: continue a prompt; the completion streams to stdout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import engine
from ..errors import GrokError
from ..tokenizer import replace_invalid
from .app import Loaded, Run, command, context_note, err, out, print_stats, sampler


@command(sampling=True)
def generate(
    run: Run,
    text: Annotated[Optional[str], typer.Argument(metavar="PROMPT", show_default=False,
                                                  help="the text to continue")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="the text to continue", show_default=False)] = None,
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", "-f", show_default=False,
                                                        help="read the prompt from a file ('-' = stdin)")] = None,
):
    """Continue a prompt; the completion streams to stdout (followed by one newline).

    The prompt is the argument, --prompt, --prompt-file, or (none of these, stdin not a
    terminal) stdin:  grok-cli generate "The answer is"  /  echo "The answer is" | grok-cli generate
    """
    text = read_prompt(text, prompt, prompt_file)
    L = Loaded(run)
    ids = L.tok.encode(text)
    L.warm()
    res, started = None, False
    try:
        for ev in engine.generate(L.model, L.tok, ids, sampler(run.settings), run.settings["max_tokens"], run.stop,
                                  stop_on_eos=run.stop_on_eos):
            started = True
            if isinstance(ev, engine.Result):
                res = ev
            else:
                out(ev.text)
    finally:
        if started:
            out("\n")
    context_note(res, L.model)
    if run.stats:
        print_stats(res, L.model)


def _decode(data: bytes, where: str) -> str:
    text = data.decode("utf-8", "replace")
    if "\ufffd" in text and "\ufffd".encode() not in data:
        err(f"note: {where} has bytes that are not UTF-8; they were replaced with U+FFFD")
    return text


def read_prompt(text: str | None, prompt: str | None, prompt_file: Path | None) -> str:
    given = [x for x in (text, prompt, prompt_file) if x is not None]
    if len(given) > 1:
        raise GrokError("give the prompt once: as the argument, --prompt TEXT, or --prompt-file FILE")
    if text is not None or prompt is not None:
        raw = text if text is not None else prompt
        fixed = replace_invalid(raw)             # argv bytes that are not UTF-8 arrive as surrogates
        if fixed != raw:
            err("note: the prompt has bytes that are not UTF-8; they were replaced with U+FFFD")
        return fixed
    if prompt_file is None or str(prompt_file) == "-":
        if prompt_file is None and sys.stdin.isatty():
            raise GrokError("no prompt", hint='grok-cli generate "text", --prompt TEXT, --prompt-file FILE, '
                                              "or pipe the prompt to stdin")
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:
            return replace_invalid(sys.stdin.read())
        return _decode(stream.read(), "stdin")
    return read_text_file(prompt_file, "--prompt-file")


def read_text_file(path: Path, flag: str) -> str:
    """The text of the file given to option `flag` (bytes that are not UTF-8 become U+FFFD, with a note)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GrokError(f"cannot read {flag} {str(path)!r}: {e.strerror or e}") from None
    return _decode(data, f"{flag} {str(path)!r}")
