"""The three kinds of failure of a run, and the exit status each one ends it with.

They are kept apart so that no input can sink a job:

- `UsageError`: the command line, the model dir or a file is unusable. One line on stderr,
  exit 2, nothing generated.
- `RequestError`: one request cannot be answered. It becomes that request's error line (a stable
  `code` and a one-line message) and the run goes on (exit 1 at the end).
- anything else that escapes the run is an internal error (the engine or jaxpp itself, or an
  output that cannot be written): the run stops with exit 3, what was answered is kept and the
  traceback goes to a log file (see errorlog.py).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_LINE_ERRORS = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

# The stable `code` of a request's error line (docs/cli.md lists them with their meaning).
INVALID_JSON = "invalid_json"
INVALID_REQUEST = "invalid_request"
INVALID_URL = "invalid_url"
DUPLICATE_ID = "duplicate_id"
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
LIMIT_EXCEEDED = "limit_exceeded"
INVALID_PROMPT = "invalid_prompt"
CHAT_TEMPLATE_ERROR = "chat_template_error"
GENERATION_FAILED = "generation_failed"
REQUEST_FAILED = "request_failed"

MESSAGE_LIMIT = 500  # characters: an error line never echoes a whole hostile input


class UsageError(Exception):
    """A problem with the command line or its files: one line on stderr, exit status 2."""


class RequestError(Exception):
    """One request cannot be answered: becomes its error line, the run goes on."""

    def __init__(self, message: str, code: str = INVALID_REQUEST):
        super().__init__(one_line(message))
        self.code = code


class OutputError(Exception):
    """--output (or stdout) cannot be written: nothing more can be answered, exit 3."""


def one_line(text: object, limit: int = MESSAGE_LIMIT) -> str:
    """`text` on one line of at most `limit` characters (log files and JSONL stay line-based)."""
    flat = "; ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def short_repr(value: object, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: how error messages quote an input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
