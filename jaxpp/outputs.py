"""Results of `LLM.generate`, shaped like vLLM's so that code written against it reads the same."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Logprob:
    """Log-probability of one token under the raw model distribution."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS, stop token or stop string) or "length"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    cumulative_logprob: float | None = None
    # One dict per generated token: token id -> Logprob (the chosen token plus the top-N).
    logprobs: list[dict[int, Logprob]] | None = None


@dataclasses.dataclass
class RequestMetrics:
    """Times are `time.perf_counter()` seconds, taken when the host saw each event."""

    arrival_time: float  # the request was added
    first_token_time: float  # its first token was known (the end of its prefill)
    finished_time: float
    time_to_first_token: float  # first_token_time - arrival_time (queueing included)
    decode_time: float  # finished_time - first_token_time
    decode_tokens_per_s: float  # tokens after the first / decode_time
    pipeline: dict  # the run's ticks, busy stage-ticks and occupancy when it finished
    first_scheduled_time: float | None = None  # it was first admitted to a row


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: RequestMetrics | None = None
    # SamplingParams.prompt_logprobs: per prompt token (None for the first) its logprob given
    # the tokens before it, plus the top-N alternatives.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
