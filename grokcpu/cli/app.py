"""The grok-cli app: options shared by the commands (declared once, here), errors, output.

Generated text goes to stdout and nothing else does; notes, progress, timings (--stats) and
errors go to stderr. A mistake the user can fix prints one line, `error: ... (hint: ...)`, and
exits with status 1 (--debug adds the traceback); a usage mistake (unknown option, bad number,
no such command) prints one line in the same form and exits with 2. Ctrl-C exits with 130,
except in chat, where it stops the current answer and keeps the conversation.

A command declares only its own parameters and takes the shared ones as one `Run`:

    @command(sampling=True)
    def generate(run: Run, prompt: Annotated[...] = None): ...
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer

try:                                    # typer >= 0.22 carries its own copy of click
    from typer import _click as click
except ImportError:
    import click
from typer.core import TyperGroup

from .. import __version__
from ..errors import GrokError
from ..options import OptionError, Options

# -- output helpers -------------------------------------------------------------------------------


def out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def err(text: str, end: str = "\n") -> None:
    sys.stderr.write(text + end)
    sys.stderr.flush()


def gb(n: float) -> str:
    if abs(n) >= 1e9:                  # abs: an unclamped auto budget can be negative
        return f"{n / 1e9:.2f} GB"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.2f} MB"
    return f"{n / 1e3:.1f} kB"


# -- the shared options ---------------------------------------------------------------------------
ENGINE, SAMPLING = "Engine options", "Sampling options"


def _opt(*names, help, panel=ENGINE, **kw):
    return typer.Option(*names, help=help, rich_help_panel=panel, **kw)


# (parameter, type, default, option); one line per shared option, in --help order
ENGINE_PARAMS = [
    ("model", Optional[Path], None, _opt("--model", "-m", show_default=False,
     help="checkpoint folder (holding ckpt-0/), ckpt-0/ itself, or a Grok GGUF file (default: the built-in demo)")),
    ("tokenizer", Optional[Path], None, _opt("--tokenizer", show_default=False,
     help="tokenizer.model (default: a GGUF's own, or the one beside the checkpoint)")),
    ("threads", Optional[int], None, _opt("--threads", "-t", show_default=False, help="compute threads (default: physical cores)")),
    ("context", Optional[int], None, _opt("--context", "-c", show_default=False,
     help="KV cache length in tokens (default: the model's sequence_len)")),
    ("expert_cache_gb", str, "auto", _opt("--expert-cache-gb", help="RAM for cached experts, in GB, 'auto', or 'off'")),
    ("expert_cache_policy", str, "lru", _opt("--expert-cache-policy", help="expert eviction policy (lru, lfu)")),
    ("prefetch", bool, False, _opt("--prefetch/--no-prefetch",
     help="read the next layer's likely experts ahead (off by default: it lost on the models measured)")),
    ("expert_reads", str, "auto", _opt("--expert-reads",
     help="how misses read: direct (bypass the page cache), buffered, or auto (direct below all experts)")),
    ("pin_experts", Optional[str], None, _opt("--pin-experts",
     help="keep experts resident: LAYER:EXPERT,... or TRACE.jsonl:N (the N most used)")),
    ("routing_trace", Optional[str], None, _opt("--routing-trace",
     help="append the routing (pos, layer, experts) to this JSONL file; replay it with tools/cache_replay.py")),
    ("unembed", str, "f32", _opt("--unembed", help="output layer precision: f32 (exact) or int8 (4x fewer bytes per token)")),
    ("activations", str, "f32", _opt("--activations",
     help="GGUF Q4_K/Q5_K/Q6_K decode products: f32 (exact) or q8 (x rounded to 8 bits: faster)")),
    ("offload", str, "none", _opt("--offload", help="none, or dense: attention/norms/router/embeddings on a CUDA GPU")),
    ("stats", bool, False, _opt("--stats", help="timings and model statistics on stderr")),
    ("debug", bool, False, _opt("--debug", help="show the full traceback of errors")),
]

# sampling: llama.cpp's names and defaults
SAMPLING_PARAMS = [
    ("temperature", float, 0.8, _opt("--temperature", "--temp", help="0 = greedy", panel=SAMPLING)),
    ("top_k", int, 40, _opt("--top-k", help="keep the k most likely tokens (0 = off)", panel=SAMPLING)),
    ("top_p", float, 0.95, _opt("--top-p", help="nucleus: the reference's rule (1 = off)", panel=SAMPLING)),
    ("min_p", float, 0.05, _opt("--min-p", help="keep p >= min_p * p_max (0 = off)", panel=SAMPLING)),
    ("repeat_penalty", float, 1.0, _opt("--repeat-penalty", help="penalty for recent tokens (1 = off)", panel=SAMPLING)),
    ("repeat_last_n", int, 64, _opt("--repeat-last-n", help="tokens the repeat penalty looks back (-1 = all)", panel=SAMPLING)),
    ("seed", Optional[int], None, _opt("--seed", "-s", show_default=False, panel=SAMPLING,
     help="random seed (default: a random one)")),
    ("max_tokens", int, 256, _opt("--max-tokens", "-n", help="most tokens to generate", panel=SAMPLING)),
    ("stop", Optional[list[str]], None, _opt("--stop", show_default=False, panel=SAMPLING,
     help="stop when this text appears (repeatable)")),
    ("ignore_eos", bool, False, _opt("--ignore-eos", panel=SAMPLING,
     help="do not stop at EOS (the reference runner's behaviour)")),
]

# parameter -> flag, for errors raised by Options, the model or the engine (OptionError.param)
# (in Annotated, typer.Option's first name sits in .default)
FLAGS = {name: (info.default if isinstance(info.default, str) else info.param_decls[0]).split("/")[0]
         for name, _, _, info in ENGINE_PARAMS + SAMPLING_PARAMS}
ENGINE_OPTION_NAMES = ("threads", "context", "expert_cache_gb", "expert_cache_policy", "prefetch", "expert_reads",
                       "pin_experts",
                       "routing_trace", "unembed", "activations", "offload")


def flag(param: str) -> str:
    return FLAGS.get(param, "--" + param.replace("_", "-"))


@dataclass
class Run:
    """The shared options of one command, checked: `options` (the engine's), sampling `settings`."""
    model: Path | None = None
    tokenizer: Path | None = None
    stats: bool = False
    debug: bool = False
    options: Options = field(default_factory=Options)
    settings: dict = field(default_factory=dict)      # sampling.settings(...) (with max_tokens)
    stop: list = field(default_factory=list)
    stop_on_eos: bool = True


def sampler(settings: dict):
    from ..sampling import make_sampler
    return make_sampler(**{k: v for k, v in settings.items() if k != "max_tokens"})


def _make_run(kw: dict, sampling: bool) -> Run:
    from ..sampling import settings
    run = Run(model=kw["model"], tokenizer=kw["tokenizer"], stats=kw["stats"], debug=kw["debug"])
    try:
        run.options = Options.make(**{k: kw[k] for k in ENGINE_OPTION_NAMES})
    except OptionError as e:
        raise e.render(flag(e.param)) from None
    if sampling:
        run.settings = settings(**{k: kw[k] for k in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                                                      "repeat_last_n", "seed", "max_tokens")})
        run.stop = list(kw["stop"] or ())
        run.stop_on_eos = not kw["ignore_eos"]
    return run


def command(name: str | None = None, *, sampling: bool = False):
    """Register `fn(run: Run, **own)` as a command with the shared options added to its own."""
    shared = ENGINE_PARAMS + (SAMPLING_PARAMS if sampling else [])

    def deco(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values() if p.name != "run"]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=Annotated[t, info])
                 for n, t, d, info in shared]
        names = {n for n, *_ in shared}

        @functools.wraps(fn)
        def wrapper(**kw):
            debug = kw.get("debug", False)
            with guard(debug):
                run = _make_run({k: kw[k] for k in names}, sampling)
                try:
                    return fn(run, **{k: v for k, v in kw.items() if k not in names})
                except BrokenPipeError:
                    raise
                except OSError as e:          # a file the engine writes or reads, gone wrong
                    raise os_error(e, run) from e

        params = own + added
        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__
        app.command(name or fn.__name__)(wrapper)
        return fn
    return deco


def os_error(e: OSError, run: Run) -> GrokError:
    """An OSError from the engine as one line, naming the flag whose file it was if we can tell."""
    what = e.strerror or str(e)
    trace = run.options.routing_trace
    if trace is not None and (e.filename is None or os.path.abspath(str(e.filename)) == os.path.abspath(trace)):
        return GrokError(f"--routing-trace {trace!r}: cannot write: {what}",
                         hint="give a writable file path, or leave --routing-trace out")
    where = f" {str(e.filename)!r}" if e.filename else ""
    return GrokError(f"cannot read or write{where}: {what}")


# -- errors -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def guard(debug: bool):
    """User mistakes -> one line on stderr and exit 1; Ctrl-C -> `interrupted`, exit 130."""
    try:
        yield
    except OptionError as e:
        if debug:
            traceback.print_exc()
        err(f"error: {e.render(flag(e.param))}")
        raise typer.Exit(1)
    except GrokError as e:
        if debug:
            traceback.print_exc()
        err(f"error: {e}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        interrupted()
    except RecursionError:                      # e.g. a hostile file nested too deeply
        if debug:
            traceback.print_exc()
        err("error: the input is nested too deeply to read")
        raise typer.Exit(1)


def interrupted(message: str = "interrupted") -> None:
    """Ctrl-C: one line on stderr, exit 130; later Ctrl-Cs during the exit are ignored.

    Interrupted while numba compiles, the interpreter's own exit can crash (llvmlite's state is
    half-built), so then the process ends at once, after flushing stdout and stderr."""
    import signal

    from . import firstuse
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    err("\n" + message)
    if firstuse.compiling:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        os._exit(130)
    raise typer.Exit(130)


def _unraisable(hook):
    """sys.unraisablehook that keeps a KeyboardInterrupt raised where Python cannot propagate it
    (a finalizer, a numba callback during compilation) from printing "Exception ignored ..."."""
    def handler(u):
        if isinstance(u.exc_value, KeyboardInterrupt):
            err("\ninterrupted")
            sys.stdout.flush()
            os._exit(130)
        hook(u)
    return handler


def _usage_line(e: click.exceptions.UsageError) -> str:
    """click's usage error as one line: error: what (hint: how)."""
    import difflib
    import re
    msg = " ".join(e.format_message().split())
    hint = None
    if " Did you mean" in msg:
        msg, _, rest = msg.partition(" Did you mean")
        hint = "did you mean" + rest.rstrip("?") + "?"
    m = re.search(r" \((?:Possible options|Did you mean):? ([^)]*)\)", msg)
    if m:
        hint = f"did you mean {m.group(1).replace(', ', ' or ')}?"
        msg = msg[:m.start()] + msg[m.end():]
    m = re.match(r"No such command '(.*)'", msg)
    if m and e.ctx is not None and hasattr(e.ctx.command, "list_commands"):
        near = difflib.get_close_matches(m.group(1), e.ctx.command.list_commands(e.ctx), n=1, cutoff=0.4)
        if near:
            hint = f"did you mean {near[0]}?"
    msg = msg.rstrip(".")
    msg = msg[:1].lower() + msg[1:]
    path = e.ctx.command_path if e.ctx is not None else "grok-cli"
    more = f"see {path} --help"
    return f"error: {msg} (hint: {hint + ' ' + more if hint else more})"


OPTIONAL_VALUE = ("--ray",)      # options whose value may be left out: a bare `--ray` means `--ray ''`


def fill_optional_values(args: list[str]) -> list[str]:
    """`--ray` with no value (last, or before another option) gets the empty value."""
    out = []
    for i, a in enumerate(args):
        if a == "--":
            return out + args[i:]
        out.append(a)
        if a in OPTIONAL_VALUE and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append("")
    return out


class _Group(TyperGroup):
    """The command group; its `main` turns click's usage errors into one line and exit 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:       # outside a command's guard (e.g. while importing)
            interrupted()

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = fill_optional_values(sys.argv[1:] if args is None else list(args))
        try:
            rv = super().main(args=args, prog_name=prog_name or "grok-cli", complete_var=complete_var,
                              standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError:     # the help is already printed
            sys.exit(0)
        except click.exceptions.UsageError as e:
            err(_usage_line(e))
            sys.exit(2)
        except typer.Abort:
            err("interrupted")
            sys.exit(130)
        except click.exceptions.ClickException as e:     # e.g. a file option that cannot be opened
            err(f"error: {' '.join(e.format_message().split())}")
            sys.exit(1)
        except KeyboardInterrupt:
            err("\ninterrupted")
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(name="grok-cli", cls=_Group, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]},
                  help="Run xAI's Grok-1 on the CPU. Without --model, a tiny random-weight demo model is used.")


def _version(value: bool) -> None:
    if value:
        import numba
        out(f"grok-cli {__version__} (numba {numba.__version__}, python {sys.version.split()[0]})\n")
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """Run xAI's Grok-1 on the CPU. Without --model, a tiny random-weight demo model is used."""


# -- opening a model ------------------------------------------------------------------------------
def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Loaded:
    """A model and its tokenizer, opened from a command's shared options."""

    def __init__(self, run: Run, need_tokenizer: bool = True):
        import grokcpu
        from ..tokenizer import model_tokenizer

        self.run = run
        self.demo = run.model is None
        self.path = demo_path() if self.demo else Path(run.model)
        self.tok = None
        if need_tokenizer:                        # cheap: before the model
            try:
                self.tok = model_tokenizer(self.path, run.tokenizer)
            except GrokError:
                grokcpu.open_checkpoint(self.path).close()     # a missing/broken model is the error to report
                raise
        n = run.options.threads
        if n is not None and n > cpu_count():
            err(f"note: --threads {n} is more than the {cpu_count()} cores this process may use; "
                "the extra threads share cores and usually make it slower")
        self.model = grokcpu.load(self.path, options=run.options)
        if self.tok is not None:
            self.tok.check_fits(self.model.config.vocab_size)
        self.warm_s: float | None = None

    def warm(self, batch: bool = False) -> None:
        """Before the first timed step: on first use, say that the kernels compile and compile
        them (or, with --stats, load them) outside the timings; see firstuse.py."""
        from . import firstuse
        first = not firstuse.is_compiled()
        if first:
            firstuse.note()
            firstuse.compiling = True
        if self.run.options.routing_trace is not None:     # a warm-up would write trace rows
            return
        if first or self.run.stats:
            from ..engine import warm_up
            self.warm_s = warm_up(self.model, batch=True)
            if first:
                firstuse.mark(self.warm_s)
                firstuse.compiling = False
                err(f"note: kernels ready in {self.warm_s:.1f} s")
            if self.run.stats:
                err(f"stats: warm-up (kernel {'compile' if first else 'load'}) {self.warm_s:.2f} s, "
                    "not in the figures below")


def demo_path() -> Path:
    from .. import demo
    err(demo.BANNER)
    path, built = demo.ensure_demo()
    if built:
        err(f"note: built the demo model (checkpoint + tokenizer) in {path}")
    return path


def print_stats(res, model, extra: str = "") -> None:
    if res is not None:
        err(f"stats: prompt {res.prompt_tokens} tokens in {res.prefill_s:.3f} s ({res.prefill_tps:.1f} tok/s), "
            f"generated {res.generated_tokens} tokens in {res.decode_s:.3f} s ({res.decode_tps:.1f} tok/s), "
            f"first token after {res.ttft_s:.3f} s, finish: {res.finish_reason}{extra}")
    err("stats: " + model_stats_line(model.stats()))


def model_stats_line(st: dict) -> str:
    """Threads, checkpoint size and expert-cache figures from model.stats()."""
    ec = st.get("expert_cache")
    line = f"threads {st.get('threads')}, checkpoint {gb(st.get('checkpoint_bytes', 0))}"
    if isinstance(ec, dict) and ec:
        line += (f", expert cache {ec.get('policy')} {gb(ec.get('budget_bytes', 0))}: hit rate "
                 f"{ec.get('hit_rate', 0):.1%} ({ec.get('lookups', 0)} lookups), read {gb(ec.get('bytes_read', 0))}, "
                 f"{ec.get('evictions', 0)} evictions")
    return line


def context_note(res, model) -> None:
    if res is not None and res.context_full:
        err(f"note: the context ({model.context} tokens) is full: stopped after {res.generated_tokens} tokens "
            "(pass a larger --context, up to the model's sequence_len)")


def main(argv: list[str] | None = None) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="replace")
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdin.reconfigure(errors="replace")       # bytes that are not UTF-8 -> U+FFFD
    sys.unraisablehook = _unraisable(sys.unraisablehook)
    try:
        app(args=argv)
    except BrokenPipeError:          # e.g. `grok-cli generate ... | head -1`
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")
        sys.exit(1)

