"""grok-cli: chat, generate, batch, info, bench, perplexity, warmup, serve and convert (`grokcpu.cli:main`).

app.py declares the options every command shares and handles errors and output; each command
is its own module. Without --model every command runs the built-in demo model (demo.py).
"""

from . import batch, bench, chat, convert, generate, info, perplexity, serve, warmup  # noqa: F401  (each registers its command)
from .app import app, main

__all__ = ["app", "main"]
