"""The `jaxpp` command line: batch generation over JSONL files that never loses work, and that
no input can sink.

    jaxpp generate --input prompts.jsonl --output answers.jsonl [--resume [--retry-errors]]
    jaxpp generate --prompt "def fibonacci(n):" --max-tokens 64
    jaxpp serve --port 8000          (an OpenAI-compatible server: docs/serve.md)

One module per job:

    app.py             main(): the parser, subcommands, and how each kind of failure ends a run
    flags.py           the flags and help of `generate`
    generate.py        `generate`: checks before loading, the model, sinks, summary, exit status
    serve.py           `serve`: the OpenAI-compatible HTTP server (jaxpp/server)
    processes.py       a job run by several processes: the flags that join them, same-job checks
    launch.py          `launch`: a command as several local processes (CPU devices, gloo)
    convert.py         `convert`: a HF model as an orbax checkpoint in the engine's layout
    lines.py           input lines, read in bounded memory
    formats.py         the JSONL request formats: a line -> a Job, or a RequestError
    limits.py          bounds on what one request may ask for
    guard.py           THE per-request guard: any failure of one request -> its error line
    engine_adapter.py  THE engine seam: all calls into LLM, isolation of a failing request
    runner.py          the run loop: lines -> guard -> engine -> guard -> answer records
    records.py         answer and error records (plain and OpenAI batch shapes)
    resume.py          what an existing output file already answers
    sinks.py           where answer lines go (fsync'd file, stdout, text)
    progress.py        progress on stderr
    errors.py          the kinds of failure and the exit statuses
    errorlog.py        the log file tracebacks go to

Every answered line is written, flushed and fsync'd as soon as its request finishes; `--resume`
skips the lines already answered in the output file, so a run killed at any moment (SIGKILL
included) and resumed answers every input line exactly once. See docs/cli.md.
"""

from jaxpp.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
