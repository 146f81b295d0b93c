"""python -m grokcpu.server [--model DIR] [--port 8080] ...: run the HTTP server."""

from __future__ import annotations

import argparse
import os
import sys

from .. import engine


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m grokcpu.server",
                                description="OpenAI-compatible HTTP server for grokcpu (continuous batching).")
    a = p.add_argument
    a("-m", "--model", help="folder holding ckpt-0/ (default: the built-in demo model)")
    a("--tokenizer", help="SentencePiece tokenizer.model (default: beside the checkpoint)")
    a("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    a("--port", type=int, default=8080)
    a("--parallel", type=int, default=4, help="sequences decoded together (default 4)")
    a("--queue", type=int, default=64, help="sequences waiting beyond --parallel before 503 (default 64)")
    a("--api-key", default=os.environ.get("GROKCPU_API_KEY"),
      help="require 'Authorization: Bearer KEY' on every endpoint but /health (or $GROKCPU_API_KEY)")
    a("--max-body-bytes", type=int, default=2 * 1024 * 1024, help="largest request body (default 2 MiB)")
    a("--cors-origin", action="append", default=[], help="allow browser requests from this origin (repeatable)")
    a("--model-name", help="the name /v1/models reports (default: the checkpoint folder's name)")
    a("--system", default=engine.DEFAULT_SYSTEM, help="chat system text when a request sends none")
    a("--template", default=engine.DEFAULT_TEMPLATE, help="chat turn template, with {user}")
    a("-t", "--threads", type=int, help="compute threads (default: physical cores)")
    a("-c", "--context", type=int, help="KV cache length per sequence (default: the model's sequence_len)")
    a("--expert-cache-gb", default="auto")
    a("--expert-cache-policy", default="lru")
    a("--prefetch", action="store_true")
    a("--expert-reads", default="auto", help="direct, buffered, or auto (direct below all experts)")
    a("--pin-experts")
    a("--routing-trace")
    a("--unembed", default="f32")
    a("--activations", default="f32")
    a("--offload", default="none")
    a("--log-level", default="warning", help="uvicorn's log level")
    return p


def _int_range(p, flag: str, v: int, lo: int, hi: int) -> None:
    if not lo <= v <= hi:
        p.error(f"{flag} {v} is out of range (use {lo}..{hi})")


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"error: the server needs starlette and uvicorn ({e.name} is missing) "
              f"(hint: pip install 'grokcpu[server]')", file=sys.stderr)
        return 1
    import grokcpu
    from . import run
    from .app import Settings

    _int_range(p, "--port", args.port, 0, 65535)
    _int_range(p, "--parallel", args.parallel, 1, 256)
    _int_range(p, "--queue", args.queue, 0, 1 << 20)
    _int_range(p, "--max-body-bytes", args.max_body_bytes, 1024, 1 << 30)
    if args.template.count("{user}") != 1:
        p.error(f"--template {args.template!r} must contain {{user}} exactly once")
    if args.api_key is not None and not args.api_key:
        p.error("--api-key is empty")
    try:
        opts = grokcpu.Options.make(threads=args.threads, context=args.context, expert_cache_gb=args.expert_cache_gb,
                                    expert_cache_policy=args.expert_cache_policy, prefetch=args.prefetch,
                                    expert_reads=args.expert_reads,
                                    pin_experts=args.pin_experts or (), routing_trace=args.routing_trace,
                                    unembed=args.unembed, activations=args.activations, offload=args.offload)
    except grokcpu.OptionError as e:
        p.error(str(e.render("--" + e.param.replace("_", "-"))))
    settings = Settings(model_path=args.model, tokenizer_path=args.tokenizer, options=opts, parallel=args.parallel,
                        queue=args.queue, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                        cors_origins=args.cors_origin, model_name=args.model_name, system=args.system,
                        template=args.template)
    try:
        return run(settings, args.host, args.port, args.log_level)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
