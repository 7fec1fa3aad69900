"""The engine seam: ALL of a run's interaction with the engine lives in `EngineAdapter`.

The run loop (runner.py) hands it complete Jobs with `submit` and calls `drain` when the input
ends; the adapter reports every job back exactly once, through `on_done(job)` (its `results`
filled) or `on_failed(job, RequestError)`. How jobs reach the engine is the adapter's business:
today it collects `batch_size` sequences per `LLM.generate` call and learns of each finished
request through `on_finish`; a streaming engine (add_request / step) can replace this class
without the run loop changing.

Isolation: a call that raises is split in halves and each half run again, until the failure is
pinned on one request. If that request fails alone while the engine still answers a one-token
canary request, it is that request's error line (`generation_failed`); if the canary fails too, the
engine itself is broken and `EngineFailure` ends the run (exit 3). Requests that finished before
a failure keep their answers: each was reported when it finished.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxpp.cli.errorlog import TracebackLog
from jaxpp.cli.errors import GENERATION_FAILED, OutputError, RequestError, one_line
from jaxpp.cli.formats import Job


class EngineFailure(Exception):
    """The engine fails even on a canary request: not any request's fault."""


class EngineAdapter:
    def __init__(
        self,
        llm,
        batch_size: int,
        on_done: Callable[[Job], None],
        on_failed: Callable[[Job, RequestError], None],
        log: TracebackLog,
    ):
        self.llm = llm
        self.batch_size = batch_size
        self.on_done = on_done
        self.on_failed = on_failed
        self.log = log
        self.pending: list[Job] = []
        self.pending_seqs = 0

    def submit(self, job: Job) -> None:
        self.pending.append(job)
        self.pending_seqs += len(job.seqs)
        if self.pending_seqs >= self.batch_size:
            self.drain()

    def drain(self) -> None:
        jobs, self.pending, self.pending_seqs = self.pending, [], 0
        if jobs:
            self._generate(jobs)

    def _generate(self, jobs: list[Job]) -> None:
        seqs = [(job, k) for job in jobs for k in range(len(job.seqs))]
        for job in jobs:
            job.results = [None] * len(job.seqs)
            job.left = len(job.seqs)

        def on_finish(i: int, out) -> None:
            job, k = seqs[i]
            job.results[k] = out.outputs[0]
            job.left -= 1
            if job.left == 0:
                self.on_done(job)

        try:
            self.llm.generate(
                [job.seqs[k].token_ids for job, k in seqs],
                [job.seqs[k].params for job, k in seqs],
                on_finish=on_finish,
            )
        except OutputError:
            raise
        except Exception as e:  # noqa: BLE001 - pinned on one request below, or the engine's
            unfinished = [job for job in jobs if job.left > 0]
            if len(unfinished) == 1:
                self._blame(unfinished[0], e)
            elif not unfinished:  # raised after every request finished: only the engine's
                self._check_engine(e)
            else:
                half = len(unfinished) // 2
                self._generate(unfinished[:half])
                self._generate(unfinished[half:])

    def _blame(self, job: Job, error: Exception) -> None:
        """`job` failed alone: its error line, unless the engine fails without it too."""
        self._check_engine(error)
        if isinstance(error, ValueError):  # the engine's way of refusing a request
            message = f"the engine refused the request: {error}"
        else:
            where = self.log.record(f"line {job.line}: the engine failed on this request", error)
            message = (
                f"the engine failed on this request: {type(error).__name__}: {error} ({where})"
            )
        self.on_failed(job, RequestError(message, GENERATION_FAILED))

    def _check_engine(self, error: Exception) -> None:
        """Raise EngineFailure (from `error`) unless the engine answers a one-token request."""
        from jaxpp import SamplingParams  # noqa: PLC0415

        token = self.llm.config.bos_token_id
        token = token if isinstance(token, int) and 0 <= token < self.llm.config.vocab_size else 0
        try:
            self.llm.generate([[token]], [SamplingParams(max_tokens=1, temperature=0.0)])
        except OutputError:
            raise
        except Exception:  # noqa: BLE001 - any failure of the canary means the engine's broken
            raise EngineFailure(one_line(f"{type(error).__name__}: {error}")) from error
