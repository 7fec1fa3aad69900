"""`jaxpp generate`: set up (every check that can fail before any line runs), run, report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from jaxpp import DEMO_MODEL
from jaxpp.cli.errorlog import TracebackLog, log_path_for
from jaxpp.cli.errors import EXIT_LINE_ERRORS, EXIT_OK, UsageError, one_line
from jaxpp.cli.flags import engine_config
from jaxpp.cli.formats import RequestBuilder
from jaxpp.cli.limits import Limits
from jaxpp.cli.lines import OversizedLine, count_lines, read_lines
from jaxpp.cli.preflight import check_flags, model_config
from jaxpp.cli.processes import check_same_job, join
from jaxpp.cli.progress import BAR, LINES, Progress
from jaxpp.cli.resume import Answered, drop_errors, scan_output
from jaxpp.cli.runner import Runner
from jaxpp.cli.sinks import FileSink, NullSink, StdoutSink, TextSink
from jaxpp.distributed import barrier

PROG = "jaxpp"


def provide_cpu_devices(devices: int) -> None:
    """On a CPU-only host, simulate enough devices for a one-process mesh (before jax starts
    its backends; JAX_NUM_CPU_DEVICES or a multi-process job decides otherwise)."""
    import jax  # noqa: PLC0415

    if (
        "JAX_NUM_CPU_DEVICES" not in os.environ
        and devices > 1
        and not jax.distributed.is_initialized()
    ):
        try:
            jax.config.update("jax_num_cpu_devices", devices)
        except Exception:  # noqa: BLE001 - backends already up: keep what there is
            pass


def load_llm(args: argparse.Namespace):
    """Build the LLM for `args` (a seam: tests swap in a fake or a cached one)."""
    provide_cpu_devices(args.dp * args.pp * args.tp)
    from jaxpp import LLM  # noqa: PLC0415

    return LLM(args.model, engine_config(args))


def loaded_llm(args: argparse.Namespace):
    """The LLM and its tokenizer, loaded before any line runs: a broken checkpoint or tokenizer
    is the model dir's problem (exit 2), not every request's."""
    try:
        llm = load_llm(args)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        raise UsageError(one_line(e) or repr(e)) from None
    try:
        llm.tokenizer  # noqa: B018 - loaded on first use: make that now
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise UsageError(
            f"cannot load the tokenizer of {args.model}: {type(e).__name__}: {one_line(e, 300)}"
        ) from None
    return llm


def _progress_mode(args: argparse.Namespace) -> str | None:
    if args.quiet or args.prompt is not None:
        return None
    return BAR if sys.stderr.isatty() else LINES


def sampling_defaults(args: argparse.Namespace) -> dict:
    """Flags given > the model's generation_config.json > SamplingParams' (vLLM's) defaults."""
    from jaxpp.config import SamplingParams, generation_defaults  # noqa: PLC0415

    flags = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
    }
    fallback = {**dataclasses.asdict(SamplingParams()), **generation_defaults(args.model)}
    return {
        **{k: fallback[k] if v is None else v for k, v in flags.items()},
        "min_tokens": args.min_tokens,
        "stop": list(args.stop),
        "stop_token_ids": list(args.stop_token_ids),
        "ignore_eos": args.ignore_eos,
        "logprobs": args.logprobs,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "skip_special_tokens": args.skip_special_tokens,
    }


def limits_of(args: argparse.Namespace) -> Limits:
    return Limits(
        max_line_bytes=args.max_line_bytes,
        max_seqs_per_request=args.max_seqs_per_request,
        max_logprobs=args.max_logprobs,
    )


def input_lines(
    args: argparse.Namespace,
) -> tuple[Iterable[bytes | OversizedLine], int | None, Callable]:
    """(lines, total or None, close)."""
    if args.prompt is not None:
        obj = (
            {"messages": [{"role": "user", "content": args.prompt}]}
            if args.chat
            else {"prompt": args.prompt}
        )
        return [json.dumps(obj).encode()], 1, lambda: None
    if args.input == "-":
        return read_lines(sys.stdin.buffer, args.max_line_bytes), None, lambda: None
    path = Path(args.input)
    try:
        with open(path, "rb") as f:
            total = count_lines(f)
        f = open(path, "rb")  # noqa: SIM115 - closed by the returned callable
    except OSError as e:
        raise UsageError(f"cannot read --input {path}: {e.strerror}") from None
    return read_lines(f, args.max_line_bytes), total, f.close


def _sink(args: argparse.Namespace, from_file: bool) -> tuple:
    """Where answers go, and what an --output file being resumed already answers."""
    if not from_file:
        return TextSink(
            PROG
        ) if args.prompt is not None and args.output is None else StdoutSink(), Answered()
    out_path = Path(args.output)
    if out_path.exists() and out_path.stat().st_size > 0 and not args.resume:
        raise UsageError(
            f"--output {out_path} exists and is not empty: pass --resume "
            "to continue it, or remove it"
        )
    sink = FileSink(out_path)  # takes the file's lock before reading it back
    try:
        answered = scan_output(out_path)
        if args.retry_errors and drop_errors(out_path, sink):
            answered = scan_output(out_path)
    except BaseException:
        sink.close()
        raise
    return sink, answered


def run_generate(args: argparse.Namespace) -> int:
    if args.chat and args.prompt is None:
        raise UsageError("--chat goes with --prompt (input lines choose with 'messages')")
    from_file = args.output not in (None, "-")
    if args.retry_errors and not args.resume:
        raise UsageError("--retry-errors goes with --resume (it re-runs a file's error lines)")
    if args.resume and not from_file:
        raise UsageError(
            "--resume needs --output FILE (answers already written are read back from it)"
        )
    if from_file and args.input not in (None, "-"):
        if Path(args.output).resolve() == Path(args.input).resolve():
            raise UsageError("--output is the --input file")
    model = Path(args.model) if args.model else DEMO_MODEL
    if not model.is_dir():
        hint = "" if args.model else " (the embedded demo model is missing; pass --model DIR)"
        raise UsageError(f"model dir {model} does not exist{hint}")
    if not (model / "config.json").is_file():
        raise UsageError(
            f"model dir {model} has no config.json: expected a Hugging Face model directory"
        )
    args.model = str(model)
    config = model_config(model)
    defaults = sampling_defaults(args)
    limits = limits_of(args)
    check_flags(args, model, config, defaults, limits)
    primary = join(args) == 0  # process 0 writes; the others run the same work silently
    sink, answered = _sink(args, from_file) if primary else (NullSink(), Answered())
    barrier("output file read back")  # process 0 has repaired it: the others may read it
    if not primary and args.resume:
        answered = scan_output(Path(args.output))
    check_same_job(args, answered.ids)
    lines, total, close_input = input_lines(args)

    log = TracebackLog(log_path_for(args.output))
    try:
        llm = loaded_llm(args)
        builder = RequestBuilder(
            llm, defaults, args.seed, model.name, limits, tool_call_parser=args.tool_call_parser
        )
        progress = Progress(
            _progress_mode(args) if primary else None,
            total,
            initial=min(answered.records, total or answered.records),
            interval=args.progress_interval,
            prog=PROG,
        )
        runner = Runner(llm, builder, sink, progress, args.batch_size, log)
        started = time.perf_counter()
        try:
            runner.run(lines, answered)
        finally:
            progress.close()
            if primary and not args.quiet and args.prompt is None:
                elapsed = time.perf_counter() - started
                print(
                    f"{PROG}: {runner.done} answered, {runner.errors} with errors, "
                    f"{runner.skipped} already answered; {progress.tokens} tokens in "
                    f"{elapsed:.1f} s ({progress.tokens / max(elapsed, 1e-9):.1f} tok/s)",
                    file=sys.stderr,
                )
    finally:
        close_input()
        sink.close()
    if primary and log.entries:
        print(
            f"{PROG}: {log.entries} unexpected failure(s) of single requests; their tracebacks "
            f"are in {log.path}",
            file=sys.stderr,
        )
    return EXIT_LINE_ERRORS if runner.errors + answered.errors else EXIT_OK
