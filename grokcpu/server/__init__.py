"""`grok-cli serve`: an OpenAI-compatible HTTP server with continuous batching.

    python -m grokcpu.server --model /data/grok-1 --port 8080 --parallel 4

app.py holds the routes, scheduler.py the batching loop (one thread owns the model),
protocol.py the request validation and response shapes. Needs starlette and uvicorn
(`pip install 'grokcpu[server]'`).

Behaviour worth knowing:
* Sampling defaults are grok-cli's (llama-server's): temperature 0.8, top_k 40, top_p 0.95,
  min_p 0.05; `seed` makes a request repeatable and gives grok-cli generate's text (choice j of
  n uses seed + j). Extensions: top_k, min_p, repeat_penalty, repeat_last_n, ignore_eos.
* max_tokens defaults to 16 for completions (OpenAI's) and to the room left in the context for
  chat. A prompt longer than the context is a 400 (code context_length_exceeded); max_tokens
  beyond the room left is clipped: the answer ends with finish_reason "length" at a full context.
* Chat is written as `grok-cli chat` writes it (engine.Conversation: system text, then
  "User: ...\nAssistant:" turns); system messages replace the system text; the answer stops at
  EOS or at the next "\nUser:". The text is returned as generated (it usually starts with a space).
* logprobs are the log-softmax of the model's logits for that position (before penalties,
  temperature and filters); presence/frequency penalties count the generated tokens, as OpenAI's.
* Full queue: 503 with Retry-After. Any model name is accepted; /v1/models names the served one.
"""

from __future__ import annotations

__all__ = ["run", "main"]


def run(settings, host: str = "127.0.0.1", port: int = 8080, log_level: str = "warning") -> int:
    """Serve until interrupted; returns the exit status (1 when the model fails to load)."""
    import sys

    import uvicorn

    from .app import create_app

    app = create_app(settings)
    state = app.state.grok
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    def failed(message: str) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        server.should_exit = True

    state.on_load_error = failed
    print(f"serving on http://{host}:{port} (model loading; GET /health says when ready)", file=sys.stderr, flush=True)
    server.run()
    if state.error:
        return 1
    return 0 if server.started else 1


def main(argv=None) -> int:
    from .__main__ import main as _main
    return _main(argv)
