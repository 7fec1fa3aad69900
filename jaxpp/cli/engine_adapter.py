"""The engine seam: ALL of a run's interaction with the engine lives in `EngineAdapter`.

The run loop (runner.py) hands it complete Jobs with `submit` and calls `drain` when the input
ends; the adapter reports every job back exactly once, through `on_done(job)` (its `results`
filled) or `on_failed(job, RequestError)`.

Streaming: `submit` queues each of a job's sequences with `LLM.add_request`, then steps the
engine while more than `lookahead` requests wait for a slot. The engine's slots refill as
requests finish (continuous batching); the queue of `lookahead` keeps them from running dry
while lines remain, and bounds what the CLI holds in the engine to its slots + lookahead
sequences (+ those of the job being added). A job is reported as soon as its last sequence comes
back from `LLM.step`, so its answer is written then, not when some batch ends.

Isolation: a request the engine refuses when it is added (ValueError: empty, out-of-vocabulary
or too long for the engine) is that request's error line at once. If `step` raises (or
`add_request` raises anything else), every request still in the engine is withdrawn and their
jobs go through the isolation fallback: the failing set is split in halves, each run again with
`LLM.generate`, until the failure is pinned on one request. If that request fails alone while
the engine still answers a one-token canary request, it is that request's error line
(`generation_failed`); if the canary fails too, the engine itself is broken and `EngineFailure`
ends the run (exit 3). Requests that finished before a failure keep their answers: each was
reported when it finished.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxpp.cli.errorlog import TracebackLog
from jaxpp.cli.errors import GENERATION_FAILED, OutputError, RequestError, one_line
from jaxpp.cli.formats import Job


class EngineFailure(Exception):
    """The engine fails even on a canary request: not any request's fault."""


def _expect_results(job: Job) -> None:
    """Make room for the results of all of `job`'s sequences (none yet)."""
    job.results = [None] * len(job.seqs)
    job.prompt_logprobs = [None] * len(job.seqs)
    job.left = len(job.seqs)


def _refusal(error: ValueError) -> RequestError:
    """The error line of a request the engine refused (ValueError is how it refuses one)."""
    return RequestError(f"the engine refused the request: {error}", GENERATION_FAILED)


class EngineAdapter:
    def __init__(
        self,
        llm,
        lookahead: int,
        on_done: Callable[[Job], None],
        on_failed: Callable[[Job, RequestError], None],
        log: TracebackLog,
    ):
        self.llm = llm
        self.lookahead = lookahead
        self.on_done = on_done
        self.on_failed = on_failed
        self.log = log
        self.in_engine: dict[str, tuple[Job, int]] = {}  # request id -> (job, sequence index)

    def submit(self, job: Job) -> None:
        _expect_results(job)
        added: list[str] = []
        try:
            for seq in job.seqs:
                added.append(self.llm.add_request(seq.token_ids, seq.params))
        except Exception as e:  # noqa: BLE001 - this job's error line, or isolated as below
            for request_id in added:
                self.llm.abort_request(request_id)
            if isinstance(e, ValueError):  # the engine refused this request, queued nothing
                self.on_failed(job, _refusal(e))
            else:  # not a refusal: pinned like a failed step, on this job or on the engine
                self._isolate([*self._withdraw_all(), job], e)
            return
        for k, request_id in enumerate(added):
            self.in_engine[request_id] = (job, k)
        while self.llm.num_waiting_requests > self.lookahead:
            self._step()

    def drain(self) -> None:
        while self.llm.has_unfinished_requests():
            self._step()

    def _step(self) -> None:
        try:
            outputs = self.llm.step()
        except Exception as e:  # noqa: BLE001 - pinned on one request below, or the engine's
            self._isolate(self._withdraw_all(), e)
            return
        # Reported outside the try: an OutputError from writing an answer ends the run (exit 3)
        # and is never blamed on a request.
        for out in outputs:
            job, k = self.in_engine.pop(out.request_id)
            self._finished(job, k, out)

    def _finished(self, job: Job, k: int, out) -> None:
        """Sequence `k` of `job` came back: report the job once it has all of them."""
        job.results[k] = out.outputs[0]
        job.prompt_logprobs[k] = out.prompt_logprobs
        job.left -= 1
        if job.left == 0:
            self.on_done(job)

    def _withdraw_all(self) -> list[Job]:
        """Abort every request the adapter has in the engine; their jobs, in submission order."""
        jobs = {id(job): job for job, _ in self.in_engine.values()}
        for request_id in self.in_engine:
            self.llm.abort_request(request_id)
        self.in_engine.clear()
        return list(jobs.values())

    def _generate(self, jobs: list[Job]) -> None:
        """Run `jobs` in one `LLM.generate` call (the isolation fallback, with nothing else in
        the engine), isolating the failure if it raises."""
        seqs = [(job, k) for job in jobs for k in range(len(job.seqs))]
        for job in jobs:
            _expect_results(job)
        try:
            self.llm.generate(
                [job.seqs[k].token_ids for job, k in seqs],
                [job.seqs[k].params for job, k in seqs],
                on_finish=lambda i, out: self._finished(*seqs[i], out),
            )
        except OutputError:
            raise
        except Exception as e:  # noqa: BLE001 - pinned on one request below, or the engine's
            self._isolate(jobs, e)

    def _isolate(self, jobs: list[Job], error: Exception) -> None:
        """`error` was raised while `jobs` were in the engine: pin it on one request by halving
        the unfinished ones, or on the engine."""
        unfinished = [job for job in jobs if job.left > 0]
        if len(unfinished) == 1:
            self._blame(unfinished[0], error)
        elif not unfinished:  # raised after every request finished: only the engine's
            self._check_engine(error)
        else:
            half = len(unfinished) // 2
            self._generate(unfinished[:half])
            self._generate(unfinished[half:])

    def _blame(self, job: Job, error: Exception) -> None:
        """`job` failed alone: its error line, unless the engine fails without it too."""
        self._check_engine(error)
        if isinstance(error, ValueError):
            self.on_failed(job, _refusal(error))
            return
        where = self.log.record(f"line {job.line}: the engine failed on this request", error)
        message = f"the engine failed on this request: {type(error).__name__}: {error} ({where})"
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
