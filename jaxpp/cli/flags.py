"""The flags of `jaxpp generate`: its parser, help text and argument types."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from jaxpp import DEMO_MODEL
from jaxpp.cli.limits import (
    DEFAULT_MAX_LINE_BYTES,
    DEFAULT_MAX_LOGPROBS,
    DEFAULT_MAX_SEQS_PER_REQUEST,
)
from jaxpp.cli.processes import add_process_flags
from jaxpp.config import (
    GENERATION_CONFIG_FIELDS,
    EngineConfig,
    SamplingParams,
    generation_defaults,
)
from jaxpp.quantization import QUANTIZATION_CHOICES

DTYPE_CHOICES = ("float32", "bfloat16", "float16")

GENERATE_EPILOG = """\
input lines (JSONL, one request per line; ids must be unique):
  {"id": "q1", "prompt": "def add(a, b):", "max_tokens": 32, "temperature": 0}
  {"id": "q2", "prompt": [1, 415, 2936]}                      token ids instead of text
  {"id": "c1", "messages": [{"role": "user", "content": "hi"}]}   via the chat template
  {"custom_id": "r1", "method": "POST", "url": "/v1/completions",
   "body": {"model": "x", "prompt": "Hello", "max_tokens": 16, "n": 2}}   OpenAI batch line
  {"custom_id": "r2", "method": "POST", "url": "/v1/chat/completions",
   "body": {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}}
  "id" defaults to the 1-based line number. Sampling fields on a line override the flags:
  max_tokens min_tokens temperature top_k top_p min_p seed stop stop_token_ids ignore_eos
  logprobs presence_penalty frequency_penalty repetition_penalty skip_special_tokens.

output lines (written and fsync'd as each request finishes, so NOT in input order):
  {"id": "q1", "prompt": "...", "text": "...", "token_ids": [...], "finish_reason": "length",
   "usage": {"prompt_tokens": 5, "completion_tokens": 32}}
  {"id": 7, "line": 7, "error": "SamplingParams.top_p=2 is invalid: expected in (0, 1]",
   "code": "invalid_request"}
  OpenAI lines are answered in the OpenAI batch output shape:
  {"id": "batch_req_...", "custom_id": "r1", "response": {"status_code": 200,
   "request_id": "...", "body": {"object": "text_completion", "choices": [...],
   "usage": {...}}}, "error": null}
  {"id": "batch_req_...", "custom_id": "r2", "response": null,
   "error": {"code": "invalid_request", "message": "..."}, "line": 9}

resume: an existing non-empty --output is refused unless --resume is given; --resume drops a
  torn last line, then answers only the input lines not yet answered in the file;
  --resume --retry-errors first removes the file's error lines, so those lines run again.

exit status:
  0  every line answered without error
  1  at least one line (in this run or, with --resume, earlier) got an error line
  2  bad flag, missing model, unusable input/output file: one line on stderr, nothing run
  3  internal error (the engine failed even on a canary request, --output cannot be written,
     or a jaxpp bug): what was answered is kept; one line on stderr names the log file that
     holds the traceback; fix the cause and rerun with --resume
  130 interrupted (Ctrl-C): what was answered is kept; rerun with --resume

Full reference: docs/cli.md.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def model_in_argv(argv: list[str]) -> Path:
    """The --model an argument list names (the demo model if none), read before parsing so that
    --help can show the defaults that model's generation_config.json sets."""
    for i, arg in enumerate(argv):
        if arg in ("--model", "-m") and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--model="):
            return Path(arg.split("=", 1)[1])
        if arg.startswith("-m") and len(arg) > 2 and not arg.startswith("--"):
            return Path(arg[2:])
    return DEMO_MODEL


def defaults_for_help(model_dir: Path) -> dict[str, str]:
    """ "default: X" for each sampling flag generation_config.json may set, naming the file when
    the value comes from it: what a run with that model will actually use."""
    built_in = dataclasses.asdict(SamplingParams())
    recommended = generation_defaults(model_dir) if model_dir.is_dir() else {}
    where = f"{model_dir.name}/generation_config.json"
    return {
        field: f"default: {recommended[field]}, from {where}"
        if field in recommended
        else f"default: {built_in[field]}"
        for field in GENERATION_CONFIG_FIELDS.values()
    }


def add_generate_parser(subparsers, run, model_dir: Path = DEMO_MODEL) -> None:
    """Register `generate` on argparse subparsers; `run(args) -> int` executes it. `model_dir`
    is the model whose generation_config.json supplies the defaults --help shows."""
    p = subparsers.add_parser(
        "generate",
        help="generate completions for a JSONL file (or one --prompt)",
        description="Generate completions for every line of a JSONL file, or for one --prompt.\n"
        "Answers stream to --output as requests finish; --resume continues a killed run.",
        epilog=GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # A misspelled flag is an error, never a silent prefix match (--max-token is not
        # --max-tokens), as a misspelled field of an input line is.
        allow_abbrev=False,
    )
    io = p.add_argument_group("input and output")
    src = io.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", "-i", metavar="FILE", help="JSONL requests ('-' = stdin)")
    src.add_argument(
        "--prompt",
        "-p",
        metavar="TEXT",
        help="one prompt; prints its completion text (or, with --output, its JSON line)",
    )
    io.add_argument(
        "--chat",
        action="store_true",
        help="with --prompt: send TEXT as a user message through the chat template",
    )
    io.add_argument(
        "--output", "-o", metavar="FILE", help="JSONL answers (default: stdout; '-' = stdout)"
    )
    io.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run: keep --output, skip answered ids",
    )
    io.add_argument(
        "--retry-errors",
        action="store_true",
        help="with --resume: answer again the lines whose stored answer is an error line "
        "(after fixing them), keeping every other answer",
    )
    io.add_argument(
        "--quiet", "-q", action="store_true", help="no progress and no summary on stderr"
    )
    io.add_argument(
        "--progress-interval",
        type=_positive_float,
        default=5.0,
        metavar="SECONDS",
        help="when stderr is not a terminal (nohup, CI): one progress line this often, "
        "instead of a bar (default: 5)",
    )

    add_limit_flags(p)
    add_model_flags(p)
    cb = p.add_argument_group(
        "continuous batching (lines stream into the engine; a slot refills as soon as its "
        "request finishes, and each answer is written then)"
    )
    cb.add_argument(
        "--batch-size",
        type=_positive_int,
        default=256,
        metavar="N",
        help="sequences kept queued in the engine beyond its slots: input is read this far "
        "ahead so the slots never wait for it, and no further, so memory stays bounded "
        "(default: 256)",
    )
    add_engine_flags(cb)
    add_sampling_flags(p, model_dir)
    add_tool_flags(p)
    add_process_flags(p)
    p.set_defaults(func=run)


def add_limit_flags(p: argparse.ArgumentParser) -> None:
    """What one request may ask for (generate and serve)."""
    lim = p.add_argument_group(
        "limits (a request over one gets an error line with code limit_exceeded)"
    )
    lim.add_argument(
        "--max-line-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_LINE_BYTES,
        metavar="N",
        help=f"longest input line, so largest prompt (default: {DEFAULT_MAX_LINE_BYTES})",
    )
    lim.add_argument(
        "--max-seqs-per-request",
        type=_positive_int,
        default=DEFAULT_MAX_SEQS_PER_REQUEST,
        metavar="N",
        help="most sequences one request may ask for: an OpenAI line's n x prompts "
        f"(default: {DEFAULT_MAX_SEQS_PER_REQUEST})",
    )
    lim.add_argument(
        "--max-logprobs",
        type=_positive_int,
        default=DEFAULT_MAX_LOGPROBS,
        metavar="N",
        help=f"largest logprobs / top_logprobs a request may ask for (default: "
        f"{DEFAULT_MAX_LOGPROBS})",
    )


def add_tool_flags(p: argparse.ArgumentParser) -> None:
    """Tool calling's tool_choice "auto" (generate and serve), with vLLM's flag names."""
    from jaxpp.cli.tools import PARSERS  # noqa: PLC0415

    t = p.add_argument_group("tool calling")
    t.add_argument(
        "--tool-call-parser",
        choices=PARSERS,
        default=None,
        help='how tool_choice "auto" reads tool calls from the text: hermes (<tool_call> JSON: '
        'Hermes, Qwen2/2.5/3) or llama3_json (Llama 3.1+); without it "auto" is refused',
    )
    t.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='accepted as vLLM spells it: --tool-call-parser alone enables "auto"',
    )


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The model and its layout over devices (generate and serve)."""
    m = p.add_argument_group("model and parallelism")
    m.add_argument(
        "--model",
        "-m",
        default=None,
        metavar="DIR",
        help="Hugging Face model dir (default: the embedded demo model)",
    )
    m.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: the checkpoint's dtype")
    add_quantization_flag(m)
    m.add_argument("--pp", type=_positive_int, default=1, help="pipeline stages (default: 1)")
    m.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel ways (default: 1)")
    m.add_argument(
        "--dp", type=_positive_int, default=1, help="data-parallel replicas (default: 1)"
    )
    m.add_argument(
        "--layer-partition",
        metavar="N,N,...",
        help="layers per stage, e.g. 10,11,11 (default: even split)",
    )
    m.add_argument(
        "--num-microbatches",
        type=_positive_int,
        metavar="N",
        help="micro-batches in flight (default: pp; must be >= pp)",
    )
    m.add_argument(
        "--max-model-len",
        type=_positive_int,
        metavar="N",
        help="longest prompt + completion (default: the model's max positions)",
    )


def engine_config(args: argparse.Namespace, **overrides) -> EngineConfig:
    """The EngineConfig a command line asks for: each field from the flag of its name (one a
    command lacks, or leaves unset, keeps EngineConfig's default), then `overrides`."""
    fields = (f.name for f in dataclasses.fields(EngineConfig))
    values = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    return EngineConfig(**{**values, **overrides})


def add_quantization_flag(group) -> None:
    """--quantization (generate, serve, convert, plan, bench): FP8 weights from a float model."""
    group.add_argument(
        "--quantization",
        choices=QUANTIZATION_CHOICES,
        help="fp8: quantize a float checkpoint's linear weights to float8_e4m3fn on load, per "
        "output channel (an FP8 checkpoint loads as FP8 without it; docs/fp8.md)",
    )


def add_engine_flags(group) -> None:
    """The engine's batching and KV-cache flags (generate and serve), into `group`."""
    group.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        metavar="N",
        help="sequences decoded at once, rounded up to a multiple of dp x micro-batches "
        "(default: the engine's, 256)",
    )
    group.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        metavar="N",
        help="tokens a micro-batch carries per tick: its decode tokens, then prompt tokens "
        "of as many requests as fit (default: the engine's, 2048 on a CPU, 8192 on a GPU)",
    )
    group.add_argument(
        "--block-size",
        type=_positive_int,
        metavar="N",
        help="positions per KV page (default: the engine's, 16)",
    )
    group.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV pages of a prompt's longest cached prefix (default: on)",
    )
    group.add_argument(
        "--kv-cache-memory",
        type=_positive_int,
        metavar="BYTES",
        help="KV page pool per device (default: the engine's, 90%% of an accelerator's free "
        "memory, 1 GiB per CPU process)",
    )
    add_speculative_flag(group)


def add_speculative_flag(group) -> None:
    """--speculative-config (generate, serve, bench): vLLM's JSON, prompt lookup or a draft
    model."""
    group.add_argument(
        "--speculative-config",
        metavar="JSON",
        help='speculative decoding, vLLM\'s keys: \'{"method": "ngram", '
        '"num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\' '
        "(drafts found in the sequence's own text) or '{\"model\": DIR, "
        '"num_speculative_tokens": 3, "draft_window": 32}\' (a small draft model with the '
        "same vocabulary); verified inside the ring, greedy and seeded outputs unchanged "
        "(docs/pipeline.md)",
    )


def add_sampling_flags(p: argparse.ArgumentParser, model_dir: Path) -> None:
    """Sampling defaults: a request's own fields override them (generate and serve)."""
    s = p.add_argument_group(
        "sampling defaults (a line's own fields override them; where a flag is not given, "
        "the model's generation_config.json, then vLLM's defaults, decide)"
    )
    shown = defaults_for_help(model_dir)
    s.add_argument("--max-tokens", type=int, help=shown["max_tokens"])
    s.add_argument("--min-tokens", type=int, default=0, help="default: 0")
    s.add_argument("--temperature", type=float, help=f"0 = greedy ({shown['temperature']})")
    s.add_argument("--top-p", type=float, help=shown["top_p"] + " (1.0 = off)")
    s.add_argument("--top-k", type=int, help=shown["top_k"] + " (0 = off)")
    s.add_argument("--min-p", type=float, help=shown["min_p"] + " (0.0 = off)")
    s.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="base seed: a request without its own seed gets one derived from this "
        "and its id, so answers do not depend on batching or resuming (default: 0)",
    )
    s.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)"
    )
    s.add_argument(
        "--stop-token-ids",
        type=_int_list,
        default=[],
        metavar="ID,ID,...",
        help="token ids that end a completion",
    )
    s.add_argument("--ignore-eos", action="store_true", help="keep going past EOS")
    s.add_argument(
        "--logprobs", type=int, metavar="N", help="return the chosen token's logprob and the top N"
    )
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument(
        "--repetition-penalty", type=float, help=shown["repetition_penalty"] + " (1.0 = off)"
    )
    s.add_argument(
        "--skip-special-tokens",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="drop special tokens from the text (default: yes)",
    )
