"""The run loop: input lines in, one answer or error line out per input line.

Each line goes through the per-request guard (guard.py) twice: once from its bytes to a Job
(parse, validate, tokenise, chat template) and once from the engine's results to its answer
record. The engine is reached only through the EngineAdapter (engine_adapter.py), which reports
every submitted job back exactly once, answered or failed.
"""

from __future__ import annotations

from collections.abc import Iterable

from jaxpp.cli.engine_adapter import EngineAdapter
from jaxpp.cli.errorlog import TracebackLog
from jaxpp.cli.errors import DUPLICATE_ID, LIMIT_EXCEEDED, RequestError
from jaxpp.cli.formats import (
    Job,
    RequestBuilder,
    id_key,
    is_openai_line,
    looks_openai,
    parse_line,
)
from jaxpp.cli.guard import request_guard
from jaxpp.cli.lines import OversizedLine
from jaxpp.cli.progress import Progress
from jaxpp.cli.records import error_record, result_record
from jaxpp.cli.resume import Answered


class Runner:
    def __init__(
        self,
        llm,
        builder: RequestBuilder,
        sink,
        progress: Progress,
        lookahead: int,
        log: TracebackLog,
    ):
        self.builder = builder
        self.sink = sink
        self.progress = progress
        self.log = log
        self.engine = EngineAdapter(llm, lookahead, self.answer, self.fail, log)
        self.done = self.errors = self.skipped = 0

    def run(self, lines: Iterable[bytes | OversizedLine], answered: Answered) -> None:
        first_line: dict[str, int] = {}  # id key -> the line that first used it
        for number, raw in enumerate(lines, 1):
            job = self.read(number, raw, first_line, answered)
            if job is not None:
                self.engine.submit(job)
        self.engine.drain()

    def read(
        self, number: int, raw: bytes | OversizedLine, first_line: dict, answered: Answered
    ) -> Job | None:
        """The Job of input line `number`, or None: already answered, or its error line written."""
        openai = isinstance(raw, bytes) and looks_openai(raw)
        job_id = None
        with request_guard(self.log, f"line {number}") as outcome:
            if isinstance(raw, OversizedLine):
                raise RequestError(
                    f"line has {raw.size} bytes, over the --max-line-bytes limit", LIMIT_EXCEEDED
                )
            obj = parse_line(raw)
            openai = is_openai_line(obj)
            name = "custom_id" if openai else "id"
            job_id = self.builder.request_id(obj, name, number)
            key = id_key(job_id)
            if key in first_line:
                if number in answered.error_lines:
                    self.skipped += 1
                    return None
                raise RequestError(
                    f"duplicate {name} {job_id!r} (first used on line {first_line[key]})",
                    DUPLICATE_ID,
                )
            first_line[key] = number
            if number in answered.error_lines or key in answered.ids:
                self.skipped += 1
                return None
            return self.builder.build(obj, number, job_id)
        if number in answered.error_lines:
            self.skipped += 1
            return None
        self.emit(error_record(number, job_id, outcome.error, openai))
        return None

    def answer(self, job: Job) -> None:
        with request_guard(self.log, f"line {job.line}: answer") as outcome:
            record = result_record(job)
        if outcome.error is not None:
            self.fail(job, outcome.error)
            return
        self.emit(record, sum(len(c.token_ids) for c in job.results))

    def fail(self, job: Job, error: RequestError) -> None:
        self.emit(error_record(job.line, job.id, error, job.openai))

    def emit(self, record: dict, tokens: int = 0) -> None:
        self.sink.write(record)
        self.done += 1
        error = record.get("error") is not None
        self.errors += error
        self.progress.advance(tokens, error)
