"""Bounds on what one request may ask for, so that no line can grow memory or starve the others.

A request over a limit gets an error line with code `limit_exceeded`; nothing is allocated for
it first. The limits that have a flag are set from it (see flags.py); the others are fixed here.
Prompt tokens are bounded by --max-model-len (code `context_length_exceeded`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxpp.cli.errors import LIMIT_EXCEEDED, RequestError

DEFAULT_MAX_LINE_BYTES = 8 * 2**20
DEFAULT_MAX_SEQS_PER_REQUEST = 128  # OpenAI's bound on n
DEFAULT_MAX_LOGPROBS = 20  # vLLM's default max_logprobs


@dataclasses.dataclass(frozen=True)
class Limits:
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES  # one input line, so one prompt
    max_seqs_per_request: int = DEFAULT_MAX_SEQS_PER_REQUEST  # n x prompts of an OpenAI line
    max_logprobs: int = DEFAULT_MAX_LOGPROBS  # top-N logprobs per generated token
    max_stop_strings: int = 32
    max_stop_chars: int = 1024  # per stop string: the engine searches the text for each
    max_stop_token_ids: int = 256
    max_id_chars: int = 512  # ids are kept for the whole run (duplicate detection)

    def check_sampling(self, fields: dict[str, Any]) -> None:
        """The sampling fields of one sequence, before SamplingParams sees them."""
        for name in ("logprobs", "prompt_logprobs"):
            top = fields.get(name)
            if _is_int(top) and top > self.max_logprobs:
                _exceeded(
                    f"{name}={top} is over the limit of {self.max_logprobs}", "--max-logprobs"
                )
        stop = fields.get("stop")
        if isinstance(stop, list | tuple):
            if len(stop) > self.max_stop_strings:
                _exceeded(
                    f"stop has {len(stop)} strings, over the limit of {self.max_stop_strings}"
                )
            longest = max((len(s) for s in stop if isinstance(s, str)), default=0)
            if longest > self.max_stop_chars:
                _exceeded(
                    f"a stop string has {longest} characters, over the limit of "
                    f"{self.max_stop_chars}"
                )
        elif isinstance(stop, str) and len(stop) > self.max_stop_chars:
            _exceeded(f"stop has {len(stop)} characters, over the limit of {self.max_stop_chars}")
        ids = fields.get("stop_token_ids")
        if isinstance(ids, list | tuple) and len(ids) > self.max_stop_token_ids:
            _exceeded(
                f"stop_token_ids has {len(ids)} ids, over the limit of {self.max_stop_token_ids}"
            )

    def check_sequences(self, n: int, prompts: int) -> None:
        """An OpenAI line asks for n choices of each of its prompts."""
        if n * prompts > self.max_seqs_per_request:
            what = f"n={n}" if prompts == 1 else f"n={n} x {prompts} prompts"
            _exceeded(
                f"{what} asks for {n * prompts} sequences, over the limit of "
                f"{self.max_seqs_per_request}",
                "--max-seqs-per-request",
            )

    def check_id(self, value: str | int, name: str) -> None:
        if isinstance(value, str) and len(value) > self.max_id_chars:
            _exceeded(f"{name} has {len(value)} characters, over the limit of {self.max_id_chars}")


def _exceeded(message: str, flag: str | None = None) -> None:
    raise RequestError(message + (f" (raise it with {flag})" if flag else ""), LIMIT_EXCEEDED)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
