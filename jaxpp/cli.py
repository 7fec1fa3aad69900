"""The `jaxpp` command line: batch generation over JSONL files that never loses work.

    jaxpp generate --input prompts.jsonl --output answers.jsonl [--resume]
    jaxpp generate --prompt "def fibonacci(n):" --max-tokens 64

Input lines are plain (`{"id", "prompt" | "messages", <sampling fields>}`) or OpenAI batch
requests (`{"custom_id", "method", "url", "body"}`); see docs/cli.md and `jaxpp generate --help`.
Every answered line is written, flushed and fsync'd as soon as its request finishes; `--resume`
skips the lines already answered in the output file, so a run killed at any moment (SIGKILL
included) and resumed answers every input line exactly once.

Subcommands are registered in one place, `_SUBCOMMANDS` / `build_parser`: a subcommand is a
function `add_parser(subparsers)` that adds its parser and calls `set_defaults(func=run)` with
`run(args) -> int`. A `jaxpp/bench.py` module exposing `add_parser` is picked up automatically.

jax, the engine and tqdm are imported only when a command runs, so `--help` stays cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

PROG = "jaxpp"
EXIT_OK, EXIT_LINE_ERRORS, EXIT_USAGE, EXIT_ENGINE = 0, 1, 2, 3

DEFAULT_MODEL = Path(__file__).resolve().parent / "demo_model"
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
OPENAI_URLS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}

# Sampling fields a plain line may set (the names of jaxpp.SamplingParams; kept here so that
# building the parser needs no engine import; test_cli checks it against the dataclass).
SAMPLING_FIELDS = (
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "logprobs",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "skip_special_tokens",
)
# OpenAI body fields mapped onto SamplingParams (the vLLM extras top_k, min_p, ... included).
_OPENAI_SAMPLING = (
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "min_tokens",
    "repetition_penalty",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
)
_OPENAI_IGNORED = ("model", "user", "metadata", "store", "service_tier")
_OPENAI_BODY = {
    "completion": {
        "prompt",
        "n",
        "logprobs",
        "echo",
        "stream",
        *_OPENAI_SAMPLING,
        *_OPENAI_IGNORED,
    },
    "chat": {
        "messages",
        "n",
        "logprobs",
        "top_logprobs",
        "max_completion_tokens",
        "stream",
        *_OPENAI_SAMPLING,
        *_OPENAI_IGNORED,
    },
}
_OPENAI_KEYS = {"custom_id", "method", "url", "body"}


class UsageError(Exception):
    """A problem with the command line or its files: one line on stderr, exit status 2."""


# --- argument parsing ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line on stderr (plus a pointer to --help), exit 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


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
  {"id": 7, "line": 7, "error": "SamplingParams.top_p=2 is invalid: expected in (0, 1]"}
  OpenAI lines are answered in the OpenAI batch output shape:
  {"id": "batch_req_...", "custom_id": "r1", "response": {"status_code": 200,
   "request_id": "...", "body": {"object": "text_completion", "choices": [...],
   "usage": {...}}}, "error": null}
  {"id": "batch_req_...", "custom_id": "r2", "response": null,
   "error": {"code": "invalid_request", "message": "..."}, "line": 9}

resume: an existing non-empty --output is refused unless --resume is given; --resume drops a
  torn last line, then answers only the input lines not yet answered in the file.

exit status:
  0  every line answered without error
  1  at least one line (in this run or, with --resume, earlier) got an error line
  2  bad flag, missing model, unusable input/output file: one line on stderr, nothing run
  3  the engine failed mid-run: what was answered is kept; rerun with --resume
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


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate completions for a JSONL file (or one --prompt)",
        description="Generate completions for every line of a JSONL file, or for one --prompt.\n"
        "Answers stream to --output as requests finish; --resume continues a killed run.",
        epilog=GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        "--batch-size",
        type=_positive_int,
        default=256,
        metavar="N",
        help="sequences per generate call: answers are written after each call (default: 256)",
    )
    io.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bar and no summary on stderr"
    )

    m = p.add_argument_group("model and parallelism")
    m.add_argument(
        "--model",
        "-m",
        default=None,
        metavar="DIR",
        help="Hugging Face model dir (default: the embedded demo model)",
    )
    m.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: the checkpoint's dtype")
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

    s = p.add_argument_group(
        "sampling defaults (a line's own fields override them; where a flag is not given, "
        "the model's generation_config.json, then vLLM's defaults, decide)"
    )
    s.add_argument("--max-tokens", type=int, help="default: 16")
    s.add_argument("--min-tokens", type=int, default=0, help="default: 0")
    s.add_argument("--temperature", type=float, help="0 = greedy (default: 1.0)")
    s.add_argument("--top-p", type=float, help="default: 1.0 (off)")
    s.add_argument("--top-k", type=int, help="default: 0 (off)")
    s.add_argument("--min-p", type=float, help="default: 0.0 (off)")
    s.add_argument(
        "--seed",
        type=int,
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
    s.add_argument("--repetition-penalty", type=float, help="default: 1.0 (off)")
    s.add_argument(
        "--skip-special-tokens",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="drop special tokens from the text (default: yes)",
    )
    p.set_defaults(func=run_generate)


def _optional_subcommands() -> Iterator[Callable]:
    """Subcommands that live in their own modules and may not exist (yet)."""
    if importlib.util.find_spec("jaxpp.bench") is not None:
        from jaxpp import bench  # noqa: PLC0415

        yield bench.add_parser


# THE place where subcommands are registered.
def _subcommands() -> Iterator[Callable]:
    yield add_generate_parser
    yield from _optional_subcommands()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="jaxpp: pipeline-parallel LLM inference on JAX.",
        epilog="Run 'jaxpp COMMAND --help' for a command's options, input and output formats "
        "and exit codes. Full reference: docs/cli.md.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add_parser in _subcommands():
        add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            f"\n{PROG}: interrupted; answered lines are kept (rerun with --resume)", file=sys.stderr
        )
        return 130
    except BrokenPipeError:  # e.g. `jaxpp generate ... | head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the exit-time flush
        except OSError:
            pass
        return EXIT_LINE_ERRORS


# --- jobs: one per input line --------------------------------------------------------------------


class LineError(Exception):
    def __init__(self, message: str, code: str = "invalid_request"):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class Seq:
    """One sequence to generate: prompt token ids and its sampling params."""

    token_ids: list[int]
    params: Any  # jaxpp.SamplingParams
    prompt_index: int = 0


@dataclasses.dataclass
class Job:
    line: int
    id: Any  # the plain id or the OpenAI custom_id
    kind: str  # "plain" | "completion" | "chat" (the last two: OpenAI batch lines)
    prompt: Any = None  # what the plain output echoes as "prompt"
    seqs: list[Seq] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0
    model: str = ""
    logprobs: Any = None  # OpenAI: ("completion", n) or ("chat", n)
    results: list = dataclasses.field(default_factory=list)
    left: int = 0


def _id_key(value: Any) -> str:
    return json.dumps(value)


def _check_id(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise LineError(f"{name} must be a string or an integer, got {value!r}")


def derive_seed(base: int, key: str, index: int = 0) -> int:
    digest = hashlib.blake2b(f"{base}\0{key}\0{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class Requests:
    """Turns input lines into Jobs (or LineErrors) against one loaded LLM."""

    def __init__(self, llm, defaults: dict, base_seed: int, model_name: str):
        from jaxpp import SamplingParams  # noqa: PLC0415

        self.llm = llm
        self.SamplingParams = SamplingParams
        self.defaults = defaults
        self.base_seed = base_seed
        self.model_name = model_name
        self.vocab_size = llm.config.vocab_size

    # sampling ------------------------------------------------------------------------------
    def params(self, overrides: dict, key: str, index: int = 0, seed_offset: int = 0):
        fields = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        if "seed" in overrides and overrides["seed"] is not None:
            seed = overrides["seed"]
            if isinstance(seed, int) and not isinstance(seed, bool):
                seed = seed + seed_offset
            fields["seed"] = seed
        else:
            fields["seed"] = derive_seed(self.base_seed, key, index)
        stop = fields.get("stop", ())
        if not isinstance(stop, str | list | tuple):
            raise LineError(f"stop must be a string or a list of strings, got {stop!r}")
        ids = fields.get("stop_token_ids", ())
        if not isinstance(ids, list | tuple):
            raise LineError(f"stop_token_ids must be a list of integers, got {ids!r}")
        for t in ids:  # large ids would overflow the engine's int32 stop table
            if isinstance(t, int) and not isinstance(t, bool) and t >= self.vocab_size:
                raise LineError(
                    f"stop_token_ids has {t}, outside the vocabulary [0, {self.vocab_size})"
                )
        try:
            return self.SamplingParams(**fields)
        except (ValueError, TypeError) as e:
            raise LineError(str(e)) from None

    # prompts -------------------------------------------------------------------------------
    def encode(self, prompt: Any, what: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            if self.llm.tokenizer is None:
                raise LineError(f"the model has no tokenizer: give the {what} as token ids")
            ids = list(self.llm.tokenizer.encode(prompt))
        elif isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise LineError(
                    f"{what} has token id {bad[0]} outside the vocabulary [0, {self.vocab_size})"
                )
            ids = list(prompt)
        else:
            raise LineError(f"{what} must be a string or a list of token ids, got {_short(prompt)}")
        return self.check_length(ids, what)

    def check_length(self, ids: list[int], what: str = "prompt") -> list[int]:
        if not ids:
            raise LineError(f"{what} is empty: expected at least one token")
        if len(ids) > self.llm.max_model_len:
            raise LineError(
                f"{what} has {len(ids)} tokens, longer than max_model_len={self.llm.max_model_len}",
                code="context_length_exceeded",
            )
        return ids

    def chat(self, messages: Any) -> tuple[str, list[int]]:
        if not isinstance(messages, list) or not messages:
            raise LineError(
                f"messages must be a non-empty list of {{role, content}} objects, "
                f"got {_short(messages)}"
            )
        flat = []
        for i, m in enumerate(messages):
            if isinstance(m, dict) and isinstance(m.get("content"), list):
                parts = m["content"]
                if not all(
                    isinstance(x, dict)
                    and x.get("type") == "text"
                    and isinstance(x.get("text"), str)
                    for x in parts
                ):
                    raise LineError(f"message {i}: only text content parts are supported")
                m = {**m, "content": "".join(x["text"] for x in parts)}
            flat.append(m)
        try:
            text = self.llm.chat_prompt(flat)
        except ValueError as e:
            raise LineError(str(e)) from None
        # The template already holds any BOS: encode without adding special tokens again.
        ids = list(self.llm.tokenizer.encode(text, add_special_tokens=False))
        return text, self.check_length(ids)

    # lines ---------------------------------------------------------------------------------
    def plain(self, obj: dict, line: int, job_id: Any) -> Job:
        allowed = {"id", "prompt", "messages", *SAMPLING_FIELDS}
        unknown = sorted(set(obj) - allowed)
        if unknown:
            raise LineError(
                f"unknown field {unknown[0]!r}: a line has 'id', 'prompt' or 'messages', and "
                f"sampling fields ({', '.join(SAMPLING_FIELDS)})"
            )
        if ("prompt" in obj) == ("messages" in obj):
            raise LineError(
                "a line needs exactly one of 'prompt' (text or token ids) or 'messages' (a chat)"
            )
        key = _id_key(job_id)
        params = self.params({k: obj[k] for k in SAMPLING_FIELDS if k in obj}, key)
        job = Job(line, job_id, "plain")
        if "prompt" in obj:
            ids = self.encode(obj["prompt"])
            job.prompt = obj["prompt"]
        else:
            job.prompt, ids = self.chat(obj["messages"])
        job.seqs = [Seq(ids, params)]
        job.prompt_tokens = len(ids)
        return job

    def openai(self, obj: dict, line: int, job_id: Any) -> Job:
        unknown = sorted(set(obj) - _OPENAI_KEYS)
        if unknown:
            raise LineError(
                f"unknown field {unknown[0]!r} in an OpenAI batch line (expected "
                "custom_id, method, url, body)"
            )
        method = obj.get("method", "POST")
        if method != "POST":
            raise LineError(f"method must be 'POST', got {method!r}")
        url = obj.get("url")
        if url not in OPENAI_URLS:
            raise LineError(
                f"url must be one of {sorted(OPENAI_URLS)}, got {url!r}", code="invalid_url"
            )
        kind = OPENAI_URLS[url]
        body = obj.get("body")
        if not isinstance(body, dict):
            raise LineError(f"body must be a JSON object, got {_short(body)}")
        unknown = sorted(k for k in set(body) - _OPENAI_BODY[kind] if body[k] is not None)
        if unknown:
            raise LineError(f"unsupported body field {unknown[0]!r} for {url}")
        if body.get("stream"):
            raise LineError("stream=true is not supported in a batch")
        if kind == "completion" and body.get("echo"):
            raise LineError("echo=true is not supported")
        n = body.get("n", 1)
        n = 1 if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise LineError(f"n must be an integer >= 1, got {n!r}")
        overrides = {k: body[k] for k in _OPENAI_SAMPLING if k in body}
        job = Job(line, job_id, kind, model=str(body.get("model") or self.model_name))
        if kind == "chat":
            if body.get("max_completion_tokens") is not None:
                overrides["max_tokens"] = body["max_completion_tokens"]
            if body.get("logprobs"):
                if not isinstance(body["logprobs"], bool):
                    raise LineError(f"logprobs must be a boolean, got {body['logprobs']!r}")
                overrides["logprobs"] = body.get("top_logprobs") or 0
                job.logprobs = ("chat", overrides["logprobs"])
            if "messages" not in body:
                raise LineError("body.messages is required for /v1/chat/completions")
            _, ids = self.chat(body["messages"])
            prompts = [ids]
        else:
            if body.get("logprobs") is not None:
                overrides["logprobs"] = body["logprobs"]
                job.logprobs = ("completion", body["logprobs"])
            if "prompt" not in body:
                raise LineError("body.prompt is required for /v1/completions")
            prompt = body["prompt"]
            many = (
                isinstance(prompt, list)
                and prompt
                and all(isinstance(x, str | list) for x in prompt)
            )
            items = prompt if many else [prompt]
            prompts = [
                self.encode(x, "prompt" if len(items) == 1 else f"prompt[{i}]")
                for i, x in enumerate(items)
            ]
        key = _id_key(job_id)
        for p, ids in enumerate(prompts):
            for k in range(n):
                index = p * n + k
                job.seqs.append(Seq(ids, self.params(overrides, key, index, index), p))
        job.prompt_tokens = sum(len(ids) for ids in prompts)
        return job


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- output records ------------------------------------------------------------------------------


def is_openai_line(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(_OPENAI_KEYS & set(obj))


def error_record(line: int, job_id: Any, err: LineError, openai: bool) -> dict:
    if openai:
        return {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": job_id,
            "response": None,
            "error": {"code": err.code, "message": str(err)},
            "line": line,
        }
    return {"id": line if job_id is None else job_id, "line": line, "error": str(err)}


def _logprob_entries(c) -> list[dict]:
    return [{str(t): lp.logprob for t, lp in entry.items()} for entry in c.logprobs or []]


def result_record(job: Job) -> dict:
    if job.kind == "plain":
        c = job.results[0]
        record = {
            "id": job.id,
            "prompt": job.prompt,
            "text": c.text,
            "token_ids": list(c.token_ids),
            "finish_reason": c.finish_reason,
            "usage": {"prompt_tokens": job.prompt_tokens, "completion_tokens": len(c.token_ids)},
        }
        if job.seqs[0].params.logprobs is not None:
            record["logprobs"] = _logprob_entries(c)
            record["cumulative_logprob"] = c.cumulative_logprob
        return record
    choices = []
    for index, c in enumerate(job.results):
        choice: dict[str, Any] = {"index": index}
        if job.kind == "chat":
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        choice["logprobs"] = _openai_logprobs(job.logprobs, c)
        choice["finish_reason"] = c.finish_reason
        choices.append(choice)
    completion_tokens = sum(len(c.token_ids) for c in job.results)
    body = {
        "id": ("chatcmpl-" if job.kind == "chat" else "cmpl-") + uuid.uuid4().hex,
        "object": "chat.completion" if job.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": job.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": job.prompt_tokens + completion_tokens,
        },
    }
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": job.id,
        "response": {"status_code": 200, "request_id": uuid.uuid4().hex, "body": body},
        "error": None,
    }


def _openai_logprobs(spec, c) -> dict | None:
    if spec is None:
        return None
    kind, top = spec
    entries = c.logprobs or []

    def piece(tok, lp):
        return lp.decoded_token if lp.decoded_token is not None else str(tok)

    if kind == "chat":
        content = []
        for tok, entry in zip(c.token_ids, entries, strict=False):
            chosen = entry[tok]
            alts = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
            content.append(
                {
                    "token": piece(tok, chosen),
                    "logprob": chosen.logprob,
                    "bytes": list(piece(tok, chosen).encode()),
                    "top_logprobs": [
                        {
                            "token": piece(t, lp),
                            "logprob": lp.logprob,
                            "bytes": list(piece(t, lp).encode()),
                        }
                        for t, lp in alts
                        if lp.rank is not None
                    ][:top],
                }
            )
        return {"content": content}
    tokens, token_logprobs, tops, offsets, offset = [], [], [], [], 0
    for tok, entry in zip(c.token_ids, entries, strict=False):
        chosen = entry[tok]
        tokens.append(piece(tok, chosen))
        token_logprobs.append(chosen.logprob)
        tops.append(
            {
                piece(t, lp): lp.logprob
                for t, lp in entry.items()
                if lp.rank is not None and lp.rank <= top
            }
        )
        offsets.append(offset)
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


# --- resume: what an existing output file already answers ----------------------------------------


@dataclasses.dataclass
class Answered:
    ids: set = dataclasses.field(default_factory=set)  # id keys of successful answers
    error_lines: set = dataclasses.field(default_factory=set)  # input lines answered by errors
    records: int = 0
    errors: int = 0


def scan_output(path: Path) -> Answered:
    """Read what `path` answers, first truncating a torn last line (no newline / bad JSON).

    Only the last line can be torn: every line is written whole, with one write call, before
    the next one starts. Anything else that is not a jaxpp answer means the file is not ours:
    UsageError, and the file is left as it is.
    """
    answered = Answered()
    with open(path, "r+b") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1  # the bytes after the last newline: a torn write
        lines = data[:end].split(b"\n")[:-1]
        count = 0
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                rec = None
            if not isinstance(rec, dict) or not ({"id", "custom_id"} & set(rec)):
                if rec is None and number == len(lines) and count:
                    end -= len(raw) + 1  # a complete-looking but invalid last line: torn too
                    break
                raise UsageError(
                    f"{path}: line {number} is not a jaxpp answer; refusing to "
                    "resume into it (fix or remove the file)"
                )
            count += 1
            _record_answer(answered, rec)
        if end < len(data) and not data[end:].lstrip().startswith(b"{") and not count:
            raise UsageError(f"{path} is not a jaxpp answer file; refusing to resume into it")
        if end != len(data):
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return answered


def _record_answer(answered: Answered, rec: dict) -> None:
    answered.records += 1
    if rec.get("error") is not None:
        answered.errors += 1
        if isinstance(rec.get("line"), int):
            answered.error_lines.add(rec["line"])
    elif "custom_id" in rec:
        answered.ids.add(_id_key(rec["custom_id"]))
    else:
        answered.ids.add(_id_key(rec["id"]))


# --- sinks ---------------------------------------------------------------------------------------


class FileSink:
    """Appends whole lines with one unbuffered write each, then fsyncs: a kill can tear at most
    the line being written, which is the file's last (and scan_output truncates it)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"cannot open --output {path}: {e.strerror}") from None
        try:
            import fcntl  # noqa: PLC0415 - POSIX only

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except OSError:
            os.close(self.fd)
            raise UsageError(f"{path} is being written by another jaxpp run") from None

    def write(self, record: dict) -> None:
        data = memoryview(_dumps(record).encode("utf-8", "replace"))
        while data:
            data = data[os.write(self.fd, data) :]
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class StdoutSink:
    def write(self, record: dict) -> None:
        sys.stdout.write(_dumps(record))
        sys.stdout.flush()

    def close(self) -> None:
        pass


class TextSink:
    """--prompt without --output: just the completion text; an error goes to stderr."""

    def write(self, record: dict) -> None:
        if "error" in record:
            print(f"{PROG}: error: {record['error']}", file=sys.stderr)
        else:
            print(record["text"], flush=True)

    def close(self) -> None:
        pass


def _dumps(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


# --- progress ------------------------------------------------------------------------------------


class Progress:
    """tqdm bar on stderr (prompts done / total, tokens/s, ETA) when enabled."""

    def __init__(self, enabled: bool, total: int | None, initial: int = 0, file=None):
        self.tokens = 0
        self.start = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm import tqdm  # noqa: PLC0415

            self.bar = tqdm(
                total=total,
                initial=initial,
                unit="prompt",
                file=file or sys.stderr,
                dynamic_ncols=True,
                smoothing=0.1,
                desc="generate",
            )

    def advance(self, tokens: int = 0) -> None:
        self.tokens += tokens
        if self.bar is not None:
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- the generate command ------------------------------------------------------------------------


def load_llm(args: argparse.Namespace):
    """Build the LLM for `args` (a seam: tests swap in a cached one)."""
    if "JAX_NUM_CPU_DEVICES" not in os.environ and args.dp * args.pp * args.tp > 1:
        import jax  # noqa: PLC0415

        try:  # on a CPU-only host, provide enough devices for the mesh
            jax.config.update("jax_num_cpu_devices", args.dp * args.pp * args.tp)
        except Exception:  # noqa: BLE001 - backends already up: keep what there is
            pass
    from jaxpp import LLM  # noqa: PLC0415

    return LLM(
        args.model,
        dtype=args.dtype,
        pp=args.pp,
        tp=args.tp,
        dp=args.dp,
        layer_partition=args.layer_partition,
        num_microbatches=args.num_microbatches,
        max_model_len=args.max_model_len,
        seed=args.seed,
    )


def _sampling_defaults(args: argparse.Namespace) -> dict:
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


def _input_lines(args: argparse.Namespace) -> tuple[Iterable[bytes], int | None, Callable]:
    """(lines, total or None, close)."""
    if args.prompt is not None:
        obj = (
            {"messages": [{"role": "user", "content": args.prompt}]}
            if args.chat
            else {"prompt": args.prompt}
        )
        return [json.dumps(obj).encode()], 1, lambda: None
    if args.input == "-":
        return sys.stdin.buffer, None, lambda: None
    path = Path(args.input)
    try:
        with open(path, "rb") as f:
            total = sum(1 for _ in f)
        f = open(path, "rb")  # noqa: SIM115 - closed by the returned callable
    except OSError as e:
        raise UsageError(f"cannot read --input {path}: {e.strerror}") from None
    return f, total, f.close


def run_generate(args: argparse.Namespace) -> int:
    if args.chat and args.prompt is None:
        raise UsageError("--chat goes with --prompt (input lines choose with 'messages')")
    from_file = args.output not in (None, "-")
    if args.resume and not from_file:
        raise UsageError(
            "--resume needs --output FILE (answers already written are read back from it)"
        )
    if from_file and args.input not in (None, "-"):
        if Path(args.output).resolve() == Path(args.input).resolve():
            raise UsageError("--output is the --input file")
    model = Path(args.model) if args.model else DEFAULT_MODEL
    if not model.is_dir():
        hint = "" if args.model else " (the embedded demo model is missing; pass --model DIR)"
        raise UsageError(f"model dir {model} does not exist{hint}")
    if not (model / "config.json").is_file():
        raise UsageError(
            f"model dir {model} has no config.json: expected a Hugging Face model directory"
        )
    args.model = str(model)

    defaults = _sampling_defaults(args)
    try:  # validate the flags before any slow work
        from jaxpp import SamplingParams  # noqa: PLC0415

        SamplingParams(**defaults)
    except ValueError as e:
        raise UsageError(f"bad sampling flag: {e}") from None

    answered = Answered()
    if from_file:
        out_path = Path(args.output)
        if out_path.exists() and out_path.stat().st_size > 0 and not args.resume:
            raise UsageError(
                f"--output {out_path} exists and is not empty: pass --resume "
                "to continue it, or remove it"
            )
        sink = FileSink(out_path)  # takes the file's lock before reading it back
        try:
            answered = scan_output(out_path)
        except BaseException:
            sink.close()
            raise
    elif args.prompt is not None and args.output is None:
        sink = TextSink()
    else:
        sink = StdoutSink()
    lines, total, close_input = _input_lines(args)

    try:
        try:
            llm = load_llm(args)
        except (ValueError, OSError) as e:  # CheckpointError is a ValueError
            message = "; ".join(t.strip() for t in str(e).splitlines() if t.strip())
            raise UsageError(message or repr(e)) from None
        requests = Requests(llm, defaults, args.seed, model.name)
        show = not args.quiet and sys.stderr.isatty() and args.prompt is None
        progress = Progress(show, total, initial=min(answered.records, total or 0))
        runner = Runner(llm, requests, sink, progress, args.batch_size)
        started = time.perf_counter()
        try:
            runner.run(lines, answered)
        finally:
            progress.close()
    finally:
        close_input()
        sink.close()
    errors = runner.errors + answered.errors
    if not args.quiet and args.prompt is None:
        elapsed = time.perf_counter() - started
        print(
            f"{PROG}: {runner.done} answered, {runner.errors} with errors, "
            f"{runner.skipped} already answered; {progress.tokens} tokens in {elapsed:.1f} s "
            f"({progress.tokens / max(elapsed, 1e-9):.1f} tok/s)",
            file=sys.stderr,
        )
    if runner.engine_error is not None:
        print(
            f"{PROG}: error: the engine failed: {runner.engine_error}; answered lines are "
            "kept (rerun with --resume)",
            file=sys.stderr,
        )
        return EXIT_ENGINE
    return EXIT_LINE_ERRORS if errors else EXIT_OK


class Runner:
    """Reads lines, writes errors at once, generates valid jobs in chunks of batch_size
    sequences and writes each job's answer as soon as its wave finishes."""

    def __init__(self, llm, requests: Requests, sink, progress: Progress, batch_size: int):
        self.llm = llm
        self.requests = requests
        self.sink = sink
        self.progress = progress
        self.batch_size = batch_size
        self.done = self.errors = self.skipped = 0
        self.engine_error: BaseException | None = None

    def emit(self, record: dict, tokens: int = 0) -> None:
        self.sink.write(record)
        self.done += 1
        self.errors += record.get("error") is not None
        self.progress.advance(tokens)

    def run(self, lines: Iterable[bytes], answered: Answered) -> None:
        first_line: dict[str, int] = {}  # id key -> line that first used it
        pending: list[Job] = []
        size = 0
        for number, raw in enumerate(lines, 1):
            job = self.parse(number, raw, first_line, answered)
            if job is None:
                continue
            pending.append(job)
            size += len(job.seqs)
            if size >= self.batch_size:
                self.generate(pending)
                pending, size = [], 0
                if self.engine_error is not None:
                    return
        if pending:
            self.generate(pending)

    def parse(self, number: int, raw: bytes, first_line: dict, answered: Answered) -> Job | None:
        """A Job to generate, or None (line already answered, or its error line written)."""
        openai = b'"custom_id"' in raw
        job_id = None
        try:
            if not raw.strip():
                raise LineError("blank line: expected a JSON object", "invalid_json")
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise LineError(f"not UTF-8 ({e.reason})", "invalid_json") from None
            except ValueError as e:
                raise LineError(f"invalid JSON: {e}", "invalid_json") from None
            if not isinstance(obj, dict):
                raise LineError(f"expected a JSON object, got {_short(obj)}", "invalid_json")
            openai = is_openai_line(obj)
            name = "custom_id" if openai else "id"
            raw_id = obj.get(name)
            if raw_id is not None:
                _check_id(raw_id, name)
            job_id = number if raw_id is None else raw_id
            key = _id_key(job_id)
            if key in first_line:
                if number in answered.error_lines:
                    self.skipped += 1
                    return None
                raise LineError(
                    f"duplicate {name} {job_id!r} (first used on line {first_line[key]})",
                    "duplicate_id",
                )
            first_line[key] = number
            if number in answered.error_lines or key in answered.ids:
                self.skipped += 1
                return None
            if openai:
                return self.requests.openai(obj, number, job_id)
            return self.requests.plain(obj, number, job_id)
        except LineError as e:
            if number in answered.error_lines:
                self.skipped += 1
                return None
            self.emit(error_record(number, job_id, e, openai))
            return None

    def generate(self, jobs: list[Job]) -> None:
        seqs: list[tuple[Job, int]] = []
        for job in jobs:
            job.results = [None] * len(job.seqs)
            job.left = len(job.seqs)
            seqs += [(job, k) for k in range(len(job.seqs))]

        def on_finish(i: int, out) -> None:
            job, k = seqs[i]
            job.results[k] = out.outputs[0]
            job.left -= 1
            if job.left == 0:
                self.emit(result_record(job), sum(len(c.token_ids) for c in job.results))

        try:
            self.llm.generate(
                [j.seqs[k].token_ids for j, k in seqs],
                [j.seqs[k].params for j, k in seqs],
                on_finish=on_finish,
            )
            return
        except OSError:  # writing the answer failed (disk full, closed pipe): stop
            raise
        except Exception as e:  # noqa: BLE001 - isolate the line that broke the batch
            unfinished = [j for j in jobs if j.left > 0]
            if len(jobs) == 1:
                self.fail_alone(jobs[0], e)
                return
        for job in unfinished:
            self.generate([job])
            if self.engine_error is not None:
                return

    def fail_alone(self, job: Job, e: Exception) -> None:
        if isinstance(e, ValueError | TypeError | ArithmeticError):
            err = LineError(str(e) or type(e).__name__)
            self.emit(error_record(job.line, job.id, err, job.kind != "plain"))
        else:
            self.engine_error = e


if __name__ == "__main__":
    sys.exit(main())
