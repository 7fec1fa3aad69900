"""`jaxpp serve`: the OpenAI-compatible HTTP server (jaxpp/server).

    jaxpp serve [--model DIR] [--pp N --tp N ...] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
    jaxpp launch --nproc 2 --devices-per-process 2 -- serve --pp 4 ...   (or --coordinator ...)

It checks the flags and loads the model as `generate` does, then serves until Ctrl-C or
SIGTERM: new requests are refused from then on, those in flight get up to --grace seconds to
finish, the rest are aborted, exit 0. With several processes, process 0 serves HTTP and the
others follow its engine loop step by step (jaxpp/server/loop.py); they ignore Ctrl-C and
SIGTERM and exit when process 0 stops.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path
from typing import Any, NamedTuple

from jaxpp import DEMO_MODEL
from jaxpp.cli.errors import EXIT_OK, UsageError
from jaxpp.cli.flags import (
    _positive_float,
    _positive_int,
    add_engine_flags,
    add_limit_flags,
    add_model_flags,
    add_sampling_flags,
    add_tool_flags,
    model_in_argv,
)
from jaxpp.cli.preflight import check_flags, model_config
from jaxpp.cli.processes import add_process_flags, check_same_job, join

DEFAULT_PORT = 8000
GRACE_S = 30.0
SWITCH_INTERVAL_S = 0.0005


def add_parser(subparsers, argv: list[str] | None = None) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the model over HTTP: OpenAI's /v1/completions and /v1/chat/completions",
        description="An OpenAI-compatible server on the continuous-batching engine "
        "(docs/serve.md).",
        allow_abbrev=False,
    )
    net = p.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    net.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: 8000")
    net.add_argument(
        "--api-key",
        default=os.environ.get("JAXPP_API_KEY"),
        help="requests to /v1/ must send 'Authorization: Bearer KEY' (default: $JAXPP_API_KEY, "
        "none)",
    )
    net.add_argument(
        "--served-model-name", help="the model name clients send (default: the model dir's)"
    )
    net.add_argument(
        "--max-waiting",
        type=_positive_int,
        default=1024,
        metavar="N",
        help="sequences queued beyond the running ones; past it a request gets 503 (default: 1024)",
    )
    net.add_argument(
        "--disable-log-requests",
        action="store_true",
        help="no access log line per request (client, method, route, status, prompt+generated "
        "tokens, seconds) on stderr",
    )
    net.add_argument(
        "--grace",
        type=_positive_float,
        default=GRACE_S,
        metavar="SECONDS",
        help=f"on Ctrl-C / SIGTERM, how long requests in flight may finish (default: "
        f"{GRACE_S:.0f})",
    )
    add_model_flags(p)
    engine = p.add_argument_group("engine")
    add_engine_flags(engine)
    add_limit_flags(p)
    add_sampling_flags(p, model_in_argv(argv or []))
    add_tool_flags(p)
    add_process_flags(p)
    p.set_defaults(func=run_serve)


class Prepared(NamedTuple):
    app: Any  # the FastAPI app
    loop: Any  # jaxpp.server.loop.EngineLoop, not started
    builder: Any  # jaxpp.cli.formats.RequestBuilder
    metrics: Any  # jaxpp.server.metrics.Metrics
    name: str  # the served model name


def prepare(args: argparse.Namespace, exchange=None) -> Prepared:
    """Check the flags, load the model, build the engine loop and the app. `exchange`: how
    the loop's commands reach the other processes (none: one process)."""
    from jaxpp.cli.formats import RequestBuilder  # noqa: PLC0415
    from jaxpp.cli.generate import loaded_llm  # noqa: PLC0415
    from jaxpp.server.app import build_app  # noqa: PLC0415
    from jaxpp.server.loop import EngineLoop  # noqa: PLC0415
    from jaxpp.server.metrics import Metrics  # noqa: PLC0415

    defaults, limits = _checked(args)
    llm = loaded_llm(args)
    # Every program the traffic can meet, before the port opens: /health answers only when
    # no request will wait for a compilation.
    llm.warmup(log=lambda line: print(f"jaxpp serve: {line}", flush=True))
    name = args.served_model_name or Path(args.model).name
    builder = RequestBuilder(
        llm,
        defaults,
        args.seed,
        name,
        limits,
        streaming=True,
        tool_call_parser=args.tool_call_parser,
    )
    metrics = Metrics(llm, name)
    loop = EngineLoop(
        llm, llm.max_num_seqs + args.max_waiting, metrics.observe, exchange or (lambda w: w)
    )
    app = build_app(loop, builder, metrics, name, args.api_key, not args.disable_log_requests)
    return Prepared(app, loop, builder, metrics, name)


def _checked(args: argparse.Namespace) -> tuple[dict, Any]:
    """The flags checked against the model dir: (sampling defaults, limits)."""
    from jaxpp.cli.generate import limits_of, sampling_defaults  # noqa: PLC0415

    model = Path(args.model) if args.model else DEMO_MODEL
    if not (model / "config.json").is_file():
        raise UsageError(f"model dir {model} has no config.json: expected a Hugging Face model")
    args.model = str(model)
    defaults, limits = sampling_defaults(args), limits_of(args)
    check_flags(args, model, model_config(model), defaults, limits)
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port {args.port} is invalid: expected 0-65535")
    return defaults, limits


def run_serve(args: argparse.Namespace) -> int:
    import sys  # noqa: PLC0415

    import uvicorn  # noqa: PLC0415

    from jaxpp.distributed import broadcast_json  # noqa: PLC0415
    from jaxpp.server.app import ACCESS  # noqa: PLC0415

    _checked(args)
    process = join(args)
    check_same_job(args, set())
    if process != 0:
        return _follow(args)
    app, loop, *_ = prepare(args, broadcast_json)
    # The engine thread waits for the device with the GIL released; when the result is there
    # it should get the GIL back from the HTTP thread at once, not after Python's default 5 ms.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    loop.start()
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=int(args.grace),
    )
    server = uvicorn.Server(config)
    # uvicorn handles Ctrl-C / SIGTERM itself (stop accepting, wait for open connections up to
    # --grace), then raises the signal again for the handler it found: make that one a no-op,
    # so that the process drains the engine and exits 0 instead of dying of the signal.
    _ignore_stop_signals()
    _log_to_stderr(ACCESS)
    print(f"jaxpp serve: http://{args.host}:{args.port}/v1 (model {args.model})", flush=True)
    try:
        server.run()  # returns after Ctrl-C / SIGTERM, once connections closed or grace ran out
    finally:
        loop.drain(grace=0.0)
    return EXIT_OK


def _follow(args: argparse.Namespace) -> int:
    """A process other than 0: the same engine, stepped as process 0's loop says, until it
    stops (a Ctrl-C or SIGTERM reaching this process waits for that)."""
    from jaxpp.cli.generate import loaded_llm  # noqa: PLC0415
    from jaxpp.distributed import broadcast_json  # noqa: PLC0415
    from jaxpp.server.loop import follow  # noqa: PLC0415

    _ignore_stop_signals()
    llm = loaded_llm(args)
    llm.warmup()  # the same programs in the same order as process 0's
    follow(llm, broadcast_json)
    return EXIT_OK


def _log_to_stderr(logger: logging.Logger) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _ignore_stop_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
