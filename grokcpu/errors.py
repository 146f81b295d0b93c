"""The errors a user can see. Everything a user can get wrong raises GrokError."""

from __future__ import annotations


class GrokError(Exception):
    """A problem the user can fix: one line of what is wrong, and a hint of what to do."""

    def __init__(self, message: str, hint: str | None = None):
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
