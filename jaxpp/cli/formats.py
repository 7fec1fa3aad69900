"""The JSONL request formats: one input line -> a `Job` (prompt token ids + sampling params per
sequence), or a RequestError naming what is wrong with it.

Two formats can be mixed in one file: plain lines (`{"id", "prompt" | "messages", <sampling
fields>}`) and OpenAI batch requests (`{"custom_id", "method", "url", "body"}`); docs/cli.md has
both. Nothing here runs outside the per-request guard (guard.py): the tokenizer and the chat
template, which can refuse an input in ways nobody can list, are wrapped in `failure_as`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from jaxpp.cli import structured, tools
from jaxpp.cli.errors import (
    CHAT_TEMPLATE_ERROR,
    CONTEXT_LENGTH_EXCEEDED,
    INVALID_JSON,
    INVALID_PROMPT,
    INVALID_URL,
    RequestError,
    short_repr,
)
from jaxpp.cli.guard import failure_as
from jaxpp.cli.limits import Limits

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
    "structured_outputs",
    "prompt_logprobs",
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
    "prompt_logprobs",
)
_OPENAI_IGNORED = ("model", "user", "metadata", "store", "service_tier")
_OPENAI_BODY = {
    "completion": {
        "prompt",
        "n",
        "logprobs",
        "echo",
        "best_of",
        "stream",
        "stream_options",
        *_OPENAI_SAMPLING,
        *_OPENAI_IGNORED,
        *structured.BODY_FIELDS,
    },
    "chat": {
        "messages",
        "n",
        "logprobs",
        "top_logprobs",
        "max_completion_tokens",
        "stream",
        "stream_options",
        *_OPENAI_SAMPLING,
        *_OPENAI_IGNORED,
        *structured.BODY_FIELDS,
        *tools.BODY_FIELDS,
    },
}
OPENAI_KEYS = {"custom_id", "method", "url", "body"}
# The roles OpenAI's chat API knows ("function": its older name for "tool").
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


@dataclasses.dataclass
class Seq:
    """One sequence to generate: prompt token ids and its sampling params."""

    token_ids: list[int]
    params: Any  # jaxpp.SamplingParams
    prompt_index: int = 0


@dataclasses.dataclass
class Job:
    """One input line's request: its sequences, and their results as they finish."""

    line: int
    id: Any  # the plain id or the OpenAI custom_id
    kind: str  # "plain" | "completion" | "chat" (the last two: OpenAI batch lines)
    prompt: Any = None  # what the plain output echoes as "prompt"
    seqs: list[Seq] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0
    model: str = ""
    logprobs: Any = None  # OpenAI: ("completion", n) or ("chat", n)
    stream: bool = False  # the server answers with server-sent events (never a batch line)
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage
    tools: Any = None  # chat: tools.ToolCalling, how the answer's tool calls are read
    echo: bool = False  # OpenAI completions: each choice starts with its prompt (text, logprobs)
    # With echo, by prompt_index: (the prompt's text, its first token's text).
    prompt_texts: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    show_prompt_logprobs: bool = False  # vLLM's `prompt_logprobs` field is answered
    results: list = dataclasses.field(default_factory=list)
    # Per sequence, its RequestOutput.prompt_logprobs (None unless its params ask for them).
    prompt_logprobs: list = dataclasses.field(default_factory=list)
    left: int = 0

    @property
    def openai(self) -> bool:
        return self.kind != "plain"


def parse_line(raw: bytes) -> dict:
    """The JSON object of one input line (a UTF-8 byte order mark is allowed)."""
    if not raw.strip():
        raise RequestError("blank line: expected a JSON object", INVALID_JSON)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RequestError(f"not UTF-8 ({e.reason} at byte {e.start})", INVALID_JSON) from None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise RequestError("invalid JSON: nested too deeply", INVALID_JSON) from None
    except ValueError as e:
        raise RequestError(f"invalid JSON: {e}", INVALID_JSON) from None
    if not isinstance(obj, dict):
        raise RequestError(f"expected a JSON object, got {short_repr(obj)}", INVALID_JSON)
    return obj


def looks_openai(raw: bytes) -> bool:
    """For a line that cannot be parsed: answer it in the OpenAI shape if it meant to be one."""
    return b'"custom_id"' in raw


def is_openai_line(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(OPENAI_KEYS & set(obj))


def id_key(value: Any) -> str:
    """The key an id is known by in the output and across resumes ("1" and 1 differ)."""
    return json.dumps(value)


def derive_seed(base: int, key: str, index: int = 0) -> int:
    """A request's seed when it sets none: a function of the base seed and its id only, so an
    answer never depends on batching or resuming."""
    digest = hashlib.blake2b(f"{base}\0{key}\0{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class RequestBuilder:
    """Turns parsed input lines into Jobs against one loaded LLM (its tokenizer, chat template,
    vocabulary and max_model_len)."""

    def __init__(
        self,
        llm,
        defaults: dict,
        base_seed: int,
        model_name: str,
        limits: Limits,
        streaming: bool = False,
        tool_call_parser: str | None = None,
    ):
        """`streaming`: requests may ask for `stream: true`, and a max_tokens past the context
        is refused rather than lowered (the server; a batch line may not stream, and is
        capped). `tool_call_parser`: how tool_choice "auto" reads tool calls (tools.PARSERS),
        or None."""
        from jaxpp import SamplingParams  # noqa: PLC0415

        self.streaming = streaming
        self.refuses_over_context = streaming
        self.llm = llm
        self.sampling_params = SamplingParams
        self.defaults = defaults
        self.base_seed = base_seed
        self.model_name = model_name
        self.limits = limits
        self.vocab_size = llm.config.vocab_size
        self.tool_call_parser = tool_call_parser

    def request_id(self, obj: dict, name: str, line: int) -> Any:
        """The line's id (`name` is "id" or "custom_id"), its line number when it has none."""
        value = obj.get(name)
        if value is None:
            return line
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise RequestError(f"{name} must be a string or an integer, got {short_repr(value)}")
        if isinstance(value, str):
            self.limits.check_id(value, name)
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(f"{name} is not valid Unicode (an unpaired surrogate)") from None
        return value

    def build(self, obj: dict, line: int, job_id: Any) -> Job:
        if is_openai_line(obj):
            return self.openai(obj, line, job_id)
        return self.plain(obj, line, job_id)

    # sampling ------------------------------------------------------------------------------
    def params(self, overrides: dict, key: str, index: int = 0, seed_offset: int = 0):
        fields = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        seed = overrides.get("seed")
        if seed is not None:
            fields["seed"] = seed + seed_offset if _is_int(seed) else seed
        else:
            fields["seed"] = derive_seed(self.base_seed, key, index)
        self.limits.check_sampling(fields)
        stop = fields.get("stop", ())
        if not isinstance(stop, str | list | tuple):
            raise RequestError(f"stop must be a string or a list of strings, got {stop!r}")
        ids = fields.get("stop_token_ids", ())
        if not isinstance(ids, list | tuple):
            raise RequestError(f"stop_token_ids must be a list of integers, got {ids!r}")
        for t in ids:  # large ids would overflow the engine's int32 stop table
            if _is_int(t) and t >= self.vocab_size:
                raise RequestError(
                    f"stop_token_ids has {t}, outside the vocabulary [0, {self.vocab_size})"
                )
        try:
            return self.sampling_params(**fields)
        except (ValueError, TypeError) as e:
            raise RequestError(str(e)) from None

    # prompts -------------------------------------------------------------------------------
    def encode(self, prompt: Any, what: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            tokenizer = self.llm.tokenizer
            if tokenizer is None:
                raise RequestError(f"the model has no tokenizer: give the {what} as token ids")
            with failure_as(INVALID_PROMPT, f"the tokenizer cannot encode the {what}"):
                ids = list(tokenizer.encode(prompt))
        elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(
                    f"{what} has token id {bad[0]} outside the vocabulary [0, {self.vocab_size})"
                )
            ids = list(prompt)
        else:
            raise RequestError(
                f"{what} must be a string or a list of token ids, got {short_repr(prompt)}"
            )
        return self.check_length(ids, what)

    def check_length(self, ids: list[int], what: str = "prompt") -> list[int]:
        if not ids:
            raise RequestError(f"{what} is empty: expected at least one token")
        if len(ids) > self.llm.max_model_len:
            raise RequestError(
                f"{what} has {len(ids)} tokens, longer than max_model_len={self.llm.max_model_len}",
                CONTEXT_LENGTH_EXCEEDED,
            )
        return ids

    def constraint(self, spec: Any) -> Any:
        """A StructuredOutputsParams, compiled now (the engine finds it in its cache), so that
        a constraint the grammar engine refuses is this request's error."""
        if spec is not None:
            try:
                self.llm.grammar_compiler.compile(spec)
            except ValueError as e:
                raise RequestError(str(e)) from None
        return spec

    def fit_max_tokens(self, params, ids: list[int], given: bool, what: str = "prompt"):
        """`params` with max_tokens within the context: prompt plus max_tokens is at most
        max_model_len, so usage never passes it. A max_tokens the request did not set
        (`given`) is lowered to the room left, as vLLM does; one it set past it is refused
        with vLLM's message where the builder `refuses_over_context` (the server), lowered
        otherwise (the batch CLI). A prompt that leaves no room is refused unless it is only
        scored (max_tokens 0)."""
        limit, n = self.llm.max_model_len, len(ids)
        room = limit - n
        if params.max_tokens <= room:
            return params
        if room == 0:
            raise RequestError(
                f"{'' if what == 'prompt' else what + ': '}This model's maximum context length "
                f"is {limit} tokens. However, your request has {n} input tokens. Please reduce "
                "the length of the input messages.",
                CONTEXT_LENGTH_EXCEEDED,
            )
        if given and self.refuses_over_context:
            m = params.max_tokens
            raise RequestError(
                f"'max_tokens' or 'max_completion_tokens' is too large: {m}. This model's "
                f"maximum context length is {limit} tokens and your request has {n} input "
                f"tokens ({m} > {limit} - {n}).",
                CONTEXT_LENGTH_EXCEEDED,
            )
        return dataclasses.replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))

    def chat(self, messages: Any, tool_list: list | None = None) -> tuple[str, list[int]]:
        if not isinstance(messages, list) or not messages:
            raise RequestError(
                f"messages must be a non-empty list of {{role, content}} objects, "
                f"got {short_repr(messages)}"
            )
        flat = [_flat_message(i, m) for i, m in enumerate(messages)]
        tokenizer = self.llm.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise RequestError("the model has no chat template: send a 'prompt' instead")
        with failure_as(CHAT_TEMPLATE_ERROR, "the chat template refused the messages"):
            text = self.llm.chat_prompt(flat, tool_list)
        # The template already holds any BOS: encode without adding special tokens again.
        with failure_as(INVALID_PROMPT, "the tokenizer cannot encode the chat prompt"):
            ids = list(tokenizer.encode(text, add_special_tokens=False))
        return text, self.check_length(ids)

    # lines ---------------------------------------------------------------------------------
    def plain(self, obj: dict, line: int, job_id: Any) -> Job:
        allowed = {"id", "prompt", "messages", *SAMPLING_FIELDS}
        unknown = sorted(set(obj) - allowed)
        if unknown:
            raise RequestError(
                f"unknown field {short_repr(unknown[0])}: a line has 'id', 'prompt' or "
                f"'messages', and sampling fields ({', '.join(SAMPLING_FIELDS)})"
            )
        if ("prompt" in obj) == ("messages" in obj):
            raise RequestError(
                "a line needs exactly one of 'prompt' (text or token ids) or 'messages' (a chat)"
            )
        fields = {k: obj[k] for k in SAMPLING_FIELDS if k in obj}
        if "structured_outputs" in fields:
            spec = structured.from_body({"structured_outputs": fields["structured_outputs"]})
            fields["structured_outputs"] = self.constraint(spec)
        params = self.params(fields, id_key(job_id))
        job = Job(line, job_id, "plain")
        if "prompt" in obj:
            ids = self.encode(obj["prompt"])
            job.prompt = obj["prompt"]
        else:
            job.prompt, ids = self.chat(obj["messages"])
        job.seqs = [Seq(ids, self.fit_max_tokens(params, ids, "max_tokens" in obj))]
        job.prompt_tokens = len(ids)
        return job

    def openai(self, obj: dict, line: int, job_id: Any) -> Job:
        unknown = sorted(set(obj) - OPENAI_KEYS)
        if unknown:
            raise RequestError(
                f"unknown field {short_repr(unknown[0])} in an OpenAI batch line (expected "
                "custom_id, method, url, body)"
            )
        method = obj.get("method", "POST")
        if method != "POST":
            raise RequestError(f"method must be 'POST', got {short_repr(method)}")
        url = obj.get("url")
        if not isinstance(url, str) or url not in OPENAI_URLS:
            raise RequestError(
                f"url must be one of {sorted(OPENAI_URLS)}, got {short_repr(url)}", INVALID_URL
            )
        kind = OPENAI_URLS[url]
        body = obj.get("body")
        if not isinstance(body, dict):
            raise RequestError(f"body must be a JSON object, got {short_repr(body)}")
        unknown = sorted(k for k in set(body) - _OPENAI_BODY[kind] if body[k] is not None)
        if unknown:
            raise RequestError(f"unsupported body field {short_repr(unknown[0])} for {url}")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise RequestError(f"stream must be a boolean, got {short_repr(stream)}")
        if stream and not self.streaming:
            raise RequestError("stream=true is not supported in a batch")
        options = body.get("stream_options")
        include_usage = False
        if options is not None:
            if not stream:
                raise RequestError("stream_options goes with stream=true")
            if not isinstance(options, dict) or set(options) - {"include_usage"}:
                raise RequestError(
                    f"stream_options must be {{'include_usage': bool}}, got {short_repr(options)}"
                )
            include_usage = options.get("include_usage", False)
            if not isinstance(include_usage, bool):
                raise RequestError(
                    "stream_options.include_usage must be a boolean, got "
                    f"{short_repr(include_usage)}"
                )
        n = body.get("n", 1)
        n = 1 if n is None else n
        if not _is_int(n) or n < 1:
            raise RequestError(f"n must be an integer >= 1, got {short_repr(n)}")
        best_of = body.get("best_of")
        if best_of is not None and (not _is_int(best_of) or best_of != n):
            raise RequestError(
                f"best_of={short_repr(best_of)} is not supported: each choice is one sample, so "
                f"best_of must be null or equal n ({n})"
            )
        overrides = {k: body[k] for k in _OPENAI_SAMPLING if k in body}
        if overrides.get("prompt_logprobs") is not None and stream:
            raise RequestError("prompt_logprobs are not available with stream=true")
        overrides["stream"] = stream  # the engine hands a stream each token as it is sampled
        # The echoed model name is cut: an answer never grows with a hostile field.
        job = Job(line, job_id, kind, model=str(body.get("model") or self.model_name)[:200])
        job.stream, job.include_usage = stream, include_usage
        overrides["structured_outputs"] = self.constraint(self._constraint_of(body, job))
        if kind == "chat":
            if body.get("max_completion_tokens") is not None:
                overrides["max_tokens"] = body["max_completion_tokens"]
            if body.get("logprobs"):
                if not isinstance(body["logprobs"], bool):
                    raise RequestError(
                        f"logprobs must be a boolean, got {short_repr(body['logprobs'])}"
                    )
                overrides["logprobs"] = body.get("top_logprobs") or 0
                job.logprobs = ("chat", overrides["logprobs"])
            if "messages" not in body:
                raise RequestError("body.messages is required for /v1/chat/completions")
            self.limits.check_sequences(n, 1)
            tool_list = job.tools.template_tools() if job.tools is not None else None
            _, ids = self.chat(body["messages"], tool_list)
            prompts, names = [ids], ["prompt"]
        else:
            if body.get("logprobs") is not None:
                overrides["logprobs"] = body["logprobs"]
                job.logprobs = ("completion", body["logprobs"])
            self._echo(job, body, overrides)
            if "prompt" not in body:
                raise RequestError("body.prompt is required for /v1/completions")
            prompt = body["prompt"]
            many = (
                isinstance(prompt, list)
                and prompt
                and all(isinstance(x, str | list) for x in prompt)
            )
            items = prompt if many else [prompt]
            self.limits.check_sequences(n, len(items))
            names = ["prompt" if len(items) == 1 else f"prompt[{i}]" for i in range(len(items))]
            prompts = [self.encode(x, name) for x, name in zip(items, names, strict=True)]
            if job.echo:
                job.prompt_texts = [
                    (x if isinstance(x, str) else self._text(ids), self._text(ids[:1]))
                    for x, ids in zip(items, prompts, strict=True)
                ]
        job.show_prompt_logprobs = body.get("prompt_logprobs") is not None
        key, given = id_key(job_id), overrides.get("max_tokens") is not None
        for p, (ids, name) in enumerate(zip(prompts, names, strict=True)):
            for k in range(n):
                params = self.params(overrides, key, p * n + k, p * n + k)
                job.seqs.append(Seq(ids, self.fit_max_tokens(params, ids, given, name), p))
        job.prompt_tokens = sum(len(ids) for ids in prompts)
        return job

    def _constraint_of(self, body: dict, job: Job) -> Any:
        """The request's structured-output constraint: its own fields', or (chat) the one its
        tool_choice needs (job.tools is set); two are refused."""
        spec = structured.from_body(body)
        if job.kind != "chat":
            return spec
        job.tools = tools.from_body(body, self.tool_call_parser)
        needed = job.tools.constraint() if job.tools is not None else None
        if needed is None:
            return spec
        if spec is not None:
            raise RequestError(
                f"tool_choice {job.tools.mode!r} constrains the output already: drop "
                "response_format / structured_outputs"
            )
        return structured.from_body({"structured_outputs": needed})

    def _echo(self, job: Job, body: dict, overrides: dict) -> None:
        """OpenAI's `echo`: each choice starts with its prompt, and with `logprobs` the prompt
        tokens' logprobs come first (the first one's null), as lm-eval's loglikelihood reads
        them; `max_tokens: 0` then only scores the prompt."""
        echo = body.get("echo") or False
        if not isinstance(echo, bool):
            raise RequestError(f"echo must be a boolean, got {short_repr(echo)}")
        job.echo = echo
        top = body.get("logprobs")
        scored = top is not None or overrides.get("max_tokens") == 0
        if echo and scored and overrides.get("prompt_logprobs") is None:
            overrides["prompt_logprobs"] = top or 0

    def _text(self, ids: list[int]) -> str:
        """The text of prompt token ids (what `echo` shows of a prompt sent as ids)."""
        tokenizer = self.llm.tokenizer
        if tokenizer is None:
            return ""
        with failure_as(INVALID_PROMPT, "the tokenizer cannot decode the prompt"):
            return tokenizer.decode(ids)


def _flat_message(index: int, message: Any) -> dict:
    """One chat message with its text parts joined: {"role": str, "content": str, ...}."""
    if not isinstance(message, dict):
        raise RequestError(
            f"message {index} must be {{'role': str, 'content': str}}, got {short_repr(message)}"
        )
    content = message.get("content")
    if isinstance(content, list):
        if not all(
            isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str)
            for x in content
        ):
            raise RequestError(f"message {index}: only text content parts are supported")
        message = {**message, "content": "".join(x["text"] for x in content)}
    message = tools.template_message(index, message)
    if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
        raise RequestError(
            f"message {index} must be {{'role': str, 'content': str}}, got {short_repr(message)}"
        )
    if message["role"] not in CHAT_ROLES:
        raise RequestError(
            f"message {index} has role {short_repr(message['role'])}: expected one of "
            + ", ".join(map(repr, CHAT_ROLES))
        )
    return message


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
