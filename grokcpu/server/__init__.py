"""`grok-cli serve`: an OpenAI-compatible HTTP server with continuous batching.

    python -m grokcpu.server --model /data/grok-1 --port 8080 --parallel 4

app.py holds the routes, scheduler.py the batching loop (one thread owns the model),
protocol.py the request validation and response shapes. Needs starlette and uvicorn
(`pip install 'grokcpu[server]'`).
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
