"""The errors a user can see. Everything a user can get wrong raises GrokError."""

from __future__ import annotations

import re

# Characters that must never reach a terminal or log raw: C0/C1 controls, DEL, bidi and
# zero-width formatting, line/paragraph separators, and lone surrogates (undecodable file names).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
MAX_MESSAGE, MAX_HINT = 360, 130


def _escape(ch: re.Match) -> str:
    c = ch.group()
    if c in _ESCAPES:
        return _ESCAPES[c]
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def sanitize(text, limit: int) -> str:
    """One printable line of at most `limit` characters: controls escaped as repr does, the
    middle of an over-long text replaced by an ellipsis (the start names the file, the end says why)."""
    text = text if isinstance(text, str) else str(text)
    if len(text) > 4 * limit:                     # escape only what can survive the cut
        text = text[:2 * limit] + text[-2 * limit:]
    text = _UNSAFE.sub(_escape, text)
    if len(text) > limit:
        head = (limit - 1) * 2 // 3
        text = text[:head] + "…" + text[len(text) - (limit - 1 - head):]
    return text


class GrokError(Exception):
    """A problem the user can fix: one line of what is wrong, and a hint of what to do.

    Message and hint are made safe to print: no raw control characters, bounded length.
    """

    def __init__(self, message: str, hint: str | None = None):
        message = sanitize(message, MAX_MESSAGE)
        hint = sanitize(hint, MAX_HINT) if hint is not None else None
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message


class CheckpointError(GrokError):
    """A checkpoint is missing, damaged, hostile, or does not fit the model."""


class UnsafePickleError(CheckpointError):
    """A checkpoint file asked for a Python global that is not on the allow-list."""


class ConfigError(GrokError):
    """A configuration value is missing or inconsistent."""


class ContextFullError(GrokError):
    """The prompt or conversation does not fit in the model's context window."""


class TokenizerError(GrokError):
    """The tokenizer is missing or does not fit the model."""
