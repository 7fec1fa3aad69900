"""`main()`: the parser with its subcommands, and how each kind of failure ends a run.

Subcommands are registered in one place, `_subcommands()`: a subcommand is a function
`add_parser(subparsers)` that adds its parser and calls `set_defaults(func=run)` with
`run(args) -> int`. A `jaxpp/bench` package exposing `add_parser` is picked up automatically.

jax, the engine and tqdm are imported only when a command runs, so `--help` stays cheap.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator

from jaxpp.cli import convert, generate, launch, plan, serve
from jaxpp.cli.engine_adapter import EngineFailure
from jaxpp.cli.errorlog import TracebackLog, log_path_for
from jaxpp.cli.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_LINE_ERRORS,
    EXIT_USAGE,
    OutputError,
    UsageError,
    one_line,
)
from jaxpp.cli.flags import add_generate_parser, model_in_argv

PROG = generate.PROG


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line on stderr (plus a pointer to --help), exit 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _optional_subcommands() -> Iterator[Callable]:
    """Subcommands that live in their own modules and may not exist (yet)."""
    if importlib.util.find_spec("jaxpp.bench") is not None:
        from jaxpp import bench  # noqa: PLC0415

        yield bench.add_parser


# THE place where subcommands are registered.
def _subcommands(argv: list[str]) -> Iterator[Callable]:
    yield functools.partial(
        add_generate_parser, run=generate.run_generate, model_dir=model_in_argv(argv)
    )
    yield functools.partial(serve.add_parser, argv=argv)
    yield launch.add_parser
    yield convert.add_parser
    yield from _optional_subcommands()
    yield plan.add_parser


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `jaxpp` parser; `argv` (default sys.argv[1:]) only picks the model whose
    generation_config.json defaults `generate --help` shows."""
    parser = _Parser(
        prog=PROG,
        description="jaxpp: pipeline-parallel LLM inference on JAX.",
        epilog="Run 'jaxpp COMMAND --help' for a command's options, input and output formats "
        "and exit codes. Full reference: docs/cli.md.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add_parser in _subcommands(sys.argv[1:] if argv is None else argv):
        add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except UsageError as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted{_kept(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `jaxpp generate ... | head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the exit-time flush
        except OSError:
            pass
        return EXIT_LINE_ERRORS
    except Exception as e:  # noqa: BLE001 - not any request's fault: an internal error
        return _internal_error(args, e)


def _kept(args: argparse.Namespace) -> str:
    """What a stopped run keeps: only generate writes answers that --resume goes on from."""
    return "; answered lines are kept (rerun with --resume)" if args.command == "generate" else ""


def _internal_error(args: argparse.Namespace, error: Exception) -> int:
    """One line on stderr naming the log file that holds the traceback; exit 3."""
    where = TracebackLog(log_path_for(getattr(args, "output", None))).record(
        "internal error", error
    )
    if isinstance(error, EngineFailure):
        what = f"the engine failed, even on a one-token canary request: {error}"
    elif isinstance(error, OutputError):
        what = str(error)
    else:
        what = f"internal error: {type(error).__name__}: {error}"
    print(f"{PROG}: error: {one_line(what, 300)}{_kept(args)}; {where}", file=sys.stderr)
    return EXIT_INTERNAL
