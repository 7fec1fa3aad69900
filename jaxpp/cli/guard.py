"""The per-request guard: the ONE place where whatever goes wrong with one request becomes that
request's error line, so that no input can cost another request its answer.

Every stage of a request runs inside `request_guard`: reading and parsing its line, validating
its fields, tokenising, chat templating, its share of an engine call (see engine_adapter.py) and
building its answer record. The request formats raise `RequestError` with a precise code where a
failure is expected (`failure_as` wraps the third-party calls that can refuse an input: the
tokenizer, the chat template); anything else a request triggers is caught here too, answered with
code `request_failed`, and its traceback logged, because it points at a jaxpp bug to fix.

Not caught: `OutputError` (the answers cannot be written: the run must stop) and BaseExceptions
such as KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from jaxpp.cli.errorlog import TracebackLog
from jaxpp.cli.errors import REQUEST_FAILED, OutputError, RequestError


@dataclasses.dataclass
class Outcome:
    """What a guarded block left: its RequestError, or None when it completed."""

    error: RequestError | None = None


@contextlib.contextmanager
def request_guard(log: TracebackLog, what: str) -> Iterator[Outcome]:
    """Run the block for one request (`what` names it in the log); a failure lands in the
    yielded Outcome instead of propagating."""
    outcome = Outcome()
    try:
        yield outcome
    except RequestError as e:
        outcome.error = e
    except OutputError:
        raise
    except Exception as e:  # noqa: BLE001 - the point of the guard: any failure is this request's
        where = log.record(what, e)
        outcome.error = RequestError(f"{type(e).__name__}: {e} ({where})", REQUEST_FAILED)


@contextlib.contextmanager
def failure_as(code: str, context: str) -> Iterator[None]:
    """A third-party call that may refuse a request's input in ways nobody can list (a tokenizer,
    a chat template): any exception becomes RequestError(code, "<context>: <message>")."""
    try:
        yield
    except RequestError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever it raised, the input is what it refused
        message = str(e) or type(e).__name__
        raise RequestError(f"{context}: {message}", code) from e
