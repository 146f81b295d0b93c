"""grok-cli serve: the OpenAI-compatible HTTP server (grokcpu.server) with the shared engine options."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from .. import engine
from ..errors import GrokError
from .app import Run, command


@command()
def serve(
    run: Run,
    host: Annotated[str, typer.Option("--host", help="address to bind (127.0.0.1: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port")] = 8080,
    parallel: Annotated[int, typer.Option("--parallel", help="sequences decoded together")] = 4,
    queue: Annotated[int, typer.Option("--queue", help="sequences waiting beyond --parallel before 503")] = 64,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="require 'Authorization: Bearer KEY' on every "
                                                   "endpoint but /health (or $GROKCPU_API_KEY)",
                                                   show_default=False)] = None,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", help="largest request body")] = 2 * 1024 * 1024,
    cors_origin: Annotated[Optional[list[str]], typer.Option("--cors-origin", help="allow browser requests from "
                                                             "this origin (repeatable)", show_default=False)] = None,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="the name /v1/models reports",
                                                      show_default=False)] = None,
    system: Annotated[str, typer.Option("--system", help="chat system text when a request sends none")] = engine.DEFAULT_SYSTEM,
    template: Annotated[str, typer.Option("--template", help="chat turn template, with {user}")] = engine.DEFAULT_TEMPLATE,
):
    """Serve the model over HTTP: OpenAI's /v1/completions and /v1/chat/completions (streaming
    too), /v1/models, /health, /metrics, /tokenize, /detokenize; requests decode together."""
    for flag, v, lo, hi in (("--port", port, 0, 65535), ("--parallel", parallel, 1, 256),
                            ("--queue", queue, 0, 1 << 20), ("--max-body-bytes", max_body_bytes, 1024, 1 << 30)):
        if not lo <= v <= hi:
            raise GrokError(f"{flag} {v} is out of range", hint=f"use an integer from {lo} to {hi}")
    if template.count("{user}") != 1:
        raise GrokError(f"--template {template!r} must contain {{user}} exactly once",
                        hint="for example --template 'Q: {user}\\nA:'")
    key = api_key if api_key is not None else os.environ.get("GROKCPU_API_KEY")
    if key is not None and not key:
        raise GrokError("--api-key is empty", hint="give a key, or leave --api-key out")
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise GrokError(f"grok-cli serve needs starlette and uvicorn ({e.name} is missing)",
                        hint="pip install 'grokcpu[server]'") from None
    from ..server import run as run_server
    from ..server.app import Settings

    settings = Settings(model_path=str(run.model) if run.model else None,
                        tokenizer_path=str(run.tokenizer) if run.tokenizer else None, options=run.options,
                        parallel=parallel, queue=queue, api_key=key, max_body_bytes=max_body_bytes,
                        cors_origins=list(cor for cor in (cors_origin or ())), model_name=model_name,
                        system=system, template=template)
    if run_server(settings, host, port, "debug" if run.debug else "warning") != 0:
        raise typer.Exit(1)            # the server has printed its one-line error
